//! The operator's vsnap path, end to end (driven by `scripts/bench-journal`
//! after `journal_bench` built its 10^6-record journal):
//!
//! `cargo run --release -p tools --example snapshot_cli_bench -- REWIND TARGET_DIR VOLUME WORK_DIR [RUNS]`
//!
//! `TARGET_DIR/VOLUME/journal` is a target journal (as `rewind target --dir
//! TARGET_DIR` lays it out). Every figure is the time from spawning
//! `REWIND snapshot create --volume VOLUME (--latest | --at T) --listen
//! unix:SOCK` until it printed the NBD URI *and* a 4 KiB read at offset 0
//! through our NBD client answered (the CLI is then stopped with SIGTERM):
//!
//! 1. with `rewind target --dir TARGET_DIR` running: the daemon's own start
//!    (spawn until its admin socket accepts), the first snapshot (the daemon
//!    opens the volume on that request), then `RUNS` snapshots each of
//!    `--latest` and `--at T` on the open volume (T: the middle of the
//!    journal's longest consistent time range);
//! 2. with the daemon stopped: the CLI opens the volume itself (`RUNS`
//!    each of `--latest` and `--at T`).
//!
//! Peers in the same run: spawning `REWIND --version` (the process floor)
//! and `TargetVolume::open` of the same journal in this process.
//!
//! Output: `key value` lines (milliseconds; `_med` median, `_max` worst).

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use filter_nbd::client::{ConnectOptions, Connection, NbdUri};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

struct Bench {
    rewind: PathBuf,
    target_dir: PathBuf,
    volume: String,
    work: PathBuf,
    state: PathBuf,
    log: PathBuf,
    n: u64,
}

/// One timed snapshot: (ms until the URI line, ms until the first read answered).
struct Timed {
    uri_ms: f64,
    read_ms: f64,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn log_file(p: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .with_context(|| format!("opening {}", p.display()))
}

/// SIGTERM, then wait (at most 30 s) for a clean exit.
fn stop(mut c: Child, what: &str) -> Result<()> {
    let pid = Pid::from_raw(i32::try_from(c.id()).context("pid")?);
    kill(pid, Signal::SIGTERM).with_context(|| format!("signalling {what}"))?;
    let t = Instant::now();
    loop {
        if let Some(st) = c.try_wait()? {
            if !st.success() {
                bail!("{what} exited with {st}");
            }
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = c.kill();
            let _ = c.wait();
            bail!("{what} did not stop within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Bench {
    /// Runs `rewind snapshot create` at `point` and times it up to the first read.
    fn snapshot(&self, point: &[&str], k: u64) -> Result<Timed> {
        let sock = self.work.join(format!("snap{k}.sock"));
        let t = Instant::now();
        let mut c = Command::new(&self.rewind)
            .args(["snapshot", "create", "--volume", &self.volume])
            .args(point)
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--target-dir")
            .arg(&self.target_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(&self.log)?)
            .spawn()
            .context("spawning rewind snapshot create")?;
        let out = c.stdout.take().context("no stdout")?;
        let mut line = String::new();
        let got = BufReader::new(out).read_line(&mut line);
        let uri_ms = ms(t);
        if got.is_err() || line.trim().is_empty() {
            let st = c.wait()?;
            bail!(
                "rewind snapshot create {point:?} printed no URI ({st}); see {}",
                self.log.display()
            );
        }
        let uri: NbdUri = line.trim().parse().context("parsing the printed URI")?;
        let mut conn = Connection::connect(&uri, &ConnectOptions::default())
            .with_context(|| format!("connecting to {}", line.trim()))?;
        let data = conn.read(0, 4096).context("first read")?;
        let read_ms = ms(t);
        if data.len() != 4096 {
            bail!("first read returned {} bytes", data.len());
        }
        conn.disconnect().context("NBD disconnect")?;
        stop(c, "rewind snapshot create")?;
        Ok(Timed { uri_ms, read_ms })
    }

    /// `n` snapshots at `point`: prints `<key>_ms_med`, `<key>_ms_max` and
    /// `<key>_uri_ms_med` (the URI line alone).
    fn series(&self, key: &str, point: &[&str], base: u64) -> Result<()> {
        let mut read = Vec::new();
        let mut uri = Vec::new();
        for k in 0..self.n {
            let r = self.snapshot(point, base + k)?;
            read.push(r.read_ms);
            uri.push(r.uri_ms);
        }
        println!("{key}_ms_med {:.1}", median(&mut read));
        println!(
            "{key}_ms_max {:.1}",
            read.iter().copied().fold(0f64, f64::max)
        );
        println!("{key}_uri_ms_med {:.1}", median(&mut uri));
        Ok(())
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The middle of the longest consistent time range, as unix seconds for `--at`.
fn middle_time(journal_dir: &Path) -> Result<(String, u64, f64)> {
    let t = Instant::now();
    let v = journal::TargetVolume::open(journal_dir)
        .with_context(|| format!("opening {}", journal_dir.display()))?;
    let open_ms = ms(t);
    let records = v.counters().journal_records;
    let rp = v.recovery_points()?;
    let Some(&(a, b)) = rp.consistent_ranges.iter().max_by_key(|(a, b)| b - a) else {
        bail!("the journal has no consistent time range");
    };
    let m = a + (b - a) / 2;
    Ok((
        format!("{}.{:09}", m / 1_000_000_000, m % 1_000_000_000),
        records,
        open_ms,
    ))
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        bail!("usage: snapshot_cli_bench REWIND TARGET_DIR VOLUME WORK_DIR [RUNS]");
    }
    let work = PathBuf::from(&a[4]);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let b = Bench {
        rewind: PathBuf::from(&a[1]),
        target_dir: PathBuf::from(&a[2]),
        volume: a[3].clone(),
        state: work.join("state"),
        log: work.join("rewind.log"),
        work,
        n: a.get(5).map(|s| s.parse()).transpose()?.unwrap_or(5),
    };
    let (at, records, open_ms) = middle_time(&b.target_dir.join(&b.volume).join("journal"))?;
    println!("cli.records {records}");
    println!("cli.at {at}");
    println!("cli.inproc_open_ms {open_ms:.1}");

    // The process floor: spawn + exit of the same binary.
    let mut floor = Vec::new();
    for _ in 0..b.n {
        let t = Instant::now();
        let st = Command::new(&b.rewind)
            .arg("--version")
            .stdout(Stdio::null())
            .status()?;
        if !st.success() {
            bail!("rewind --version: {st}");
        }
        floor.push(ms(t));
    }
    println!("cli.spawn_ms_med {:.1}", median(&mut floor));

    // 1. Through the running target daemon.
    let t = Instant::now();
    let daemon = Command::new(&b.rewind)
        .args([
            "target",
            "--listen",
            "tcp:127.0.0.1:0",
            "--insecure",
            "--dir",
        ])
        .arg(&b.target_dir)
        .arg("--state-dir")
        .arg(&b.state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file(&b.log)?)
        .spawn()
        .context("spawning rewind target")?;
    let admin = b.state.join("admin.sock");
    while UnixStream::connect(&admin).is_err() {
        if t.elapsed() > Duration::from_secs(30) {
            bail!(
                "rewind target: no admin socket after 30 s; see {}",
                b.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    println!("cli.daemon_ready_ms {:.1}", ms(t));
    let run = (|| -> Result<()> {
        let first = b.snapshot(&["--latest"], 0)?;
        println!("cli.daemon_first_latest_ms {:.1}", first.read_ms);
        b.series("cli.daemon_latest", &["--latest"], 100)?;
        b.series("cli.daemon_at", &["--at", &at], 200)?;
        Ok(())
    })();
    let stopped = stop(daemon, "rewind target");
    run?;
    stopped?;

    // 2. No daemon: the CLI opens the volume itself.
    b.series("cli.local_latest", &["--latest"], 300)?;
    b.series("cli.local_at", &["--at", &at], 400)?;
    Ok(())
}
