//! Helpers of the recovery tests (`tests/tests/recovery*.rs`): virtual
//! snapshots served by `rewind snapshot create` (stopped with SIGTERM on
//! drop), whole-image reads through third-party NBD clients, and the
//! recovery commands' JSON output.

use crate::replication::{blake3_file, Daemon};
use crate::{rewind_bin, run, text, tool, Export, Scratch};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

static N: AtomicU64 = AtomicU64::new(0);

/// Now, ns since the epoch.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// ns since the epoch as the unix-seconds form `--at` accepts (`S.NNNNNNNNN`).
pub fn at_arg(ns: u64) -> String {
    format!("{}.{:09}", ns / 1_000_000_000, ns % 1_000_000_000)
}

/// A running `rewind snapshot create`.
pub struct Snapshot {
    child: Option<Child>,
    /// The NBD URI it printed.
    pub uri: String,
    /// Its log (stderr).
    pub log: PathBuf,
}

impl Snapshot {
    /// `rewind snapshot create --volume VOLUME POINT... --listen unix:<scratch>/snapN.sock`
    /// with the extra arguments `args` (e.g. `["--at", "..."]`, `["--rw"]`,
    /// `["--state-dir", ...]`); waits (up to 30 s) for the URI it prints.
    pub fn start(s: &Scratch, volume: &str, args: &[&str]) -> Snapshot {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let sock = s.join(&format!("snap{n}.sock"));
        let log = s.join(&format!("snapshot{n}.log"));
        let f = std::fs::File::create(&log).expect("log");
        let mut c = Command::new(rewind_bin("rewind"));
        c.args(["snapshot", "create", "--volume", volume, "--listen"])
            .arg(format!("unix:{}", sock.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(f);
        let what = format!("{c:?}");
        let mut child = c.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut l = String::new();
            let _ = BufReader::new(out).read_line(&mut l);
            let _ = tx.send(l);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        let uri = line.trim().to_string();
        if !uri.starts_with("nbd") {
            let _ = child.kill();
            let st = child.wait();
            panic!(
                "{what}: no URI printed ({st:?}): {line:?}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Snapshot {
            child: Some(child),
            uri,
            log,
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM; asserts a clean exit (status 0) within 15 s.
    pub fn stop(mut self) {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                assert!(
                    st.success(),
                    "snapshot exited with {st}\n{}",
                    self.log_text()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("snapshot did not stop on SIGTERM\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Snapshot {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Copies a whole NBD export into `out` with `qemu-img convert`.
pub fn qemu_img_copy(uri: &str, out: &Path) {
    let o = run(
        tool("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", uri])
            .arg(out),
        Duration::from_secs(120),
    );
    assert!(o.status.success(), "qemu-img convert {uri}: {}", text(&o));
}

/// Copies a whole NBD export into `out` with `nbdcopy`.
pub fn nbdcopy(uri: &str, out: &Path) {
    let _ = std::fs::remove_file(out);
    let o = run(tool("nbdcopy").arg(uri).arg(out), Duration::from_secs(120));
    assert!(o.status.success(), "nbdcopy {uri}: {}", text(&o));
}

/// blake3 (hex) of a whole NBD export, read with `nbdcopy` into a scratch file.
pub fn export_blake3(s: &Scratch, uri: &str) -> String {
    let f = s.join(&format!("img{}.raw", N.fetch_add(1, Ordering::Relaxed)));
    nbdcopy(uri, &f);
    let h = blake3_file(&f);
    let _ = std::fs::remove_file(&f);
    h
}

/// Runs `rewind ARGS...`, returning the output (no assertion on the status).
pub fn rewind(args: &[&str]) -> std::process::Output {
    run(
        Command::new(rewind_bin("rewind")).args(args),
        Duration::from_secs(120),
    )
}

/// `rewind bookmark create NAME --volume VOLUME [--type KIND] --shm-dir DIR`
/// on `export`'s volume (through its admin socket); panics with the output
/// unless the bookmark was created.
pub fn create_bookmark(export: &Export, name: &str, kind: Option<&str>) {
    let shm = export.shm_dir.to_str().expect("shm dir is UTF-8");
    let mut args = vec!["bookmark", "create", name, "--volume", &export.volume];
    if let Some(kind) = kind {
        args.extend(["--type", kind]);
    }
    args.extend(["--shm-dir", shm]);
    let o = rewind(&args);
    assert!(o.status.success(), "bookmark {name}: {}", text(&o));
}

/// Runs `rewind ARGS... --json` and parses its stdout; panics on failure.
pub fn rewind_json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let o = rewind(&a);
    assert!(o.status.success(), "rewind {a:?} failed: {}", text(&o));
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("rewind {a:?}: JSON: {e}\n{}", text(&o)))
}

/// Writes `count` random-offset pattern writes of 4..64 KiB to `uri` with
/// qemu-io (one process), seeded; returns when all are acknowledged.
pub fn random_writes(uri: &str, size: u64, count: usize, seed: u64) {
    let mut rng = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let blocks = size / 4096;
    let mut c = tool("qemu-io");
    c.args(["-f", "raw", uri]);
    for _ in 0..count {
        let n = 1 + next() % 16;
        let b = next() % (blocks - n);
        let p = 1 + next() % 255;
        c.arg("-c")
            .arg(format!("write -P 0x{p:02x} {} {}", b * 4096, n * 4096));
    }
    let o = run(&mut c, Duration::from_secs(120));
    assert!(
        o.status.success() && !String::from_utf8_lossy(&o.stderr).contains("error"),
        "qemu-io writes to {uri}: {}",
        text(&o)
    );
}

/// Spawns `rewind ARGS...` as a daemon (log in the scratch dir).
pub fn spawn_rewind(s: &Scratch, args: &[&str]) -> Daemon {
    let mut c = Command::new(rewind_bin("rewind"));
    c.args(args);
    Daemon::spawn(
        c,
        s.join(&format!("rewind-{}.log", N.fetch_add(1, Ordering::Relaxed))),
    )
}
