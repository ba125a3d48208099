//! Operating rewind as an admin: `rewind protect / pause / resume / resync /
//! unprotect` through the replicator's admin socket against real daemons on
//! loopback with mutual TLS; `rewind status --json` (live from the socket,
//! from the file when the daemon is down) and `rewind health-report` checked
//! against known scenarios (a paused pair overflowing a tiny change-log ring
//! into bitmap mode, RPO over threshold, a stopped target, a tiny target
//! spool budget); the admin socket and the metrics endpoint refusing
//! outsiders.

use rewind_tests::replication::*;
use rewind_tests::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const SIZE: u64 = 32 * MIB;

fn rewind() -> Command {
    Command::new(rewind_bin("rewind"))
}

/// [`poll_until`] every 100 ms.
fn wait_for(what: &str, timeout: Duration, f: impl FnMut() -> bool) {
    poll_until(what, timeout, Duration::from_millis(100), f)
}

/// A replicator started with a target but no pair (pairs come with `protect`).
fn start_replicator(s: &Scratch, pki: &Path, target: &str, state: &Path, extra: &[&str]) -> Daemon {
    let mut c = rewind();
    c.arg("replicator")
        .arg("--target")
        .arg(format!("tcp:{target}"))
        .args(["--server-name", "127.0.0.1", "--host", "replicator"])
        .arg("--tls-dir")
        .arg(pki)
        .arg("--state-dir")
        .arg(state)
        .args(extra);
    let _ = std::fs::remove_file(state.join("status.json"));
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let mut d = Daemon::spawn(c, s.join(&format!("repl-{n}.log")));
    let pid = u64::from(d.pid());
    wait_status(&mut d, state, "replicator", Duration::from_secs(20), |v| {
        (v["pid"].as_u64() == Some(pid) && state.join("control.sock").exists()).then_some(())
    });
    d
}

fn pair(doc: &Value, volume: &str) -> Value {
    doc["source"]["pairs"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["status"]["volume"] == volume).cloned())
        .unwrap_or(Value::Null)
}

fn has_alert(p: &Value, what: &str) -> bool {
    p["alerts"]
        .as_array()
        .is_some_and(|a| a.iter().any(|x| x.as_str().unwrap_or("").contains(what)))
}

fn admin(args: &[&str], state: &Path) -> Output {
    let mut c = rewind();
    c.args(args).arg("--state-dir").arg(state);
    run(&mut c, Duration::from_secs(120))
}

/// `rewind protect --volume VOLUME --device DEVICE --shm-dir SHM EXTRA...`
/// against the replicator with state directory `state`.
fn protect(state: &Path, volume: &str, device: &Path, shm: &Path, extra: &[&str]) -> Output {
    let (device, shm) = (
        device.to_str().expect("UTF-8 device path"),
        shm.to_str().expect("UTF-8 shm path"),
    );
    let mut a = vec![
        "protect",
        "--volume",
        volume,
        "--device",
        device,
        "--shm-dir",
        shm,
    ];
    a.extend_from_slice(extra);
    admin(&a, state)
}

/// The last day of `rewind health-report --json` for `volume` (Null while
/// no history was written yet).
fn health(state: &Path, volume: &str) -> Value {
    let o = run(
        rewind()
            .args(["health-report", "--json", "--volume", volume, "--state-dir"])
            .arg(state),
        T,
    );
    if !o.status.success() {
        assert!(text(&o).contains("no health history"), "{}", text(&o));
        return Value::Null;
    }
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["days"]
        .as_array()
        .and_then(|d| d.last().cloned())
        .unwrap_or(Value::Null)
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    r
}

fn as_nobody(args: &[&str], extra: &Path) -> Output {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
        .arg(rewind_bin("rewind"))
        .args(args)
        .arg(extra);
    run(&mut c, T)
}

/// The whole admin cycle on one volume: protect (initial checksum sync),
/// pause with writes overflowing a tiny ring (bitmap-mode and RPO alerts,
/// metrics and health report show it), a restart keeps the paused pair,
/// resume converges, resync does a checksum pass, unprotect forgets the
/// pair. Bad commands change nothing; outsiders are refused.
#[test]
fn ops_protect_pause_resume_resync_unprotect() {
    let s = Scratch::new("ops-cycle");
    let backing = s.join("vol.img");
    create_random(&backing, SIZE, 7);
    let pki = Pki::new(&s, "pki");
    let export = Export::start(
        &s,
        &backing,
        ExportOpts {
            ring_size: Some(256 * KIB),
            ..ExportOpts::for_volume("vol0")
        },
    );
    let target = Target::start(&s, TargetOpts::tls(&pki));
    let state = s.join("rstate");
    let taddr = target.addr.to_string();
    let extra = [
        "--rpo-threshold",
        "1",
        "--history-interval",
        "1",
        "--metrics",
        "127.0.0.1:0",
    ];
    let mut repl = start_replicator(&s, &pki.dir, &taddr, &state, &extra);

    // The socket is root-only.
    let sock = state.join("control.sock");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let doc = status_json(&state, None);
    assert_eq!(doc["figures_from"], "live", "{doc}");
    assert_eq!(doc["source"]["pairs"].as_array().map(Vec::len), Some(0));

    // protect, following the initial sync to Differential Sync.
    let shm = &export.shm_dir;
    let protect_vol0 = |extra: &[&str]| protect(&state, "vol0", &backing, shm, extra);
    let o = protect_vol0(&["--group", "g1", "--wait", "--timeout", "60"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("Differential Sync"), "{}", text(&o));
    assert_same(&backing, &target.replica("vol0"), "after protect");

    // Bad commands are refused with a reason and change nothing.
    let o = protect_vol0(&[]);
    assert!(
        !o.status.success() && text(&o).contains("already protected"),
        "{}",
        text(&o)
    );
    let o = protect(&state, "vol9", &backing, shm, &[]);
    assert!(
        !o.status.success() && text(&o).contains("no change log"),
        "{}",
        text(&o)
    );
    let o = protect(&state, "vol9", Path::new("/nonexistent"), shm, &[]);
    assert!(
        !o.status.success() && text(&o).contains("--device /nonexistent"),
        "{}",
        text(&o)
    );
    let o = admin(&["pause", "--volume", "nope"], &state);
    assert!(
        !o.status.success() && text(&o).contains("not protected"),
        "{}",
        text(&o)
    );
    let o = admin(&["resync", "--group", "nogroup"], &state);
    assert!(
        !o.status.success() && text(&o).contains("no protected volume"),
        "{}",
        text(&o)
    );
    let doc = status_json(&state, None);
    assert_eq!(doc["source"]["pairs"].as_array().map(Vec::len), Some(1));
    assert_eq!(pair(&doc, "vol0")["status"]["state"], "DifferentialSync");

    // Outsiders: the socket file (0600) refuses them, and so does the
    // daemon's credential check when the file mode is opened up. (The state
    // directory the daemon creates is 0700 too; opened here to test each
    // layer on its own.)
    let dir_mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let o = as_nobody(&["pause", "--volume", "vol0", "--socket"], &sock);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("Permission denied"), "{}", text(&o));
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = as_nobody(&["pause", "--volume", "vol0", "--socket"], &sock);
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(dir_mode)).unwrap();
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("permission denied: uid 65534"),
        "{}",
        text(&o)
    );
    assert_eq!(
        pair(&status_json(&state, None), "vol0")["status"]["state"],
        "DifferentialSync"
    );

    // pause by group; writes fill the tiny ring: bitmap mode, RPO over 1 s.
    let o = admin(&["pause", "--group", "g1"], &state);
    assert!(
        o.status.success() && text(&o).contains("paused vol0"),
        "{}",
        text(&o)
    );
    wait_for("state Paused", T, || {
        pair(&status_json(&state, None), "vol0")["status"]["state"] == "Paused"
    });
    let applied_before = target.volume_status("vol0")["status"]["applied_seq"].clone();
    let writer = Writer::start(export.uri(), SIZE, 11);
    writer.resume();
    wait_for("capture in bitmap mode", T, || {
        pair(&status_json(&state, None), "vol0")["status"]["capture_mode"] == "Bitmap"
    });
    writer.pause();
    wait_for("the RPO alert", T, || {
        has_alert(
            &pair(&status_json(&state, None), "vol0"),
            "over the threshold of 1 s",
        )
    });
    let p = pair(&status_json(&state, None), "vol0");
    assert!(has_alert(&p, "capture in bitmap mode"), "{p}");
    assert!(
        p["status"]["pending_source_bytes"].as_u64() > Some(0),
        "{p}"
    );
    assert_eq!(
        target.volume_status("vol0")["status"]["applied_seq"],
        applied_before
    );
    let human = run_ok(rewind().arg("status").arg("--state-dir").arg(&state), T);
    let h = String::from_utf8_lossy(&human.stdout);
    assert!(
        h.contains("pair vol0 [group g1]") && h.contains("Paused") && h.contains("ALERT"),
        "{h}"
    );

    // Prometheus text on the loopback endpoint.
    let metrics = status_json(&state, None)["source"]["metrics"]
        .as_str()
        .unwrap()
        .to_owned();
    let m = http_get(&metrics, "/metrics");
    assert!(m.starts_with("HTTP/1.0 200"), "{m}");
    assert!(
        m.contains("rewind_pair_state{volume=\"vol0\",group=\"g1\",state=\"Paused\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("rewind_pair_capture_mode{volume=\"vol0\",group=\"g1\",mode=\"Bitmap\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("rewind_pair_rpo_seconds{volume=\"vol0\",group=\"g1\"}"),
        "{m}"
    );

    // The health history has the paused, bitmap-mode, RPO-not-met time.
    wait_for("health history of the pause", T, || {
        let d = health(&state, "vol0");
        d["hours_paused"].as_f64() > Some(0.0)
            && d["hours_bitmap_mode"].as_f64() > Some(0.0)
            && d["hours_rpo_not_met"].as_f64() > Some(0.0)
    });
    let d = health(&state, "vol0");
    assert_eq!(d["rpo_threshold_secs"].as_f64(), Some(1.0), "{d}");
    assert!(d["rpo_max_secs"].as_f64() > Some(1.0), "{d}");
    // The initial sync of a volume full of data is resync traffic, not changes.
    assert!(d["resync_bytes"].as_u64() > Some(16 * MIB), "{d}");
    assert!(d["health"].to_string().contains("RPO not met"), "{d}");

    // A restart keeps the protected pair and its pause.
    repl.stop();
    let doc = status_json(&state, None);
    assert_eq!(doc["figures_from"], "status file", "{doc}");
    assert!(
        doc["note"]
            .as_str()
            .unwrap_or("")
            .contains("did not answer"),
        "{doc}"
    );
    let mut repl = start_replicator(&s, &pki.dir, &taddr, &state, &extra);
    wait_for("the restarted pair paused", T, || {
        pair(&status_json(&state, None), "vol0")["status"]["state"] == "Paused"
    });

    // resume: converges, every acknowledged write at the target.
    let o = admin(
        &["resume", "--volume", "vol0", "--wait", "--timeout", "60"],
        &state,
    );
    assert!(o.status.success(), "{}", text(&o));
    let doc = wait_drained_dir(&state, None, &target, T);
    assert_eq!(pair(&doc, "vol0")["origin"], "protect");
    assert_same(&backing, &target.replica("vol0"), "after resume");
    writer.check(&target.replica("vol0"));
    // What the writer wrote while paused was shipped as changes.
    wait_for("the changes in the health history", T, || {
        health(&state, "vol0")["change_bytes"].as_u64() > Some(0)
    });

    // resync: one more checksum pass at the target, still equal.
    let passes = target.volume_status("vol0")["resync_passes"]
        .as_u64()
        .unwrap_or(0);
    let o = admin(&["resync", "--all", "--wait", "--timeout", "60"], &state);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("Resync Step I"), "{}", text(&o));
    wait_for("the resync pass counted at the target", T, || {
        target.volume_status("vol0")["resync_passes"].as_u64() > Some(passes)
    });
    wait_drained_dir(&state, None, &target, T);
    assert_same(&backing, &target.replica("vol0"), "after resync");

    // unprotect: the pair and its state are gone, also after a restart.
    let o = admin(&["unprotect", "--volume", "vol0"], &state);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        status_json(&state, None)["source"]["pairs"]
            .as_array()
            .map(Vec::len),
        Some(0)
    );
    assert!(!state.join("vol0").join("vol0.pair.json").exists());
    let o = admin(&["unprotect", "--volume", "vol0"], &state);
    assert!(
        !o.status.success() && text(&o).contains("not protected"),
        "{}",
        text(&o)
    );
    repl.stop();
    let repl = start_replicator(&s, &pki.dir, &taddr, &state, &extra);
    assert_eq!(
        status_json(&state, None)["source"]["pairs"]
            .as_array()
            .map(Vec::len),
        Some(0)
    );
    drop(repl);
    drop(writer);
}

/// A stopped target: RPO grows and the pair says why; a tiny spool budget
/// at the target: flow-controlled time in the health report; non-loopback
/// metrics binds are refused.
#[test]
fn ops_stopped_target_and_flow_control_in_status_and_health() {
    let s = Scratch::new("ops-rpo");
    let backing = s.join("vol.img");
    create_sparse(&backing, SIZE);
    let pki = Pki::new(&s, "pki");
    let export = Export::start(&s, &backing, ExportOpts::for_volume("vol0"));
    let mut topts = TargetOpts::tls(&pki);
    topts.spool_budget = Some("4K".into());
    let target = Target::start(&s, topts);
    let state = s.join("rstate");
    let taddr = target.addr.to_string();

    // Non-loopback metrics: refused before anything starts.
    let o = run_fails(
        rewind()
            .args([
                "replicator",
                "--insecure",
                "--target",
                &format!("tcp:{taddr}"),
            ])
            .args(["--metrics", "0.0.0.0:0", "--state-dir"])
            .arg(s.join("other")),
        T,
    );
    assert!(text(&o).contains("not a loopback address"), "{}", text(&o));
    assert!(!s.join("other").join("control.sock").exists());

    let extra = ["--rpo-threshold", "1", "--history-interval", "1"];
    let _repl = start_replicator(&s, &pki.dir, &taddr, &state, &extra);
    let o = protect(
        &state,
        "vol0",
        &backing,
        &export.shm_dir,
        &["--compression", "off", "--wait"],
    );
    assert!(o.status.success(), "{}", text(&o));

    // Sustained writes against a 4 KiB spool budget: flow controlled.
    let writer = Writer::start(export.uri(), SIZE, 5);
    writer.resume();
    wait_for("flow-controlled time in the health history", T, || {
        health(&state, "vol0")["hours_flow_controlled"].as_f64() > Some(0.0)
    });
    writer.pause();
    let d = health(&state, "vol0");
    assert!(d["health"].to_string().contains("flow controlled"), "{d}");

    // The target's write pattern: the writer's 4..64 KiB writes at random
    // offsets (coalesced where adjacent) are counted by size.
    let mut target = target;
    wait_drained_dir(&state, None, &target, T);
    let cdpcli = |args: &[&str]| {
        run_ok(
            Command::new(rewind_bin("cdpcli"))
                .args(args)
                .arg("--state-dir")
                .arg(&target.state_dir),
            T,
        )
    };
    let o = cdpcli(&["--iopattern", "--vol=vol0", "--json"]);
    let io: Value = serde_json::from_slice(&o.stdout).unwrap();
    let sum = |k: &str| -> u64 {
        io["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b[k].as_u64().unwrap())
            .sum()
    };
    assert!(io["writes"].as_u64() > Some(0), "{io}");
    assert_eq!(
        sum("random") + sum("sequential"),
        io["writes"].as_u64().unwrap()
    );
    let small: u64 = io["buckets"].as_array().unwrap()[..3]
        .iter()
        .map(|b| b["random"].as_u64().unwrap() + b["sequential"].as_u64().unwrap())
        .sum();
    assert_eq!(small, 0, "no write under 4 KiB was made: {io}");
    assert!(sum("random") > 0, "{io}");
    let o = cdpcli(&["--iopattern", "--vol=vol0"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("Write Random") && out.contains("64 KiB"),
        "{out}"
    );

    // Stop the target: RPO grows, the alert names the connection problem.
    target.daemon.stop();
    run_ok(
        tool("qemu-io").args(["-f", "raw", &export.uri(), "-c", "write -P 0x5a 0 1M"]),
        T,
    );
    wait_for("RPO over 1 s", T, || {
        pair(&status_json(&state, None), "vol0")["rpo_secs"].as_f64() > Some(1.0)
    });
    let r1 = pair(&status_json(&state, None), "vol0")["rpo_secs"]
        .as_f64()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let p = pair(&status_json(&state, None), "vol0");
    let r2 = p["rpo_secs"].as_f64().unwrap();
    assert!(r2 > r1 + 1.0, "RPO did not grow: {r1} then {r2}");
    assert_eq!(p["status"]["connected"], false, "{p}");
    assert!(has_alert(&p, "not connected"), "{p}");
    assert!(has_alert(&p, "over the threshold"), "{p}");
    wait_for("disconnected time in the health history", T, || {
        health(&state, "vol0")["hours_disconnected"].as_f64() > Some(0.0)
    });
    drop(writer);
}

/// Every admin command has `--help` with examples.
#[test]
fn ops_help_has_examples() {
    for cmd in [
        "protect",
        "unprotect",
        "pause",
        "resume",
        "resync",
        "health-report",
        "status",
        "replicator",
    ] {
        let o = run_ok(rewind().args([cmd, "--help"]), T);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains("Examples:") && out.contains(&format!("rewind {cmd} ")),
            "rewind {cmd} --help has no examples:\n{out}"
        );
    }
}

/// `scripts/install` into a temporary root: binaries, units pointing at
/// them (checked by `systemd-analyze verify` when available), configuration
/// examples, state directory modes; a second run keeps edited files.
#[test]
fn ops_install_script_into_temp_root() {
    let s = Scratch::new("ops-install");
    let root = s.join("root");
    let install = || {
        let mut c = Command::new(workspace_root().join("scripts/install"));
        c.arg("--root").arg(&root).arg("--bins-from").arg(bin_dir());
        run_ok(&mut c, T)
    };
    let o = install();
    assert!(text(&o).contains("install: done"), "{}", text(&o));
    let mode = |p: &str| {
        std::fs::metadata(root.join(p))
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .permissions()
            .mode()
            & 0o777
    };
    for b in ["rewind", "drvutil", "cdpcli"] {
        assert_eq!(mode(&format!("usr/local/bin/{b}")), 0o755, "{b}");
    }
    assert_eq!(mode("var/lib/rewind"), 0o700);
    assert_eq!(mode("etc/rewind"), 0o755);
    assert_eq!(mode("etc/rewind/pki"), 0o700);
    assert_eq!(mode("etc/rewind/replicator.toml.example"), 0o644);
    assert!(root
        .join("usr/local/share/doc/rewind/admin-guide.md")
        .exists());
    let o = run_ok(
        Command::new(root.join("usr/local/bin/rewind")).arg("--version"),
        T,
    );
    assert!(text(&o).contains("rewind"), "{}", text(&o));
    let units = root.join("etc/systemd/system");
    let repl = std::fs::read_to_string(units.join("rewind-replicator.service")).unwrap();
    assert!(
        repl.contains(
            "ExecStart=/usr/local/bin/rewind replicator --config /etc/rewind/replicator.toml"
        ),
        "{repl}"
    );
    assert!(
        repl.contains("ExecReload=/bin/kill -HUP $MAINPID"),
        "{repl}"
    );
    let agent = std::fs::read_to_string(units.join("rewind-agent.service")).unwrap();
    assert!(
        agent.contains("ExecStart=/usr/local/bin/rewind agent --config /etc/rewind/agent.toml"),
        "{agent}"
    );
    let tgt = std::fs::read_to_string(units.join("rewind-target.service")).unwrap();
    assert!(
        tgt.contains("ExecStart=/usr/local/bin/rewind target --config /etc/rewind/target.toml"),
        "{tgt}"
    );
    // The units are valid for systemd (binary paths pointed into the root).
    if Path::new("/usr/bin/systemd-analyze").exists() {
        let check = s.join("verify");
        std::fs::create_dir_all(&check).unwrap();
        for (name, body) in [
            ("rewind-agent.service", &agent),
            ("rewind-replicator.service", &repl),
            ("rewind-target.service", &tgt),
        ] {
            let b = body.replace(
                "/usr/local/bin/rewind",
                root.join("usr/local/bin/rewind").to_str().unwrap(),
            );
            std::fs::write(check.join(name), b).unwrap();
            run_ok(
                Command::new("systemd-analyze")
                    .arg("verify")
                    .arg(check.join(name)),
                T,
            );
        }
    }
    // Again: an edited example is kept, binaries are replaced.
    std::fs::write(root.join("etc/rewind/target.toml.example"), "# mine\n").unwrap();
    let o = install();
    assert!(text(&o).contains("keeping existing"), "{}", text(&o));
    assert_eq!(
        std::fs::read_to_string(root.join("etc/rewind/target.toml.example")).unwrap(),
        "# mine\n"
    );
    // Bad arguments change nothing.
    let o = run_fails(
        Command::new(workspace_root().join("scripts/install")).args(["--prefix", "relative"]),
        T,
    );
    assert!(text(&o).contains("absolute path"), "{}", text(&o));
}

/// `rewind demo` (what `scripts/demo`, the README's main command, runs):
/// completes, verifies the recovered filesystem, and leaves no process,
/// mount, loop device or file behind.
#[test]
fn ops_demo_completes_and_verifies() {
    let s = Scratch::new("ops-demo");
    let o = run_ok(
        rewind()
            .args(["demo", "--size", "64M", "--data-mb", "8", "--dir"])
            .arg(s.path()),
        Duration::from_secs(300),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("DEMO OK"), "{}", text(&o));
    assert!(out.contains("e2fsck -fn on the replica: clean"), "{out}");
    assert!(out.contains("e2fsck -fn on the snapshot: clean"), "{out}");
    assert!(
        out.contains("exactly the") && out.contains("files of the bookmark"),
        "{out}"
    );
    assert!(
        out.contains("demo-before-changes") && out.contains("demo-after-changes"),
        "{out}"
    );
    assert!(
        out.contains("read back with the blake3 they were written with"),
        "{out}"
    );
    assert!(out.contains("Differential Sync"), "{out}");
    let left: Vec<_> = std::fs::read_dir(s.path()).unwrap().flatten().collect();
    assert!(left.is_empty(), "demo left {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains(s.path().to_str().unwrap()), "{mounts}");
    let loops = run_ok(Command::new("losetup").arg("-a"), T);
    assert!(
        !String::from_utf8_lossy(&loops.stdout).contains(s.path().to_str().unwrap()),
        "{}",
        text(&loops)
    );
}

/// Configuration files: SIGHUP applies `[[pair]]` tables added and removed
/// (a broken file changes nothing), a pair from the file cannot be
/// unprotected at run time, and the target's metrics endpoint (from its
/// configuration) serves its figures while a non-loopback one is refused.
#[test]
fn ops_config_reload_and_target_metrics() {
    let s = Scratch::new("ops-reload");
    let pki = Pki::new(&s, "pki");
    let p = pki.dir.display();
    let mut exports = Vec::new();
    for (i, name) in ["vol0", "vol1"].iter().enumerate() {
        let b = s.join(&format!("{name}.img"));
        create_random(&b, 8 * MIB, 20 + i as u64);
        exports.push((
            b.clone(),
            Export::start(&s, &b, ExportOpts::for_volume(name)),
        ));
    }
    let tstate = s.join("tstate");
    let ttoml = s.join("target.toml");
    let tbody = |metrics: &str| {
        let mut t = format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\nmetrics = \"{metrics}\"\n[tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/127.0.0.1.pem\"\nkey = \"{p}/127.0.0.1.key\"\n",
            tstate.display()
        );
        for v in ["vol0", "vol1"] {
            t += &format!(
                "[[volume]]\nname = \"{v}\"\nreplica = \"{}\"\njournal_dir = \"{}\"\n",
                s.join(&format!("replica-{v}.img")).display(),
                s.join(&format!("journal-{v}")).display()
            );
        }
        t
    };
    std::fs::write(&ttoml, tbody("0.0.0.0:0")).unwrap();
    let o = run_fails(rewind().arg("target").arg("--config").arg(&ttoml), T);
    assert!(
        text(&o).contains("metrics") && text(&o).contains("not a loopback address"),
        "{}",
        text(&o)
    );
    std::fs::write(&ttoml, tbody("127.0.0.1:0")).unwrap();
    let mut target = Daemon::spawn(
        {
            let mut c = rewind();
            c.arg("target").arg("--config").arg(&ttoml);
            c
        },
        s.join("target.log"),
    );
    let mut addr = String::new();
    wait_for("the target", T, || {
        target.assert_alive();
        read_status_file(&tstate)
            .and_then(|v| v["listen"].as_str().map(|a| addr = a.to_owned()))
            .is_some()
    });
    let rstate = s.join("rstate");
    let rtoml = s.join("replicator.toml");
    let rbody = |vols: &[&str]| {
        let mut t = format!(
            "state_dir = \"{}\"\n[target]\naddress = \"{addr}\"\nserver_name = \"127.0.0.1\"\n[tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/replicator.pem\"\nkey = \"{p}/replicator.key\"\n",
            rstate.display()
        );
        for (i, v) in ["vol0", "vol1"].iter().enumerate() {
            if vols.contains(v) {
                t += &format!(
                    "[[pair]]\nvolume = \"{v}\"\nshm_dir = \"{}\"\ndevice = \"{}\"\n",
                    exports[i].1.shm_dir.display(),
                    exports[i].0.display()
                );
            }
        }
        t
    };
    std::fs::write(&rtoml, rbody(&["vol0"])).unwrap();
    let mut repl = Daemon::spawn(
        {
            let mut c = rewind();
            c.arg("replicator").arg("--config").arg(&rtoml);
            c
        },
        s.join("replicator.log"),
    );
    let synced = |v: &str| {
        let d = status_json(&rstate, None);
        let p = pair(&d, v);
        p["status"]["state"] == "DifferentialSync" && p["status"]["drained"] == true
    };
    wait_for("vol0 in sync", T, || {
        repl.assert_alive();
        rstate.join("control.sock").exists() && synced("vol0")
    });
    assert_eq!(
        pair(&status_json(&rstate, None), "vol0")["origin"],
        "config"
    );
    let o = admin(&["unprotect", "--volume", "vol0"], &rstate);
    assert!(
        !o.status.success() && text(&o).contains("configuration file"),
        "{}",
        text(&o)
    );

    let hup = |d: &Daemon| {
        run_ok(Command::new("kill").args(["-HUP", &d.pid().to_string()]), T);
    };
    std::fs::write(&rtoml, rbody(&["vol0", "vol1"])).unwrap();
    hup(&repl);
    wait_for("vol1 added by the reload, in sync", T, || synced("vol1"));
    std::fs::write(
        &rtoml,
        rbody(&["vol1"]).replace("[target]", "bogus_key = 1\n[target]"),
    )
    .unwrap();
    hup(&repl);
    wait_for("the refused reload in the log", T, || {
        repl.log_text().contains("reload refused")
    });
    assert_eq!(
        status_json(&rstate, None)["source"]["pairs"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    std::fs::write(&rtoml, rbody(&["vol1"])).unwrap();
    hup(&repl);
    wait_for("vol0 removed by the reload", T, || {
        let d = status_json(&rstate, None);
        d["source"]["pairs"].as_array().map(Vec::len) == Some(1) && pair(&d, "vol1") != Value::Null
    });
    repl.assert_alive();
    assert_same(
        &exports[1].0,
        &s.join("replica-vol1.img"),
        "vol1 after reload",
    );

    let metrics = read_status_file(&tstate).unwrap()["metrics"]
        .as_str()
        .unwrap()
        .to_owned();
    let m = http_get(&metrics, "/metrics");
    assert!(m.contains("rewind_target_up 1"), "{m}");
    assert!(
        m.contains("rewind_target_applied_seq{volume=\"vol1\"}"),
        "{m}"
    );
    assert!(
        m.contains("rewind_target_spool_bytes{volume=\"vol0\"}"),
        "{m}"
    );
    repl.stop();
    target.stop();
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Measurement (not run in CI): how old the figures `rewind status` shows
/// are under a write load, live from the admin socket vs. the status file.
/// `cargo test -p rewind-tests --test ops -- --ignored --nocapture ops_measure`
#[test]
#[ignore]
fn ops_measure_status_freshness_under_load() {
    let s = Scratch::new("ops-fresh");
    let backing = s.join("vol.img");
    create_sparse(&backing, 64 * MIB);
    let st = Setup::start(&s, &backing, "zstd:1");
    let writer = Writer::start(st.export.uri(), 64 * MIB, 3);
    writer.resume();
    std::thread::sleep(Duration::from_secs(2));
    let (mut live, mut file) = (Vec::new(), Vec::new());
    for _ in 0..60 {
        let o = run_ok(
            rewind()
                .args(["status", "--json", "--state-dir"])
                .arg(&st.repl.state_dir),
            T,
        );
        let got = now_ns();
        let d: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(d["figures_from"], "live");
        let p = &d["source"]["pairs"][0]["status"];
        live.push(got.saturating_sub(p["updated_ns"].as_u64().unwrap()) as f64 / 1e6);
        if let Some(f) = read_status_file(&st.repl.state_dir) {
            file.push(now_ns().saturating_sub(f["updated_ns"].as_u64().unwrap()) as f64 / 1e6);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    writer.pause();
    println!(
        "status age under load, ms: live p50 {:.0} p99 {:.0} max {:.0} | status file p50 {:.0} p99 {:.0} max {:.0} (n={})",
        percentile(&mut live, 0.5),
        percentile(&mut live, 0.99),
        percentile(&mut live, 1.0),
        percentile(&mut file, 0.5),
        percentile(&mut file, 0.99),
        percentile(&mut file, 1.0),
        live.len()
    );
}

/// A target whose journal space limit cuts into its time policy: the
/// retention alert shows in the target's status, in `rewind status` and in
/// `rewind health-report --target-state-dir`.
#[test]
fn ops_retention_shorter_than_policy_is_reported() {
    let s = Scratch::new("ops-ret");
    let backing = s.join("vol.img");
    create_random(&backing, 16 * MIB, 4);
    let pki = Pki::new(&s, "pki");
    let export = Export::start(&s, &backing, ExportOpts::for_volume("vol0"));
    let tstate = s.join("tstate");
    let mut c = rewind();
    c.args(["target", "--listen", "tcp:127.0.0.1:0", "--dir"])
        .arg(s.join("tdir"))
        .arg("--tls-dir")
        .arg(&pki.dir)
        .args([
            "--host",
            "127.0.0.1",
            "--allow",
            "replicator",
            "--state-dir",
        ])
        .arg(&tstate)
        .args([
            "--keep-all",
            "1h",
            "--max-journal",
            "256K",
            "--prune-interval",
            "1s",
        ]);
    let mut target = Daemon::spawn(c, s.join("target.log"));
    let mut addr = String::new();
    wait_for("the target", T, || {
        target.assert_alive();
        read_status_file(&tstate)
            .and_then(|v| v["listen"].as_str().map(|a| addr = a.to_owned()))
            .is_some()
    });
    let state = s.join("rstate");
    let _repl = start_replicator(&s, &pki.dir, &addr, &state, &["--history-interval", "1"]);
    let o = protect(&state, "vol0", &backing, &export.shm_dir, &["--wait"]);
    assert!(o.status.success(), "{}", text(&o));
    let writer = Writer::start(export.uri(), 16 * MIB, 8);
    writer.resume();
    let tvol = |st: &Value| -> Value {
        st["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|x| x["name"] == "vol0").cloned())
            .unwrap_or(Value::Null)
    };
    wait_for("the retention alert at the target", T, || {
        read_status_file(&tstate).is_some_and(|st| {
            tvol(&st)["alerts"]
                .to_string()
                .contains("retention shorter than policy")
        })
    });
    writer.pause();
    let st = read_status_file(&tstate).unwrap();
    let r = &tvol(&st)["retention"];
    assert_eq!(r["policy_window_secs"].as_f64(), Some(3600.0), "{r}");
    assert_eq!(r["max_journal_bytes"].as_u64(), Some(256 * KIB), "{r}");
    assert!(r["journal_bytes"].as_u64() > Some(256 * KIB), "{r}");
    assert!(r["alert"].as_str().unwrap_or("").contains("limit"), "{r}");
    let o = run_ok(
        rewind()
            .args(["status", "--state-dir"])
            .arg(&state)
            .arg("--target-state-dir")
            .arg(&tstate),
        T,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("SHORTER THAN THE POLICY") && out.contains("of a 1.0 h policy"),
        "{out}"
    );
    wait_for("a health sample", T, || {
        health(&state, "vol0") != Value::Null
    });
    let o = run_ok(
        rewind()
            .args(["health-report", "--json", "--state-dir"])
            .arg(&state)
            .arg("--target-state-dir")
            .arg(&tstate),
        T,
    );
    let h: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        h["retention_now"][0]["retention"]["alert"].is_string(),
        "{h}"
    );
    assert!(
        h["days"]
            .to_string()
            .contains("retention shorter than policy"),
        "{h}"
    );
    target.stop();
}
