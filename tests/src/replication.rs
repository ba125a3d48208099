//! Helpers of the replication tests (`tests/tests/replication*.rs`): a PKI
//! made with `rewind pki`, the `rewind target` and `rewind replicator`
//! daemons (killed on drop), status polling through `rewind status --json`,
//! and blake3 of files.
//!
//! Every daemon gets its own state directory in the test's [`Scratch`]; the
//! target binds port 0 and publishes the bound address in its status file,
//! so tests are parallel-safe.

use crate::{rewind_bin, run, run_ok, text, Scratch};
use serde_json::Value;
use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static N: AtomicU64 = AtomicU64::new(0);

fn next() -> u64 {
    N.fetch_add(1, Ordering::Relaxed)
}

/// A CA and certificates made by `rewind pki` in `<scratch>/<name>`:
/// a server certificate for `127.0.0.1` and a client certificate `replicator`.
pub struct Pki {
    /// The PKI directory.
    pub dir: PathBuf,
}

impl Pki {
    /// `rewind pki init` + the two standard certificates.
    pub fn new(scratch: &Scratch, name: &str) -> Pki {
        let dir = scratch.join(name);
        run_ok(
            Command::new(rewind_bin("rewind"))
                .args(["pki", "init", "--dir"])
                .arg(&dir),
            Duration::from_secs(30),
        );
        let p = Pki { dir };
        p.issue("127.0.0.1", "server");
        p.issue("replicator", "client");
        p
    }

    /// `rewind pki issue --host HOST --kind KIND --force`.
    pub fn issue(&self, host: &str, kind: &str) {
        run_ok(
            Command::new(rewind_bin("rewind"))
                .args(["pki", "issue", "--dir"])
                .arg(&self.dir)
                .args(["--host", host, "--kind", kind, "--force"]),
            Duration::from_secs(30),
        );
    }
}

/// A spawned daemon with its log file; SIGKILLed on drop if still running.
pub struct Daemon {
    child: Option<Child>,
    /// Combined stdout/stderr.
    pub log: PathBuf,
    what: String,
}

impl Daemon {
    /// Spawns `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(mut cmd: Command, log: PathBuf) -> Daemon {
        let f = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone().expect("dup"))
            .stderr(f)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        let what = format!("{cmd:?}");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {what}: {e}"));
        Daemon {
            child: Some(child),
            log,
            what,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The log so far (last 20 kB).
    pub fn log_text(&self) -> String {
        let t = fs::read_to_string(&self.log).unwrap_or_default();
        let max = 20_000;
        let t = if t.len() > max {
            let mut cut = t.len() - max;
            while !t.is_char_boundary(cut) {
                cut += 1;
            }
            t[cut..].to_string()
        } else {
            t
        };
        format!("[log of {}]\n{t}", self.what)
    }

    /// Panics (with the log) if the process exited.
    pub fn assert_alive(&mut self) {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(st)) = c.try_wait() {
                panic!("daemon exited: {st}\n{}", self.log_text());
            }
        }
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&mut self, sig: &str, grace: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        if let Ok(Some(st)) = c.try_wait() {
            return Some(st);
        }
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &c.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM: the daemon must exit 0 within 15 s.
    pub fn stop(&mut self) {
        match self.signal("TERM", Duration::from_secs(15)) {
            Some(st) if st.success() => {}
            Some(st) => panic!("exited with {st} after SIGTERM\n{}", self.log_text()),
            None => panic!("did not stop within 15 s of SIGTERM\n{}", self.log_text()),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `<state_dir>/status.json` every 20 ms until `ready` returns a value
/// for it, and returns that value; panics with the daemon's log when the
/// daemon exits first or after `timeout` (`what` names it in the message).
pub fn wait_status<T>(
    daemon: &mut Daemon,
    state_dir: &Path,
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut(&Value) -> Option<T>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        daemon.assert_alive();
        if let Some(t) = read_status_file(state_dir).as_ref().and_then(&mut ready) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not ready after {timeout:?}\n{}",
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The address a listening daemon (target, failback) publishes as `listen`
/// in `<state_dir>/status.json`, waited for up to 20 s (see [`wait_status`]).
pub fn wait_listen(daemon: &mut Daemon, state_dir: &Path, what: &str) -> SocketAddr {
    wait_status(daemon, state_dir, what, Duration::from_secs(20), |v| {
        v["listen"].as_str().and_then(|a| a.parse().ok())
    })
}

/// How a daemon authenticates.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Mutual TLS with certificates from this PKI directory.
    Tls(PathBuf),
    /// `--insecure` (loopback plaintext).
    Insecure,
}

/// Options of [`Target::start`].
#[derive(Clone, Debug)]
pub struct TargetOpts {
    /// Authentication.
    pub auth: Auth,
    /// Certificate host name of the target in the PKI.
    pub host: String,
    /// Allowed client identities.
    pub allow: Vec<String>,
    /// Port to bind (None: a free one).
    pub port: Option<u16>,
    /// `--spool-budget`.
    pub spool_budget: Option<String>,
    /// More arguments for `rewind target`.
    pub extra_args: Vec<String>,
}

impl TargetOpts {
    /// Mutual TLS with `pki`, allowing the client `replicator`.
    pub fn tls(pki: &Pki) -> TargetOpts {
        TargetOpts {
            auth: Auth::Tls(pki.dir.clone()),
            host: "127.0.0.1".into(),
            allow: vec!["replicator".into()],
            port: None,
            spool_budget: None,
            extra_args: Vec::new(),
        }
    }

    /// `--insecure` (loopback plaintext), no spool budget.
    pub fn insecure() -> TargetOpts {
        TargetOpts {
            auth: Auth::Insecure,
            host: String::new(),
            allow: vec![],
            port: None,
            spool_budget: None,
            extra_args: Vec::new(),
        }
    }
}

/// A running `rewind target --dir DIR`.
pub struct Target {
    /// The process.
    pub daemon: Daemon,
    /// The bound address.
    pub addr: SocketAddr,
    /// `--dir`: `DIR/<volume>/replica.img` and `DIR/<volume>/journal`.
    pub dir: PathBuf,
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// The options it was started with.
    pub opts: TargetOpts,
}

/// Reads `<dir>/status.json` if it parses.
pub fn read_status_file(dir: &Path) -> Option<Value> {
    let b = fs::read(dir.join("status.json")).ok()?;
    serde_json::from_slice(&b).ok()
}

impl Target {
    /// Starts a target with a fresh directory in `scratch`.
    pub fn start(scratch: &Scratch, opts: TargetOpts) -> Target {
        let n = next();
        let dir = scratch.join(&format!("target{n}"));
        let state = scratch.join(&format!("tstate{n}"));
        Self::start_in(scratch, dir, state, opts)
    }

    /// Starts a target on existing directories (restart).
    pub fn start_in(
        scratch: &Scratch,
        dir: PathBuf,
        state_dir: PathBuf,
        opts: TargetOpts,
    ) -> Target {
        let log = scratch.join(&format!("target-{}.log", next()));
        let mut c = Command::new(rewind_bin("rewind"));
        c.arg("target")
            .arg("--listen")
            .arg(format!("tcp:127.0.0.1:{}", opts.port.unwrap_or(0)))
            .arg("--dir")
            .arg(&dir)
            .arg("--state-dir")
            .arg(&state_dir);
        match &opts.auth {
            Auth::Tls(p) => {
                c.arg("--tls-dir").arg(p).arg("--host").arg(&opts.host);
                for a in &opts.allow {
                    c.arg("--allow").arg(a);
                }
            }
            Auth::Insecure => {
                c.arg("--insecure");
            }
        }
        if let Some(b) = &opts.spool_budget {
            c.arg("--spool-budget").arg(b);
        }
        c.args(&opts.extra_args);
        let _ = fs::remove_file(state_dir.join("status.json"));
        let mut daemon = Daemon::spawn(c, log);
        let pid = u64::from(daemon.pid());
        let addr = wait_status(
            &mut daemon,
            &state_dir,
            "target",
            Duration::from_secs(20),
            |v| {
                if v["pid"].as_u64() != Some(pid) {
                    return None;
                }
                v["listen"].as_str().and_then(|a| a.parse().ok())
            },
        );
        Target {
            daemon,
            addr,
            dir,
            state_dir,
            opts,
        }
    }

    /// Kill -9 and start again on the same port and directories.
    pub fn restart_after_kill9(mut self, scratch: &Scratch) -> Target {
        self.daemon.kill9();
        let mut opts = self.opts.clone();
        opts.port = Some(self.addr.port());
        Self::start_in(scratch, self.dir.clone(), self.state_dir.clone(), opts)
    }

    /// The replica file of `volume`.
    pub fn replica(&self, volume: &str) -> PathBuf {
        self.dir.join(volume).join("replica.img")
    }

    /// The target's status file.
    pub fn status(&self) -> Value {
        read_status_file(&self.state_dir).unwrap_or(Value::Null)
    }

    /// The status of `volume` in the target's status file.
    pub fn volume_status(&self, volume: &str) -> Value {
        let s = self.status();
        s["volumes"]
            .as_array()
            .and_then(|v| v.iter().find(|x| x["name"] == volume).cloned())
            .unwrap_or(Value::Null)
    }
}

/// Options of [`Replicator::start`].
#[derive(Clone, Debug)]
pub struct ReplicatorOpts {
    /// Authentication.
    pub auth: Auth,
    /// Client certificate name in the PKI.
    pub host: String,
    /// Expected target certificate name.
    pub server_name: String,
    /// Volume name.
    pub volume: String,
    /// The source volume (the export's backing file).
    pub device: PathBuf,
    /// The export's change-log directory.
    pub shm_dir: PathBuf,
    /// `--compression`.
    pub compression: String,
    /// `--bandwidth`.
    pub bandwidth: Option<String>,
    /// `--max-chunk` (bytes).
    pub max_chunk: Option<u64>,
    /// `--hash-block` (bytes).
    pub hash_block: Option<u64>,
}

impl ReplicatorOpts {
    /// Mutual TLS with `pki` as the client `replicator` towards the target
    /// certificate `127.0.0.1` (the certificates [`Pki::new`] issues),
    /// replicating `device` with its change log in `shm_dir` as `volume`;
    /// no bandwidth limit, default chunk and hash-block sizes. Adjust the
    /// rest with `ReplicatorOpts { hash_block: Some(..), ..ReplicatorOpts::tls(..) }`.
    pub fn tls(
        pki: &Pki,
        volume: &str,
        device: &Path,
        shm_dir: &Path,
        compression: &str,
    ) -> ReplicatorOpts {
        ReplicatorOpts {
            auth: Auth::Tls(pki.dir.clone()),
            host: "replicator".into(),
            ..Self::insecure(volume, device, shm_dir, compression)
        }
    }

    /// Like [`ReplicatorOpts::tls`] but `--insecure` (loopback plaintext).
    pub fn insecure(
        volume: &str,
        device: &Path,
        shm_dir: &Path,
        compression: &str,
    ) -> ReplicatorOpts {
        ReplicatorOpts {
            auth: Auth::Insecure,
            host: String::new(),
            server_name: "127.0.0.1".into(),
            volume: volume.into(),
            device: device.to_path_buf(),
            shm_dir: shm_dir.to_path_buf(),
            compression: compression.into(),
            bandwidth: None,
            max_chunk: None,
            hash_block: None,
        }
    }
}

/// A running `rewind replicator` with one pair.
pub struct Replicator {
    /// The process.
    pub daemon: Daemon,
    /// `--state-dir`.
    pub state_dir: PathBuf,
    /// Target address it ships to.
    pub target: SocketAddr,
    /// Options.
    pub opts: ReplicatorOpts,
}

impl Replicator {
    /// Starts a replicator with a fresh state directory.
    pub fn start(scratch: &Scratch, target: SocketAddr, opts: ReplicatorOpts) -> Replicator {
        let state = scratch.join(&format!("rstate{}", next()));
        Self::start_in(scratch, target, state, opts)
    }

    /// Starts a replicator on an existing state directory (restart).
    pub fn start_in(
        scratch: &Scratch,
        target: SocketAddr,
        state_dir: PathBuf,
        opts: ReplicatorOpts,
    ) -> Replicator {
        let log = scratch.join(&format!("replicator-{}.log", next()));
        let mut c = Command::new(rewind_bin("rewind"));
        c.arg("replicator")
            .arg("--target")
            .arg(format!("tcp:{target}"))
            .arg("--server-name")
            .arg(&opts.server_name)
            .arg("--volume")
            .arg(&opts.volume)
            .arg("--device")
            .arg(&opts.device)
            .arg("--shm-dir")
            .arg(&opts.shm_dir)
            .arg("--state-dir")
            .arg(&state_dir)
            .arg("--compression")
            .arg(&opts.compression);
        match &opts.auth {
            Auth::Tls(p) => {
                c.arg("--tls-dir").arg(p).arg("--host").arg(&opts.host);
            }
            Auth::Insecure => {
                c.arg("--insecure");
            }
        }
        if let Some(b) = &opts.bandwidth {
            c.arg("--bandwidth").arg(b);
        }
        if let Some(m) = opts.max_chunk {
            c.arg("--max-chunk").arg(m.to_string());
        }
        if let Some(h) = opts.hash_block {
            c.arg("--hash-block").arg(h.to_string());
        }
        let _ = fs::remove_file(state_dir.join("status.json"));
        let mut daemon = Daemon::spawn(c, log);
        let pid = u64::from(daemon.pid());
        wait_status(
            &mut daemon,
            &state_dir,
            "replicator",
            Duration::from_secs(20),
            |v| (v["pid"].as_u64() == Some(pid)).then_some(()),
        );
        Replicator {
            daemon,
            state_dir,
            target,
            opts,
        }
    }

    /// Kill -9 and start again on the same state.
    pub fn restart_after_kill9(mut self, scratch: &Scratch) -> Replicator {
        self.daemon.kill9();
        Self::start_in(
            scratch,
            self.target,
            self.state_dir.clone(),
            self.opts.clone(),
        )
    }

    /// `rewind status --json` (with the target's state when given).
    pub fn status_json(&self, target: Option<&Target>) -> Value {
        status_json(&self.state_dir, target.map(|t| t.state_dir.as_path()))
    }

    /// The pair report (`source.pairs[0]`) from the status file (cheap).
    pub fn pair(&self) -> Value {
        read_status_file(&self.state_dir).map_or(Value::Null, |v| v["pairs"][0].clone())
    }
}

/// `rewind status --json --state-dir STATE_DIR [--target-state-dir
/// TARGET_STATE_DIR]`, parsed; panics with the output unless it succeeds
/// within 30 s and prints JSON.
pub fn status_json(state_dir: &Path, target_state_dir: Option<&Path>) -> Value {
    let mut c = Command::new(rewind_bin("rewind"));
    c.arg("status")
        .arg("--json")
        .arg("--state-dir")
        .arg(state_dir);
    if let Some(t) = target_state_dir {
        c.arg("--target-state-dir").arg(t);
    }
    let o = run(&mut c, Duration::from_secs(30));
    assert!(o.status.success(), "rewind status failed\n{}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("status JSON: {e}\n{}", text(&o)))
}

/// Whether a `rewind status --json` document shows the pair fully drained
/// and applied at the target: DifferentialSync, RPO 0, nothing pending on
/// the source, in flight or spooled, applied = durable at the target.
pub fn fully_drained(doc: &Value) -> bool {
    let p = &doc["source"]["pairs"][0];
    let s = &p["status"];
    let src_ok = s["state"] == "DifferentialSync"
        && s["connected"] == true
        && s["drained"] == true
        && s["rpo_ns"] == 0
        && s["pending_source_bytes"] == 0
        && s["in_flight_frames"] == 0;
    let t = &doc["target"]["volumes"];
    let vol = t
        .as_array()
        .and_then(|v| v.iter().find(|x| x["name"] == s["volume"]));
    let tgt_ok = vol.is_some_and(|v| {
        let ts = &v["status"];
        ts["spool_bytes"] == 0
            && ts["applied_seq"] == ts["durable_seq"]
            && v["journal"]["pending_chunks"] == 0
    });
    src_ok && tgt_ok
}

/// Polls `rewind status --json` until [`fully_drained`] (twice in a row),
/// panicking with both logs after `timeout`. Returns the last document.
pub fn wait_drained(r: &Replicator, t: &Target, timeout: Duration) -> Value {
    wait_drained_dir(&r.state_dir, Some(&r.daemon), t, timeout)
}

/// Like [`wait_drained`] for a replicator known by its state directory
/// (`replicator`, when given, adds its log to the panic message).
pub fn wait_drained_dir(
    state_dir: &Path,
    replicator: Option<&Daemon>,
    t: &Target,
    timeout: Duration,
) -> Value {
    let deadline = Instant::now() + timeout;
    let mut hits = 0;
    loop {
        let doc = status_json(state_dir, Some(&t.state_dir));
        if fully_drained(&doc) {
            hits += 1;
            if hits >= 2 {
                return doc;
            }
        } else {
            hits = 0;
        }
        if Instant::now() > deadline {
            panic!(
                "not drained after {timeout:?}:\n{}\n{}\n{}",
                serde_json::to_string_pretty(&doc).unwrap_or_default(),
                replicator.map(Daemon::log_text).unwrap_or_default(),
                t.daemon.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// blake3 of a whole file, hex.
pub fn blake3_file(path: &Path) -> String {
    let mut h = blake3::Hasher::new();
    let mut f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::io::copy(&mut f, &mut h).expect("read for blake3");
    h.finalize().to_hex().to_string()
}

/// Asserts two files have the same blake3, with the differing ranges on failure.
pub fn assert_same(source: &Path, replica: &Path, what: &str) {
    let (a, b) = (blake3_file(source), blake3_file(replica));
    if a != b {
        let d = crate::diff_files(source, replica);
        panic!(
            "{what}: replica differs from the source (blake3 {a} vs {b}); differing ranges: {}",
            d.describe(10)
        );
    }
}

/// Export + target + replicator on one volume, with mutual TLS from a fresh
/// PKI: the common start of the replication tests.
pub struct Setup {
    /// The PKI.
    pub pki: Pki,
    /// The backing file of the export (the source volume).
    pub backing: PathBuf,
    /// The export.
    pub export: crate::Export,
    /// The target.
    pub target: Target,
    /// The replicator.
    pub repl: Replicator,
}

impl Setup {
    /// Starts everything on `backing` (already created) with `compression`.
    pub fn start(s: &Scratch, backing: &Path, compression: &str) -> Setup {
        Self::start_with(s, backing, compression, |_| {}, |_| {})
    }

    /// Like [`Setup::start`], letting the caller adjust the daemons' options.
    pub fn start_with(
        s: &Scratch,
        backing: &Path,
        compression: &str,
        tweak_target: impl FnOnce(&mut TargetOpts),
        tweak_repl: impl FnOnce(&mut ReplicatorOpts),
    ) -> Setup {
        Self::start_full(s, backing, compression, |_| {}, tweak_target, tweak_repl)
    }

    /// Like [`Setup::start_with`], also adjusting the export's options.
    pub fn start_full(
        s: &Scratch,
        backing: &Path,
        compression: &str,
        tweak_export: impl FnOnce(&mut crate::ExportOpts),
        tweak_target: impl FnOnce(&mut TargetOpts),
        tweak_repl: impl FnOnce(&mut ReplicatorOpts),
    ) -> Setup {
        let pki = Pki::new(s, "pki");
        let mut eopts = crate::ExportOpts::for_volume("vol0");
        tweak_export(&mut eopts);
        let export = crate::Export::start(s, backing, eopts);
        let mut topts = TargetOpts::tls(&pki);
        tweak_target(&mut topts);
        let target = Target::start(s, topts);
        let mut ropts = ReplicatorOpts::tls(&pki, "vol0", backing, &export.shm_dir, compression);
        tweak_repl(&mut ropts);
        let repl = Replicator::start(s, target.addr, ropts);
        Setup {
            pki,
            backing: backing.to_path_buf(),
            export,
            target,
            repl,
        }
    }

    /// Waits for full drain and asserts replica == source (blake3).
    pub fn converge(&self, timeout: Duration, what: &str) -> Value {
        let doc = wait_drained(&self.repl, &self.target, timeout);
        assert_same(&self.backing, &self.target.replica("vol0"), what);
        doc
    }
}

/// What the model knows of a 4 KiB block: the pattern byte of the last
/// acknowledged write, or unknown (a write whose outcome was not seen).
pub type Model = std::collections::HashMap<u64, Option<u8>>;

/// A background NBD writer (qemu-io batches of pattern writes) that records
/// every acknowledged write in a [`Model`], for "no acknowledged write
/// missing" checks. Failed batches (export killed) make the blocks of their
/// unacknowledged writes unknown.
pub struct Writer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pause: std::sync::Arc<std::sync::atomic::AtomicBool>,
    idle: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// The URI written to (changed when the export restarts).
    pub uri: std::sync::Arc<std::sync::Mutex<String>>,
    /// The model.
    pub model: std::sync::Arc<std::sync::Mutex<Model>>,
    /// Acknowledged writes.
    pub acked: std::sync::Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    /// Starts writing to `uri` over `size` bytes (seeded), paused.
    pub fn start(uri: String, size: u64, seed: u64) -> Writer {
        use std::sync::atomic::AtomicBool;
        use std::sync::{Arc, Mutex};
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(true));
        let idle = Arc::new(AtomicBool::new(true));
        let uri = Arc::new(Mutex::new(uri));
        let model = Arc::new(Mutex::new(Model::new()));
        let acked = Arc::new(AtomicU64::new(0));
        let (st, pa, id, ur, mo, ac) = (
            stop.clone(),
            pause.clone(),
            idle.clone(),
            uri.clone(),
            model.clone(),
            acked.clone(),
        );
        let handle = std::thread::spawn(move || {
            let mut rng = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let blocks = size / 4096;
            while !st.load(Ordering::SeqCst) {
                if pa.load(Ordering::SeqCst) {
                    id.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                id.store(false, Ordering::SeqCst);
                if pa.load(Ordering::SeqCst) {
                    continue;
                }
                // 12 writes of 4..64 KiB at distinct offsets, distinct patterns.
                let mut cmds: Vec<(u64, u64, u8)> = Vec::new();
                while cmds.len() < 12 {
                    let nblk = 1 + next() % 16;
                    let b = next() % (blocks - nblk);
                    if cmds.iter().any(|c| c.0 == b * 4096) {
                        continue;
                    }
                    let pat = (1 + next() % 255) as u8;
                    cmds.push((b * 4096, nblk * 4096, pat));
                }
                let u = ur.lock().unwrap().clone();
                let mut c = Command::new("qemu-io");
                c.args(["-f", "raw", &u]);
                for (o, l, p) in &cmds {
                    c.arg("-c").arg(format!("write -P 0x{p:02x} {o} {l}"));
                }
                let out = c
                    .stdin(Stdio::null())
                    .stderr(Stdio::piped())
                    .stdout(Stdio::piped())
                    .output();
                let (stdout, stderr) = out
                    .map(|o| {
                        (
                            String::from_utf8_lossy(&o.stdout).into_owned(),
                            String::from_utf8_lossy(&o.stderr).into_owned(),
                        )
                    })
                    .unwrap_or_default();
                if !stdout.contains("wrote ") && stderr.contains("can't open device") {
                    // Never connected (export down): nothing was sent.
                    std::thread::sleep(Duration::from_millis(30));
                    continue;
                }
                let wrote: Vec<(u64, u64)> = stdout
                    .lines()
                    .filter_map(|l| {
                        let r = l.strip_prefix("wrote ")?;
                        let (n, rest) = r.split_once('/')?;
                        let off = rest.rsplit(' ').next()?;
                        Some((n.parse().ok()?, off.parse().ok()?))
                    })
                    .collect();
                let mut m = mo.lock().unwrap();
                let mut k = 0;
                for (o, l, p) in &cmds {
                    let ok = wrote.get(k) == Some(&(*l, *o));
                    if ok {
                        k += 1;
                        ac.fetch_add(1, Ordering::Relaxed);
                    }
                    for b in o / 4096..(o + l) / 4096 {
                        m.insert(b, ok.then_some(*p));
                    }
                }
                drop(m);
                if wrote.len() < cmds.len() {
                    std::thread::sleep(Duration::from_millis(30));
                }
            }
            id.store(true, Ordering::SeqCst);
        });
        Writer {
            stop,
            pause,
            idle,
            uri,
            model,
            acked,
            handle: Some(handle),
        }
    }

    /// Lets the writer run.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::SeqCst);
    }

    /// Pauses and waits until no batch is running.
    pub fn pause(&self) {
        self.pause.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.idle.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "writer did not pause");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Points the writer at a new URI.
    pub fn set_uri(&self, uri: String) {
        *self.uri.lock().unwrap() = uri;
    }

    /// Asserts every block whose last acknowledged write is known holds
    /// that write's pattern in `file`. Returns the number of blocks checked.
    pub fn check(&self, file: &Path) -> usize {
        let data = fs::read(file).expect("read replica");
        let m = self.model.lock().unwrap();
        let mut n = 0;
        for (b, p) in m.iter() {
            if let Some(p) = p {
                let blk = &data[(*b * 4096) as usize..(*b * 4096 + 4096) as usize];
                if let Some(i) = blk.iter().position(|x| x != p) {
                    panic!(
                        "{}: acknowledged write missing: block {b} (offset {}) byte {i} is 0x{:02x}, expected 0x{p:02x}",
                        file.display(),
                        b * 4096,
                        blk[i]
                    );
                }
                n += 1;
            }
        }
        n
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
