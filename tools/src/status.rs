//! Status files of the daemons and `rewind status`.
//!
//! `rewind replicator` and `rewind target` rewrite `<state_dir>/status.json`
//! (mode 0600, atomically: temporary file + rename) a few times a second and
//! once more when they stop. `rewind status` and `cdpcli` read them; a file
//! whose writer is gone is shown as such (pid not alive or not refreshed for
//! [`STALE_SECS`]).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use journal::Counters;
use replicator::pair::{now_ns, PairState, PairStatus, TargetStatus};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::config::{DEFAULT_REPLICATOR_STATE, DEFAULT_TARGET_STATE};

/// Name of the status file in a daemon's state directory.
pub const STATUS_FILE: &str = "status.json";
/// A status file not refreshed for this long is stale.
pub const STALE_SECS: f64 = 5.0;

/// One state change of a pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    /// Wall clock (ns).
    pub at_ns: u64,
    /// New state.
    pub state: PairState,
    /// Capture mode at that time.
    pub capture_mode: String,
    /// Connected at that time.
    pub connected: bool,
}

/// A pair as the replicator reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PairReport {
    /// The engine's live measures.
    pub status: PairStatus,
    /// RPO in seconds (from `status.rpo_ns`).
    pub rpo_secs: f64,
    /// Compression setting.
    pub compression: String,
    /// Current bandwidth limit of the pair (bytes/s), `None`: unlimited.
    pub bandwidth_bps: Option<u64>,
    /// Times the pair entered `ResyncStep1` since the daemon started.
    pub resync_step1_entered: u64,
    /// Times the capture mode was seen as `Bitmap` after being something else.
    pub bitmap_mode_entered: u64,
    /// Recent state/mode/connection changes (oldest first, at most 64).
    pub history: Vec<Transition>,
    /// Active alerts (human-readable).
    pub alerts: Vec<String>,
    /// Consistency group, if any.
    #[serde(default)]
    pub group: Option<String>,
    /// Target address of the pair.
    #[serde(default)]
    pub target: String,
    /// Where the pair comes from: `config` (the configuration file) or
    /// `protect` (added with `rewind protect`).
    #[serde(default)]
    pub origin: String,
}

/// `<replicator state_dir>/status.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReplicatorStatusFile {
    /// Writer's pid.
    pub pid: u32,
    /// Daemon start (ns).
    pub started_ns: u64,
    /// Last refresh (ns).
    pub updated_ns: u64,
    /// Whether the daemon is running (false in the file written at stop).
    pub running: bool,
    /// Target address.
    pub target: String,
    /// RPO alert threshold (s).
    pub rpo_threshold_secs: f64,
    /// Pairs.
    pub pairs: Vec<PairReport>,
    /// Admin socket path.
    #[serde(default)]
    pub control_socket: String,
    /// Bound metrics endpoint, if any.
    #[serde(default)]
    pub metrics: Option<String>,
}

/// Journal counters (a serialisable copy of [`journal::Counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct JournalFigures {
    /// Chunks stored in the spool since open.
    pub spooled_chunks: u64,
    /// Bytes stored in the spool since open.
    pub spooled_bytes: u64,
    /// Duplicates acknowledged since open.
    pub duplicate_chunks: u64,
    /// Chunks applied since open.
    pub applied_chunks: u64,
    /// Bytes applied since open.
    pub applied_bytes: u64,
    /// Time spent applying since open (ns).
    pub apply_ns: u64,
    /// Durable sequence.
    pub durable_seq: u64,
    /// Applied sequence.
    pub applied_seq: u64,
    /// Chunks pending apply.
    pub pending_chunks: u64,
    /// Bytes pending apply.
    pub pending_bytes: u64,
    /// Source time of the oldest unapplied chunk.
    pub oldest_unapplied_source_time_ns: Option<u64>,
    /// Undo records.
    pub journal_records: u64,
    /// Journal bytes.
    pub journal_bytes: u64,
    /// Chunks recovered at open (crash).
    pub recovered_chunks: u64,
    /// Torn tails truncated at open.
    pub torn_tails: u64,
    /// Old bytes covered by undo records written since open.
    #[serde(default)]
    pub undo_raw_bytes: u64,
    /// Bytes stored for them (after zero elision and compression): with
    /// `undo_raw_bytes`, the retention journal's compression.
    #[serde(default)]
    pub undo_stored_bytes: u64,
}

impl From<Counters> for JournalFigures {
    fn from(c: Counters) -> Self {
        JournalFigures {
            spooled_chunks: c.spooled_chunks,
            spooled_bytes: c.spooled_bytes,
            duplicate_chunks: c.duplicate_chunks,
            applied_chunks: c.applied_chunks,
            applied_bytes: c.applied_bytes,
            apply_ns: c.apply_ns,
            durable_seq: c.durable_seq,
            applied_seq: c.applied_seq,
            pending_chunks: c.pending_chunks,
            pending_bytes: c.pending_bytes,
            oldest_unapplied_source_time_ns: c.oldest_unapplied_source_time_ns,
            journal_records: c.journal_records,
            journal_bytes: c.journal_bytes,
            recovered_chunks: c.recovered_chunks,
            torn_tails: c.torn_tails,
            undo_raw_bytes: c.undo_raw_bytes,
            undo_stored_bytes: c.undo_stored_bytes,
        }
    }
}

/// Retention of a volume at the target: the window available against what
/// the policy promises.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RetentionFigures {
    /// Latest − oldest available point (s).
    pub available_window_secs: f64,
    /// The age the time policy promises (s); `None`: no time limit.
    pub policy_window_secs: Option<f64>,
    /// Journal space limit (bytes), if any.
    pub max_journal_bytes: Option<u64>,
    /// Journal bytes now.
    pub journal_bytes: u64,
    /// Why the window is shorter than the policy (space limit hit), if it is.
    pub alert: Option<String>,
}

/// A volume as the target reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetVolumeReport {
    /// Volume name.
    pub name: String,
    /// The engine's live measures (`None` before a source connected since start).
    pub status: Option<TargetStatus>,
    /// Journal counters (`None` before the journal was opened).
    pub journal: Option<JournalFigures>,
    /// Replica path.
    pub replica: String,
    /// Journal directory.
    pub journal_dir: String,
    /// Whether the replica still waits for its initial synchronisation.
    pub needs_initial_sync: bool,
    /// Checksum-resync passes the sources started on this volume, ever
    /// (the initial synchronisation is one).
    pub resync_passes: u64,
    /// Active alerts.
    pub alerts: Vec<String>,
    /// Retention window available against the policy (volumes with a
    /// retention policy whose journal is open; refreshed every few seconds).
    #[serde(default)]
    pub retention: Option<RetentionFigures>,
    /// Write sizes received since the target started (`cdpcli --iopattern`).
    #[serde(default)]
    pub io_pattern: Option<crate::iopattern::IoPattern>,
}

/// `<target state_dir>/status.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetStatusFile {
    /// Writer's pid.
    pub pid: u32,
    /// Daemon start (ns).
    pub started_ns: u64,
    /// Last refresh (ns).
    pub updated_ns: u64,
    /// Whether the daemon is running.
    pub running: bool,
    /// Listen address.
    pub listen: String,
    /// Connections refused (TLS, handshake) since start, as seen in the log.
    pub refused: u64,
    /// The last refusal, with its reason.
    pub last_refusal: Option<String>,
    /// Volumes.
    pub volumes: Vec<TargetVolumeReport>,
    /// Bound metrics endpoint, if any.
    #[serde(default)]
    pub metrics: Option<String>,
}

/// Writes `value` as JSON to `dir/status.json` atomically, mode 0600.
pub fn write_status<T: Serialize>(dir: &Path, value: &T) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(STATUS_FILE);
    let tmp = dir.join(format!(".{STATUS_FILE}.tmp"));
    let body = serde_json::to_vec_pretty(value)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(&body)?;
    drop(f);
    std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Reads a status file.
pub fn read_status<T: DeserializeOwned>(dir: &Path) -> Result<T> {
    let path = dir.join(STATUS_FILE);
    let b = std::fs::read(&path).with_context(|| {
        format!(
            "reading {} (is the daemon running with this --state-dir?)",
            path.display()
        )
    })?;
    serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))
}

/// Whether process `pid` exists.
pub fn pid_alive(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// "running", "stopped" or "not responding" for a status file.
pub fn liveness(pid: u32, running: bool, updated_ns: u64) -> &'static str {
    if !running {
        return "stopped";
    }
    if !pid_alive(pid) {
        return "dead (killed?)";
    }
    let age = now_ns().saturating_sub(updated_ns) as f64 / 1e9;
    if age > STALE_SECS {
        "not responding"
    } else {
        "running"
    }
}

/// Arguments of `rewind status`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    rewind status\n  \
    rewind status --json\n  \
    rewind status --state-dir /var/lib/rewind/replicator --target-state-dir /var/lib/rewind/target\n\n\
Reading rule: most data pending on the source -> the source or the replicator is the bottleneck; \
in flight -> the link; spooled at the target -> the target's storage.")]
pub struct StatusArgs {
    /// State directory of `rewind replicator`.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_REPLICATOR_STATE)]
    pub state_dir: PathBuf,
    /// The replicator's admin socket (default STATE_DIR/control.sock).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Also show the target daemon whose state directory this is (same host only).
    #[arg(long, value_name = "DIR")]
    pub target_state_dir: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// The document `rewind status --json` prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusDoc {
    /// Replicator state: running, stopped, dead, not responding.
    pub replicator: String,
    /// The replicator's status: live from its admin socket, or its status file.
    pub source: Option<ReplicatorStatusFile>,
    /// `live` (asked the running daemon through its admin socket) or
    /// `status file` (the daemon could not be reached: last figures it wrote).
    #[serde(default)]
    pub figures_from: String,
    /// Why the figures come from the file, and how old they are.
    #[serde(default)]
    pub note: Option<String>,
    /// Target state, if asked for.
    pub target_daemon: Option<String>,
    /// The target's status file, if asked for.
    pub target: Option<TargetStatusFile>,
}

/// `1.5 MiB`-style sizes.
pub fn human_bytes(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Runs `rewind status`.
pub fn run(args: StatusArgs) -> Result<()> {
    let sock = args
        .socket
        .clone()
        .unwrap_or_else(|| args.state_dir.join(crate::replicate::CONTROL_SOCKET));
    let live: std::result::Result<ReplicatorStatusFile, crate::admin::AdminError> =
        crate::admin::call(
            &sock,
            &crate::replicate::ControlRequest::Status,
            std::time::Duration::from_secs(10),
        );
    let (source, figures_from, note) = match live {
        Ok(s) => (s, "live", None),
        Err(e) => {
            let s: ReplicatorStatusFile = read_status(&args.state_dir)
                .with_context(|| format!("the replicator is not reachable ({e}) and"))?;
            let age = now_ns().saturating_sub(s.updated_ns) as f64 / 1e9;
            let why = format!(
                "the replicator did not answer on {} ({e}); figures are from its status file, written {age:.1} s ago",
                sock.display()
            );
            (s, "status file", Some(why))
        }
    };
    let target: Option<TargetStatusFile> = match &args.target_state_dir {
        Some(d) => Some(read_status(d)?),
        None => None,
    };
    let replicator = if figures_from == "live" {
        "running".to_string()
    } else {
        liveness(source.pid, source.running, source.updated_ns).to_string()
    };
    let doc = StatusDoc {
        replicator,
        figures_from: figures_from.into(),
        note,
        target_daemon: target
            .as_ref()
            .map(|t| liveness(t.pid, t.running, t.updated_ns).to_string()),
        source: Some(source),
        target,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    print!("{}", render(&doc));
    Ok(())
}

/// The human-readable status.
pub fn render(doc: &StatusDoc) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    if let Some(s) = &doc.source {
        let _ = writeln!(
            o,
            "replicator: {} (pid {}), target {}{}",
            doc.replicator,
            s.pid,
            s.target,
            if s.pairs.is_empty() {
                ", no pair protected (see `rewind protect`)"
            } else {
                ""
            }
        );
        if let Some(n) = &doc.note {
            let _ = writeln!(o, "NOTE: {n}");
        }
        for p in &s.pairs {
            let st = &p.status;
            let _ = writeln!(
                o,
                "\npair {}{} -> {}",
                st.volume,
                p.group
                    .as_ref()
                    .map_or(String::new(), |g| format!(" [group {g}]")),
                if p.target.is_empty() {
                    &s.target
                } else {
                    &p.target
                }
            );
            let _ = writeln!(
                o,
                "  state       {:?}{}",
                st.state,
                if st.connected {
                    ", connected"
                } else {
                    ", not connected"
                }
            );
            let _ = writeln!(
                o,
                "  capture     {} mode",
                if st.capture_mode.is_empty() {
                    "?"
                } else {
                    &st.capture_mode
                }
            );
            let _ = writeln!(
                o,
                "  RPO         {:.1} s{}",
                p.rpo_secs,
                if st.drained { " (drained)" } else { "" }
            );
            let resyncing = matches!(st.state, PairState::ResyncStep1 | PairState::VolumeResized);
            if let Some(r) = st.resync.as_ref().filter(|_| resyncing) {
                let pct = if r.total_bytes > 0 {
                    r.done_bytes as f64 * 100.0 / r.total_bytes as f64
                } else {
                    100.0
                };
                let eta = r.eta_secs.map_or("?".into(), |e| format!("{e:.0} s"));
                let _ = writeln!(
                    o,
                    "  resync      {pct:.1}% ({} of {}, {} differing sent), ETA {eta}",
                    human_bytes(r.done_bytes),
                    human_bytes(r.total_bytes),
                    human_bytes(r.sent_bytes)
                );
            }
            let _ = writeln!(
                o,
                "  pending     source {} | in flight {} ({} frames) | spooled at target {}/{}",
                human_bytes(st.pending_source_bytes),
                human_bytes(st.in_flight_bytes),
                st.in_flight_frames,
                human_bytes(st.target_spool_bytes),
                human_bytes(st.target_spool_budget)
            );
            let _ = writeln!(
                o,
                "  sequences   durable at target {}, applied {}",
                st.target_durable_seq, st.target_applied_seq
            );
            let _ = writeln!(
                o,
                "  rates       {}/s raw, {}/s on the wire, compression {} ratio {:.2}, limit {}",
                human_bytes(st.raw_rate_bps as u64),
                human_bytes(st.wire_rate_bps as u64),
                p.compression,
                st.compression_ratio,
                p.bandwidth_bps
                    .map_or("unlimited".into(), |b| format!("{}/s", human_bytes(b)))
            );
            let _ = writeln!(
                o,
                "  totals      shipped {}, wire {}, reconnects {}",
                human_bytes(st.shipped_raw_bytes),
                human_bytes(st.wire_bytes),
                st.reconnects
            );
            if let Some(e) = &st.last_error {
                let _ = writeln!(o, "  last error  {e}");
            }
            for a in &p.alerts {
                let _ = writeln!(o, "  ALERT       {a}");
            }
        }
    }
    if let Some(t) = &doc.target {
        let _ = writeln!(
            o,
            "\ntarget: {} (pid {}), listening on {}, {} connections refused",
            doc.target_daemon.as_deref().unwrap_or("?"),
            t.pid,
            t.listen,
            t.refused
        );
        if let Some(r) = &t.last_refusal {
            let _ = writeln!(o, "  last refusal: {r}");
        }
        for v in &t.volumes {
            let _ = writeln!(o, "  volume {}: replica {}", v.name, v.replica);
            if let Some(s) = &v.status {
                let _ = writeln!(
                    o,
                    "    durable seq {}, applied seq {}, spool {}/{}{}, apply {}/s",
                    s.durable_seq,
                    s.applied_seq,
                    human_bytes(s.spool_bytes),
                    human_bytes(s.spool_budget),
                    if s.flow_controlled {
                        " FLOW CONTROLLED"
                    } else {
                        ""
                    },
                    human_bytes(s.apply_rate_bps as u64)
                );
            }
            if let Some(r) = &v.retention {
                let _ = writeln!(o, "    retention {}", retention_line(r));
            }
            for a in &v.alerts {
                let _ = writeln!(o, "    ALERT {a}");
            }
        }
    }
    o
}

/// `available 5.2 h of a 24.0 h policy, journal 1.2 GiB of 2.0 GiB`.
pub fn retention_line(r: &RetentionFigures) -> String {
    let h = |s: f64| format!("{:.1} h", s / 3600.0);
    let mut l = format!("available {}", h(r.available_window_secs));
    match r.policy_window_secs {
        Some(p) => l += &format!(" of a {} policy", h(p)),
        None => l += " (no time limit)",
    }
    l += &format!(", journal {}", human_bytes(r.journal_bytes));
    if let Some(m) = r.max_journal_bytes {
        l += &format!(" of {}", human_bytes(m));
    }
    if r.alert.is_some() {
        l += ": SHORTER THAN THE POLICY";
    }
    l
}

/// Default state directory of the target (for `cdpcli`).
pub fn default_target_state() -> PathBuf {
    PathBuf::from(DEFAULT_TARGET_STATE)
}
