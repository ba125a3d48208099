//! The producer side: [`ChangeLog`], owned by the filter process.

use std::fs::{DirBuilder, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use tracing::{error, info, warn};

use crate::config::ChangeLogConfig;
use crate::error::{ChangeLogError, Result};
use crate::layout::{stat, Layout, *};
use crate::persist::{
    read_identity, write_atomic, write_identity, AlFile, BitmapFile, VolumeIdentity,
};
use crate::region::{for_each_word, Shared};
use crate::ring::{
    align8, walk, RecHeader, TagType, K_DATA, K_METADATA, K_PAD, K_TAG, K_ZERO, MAX_TAG_NAME,
    RECORD_HEADER,
};
use crate::sink::{ChangeSink, WriteTicket};
use crate::view::{read_stats, Stats};

/// Where the producer currently records writes (stored in the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CaptureMode {
    /// Writes are Data records with their payload in the ring.
    Data = 0,
    /// Writes are Metadata records (offset, len); the consumer reads the data
    /// back from the volume.
    Metadata = 1,
    /// Writes only set bits in the dirty bitmap.
    Bitmap = 2,
}

impl CaptureMode {
    pub(crate) fn from_u64(v: u64) -> CaptureMode {
        match v {
            0 => CaptureMode::Data,
            1 => CaptureMode::Metadata,
            _ => CaptureMode::Bitmap,
        }
    }
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn make_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| ChangeLogError::io("create directory", dir, e))
}

pub(crate) fn take_lock(path: &Path, role: &'static str, region: &Path) -> Result<Flock<File>> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| ChangeLogError::io("open lock", path, e))?;
    Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|_| ChangeLogError::Busy {
        path: region.to_path_buf(),
        role,
    })
}

/// State guarded by the write mutex (the producer-side serialisation of all
/// recording threads).
struct WState {
    head: u64,
    next_seq: u64,
    mode: CaptureMode,
    /// In bitmap mode: the consumer sweep count (`OFF_SWEEPS_DONE`) at which
    /// every bit set before bitmap mode was entered has been taken.
    exit_sweep: u64,
}

struct Inner {
    cfg: ChangeLogConfig,
    sh: Shared,
    w: Mutex<WState>,
    /// Process-local copy of the durable hot-extent set (one bit per extent).
    hot: Vec<AtomicU64>,
    /// The activity-log file and a scratch buffer; also serialises hot-set changes.
    al: Mutex<(Option<AlFile>, Vec<u64>)>,
    persist_lock: Mutex<()>,
    closed: AtomicBool,
    max_payload: u64,
    bitmap_path: PathBuf,
    identity: VolumeIdentity,
    _lock: Flock<File>,
}

struct Persister {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: JoinHandle<()>,
}

/// The producer handle of one volume's change log (one per volume, in the
/// filter process). Implements [`ChangeSink`]; share it between connections
/// with an `Arc`.
///
/// Guarantees:
/// - every completed or aborted write is, when the `ChangeSink` method returns,
///   either a record in the ring (published with Release ordering) or set bits
///   in the `active` bitmap — and stays so until a consumer commits it;
/// - records appear in the ring in the order their `complete_*` calls took the
///   write mutex, with strictly increasing sequence numbers;
/// - a crash of this process at any instant loses nothing: extents with writes
///   between `begin` and completion are marked dirty by the next
///   [`ChangeLog::open_or_create`] (recovery);
/// - a host crash loses nothing either: the bitmap file plus the activity log
///   (hot extents, made durable before the first write into a new extent)
///   cover every change that was not committed.
pub struct ChangeLog {
    inner: Arc<Inner>,
    persister: Mutex<Option<Persister>>,
}

/// What [`ChangeLog::open_or_create`] found and did, for logging and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OpenReport {
    /// A new region was created (first start or after a reboot).
    pub created_region: bool,
    /// A new volume identity was created.
    pub created_identity: bool,
    /// The previous producer had died without a clean shutdown.
    pub previous_producer_crashed: bool,
    /// Extents marked dirty because their in-flight counter was non-zero.
    pub inflight_extents_marked: u64,
    /// The ring between tail and head was damaged and truncated at this position.
    pub ring_truncated_at: Option<u64>,
    /// Blocks set from the persisted state (bitmap file, hot extents).
    pub blocks_from_state: u64,
    /// The persisted state was missing or unreadable: every block was marked dirty.
    pub full_resync: bool,
}

impl ChangeLog {
    /// Opens the region of `cfg.volume_name`, creating it (and the state
    /// directory, identity, bitmap and activity-log files) if needed, and takes
    /// the producer role (an exclusive `flock`; a second live producer gets
    /// [`ChangeLogError::Busy`]).
    ///
    /// - Existing region, previous producer crashed: recovery (in-flight
    ///   extents → `active`, counters reset, ring validated and truncated at
    ///   the first invalid record, in which case the persisted state is merged
    ///   in as after a reboot).
    /// - Missing region but persisted state present (host reboot): the new
    ///   region starts in bitmap mode with `bitmap file | hot extents` set.
    /// - A region or state of another geometry/identity: [`ChangeLogError::Mismatch`].
    ///
    /// Ends with a [`ChangeLog::persist`], so the on-disk state matches the region.
    pub fn open_or_create(cfg: ChangeLogConfig) -> Result<ChangeLog> {
        Self::open_with_report(cfg).map(|(c, _)| c)
    }

    /// As [`ChangeLog::open_or_create`], also returning what recovery did.
    pub fn open_with_report(cfg: ChangeLogConfig) -> Result<(ChangeLog, OpenReport)> {
        cfg.validate()?;
        make_dir(&cfg.shm_dir)?;
        make_dir(&cfg.state_dir)?;
        let region_path = cfg.region_path();
        let plock = take_lock(
            &region_path.with_extension("producer.lock"),
            "producer",
            &region_path,
        )?;
        let mut report = OpenReport::default();
        let name = &cfg.volume_name;
        let id_path = cfg.state_dir.join(format!("{name}.identity"));
        let bitmap_path = cfg.state_dir.join(format!("{name}.bitmap"));
        let al_path = cfg.state_dir.join(format!("{name}.al"));

        let identity = match read_identity(&id_path)? {
            Some(id) => {
                if id.volume_size != cfg.volume_size || id.block_size != cfg.block_size {
                    return Err(ChangeLogError::Mismatch {
                        path: id_path,
                        reason: format!(
                            "identity is for size {} block {}, configured size {} block {}",
                            id.volume_size, id.block_size, cfg.volume_size, cfg.block_size
                        ),
                    });
                }
                id
            }
            None => {
                let id = VolumeIdentity {
                    uuid: uuid::Uuid::new_v4().hyphenated().to_string(),
                    generation: 1,
                    volume_size: cfg.volume_size,
                    block_size: cfg.block_size,
                };
                // Empty persisted state first, so that a crash before the first
                // persist is not mistaken for lost state (full resync) later.
                let ring = cfg.ring_bytes.max(4096).div_ceil(4096) * 4096;
                let layout =
                    Layout::compute(cfg.volume_size, cfg.block_size, ring, cfg.extent_shift)
                        .ok_or_else(|| {
                            ChangeLogError::InvalidConfig("geometry too large".into())
                        })?;
                let uuid = *uuid::Uuid::parse_str(&id.uuid)
                    .map_err(|e| ChangeLogError::InvalidConfig(e.to_string()))?
                    .as_bytes();
                let empty = BitmapFile {
                    block_size: cfg.block_size,
                    volume_size: cfg.volume_size,
                    uuid,
                    generation: id.generation,
                    next_seq: 1,
                    bits: vec![0; layout.bitmap_words as usize],
                    hot: vec![0; layout.extent_count.div_ceil(64) as usize],
                };
                write_atomic(&bitmap_path, &empty.encode())?;
                let _ = std::fs::remove_file(&al_path);
                AlFile::open(&al_path, layout.extent_count.div_ceil(64) as usize)?;
                write_identity(&id_path, &id)?;
                report.created_identity = true;
                info!(volume = %name, uuid = %id.uuid, "created volume identity");
                id
            }
        };
        let uuid = identity
            .uuid_bytes()
            .map_err(|_| ChangeLogError::BadStateFile {
                path: id_path.clone(),
                reason: "bad uuid".into(),
            })?;

        let sh = if region_path.exists() {
            let sh = Shared::open(&region_path, true)?;
            let l = sh.layout();
            if sh.hdr.uuid != uuid
                || l.volume_size != cfg.volume_size
                || l.block_size != cfg.block_size
            {
                return Err(ChangeLogError::Mismatch {
                    path: region_path,
                    reason: format!("region is for size {} block {}, configured size {} block {} (or another volume uuid)", l.volume_size, l.block_size, cfg.volume_size, cfg.block_size),
                });
            }
            sh
        } else {
            report.created_region = true;
            let ring = cfg.ring_bytes.max(4096).div_ceil(4096) * 4096;
            let layout =
                Layout::compute(cfg.volume_size, cfg.block_size, ring, cfg.extent_shift)
                    .ok_or_else(|| ChangeLogError::InvalidConfig("geometry too large".into()))?;
            // State from a previous life of this volume (host reboot or shm wiped).
            let mut initial: Option<(Vec<u64>, u64)> = None;
            if !report.created_identity {
                initial = Some(Self::state_bits(
                    &layout,
                    &bitmap_path,
                    &al_path,
                    &identity,
                    uuid,
                    &mut report,
                ));
            }
            Shared::create(
                &region_path,
                &layout,
                uuid,
                identity.generation,
                now_ns(),
                |sh| {
                    sh.field(OFF_FILTERING).store(1, SeqCst);
                    sh.field(OFF_NEXT_SEQ).store(1, SeqCst);
                    if let Some((bits, next_seq)) = &initial {
                        sh.field(OFF_NEXT_SEQ).store(*next_seq, SeqCst);
                        apply_bits(sh, bits);
                        if sh.field(OFF_ACTIVE_COUNT).load(SeqCst) > 0 {
                            sh.field(OFF_MODE).store(CaptureMode::Bitmap as u64, SeqCst);
                            sh.field(OFF_BITMAP_SINCE_NS).store(now_ns(), SeqCst);
                        }
                    }
                },
            )?
        };

        // Recovery of whatever the previous producer left.
        let prev = sh.field(OFF_PRODUCER_STATE).load(SeqCst);
        report.previous_producer_crashed = prev == PRODUCER_RUNNING;
        let l = *sh.layout();
        for e in 0..l.extent_count {
            if sh.inflight(e).load(SeqCst) != 0 {
                sh.mark_extent(e);
                report.inflight_extents_marked += 1;
            }
        }
        for e in 0..l.extent_count {
            sh.inflight(e).store(0, SeqCst);
        }
        let tail = sh.tail().load(SeqCst);
        let mut head = sh.head().load(SeqCst);
        let mut last_seq = 0;
        let damaged = if tail > head || head - tail > l.ring_capacity || tail % 8 != 0 {
            Some((tail, format!("tail {tail} / head {head} inconsistent")))
        } else {
            match walk(&sh, tail, head, |_, h| {
                last_seq = last_seq.max(h.seq);
                true
            }) {
                Ok(_) => None,
                Err((pos, why)) => Some((pos, why)),
            }
        };
        if let Some((pos, why)) = damaged {
            error!(volume = %name, pos, reason = %why, "change-log ring damaged; truncating and falling back to the persisted state");
            let pos = if pos < tail || pos > head { tail } else { pos };
            head = pos;
            sh.head().store(head, SeqCst);
            report.ring_truncated_at = Some(pos);
            let (bits, _) =
                Self::state_bits(&l, &bitmap_path, &al_path, &identity, uuid, &mut report);
            apply_bits(&sh, &bits);
            sh.field(OFF_MODE).store(CaptureMode::Bitmap as u64, SeqCst);
        }
        let next_seq = sh.field(OFF_NEXT_SEQ).load(SeqCst).max(last_seq + 1);
        sh.field(OFF_NEXT_SEQ).store(next_seq, SeqCst);
        if report.previous_producer_crashed {
            sh.bump(stat::RECOVERIES, 1);
        }
        // Counters are hints; make them exact now.
        let (a, p) = sh.count_bits();
        sh.field(OFF_ACTIVE_COUNT).store(a, SeqCst);
        sh.field(OFF_PENDING_COUNT).store(p, SeqCst);
        let mode = CaptureMode::from_u64(sh.field(OFF_MODE).load(SeqCst));
        if mode == CaptureMode::Bitmap && sh.field(OFF_BITMAP_SINCE_NS).load(SeqCst) == 0 {
            sh.field(OFF_BITMAP_SINCE_NS).store(now_ns(), SeqCst);
        }
        sh.field(OFF_PRODUCER_PID)
            .store(std::process::id() as u64, SeqCst);
        sh.field(OFF_PRODUCER_STATE).store(PRODUCER_RUNNING, SeqCst);
        if report.previous_producer_crashed
            || report.inflight_extents_marked > 0
            || report.ring_truncated_at.is_some()
            || report.created_region
        {
            info!(volume = %name, ?report, active_blocks = a, pending_blocks = p, ?mode, "change log opened");
        }

        let words = l.extent_count.div_ceil(64) as usize;
        let (al, hot_words) = match AlFile::open(&al_path, words) {
            Ok((al, hot)) => (Some(al), hot.unwrap_or_else(|| vec![0; words])),
            Err(e) => {
                error!(volume = %name, error = %e, "cannot open the activity log; host-crash protection degraded");
                sh.bump(stat::PERSIST_ERRORS, 1);
                (None, vec![0; words])
            }
        };
        let cap = l.ring_capacity;
        let exit_sweep = sh.field(OFF_SWEEPS_DONE).load(SeqCst) + 2;
        if mode == CaptureMode::Bitmap {
            sh.field(OFF_BITMAP_EXIT_SWEEP).store(exit_sweep, SeqCst);
        }
        let inner = Inner {
            max_payload: (cap / 4).min(u32::MAX as u64 / 2),
            w: Mutex::new(WState {
                head,
                next_seq,
                mode,
                exit_sweep,
            }),
            hot: hot_words.iter().map(|&w| AtomicU64::new(w)).collect(),
            al: Mutex::new((al, vec![0; words])),
            persist_lock: Mutex::new(()),
            closed: AtomicBool::new(false),
            bitmap_path,
            identity,
            cfg,
            sh,
            _lock: plock,
        };
        let cl = ChangeLog {
            inner: Arc::new(inner),
            persister: Mutex::new(None),
        };
        cl.persist()?;
        Ok((cl, report))
    }

    /// Bits (per block) from the persisted state: bitmap file | the activity
    /// log's hot extents; everything if either is unusable. (The hot set
    /// stored in the bitmap file is the one in force when it was written; it
    /// is informational — the activity log is authoritative and newer.)
    fn state_bits(
        l: &Layout,
        bitmap_path: &Path,
        al_path: &Path,
        id: &VolumeIdentity,
        uuid: [u8; 16],
        report: &mut OpenReport,
    ) -> (Vec<u64>, u64) {
        let words = l.bitmap_words as usize;
        let ext_words = l.extent_count.div_ceil(64) as usize;
        let all = || {
            let mut v = vec![!0u64; words];
            if l.blocks % 64 != 0 {
                v[words - 1] = (1u64 << (l.blocks % 64)) - 1;
            }
            v
        };
        let bf = match BitmapFile::load(bitmap_path) {
            Ok(Some(f))
                if f.uuid == uuid
                    && f.volume_size == l.volume_size
                    && f.block_size == l.block_size
                    && f.bits.len() == words
                    && f.hot.len() == ext_words =>
            {
                Some(f)
            }
            Ok(Some(_)) => {
                error!(path = %bitmap_path.display(), "bitmap file is for another geometry or volume");
                None
            }
            Ok(None) => {
                error!(path = %bitmap_path.display(), "bitmap file missing");
                None
            }
            Err(e) => {
                error!(error = %e, "bitmap file unreadable");
                None
            }
        };
        // A missing AL is lost state too (opening would create an empty one).
        let al = if al_path.exists() {
            AlFile::open(al_path, ext_words).ok().and_then(|(_, h)| h)
        } else {
            None
        };
        let (Some(bf), Some(al)) = (bf, al) else {
            warn!(volume_uuid = %id.uuid, "persisted change state lost: every block is marked dirty (full resync)");
            report.full_resync = true;
            let b = all();
            report.blocks_from_state = l.blocks;
            return (b, 1 << 32);
        };
        let mut bits = bf.bits.clone();
        for e in 0..l.extent_count {
            let (w, m) = ((e / 64) as usize, 1u64 << (e % 64));
            if al[w] & m != 0 {
                let start = e << l.extent_shift;
                let end = (start + (1u64 << l.extent_shift)).min(l.volume_size);
                for_each_word(
                    start >> l.block_shift,
                    (end - 1) >> l.block_shift,
                    |w, m| bits[w as usize] |= m,
                );
            }
        }
        if l.blocks % 64 != 0 {
            // never trust bits beyond the volume end from a file
            bits[words - 1] &= (1u64 << (l.blocks % 64)) - 1;
        }
        report.blocks_from_state = bits.iter().map(|w| w.count_ones() as u64).sum();
        // Records after the last persist may have used sequence numbers up to
        // ~2^32 beyond the persisted one; jump past them.
        (bits, bf.next_seq.saturating_add(1 << 32))
    }

    fn sh(&self) -> &Shared {
        &self.inner.sh
    }

    /// Path of the shared-memory region.
    pub fn path(&self) -> &Path {
        &self.inner.sh.path
    }

    /// The volume identity (UUID, generation) shared with the target.
    pub fn identity(&self) -> &VolumeIdentity {
        &self.inner.identity
    }

    /// Current capture mode.
    pub fn mode(&self) -> CaptureMode {
        lock(&self.inner.w).mode
    }

    /// A snapshot of the statistics (same as [`crate::ChangeLogView::stats`]).
    pub fn stats(&self) -> Stats {
        read_stats(self.sh())
    }

    /// Starts or stops filtering. While filtering is stopped, writes are still
    /// tracked — in the dirty bitmap only (the mode is forced to `Bitmap`,
    /// counted as `filtering_stops`); nothing is lost, the replicator drains
    /// the bits. After restarting, the usual bitmap → data rule applies.
    pub fn set_filtering(&self, on: bool) {
        let inner = &*self.inner;
        let mut st = lock(&inner.w);
        inner.sh.field(OFF_FILTERING).store(on as u64, SeqCst);
        if !on && st.mode != CaptureMode::Bitmap {
            inner.set_mode(&mut st, CaptureMode::Bitmap, stat::FILTERING_STOPS);
        }
        info!(volume = %inner.cfg.volume_name, filtering = on, "filtering changed");
    }

    /// Appends a bookmark to the stream, after every write already recorded
    /// and before every later one, and returns its sequence number.
    ///
    /// Refused ([`ChangeLogError::TagRefused`], counted in `tags_refused`) when
    /// the point would not be exact: not in data mode, dirty bits outstanding,
    /// unconsumed metadata records, or the ring is full. Tags cannot live in a bitmap.
    pub fn insert_tag(&self, name: &str, tag_type: TagType, uuid: [u8; 16]) -> Result<u64> {
        let inner = &*self.inner;
        let sh = &inner.sh;
        let refuse = |why: &'static str| {
            sh.bump(stat::TAGS_REFUSED, 1);
            warn!(volume = %inner.cfg.volume_name, tag = name, reason = why, "tag refused");
            Err(ChangeLogError::TagRefused(why))
        };
        if name.len() > MAX_TAG_NAME {
            return refuse("name longer than 1024 bytes");
        }
        let ts = now_ns();
        let mut st = lock(&inner.w);
        inner.maybe_leave_degraded(&mut st);
        if st.mode != CaptureMode::Data || sh.field(OFF_FILTERING).load(SeqCst) == 0 {
            return refuse("not in data mode");
        }
        if sh.field(OFF_ACTIVE_COUNT).load(SeqCst) != 0
            || sh.field(OFF_PENDING_COUNT).load(SeqCst) != 0
        {
            return refuse("dirty bitmap blocks outstanding");
        }
        if sh.field(OFF_LAST_META_END).load(SeqCst) > sh.tail().load(Acquire) {
            return refuse("metadata records outstanding");
        }
        // The counters are hints; confirm with an exact scan (only this mutex
        // adds bits, so the scan cannot miss a concurrent producer update).
        if sh.count_bits() != (0, 0) {
            return refuse("dirty bitmap blocks outstanding");
        }
        match inner.append(
            &mut st,
            K_TAG,
            tag_type.to_u8(),
            0,
            0,
            &[&uuid, name.as_bytes()],
            ts,
        ) {
            Some(seq) => {
                drop(st);
                sh.bump(stat::TAGS_INSERTED, 1);
                Ok(seq)
            }
            None => refuse("ring full"),
        }
    }

    /// Writes the bitmap file atomically (temp, fsync, rename, fsync dir) with
    /// `active | pending | blocks of unconsumed ring records`, then shrinks the
    /// durable hot-extent set to the extents with in-flight writes or changes
    /// newer than that file. Safe to call concurrently with writes.
    pub fn persist(&self) -> Result<()> {
        let r = self.inner.persist();
        if let Err(e) = &r {
            self.sh().bump(stat::PERSIST_ERRORS, 1);
            error!(volume = %self.inner.cfg.volume_name, error = %e, "persist failed");
        }
        r
    }

    /// Starts the background thread that calls [`ChangeLog::persist`] every
    /// `cfg.persist_interval` (and returns to data mode when bitmap mode is
    /// drained even without new writes). Idempotent.
    pub fn start_persister(&self) {
        let mut g = lock(&self.persister);
        if g.is_some() {
            return;
        }
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let (inner, stop2) = (self.inner.clone(), stop.clone());
        let interval = self
            .inner
            .cfg
            .persist_interval
            .max(Duration::from_millis(10));
        let handle = std::thread::Builder::new()
            .name(format!("clog-persist-{}", self.inner.cfg.volume_name))
            .spawn(move || loop {
                let (m, cv) = &*stop2;
                let guard = lock(m);
                let (guard, _) = cv
                    .wait_timeout_while(guard, interval, |s| !*s)
                    .unwrap_or_else(|p| p.into_inner());
                if *guard {
                    return;
                }
                drop(guard);
                {
                    let mut st = lock(&inner.w);
                    inner.maybe_leave_degraded(&mut st);
                }
                if let Err(e) = inner.persist() {
                    inner.sh.bump(stat::PERSIST_ERRORS, 1);
                    error!(volume = %inner.cfg.volume_name, error = %e, "periodic persist failed");
                }
            });
        match handle {
            Ok(handle) => *g = Some(Persister { stop, handle }),
            Err(e) => error!(error = %e, "cannot start the persister thread"),
        }
    }

    fn stop_persister(&self) {
        if let Some(p) = lock(&self.persister).take() {
            *lock(&p.stop.0) = true;
            p.stop.1.notify_all();
            let _ = p.handle.join();
        }
    }

    /// Clean shutdown: stops the persister, persists, and marks the region
    /// cleanly shut down. Idempotent; also done by `Drop`. Takes `&self` so a
    /// shared (`Arc`) log can be closed once its users stopped; the producer
    /// role (flock) and the mapping are released only when the handle is
    /// dropped. Writes after `close` are still recorded and still protected:
    /// recovery marks in-flight extents whatever the recorded shutdown state,
    /// and the activity log keeps being updated (only the periodic persist has
    /// stopped).
    pub fn close(&self) -> Result<()> {
        self.close_inner()
    }

    fn close_inner(&self) -> Result<()> {
        if self.inner.closed.swap(true, SeqCst) {
            return Ok(());
        }
        self.stop_persister();
        let r = self.persist();
        let inflight: u64 = (0..self.sh().layout().extent_count)
            .map(|e| self.sh().inflight(e).load(SeqCst))
            .sum();
        if r.is_ok() && inflight == 0 {
            self.sh()
                .field(OFF_PRODUCER_STATE)
                .store(PRODUCER_CLEAN, SeqCst);
        }
        info!(volume = %self.inner.cfg.volume_name, clean = r.is_ok() && inflight == 0, "change log closed");
        r
    }

    /// Test helper: drops the handle as if the process had been killed (no
    /// persist, no clean-shutdown mark; the flock is released).
    #[doc(hidden)]
    pub fn simulate_crash(self) {
        self.inner.closed.store(true, SeqCst);
        self.stop_persister();
    }
}

impl Drop for ChangeLog {
    fn drop(&mut self) {
        let _ = self.close_inner();
    }
}

fn apply_bits(sh: &Shared, bits: &[u64]) {
    let mut n = 0;
    for (w, &v) in bits.iter().enumerate() {
        if v != 0 {
            let old = sh.active(w as u64).fetch_or(v, SeqCst);
            n += (v & !old).count_ones() as u64;
        }
    }
    sh.field(OFF_ACTIVE_COUNT).fetch_add(n, SeqCst);
}

impl Inner {
    fn extent_span(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let l = self.sh.layout();
        let end = offset.saturating_add(len).min(l.volume_size);
        if len == 0 || offset >= end {
            return None;
        }
        Some((offset >> l.extent_shift, (end - 1) >> l.extent_shift))
    }

    fn set_mode(&self, st: &mut WState, to: CaptureMode, counter: usize) {
        let from = st.mode;
        st.mode = to;
        let sh = &self.sh;
        sh.field(OFF_MODE).store(to as u64, SeqCst);
        sh.bump(counter, 1);
        let used = st.head.saturating_sub(sh.tail().load(Relaxed));
        if to == CaptureMode::Bitmap {
            // A sweep in progress now may already have passed words that get
            // bits from now on; the one after it starts after this instant.
            st.exit_sweep = sh.field(OFF_SWEEPS_DONE).load(SeqCst) + 2;
            sh.field(OFF_BITMAP_EXIT_SWEEP).store(st.exit_sweep, SeqCst);
            sh.field(OFF_BITMAP_SINCE_NS).store(now_ns(), SeqCst);
            warn!(volume = %self.cfg.volume_name, ?from, ?to, ring_used = used, "ALERT: change log entered bitmap mode (changes tracked as blocks only)");
        } else {
            if from == CaptureMode::Bitmap {
                sh.field(OFF_BITMAP_SINCE_NS).store(0, SeqCst);
            }
            info!(volume = %self.cfg.volume_name, ?from, ?to, ring_used = used, "capture mode changed");
        }
    }

    /// Returns to data mode when the rules allow it (called under the mutex).
    fn maybe_leave_degraded(&self, st: &mut WState) {
        let sh = &self.sh;
        match st.mode {
            CaptureMode::Bitmap => {
                if sh.field(OFF_FILTERING).load(SeqCst) == 0 {
                    return;
                }
                let empty = sh.field(OFF_ACTIVE_COUNT).load(SeqCst) == 0
                    && sh.field(OFF_PENDING_COUNT).load(SeqCst) == 0;
                // Under sustained load the bitmap is never empty: leave once a
                // consumer sweep has taken every bit set before bitmap mode
                // began and the ring has room again (rule (c), §4).
                let swept = sh.field(OFF_SWEEPS_DONE).load(SeqCst) >= st.exit_sweep && {
                    let used = st.head.saturating_sub(sh.tail().load(Acquire));
                    used * 2 <= sh.layout().ring_capacity
                };
                if empty {
                    self.set_mode(st, CaptureMode::Data, stat::BITMAP_TO_DATA);
                } else if swept {
                    sh.bump(stat::BITMAP_SWEEP_EXITS, 1);
                    self.set_mode(st, CaptureMode::Data, stat::BITMAP_TO_DATA);
                }
            }
            CaptureMode::Metadata => {
                let used = st.head.saturating_sub(sh.tail().load(Acquire));
                if used * 2 <= sh.layout().ring_capacity {
                    self.set_mode(st, CaptureMode::Data, stat::METADATA_TO_DATA);
                }
            }
            CaptureMode::Data => {}
        }
    }

    /// Appends one record (payload given as parts) if the ring has room.
    /// Returns its sequence number. Called under the write mutex.
    #[allow(clippy::too_many_arguments)]
    fn append(
        &self,
        st: &mut WState,
        kind: u8,
        tag_type: u8,
        offset: u64,
        len: u64,
        payload: &[&[u8]],
        ts: u64,
    ) -> Option<u64> {
        let sh = &self.sh;
        let cap = sh.layout().ring_capacity;
        let plen: u64 = payload.iter().map(|p| p.len() as u64).sum();
        let need = align8(RECORD_HEADER + plen);
        let tail = sh.tail().load(Acquire);
        let head = st.head;
        if tail > head || head - tail > cap || need > cap {
            return None; // consumer wrote nonsense, or record larger than the ring
        }
        let used = head - tail;
        let at = head % cap;
        let to_end = cap - at;
        let skip = if to_end >= need { 0 } else { to_end };
        if used + skip + need > cap {
            return None;
        }
        if skip >= RECORD_HEADER {
            let pad = RecHeader {
                kind: K_PAD,
                tag_type: 0,
                payload_len: 0,
                seq: 0,
                timestamp_ns: 0,
                offset: 0,
                len: 0,
                total_len: skip as u32,
            };
            sh.ring_write(at, &pad.encode());
        }
        let rec_at = (head + skip) % cap;
        let mut p = rec_at + RECORD_HEADER;
        for part in payload {
            sh.ring_write(p, part);
            p += part.len() as u64;
        }
        let seq = st.next_seq;
        let h = RecHeader {
            kind,
            tag_type,
            payload_len: plen as u32,
            seq,
            timestamp_ns: ts,
            offset,
            len,
            total_len: need as u32,
        };
        sh.ring_write(rec_at, &h.encode());
        st.next_seq += 1;
        st.head = head + skip + need;
        sh.field(OFF_NEXT_SEQ).store(st.next_seq, Relaxed);
        sh.head().store(st.head, Release);
        Some(seq)
    }

    /// Records one completed change: ring (data or metadata/zero record) or
    /// bitmap, following the mode rules. Never fails.
    fn record(&self, kind: u8, offset: u64, len: u64, payload: &[u8], ts: u64) {
        let sh = &self.sh;
        let mut st = lock(&self.w);
        if sh.field(OFF_FILTERING).load(Relaxed) == 0 {
            sh.mark_active(offset, len);
            sh.bump(stat::BITMAP_WRITES, 1);
            return;
        }
        self.maybe_leave_degraded(&mut st);
        if st.mode == CaptureMode::Bitmap {
            sh.mark_active(offset, len);
            sh.bump(stat::BITMAP_WRITES, 1);
            return;
        }
        if kind == K_DATA && st.mode == CaptureMode::Data {
            if payload.len() as u64 <= self.max_payload {
                if self
                    .append(&mut st, K_DATA, 0, offset, len, &[payload], ts)
                    .is_some()
                {
                    drop(st);
                    sh.bump(stat::DATA_RECORDS, 1);
                    return;
                }
                self.set_mode(&mut st, CaptureMode::Metadata, stat::DATA_TO_METADATA);
            } else {
                sh.bump(stat::OVERSIZE_METADATA, 1);
            }
        }
        let k = if kind == K_ZERO { K_ZERO } else { K_METADATA };
        if self.append(&mut st, k, 0, offset, len, &[], ts).is_some() {
            if k == K_METADATA {
                sh.field(OFF_LAST_META_END).store(st.head, SeqCst);
            }
            drop(st);
            sh.bump(
                if k == K_ZERO {
                    stat::ZERO_RECORDS
                } else {
                    stat::METADATA_RECORDS
                },
                1,
            );
            return;
        }
        let counter = if st.mode == CaptureMode::Data {
            stat::DATA_TO_BITMAP
        } else {
            stat::METADATA_TO_BITMAP
        };
        self.set_mode(&mut st, CaptureMode::Bitmap, counter);
        sh.mark_active(offset, len);
        sh.bump(stat::BITMAP_WRITES, 1);
    }

    fn finish(&self, offset: u64, len: u64) {
        if let Some((a, b)) = self.extent_span(offset, len) {
            for e in a..=b {
                self.sh.inflight(e).fetch_sub(1, SeqCst);
            }
        }
    }

    /// Makes extent `e` durably hot (activity-log update + fdatasync).
    fn make_hot(&self, e: u64) {
        let (w, m) = ((e / 64) as usize, 1u64 << (e % 64));
        let mut g = lock(&self.al);
        if self.hot[w].load(SeqCst) & m != 0 {
            return;
        }
        let (al, scratch) = &mut *g;
        for (i, h) in self.hot.iter().enumerate() {
            scratch[i] = h.load(SeqCst);
        }
        scratch[w] |= m;
        if let Some(al) = al {
            if let Err(e) = al.write(scratch) {
                self.sh.bump(stat::PERSIST_ERRORS, 1);
                error!(volume = %self.cfg.volume_name, error = %e, "activity-log update failed; host-crash protection degraded");
            }
        }
        self.sh.bump(stat::AL_UPDATES, 1);
        self.hot[w].fetch_or(m, SeqCst);
    }

    fn persist(&self) -> Result<()> {
        let _p = lock(&self.persist_lock);
        let sh = &self.sh;
        let l = *sh.layout();
        // 1. Snapshot: active | pending (active first: the consumer moves bits
        //    pending-first), then the blocks of unconsumed ring records.
        let mut snap: Vec<u64> = (0..l.bitmap_words)
            .map(|w| sh.active(w).load(SeqCst) | sh.pending(w).load(SeqCst))
            .collect();
        let head_snap = sh.head().load(SeqCst);
        let tail = sh.tail().load(SeqCst);
        ring_blocks(sh, tail, head_snap, |a, b| {
            for_each_word(a, b, |w, m| snap[w as usize] |= m)
        });
        // Repair drifted counters (a process killed between a bitmap update
        // and the counter update): only ever lowered to an exact zero, under
        // the write mutex so no producer update races.
        if snap.iter().all(|&w| w == 0) {
            let _w = lock(&self.w);
            if sh.count_bits() == (0, 0) {
                sh.field(OFF_ACTIVE_COUNT).store(0, SeqCst);
                sh.field(OFF_PENDING_COUNT).store(0, SeqCst);
            }
        }
        let ext_words = l.extent_count.div_ceil(64) as usize;
        let hot_now: Vec<u64> = self.hot.iter().map(|h| h.load(SeqCst)).collect();
        // 2. The bitmap file (durable before the hot set may shrink).
        let file = BitmapFile {
            block_size: l.block_size,
            volume_size: l.volume_size,
            uuid: sh.hdr.uuid,
            generation: sh.hdr.generation,
            next_seq: sh.field(OFF_NEXT_SEQ).load(SeqCst),
            bits: snap.clone(),
            hot: hot_now,
        };
        write_atomic(&self.bitmap_path, &file.encode())?;
        // 3. New hot set: clear the in-memory set first (so a writer that saw
        //    its extent hot did its in-flight increment before our scan), then
        //    extents with in-flight writes, with bits not in the file, or with
        //    records published after the snapshot.
        let mut g = lock(&self.al);
        for h in &self.hot {
            h.store(0, SeqCst);
        }
        let mut new_hot = vec![0u64; ext_words];
        let mut set = |e: u64| {
            if e < l.extent_count {
                new_hot[(e / 64) as usize] |= 1 << (e % 64)
            }
        };
        for e in 0..l.extent_count {
            if sh.inflight(e).load(SeqCst) != 0 {
                set(e);
            }
        }
        let words_per_extent_shift = l.extent_shift - l.block_shift; // blocks per extent = 2^this
        for w in 0..l.bitmap_words {
            let v = sh.active(w).load(SeqCst) | sh.pending(w).load(SeqCst);
            if v & !snap[w as usize] != 0 {
                set((w * 64) >> words_per_extent_shift);
                if words_per_extent_shift < 6 {
                    // extents smaller than a word: resolve per bit
                    let mut x = v & !snap[w as usize];
                    while x != 0 {
                        let b = x.trailing_zeros() as u64;
                        set((w * 64 + b) >> words_per_extent_shift);
                        x &= x - 1;
                    }
                }
            }
        }
        let head_now = sh.head().load(SeqCst);
        ring_blocks(
            sh,
            head_snap.max(sh.tail().load(SeqCst)),
            head_now,
            |a, b| {
                for e in (a >> words_per_extent_shift)..=(b >> words_per_extent_shift) {
                    set(e);
                }
            },
        );
        let (al, _) = &mut *g;
        let r = match al {
            Some(al) => al.write(&new_hot),
            None => Ok(()),
        };
        // On failure keep the old hot set in memory too (the file still has it).
        let restore: &[u64] = if r.is_ok() { &new_hot } else { &file.hot };
        for (h, &v) in self.hot.iter().zip(restore.iter()) {
            h.fetch_or(v, SeqCst);
        }
        drop(g);
        sh.bump(stat::PERSISTS, 1);
        r
    }
}

/// Calls `f(first_block, last_block)` for every Data/Metadata/Zero record in
/// `[from, to)` that is still unconsumed when read (stops at the first record
/// that is invalid or already committed: its space may be reused).
fn ring_blocks(sh: &Shared, from: u64, to: u64, mut f: impl FnMut(u64, u64)) {
    if from >= to || to - from > sh.layout().ring_capacity {
        return;
    }
    let _ = walk(sh, from, to, |pos, h| {
        if sh.tail().load(SeqCst) > pos {
            return false;
        }
        if h.kind != K_TAG {
            if let Some((a, b)) = sh.block_span(h.offset, h.len) {
                f(a, b);
            }
        }
        true
    });
}

/// The filter-facing contract (see [`crate::sink`]), as implemented here:
///
/// - `begin` increments the in-flight counter of every extent the range
///   touches (so a crash from now on marks them dirty) and, the first time an
///   extent is written after a persist, makes it durable in the activity log
///   (one `fdatasync` of a small file; the only blocking I/O on the write
///   path, amortised over the persist interval). The ticket's `cookie` is the
///   number of extents pinned. Ranges beyond the volume end are clamped.
/// - `complete_write` / `complete_zero` record the change (ring or bitmap, per
///   the mode rules) under the write mutex, then release the extents. No
///   allocation; one mutex acquisition; one memcpy of the payload.
/// - `abort` sets the range's bits in `active` (the write may have partly
///   happened), then releases the extents.
/// - `note_read` only updates statistics.
impl ChangeSink for ChangeLog {
    fn begin(&self, offset: u64, len: u64) -> WriteTicket {
        let inner = &*self.inner;
        let mut n = 0;
        if let Some((a, b)) = inner.extent_span(offset, len) {
            for e in a..=b {
                inner.sh.inflight(e).fetch_add(1, SeqCst);
            }
            for e in a..=b {
                if inner.hot[(e / 64) as usize].load(SeqCst) & (1 << (e % 64)) == 0 {
                    inner.make_hot(e);
                }
            }
            n = b - a + 1;
        }
        WriteTicket {
            offset,
            len,
            cookie: n,
        }
    }

    fn complete_write(&self, ticket: WriteTicket, data: &[u8]) {
        let inner = &*self.inner;
        let sh = &inner.sh;
        let (offset, len) = (ticket.offset, ticket.len);
        sh.bump(stat::WRITES, 1);
        sh.bump(stat::WRITE_BYTES, len);
        sh.bump(stat::WRITE_HIST + hist_bucket(len), 1);
        let vol = sh.layout().volume_size;
        if data.len() as u64 != len {
            warn!(
                offset,
                len,
                data_len = data.len(),
                "complete_write with a payload of the wrong length; recording the range as dirty"
            );
            let _g = lock(&inner.w);
            sh.mark_active(offset, len);
        } else if len > 0 && offset < vol {
            let l = len.min(vol - offset);
            inner.record(K_DATA, offset, l, &data[..l as usize], now_ns());
        }
        inner.finish(offset, len);
    }

    fn complete_zero(&self, ticket: WriteTicket) {
        let inner = &*self.inner;
        let sh = &inner.sh;
        let (offset, len) = (ticket.offset, ticket.len);
        sh.bump(stat::ZERO_OPS, 1);
        sh.bump(stat::ZERO_BYTES, len);
        let vol = sh.layout().volume_size;
        if len > 0 && offset < vol {
            inner.record(K_ZERO, offset, len.min(vol - offset), &[], now_ns());
        }
        inner.finish(offset, len);
    }

    fn abort(&self, ticket: WriteTicket) {
        let inner = &*self.inner;
        inner.sh.bump(stat::ABORTS, 1);
        {
            let _g = lock(&inner.w);
            inner.sh.mark_active(ticket.offset, ticket.len);
        }
        inner.finish(ticket.offset, ticket.len);
    }

    fn note_read(&self, len: u64) {
        let sh = &self.inner.sh;
        sh.bump(stat::READS, 1);
        sh.bump(stat::READ_BYTES, len);
        sh.bump(stat::READ_HIST + hist_bucket(len), 1);
    }
}
