//! The target's storage: [`replicator::target::TargetStore`] implemented over
//! [`journal::TargetVolume`] (tools is the only crate that depends on both),
//! and the [`StoreProvider`] that opens or creates one per volume.
//!
//! A replica created here has never been synchronised: a marker file
//! (`<journal_dir>/needs-initial-sync`) is written with it, so the target
//! asks the source for a full resync (`NewReplica`) until the source starts
//! one. Restarts of either side never recreate it, so a restart never causes
//! a full resync.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use journal::{
    Bookmark, BookmarkKind, BookmarkOutcome, ChunkExtent, ChunkIn, Counters, ExtentData,
    JournalError, TargetVolume, VolumeIdentity,
};
use replicator::handshake::Refusal;
use replicator::target::{
    ApplyReport, ConcurrentApply, StoreChunk, StoreData, StoreError, StoreIdentity, StoreProvider,
    TargetStore,
};
use replicator::wire::{ErrorCode, Hello, ResyncReason, Tag, TagKind};
use tracing::{debug, info, warn};

/// Marker of a replica that was never completely synchronised.
pub const NEEDS_SYNC: &str = "needs-initial-sync";
/// Count of checksum-resync passes the sources started (from offset 0), kept
/// across restarts so an admin (and the tests) can see a full resync happened.
pub const RESYNC_PASSES: &str = "resync-passes";

/// Resync passes started on the volume whose journal is in `dir`.
pub fn resync_passes(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join(RESYNC_PASSES))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Journal counters of every open volume, for the status file.
pub type CounterBoard = Arc<Mutex<HashMap<String, Counters>>>;

/// Marker of a volume failed over at this target (`rewind failover`): while
/// it exists the target refuses replication for the volume and never writes
/// its replica (the replica belongs to whoever uses it after the failover).
/// Holds a JSON [`FailoverMarker`]. Removed by `rewind reprotect`.
pub const FAILED_OVER: &str = "failed-over";

/// Marker written by `rewind reprotect`: the next source may bring a new
/// volume identity (a fresh change log after a failback); it is adopted
/// (journal re-seeded with it) instead of refused as a split brain. Removed
/// at that first contact.
pub const ADOPT_IDENTITY: &str = "adopt-identity";

/// Contents of the [`FAILED_OVER`] marker.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FailoverMarker {
    /// The recovery point the replica was rolled back to, as the admin gave it.
    pub point: String,
    /// When the failover happened (ns since the epoch).
    pub at_ns: u64,
    /// The replica handed over.
    pub replica: String,
}

/// One volume's [`TargetVolume`] shared by the replication engine (through
/// [`JournalStore`]) and the recovery commands of the same process (the admin
/// socket: snapshots, failover). Every access holds its mutex for one call,
/// so an NBD read of a snapshot waits for at most one apply step.
///
/// Two locks, always taken in this order: the *apply gate*, held by an apply
/// step from start to commit ([`SharedVolume::apply_step`]) and by every
/// [`SharedVolume::with`] call, and the volume lock. An apply step holds the
/// volume lock only to take its job out and to commit it, not during its
/// I/O, so spooling and counters ([`SharedVolume::with_concurrent`]) go on
/// while it runs; everything else waits for the step as before.
pub struct SharedVolume {
    /// Volume name.
    pub name: String,
    /// Journal directory.
    pub dir: PathBuf,
    gate: Mutex<()>,
    vol: Mutex<Option<TargetVolume>>,
    opts: journal::TargetOptions,
    retention: Option<journal::RetentionPolicy>,
    failed: AtomicBool,
    fenced: AtomicBool,
    epoch: AtomicU64,
    views: AtomicU64,
}

impl SharedVolume {
    /// Wraps an open volume.
    pub fn new(
        vol: TargetVolume,
        dir: PathBuf,
        opts: journal::TargetOptions,
        retention: Option<journal::RetentionPolicy>,
    ) -> Self {
        let fenced = dir.join(FAILED_OVER).exists();
        SharedVolume {
            name: vol.identity().name.clone(),
            dir,
            gate: Mutex::new(()),
            vol: Mutex::new(Some(vol)),
            opts,
            retention,
            failed: AtomicBool::new(false),
            fenced: AtomicBool::new(fenced),
            epoch: AtomicU64::new(0),
            views: AtomicU64::new(0),
        }
    }

    fn guard(&self) -> MutexGuard<'_, Option<TargetVolume>> {
        self.vol.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn gate(&self) -> MutexGuard<'_, ()> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the volume under its lock, after any apply step in
    /// progress has committed (the volume is never busy inside `f`). A
    /// failure other than a refusal of the input marks the handle for
    /// reopening ([`SharedVolume::reopen`]).
    pub fn with<R>(
        &self,
        f: impl FnOnce(&mut TargetVolume) -> Result<R, JournalError>,
    ) -> Result<R, JournalError> {
        let _gate = self.gate();
        self.with_concurrent(f)
    }

    /// [`SharedVolume::with`] without waiting for an apply step in progress:
    /// for spooling and reading counters. Inside `f` the volume may be busy
    /// ([`TargetVolume::apply_busy`]): apply, rollback, prune and resize
    /// return [`JournalError::Busy`] then, so use [`SharedVolume::with`] for them.
    pub fn with_concurrent<R>(
        &self,
        f: impl FnOnce(&mut TargetVolume) -> Result<R, JournalError>,
    ) -> Result<R, JournalError> {
        let mut g = self.guard();
        let Some(v) = g.as_mut() else {
            return Err(JournalError::Poisoned);
        };
        let r = f(v);
        if let Err(e) = &r {
            if !matches!(
                e,
                JournalError::SpoolFull { .. }
                    | JournalError::LowSpace { .. }
                    | JournalError::InvalidChunk(_)
                    | JournalError::OutOfRange { .. }
                    | JournalError::Invalid(_)
                    | JournalError::PointNotAvailable(_)
                    | JournalError::UnknownBookmark(_)
                    | JournalError::BeforeWindow { .. }
                    | JournalError::InFuture { .. }
                    | JournalError::Inconsistent(_)
                    | JournalError::Busy(_)
            ) {
                self.failed.store(true, Ordering::SeqCst);
            }
        }
        r
    }

    /// One apply step (`TargetVolume::apply_begin`, `ApplyJob::prepare`,
    /// `apply_place`, `ApplyJob::run`, `apply_finish`) whose I/O runs
    /// without the volume lock. `Ok(None)` when
    /// nothing is pending or the volume is failed over (checked under the
    /// volume lock: a failover fences before it takes the locks, so no step
    /// starts after its rollback).
    pub fn apply_step(&self) -> Result<Option<journal::Applied>, JournalError> {
        let _gate = self.gate();
        let job = self.with_concurrent(|v| {
            if self.fenced() {
                Ok(None)
            } else {
                v.apply_begin()
            }
        })?;
        let Some(mut job) = job else {
            return Ok(None);
        };
        // Reading the old data and writing the journal and the replica run
        // without the volume lock; placing the records (which may rotate the
        // journal segment) and the commit take it briefly.
        let mut r = job.prepare();
        if r.is_ok() {
            r = self.with_concurrent(|v| v.apply_place(&mut job));
        }
        if r.is_ok() {
            r = job.run();
        }
        self.with_concurrent(|v| v.apply_finish(job, r)).map(Some)
    }

    /// Whether an earlier call failed (the handle must be reopened).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Drops the handle (releasing the directory lock), runs `between` on the
    /// unlocked directory, then opens it again (which runs journal recovery).
    pub fn reopen_with<R>(
        &self,
        between: impl FnOnce(&Path) -> Result<R, JournalError>,
    ) -> Result<R, JournalError> {
        let _gate = self.gate();
        let mut g = self.guard();
        *g = None;
        let r = between(&self.dir);
        let mut v = TargetVolume::open_with(&self.dir, self.opts.clone())?;
        v.set_retention(self.retention.clone());
        *g = Some(v);
        self.failed.store(false, Ordering::SeqCst);
        self.fenced
            .store(self.dir.join(FAILED_OVER).exists(), Ordering::SeqCst);
        r
    }

    /// Reopens a failed handle.
    pub fn reopen(&self) -> Result<(), JournalError> {
        self.reopen_with(|_| Ok(()))
    }

    /// Changes when the volume is failed over or re-seeded: a replication
    /// store made before refuses further frames, so the source reconnects
    /// and hears the new state (refusal, or the resync request) in `Welcome`.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Whether a retention policy applies to the volume.
    pub fn has_retention(&self) -> bool {
        self.retention.is_some()
    }

    /// Snapshot views open on the volume in this process.
    pub fn live_views(&self) -> u64 {
        self.views.load(Ordering::SeqCst)
    }

    /// Counts a view opened ([`crate::vsnap::PointView`]).
    pub fn view_opened(&self) {
        self.views.fetch_add(1, Ordering::SeqCst);
    }

    /// Counts a view closed.
    pub fn view_closed(&self) {
        self.views.fetch_sub(1, Ordering::SeqCst);
    }

    /// Starts a new epoch (see [`SharedVolume::epoch`]).
    pub fn bump_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether the volume is failed over here (replication refused, replica not written).
    pub fn fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Marks the volume failed over (persisted first, so a restart keeps it).
    pub fn fence(&self, marker: &FailoverMarker) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{FAILED_OVER}.tmp"));
        let body = serde_json::to_vec_pretty(marker).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, body)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, self.dir.join(FAILED_OVER))?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.fenced.store(true, Ordering::SeqCst);
        self.bump_epoch();
        Ok(())
    }

    /// The failover marker, if the volume is failed over.
    pub fn failover_marker(&self) -> Option<FailoverMarker> {
        read_failover_marker(&self.dir)
    }
}

/// Reads the [`FAILED_OVER`] marker of the journal in `dir`.
pub fn read_failover_marker(dir: &Path) -> Option<FailoverMarker> {
    let b = std::fs::read(dir.join(FAILED_OVER)).ok()?;
    Some(serde_json::from_slice(&b).unwrap_or(FailoverMarker {
        point: "(unreadable marker)".into(),
        at_ns: 0,
        replica: String::new(),
    }))
}

/// One volume's journal behind the replication engine.
pub struct JournalStore {
    vol: Arc<SharedVolume>,
    epoch: u64,
    name: String,
    dir: PathBuf,
    board: CounterBoard,
    /// Applied by direct apply inside `spool`, not yet reported.
    applied_in_spool: Option<journal::Applied>,
    /// The engine's last [`TargetStore::set_incoming_backlog`].
    incoming_backlog: bool,
}

impl JournalStore {
    /// Wraps a shared volume.
    pub fn new(vol: Arc<SharedVolume>, board: CounterBoard) -> Self {
        let s = JournalStore {
            epoch: vol.epoch(),
            name: vol.name.clone(),
            dir: vol.dir.clone(),
            vol,
            board,
            applied_in_spool: None,
            incoming_backlog: false,
        };
        s.publish();
        s
    }

    fn publish(&self) {
        publish(&self.vol, &self.board, &self.name);
    }

    fn fence_check(&self) -> Result<(), StoreError> {
        if self.vol.epoch() != self.epoch {
            return Err(StoreError::Failed(format!(
                "volume {:?} was failed over or re-seeded at this target: reconnect",
                self.name
            )));
        }
        if self.vol.fenced() {
            return Err(StoreError::Failed(format!(
                "volume {:?} is failed over at this target: replication refused until `rewind reprotect`",
                self.name
            )));
        }
        Ok(())
    }

    fn get<R>(&self, f: impl FnOnce(&TargetVolume) -> R, default: R) -> R {
        self.vol.with_concurrent(|v| Ok(f(v))).unwrap_or(default)
    }
}

fn publish(vol: &SharedVolume, board: &CounterBoard, name: &str) {
    if let Ok(c) = vol.with_concurrent(|v| Ok(v.counters())) {
        if let Ok(mut b) = board.lock() {
            b.insert(name.to_string(), c);
        }
    }
}

/// The journal store's [`ConcurrentApply`] handle: apply steps whose I/O
/// runs while the connection thread spools and acknowledges.
struct JournalApplier {
    vol: Arc<SharedVolume>,
    board: CounterBoard,
    name: String,
}

impl ConcurrentApply for JournalApplier {
    fn apply_some(&self) -> Result<Option<ApplyReport>, StoreError> {
        let r = self.vol.apply_step().map_err(store_err);
        publish(&self.vol, &self.board, &self.name);
        Ok(r?.map(report))
    }
}

fn report(a: journal::Applied) -> ApplyReport {
    ApplyReport {
        chunks: a.chunks,
        bytes: a.bytes,
        applied_seq: a.applied_seq,
        last_source_time_ns: a.last_source_time_ns,
    }
}

fn store_err(e: JournalError) -> StoreError {
    if e.is_no_space() {
        return StoreError::NoSpace(e.to_string());
    }
    match e {
        JournalError::SpoolFull { .. } => StoreError::SpoolFull,
        JournalError::LowSpace { .. } => StoreError::LowSpace(e.to_string()),
        JournalError::InvalidChunk(m) => StoreError::Invalid(m),
        JournalError::OutOfRange { .. } | JournalError::Invalid(_) => {
            StoreError::Invalid(e.to_string())
        }
        other => StoreError::Failed(other.to_string()),
    }
}

fn to_chunk(c: &StoreChunk) -> ChunkIn {
    ChunkIn {
        first_seq: c.first_seq,
        last_seq: c.last_seq,
        source_time_ns: c.source_time_ns,
        horizon_seq: c.horizon_seq,
        extents: c
            .extents
            .iter()
            .map(|e| ChunkExtent {
                offset: e.offset,
                data: match &e.data {
                    StoreData::Data(d) => ExtentData::Data(d.clone()),
                    StoreData::Zero(n) => ExtentData::Zero(*n),
                },
            })
            .collect(),
    }
}

impl TargetStore for JournalStore {
    fn identity(&self) -> StoreIdentity {
        let id = self.get(|v| Some(v.identity().clone()), None::<VolumeIdentity>);
        match id {
            Some(id) => StoreIdentity {
                name: id.name,
                uuid: id.uuid,
                generation: id.generation,
                size: id.size,
                block_size: id.block_size,
            },
            None => StoreIdentity {
                name: self.name.clone(),
                uuid: [0; 16],
                generation: u64::MAX,
                size: 0,
                block_size: 0,
            },
        }
    }

    fn durable_seq(&self) -> u64 {
        self.get(|v| v.durable_seq(), 0)
    }

    fn applied_seq(&self) -> u64 {
        self.get(|v| v.applied_seq(), 0)
    }

    fn spool_bytes(&self) -> u64 {
        self.get(|v| v.spool_bytes(), 0)
    }

    fn spool_budget(&self) -> u64 {
        self.get(|v| v.spool_budget(), 0)
    }

    fn spool(&mut self, chunks: &[StoreChunk]) -> Result<u64, StoreError> {
        let owned: Vec<ChunkIn> = chunks.iter().map(to_chunk).collect();
        // The fence is checked under the volume lock (a failover fences, then locks).
        let mut refused = None;
        let mut direct = None;
        // Without waiting for an apply step in progress (see `SharedVolume`).
        let r = self
            .vol
            .with_concurrent(|v| {
                if let Err(e) = self.fence_check() {
                    refused = Some(e);
                    return Ok(0);
                }
                v.set_incoming_backlog(self.incoming_backlog);
                let r = v.spool_many_owned(owned);
                // Counted even if the call failed after applying some chunks.
                direct = v.take_direct_applied();
                r?;
                Ok(v.durable_seq())
            })
            .map_err(store_err);
        if let Some(a) = direct {
            journal::Applied::accumulate(&mut self.applied_in_spool, a);
        }
        if let Some(e) = refused {
            return Err(e);
        }
        self.publish();
        let d = r?;
        crate::iopattern::record_chunks(&self.name, chunks);
        Ok(d)
    }

    fn set_incoming_backlog(&mut self, backlog: bool) {
        self.incoming_backlog = backlog;
    }

    fn take_applied_in_spool(&mut self) -> Option<ApplyReport> {
        self.applied_in_spool.take().map(report)
    }

    fn apply_some(&mut self) -> Result<Option<ApplyReport>, StoreError> {
        let r = self.vol.apply_step().map_err(store_err);
        self.publish();
        Ok(r?.map(report))
    }

    fn concurrent_apply(&self) -> Option<Arc<dyn ConcurrentApply>> {
        Some(Arc::new(JournalApplier {
            vol: self.vol.clone(),
            board: self.board.clone(),
            name: self.name.clone(),
        }))
    }

    fn block_hashes(
        &mut self,
        offset: u64,
        len: u64,
        hash_block: u64,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        self.fence_check()?;
        let r = self
            .vol
            .with(|v| v.block_hashes(offset, len, hash_block))
            .map_err(store_err);
        self.publish();
        r
    }

    fn resize(&mut self, new_size: u64) -> Result<(), StoreError> {
        self.fence_check()?;
        let r = self.vol.with(|v| v.resize(new_size)).map_err(store_err);
        self.publish();
        r
    }

    fn tag(&mut self, tag: &Tag) -> Result<(), StoreError> {
        self.fence_check()?;
        let kind = match tag.kind {
            TagKind::App => BookmarkKind::App,
            TagKind::Fs => BookmarkKind::Fs,
            TagKind::User => BookmarkKind::User,
        };
        let b = Bookmark {
            name: tag.name.clone(),
            kind,
            uuid: tag.uuid,
            seq: tag.seq,
            source_time_ns: tag.source_time_ns,
        };
        // Durable (fdatasync'ed) before Ok, so before the engine acknowledges the tag.
        let r = self.vol.with(|v| v.record_bookmark(b)).map_err(store_err);
        self.publish();
        match r? {
            BookmarkOutcome::Recorded => {
                info!(volume = %self.name, seq = tag.seq, name = %tag.name, "bookmark recorded")
            }
            BookmarkOutcome::Duplicate => {
                debug!(volume = %self.name, seq = tag.seq, name = %tag.name, "bookmark already recorded")
            }
        }
        Ok(())
    }

    fn resync_reason(&self) -> Option<ResyncReason> {
        self.dir
            .join(NEEDS_SYNC)
            .exists()
            .then_some(ResyncReason::NewReplica)
    }

    /// Reopens a failed volume (journal crash recovery) unless another user
    /// of the [`SharedVolume`] did already. While the disk is still full the
    /// open fails with [`StoreError::NoSpace`] and the engine retries.
    fn recover(&mut self) -> Result<bool, StoreError> {
        if self.fence_check().is_err() {
            // Failed over or re-seeded: only a new connection (through the
            // provider) may bring it back, and hears why.
            return Ok(false);
        }
        if self.vol.failed() {
            warn!(volume = %self.name, "reopening the failed target volume (journal recovery)");
            self.vol.reopen().map_err(store_err)?;
            info!(volume = %self.name, "target volume reopened");
        }
        self.publish();
        Ok(true)
    }

    fn resync_started(&mut self) {
        let n = resync_passes(&self.dir) + 1;
        let tmp = self.dir.join(format!(".{RESYNC_PASSES}.tmp"));
        if let Err(e) = std::fs::write(&tmp, format!("{n}\n"))
            .and_then(|_| std::fs::rename(&tmp, self.dir.join(RESYNC_PASSES)))
        {
            warn!(volume = %self.name, error = %e, "cannot record the resync pass");
        }
        warn!(volume = %self.name, pass = n, "checksum resync pass started by the source");
        let m = self.dir.join(NEEDS_SYNC);
        if m.exists() {
            if let Err(e) = std::fs::remove_file(&m) {
                warn!(volume = %self.name, error = %e, "cannot remove {}", m.display());
            } else {
                info!(volume = %self.name, "initial synchronisation started by the source");
            }
        }
    }
}

/// Where a volume lives at the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePlace {
    /// Replica file or device.
    pub replica: PathBuf,
    /// Journal directory.
    pub journal_dir: PathBuf,
    /// Spool budget (bytes), `None` for the journal's default.
    pub spool_budget: Option<u64>,
    /// Compression of the undo journal's old data (`None`: the default,
    /// lz4). Applies to records written from the next open on;
    /// every record says how it is encoded, so changing it is always safe.
    pub undo_compression: Option<journal::UndoCompression>,
    /// Apply in place of spooling while nothing is pending (`None`: the
    /// default, [`DEFAULT_DIRECT_APPLY`]); see `journal::TargetOptions::direct_apply`.
    pub direct_apply: Option<bool>,
    /// Retention policy (`None`: keep everything).
    pub retention: Option<journal::RetentionPolicy>,
}

/// How the provider finds volumes.
#[derive(Debug, Clone)]
pub enum Layout {
    /// Only the configured volumes (target.toml); `auto_create` makes their
    /// journals on first contact.
    Configured {
        /// Volumes by name.
        volumes: HashMap<String, VolumePlace>,
        /// Create missing journals.
        auto_create: bool,
    },
    /// Every volume under one directory: `DIR/<name>/replica.img` and
    /// `DIR/<name>/journal` (created on first contact).
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Spool budget of every volume.
        spool_budget: Option<u64>,
        /// Undo compression of every volume (`None`: the default).
        undo_compression: Option<journal::UndoCompression>,
        /// Direct apply of every volume (`None`: the default).
        direct_apply: Option<bool>,
        /// Retention policy of every volume.
        retention: Option<journal::RetentionPolicy>,
    },
}

impl Layout {
    /// Where `name` lives, and whether it may be created.
    pub fn place(&self, name: &str) -> Option<(VolumePlace, bool)> {
        match self {
            Layout::Configured {
                volumes,
                auto_create,
            } => volumes.get(name).map(|p| (p.clone(), *auto_create)),
            Layout::Dir {
                dir,
                spool_budget,
                undo_compression,
                direct_apply,
                retention,
            } => {
                crate::config::check_name(name).ok()?;
                let d = dir.join(name);
                Some((
                    VolumePlace {
                        replica: d.join("replica.img"),
                        journal_dir: d.join("journal"),
                        spool_budget: *spool_budget,
                        undo_compression: *undo_compression,
                        direct_apply: *direct_apply,
                        retention: retention.clone(),
                    },
                    true,
                ))
            }
        }
    }

    /// Journal directories of the volumes known without any source having
    /// connected (for `cdpcli --listtargetvolumes`).
    pub fn known(&self) -> Vec<(String, VolumePlace)> {
        match self {
            Layout::Configured { volumes, .. } => {
                let mut v: Vec<_> = volumes
                    .iter()
                    .map(|(k, p)| (k.clone(), p.clone()))
                    .collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            }
            Layout::Dir { dir, .. } => {
                let mut v = Vec::new();
                if let Ok(rd) = std::fs::read_dir(dir) {
                    for e in rd.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if let Some((p, _)) = self.place(&name) {
                            if p.journal_dir.join("identity").exists() {
                                v.push((name, p));
                            }
                        }
                    }
                }
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            }
        }
    }
}

/// The volumes of one target process, opened on demand and shared between
/// the replication engine and the recovery commands (admin socket). At most
/// one [`TargetVolume`] per journal directory exists in the process (the
/// journal's directory lock enforces it across processes).
pub struct Volumes {
    layout: Layout,
    open: Mutex<HashMap<String, Arc<SharedVolume>>>,
}

impl Volumes {
    /// No volume open yet.
    pub fn new(layout: Layout) -> Self {
        Volumes {
            layout,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Where volumes live.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<SharedVolume>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The volume `name` if it is open already (never opens a journal).
    pub fn if_open(&self, name: &str) -> Option<Arc<SharedVolume>> {
        self.map().get(name).cloned()
    }

    /// The open volume `name`, opening an existing journal if needed (never creates one).
    pub fn get(&self, name: &str) -> anyhow::Result<Arc<SharedVolume>> {
        let mut m = self.map();
        if let Some(v) = m.get(name) {
            if v.failed() {
                v.reopen()
                    .map_err(|e| anyhow::anyhow!("reopening volume {name:?}: {e}"))?;
            }
            return Ok(v.clone());
        }
        let Some((place, _)) = self.layout.place(name) else {
            let known: Vec<String> = self.layout.known().into_iter().map(|k| k.0).collect();
            anyhow::bail!(
                "no volume {name:?} at this target (known: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
        };
        if !place.journal_dir.join("identity").exists() {
            anyhow::bail!(
                "volume {name:?} has no journal in {} (never replicated here)",
                place.journal_dir.display()
            );
        }
        let opts = journal_opts(&place);
        let mut vol = TargetVolume::open_with(&place.journal_dir, opts.clone()).map_err(|e| {
            anyhow::anyhow!(
                "opening the journal of {name:?} in {}: {e}",
                place.journal_dir.display()
            )
        })?;
        vol.set_retention(place.retention.clone());
        let v = Arc::new(SharedVolume::new(
            vol,
            place.journal_dir.clone(),
            opts,
            place.retention.clone(),
        ));
        m.insert(name.to_string(), v.clone());
        Ok(v)
    }

    /// Names of the volumes open in this process.
    pub fn open_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.map().keys().cloned().collect();
        v.sort();
        v
    }

    fn open_or_create(&self, hello: &Hello) -> Result<Arc<SharedVolume>, Refusal> {
        let name = &hello.volume_name;
        let Some((place, may_create)) = self.layout.place(name) else {
            return Err(Refusal::new(
                ErrorCode::Unauthorized,
                format!("volume {name:?} is not configured on this target"),
            ));
        };
        let fenced = |dir: &Path| {
            read_failover_marker(dir).map(|m| {
                Refusal::new(
                    ErrorCode::Unauthorized,
                    format!(
                        "volume {name:?} is failed over at this target (point {}); run `rewind reprotect` there to protect it again",
                        m.point
                    ),
                )
            })
        };
        let mut m = self.map();
        if let Some(v) = m.get(name) {
            if let Some(r) = fenced(&v.dir) {
                return Err(r);
            }
            if v.failed() {
                warn!(volume = %name, "reopening a failed volume");
                v.reopen().map_err(|e| open_refusal(name, e))?;
            }
            adopt_identity(v, hello)?;
            return Ok(v.clone());
        }
        let dir = &place.journal_dir;
        if let Some(r) = fenced(dir) {
            return Err(r);
        }
        let internal = |e: JournalError| {
            warn!(volume = %name, error = %e, "cannot open the target volume");
            open_refusal(name, e)
        };
        let opts = journal_opts(&place);
        let mut vol = if dir.join("identity").exists() {
            TargetVolume::open_with(dir, opts.clone()).map_err(internal)?
        } else if may_create {
            if let Some(parent) = place.replica.parent() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    Refusal::new(ErrorCode::Internal, format!("{}: {e}", parent.display()))
                })?;
            }
            std::fs::create_dir_all(dir).map_err(|e| {
                Refusal::new(ErrorCode::Internal, format!("{}: {e}", dir.display()))
            })?;
            // The marker first: a crash after create still asks for the initial sync.
            std::fs::write(dir.join(NEEDS_SYNC), b"").map_err(|e| {
                Refusal::new(ErrorCode::Internal, format!("{}: {e}", dir.display()))
            })?;
            let ident = VolumeIdentity {
                name: name.clone(),
                uuid: hello.volume_uuid,
                generation: hello.generation,
                size: hello.size,
                block_size: hello.block_size,
            };
            info!(volume = %name, replica = %place.replica.display(), journal = %dir.display(), size = hello.size, "creating the replica");
            TargetVolume::create_with(dir, ident, &place.replica, opts.clone()).map_err(internal)?
        } else {
            return Err(Refusal::new(
                ErrorCode::Unauthorized,
                format!(
                    "volume {name:?} has no journal in {} and auto_create is off",
                    dir.display()
                ),
            ));
        };
        vol.set_retention(place.retention.clone());
        let v = Arc::new(SharedVolume::new(
            vol,
            dir.clone(),
            opts,
            place.retention.clone(),
        ));
        adopt_identity(&v, hello)?;
        m.insert(name.clone(), v.clone());
        Ok(v)
    }
}

/// How a source hears that a volume cannot be opened.
fn open_refusal(name: &str, e: JournalError) -> Refusal {
    match e {
        JournalError::Locked(_) => Refusal::new(ErrorCode::Busy, e.to_string()),
        e if e.is_no_space() => Refusal::new(
            ErrorCode::SpoolFull,
            format!("volume {name:?}: target storage full: {e}"),
        ),
        e => Refusal::new(ErrorCode::Internal, format!("volume {name:?}: {e}")),
    }
}

/// After `rewind reprotect`: adopts the identity of the first source that
/// connects (re-seeding the journal if it differs), then removes the marker.
fn adopt_identity(v: &SharedVolume, hello: &Hello) -> Result<(), Refusal> {
    let marker = v.dir.join(ADOPT_IDENTITY);
    if !marker.exists() {
        return Ok(());
    }
    let internal = |e: String| Refusal::new(ErrorCode::Internal, e);
    let cur = v
        .with(|t| Ok(t.identity().clone()))
        .map_err(|e| internal(e.to_string()))?;
    if cur.uuid != hello.volume_uuid
        || cur.generation != hello.generation
        || cur.block_size != hello.block_size
    {
        let ident = VolumeIdentity {
            name: cur.name.clone(),
            uuid: hello.volume_uuid,
            generation: hello.generation,
            size: hello.size.max(cur.size),
            block_size: hello.block_size,
        };
        v.reopen_with(|dir| {
            drop(TargetVolume::reseed(
                dir,
                ident,
                journal::TargetOptions::default(),
            )?);
            Ok(())
        })
        .map_err(|e| internal(format!("adopting the new source identity: {e}")))?;
        v.bump_epoch();
        warn!(volume = %v.name, "re-protected volume: adopted the identity of the new source (fresh change log)");
    }
    std::fs::remove_file(&marker).map_err(|e| internal(format!("{}: {e}", marker.display())))?;
    Ok(())
}

/// Opens (or creates) [`JournalStore`]s for the target server.
pub struct JournalProvider {
    /// The volumes of this target process.
    pub volumes: Arc<Volumes>,
    /// Counters of open volumes.
    pub board: CounterBoard,
}

/// Whether target volumes apply received chunks in place of spooling them
/// while nothing is pending, unless configured otherwise (`direct_apply`).
pub const DEFAULT_DIRECT_APPLY: bool = false;

fn journal_opts(place: &VolumePlace) -> journal::TargetOptions {
    // Spooling (hence every ack to the source) no longer waits for an apply
    // step (`SharedVolume::apply_step`), but everything else that uses the
    // volume does (snapshot reads over NBD, bookmarks, admin calls): keep
    // steps short. 64 MiB of random 4 KiB extents took seconds here.
    let mut o = journal::TargetOptions {
        apply_batch_bytes: 8 << 20,
        apply_batch_chunks: 64,
        ..journal::TargetOptions::default()
    };
    if let Some(b) = place.spool_budget {
        o.spool_budget_bytes = b;
    }
    if let Some(c) = place.undo_compression {
        o.undo_compression = c;
    }
    o.direct_apply = place.direct_apply.unwrap_or(DEFAULT_DIRECT_APPLY);
    o
}

impl StoreProvider for JournalProvider {
    fn open(&self, hello: &Hello, peer: Option<&str>) -> Result<Box<dyn TargetStore>, Refusal> {
        info!(volume = %hello.volume_name, peer = peer.unwrap_or("(insecure)"), "opening the target volume");
        let v = self.volumes.open_or_create(hello)?;
        Ok(Box::new(JournalStore::new(v, self.board.clone())) as Box<dyn TargetStore>)
    }
}

/// Counters of a volume read from its journal directory without the daemon
/// (opens it, which needs the daemon to be stopped: the directory is locked).
pub fn offline_counters(dir: &Path) -> Result<(VolumeIdentity, Counters), JournalError> {
    let v = TargetVolume::open(dir)?;
    Ok((v.identity().clone(), v.counters()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use replicator::target::StoreExtent;

    /// The target hands received chunks to the journal without copying
    /// their data: the journal's extents are the same bytes in memory.
    #[test]
    fn handing_a_chunk_to_the_journal_copies_no_data() {
        let payload = journal::Bytes::from(vec![7u8; 3 * 4096]);
        let c = StoreChunk {
            first_seq: 1,
            last_seq: 2,
            source_time_ns: 3,
            horizon_seq: 0,
            extents: vec![
                StoreExtent {
                    offset: 0,
                    data: StoreData::Data(payload.slice(..4096)),
                },
                StoreExtent {
                    offset: 1 << 20,
                    data: StoreData::Zero(4096),
                },
                StoreExtent {
                    offset: 1 << 21,
                    data: StoreData::Data(payload.slice(4096..)),
                },
            ],
        };
        let j = to_chunk(&c);
        assert_eq!((j.first_seq, j.last_seq, j.source_time_ns), (1, 2, 3));
        assert_eq!(j.extents.len(), 3);
        for (s, d) in c.extents.iter().zip(&j.extents) {
            assert_eq!(s.offset, d.offset);
            match (&s.data, &d.data) {
                (StoreData::Data(a), ExtentData::Data(b)) => {
                    assert_eq!(a.as_ptr(), b.as_ptr(), "extent at {} copied", s.offset);
                    assert_eq!(a.len(), b.len());
                }
                (StoreData::Zero(a), ExtentData::Zero(b)) => assert_eq!(a, b),
                _ => panic!("extent kind changed"),
            }
        }
    }
}
