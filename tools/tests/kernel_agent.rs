//! `rewind agent` with `attach = "/dev/nbdN"` against a real kernel: ignored
//! on the host (no nbd there), run inside the test VM by
//! `scripts/kernel-vm/run-tests`.
//!
//! Two volumes, one attached to /dev/nbd4 only (no socket), one attached to
//! /dev/nbd5 and also listening: direct writes to the devices are captured,
//! a group bookmark tags both change logs, a SIGHUP that removes a volume
//! detaches its device while the other keeps serving, SIGTERM detaches the
//! rest and closes the logs cleanly.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn configured(dev: &str) -> bool {
    let n = dev.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{n}/size"))
        .map(|s| s.trim() != "0")
        .unwrap_or(false)
}

fn wait(what: &str, log: &Path, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn dd_write(dev: &str, byte: u8, offset_blocks: u64) {
    let buf = vec![byte; 64 * 1024];
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.seek(SeekFrom::Start(offset_blocks * 65536)).unwrap();
    f.write_all(&buf).unwrap();
    f.sync_all().unwrap();
}

fn drvutil(dir: &Path, v: &str) -> serde_json::Value {
    let o = Command::new(env!("CARGO_BIN_EXE_drvutil"))
        .arg("--shm-dir")
        .arg(dir.join("shm"))
        .args(["--dump", v, "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn agent_attaches_devices_bookmarks_them_and_detaches_on_reload_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for v in ["ka", "kb"] {
        let f = std::fs::File::create(d.join(format!("{v}.img"))).unwrap();
        f.set_len(32 << 20).unwrap();
    }
    let head = format!(
        "state_dir = \"{0}/state\"\nshm_dir = \"{0}/shm\"\nadmin_socket = \"{0}/admin.sock\"\nmemory_budget = \"32M\"\nconsistency_interval = \"off\"\n[[group]]\nname = \"g\"\n",
        d.display()
    );
    let ka = format!(
        "[[volume]]\nname = \"ka\"\nbacking = \"{}/ka.img\"\nattach = \"/dev/nbd4\"\ngroup = \"g\"\n",
        d.display()
    );
    let kb = format!(
        "[[volume]]\nname = \"kb\"\nbacking = \"{0}/kb.img\"\nattach = \"/dev/nbd5\"\nlisten = \"unix:{0}/kb.sock\"\ngroup = \"g\"\n",
        d.display()
    );
    let cfg = d.join("agent.toml");
    std::fs::write(&cfg, format!("{head}{ka}{kb}")).unwrap();
    let log = d.join("agent.log");
    let lf = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rewind"))
        .args(["agent", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(lf.try_clone().unwrap())
        .stderr(lf)
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait("agent running", &log, || {
        log_text().contains("agent running")
    });
    assert!(configured("/dev/nbd4") && configured("/dev/nbd5"));
    dd_write("/dev/nbd4", 0x41, 1);
    dd_write("/dev/nbd5", 0x42, 2);

    let o = Command::new(env!("CARGO_BIN_EXE_rewind"))
        .args([
            "bookmark",
            "create",
            "kernel-point",
            "--group",
            "g",
            "--json",
        ])
        .arg("--admin-socket")
        .arg(d.join("admin.sock"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(b["volumes"].as_array().unwrap().len(), 2, "{b}");
    for v in ["ka", "kb"] {
        let r = drvutil(d, v);
        let recs = r["records"].as_array().unwrap();
        let tag = recs
            .iter()
            .position(|x| x["kind"] == "tag")
            .unwrap_or_else(|| panic!("{v}: no tag: {r}"));
        assert!(
            recs[..tag].iter().any(|x| x["kind"] == "data"),
            "{v}: the device write is not before the tag: {r}"
        );
    }

    // Reload without ka: its device is detached, kb keeps serving.
    std::fs::write(&cfg, format!("{head}{kb}")).unwrap();
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    wait("nbd4 detached", &log, || !configured("/dev/nbd4"));
    dd_write("/dev/nbd5", 0x43, 3);
    assert!(configured("/dev/nbd5"));

    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let st = child.wait().unwrap();
    assert!(st.success(), "agent exited with {st}\n{}", log_text());
    assert!(!configured("/dev/nbd5"), "nbd5 still attached after stop");
    for v in ["ka", "kb"] {
        assert_eq!(
            drvutil(d, v)["stats"]["producer_state"],
            "clean-shutdown",
            "{v}"
        );
    }
}
