//! Recovery operations on a target volume, shared by the target daemon (its
//! admin socket, see [`crate::target_admin`]) and the offline commands (run
//! on a journal directory while no target holds it): list the recovery
//! points, serve a virtual snapshot, materialize a point, fail over, re-protect.
//!
//! Every operation works on a [`SharedVolume`], the same handle the
//! replication engine applies through, so a snapshot served while the
//! target keeps applying reads a consistent point (design §7).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use filter_nbd::{Export, Server, ServerOptions, ShutdownHandle};
use journal::{JournalError, TargetVolume};
use replicator::pair::now_ns;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::listen::ListenAddr;
use crate::store::{
    FailoverMarker, SharedVolume, Volumes, ADOPT_IDENTITY, FAILED_OVER, NEEDS_SYNC,
};
use crate::vsnap::{self, format_time, Overlay, PointSpec, PointView, VsnapSource};

/// One bookmark as listed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BookmarkEntry {
    /// Name.
    pub name: String,
    /// Type (application, filesystem, user, ...).
    pub kind: String,
    /// Source time, ns since the epoch (UTC).
    pub time_ns: u64,
    /// Source time, RFC 3339 UTC.
    pub time: String,
    /// Sequence number of the bookmark in the change stream.
    pub seq: u64,
}

/// A range of source times every instant of which is a recovery point.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TimeRange {
    /// First recoverable time (ns).
    pub start_ns: u64,
    /// Last recoverable time (ns).
    pub end_ns: u64,
    /// RFC 3339 UTC.
    pub start: String,
    /// RFC 3339 UTC.
    pub end: String,
}

/// What `rewind recover list` shows: only fully applied points.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecoveryList {
    /// Volume name.
    pub volume: String,
    /// Volume size in bytes.
    pub size: u64,
    /// Latest point: highest applied sequence.
    pub latest_seq: u64,
    /// Latest point: source time of the last applied change (ns; 0 if none).
    pub latest_time_ns: u64,
    /// Latest point, RFC 3339 UTC (empty if nothing applied).
    pub latest_time: String,
    /// Whether the latest point is a state the source had (false inside a resync).
    pub latest_consistent: bool,
    /// Oldest available point: source time (ns).
    pub oldest_time_ns: u64,
    /// Oldest available point: sequence.
    pub oldest_seq: u64,
    /// Bookmarks that can be recovered now, oldest first.
    pub bookmarks: Vec<BookmarkEntry>,
    /// Consistent time ranges (any time inside can be recovered).
    pub time_ranges: Vec<TimeRange>,
    /// Set when the volume is failed over here (no point can be served).
    pub failed_over: Option<FailoverMarker>,
}

fn range(start_ns: u64, end_ns: u64) -> TimeRange {
    TimeRange {
        start_ns,
        end_ns,
        start: format_time(start_ns),
        end: format_time(end_ns),
    }
}

/// The recovery points of an open volume: latest, the bookmarks that can be
/// recovered now, and the consistent time ranges (all from the journal's index).
pub fn list(vol: &SharedVolume) -> Result<RecoveryList> {
    let failed_over = vol.failover_marker();
    let (rp, size) = vol
        .with(|v| Ok((v.recovery_points()?, v.identity().size)))
        .with_context(|| format!("volume {}", vol.name))?;
    Ok(RecoveryList {
        volume: vol.name.clone(),
        size,
        latest_seq: rp.latest.seq,
        latest_time_ns: rp.latest.source_time_ns,
        latest_time: if rp.latest.source_time_ns > 0 {
            format_time(rp.latest.source_time_ns)
        } else {
            String::new()
        },
        latest_consistent: rp.latest.consistent,
        oldest_time_ns: rp.oldest_time_ns,
        oldest_seq: rp.oldest_seq,
        bookmarks: rp
            .bookmarks
            .iter()
            .filter(|b| b.available)
            .map(|b| BookmarkEntry {
                name: b.bookmark.name.clone(),
                kind: vsnap::kind_name(b.bookmark.kind).to_string(),
                time_ns: b.bookmark.source_time_ns,
                time: format_time(b.bookmark.source_time_ns),
                seq: b.bookmark.seq,
            })
            .collect(),
        time_ranges: offered_ranges(&rp.consistent_ranges)
            .into_iter()
            .map(|(a, b)| range(a, b))
            .collect(),
        failed_over,
    })
}

/// The consistent ranges that are recovery points. A range starting at time
/// 0 begins with the replica as the target created it (before the first
/// change it received: empty, or stale, before the initial sync), which is
/// not a state of the source: it is not offered.
fn offered_ranges(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    ranges.iter().filter(|r| r.0 > 0).copied().collect()
}

/// Cross-checks the journal against the durable bookmark log: with nothing
/// left in the spool, every bookmark must lie within the applied journal. A
/// bookmark after its end means undo records were lost (e.g. a truncated
/// last segment taken for a torn tail): older points would then be served
/// without the undo data of the lost records, i.e. wrong, so they are refused.
fn journal_intact(v: &TargetVolume) -> std::result::Result<(), String> {
    if v.pending_chunks() > 0 {
        return Ok(());
    }
    let bms = v.bookmarks().map_err(|e| e.to_string())?;
    match bms.iter().find(|b| !b.applied) {
        Some(b) => Err(format!(
            "journal damaged: bookmark {:?} (seq {}) lies after the end of the undo journal (records lost: a truncated or removed segment?)",
            b.bookmark.name, b.bookmark.seq
        )),
        None => Ok(()),
    }
}

/// Opens a view of `vol` at `spec` (see [`PointView::open`]); refuses a
/// failed-over volume (its replica is in use) and times in the future.
pub fn open_view(vol: Arc<SharedVolume>, spec: &PointSpec) -> Result<PointView> {
    if let Some(m) = vol.failover_marker() {
        bail!(
            "volume {} is failed over at this target (point {}): its replica is in use and no point can be served; `rewind reprotect` protects it again",
            vol.name,
            m.point
        );
    }
    let now = now_ns();
    if let PointSpec::Time(t) | PointSpec::BookmarkBefore { time_ns: t, .. } = spec {
        if *t > now {
            bail!(
                "volume {}: {} is in the future (now {})",
                vol.name,
                format_time(*t),
                format_time(now)
            );
        }
    }
    if let PointSpec::Time(t) = spec {
        let rp = vol
            .with(|v| v.recovery_points())
            .with_context(|| format!("volume {}", vol.name))?;
        let offered = offered_ranges(&rp.consistent_ranges);
        match offered.first() {
            Some(&(a, _)) if *t < a => bail!(
                "volume {}: {} is before the retention window (oldest recoverable time {})",
                vol.name,
                format_time(*t),
                format_time(a)
            ),
            None => bail!(
                "volume {}: no time can be recovered yet (no consistent change applied)",
                vol.name
            ),
            _ => {}
        }
    }
    if !matches!(spec, PointSpec::Latest) {
        vol.with(|v| Ok(journal_intact(v)))?.map_err(|e| {
            anyhow::anyhow!("volume {}: {e}; only --latest can be served", vol.name)
        })?;
    }
    let view = PointView::open(vol.clone(), spec)?;
    if view.point().chunk_id == 0 && view.point().source_time_ns == 0 {
        bail!(
            "volume {}: {spec} resolves to the replica as the target created it, before any change it received: not a recovery point",
            vol.name
        );
    }
    Ok(view)
}

/// A virtual snapshot being served over NBD.
pub struct RunningSnapshot {
    uri: String,
    stop: ShutdownHandle,
    thread: Option<JoinHandle<Result<()>>>,
    source: Arc<VsnapSource>,
    socket: Option<PathBuf>,
}

/// Options of [`start_snapshot`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// Volume name.
    pub volume: String,
    /// The point.
    pub point: PointSpec,
    /// Where to serve: `unix:PATH` or `tcp:IP:PORT` (loopback).
    pub listen: String,
    /// Read-write with a private temporary overlay.
    pub rw: bool,
    /// Directory of the overlay file (default: the system's temporary directory).
    pub overlay_dir: Option<PathBuf>,
}

/// Serves `req.volume` at `req.point` over NBD (export name = the volume
/// name) in a background thread; returns when the socket accepts
/// connections. The replica and the journal are only read.
pub fn start_snapshot(vol: Arc<SharedVolume>, req: &SnapshotRequest) -> Result<RunningSnapshot> {
    let listen: ListenAddr = req
        .listen
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--listen: {e}"))?;
    let view = open_view(vol, &req.point)?;
    let overlay = if req.rw {
        let dir = req.overlay_dir.clone().unwrap_or_else(std::env::temp_dir);
        Some(Overlay::create(&dir, view.size())?)
    } else {
        None
    };
    let source = Arc::new(VsnapSource::new(view, overlay));
    let export = Export::new(
        req.volume.clone(),
        source.clone() as Arc<dyn filter_nbd::BlockSource>,
    )
    .with_description(format!(
        "rewind snapshot of {} at {}",
        req.volume, req.point
    ))
    .with_read_only(!req.rw);
    let server = Server::new(
        vec![export],
        ServerOptions {
            io_uring: false,
            ..ServerOptions::default()
        },
    )
    .context("creating the NBD server")?;
    let stop = server.shutdown_handle();
    let (uri, socket, thread) = match &listen {
        ListenAddr::Unix(path) => {
            let l = crate::export::bind_unix(path)?;
            let uri = format!("nbd+unix:///{}?socket={}", req.volume, path.display());
            let p = path.clone();
            let t = std::thread::Builder::new()
                .name("rewind-vsnap".into())
                .spawn(move || {
                    let r = server.serve_unix_listener(l);
                    let _ = std::fs::remove_file(&p);
                    r.context("serving the snapshot")
                })?;
            (uri, Some(path.clone()), t)
        }
        ListenAddr::Tcp(addr) => {
            if !addr.ip().is_loopback() {
                bail!("--listen {addr}: snapshots are served on loopback or unix sockets only");
            }
            let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            let a = l.local_addr()?;
            let uri = format!("nbd://{a}/{}", req.volume);
            let t = std::thread::Builder::new()
                .name("rewind-vsnap".into())
                .spawn(move || server.serve_tcp_listener(l).context("serving the snapshot"))?;
            (uri, None, t)
        }
    };
    info!(volume = %req.volume, point = %req.point, rw = req.rw, %uri, "snapshot served");
    Ok(RunningSnapshot {
        uri,
        stop,
        thread: Some(thread),
        source,
        socket,
    })
}

/// What a stopped snapshot reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotStopped {
    /// Blocks (4 KiB) written to the overlay (0 for read-only).
    pub overlay_blocks_written: u64,
}

impl RunningSnapshot {
    /// The NBD URI clients connect to.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Stops serving (open connections are closed) and discards the overlay.
    pub fn stop(mut self) -> Result<SnapshotStopped> {
        self.stop.shutdown();
        let r = match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("snapshot server panicked"))),
            None => Ok(()),
        };
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
        let written = self.source.overlay().map_or(0, |o| o.blocks_written());
        info!(uri = %self.uri, overlay_blocks_written = written, "snapshot stopped");
        r?;
        Ok(SnapshotStopped {
            overlay_blocks_written: written,
        })
    }
}

impl Drop for RunningSnapshot {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.shutdown();
            let _ = t.join();
        }
    }
}

/// What `rewind failover` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverReport {
    /// Volume.
    pub volume: String,
    /// The point rolled back to, as asked.
    pub point: String,
    /// Source time of the point (RFC 3339 UTC).
    pub point_time: String,
    /// Sequence number of the point.
    pub point_seq: u64,
    /// Spooled changes after the point that were discarded.
    pub discarded_chunks: u64,
    /// The replica now handed over (file or device).
    pub replica: PathBuf,
    /// Undo records applied to the replica by the rollback.
    pub records_undone: u64,
    /// blake3 of the replica after the rollback (hex).
    pub blake3: String,
}

fn hash_replica(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(h.finalize().to_hex().to_string())
}

/// Fails `vol` over to `spec`: fences it (replication refused, persisted
/// first), rolls the replica back to the point with the journal's crash-safe
/// rollback (for `--latest`, everything acknowledged is applied first;
/// otherwise spooled changes after the point are discarded), and hands the
/// replica over. A failure before the rollback started removes the fence.
pub fn failover(vol: &SharedVolume, spec: &PointSpec) -> Result<FailoverReport> {
    if let Some(m) = vol.failover_marker() {
        bail!(
            "volume {} is already failed over (point {}); `rewind reprotect` first",
            vol.name,
            m.point
        );
    }
    if vol.live_views() > 0 {
        bail!(
            "volume {}: {} snapshot(s) are being served; stop them before a failover",
            vol.name,
            vol.live_views()
        );
    }
    let rp = spec.to_recovery_point()?;
    // Check the point before fencing, so a bad point changes nothing.
    let p = vol
        .with(|v| v.resolve(&rp))
        .with_context(|| format!("volume {}: {spec}", vol.name))?;
    if !p.consistent {
        bail!(
            "volume {}: {spec} is inside a resync (not a state the source ever had)",
            vol.name
        );
    }
    let replica = vol.with(|v| Ok(v.replica_path().to_path_buf()))?;
    vol.fence(&FailoverMarker {
        point: spec.to_string(),
        at_ns: now_ns(),
        replica: replica.display().to_string(),
    })
    .with_context(|| format!("writing {}", vol.dir.join(FAILED_OVER).display()))?;
    warn!(volume = %vol.name, point = %spec, "failover: replication of this volume is refused from now on");
    let latest = matches!(spec, PointSpec::Latest);
    let r = vol.with(|v| {
        if latest {
            v.apply_all()?;
        }
        v.rollback_to(&rp, true)
    });
    let rep = match r {
        Ok(r) => r,
        Err(e) => {
            // The rollback is crash-safe: an interrupted one is finished by the
            // next open, so the fence stays (the replica may be partly rolled back).
            return Err(anyhow::Error::new(e).context(format!(
                "rolling back {} to {spec} (the volume stays fenced; retry the failover after fixing the cause)",
                vol.name
            )));
        }
    };
    let blake3 = hash_replica(&replica)?;
    info!(volume = %vol.name, point = %spec, replica = %replica.display(), undone = rep.undone_records, "failover done: replica handed over");
    Ok(FailoverReport {
        volume: vol.name.clone(),
        point: spec.to_string(),
        point_time: format_time(rep.point.source_time_ns),
        point_seq: rep.point.seq,
        replica,
        records_undone: rep.undone_records,
        discarded_chunks: rep.discarded_chunks,
        blake3,
    })
}

/// What `rewind reprotect` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReprotectReport {
    /// Volume.
    pub volume: String,
    /// The replica kept for the checksum resync.
    pub replica: PathBuf,
}

/// Protects a failed-over volume again: discards its journal and spool (the
/// replica diverged, so their points are void), keeps the replica, and asks
/// the next source connection for a checksum resync so only differing
/// blocks travel. That source may bring a new identity (a fresh change log,
/// as after a failback): it is adopted once ([`ADOPT_IDENTITY`]). Without `force`, refuses a volume that is not failed over.
pub fn reprotect(volumes: &Volumes, name: &str, force: bool) -> Result<ReprotectReport> {
    let vol = volumes.get(name)?;
    if vol.live_views() > 0 {
        bail!("volume {name}: snapshots are being served; stop them first");
    }
    if vol.failover_marker().is_none() && !force {
        bail!("volume {name} is not failed over; --force discards its journal and resyncs anyway");
    }
    let replica = vol.with(|v| Ok(v.replica_path().to_path_buf()))?;
    vol.reopen_with(|dir| {
        let id = TargetVolume::open(dir)?.identity().clone();
        drop(TargetVolume::reseed(
            dir,
            id,
            journal::TargetOptions::default(),
        )?);
        let io = |what: &str, p: &Path| {
            let p = p.to_path_buf();
            let what = what.to_string();
            move |e| JournalError::Io {
                context: format!("{what} {}", p.display()),
                source: e,
            }
        };
        std::fs::write(dir.join(NEEDS_SYNC), b"").map_err(io("write", &dir.join(NEEDS_SYNC)))?;
        std::fs::write(dir.join(ADOPT_IDENTITY), b"")
            .map_err(io("write", &dir.join(ADOPT_IDENTITY)))?;
        match std::fs::remove_file(dir.join(FAILED_OVER)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io("remove", &dir.join(FAILED_OVER))(e))
            }
            _ => {}
        }
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync", dir))?;
        Ok(())
    })
    .with_context(|| format!("re-seeding volume {name}"))?;
    vol.bump_epoch();
    info!(volume = %name, "re-protected: journal discarded, the next source connection resyncs by checksum");
    Ok(ReprotectReport {
        volume: name.to_string(),
        replica,
    })
}

/// One journal segment (data file) in the summary.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataFile {
    /// Segment index (file `journal/<16 hex>.seg`).
    pub index: u64,
    /// File length in bytes.
    pub bytes: u64,
    /// Undo records in it.
    pub undo_records: u64,
    /// Source time of its first and last record (RFC 3339 UTC; empty if none).
    pub first_time: String,
    /// See `first_time`.
    pub last_time: String,
    /// No more appends.
    pub sealed: bool,
}

/// The retention summary of `cdpcli --showsummary` (field names as admins
/// of the seed product know them; `--json` prints this document).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SummaryDoc {
    /// Target volume name.
    #[serde(rename = "Target Volume Name")]
    pub volume: String,
    /// Path of the catalogue database.
    #[serde(rename = "Database")]
    pub database: String,
    /// Catalogue schema version.
    #[serde(rename = "Version")]
    pub version: i64,
    /// rewind release that wrote this summary.
    #[serde(rename = "Revision")]
    pub revision: String,
    /// Kind of retention log.
    #[serde(rename = "Log Type")]
    pub log_type: String,
    /// Bytes the retention uses on disk (journal + spool + catalogue + bookmark log).
    #[serde(rename = "Disk Space (app)")]
    pub disk_space: u64,
    /// Free bytes on the filesystem of the journal.
    #[serde(rename = "Free Space")]
    pub free_space: u64,
    /// Number of journal segments.
    #[serde(rename = "Total Data Files")]
    pub total_data_files: usize,
    /// Recovery time range (UTC), "START to END".
    #[serde(rename = "Recovery Time Range(GMT)")]
    pub recovery_time_range: String,
    /// Bookmarks recorded / available now.
    #[serde(rename = "Bookmarks")]
    pub bookmarks: String,
    /// Range as ns.
    pub recovery_time_range_ns: (u64, u64),
    /// Consistent sub-ranges (UTC).
    pub consistent_ranges: Vec<TimeRange>,
    /// Journal bytes.
    pub journal_bytes: u64,
    /// Spool bytes.
    pub spool_bytes: u64,
    /// The segments.
    pub data_files: Vec<DataFile>,
    /// The window actually available, seconds.
    pub available_window_secs: f64,
    /// Retention alert (window shorter than the policy promises, or over the space limit).
    pub retention_alert: Option<String>,
    /// Set when the volume is failed over here.
    pub failed_over: Option<FailoverMarker>,
}

fn t_or_empty(ns: u64) -> String {
    if ns == 0 {
        String::new()
    } else {
        format_time(ns)
    }
}

/// The retention summary of an open volume.
pub fn summary(vol: &SharedVolume) -> Result<SummaryDoc> {
    let s = vol
        .with(|v| v.summary())
        .with_context(|| format!("volume {}", vol.name))?;
    let b = s.recovery_time_range.1;
    let offered = offered_ranges(&s.consistent_ranges);
    let a = offered.first().map_or(b, |r| r.0);
    Ok(SummaryDoc {
        volume: vol.name.clone(),
        database: s.database_path.display().to_string(),
        version: s.catalogue_version,
        revision: env!("CARGO_PKG_VERSION").to_string(),
        log_type: format!("Roll-Backward ({})", s.log_type),
        disk_space: s.disk_used_bytes,
        free_space: s.disk_free_bytes,
        total_data_files: s.data_files.len(),
        recovery_time_range: if offered.is_empty() {
            "none (no consistent change applied yet)".into()
        } else {
            format!("{} to {}", format_time(a), format_time(b))
        },
        bookmarks: format!("{} recorded, {} available", s.bookmarks.0, s.bookmarks.1),
        recovery_time_range_ns: (a, b),
        consistent_ranges: offered.iter().map(|&(a, b)| range(a, b)).collect(),
        journal_bytes: s.journal_bytes,
        spool_bytes: s.spool_bytes,
        data_files: s
            .data_files
            .iter()
            .map(|d| DataFile {
                index: d.index,
                bytes: d.bytes,
                undo_records: d.undo_records,
                first_time: t_or_empty(d.first_time_ns),
                last_time: t_or_empty(d.last_time_ns),
                sealed: d.sealed,
            })
            .collect(),
        available_window_secs: s.retention.available_window_ns as f64 / 1e9,
        retention_alert: s.retention.alert_reason.clone(),
        failed_over: vol.failover_marker(),
    })
}
