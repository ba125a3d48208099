//! Retention on `rewind target` (flags → journal policy, pruned by the
//! daemon while replication runs) and `cdpcli --showsummary`.

use rewind_tests::recovery::*;
use rewind_tests::replication::*;
use rewind_tests::*;
use std::time::{Duration, Instant};

const SIZE: u64 = 16 * MIB;

fn listed(list: &serde_json::Value, name: &str) -> bool {
    list["bookmarks"]
        .as_array()
        .is_some_and(|b| b.iter().any(|x| x["name"] == name))
}

/// keep_all 3 s + app bookmarks kept 1 h, pruned every second while the
/// source keeps writing: the old user bookmark and old times leave the
/// window (clear error), the promised app bookmark stays and recovers
/// exactly; `cdpcli --showsummary` reports the catalogue, the log type, the
/// data files on disk and the recovery time range of `rewind recover list`.
#[test]
fn recovery_retention_prunes_while_replicating_and_showsummary() {
    let s = Scratch::new("rec-ret");
    let src = s.join("vol.img");
    create_random(&src, SIZE, 6);
    let pki = Pki::new(&s, "pki");
    let export = Export::start(&s, &src, ExportOpts::for_volume("vol0"));
    let dir = s.join("tdir");
    let sd = s.join("tstate");
    let mut c = std::process::Command::new(rewind_bin("rewind"));
    c.args(["target", "--listen", "tcp:127.0.0.1:0", "--dir"])
        .arg(&dir)
        .arg("--state-dir")
        .arg(&sd)
        .arg("--tls-dir")
        .arg(&pki.dir)
        .args(["--host", "127.0.0.1", "--allow", "replicator"])
        .args([
            "--keep-all",
            "3s",
            "--keep-bookmarks",
            "app:1h",
            "--prune-interval",
            "1s",
        ]);
    let mut d = Daemon::spawn(c, s.join("target.log"));
    let addr = wait_listen(&mut d, &sd, "target");
    let target = Target {
        daemon: d,
        addr,
        dir: dir.clone(),
        state_dir: sd.clone(),
        opts: TargetOpts::tls(&pki),
    };
    let repl = Replicator::start(
        &s,
        addr,
        ReplicatorOpts::tls(&pki, "vol0", &src, &export.shm_dir, "zstd:1"),
    );
    wait_drained(&repl, &target, Duration::from_secs(60));
    let sds = sd.to_str().unwrap().to_string();
    random_writes(&export.uri(), SIZE, 20, 600);
    create_bookmark(&export, "old-user", Some("user"));
    let t_old = now_ns();
    random_writes(&export.uri(), SIZE, 20, 601);
    create_bookmark(&export, "kept-app", Some("app"));
    let h_app = blake3_file(&src);
    // Keep replicating past the 3 s window; the target prunes meanwhile.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut k = 0;
    let list = loop {
        random_writes(&export.uri(), SIZE, 5, 700 + k);
        k += 1;
        std::thread::sleep(Duration::from_millis(300));
        let l = rewind_json(&["recover", "list", "--volume", "vol0", "--state-dir", &sds]);
        if !listed(&l, "old-user") {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "nothing pruned after 30 s: {l}\n{}",
            target.daemon.log_text()
        );
    };
    assert!(
        listed(&list, "kept-app"),
        "the promised app bookmark was pruned: {list}"
    );
    assert!(
        target
            .daemon
            .log_text()
            .contains("retention pruned the journal"),
        "{}",
        target.daemon.log_text()
    );
    let doc = wait_drained(&repl, &target, Duration::from_secs(60));
    assert!(fully_drained(&doc));
    assert_same(&src, &target.replica("vol0"), "replica under retention");
    let out = s.join("app.raw");
    let o = rewind(&[
        "snapshot",
        "materialize",
        "--volume",
        "vol0",
        "--bookmark",
        "kept-app",
        "--out",
        out.to_str().unwrap(),
        "--state-dir",
        &sds,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        blake3_file(&out),
        h_app,
        "the promised bookmark after pruning"
    );
    let o = rewind(&[
        "snapshot",
        "materialize",
        "--volume",
        "vol0",
        "--at",
        &at_arg(t_old),
        "--out",
        out.to_str().unwrap(),
        "--state-dir",
        &sds,
    ]);
    assert!(
        !o.status.success() && text(&o).contains("retention window"),
        "{}",
        text(&o)
    );
    let o = rewind(&[
        "snapshot",
        "materialize",
        "--volume",
        "vol0",
        "--bookmark",
        "old-user",
        "--out",
        out.to_str().unwrap(),
        "--state-dir",
        &sds,
    ]);
    assert!(
        !o.status.success(),
        "a pruned bookmark was served: {}",
        text(&o)
    );

    // cdpcli --showsummary, text and JSON, against what is on disk and `recover list`.
    let list = rewind_json(&["recover", "list", "--volume", "vol0", "--state-dir", &sds]);
    let cdp = |json: bool| {
        let mut c = std::process::Command::new(rewind_bin("cdpcli"));
        c.args(["--showsummary", "--vol=vol0", "--state-dir", &sds]);
        if json {
            c.arg("--json");
        }
        let o = run(&mut c, Duration::from_secs(30));
        assert!(o.status.success(), "cdpcli: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let j: serde_json::Value = serde_json::from_str(&cdp(true)).expect("json");
    let jdir = dir.join("vol0").join("journal");
    assert_eq!(
        j["Database"],
        jdir.join("catalogue.sqlite").to_str().unwrap(),
        "{j}"
    );
    assert!(j["Version"].as_i64().unwrap() >= 1, "{j}");
    assert!(
        j["Log Type"].as_str().unwrap().starts_with("Roll-Backward"),
        "{j}"
    );
    let segs = std::fs::read_dir(jdir.join("journal"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .count();
    assert_eq!(
        j["Total Data Files"].as_u64().unwrap() as usize,
        segs,
        "{j}"
    );
    let seg_bytes: u64 = std::fs::read_dir(jdir.join("journal"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert!(j["Disk Space (app)"].as_u64().unwrap() >= seg_bytes, "{j}");
    let range = j["Recovery Time Range(GMT)"].as_str().unwrap();
    let first = list["time_ranges"][0]["start"].as_str().unwrap();
    assert!(range.starts_with(first), "{range} vs {list}");
    assert!(
        range.ends_with(list["latest_time"].as_str().unwrap()),
        "{range} vs {list}"
    );
    assert!(
        j["recovery_time_range_ns"][0].as_u64().unwrap() > t_old,
        "window start not advanced: {j}"
    );
    let t = cdp(false);
    for f in [
        "Database                 :",
        "Version                  :",
        "Log Type                 : Roll-Backward",
        "Disk Space (app)         :",
        "Total Data Files         :",
        "Recovery Time Range(GMT) :",
    ] {
        assert!(t.contains(f), "{f:?} missing in:\n{t}");
    }
    assert!(t.contains(range), "{t}");
}
