//! Shared helpers for the cross-crate integration tests.
//!
//! Every test makes a [`Scratch`] directory, starts a fresh `rewind export`
//! ([`Export`]) on a backing file inside it (own socket, shm-dir and
//! state-dir, so tests are independent and parallel-safe), runs a real NBD
//! client against it, and ends with [`assert_changes_recorded`]: the
//! change-log accounting check shared by every client test.
//!
//! Environment:
//! - `REWIND_BIN_DIR`: where `rewind` and `drvutil` live (default
//!   `<workspace>/target/debug`, built by `cargo build --bins`).
//! - `REWIND_TEST_SERVER=qemu-nbd`: run the client tests against qemu-nbd
//!   instead of `rewind export` (validates the harness itself; the change-log
//!   checks cannot run then and say so on stderr).
//! - `REWIND_TEST_KEEP=1`: keep scratch directories for post-mortems.

pub mod agent;
pub mod diskfull;
pub mod faultproxy;
pub mod recovery;
pub mod replay;
pub mod replication;
pub mod scenario;

use serde_json::Value;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
/// Granularity of the accounting report (the default tracking block).
pub const BLOCK: u64 = 4096;

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------
// Locating binaries and client tools
// ---------------------------------------------------------------------------

/// The workspace root (parent of this package).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Directory holding the `rewind` and `drvutil` binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("REWIND_BIN_DIR") {
        return PathBuf::from(d);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("debug")
}

/// Path of one of our binaries; panics with instructions when it is missing.
pub fn rewind_bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    if !p.is_file() {
        panic!(
            "binary {} not found: run `cargo build --bins` first (or set REWIND_BIN_DIR)",
            p.display()
        );
    }
    p
}

/// Path of an external client tool; panics (never skips) when it is missing.
pub fn require_tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    for extra in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        dirs.push(PathBuf::from(extra));
    }
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("client tool `{name}` is missing: run scripts/setup");
}

/// A `Command` for an external client tool (checked to exist).
pub fn tool(name: &str) -> Command {
    Command::new(require_tool(name))
}

/// A time-based fio random-write load on the NBD export `uri`: block sizes
/// `bs` (`--bs=4k` or `--bsrange=A-B`), queue depth `iodepth`, over the first
/// 64 MiB, for `runtime_secs` seconds, without a random map; stdout and
/// stderr discarded (set stderr to piped to read fio's errors). The
/// background load of the crash, restart and drain tests; spawn it and end
/// it yourself.
pub fn fio_write_load(uri: &str, bs: &str, iodepth: u32, runtime_secs: u32) -> Command {
    let mut c = tool("fio");
    c.args(["--name=load", "--ioengine=nbd", &format!("--uri={uri}")])
        .args([
            "--rw=randwrite",
            bs,
            &format!("--iodepth={iodepth}"),
            "--size=64m",
        ])
        .args([
            "--time_based",
            &format!("--runtime={runtime_secs}"),
            "--norandommap",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Which NBD server the client tests talk to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    Rewind,
    QemuNbd,
}

pub fn server_kind() -> ServerKind {
    match std::env::var("REWIND_TEST_SERVER").as_deref() {
        Ok("qemu-nbd") => ServerKind::QemuNbd,
        Ok("rewind") | Err(_) => ServerKind::Rewind,
        Ok(other) => panic!("REWIND_TEST_SERVER={other}: expected `rewind` or `qemu-nbd`"),
    }
}

// ---------------------------------------------------------------------------
// Running commands with a time limit
// ---------------------------------------------------------------------------

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// stdout + stderr of a finished command, as text.
pub fn text(o: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `cmd` to completion (stdin closed), killing it after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let what = describe(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{what}`: {e}"));
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let o = Output {
                status: ExitStatus::default(),
                stdout: t_out.join().unwrap_or_default(),
                stderr: t_err.join().unwrap_or_default(),
            };
            panic!("`{what}` did not finish within {timeout:?}\n{}", text(&o));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Calls `f` every `every` until it returns true; panics ("timed out waiting
/// for `what`") when `timeout` has passed first.
pub fn poll_until(what: &str, timeout: Duration, every: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(every);
    }
}

/// Like [`run`], and panics with the full output unless the exit status is 0.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let what = describe(cmd);
    let o = run(cmd, timeout);
    assert!(
        o.status.success(),
        "`{what}` failed: {}\n{}",
        o.status,
        text(&o)
    );
    o
}

/// Like [`run`], and panics unless the command FAILED.
pub fn run_fails(cmd: &mut Command, timeout: Duration) -> Output {
    let what = describe(cmd);
    let o = run(cmd, timeout);
    assert!(
        !o.status.success(),
        "`{what}` unexpectedly succeeded\n{}",
        text(&o)
    );
    o
}

/// The python interpreter that has the libnbd binding (`import nbd`).
pub fn python_nbd() -> Command {
    let py = PathBuf::from("/usr/bin/python3");
    if !py.is_file() {
        panic!("/usr/bin/python3 is missing: run scripts/setup");
    }
    let o = run(
        Command::new(&py).args(["-c", "import nbd"]),
        Duration::from_secs(30),
    );
    if !o.status.success() {
        panic!(
            "python3 libnbd binding (`import nbd`) is missing: run scripts/setup\n{}",
            text(&o)
        );
    }
    Command::new(py)
}

/// Runs a python libnbd script (`sys.argv[1:]` = `args`); panics on failure.
pub fn run_python(script: &str, args: &[&str], timeout: Duration) -> Output {
    let mut cmd = python_nbd();
    cmd.arg("-c").arg(script).args(args);
    run_ok(&mut cmd, timeout)
}

// ---------------------------------------------------------------------------
// Scratch directories and backing files
// ---------------------------------------------------------------------------

/// A per-test temporary directory under /tmp (short path: unix sockets live
/// in it), removed on drop unless `REWIND_TEST_KEEP` is set.
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let path = PathBuf::from(format!(
            "/tmp/rwt-{}-{}-{tag}",
            std::process::id(),
            unique()
        ));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create scratch dir");
        Scratch { path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("REWIND_TEST_KEEP").is_some() {
            eprintln!("keeping scratch dir {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), seeded.
pub fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Creates a sparse file of `size` bytes (all holes).
pub fn create_sparse(path: &Path, size: u64) {
    let f = File::create(path).expect("create backing file");
    f.set_len(size).expect("set_len");
}

/// Creates a fully allocated file of `size` bytes of seeded random data.
pub fn create_random(path: &Path, size: u64, seed: u64) {
    let mut f = File::create(path).expect("create backing file");
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(MIB) as usize;
        fill_random(
            &mut buf[..n],
            seed ^ (off / MIB).wrapping_mul(0x100_0000_01B3),
        );
        f.write_all(&buf[..n]).expect("write backing file");
        off += n as u64;
    }
    f.sync_all().expect("fsync backing file");
}

/// Writes `data` into `path` at `offset` (used to prepare backing files).
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).expect("open");
    f.write_all_at(data, offset).expect("pwrite");
}

/// Reads `len` bytes of `path` at `offset`.
pub fn read_at(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let f = File::open(path).expect("open");
    let mut v = vec![0u8; len as usize];
    f.read_exact_at(&mut v, offset).expect("pread");
    v
}

/// True when the two files have identical size and content.
pub fn files_equal(a: &Path, b: &Path) -> bool {
    let la = fs::metadata(a).expect("stat").len();
    let lb = fs::metadata(b).expect("stat").len();
    la == lb && diff_files(a, b).is_empty()
}

// ---------------------------------------------------------------------------
// Byte range sets
// ---------------------------------------------------------------------------

/// A set of byte ranges, kept as sorted, disjoint, non-adjacent `[start, end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    v: Vec<(u64, u64)>,
}

impl RangeSet {
    pub fn new() -> RangeSet {
        RangeSet::default()
    }

    /// From `(offset, len)` extents.
    pub fn from_extents<I: IntoIterator<Item = (u64, u64)>>(it: I) -> RangeSet {
        let mut s = RangeSet {
            v: it
                .into_iter()
                .filter(|&(_, l)| l > 0)
                .map(|(o, l)| (o, o + l))
                .collect(),
        };
        s.normalize();
        s
    }

    fn normalize(&mut self) {
        self.v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(self.v.len());
        for &(s, e) in &self.v {
            if s >= e {
                continue;
            }
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        self.v = out;
    }

    /// Adds `(offset, len)`.
    pub fn add(&mut self, offset: u64, len: u64) {
        if len > 0 {
            self.v.push((offset, offset + len));
            self.normalize();
        }
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.v
    }

    pub fn is_empty(&self) -> bool {
        self.v.is_empty()
    }

    pub fn total_len(&self) -> u64 {
        self.v.iter().map(|(s, e)| e - s).sum()
    }

    pub fn union(&self, other: &RangeSet) -> RangeSet {
        let mut s = RangeSet {
            v: self.v.iter().chain(other.v.iter()).copied().collect(),
        };
        s.normalize();
        s
    }

    /// Bytes of `self` not in `other`.
    pub fn subtract(&self, other: &RangeSet) -> RangeSet {
        let mut out = Vec::new();
        let mut j = 0;
        for &(s, e) in &self.v {
            let mut cur = s;
            while j < other.v.len() && other.v[j].1 <= cur {
                j += 1;
            }
            let mut k = j;
            while cur < e {
                if k >= other.v.len() || other.v[k].0 >= e {
                    out.push((cur, e));
                    break;
                }
                let (os, oe) = other.v[k];
                if os > cur {
                    out.push((cur, os));
                }
                cur = cur.max(oe);
                k += 1;
            }
        }
        RangeSet { v: out }
    }

    pub fn contains_set(&self, other: &RangeSet) -> bool {
        other.subtract(self).is_empty()
    }

    /// Every range widened to multiples of `bs`.
    pub fn round_out(&self, bs: u64) -> RangeSet {
        let mut s = RangeSet {
            v: self
                .v
                .iter()
                .map(|&(a, b)| (a / bs * bs, b.div_ceil(bs) * bs))
                .collect(),
        };
        s.normalize();
        s
    }

    /// Human-readable list of the first `max` ranges.
    pub fn describe(&self, max: usize) -> String {
        let mut s: Vec<String> = self
            .v
            .iter()
            .take(max)
            .map(|(a, b)| format!("[{a:#x}..{b:#x}) ({} bytes)", b - a))
            .collect();
        if self.v.len() > max {
            s.push(format!("... {} more", self.v.len() - max));
        }
        format!(
            "{} ranges, {} bytes: {}",
            self.v.len(),
            self.total_len(),
            s.join(", ")
        )
    }
}

// ---------------------------------------------------------------------------
// Before/after images
// ---------------------------------------------------------------------------

/// Byte ranges where files `a` and `b` differ (exact, byte granular). A size
/// difference counts as a difference over the tail.
pub fn diff_files(a: &Path, b: &Path) -> RangeSet {
    let mut fa = File::open(a).expect("open a");
    let mut fb = File::open(b).expect("open b");
    let la = fa.metadata().expect("stat").len();
    let lb = fb.metadata().expect("stat").len();
    let common = la.min(lb);
    let chunk = 4 * MIB as usize;
    let mut ba = vec![0u8; chunk];
    let mut bb = vec![0u8; chunk];
    let mut diffs: Vec<(u64, u64)> = Vec::new();
    let mut off = 0u64;
    while off < common {
        let n = (common - off).min(chunk as u64) as usize;
        fa.read_exact(&mut ba[..n]).expect("read a");
        fb.read_exact(&mut bb[..n]).expect("read b");
        if ba[..n] != bb[..n] {
            for (bi, (xa, xb)) in ba[..n]
                .chunks(BLOCK as usize)
                .zip(bb[..n].chunks(BLOCK as usize))
                .enumerate()
            {
                if xa == xb {
                    continue;
                }
                let base = off + (bi as u64) * BLOCK;
                let mut i = 0;
                while i < xa.len() {
                    if xa[i] == xb[i] {
                        i += 1;
                        continue;
                    }
                    let st = i;
                    while i < xa.len() && xa[i] != xb[i] {
                        i += 1;
                    }
                    let (s, e) = (base + st as u64, base + i as u64);
                    match diffs.last_mut() {
                        Some(last) if last.1 == s => last.1 = e,
                        _ => diffs.push((s, e)),
                    }
                }
            }
        }
        off += n as u64;
    }
    if la != lb {
        diffs.push((common, la.max(lb)));
    }
    let mut s = RangeSet { v: diffs };
    s.normalize();
    s
}

/// A copy of a backing file taken before a client runs (sparse where the
/// source is zero, so copies of big empty images cost nothing).
pub struct ImageCopy {
    pub path: PathBuf,
    pub len: u64,
}

impl ImageCopy {
    pub fn capture(scratch: &Scratch, src: &Path) -> ImageCopy {
        let path = scratch.join(&format!("before-{}.img", unique()));
        let mut fi = File::open(src).expect("open backing");
        let len = fi.metadata().expect("stat").len();
        let mut fo = File::create(&path).expect("create copy");
        let mut buf = vec![0u8; MIB as usize];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(MIB) as usize;
            fi.read_exact(&mut buf[..n]).expect("read backing");
            if buf[..n].iter().all(|&b| b == 0) {
                fo.seek(SeekFrom::Current(n as i64)).expect("seek");
            } else {
                fo.write_all(&buf[..n]).expect("write copy");
            }
            off += n as u64;
        }
        fo.set_len(len).expect("set_len");
        ImageCopy { path, len }
    }

    /// Whole content, for building an expected-content model.
    pub fn read_all(&self) -> Vec<u8> {
        fs::read(&self.path).expect("read copy")
    }
}

// ---------------------------------------------------------------------------
// The export under test
// ---------------------------------------------------------------------------

/// Options for [`Export::start`] (mirrors `rewind export`'s flags).
#[derive(Clone, Debug, Default)]
pub struct ExportOpts {
    pub read_only: bool,
    pub export_name: Option<String>,
    /// `--volume` (names the change log; default: the export name).
    pub volume: Option<String>,
    pub no_tracking: bool,
    pub block_size: Option<u64>,
    pub ring_size: Option<u64>,
    /// Listen on 127.0.0.1:PORT instead of a unix socket.
    pub tcp_port: Option<u16>,
    /// Reuse a change-log directory (restart tests); default: a fresh one.
    pub shm_dir: Option<PathBuf>,
    /// Reuse a state directory (restart tests); default: a fresh one.
    pub state_dir: Option<PathBuf>,
    /// `--trace-out FILE`: record every request as a fio v3 iolog.
    pub trace_out: Option<PathBuf>,
}

impl ExportOpts {
    /// Export and change-log volume both named `name` (how the replication
    /// tests serve a volume); every other option at its default, so callers
    /// can still adjust it: `ExportOpts { ring_size: Some(MIB), ..ExportOpts::for_volume("vol0") }`.
    pub fn for_volume(name: &str) -> ExportOpts {
        ExportOpts {
            volume: Some(name.into()),
            export_name: Some(name.into()),
            ..Default::default()
        }
    }

    /// Fixed change-log and state directories `<scratch>/shm` and
    /// `<scratch>/state` (created here), so that an export started again with
    /// the same options finds what the previous one left (restart and crash
    /// tests). Every other option at its default.
    pub fn restartable(scratch: &Scratch) -> ExportOpts {
        let (shm, state) = (scratch.join("shm"), scratch.join("state"));
        fs::create_dir_all(&shm).expect("mkdir shm");
        fs::create_dir_all(&state).expect("mkdir state");
        ExportOpts {
            shm_dir: Some(shm),
            state_dir: Some(state),
            ..Default::default()
        }
    }
}

/// A running NBD server on a backing file: `rewind export` (or qemu-nbd when
/// `REWIND_TEST_SERVER=qemu-nbd`). Terminated on drop.
pub struct Export {
    child: Option<Child>,
    pub kind: ServerKind,
    pub socket: PathBuf,
    pub backing: PathBuf,
    pub name: String,
    pub volume: String,
    pub shm_dir: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    pub opts: ExportOpts,
}

impl Export {
    /// Starts an export of `backing` and waits until its socket accepts.
    pub fn start(scratch: &Scratch, backing: &Path, opts: ExportOpts) -> Export {
        let kind = server_kind();
        let id = unique();
        let socket = scratch.join(&format!("e{id}.sock"));
        assert!(
            socket.as_os_str().len() < 100,
            "socket path too long: {}",
            socket.display()
        );
        let shm_dir = opts
            .shm_dir
            .clone()
            .unwrap_or_else(|| scratch.join(&format!("shm{id}")));
        let state_dir = opts
            .state_dir
            .clone()
            .unwrap_or_else(|| scratch.join(&format!("state{id}")));
        fs::create_dir_all(&shm_dir).expect("mkdir shm");
        fs::create_dir_all(&state_dir).expect("mkdir state");
        let log = scratch.join(&format!("export{id}.log"));
        let stem = backing
            .file_stem()
            .expect("backing file has a stem")
            .to_string_lossy()
            .into_owned();
        let name = opts.export_name.clone().unwrap_or(stem);
        let logf = File::create(&log).expect("create log");
        let mut cmd = match kind {
            ServerKind::Rewind => {
                let mut c = Command::new(rewind_bin("rewind"));
                c.arg("export")
                    .arg("--backing")
                    .arg(backing)
                    .arg("--listen")
                    .arg(match opts.tcp_port {
                        Some(p) => format!("tcp:127.0.0.1:{p}"),
                        None => format!("unix:{}", socket.display()),
                    })
                    .arg("--shm-dir")
                    .arg(&shm_dir)
                    .arg("--state-dir")
                    .arg(&state_dir);
                if let Some(n) = &opts.export_name {
                    c.arg("--export-name").arg(n);
                }
                if let Some(v) = &opts.volume {
                    c.arg("--volume").arg(v);
                }
                if opts.read_only {
                    c.arg("--read-only");
                }
                if opts.no_tracking {
                    c.arg("--no-tracking");
                }
                if let Some(b) = opts.block_size {
                    c.arg("--block-size").arg(b.to_string());
                }
                if let Some(r) = opts.ring_size {
                    c.arg("--ring-size").arg(r.to_string());
                }
                if let Some(t) = &opts.trace_out {
                    c.arg("--trace-out").arg(t);
                }
                c
            }
            ServerKind::QemuNbd => {
                let mut c = tool("qemu-nbd");
                c.args(["-f", "raw", "-t", "-e", "8", "-x", &name]);
                match opts.tcp_port {
                    Some(p) => c.args(["-b", "127.0.0.1", "-p", &p.to_string()]),
                    None => c.arg("-k").arg(&socket),
                };
                if opts.read_only {
                    c.arg("--read-only");
                }
                c.arg(backing);
                c
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup log"))
            .stderr(logf);
        let what = describe(&cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn `{what}`: {e}"));
        let mut ex = Export {
            child: Some(child),
            kind,
            socket,
            backing: backing.to_path_buf(),
            volume: opts.volume.clone().unwrap_or_else(|| name.clone()),
            name,
            shm_dir,
            state_dir,
            log,
            opts,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = ex
                .child
                .as_mut()
                .expect("child")
                .try_wait()
                .expect("try_wait")
            {
                ex.child = None;
                panic!(
                    "`{what}` exited before it was ready: {st}\n{}",
                    ex.log_text()
                );
            }
            let up = match ex.opts.tcp_port {
                Some(p) => std::net::TcpStream::connect(("127.0.0.1", p)).is_ok(),
                None => UnixStream::connect(&ex.socket).is_ok(),
            };
            if up {
                break;
            }
            if Instant::now() > deadline {
                panic!("`{what}` not ready after 20 s\n{}", ex.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ex
    }

    /// The admin socket of this export (`rewind export`'s default path).
    pub fn admin_socket(&self) -> PathBuf {
        self.shm_dir.join(format!("{}.admin.sock", self.volume))
    }

    /// The NBD URI of this export.
    pub fn uri(&self) -> String {
        if let Some(p) = self.opts.tcp_port {
            return format!("nbd://127.0.0.1:{p}/{}", self.name);
        }
        format!("nbd+unix:///{}?socket={}", self.name, self.socket.display())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("export running").id()
    }

    /// The server's stderr/stdout so far.
    pub fn log_text(&self) -> String {
        let t = fs::read_to_string(&self.log).unwrap_or_default();
        // keep failure messages readable
        let max = 20_000;
        if t.len() > max {
            let cut = t.len() - max;
            let cut = (cut..t.len())
                .find(|&i| t.is_char_boundary(i))
                .unwrap_or(cut);
            format!("[export log, last {max} bytes]\n{}", &t[cut..])
        } else {
            format!("[export log]\n{t}")
        }
    }

    /// Asserts the server is still running (it must survive client errors).
    pub fn assert_alive(&mut self) {
        let st = self
            .child
            .as_mut()
            .expect("export running")
            .try_wait()
            .expect("try_wait");
        assert!(st.is_none(), "export died: {st:?}\n{}", self.log_text());
    }

    /// `drvutil --shm-dir DIR --dump VOLUME --json` (None with qemu-nbd).
    pub fn dump(&self) -> Option<ChangeLog> {
        if self.kind != ServerKind::Rewind {
            return None;
        }
        let o = run_ok(
            Command::new(rewind_bin("drvutil"))
                .arg("--shm-dir")
                .arg(&self.shm_dir)
                .arg("--dump")
                .arg(&self.volume)
                .arg("--json"),
            Duration::from_secs(60),
        );
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
            panic!(
                "drvutil --dump --json printed invalid JSON: {e}\n{}",
                text(&o)
            )
        });
        Some(ChangeLog::parse(v, self.opts.block_size.unwrap_or(BLOCK)))
    }

    fn terminate(&mut self, sig: &str, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return Some(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Simulated crash: SIGKILL, no chance to flush anything.
    pub fn kill9(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Clean shutdown: SIGTERM, and the server must exit 0 within 15 s.
    pub fn stop(self) {
        self.stop_with("TERM")
    }

    /// Clean shutdown on signal `sig` ("TERM" or "INT"): exit 0 within 15 s.
    pub fn stop_with(mut self, sig: &str) {
        let st = self.terminate(sig, Duration::from_secs(15));
        match st {
            Some(st) if st.success() => {}
            Some(st) => panic!(
                "export exited with {st} after SIG{sig}\n{}",
                self.log_text()
            ),
            None => panic!(
                "export did not exit within 15 s of SIG{sig} (killed)\n{}",
                self.log_text()
            ),
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.terminate("TERM", Duration::from_secs(5));
    }
}

// ---------------------------------------------------------------------------
// The change log and the accounting check
// ---------------------------------------------------------------------------

/// One ring record of `drvutil --dump --json`.
#[derive(Clone, Debug)]
pub struct Record {
    pub seq: u64,
    pub kind: String,
    pub offset: u64,
    pub len: u64,
}

/// Parsed `drvutil --dump VOLUME --json`.
#[derive(Clone, Debug)]
pub struct ChangeLog {
    pub raw: Value,
    pub records: Vec<Record>,
    pub dirty: RangeSet,
    pub block_size: u64,
    pub writes: u64,
    pub bytes_written: u64,
    pub capture_mode: String,
}

fn num(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("drvutil JSON: `{what}` is not an unsigned number: {v}"))
}

impl ChangeLog {
    /// Parses the dump; `default_bs` is the tracking block size to assume
    /// when the dump does not state one.
    pub fn parse(v: Value, default_bs: u64) -> ChangeLog {
        let stats = &v["stats"];
        assert!(stats.is_object(), "drvutil JSON has no `stats` object: {v}");
        let records: Vec<Record> = v["records"]
            .as_array()
            .unwrap_or_else(|| panic!("drvutil JSON has no `records` array: {v}"))
            .iter()
            .map(|r| Record {
                seq: num(&r["seq"], "records[].seq"),
                kind: r["kind"].as_str().unwrap_or("?").to_string(),
                offset: num(&r["offset"], "records[].offset"),
                len: num(&r["len"], "records[].len"),
            })
            .collect();
        let dirty = RangeSet::from_extents(
            v["dirty_ranges"]
                .as_array()
                .unwrap_or_else(|| panic!("drvutil JSON has no `dirty_ranges` array: {v}"))
                .iter()
                .map(|r| {
                    (
                        num(&r["offset"], "dirty_ranges[].offset"),
                        num(&r["len"], "dirty_ranges[].len"),
                    )
                }),
        );
        let block_size = [
            &stats["block_size"],
            &v["block_size"],
            &stats["tracking_block_size"],
            &v["tracking_block_size"],
        ]
        .iter()
        .find_map(|x| x.as_u64())
        .unwrap_or(default_bs);
        ChangeLog {
            writes: num(&stats["writes"], "stats.writes"),
            bytes_written: num(&stats["bytes_written"], "stats.bytes_written"),
            capture_mode: stats["capture_mode"].as_str().unwrap_or("?").to_string(),
            records,
            dirty,
            block_size,
            raw: v,
        }
    }

    /// Union of the ring records' ranges (tags excluded).
    pub fn record_set(&self) -> RangeSet {
        RangeSet::from_extents(
            self.records
                .iter()
                .filter(|r| r.kind != "tag")
                .map(|r| (r.offset, r.len)),
        )
    }

    /// Everything the change log says was written: records ∪ dirty ranges.
    pub fn covered(&self) -> RangeSet {
        self.record_set().union(&self.dirty)
    }

    pub fn summary(&self) -> String {
        format!(
            "change log: writes={} bytes_written={} capture_mode={} block_size={} records={} ({}) dirty={}",
            self.writes,
            self.bytes_written,
            self.capture_mode,
            self.block_size,
            self.records.len(),
            self.record_set().describe(8),
            self.dirty.describe(8)
        )
    }
}

/// The accounting rules, as a pure function (see [`assert_changes_recorded`]).
/// `changed` = bytes that differ in the backing file; `expected` = the exact
/// extents a client wrote, when known.
pub fn check_accounting(
    changed: &RangeSet,
    log: &ChangeLog,
    expected: Option<&RangeSet>,
) -> Result<(), String> {
    let covered = log.covered();
    let missing = changed.subtract(&covered);
    if !missing.is_empty() {
        return Err(format!(
            "bytes changed in the backing file but absent from the change log: {}\nchanged: {}\n{}",
            missing.describe(10),
            changed.describe(10),
            log.summary()
        ));
    }
    if let Some(exp) = expected {
        let unrecorded = exp.subtract(&covered);
        if !unrecorded.is_empty() {
            return Err(format!(
                "client-written extents missing from the change log: {}\nexpected: {}\n{}",
                unrecorded.describe(10),
                exp.describe(10),
                log.summary()
            ));
        }
        let extra_rec = log.record_set().subtract(exp);
        if !extra_rec.is_empty() {
            return Err(format!(
                "ring records outside what the client wrote: {}\nexpected: {}\n{}",
                extra_rec.describe(10),
                exp.describe(10),
                log.summary()
            ));
        }
        let extra_dirty = log.dirty.subtract(&exp.round_out(log.block_size));
        if !extra_dirty.is_empty() {
            return Err(format!(
                "dirty ranges beyond the client's writes rounded to {} bytes: {}\nexpected: {}\n{}",
                log.block_size,
                extra_dirty.describe(10),
                exp.describe(10),
                log.summary()
            ));
        }
    }
    Ok(())
}

/// The change-log accounting check, run after every client test.
///
/// * Every byte of the backing file that differs from `before` must lie in
///   the union of the ring records and the dirty ranges (nothing written may
///   escape the change log).
/// * With `expected` (the exact extents the client wrote, zeroed or trimmed):
///   the change log covers all of them, ring records stay inside them, and
///   dirty ranges stay inside them rounded out to the tracking block.
///
/// Returns the change log (None when testing against qemu-nbd).
pub fn assert_changes_recorded(
    export: &Export,
    before: &ImageCopy,
    expected: Option<&RangeSet>,
) -> Option<ChangeLog> {
    let changed = diff_files(&before.path, &export.backing);
    let Some(log) = export.dump() else {
        eprintln!(
            "NOTE: server is {:?}, change-log accounting not checked ({} bytes changed)",
            export.kind,
            changed.total_len()
        );
        return None;
    };
    if let Err(e) = check_accounting(&changed, &log, expected) {
        panic!("{e}\n{}", export.log_text());
    }
    Some(log)
}

/// For read-only exports and read-only clients: the backing file is
/// byte-identical to `before` and the change log holds nothing.
pub fn assert_nothing_recorded(export: &Export, before: &ImageCopy) {
    let changed = diff_files(&before.path, &export.backing);
    assert!(
        changed.is_empty(),
        "backing file changed: {}",
        changed.describe(10)
    );
    // a read-only or untracked export may have no change log at all
    let clog = export.shm_dir.join(format!("{}.clog", export.volume));
    if export.kind == ServerKind::Rewind
        && (export.opts.read_only || export.opts.no_tracking)
        && !clog.exists()
    {
        return;
    }
    if let Some(log) = export.dump() {
        assert!(
            log.covered().is_empty() && log.records.iter().all(|r| r.kind == "tag"),
            "change log not empty although nothing was written: {}",
            log.summary()
        );
    }
}

// ---------------------------------------------------------------------------
// Content model for exact clients
// ---------------------------------------------------------------------------

/// Expected image content plus the extents a client wrote.
pub struct Model {
    pub data: Vec<u8>,
    pub written: RangeSet,
    /// Ranges whose content is unspecified afterwards (TRIM).
    pub unspecified: RangeSet,
}

impl Model {
    pub fn from_copy(before: &ImageCopy) -> Model {
        Model {
            data: before.read_all(),
            written: RangeSet::new(),
            unspecified: RangeSet::new(),
        }
    }
    pub fn fill(&mut self, offset: u64, len: u64, byte: u8) {
        self.data[offset as usize..(offset + len) as usize].fill(byte);
        self.written.add(offset, len);
    }
    pub fn write(&mut self, offset: u64, buf: &[u8]) {
        self.data[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        self.written.add(offset, buf.len() as u64);
    }
    pub fn trim(&mut self, offset: u64, len: u64) {
        self.written.add(offset, len);
        self.unspecified.add(offset, len);
    }

    /// `(offset, len, byte)` runs covering every written byte whose content
    /// is specified, for read-back checks (`read -P`, libnbd pread).
    pub fn runs(&self) -> Vec<(u64, u64, u8)> {
        let mut out = Vec::new();
        for &(s, e) in self.written.subtract(&self.unspecified).ranges() {
            let mut i = s;
            while i < e {
                let b = self.data[i as usize];
                let mut j = i;
                while j < e && self.data[j as usize] == b {
                    j += 1;
                }
                out.push((i, j - i, b));
                i = j;
            }
        }
        out
    }

    /// Compares `path` to the model (trimmed ranges may read old data or zeroes).
    pub fn assert_file_matches(&self, path: &Path) {
        let actual = fs::read(path).expect("read backing");
        assert_eq!(actual.len(), self.data.len(), "backing file size changed");
        let mut v = Vec::new();
        for (i, (a, e)) in actual
            .chunks(BLOCK as usize)
            .zip(self.data.chunks(BLOCK as usize))
            .enumerate()
        {
            if a != e {
                v.push((i as u64 * BLOCK, BLOCK));
            }
        }
        let bad = RangeSet::from_extents(v).subtract(&self.unspecified);
        assert!(
            bad.is_empty(),
            "backing file differs from what the client wrote: {}",
            bad.describe(10)
        );
        for &(s, e) in self.unspecified.ranges() {
            let got = &actual[s as usize..e as usize];
            let old = &self.data[s as usize..e as usize];
            assert!(
                got == old || got.iter().all(|&b| b == 0),
                "trimmed range [{s:#x}..{e:#x}) is neither old data nor zeroes"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Allocation maps (BLOCK_STATUS base:allocation)
// ---------------------------------------------------------------------------

/// Checks an allocation map `(offset, len, is_data)` reported by a client:
/// it tiles `[0, size)`, every byte of `data` is reported as data, and every
/// byte of `holes` is reported as a hole.
pub fn assert_allocation(
    extents: &[(u64, u64, bool)],
    size: u64,
    data: &RangeSet,
    holes: &RangeSet,
) {
    let mut end = 0;
    for &(o, l, _) in extents {
        assert_eq!(o, end, "map has a gap or overlap at {o:#x}: {extents:?}");
        end = o + l;
    }
    assert_eq!(
        end, size,
        "map does not end at the export size: {extents:?}"
    );
    let rep_data = RangeSet::from_extents(extents.iter().filter(|e| e.2).map(|e| (e.0, e.1)));
    let rep_hole = RangeSet::from_extents(extents.iter().filter(|e| !e.2).map(|e| (e.0, e.1)));
    let d = data.subtract(&rep_data);
    assert!(
        d.is_empty(),
        "data reported as hole: {}\nmap: {extents:?}",
        d.describe(10)
    );
    let h = holes.subtract(&rep_hole);
    assert!(
        h.is_empty(),
        "holes reported as data: {}\nmap: {extents:?}",
        h.describe(10)
    );
}

/// A sparse backing file with data (random) at `data` extents.
pub fn create_sparse_with_data(path: &Path, size: u64, data: &RangeSet, seed: u64) {
    create_sparse(path, size);
    for &(s, e) in data.ranges() {
        let mut buf = vec![0u8; (e - s) as usize];
        fill_random(&mut buf, seed ^ s);
        write_at(path, s, &buf);
    }
}

// ---------------------------------------------------------------------------
// Shared system resources
// ---------------------------------------------------------------------------

/// Serializes tests that use loop devices and FUSE mounts (across test
/// binaries and processes): hold the returned file while running.
pub fn fs_lock() -> File {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/rewind-tests-fs.lock")
        .expect("open lock file");
    f.lock().expect("lock /tmp/rewind-tests-fs.lock");
    f
}

/// Path of one of our scripts.
pub fn script(name: &str) -> PathBuf {
    let p = workspace_root().join("scripts").join(name);
    assert!(p.is_file(), "{} is missing", p.display());
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rangeset_ops() {
        let a = RangeSet::from_extents([(0, 10), (10, 5), (100, 10)]);
        assert_eq!(a.ranges(), &[(0, 15), (100, 110)]);
        let b = RangeSet::from_extents([(5, 100)]);
        assert_eq!(a.subtract(&b).ranges(), &[(0, 5), (105, 110)]);
        assert!(!b.contains_set(&a));
        assert!(a.union(&b).contains_set(&a));
        assert_eq!(
            RangeSet::from_extents([(1537, 1024)])
                .round_out(4096)
                .ranges(),
            &[(0, 4096)]
        );
        assert_eq!(a.subtract(&RangeSet::new()), a);
        assert!(RangeSet::new().subtract(&a).is_empty());
    }

    fn log(records: &[(u64, u64)], dirty: &[(u64, u64)]) -> ChangeLog {
        let v = serde_json::json!({
            "volume": "v",
            "stats": {"writes": 1, "bytes_written": 1, "reads": 0, "capture_mode": "data"},
            "records": records.iter().enumerate().map(|(i, &(o, l))|
                serde_json::json!({"seq": i, "kind": "data", "offset": o, "len": l})).collect::<Vec<_>>(),
            "dirty_ranges": dirty.iter().map(|&(o, l)|
                serde_json::json!({"offset": o, "len": l})).collect::<Vec<_>>(),
        });
        ChangeLog::parse(v, 4096)
    }

    #[test]
    fn accounting_rules_catch_bad_logs() {
        let changed = RangeSet::from_extents([(1537, 1024), (8192, 100)]);
        let exp = RangeSet::from_extents([(1537, 1024), (8192, 4096)]);
        // exact records: fine
        let good = log(&[(1537, 1024), (8192, 4096)], &[]);
        assert!(check_accounting(&changed, &good, Some(&exp)).is_ok());
        // rounded dirty bits: fine
        let good = log(&[], &[(0, 4096), (8192, 4096)]);
        assert!(check_accounting(&changed, &good, Some(&exp)).is_ok());
        // a changed byte not recorded
        let bad = log(&[(1537, 1023), (8192, 4096)], &[]);
        assert!(check_accounting(&changed, &bad, None).is_err());
        // a written-but-unchanged byte not recorded
        let bad = log(&[(1537, 1024), (8192, 100)], &[]);
        assert!(check_accounting(&changed, &bad, None).is_ok());
        assert!(check_accounting(&changed, &bad, Some(&exp)).is_err());
        // a record outside what was written
        let bad = log(&[(1537, 1024), (8192, 4096), (1 << 20, 1)], &[]);
        assert!(check_accounting(&changed, &bad, Some(&exp)).is_err());
        // a dirty block outside the rounded writes
        let bad = log(&[], &[(0, 4096), (8192, 8192)]);
        assert!(check_accounting(&changed, &bad, Some(&exp)).is_err());
    }

    #[test]
    fn diff_is_byte_exact() {
        let s = Scratch::new("diff");
        let a = s.join("a");
        let b = s.join("b");
        create_random(&a, 3 * MIB, 7);
        fs::copy(&a, &b).unwrap();
        write_at(&b, 1537, &[0xAA; 1024]);
        write_at(&b, 2 * MIB - 1, &[0x00; 2]);
        let d = diff_files(&a, &b);
        // random bytes may coincidentally equal the written ones: allow that
        assert!(RangeSet::from_extents([(1537, 1024), (2 * MIB - 1, 2)]).contains_set(&d));
        assert!(d.total_len() > 1000, "{}", d.describe(5));
        let c = ImageCopy::capture(&s, &b);
        assert!(files_equal(&c.path, &b));
    }
}
