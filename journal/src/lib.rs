//! The target side of rewind (design §7): a durable **spool** of received
//! chunks, **copy-on-write apply** to the replica with an **undo journal**,
//! and **point-in-time reads** (the primitive virtual snapshots build on).
//!
//! One [`TargetVolume`] owns one per-volume target directory:
//!
//! ```text
//! <dir>/identity                 versioned identity (name, uuid, generation, size, block size, replica path)
//! <dir>/spool/<16 hex>.spl       append-only spool files (chunks received, not yet applied)
//! <dir>/journal/<16 hex>.seg     append-only undo-journal segments
//! <dir>/journal/<16 hex>.idx     index sidecar of a sealed segment (derived, verified before use)
//! <dir>/bookmarks.log            bookmarks (tags), durable; mirrored in catalogue.sqlite
//! <dir>/catalogue.sqlite         segments + bookmarks index (derived, rebuilt at open)
//! <dir>/retention, rollback      oldest kept point; rollback intent (only mid-rollback)
//! <dir>/pins/*.pin               live snapshot views of other processes
//! ```
//!
//! Modules, one concept each: `spool` (receipt, group commit, reclaim),
//! `apply` (copy-on-write apply, tail re-apply), `segment` (segment files,
//! record scan, undo payload reads), `sidecar` (per-segment index sidecars),
//! `catalogue` (SQLite), `bookmark`, `point` (recovery point resolution),
//! `view` (shared index, snapshot views, materialize), `dirview` (views from
//! another process), `rollback`, `retention` (policy, prune, compaction),
//! `summary`, `fault` (crash points).
//!
//! Byte layouts and the crash-recovery argument are in `docs/journal-format.md`.
//!
//! # Use from the network side (adapter in `tools`)
//!
//! ```text
//! handshake:  TargetVolume::open_checked(dir, &identity, opts)   // IdentityMismatch = refuse (split brain)
//!             -> report durable_seq() as the resume point
//! per frame:  spool_many(&[ChunkIn..])?                          // durable on return
//!             -> Ack{ durable_seq() }
//!             flow control: spool_bytes() vs spool_budget(); SpoolFull = apply first, retry
//! apply task: apply_batch() in a loop (or apply_all()); counters() for status
//! resync:     block_hashes(offset, len, block) / resize(new_size)
//! tags:       record_bookmark(Bookmark{..})                      // durable on return, idempotent by uuid
//! ```
//!
//! # Recovery (CLI side)
//!
//! ```text
//! list:       recovery_points() / bookmarks() / summary()
//! resolve:    resolve(&RecoveryPoint::{Latest, Bookmark, BookmarkAtOrBefore, Time, Seq})
//! vsnap:      snapshot(&rp) (same process) or SnapshotView::open_dir(dir, &rp) (other process)
//!             -> view.read_at(buf, offset) from any thread; replication keeps applying
//! physical:   view.materialize(path, |done, total| ..)
//! failover:   rollback_to(&rp, discard_spool)                    // replica itself goes back
//! retention:  set_retention(Some(policy)); prune(now_ns); retention_status()
//! group:      latest_common_bookmark(&[&vol_a, &vol_b])
//! ```
//!
//! # Guarantees
//!
//! * **Durable ack**: when [`TargetVolume::spool`] / [`TargetVolume::spool_many`]
//!   returns `Ok`, every chunk it reports as stored is fdatasync'ed in a spool
//!   file and survives a crash; the caller may acknowledge up to
//!   [`TargetVolume::durable_seq`].
//! * **Idempotence**: an ordered chunk whose `last_seq <= durable_seq` is a
//!   [`SpoolOutcome::Duplicate`] and is not stored again. Sequence gaps are
//!   accepted (bitmap-mode writes consume sequence numbers) and counted.
//! * **Ordering**: chunks are applied exactly in the order they were spooled
//!   (spool order = chunk id order), whatever their sequence numbers.
//! * **Copy-on-write**: the old contents of every range a chunk overwrites are
//!   durable in the undo journal *before* the replica is written; a chunk is
//!   marked applied (commit record) only after the replica writes are
//!   fdatasync'ed. A crash at any point recovers on [`TargetVolume::open`]
//!   (journaled-but-uncommitted chunks are re-written to the replica without
//!   reading new undo data, so the undo data is always the bytes read before the
//!   first attempt).
//! * **Errors poison the handle**: after any I/O error (or injected fault)
//!   during a mutating call, further calls return [`JournalError::Poisoned`];
//!   drop the handle and reopen, which runs recovery (the fsync-gate rule: never
//!   retry a failed fsync on the same state).
//! * **Full disk** (`ENOSPC`/`EDQUOT`, [`JournalError::is_no_space`]) is such
//!   an I/O error, wherever it hits: a spool group append (the call fails, so
//!   nothing of it was acknowledged), an undo append (the replica is not
//!   touched yet), a replica write (the undo records are durable: reopen
//!   re-writes the chunk from them, idempotently by chunk id), a commit record
//!   (reopen re-applies the chunk), a new spool file or segment (a torn
//!   header is removed at open), a bookmark. Reopening runs the usual
//!   recovery; it first fdatasyncs the spool files, the last segment and the
//!   bookmark log, because a failed write that was *not* a crash leaves
//!   complete but unsynced records in the page cache that recovery would
//!   otherwise trust. Reopening needs no free space unless there is a tail to
//!   re-apply (the catalogue is skipped, with a warning, when SQLite cannot
//!   write), so the owner retries it until space is back.
//! * Data read from disk is checksummed (blake3) and never used unverified; a
//!   torn tail (crash mid-append) is truncated on open with a warning; any
//!   other corruption is a [`JournalError::Corrupt`].

#![deny(missing_docs)]

mod apply;
mod bookmark;
mod catalogue;
mod dirview;
mod error;
pub mod fault;
mod format;
mod fsutil;
mod identity;
mod point;
mod retention;
mod rollback;
mod segment;
mod sidecar;
mod spool;
mod summary;
mod types;
mod view;

pub use apply::ApplyJob;
pub use bookmark::{Bookmark, BookmarkKind, BookmarkOutcome};
/// The shared byte buffer of [`ExtentData::Data`].
pub use bytes::Bytes;
pub use error::{JournalError, Result};
pub use fault::{FaultAction, FaultConfig, FaultPoint};
pub use point::{BookmarkInfo, RecoveryPoint, RecoveryPoints, ResolvedPoint};
pub use retention::{PruneReport, RetentionPolicy, RetentionStatus, SparseTier};
pub use rollback::RollbackReport;
pub use summary::Summary;
pub use types::*;
pub use view::{latest_common_bookmark, MaterializeStats, SnapshotView, VIEW_LOCK_PIECE};

use error::ioe;
use format::*;
use fsutil::*;
use identity::*;
use segment::Segment;
use spool::{Pending, SpoolFile};
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::warn;
use view::Shared;

/// Maximum length of one undo extent: larger writes are split so that a
/// point-in-time read of a small range decodes at most this much.
pub const UNDO_PIECE: u64 = 1 << 20;

pub(crate) const IDENTITY_FILE: &str = "identity";
pub(crate) const SPOOL_DIR: &str = "spool";
pub(crate) const JOURNAL_DIR: &str = "journal";
pub(crate) const CATALOGUE_FILE: &str = "catalogue.sqlite";

/// One protected volume at the target: spool + replica + undo journal.
///
/// Not `Sync`-shared: the owner serialises spool, apply and reads (the network
/// adapter holds it behind a mutex or in a single task).
pub struct TargetVolume {
    pub(crate) _lock: File,
    pub(crate) dir: PathBuf,
    pub(crate) ident: VolumeIdentity,
    pub(crate) replica_path: PathBuf,
    pub(crate) replica: File,
    pub(crate) replica_is_file: bool,
    /// The replica is a regular file on another file system than `dir`
    /// (checked once at open; see [`TargetOptions::min_free_bytes`]).
    pub(crate) replica_elsewhere: bool,
    pub(crate) opts: TargetOptions,
    pub(crate) faults: fault::Faults,
    pub(crate) poisoned: bool,
    /// What direct applies (inside `spool_many`) applied since the last
    /// [`TargetVolume::take_direct_applied`].
    pub(crate) direct_applied: Option<Applied>,
    /// [`TargetVolume::set_incoming_backlog`].
    pub(crate) incoming_backlog: bool,
    /// Undo data compressor (lent to a running apply step, then returned).
    pub(crate) undo_encoder: Option<apply::UndoEncoder>,
    pub(crate) catalogue: Option<catalogue::Catalogue>,
    // spool
    pub(crate) spool_files: VecDeque<SpoolFile>,
    pub(crate) pending: VecDeque<Pending>,
    pub(crate) pending_bytes: u64,
    pub(crate) cached_bytes: u64,
    pub(crate) next_chunk_id: u64,
    pub(crate) durable_seq: u64,
    /// Consistency horizon reached so far: the highest `horizon_seq` of any
    /// chunk spooled (durable in spool records and commit records).
    pub(crate) horizon_max: u64,
    // journal
    pub(crate) segments: Vec<Segment>,
    /// Undo index, applied state and bookmarks, shared with snapshot views.
    pub(crate) shared: Arc<Shared>,
    pub(crate) applied_through: u64,
    pub(crate) applied_seq: u64,
    pub(crate) applied_time_ns: u64,
    pub(crate) commit_written: u64,
    pub(crate) commit_synced: u64,
    pub(crate) counters: Counters,
    /// An [`ApplyJob`] is out (see [`TargetVolume::apply_begin`]); its
    /// chunks have left `pending` but are still counted in `pending_bytes`.
    pub(crate) busy: bool,
    pub(crate) busy_chunks: u64,
    pub(crate) busy_oldest_time_ns: Option<u64>,
    // retention
    pub(crate) retention: Option<RetentionPolicy>,
    /// Set by the last prune when space forced it below the promised window.
    pub(crate) retention_alert: Option<String>,
}

impl TargetVolume {
    /// Create a target directory for `ident` with the replica at `replica_path`
    /// (a file is created or grown to `ident.size`; a block device must be large enough).
    /// Fails with [`JournalError::AlreadyExists`] if `dir` already holds a volume.
    pub fn create(dir: &Path, ident: VolumeIdentity, replica_path: &Path) -> Result<Self> {
        Self::create_with(dir, ident, replica_path, TargetOptions::default())
    }

    /// [`TargetVolume::create`] with options.
    pub fn create_with(
        dir: &Path,
        ident: VolumeIdentity,
        replica_path: &Path,
        opts: TargetOptions,
    ) -> Result<Self> {
        if ident.block_size == 0 || ident.size == 0 {
            return Err(JournalError::Invalid(
                "size and block_size must be > 0".into(),
            ));
        }
        if dir.join(IDENTITY_FILE).exists() {
            return Err(JournalError::AlreadyExists(dir.to_path_buf()));
        }
        for d in [
            dir.to_path_buf(),
            dir.join(SPOOL_DIR),
            dir.join(JOURNAL_DIR),
        ] {
            fs::create_dir_all(&d).map_err(ioe(|| format!("create {}", d.display())))?;
        }
        Self::prepare_replica(replica_path, ident.size)?;
        // Store an absolute path: the daemon may run from another directory.
        let replica_path = fs::canonicalize(replica_path)
            .map_err(ioe(|| format!("canonicalize {}", replica_path.display())))?;
        Self::init_journal(dir, &ident)?;
        write_identity(dir, &ident, &replica_path)?;
        if let Some(parent) = dir.parent() {
            if !parent.as_os_str().is_empty() {
                fsync_dir(parent)?;
            }
        }
        Self::open_with(dir, opts)
    }

    pub(crate) fn prepare_replica(p: &Path, size: u64) -> Result<()> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(p)
            .map_err(ioe(|| format!("open replica {}", p.display())))?;
        let md = f
            .metadata()
            .map_err(ioe(|| format!("stat {}", p.display())))?;
        if md.file_type().is_block_device() {
            let mut f = f;
            let dev = f
                .seek(SeekFrom::End(0))
                .map_err(ioe(|| format!("size of {}", p.display())))?;
            if dev < size {
                return Err(JournalError::Invalid(format!(
                    "replica device {} has {dev} bytes < volume size {size}",
                    p.display()
                )));
            }
        } else if md.len() < size {
            f.set_len(size)
                .and_then(|_| f.sync_all())
                .map_err(ioe(|| format!("grow replica {}", p.display())))?;
        }
        Ok(())
    }

    pub(crate) fn init_journal(dir: &Path, ident: &VolumeIdentity) -> Result<()> {
        let jd = dir.join(JOURNAL_DIR);
        if list_indexed(&jd, "seg")?.is_empty() {
            Self::write_segment_header(&jd, 0, ident)?;
            fsync_dir(&jd)?;
        }
        Ok(())
    }

    /// Open an existing target directory and run recovery (torn tails, re-apply
    /// of journaled-but-uncommitted chunks, spool reclaim).
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, TargetOptions::default())
    }

    /// Open and check that the directory holds `expected.uuid` / `expected.generation`
    /// (the replication handshake's split-brain guard). Size may differ (see [`TargetVolume::resize`]).
    pub fn open_checked(
        dir: &Path,
        expected: &VolumeIdentity,
        opts: TargetOptions,
    ) -> Result<Self> {
        let (found, _) = read_identity(dir)?;
        if found.uuid != expected.uuid || found.generation != expected.generation {
            return Err(JournalError::IdentityMismatch {
                expected: expected.describe(),
                found: found.describe(),
            });
        }
        Self::open_with(dir, opts)
    }

    /// Explicit re-seed: keep the replica, discard spool and journal (they belong to
    /// the old generation), and record the new identity. Points before the re-seed are lost.
    pub fn reseed(dir: &Path, ident: VolumeIdentity, opts: TargetOptions) -> Result<Self> {
        let lock = lock_dir(dir)?;
        let (_, replica) = read_identity(dir)?;
        Self::prepare_replica(&replica, ident.size)?;
        for (sub, ext) in [
            (SPOOL_DIR, "spl"),
            (JOURNAL_DIR, "seg"),
            (JOURNAL_DIR, "idx"),
            (JOURNAL_DIR, "idx.tmp"),
        ] {
            let d = dir.join(sub);
            for (_, p) in list_indexed(&d, ext)? {
                fs::remove_file(&p).map_err(ioe(|| format!("remove {}", p.display())))?;
            }
            fsync_dir(&d)?;
        }
        retention::remove_base(dir)?;
        for f in [bookmark::BOOKMARK_FILE, rollback::ROLLBACK_FILE] {
            match fs::remove_file(dir.join(f)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(JournalError::Io {
                        context: format!("remove {}", dir.join(f).display()),
                        source: e,
                    })
                }
            }
        }
        Self::init_journal(dir, &ident)?;
        write_identity(dir, &ident, &replica)?;
        warn!(dir = %dir.display(), identity = %ident.describe(), "target volume re-seeded: spool and journal discarded");
        drop(lock);
        Self::open_with(dir, opts)
    }

    /// [`TargetVolume::open`] with options.
    pub fn open_with(dir: &Path, opts: TargetOptions) -> Result<Self> {
        let lock = lock_dir(dir)?;
        Self::open_locked(dir, opts, lock)
    }

    /// Open with the directory lock already held (`lock`).
    pub(crate) fn open_locked(dir: &Path, opts: TargetOptions, lock: File) -> Result<Self> {
        let (ident, replica_path) = read_identity(dir)?;
        let replica = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&replica_path)
            .map_err(ioe(|| format!("open replica {}", replica_path.display())))?;
        no_readahead(&replica, &replica_path);
        let replica_md = replica
            .metadata()
            .map_err(ioe(|| format!("stat {}", replica_path.display())))?;
        let replica_is_file = replica_md.file_type().is_file();
        // A regular-file replica on another file system than the journal
        // needs its own free space for new blocks (see `min_free_bytes`).
        let replica_elsewhere = replica_is_file && {
            use std::os::unix::fs::MetadataExt;
            fs::metadata(dir)
                .map(|d| d.dev() != replica_md.dev())
                .unwrap_or(false)
        };
        let undo_encoder = Some(apply::UndoEncoder::new(opts.undo_compression).map_err(ioe(
            || format!("undo compression {}", opts.undo_compression),
        ))?);
        let mut faults = fault::Faults::new(FaultConfig::from_env());
        rollback::resume(dir, &ident, &replica, &mut faults)?;
        let shared = Arc::new(Shared::new(&replica_path, ident.size)?);
        let mut v = TargetVolume {
            _lock: lock,
            dir: dir.to_path_buf(),
            ident,
            replica_path,
            replica,
            replica_is_file,
            replica_elsewhere,
            opts,
            faults,
            poisoned: false,
            direct_applied: None,
            incoming_backlog: false,
            undo_encoder,
            catalogue: None,
            spool_files: VecDeque::new(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            cached_bytes: 0,
            next_chunk_id: 1,
            durable_seq: 0,
            horizon_max: 0,
            segments: Vec::new(),
            shared,
            applied_through: 0,
            applied_seq: 0,
            applied_time_ns: 0,
            commit_written: 0,
            commit_synced: 0,
            counters: Counters::default(),
            busy: false,
            busy_chunks: 0,
            busy_oldest_time_ns: None,
            retention: None,
            retention_alert: None,
        };
        let (records, tail_start, journal_top) = v.load_journal()?;
        let bookmarks = v.load_bookmarks()?;
        {
            let mut idx = v.index_mut();
            idx.records = records;
            idx.reindex();
            idx.bookmarks = bookmarks;
        }
        if let Some(base) = retention::load_base(dir)? {
            // Finishes a prune interrupted after its new base became durable.
            v.apply_base(base, false)?;
        }
        v.publish_applied();
        v.load_spool(journal_top)?;
        v.sync_loaded()?;
        v.recover_tail(tail_start)?;
        v.reclaim()?;
        match v.open_catalogue() {
            Ok(cat) => v.catalogue = Some(cat),
            // Derived data: serving without it only loses the indexed lookups
            // (`catalogue_sealed_before`); it is rebuilt at the next open. On
            // a full disk SQLite cannot write, and the volume must still open
            // so that replication resumes the moment space is back.
            Err(e) => {
                warn!(error = %e, "catalogue not rebuilt (retried at the next open)");
            }
        }
        Ok(v)
    }

    fn open_catalogue(&self) -> Result<catalogue::Catalogue> {
        let mut cat = catalogue::Catalogue::open(&self.dir.join(CATALOGUE_FILE))?;
        cat.rebuild(&self.segments())?;
        cat.rebuild_bookmarks(&self.index().bookmarks)?;
        Ok(cat)
    }

    /// Make durable what recovery is about to trust. After a failed write
    /// without a crash (e.g. `ENOSPC` part-way through a group append) the
    /// records written before the failure are complete in the page cache but
    /// were never fdatasync'ed; a reopen in the same boot reads them as valid.
    /// Spool records then count towards `durable_seq` (and are acknowledged
    /// as duplicates on re-delivery), bookmark records as recorded, and undo
    /// records are re-applied by `recover_tail`, which writes the replica:
    /// each of those must be on stable storage first, or a power loss later
    /// could lose an acknowledged chunk or leave a replica write without its
    /// undo data. After a crash this is a no-op (the pages are clean).
    fn sync_loaded(&mut self) -> Result<()> {
        if let Some(s) = self.segments.last() {
            s.sf.file
                .sync_data()
                .map_err(ioe(|| format!("fdatasync {}", s.sf.path.display())))?;
        }
        for f in &self.spool_files {
            f.file
                .sync_data()
                .map_err(ioe(|| format!("fdatasync {}", f.path.display())))?;
        }
        let b = self.dir.join(bookmark::BOOKMARK_FILE);
        match File::open(&b) {
            Ok(f) => f
                .sync_data()
                .map_err(ioe(|| format!("fdatasync {}", b.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(JournalError::Io {
                    context: format!("open {}", b.display()),
                    source: e,
                })
            }
        }
        self.counters.fsyncs += 1;
        Ok(())
    }

    /// Copy the applied state into the shared index (after a commit or at open).
    pub(crate) fn publish_applied(&self) {
        let mut idx = self.index_mut();
        idx.applied_through = self.applied_through;
        idx.applied_seq = self.applied_seq;
        idx.applied_time_ns = self.applied_time_ns;
        idx.size = self.ident.size;
    }

    /// Check the header of a spool file or segment being opened: magic, version,
    /// checksum, and that it belongs to this volume, generation and file index.
    /// A bad header on a file the caller may drop (`removable`: the newest file,
    /// no records, so a crash during its creation) is a torn creation: the file is
    /// removed, logged and counted, and `None` returned. Anything else is `Corrupt`.
    pub(crate) fn check_file_header(
        &mut self,
        path: &Path,
        bytes: &[u8],
        magic: &[u8; 8],
        index: u64,
        removable: bool,
    ) -> Result<Option<FileHeader>> {
        let hdr = match decode_file_header(bytes, magic) {
            Ok(h) => h,
            Err(reason) if removable => {
                warn!(path = %path.display(), %reason, "removing torn new file (crash during creation)");
                fs::remove_file(path).map_err(ioe(|| format!("remove {}", path.display())))?;
                self.counters.torn_tails += 1;
                return Ok(None);
            }
            Err(reason) => return Err(error::corrupt(path, 0, reason)),
        };
        if hdr.uuid != self.ident.uuid || hdr.generation != self.ident.generation {
            return Err(error::corrupt(
                path,
                0,
                "file belongs to another volume or generation",
            ));
        }
        if hdr.index != index {
            return Err(error::corrupt(
                path,
                0,
                format!("header index {} does not match the file name", hdr.index),
            ));
        }
        Ok(Some(hdr))
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.poisoned {
            Err(JournalError::Poisoned)
        } else {
            Ok(())
        }
    }

    pub(crate) fn guard<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    pub(crate) fn validate(&self, c: &ChunkIn) -> Result<()> {
        if c.first_seq > c.last_seq || (c.first_seq == 0) != (c.last_seq == 0) {
            return Err(JournalError::InvalidChunk(format!(
                "bad sequence range {}..{}",
                c.first_seq, c.last_seq
            )));
        }
        if c.extents.len() > u32::MAX as usize {
            return Err(JournalError::InvalidChunk("too many extents".into()));
        }
        for e in &c.extents {
            if e.offset
                .checked_add(e.data.len())
                .is_none_or(|end| end > self.ident.size)
            {
                return Err(JournalError::InvalidChunk(format!(
                    "extent {}+{} outside volume of {} bytes",
                    e.offset,
                    e.data.len(),
                    self.ident.size
                )));
            }
        }
        Ok(())
    }

    /// blake3 of each `hash_block`-sized block of the replica in `offset..offset+len`
    /// (the last block may be short), after applying everything spooled (resync step 1).
    pub fn block_hashes(
        &mut self,
        offset: u64,
        len: u64,
        hash_block: u64,
    ) -> Result<Vec<[u8; 32]>> {
        if hash_block == 0 {
            return Err(JournalError::Invalid("hash_block must be > 0".into()));
        }
        self.check_range(offset, len)?;
        self.apply_all()?;
        let mut out = Vec::with_capacity(len.div_ceil(hash_block) as usize);
        let per = (4u64 << 20).max(hash_block) / hash_block * hash_block;
        let mut buf = vec![0u8; per.min(len) as usize];
        let mut o = offset;
        let end = offset + len;
        while o < end {
            let k = (end - o).min(per) as usize;
            self.replica
                .read_exact_at(&mut buf[..k], o)
                .map_err(ioe(|| {
                    format!("read replica {}", self.replica_path.display())
                }))?;
            for b in buf[..k].chunks(hash_block as usize) {
                out.push(hash32(b));
            }
            o += k as u64;
        }
        Ok(out)
    }

    /// Grow the volume to `new_size` (applies everything spooled first; a replica file is
    /// extended, a replica device must already be large enough). Shrinking is refused.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        self.check()?;
        self.check_idle("resize")?;
        if new_size < self.ident.size {
            return Err(JournalError::Invalid(format!(
                "shrinking from {} to {new_size} is not supported",
                self.ident.size
            )));
        }
        self.apply_all()?;
        let r = (|| {
            Self::prepare_replica(&self.replica_path, new_size)?;
            let mut id = self.ident.clone();
            id.size = new_size;
            write_identity(&self.dir, &id, &self.replica_path)?;
            self.ident = id;
            self.publish_applied();
            Ok(())
        })();
        self.guard(r)
    }

    /// Set (or clear) the fault injection configuration (tests).
    pub fn set_fault(&mut self, cfg: Option<FaultConfig>) {
        self.faults = fault::Faults::new(cfg);
    }

    /// The volume identity.
    pub fn identity(&self) -> &VolumeIdentity {
        &self.ident
    }

    /// Path of the replica.
    pub fn replica_path(&self) -> &Path {
        &self.replica_path
    }

    /// Whether the replica is a regular file (rather than a block device).
    pub fn replica_is_file(&self) -> bool {
        self.replica_is_file
    }

    /// Highest sequence number durable at the target (spooled or applied). Survives restarts.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// What `spool_many` applied itself since the last call (direct apply,
    /// [`TargetOptions::direct_apply`]), summed like one apply call; `None`
    /// if nothing. Lets a caller count applied bytes whichever path applied them.
    pub fn take_direct_applied(&mut self) -> Option<Applied> {
        self.direct_applied.take()
    }

    /// Tells the next `spool_many` calls whether more input was already
    /// waiting when their chunks were taken (the source sends faster than
    /// this target stores). While set, direct apply
    /// ([`TargetOptions::direct_apply`]) is not used: the chunks are spooled,
    /// so the spool absorbs the burst and apply catches up behind it, instead
    /// of the source waiting for each in-place apply. No effect without
    /// direct apply.
    pub fn set_incoming_backlog(&mut self, backlog: bool) {
        self.incoming_backlog = backlog;
    }

    /// Highest sequence number applied to the replica (commit durable or recovered on open).
    pub fn applied_seq(&self) -> u64 {
        self.applied_seq
    }

    /// Payload bytes spooled and not yet applied (for flow control against the budget).
    pub fn spool_bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// The configured spool budget.
    pub fn spool_budget(&self) -> u64 {
        self.opts.spool_budget_bytes
    }

    /// Chunks spooled and not yet applied (including an apply step in progress).
    pub fn pending_chunks(&self) -> usize {
        self.pending.len() + self.busy_chunks as usize
    }

    /// Metadata of all undo records, oldest first.
    pub fn undo_records(&self) -> Vec<UndoRecordInfo> {
        self.index()
            .records
            .iter()
            .map(|r| UndoRecordInfo {
                chunk_id: r.chunk_id,
                first_seq: r.first_seq,
                last_seq: r.last_seq,
                source_time_ns: r.time_ns,
                segment: r.seg.index,
                extents: r.extents.iter().map(|x| (x.offset, x.len)).collect(),
            })
            .collect()
    }

    /// Summary of every journal segment, oldest first (what the catalogue holds).
    pub fn segments(&self) -> Vec<SegmentInfo> {
        let n = self.segments.len();
        let mut v: Vec<SegmentInfo> = self
            .segments
            .iter()
            .enumerate()
            .map(|(i, s)| SegmentInfo {
                index: s.sf.index,
                bytes: s.len,
                sealed: i + 1 < n,
                ..SegmentInfo::default()
            })
            .collect();
        let first = self.segments.first().map_or(0, |s| s.sf.index);
        for r in &self.index().records {
            let Some(si) = v.get_mut((r.seg.index - first) as usize) else {
                continue;
            };
            if si.undo_records == 0 {
                si.first_chunk_id = r.chunk_id;
                si.first_time_ns = r.time_ns;
            }
            si.last_chunk_id = r.chunk_id;
            si.last_time_ns = r.time_ns;
            if r.last_seq != 0 {
                if si.first_seq == 0 {
                    si.first_seq = r.first_seq;
                }
                si.last_seq = r.last_seq;
            }
            si.undo_records += 1;
        }
        v
    }

    /// Catalogue query: indexes of sealed segments whose newest record is at or
    /// before `time_ns` (the input of time-based retention).
    pub fn catalogue_sealed_before(&self, time_ns: u64) -> Result<Vec<u64>> {
        match &self.catalogue {
            Some(c) => c.sealed_before(time_ns),
            None => Err(JournalError::Catalogue("not open".into())),
        }
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> Counters {
        let mut c = self.counters;
        c.durable_seq = self.durable_seq;
        c.applied_seq = self.applied_seq;
        c.pending_chunks = self.pending.len() as u64 + self.busy_chunks;
        c.pending_bytes = self.pending_bytes;
        c.oldest_unapplied_source_time_ns = self
            .busy_oldest_time_ns
            .or_else(|| self.pending.front().map(|p| p.time_ns));
        c.spool_files = self.spool_files.len() as u64;
        c.spool_disk_bytes = self.spool_files.iter().map(|f| f.len).sum();
        c.journal_bytes = self.segments.iter().map(|s| s.len).sum();
        c.journal_segments = self.segments.len() as u64;
        c
    }
}
