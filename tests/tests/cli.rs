//! The admin surface around an export: `drvutil --ps/--pas/--dump` agree
//! with what a client did, a second export of a volume that is already
//! being served is refused (two producers would corrupt the change log), and
//! a bad backing path fails cleanly.

use rewind_tests::*;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn drvutil(shm: &std::path::Path, args: &[&str]) -> std::process::Output {
    run(
        Command::new(rewind_bin("drvutil"))
            .arg("--shm-dir")
            .arg(shm)
            .args(args),
        T,
    )
}

fn require_rewind() {
    if server_kind() != ServerKind::Rewind {
        panic!("these tests need `rewind export` (unset REWIND_TEST_SERVER)");
    }
}

#[test]
fn drvutil_ps_pas_dump_agree_with_client() {
    require_rewind();
    let s = Scratch::new("cli-drvutil");
    let shm = s.join("shm");
    std::fs::create_dir_all(&shm).unwrap();
    let a = s.join("vola.img");
    let b = s.join("volb.img");
    create_random(&a, 8 * MIB, 71);
    create_sparse(&b, 8 * MIB);
    let before = ImageCopy::capture(&s, &a);
    let opts = ExportOpts {
        shm_dir: Some(shm.clone()),
        ..Default::default()
    };
    let ea = Export::start(&s, &a, opts.clone());
    let eb = Export::start(&s, &b, opts);
    let writes = [(0u64, 4096u64), (MIB + 1537, 1024), (2 * MIB, MIB)];
    let mut c = tool("qemu-io");
    c.args(["-f", "raw", &ea.uri()]);
    for (o, l) in writes {
        c.arg("-c").arg(format!("write -P 0x42 {o} {l}"));
    }
    run_ok(&mut c, T);
    let total: u64 = writes.iter().map(|w| w.1).sum();

    // --pas --json lists both volumes
    let o = drvutil(&shm, &["--pas", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    let names: Vec<&str> = v
        .as_array()
        .expect("--pas --json is an array")
        .iter()
        .filter_map(|r| r["volume"].as_str())
        .collect();
    assert!(names.contains(&"vola") && names.contains(&"volb"), "{v}");

    // --ps VOLUME --json: counters equal what the client did
    let o = drvutil(&shm, &["--ps", "vola", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["stats"]["writes"], writes.len(), "{}", v["stats"]);
    assert_eq!(v["stats"]["bytes_written"], total, "{}", v["stats"]);
    assert_eq!(v["stats"]["capture_mode"], "data", "{}", v["stats"]);
    let o = drvutil(&shm, &["--ps", "volb", "--json"]);
    let v: Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["stats"]["writes"], 0, "{}", v["stats"]);

    // the text report shows the admin fields
    let o = drvutil(&shm, &["--ps", "vola"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    for field in ["Capture mode", "Change block size", "Dirty blocks"] {
        assert!(
            t.contains(field),
            "`{field}` missing from drvutil --ps:\n{t}"
        );
    }
    // an unknown volume is an error, not an empty report
    let o = drvutil(&shm, &["--ps", "no-such-volume"]);
    assert!(!o.status.success(), "{}", text(&o));

    // and --dump accounts for exactly those writes
    assert_changes_recorded(
        &ea,
        &before,
        Some(&RangeSet::from_extents(writes.iter().copied())),
    );
    ea.stop();
    eb.stop();
}

#[test]
fn second_export_of_a_served_volume_is_refused() {
    require_rewind();
    let s = Scratch::new("cli-twice");
    let backing = s.join("vol.img");
    create_random(&backing, 8 * MIB, 72);
    let before = ImageCopy::capture(&s, &backing);
    let shm = s.join("shm");
    let state = s.join("state");
    std::fs::create_dir_all(&shm).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let ex = Export::start(
        &s,
        &backing,
        ExportOpts {
            shm_dir: Some(shm.clone()),
            state_dir: Some(state.clone()),
            ..Default::default()
        },
    );
    let sock2 = s.join("second.sock");
    let mut second = Command::new(rewind_bin("rewind"))
        .arg("export")
        .arg("--backing")
        .arg(&backing)
        .arg("--listen")
        .arg(format!("unix:{}", sock2.display()))
        .arg("--shm-dir")
        .arg(&shm)
        .arg("--state-dir")
        .arg(&state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let t0 = Instant::now();
    let st = loop {
        if let Some(st) = second.try_wait().unwrap() {
            break Some(st);
        }
        if t0.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if st.is_none() {
        let _ = second.kill();
        let _ = second.wait();
        panic!("a second `rewind export` of a volume already being served kept running (two producers on one change log)");
    }
    assert!(!st.unwrap().success(), "second export exited 0");
    // the first one is unharmed
    let mut ex = ex;
    ex.assert_alive();
    run_ok(
        tool("qemu-io").args(["-f", "raw", &ex.uri(), "-c", "write -P 0x43 4096 4096"]),
        T,
    );
    assert_changes_recorded(&ex, &before, Some(&RangeSet::from_extents([(4096, 4096)])));
    ex.stop();
}

#[test]
fn missing_backing_file_fails_cleanly() {
    require_rewind();
    let s = Scratch::new("cli-missing");
    let o = run(
        Command::new(rewind_bin("rewind"))
            .arg("export")
            .arg("--backing")
            .arg(s.join("does-not-exist.img"))
            .arg("--listen")
            .arg(format!("unix:{}", s.join("x.sock").display()))
            .arg("--shm-dir")
            .arg(s.join("shm"))
            .arg("--state-dir")
            .arg(s.join("state")),
        T,
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("does-not-exist.img"),
        "error does not name the path: {}",
        text(&o)
    );
}

#[test]
fn export_name_and_volume_name_are_distinct() {
    require_rewind();
    let s = Scratch::new("cli-names");
    let backing = s.join("disk0.img");
    create_random(&backing, 4 * MIB, 73);
    let before = ImageCopy::capture(&s, &backing);
    let ex = Export::start(
        &s,
        &backing,
        ExportOpts {
            export_name: Some("public-name".into()),
            volume: Some("vol-internal".into()),
            ..Default::default()
        },
    );
    assert!(ex.uri().contains("/public-name?"));
    assert!(ex.shm_dir.join("vol-internal.clog").exists());
    assert!(!ex.shm_dir.join("public-name.clog").exists());
    assert!(!ex.shm_dir.join("disk0.clog").exists());
    run_ok(
        tool("qemu-io").args(["-f", "raw", &ex.uri(), "-c", "write -P 0x45 8192 512"]),
        T,
    );
    assert_changes_recorded(&ex, &before, Some(&RangeSet::from_extents([(8192, 512)])));
    ex.stop();
}
