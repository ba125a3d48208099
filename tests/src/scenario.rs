//! Fault scenarios for the trace-replay oracle: `rewind replay` runs against a
//! protected volume (export → replicator → fault proxy → target, mutual TLS)
//! while faults fire at given trace positions; then the replay's `--verify`
//! checks source, replica and every bookmark/time point.
//!
//! The runner lives here, in the tests package, because it owns the daemons
//! and the in-process [`FaultProxy`](crate::faultproxy::FaultProxy) (the
//! `tools` crate must not depend on test code). The hook in `rewind replay`
//! is `--sync-at N`: at trace position N the replay drains, prints a `sync`
//! line and waits; the runner fires the fault and lets it continue, so faults
//! land at exact positions while the rest of the trace runs into them.
//!
//! Schedule syntax (`rewind-scenario --schedule`): comma-separated
//! `POSITION:FAULT`, FAULT one of `kill=replicator`, `kill=target` (SIGKILL,
//! restarted after `--restart-delay`), `cut=DURATION` (the replication link
//! is reset and refused for DURATION, e.g. `cut=3s`), `stall=DURATION` (the
//! link black-holes traffic for DURATION), `diskfull=DURATION` (the file
//! system holding the target's directory, a small loop-mounted ext4 the
//! runner creates when the schedule has this fault, is filled with a ballast
//! file until writes fail with `ENOSPC`, kept full for DURATION while the
//! replay goes on, then the ballast is deleted). Example:
//! `800:kill=replicator,1600:cut=2s,2000:diskfull=4s,2400:kill=target`.

use crate::diskfull::{Ballast, SmallFs};
use crate::faultproxy::FaultProxy;
use crate::replay::SyncedReplay;
use crate::replication::*;
use crate::{create_sparse, Export, ExportOpts, Scratch};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A process the runner can kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Victim {
    /// `rewind replicator`.
    Replicator,
    /// `rewind target`.
    Target,
}

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL, then restart.
    Kill(Victim),
    /// Reset the replication link and refuse it for this long.
    Cut(Duration),
    /// Forward nothing on the link for this long (connections stay open).
    Stall(Duration),
    /// Fill the target's file system (`ENOSPC`) for this long.
    DiskFull(Duration),
}

/// A fault at a trace position (operations done).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Trace position.
    pub at: u64,
    /// The fault.
    pub fault: Fault,
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    let (n, mul) = match s.strip_suffix("ms") {
        Some(n) => (n, 0.001),
        None => (s.strip_suffix('s').unwrap_or(s), 1.0),
    };
    let v: f64 = n.parse().map_err(|_| format!("bad duration {s:?}"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(v * mul))
}

/// Parses a schedule (see the module docs); positions must increase.
pub fn parse_schedule(s: &str) -> Result<Vec<Step>, String> {
    let mut out: Vec<Step> = Vec::new();
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let (pos, f) = item
            .split_once(':')
            .ok_or_else(|| format!("{item:?}: expected POSITION:FAULT"))?;
        let at: u64 = pos
            .parse()
            .map_err(|_| format!("{pos:?} is not a trace position"))?;
        let fault = match f.split_once('=') {
            Some(("kill", "replicator")) => Fault::Kill(Victim::Replicator),
            Some(("kill", "target")) => Fault::Kill(Victim::Target),
            Some(("cut", d)) => Fault::Cut(parse_dur(d)?),
            Some(("stall", d)) => Fault::Stall(parse_dur(d)?),
            Some(("diskfull", d)) => Fault::DiskFull(parse_dur(d)?),
            _ => {
                return Err(format!(
                    "{f:?}: expected kill=replicator|target, cut=DUR, stall=DUR or diskfull=DUR"
                ))
            }
        };
        if out.last().is_some_and(|l| l.at >= at) {
            return Err(format!("position {at} does not follow the previous one"));
        }
        out.push(Step { at, fault });
    }
    Ok(out)
}

/// Scenario options.
pub struct Options {
    /// Volume size in bytes.
    pub size: u64,
    /// Bookmark every N operations (0: none).
    pub bookmark_every: u64,
    /// Delay before a killed process is restarted.
    pub restart_delay: Duration,
    /// Size of the target's own file system when the schedule has a
    /// `diskfull` fault (it holds replica, journal and spool).
    pub target_fs_size: u64,
    /// Change-log ring size of the export (`None`: the default). A ring
    /// that overflows during a long fault puts the source in bitmap mode
    /// (reported as `bitmap_mode_entered`).
    pub ring_size: Option<u64>,
}

/// Polls the target's status (`rewind status --json` view of its status
/// file) while the disk is full: the first alert naming the full disk, and
/// whether the target process stayed up.
fn watch_disk_full(state_dir: &Path, ballast: Ballast, d: Duration) -> Value {
    let t0 = Instant::now();
    let mut alert: Option<(f64, String)> = None;
    let mut storage_full = None;
    while t0.elapsed() < d {
        if let Some(v) = read_status_file(state_dir) {
            let vol = v["volumes"]
                .as_array()
                .and_then(|a| a.iter().find(|x| x["name"] == "vol0").cloned())
                .unwrap_or(Value::Null);
            if alert.is_none() {
                if let Some(a) = vol["alerts"].as_array().and_then(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .find(|s| s.starts_with("target storage full"))
                }) {
                    alert = Some((t0.elapsed().as_secs_f64(), a.to_string()));
                }
            }
            if storage_full.is_none() && !vol["status"]["storage_full"].is_null() {
                storage_full = Some(vol["status"]["storage_full"].clone());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let bytes = ballast.release();
    json!({
        "ballast_bytes": bytes,
        "alert_after_seconds": alert.as_ref().map(|a| a.0),
        "alert": alert.map(|a| a.1),
        "storage_full": storage_full,
    })
}

/// Runs `trace` with `steps` in `scratch`; returns the replay's JSON report
/// plus a `scenario` section (faults fired, times). The caller asserts.
pub fn run(scratch: &Scratch, trace: &Path, steps: &[Step], opts: &Options) -> Value {
    let backing = scratch.join("vol.img");
    create_sparse(&backing, opts.size);
    let pki = Pki::new(scratch, "pki");
    let export = Export::start(
        scratch,
        &backing,
        ExportOpts {
            ring_size: opts.ring_size,
            ..ExportOpts::for_volume("vol0")
        },
    );
    // The target's directory lives on its own small file system when the
    // disk is to be filled (declared before the daemons: dropped after them).
    let small_fs = steps
        .iter()
        .any(|s| matches!(s.fault, Fault::DiskFull(_)))
        .then(|| SmallFs::create(scratch, "targetfs", opts.target_fs_size));
    let mut target = match &small_fs {
        Some(fs) => Target::start_in(
            scratch,
            fs.mount.join("target"),
            scratch.join("tstate-fs"),
            TargetOpts::tls(&pki),
        ),
        None => Target::start(scratch, TargetOpts::tls(&pki)),
    };
    let proxy = Arc::new(FaultProxy::start(target.addr));
    let ropts = ReplicatorOpts::tls(&pki, "vol0", &backing, &export.shm_dir, "zstd:1");
    let mut repl = Replicator::start(scratch, proxy.addr(), ropts);
    wait_drained(&repl, &target, Duration::from_secs(60));

    let replica = target.replica("vol0");
    let jdir = target.dir.join("vol0").join("journal");
    let shm = format!("--shm-dir={}", export.shm_dir.display());
    let every = opts.bookmark_every.to_string();
    let mut args: Vec<String> = vec![
        "--trace".into(),
        trace.to_string_lossy().into_owned(),
        "--uri".into(),
        export.uri(),
        "--verify".into(),
        "--replica".into(),
        replica.to_string_lossy().into_owned(),
        "--journal-dir".into(),
        jdir.to_string_lossy().into_owned(),
        "--drain-timeout".into(),
        "120s".into(),
        "--time-points".into(),
        "2".into(),
    ];
    if opts.bookmark_every > 0 {
        args.extend([
            "--bookmark-every".into(),
            every,
            "--volume".into(),
            "vol0".into(),
            "--bookmark-arg".into(),
            shm,
        ]);
    }
    for s in steps {
        args.extend(["--sync-at".into(), s.at.to_string()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    let mut r = SyncedReplay::start(&argv);
    let mut fired = Vec::new();
    let mut healers = Vec::new();
    let mut disk_full = Vec::new();
    for s in steps {
        let pos = r.wait_sync();
        let what = match s.fault {
            Fault::Kill(Victim::Replicator) => {
                repl.daemon.kill9();
                std::thread::sleep(opts.restart_delay);
                repl = repl.restart_after_kill9(scratch);
                "kill -9 replicator".to_string()
            }
            Fault::Kill(Victim::Target) => {
                target.daemon.kill9();
                std::thread::sleep(opts.restart_delay);
                target = target.restart_after_kill9(scratch);
                "kill -9 target".to_string()
            }
            Fault::Cut(d) => {
                proxy.cut(true);
                let p = proxy.clone();
                healers.push(std::thread::spawn(move || {
                    std::thread::sleep(d);
                    p.resume();
                }));
                format!("link cut for {d:?}")
            }
            Fault::Stall(d) => {
                proxy.stall();
                let p = proxy.clone();
                healers.push(std::thread::spawn(move || {
                    std::thread::sleep(d);
                    p.resume();
                }));
                format!("link stalled for {d:?}")
            }
            Fault::DiskFull(d) => {
                let ballast = Ballast::fill(&target.dir);
                let state = target.state_dir.clone();
                disk_full.push(std::thread::spawn(move || {
                    watch_disk_full(&state, ballast, d)
                }));
                format!("target disk full for {d:?}")
            }
        };
        eprintln!("scenario: at trace position {pos}: {what}");
        fired.push(
            json!({"position": pos, "fault": what, "at_seconds": t0.elapsed().as_secs_f64()}),
        );
        r.resume();
    }
    let (ok, mut report) = r.finish(Duration::from_secs(600));
    for h in healers {
        let _ = h.join();
    }
    let disk_full: Vec<Value> = disk_full
        .into_iter()
        .map(|h| h.join().unwrap_or(Value::Null))
        .collect();
    let doc = wait_drained(&repl, &target, Duration::from_secs(120));
    assert_same(&backing, &replica, "after the scenario");
    report["scenario"] = json!({
        "replay_ok": ok,
        "faults": fired,
        "seconds": t0.elapsed().as_secs_f64(),
        "proxy_connections_accepted": proxy.accepted(),
        "pair": doc["source"]["pairs"][0]["status"]["state"],
        "disk_full": disk_full,
        "target_alerts_after": target.volume_status("vol0")["alerts"],
        "resync_passes": target.volume_status("vol0")["resync_passes"],
        "resync_step1_entered": doc["source"]["pairs"][0]["resync_step1_entered"],
        "bitmap_mode_entered": doc["source"]["pairs"][0]["bitmap_mode_entered"],
    });
    repl.daemon.stop();
    target.daemon.stop();
    drop(export);
    drop(small_fs);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse() {
        let s = parse_schedule(
            "800:kill=replicator, 1600:cut=2s,2400:kill=target,3000:stall=500ms,3500:diskfull=4s",
        )
        .unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(s[4].fault, Fault::DiskFull(Duration::from_secs(4)));
        assert_eq!(
            s[0],
            Step {
                at: 800,
                fault: Fault::Kill(Victim::Replicator)
            }
        );
        assert_eq!(s[1].fault, Fault::Cut(Duration::from_secs(2)));
        assert_eq!(s[3].fault, Fault::Stall(Duration::from_millis(500)));
        assert!(parse_schedule("10:kill=export").is_err());
        assert!(parse_schedule("10:cut=2s,5:cut=1s").is_err());
        assert!(parse_schedule("x:cut=1s").is_err());
        assert!(parse_schedule("10:cut=-1s").is_err());
    }
}
