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
//! ```
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
//! recovery:   read_at_point(Point::Seq|Time|Latest, offset, len)
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
//! * Data read from disk is checksummed (blake3) and never used unverified; a
//!   torn tail (crash mid-append) is truncated on open with a warning; any
//!   other corruption is a [`JournalError::Corrupt`].

#![deny(missing_docs)]

mod catalogue;
pub mod fault;
mod format;

pub use fault::{FaultAction, FaultConfig, FaultPoint};

use format::*;
use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tracing::{debug, warn};

/// Maximum length of one undo extent: larger writes are split so that a
/// point-in-time read of a small range decodes at most this much.
pub const UNDO_PIECE: u64 = 1 << 20;

const IDENTITY_FILE: &str = "identity";
const SPOOL_DIR: &str = "spool";
const JOURNAL_DIR: &str = "journal";
const CATALOGUE_FILE: &str = "catalogue.sqlite";

/// Errors of the journal crate.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// An I/O system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (with the path).
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// On-disk bytes failed validation (checksum, magic, bounds, version).
    #[error("corrupt {path}: offset {offset}: {reason}")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// Byte offset of the bad header or record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The target directory belongs to another volume or generation (split-brain guard).
    #[error("identity mismatch: target holds {found}, caller expects {expected}")]
    IdentityMismatch {
        /// What the caller expected.
        expected: String,
        /// What the directory holds.
        found: String,
    },
    /// `create` on a directory that already holds a target volume.
    #[error("{0} already holds a target volume (use open or reseed)")]
    AlreadyExists(PathBuf),
    /// A chunk that cannot be spooled (bad sequence range, extent out of range).
    #[error("invalid chunk: {0}")]
    InvalidChunk(String),
    /// Accepting the chunks would exceed the spool budget; apply first, then retry.
    #[error("spool full: {pending} bytes pending + {incoming} incoming > budget {budget}")]
    SpoolFull {
        /// Bytes spooled and not applied.
        pending: u64,
        /// Bytes offered.
        incoming: u64,
        /// The configured budget.
        budget: u64,
    },
    /// The requested point is not (or not yet, or no longer) recoverable.
    #[error("point not available: {0}")]
    PointNotAvailable(String),
    /// A range outside the volume.
    #[error("range {offset}+{len} outside the volume ({size} bytes)")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// A fault injected at a [`FaultPoint`] (tests).
    #[error("injected fault at {0:?}")]
    Injected(FaultPoint),
    /// An earlier mutating call failed; drop the handle and reopen.
    #[error("target volume handle poisoned by an earlier failure; reopen it")]
    Poisoned,
    /// A bad argument.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The SQLite catalogue failed (derived data: it is rebuilt at the next open).
    #[error("catalogue: {0}")]
    Catalogue(String),
    /// Another process (or handle) has the target directory open.
    #[error("{0} is locked by another target process")]
    Locked(PathBuf),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, JournalError>;

fn ioe(context: impl FnOnce() -> String) -> impl FnOnce(io::Error) -> JournalError {
    move |source| JournalError::Io {
        context: context(),
        source,
    }
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> JournalError {
    JournalError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

/// Identity of a protected volume as the target knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeIdentity {
    /// Human-readable volume name (≤ 4 KiB UTF-8).
    pub name: String,
    /// Volume UUID (from the agent's change-log header).
    pub uuid: [u8; 16],
    /// Generation: bumped by the source on re-seed/failback; a mismatch refuses replication.
    pub generation: u64,
    /// Volume size in bytes.
    pub size: u64,
    /// Tracking block size in bytes (resync hash granularity default).
    pub block_size: u32,
}

impl VolumeIdentity {
    fn describe(&self) -> String {
        format!(
            "volume {} uuid {} generation {}",
            self.name,
            hex(&self.uuid),
            self.generation
        )
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Payload of one extent of a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentData {
    /// New bytes.
    Data(Vec<u8>),
    /// This many zero bytes (WRITE_ZEROES / TRIM as zeroes); nothing stored in the spool.
    Zero(u64),
}

impl ExtentData {
    /// Length in bytes on the volume.
    pub fn len(&self) -> u64 {
        match self {
            ExtentData::Data(d) => d.len() as u64,
            ExtentData::Zero(n) => *n,
        }
    }

    /// True when the extent covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One write of a chunk: `data` goes to volume byte `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkExtent {
    /// Byte offset on the volume.
    pub offset: u64,
    /// New contents.
    pub data: ExtentData,
}

/// A chunk as received from the source (already decompressed and verified by the network side).
///
/// Extents are applied in list order (a later extent wins where they overlap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkIn {
    /// First ring sequence number covered (0 together with `last_seq == 0`: unordered resync/bitmap data).
    pub first_seq: u64,
    /// Last ring sequence number covered.
    pub last_seq: u64,
    /// Source timestamp (ns since the Unix epoch, UTC) of the newest write in the chunk.
    pub source_time_ns: u64,
    /// The writes.
    pub extents: Vec<ChunkExtent>,
}

impl ChunkIn {
    /// True for chunks that carry ring sequence numbers.
    pub fn is_ordered(&self) -> bool {
        !(self.first_seq == 0 && self.last_seq == 0)
    }

    /// Bytes of payload stored in the spool (zero extents cost nothing).
    pub fn payload_bytes(&self) -> u64 {
        self.extents
            .iter()
            .map(|e| match &e.data {
                ExtentData::Data(d) => d.len() as u64,
                ExtentData::Zero(_) => 0,
            })
            .sum()
    }
}

/// Result of spooling one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolOutcome {
    /// Stored durably under this chunk id; `durable_seq` may be acknowledged.
    Stored {
        /// Position in apply order.
        chunk_id: u64,
        /// Highest sequence number durable after this call.
        durable_seq: u64,
    },
    /// Already durable (ordered chunk with `last_seq <= durable_seq`): acknowledge, nothing stored.
    Duplicate {
        /// Highest sequence number durable.
        durable_seq: u64,
    },
}

/// Summary of one apply call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Applied {
    /// Chunks applied.
    pub chunks: u64,
    /// First chunk id applied.
    pub first_chunk_id: u64,
    /// Last chunk id applied.
    pub last_chunk_id: u64,
    /// Volume bytes written (data + zeroes).
    pub bytes: u64,
    /// `applied_seq` after the call.
    pub applied_seq: u64,
    /// Source time of the last chunk applied.
    pub last_source_time_ns: u64,
}

/// A recovery point for [`TargetVolume::read_at_point`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// The replica as applied.
    Latest,
    /// The state after the last applied ordered chunk with `last_seq <= s`
    /// (a chunk boundary: a point inside a coalesced chunk resolves to the boundary before it).
    Seq(u64),
    /// The state after the last applied chunk with `source_time_ns <= t`.
    Time(u64),
}

/// Tunables. The defaults suit a production target; tests shrink them.
#[derive(Debug, Clone)]
pub struct TargetOptions {
    /// Spooled-but-unapplied payload bytes above which `spool` returns [`JournalError::SpoolFull`]
    /// (a chunk is always accepted into an empty spool).
    pub spool_budget_bytes: u64,
    /// A spool file is rotated when it would exceed this size.
    pub spool_file_size: u64,
    /// A journal segment is rotated when it would exceed this size.
    pub segment_size: u64,
    /// zstd level for undo data, `None` to store raw. Compressed data is kept only when it saves ≥ 1/8.
    pub undo_zstd_level: Option<i32>,
    /// Apply at most this many chunks per batch (one journal fdatasync + one replica fdatasync per batch).
    pub apply_batch_chunks: usize,
    /// Apply at most about this many volume bytes per batch.
    pub apply_batch_bytes: u64,
    /// Payload bytes of spooled chunks kept in memory so apply does not re-read the spool.
    pub cache_bytes: u64,
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions {
            spool_budget_bytes: 8 << 30,
            spool_file_size: 64 << 20,
            segment_size: 256 << 20,
            undo_zstd_level: Some(1),
            apply_batch_chunks: 1024,
            apply_batch_bytes: 64 << 20,
            cache_bytes: 256 << 20,
        }
    }
}

/// Counters for status (`rewind status`, `cdpcli --displaystatistics`). Monotonic since open unless noted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Chunks stored in the spool.
    pub spooled_chunks: u64,
    /// Payload bytes stored in the spool.
    pub spooled_bytes: u64,
    /// Chunks acknowledged as duplicates.
    pub duplicate_chunks: u64,
    /// Ordered chunks whose `first_seq > durable_seq + 1` (accepted).
    pub seq_gaps: u64,
    /// Chunks applied.
    pub applied_chunks: u64,
    /// Volume bytes applied (data + zeroes).
    pub applied_bytes: u64,
    /// Apply batches.
    pub apply_batches: u64,
    /// Wall time spent applying, ns (apply rate = applied_bytes / apply_ns).
    pub apply_ns: u64,
    /// Highest durable sequence number (current).
    pub durable_seq: u64,
    /// Highest applied sequence number (current).
    pub applied_seq: u64,
    /// Chunks spooled, not applied (current).
    pub pending_chunks: u64,
    /// Payload bytes spooled, not applied (current) = [`TargetVolume::spool_bytes`].
    pub pending_bytes: u64,
    /// Source time of the oldest unapplied chunk (current; `None` when drained).
    pub oldest_unapplied_source_time_ns: Option<u64>,
    /// Spool files on disk (current).
    pub spool_files: u64,
    /// Bytes of spool files on disk (current).
    pub spool_disk_bytes: u64,
    /// Undo records in the journal (current, from open).
    pub journal_records: u64,
    /// Bytes of journal segments (current).
    pub journal_bytes: u64,
    /// Journal segments (current).
    pub journal_segments: u64,
    /// Old bytes covered by undo records written since open.
    pub undo_raw_bytes: u64,
    /// Bytes stored for them (after zero elision and zstd).
    pub undo_stored_bytes: u64,
    /// Replica read calls (old data for undo).
    pub replica_reads: u64,
    /// Replica bytes read.
    pub replica_read_bytes: u64,
    /// Replica write calls.
    pub replica_writes: u64,
    /// Replica bytes written.
    pub replica_write_bytes: u64,
    /// Journal bytes appended since open (the "second write").
    pub journal_write_bytes: u64,
    /// fdatasync/fsync calls.
    pub fsyncs: u64,
    /// Torn tails truncated at open.
    pub torn_tails: u64,
    /// Journaled-but-uncommitted chunks re-applied at open.
    pub recovered_chunks: u64,
}

/// Metadata of one undo record (one applied chunk), oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndoRecordInfo {
    /// Chunk id.
    pub chunk_id: u64,
    /// First sequence number of the chunk.
    pub first_seq: u64,
    /// Last sequence number of the chunk.
    pub last_seq: u64,
    /// Source time of the chunk.
    pub source_time_ns: u64,
    /// Segment index holding it.
    pub segment: u64,
    /// `(offset, len)` of every undo extent.
    pub extents: Vec<(u64, u64)>,
}

/// Summary of one journal segment (also a row of the catalogue table `segments`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Segment index (file name).
    pub index: u64,
    /// First chunk id with an undo record in the segment (0 if none).
    pub first_chunk_id: u64,
    /// Last chunk id with an undo record in the segment.
    pub last_chunk_id: u64,
    /// First sequence number of the first ordered record (0 if none).
    pub first_seq: u64,
    /// Last sequence number of the last ordered record (0 if none).
    pub last_seq: u64,
    /// Source time of the first record.
    pub first_time_ns: u64,
    /// Source time of the last record.
    pub last_time_ns: u64,
    /// Undo records in the segment.
    pub undo_records: u64,
    /// Segment file length.
    pub bytes: u64,
    /// True when a later segment exists (no more appends).
    pub sealed: bool,
}

struct SpoolFile {
    id: u64,
    path: PathBuf,
    file: File,
    len: u64,
    max_chunk_id: u64,
    records: u64,
}

struct Pending {
    chunk_id: u64,
    first_seq: u64,
    last_seq: u64,
    time_ns: u64,
    payload: u64,
    span: u64,
    file_id: u64,
    rec_off: u64,
    rec_len: u64,
    ranges: Vec<(u64, u64)>,
    data: Option<Vec<ChunkExtent>>,
}

struct Segment {
    index: u64,
    path: PathBuf,
    file: File,
    len: u64,
}

#[derive(Clone)]
struct UndoExtent {
    offset: u64,
    len: u64,
    enc: u8,
    stored_len: u64,
    hash: [u8; 32],
    file_off: u64,
}

struct UndoRec {
    chunk_id: u64,
    first_seq: u64,
    last_seq: u64,
    time_ns: u64,
    seg: usize,
    rec_off: u64,
    extents: Vec<UndoExtent>,
}

/// One protected volume at the target: spool + replica + undo journal.
///
/// Not `Sync`-shared: the owner serialises spool, apply and reads (the network
/// adapter holds it behind a mutex or in a single task).
pub struct TargetVolume {
    _lock: File,
    dir: PathBuf,
    ident: VolumeIdentity,
    replica_path: PathBuf,
    replica: File,
    replica_is_file: bool,
    opts: TargetOptions,
    faults: fault::Faults,
    poisoned: bool,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    catalogue: Option<catalogue::Catalogue>,
    // spool
    spool_files: VecDeque<SpoolFile>,
    pending: VecDeque<Pending>,
    pending_bytes: u64,
    cached_bytes: u64,
    next_chunk_id: u64,
    durable_seq: u64,
    // journal
    segments: Vec<Segment>,
    records: Vec<UndoRec>,
    applied_through: u64,
    applied_seq: u64,
    applied_time_ns: u64,
    commit_written: u64,
    commit_synced: u64,
    counters: Counters,
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn fsync_dir(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|d| d.sync_all())
        .map_err(ioe(|| format!("fsync directory {}", p.display())))
}

/// Sorted `(index, path)` of files `<16 hex>.<ext>` in `dir`; other names are ignored.
fn list_indexed(dir: &Path, ext: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    let rd = fs::read_dir(dir).map_err(ioe(|| format!("read directory {}", dir.display())))?;
    for e in rd {
        let e = e.map_err(ioe(|| format!("read directory {}", dir.display())))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(ext).and_then(|s| s.strip_suffix('.')) else {
            continue;
        };
        if stem.len() != 16 {
            continue;
        }
        if let Ok(i) = u64::from_str_radix(stem, 16) {
            v.push((i, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

/// Take an exclusive `flock` on `<dir>/lock` (released by the kernel when the process dies).
fn lock_dir(dir: &Path) -> Result<File> {
    let p = dir.join("lock");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .map_err(ioe(|| format!("open {}", p.display())))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a valid, open file descriptor owned by `f`; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Err(JournalError::Locked(dir.to_path_buf()));
        }
        return Err(JournalError::Io {
            context: format!("flock {}", p.display()),
            source: e,
        });
    }
    Ok(f)
}

fn encode_identity(id: &VolumeIdentity, replica: &Path) -> Result<Vec<u8>> {
    let name = id.name.as_bytes();
    let path = replica.as_os_str().as_bytes();
    if name.len() > 4096 || path.len() > 4096 {
        return Err(JournalError::Invalid(
            "name or replica path too long".into(),
        ));
    }
    let mut b = Vec::with_capacity(64 + name.len() + path.len() + 32);
    b.extend_from_slice(&IDENTITY_MAGIC);
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    let total = (56 + name.len() + path.len() + 32) as u32;
    b.extend_from_slice(&total.to_le_bytes());
    b.extend_from_slice(&id.uuid);
    b.extend_from_slice(&id.generation.to_le_bytes());
    b.extend_from_slice(&id.size.to_le_bytes());
    b.extend_from_slice(&id.block_size.to_le_bytes());
    b.extend_from_slice(&(name.len() as u16).to_le_bytes());
    b.extend_from_slice(&(path.len() as u16).to_le_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(path);
    let h = hash32(&b);
    b.extend_from_slice(&h);
    Ok(b)
}

fn decode_identity(b: &[u8], path: &Path) -> Result<(VolumeIdentity, PathBuf)> {
    let bad = |r: &str| corrupt(path, 0, r);
    if b.len() < 56 + 32 {
        return Err(bad("identity file too short"));
    }
    if b[0..8] != IDENTITY_MAGIC {
        return Err(bad("bad identity magic"));
    }
    let total = rd32(b, 12) as usize;
    if total != b.len() {
        return Err(bad("identity length mismatch"));
    }
    if hash32(&b[..total - 32]) != b[total - 32..] {
        return Err(bad("identity checksum mismatch"));
    }
    let v = rd32(b, 8);
    if v != FORMAT_VERSION {
        return Err(bad(&format!("unsupported identity version {v}")));
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&b[16..32]);
    let nl = rd16(b, 52) as usize;
    let pl = rd16(b, 54) as usize;
    if 56 + nl + pl + 32 != total {
        return Err(bad("identity field lengths"));
    }
    let name = String::from_utf8(b[56..56 + nl].to_vec()).map_err(|_| bad("name not UTF-8"))?;
    let rp = PathBuf::from(std::ffi::OsStr::from_bytes(&b[56 + nl..56 + nl + pl]));
    Ok((
        VolumeIdentity {
            name,
            uuid,
            generation: rd64(b, 32),
            size: rd64(b, 40),
            block_size: rd32(b, 48),
        },
        rp,
    ))
}

fn write_identity(dir: &Path, id: &VolumeIdentity, replica: &Path) -> Result<()> {
    let b = encode_identity(id, replica)?;
    let tmp = dir.join("identity.tmp");
    let fin = dir.join(IDENTITY_FILE);
    (|| -> io::Result<()> {
        let f = File::create(&tmp)?;
        f.write_all_at(&b, 0)?;
        f.sync_all()?;
        fs::rename(&tmp, &fin)
    })()
    .map_err(ioe(|| format!("write {}", fin.display())))?;
    fsync_dir(dir)
}

fn read_identity(dir: &Path) -> Result<(VolumeIdentity, PathBuf)> {
    let p = dir.join(IDENTITY_FILE);
    let b = fs::read(&p).map_err(ioe(|| format!("read {}", p.display())))?;
    decode_identity(&b, &p)
}

/// Read as many bytes as available at `off` (short at EOF).
fn read_fill(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn is_zero(b: &[u8]) -> bool {
    let mut it = b.chunks_exact(64);
    for c in &mut it {
        if c.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    it.remainder().iter().all(|&x| x == 0)
}

/// Parse one spool record at the start of `b`; returns header, extents and record length.
fn parse_spool_record(
    b: &[u8],
) -> std::result::Result<(RecHeader, Vec<ChunkExtent>, usize), String> {
    if b.len() < REC_HDR {
        return Err("truncated record header".into());
    }
    let h = decode_rec_header(&b[..REC_HDR]);
    if h.magic != REC_SPOOL {
        return Err("bad record magic".into());
    }
    let total = record_len(&h).ok_or("record length overflow")?;
    if total > b.len() as u64 {
        return Err("record extends past end of file".into());
    }
    let total = total as usize;
    let body_end = REC_HDR + h.body_len as usize;
    if hash32(&b[..body_end]) != b[body_end..total] {
        return Err("record checksum mismatch".into());
    }
    let table = (h.n_extents as u64)
        .checked_mul(SPOOL_ENTRY as u64)
        .filter(|t| *t <= h.body_len)
        .ok_or("extent table larger than record")? as usize;
    let mut cur = REC_HDR + table;
    let mut exts = Vec::with_capacity(h.n_extents as usize);
    for i in 0..h.n_extents as usize {
        let e = &b[REC_HDR + i * SPOOL_ENTRY..REC_HDR + (i + 1) * SPOOL_ENTRY];
        let offset = rd64(e, 0);
        let len = rd64(e, 8);
        match e[16] {
            SPOOL_DATA => {
                let end = (cur as u64)
                    .checked_add(len)
                    .filter(|x| *x <= body_end as u64)
                    .ok_or("extent payload past record")? as usize;
                exts.push(ChunkExtent {
                    offset,
                    data: ExtentData::Data(b[cur..end].to_vec()),
                });
                cur = end;
            }
            SPOOL_ZERO => exts.push(ChunkExtent {
                offset,
                data: ExtentData::Zero(len),
            }),
            k => return Err(format!("unknown extent kind {k}")),
        }
    }
    if cur != body_end {
        return Err("payload length mismatch".into());
    }
    Ok((h, exts, total))
}

fn encode_spool_record(out: &mut Vec<u8>, id: u64, group: u64, flags: u8, c: &ChunkIn) {
    let start = out.len();
    let n = c.extents.len();
    let h = RecHeader {
        magic: REC_SPOOL,
        flags,
        body_len: (n * SPOOL_ENTRY) as u64 + c.payload_bytes(),
        id,
        first_seq: c.first_seq,
        last_seq: c.last_seq,
        time_ns: c.source_time_ns,
        n_extents: n as u32,
        aux: group,
    };
    encode_rec_header(&h, out);
    for e in &c.extents {
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.data.len().to_le_bytes());
        let kind = match e.data {
            ExtentData::Data(_) => SPOOL_DATA,
            ExtentData::Zero(_) => SPOOL_ZERO,
        };
        out.extend_from_slice(&[kind, 0, 0, 0, 0, 0, 0, 0]);
    }
    for e in &c.extents {
        if let ExtentData::Data(d) = &e.data {
            out.extend_from_slice(d);
        }
    }
    let hh = hash32(&out[start..]);
    out.extend_from_slice(&hh);
}

/// Parse the header + extent table of an undo record read from a segment.
fn parse_undo_table(
    h: &RecHeader,
    table: &[u8],
    rec_off: u64,
) -> std::result::Result<Vec<UndoExtent>, String> {
    let n = h.n_extents as usize;
    let mut cur = rec_off + (REC_HDR + n * UNDO_ENTRY) as u64;
    let end = rec_off + REC_HDR as u64 + h.body_len;
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let e = &table[i * UNDO_ENTRY..(i + 1) * UNDO_ENTRY];
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&e[32..64]);
        let x = UndoExtent {
            offset: rd64(e, 0),
            len: rd64(e, 8),
            enc: e[16],
            stored_len: rd64(e, 24),
            hash,
            file_off: cur,
        };
        let ok = match x.enc {
            ENC_RAW => x.stored_len == x.len,
            ENC_ZSTD => true,
            ENC_ZERO => x.stored_len == 0,
            _ => false,
        };
        if !ok || x.len > UNDO_PIECE {
            return Err(format!("bad undo extent {i}"));
        }
        cur = cur
            .checked_add(x.stored_len)
            .filter(|c| *c <= end)
            .ok_or("undo payload past record")?;
        v.push(x);
    }
    if cur != end {
        return Err("undo payload length mismatch".into());
    }
    Ok(v)
}

/// Encode old bytes for the journal: zero elision, then zstd when it saves ≥ 1/8
/// (pieces over 8 KiB are tried only if their first 4 KiB compress).
fn encode_old(old: Vec<u8>, z: Option<&mut zstd::bulk::Compressor<'static>>) -> (u8, Vec<u8>) {
    if is_zero(&old) {
        return (ENC_ZERO, Vec::new());
    }
    if let Some(z) = z {
        // Sample the first 4 KiB of larger pieces: incompressible data (already
        // compressed or encrypted volumes) then costs 4 KiB of zstd, not the whole piece.
        const SAMPLE: usize = 4096;
        if old.len() > 2 * SAMPLE {
            match z.compress(&old[..SAMPLE]) {
                Ok(c) if c.len() <= SAMPLE - SAMPLE / 8 => {}
                _ => return (ENC_RAW, old),
            }
        }
        if let Ok(c) = z.compress(&old) {
            if c.len() <= old.len() - old.len() / 8 {
                return (ENC_ZSTD, c);
            }
        }
    }
    (ENC_RAW, old)
}

/// Search `b` (bytes after a bad record, `b[0]` is the bad record) for a valid record of `magic`
/// accepted by `accept`.
fn later_valid(b: &[u8], magic: u32, accept: impl Fn(&[u8]) -> bool) -> bool {
    let m = magic.to_le_bytes();
    let mut p = 1;
    while p + REC_HDR + TRAILER <= b.len() {
        if b[p..p + 4] == m && accept(&b[p..]) {
            return true;
        }
        p += 1;
    }
    false
}

fn valid_commit(b: &[u8]) -> bool {
    if b.len() < REC_HDR + TRAILER {
        return false;
    }
    let h = decode_rec_header(&b[..REC_HDR]);
    h.magic == REC_COMMIT
        && h.body_len == 0
        && h.n_extents == 0
        && hash32(&b[..REC_HDR]) == b[REC_HDR..REC_HDR + TRAILER]
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

    fn prepare_replica(p: &Path, size: u64) -> Result<()> {
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

    fn init_journal(dir: &Path, ident: &VolumeIdentity) -> Result<()> {
        let jd = dir.join(JOURNAL_DIR);
        if list_indexed(&jd, "seg")?.is_empty() {
            Self::write_segment_header(&jd, 0, ident)?;
            fsync_dir(&jd)?;
        }
        Ok(())
    }

    fn write_segment_header(
        jd: &Path,
        index: u64,
        ident: &VolumeIdentity,
    ) -> Result<(File, PathBuf)> {
        let path = jd.join(format!("{index:016x}.seg"));
        let hdr = encode_file_header(
            &SEGMENT_MAGIC,
            &FileHeader {
                uuid: ident.uuid,
                generation: ident.generation,
                index,
                created_ns: now_ns(),
            },
        );
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(ioe(|| format!("create {}", path.display())))?;
        f.write_all_at(&hdr, 0)
            .and_then(|_| f.sync_data())
            .map_err(ioe(|| format!("write {}", path.display())))?;
        Ok((f, path))
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
        for (sub, ext) in [(SPOOL_DIR, "spl"), (JOURNAL_DIR, "seg")] {
            let d = dir.join(sub);
            for (_, p) in list_indexed(&d, ext)? {
                fs::remove_file(&p).map_err(ioe(|| format!("remove {}", p.display())))?;
            }
            fsync_dir(&d)?;
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
        let (ident, replica_path) = read_identity(dir)?;
        let replica = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&replica_path)
            .map_err(ioe(|| format!("open replica {}", replica_path.display())))?;
        let replica_is_file = replica
            .metadata()
            .map_err(ioe(|| format!("stat {}", replica_path.display())))?
            .file_type()
            .is_file();
        let zstd = match opts.undo_zstd_level {
            Some(l) => {
                Some(zstd::bulk::Compressor::new(l).map_err(ioe(|| format!("zstd level {l}")))?)
            }
            None => None,
        };
        let mut v = TargetVolume {
            _lock: lock,
            dir: dir.to_path_buf(),
            ident,
            replica_path,
            replica,
            replica_is_file,
            opts,
            faults: fault::Faults::new(FaultConfig::from_env()),
            poisoned: false,
            zstd,
            catalogue: None,
            spool_files: VecDeque::new(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            cached_bytes: 0,
            next_chunk_id: 1,
            durable_seq: 0,
            segments: Vec::new(),
            records: Vec::new(),
            applied_through: 0,
            applied_seq: 0,
            applied_time_ns: 0,
            commit_written: 0,
            commit_synced: 0,
            counters: Counters::default(),
        };
        let tail_start = v.load_journal()?;
        v.load_spool()?;
        v.recover_tail(tail_start)?;
        v.reclaim()?;
        let mut cat = catalogue::Catalogue::open(&v.dir.join(CATALOGUE_FILE))?;
        cat.rebuild(&v.segments())?;
        v.catalogue = Some(cat);
        Ok(v)
    }

    /// Scan segments; returns the index in `records` of the first uncommitted record.
    fn load_journal(&mut self) -> Result<usize> {
        let jd = self.dir.join(JOURNAL_DIR);
        let names = list_indexed(&jd, "seg")?;
        let nseg = names.len();
        let mut tail_start = 0usize;
        for (i, (index, path)) in names.into_iter().enumerate() {
            let last = i + 1 == nseg;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(ioe(|| format!("open {}", path.display())))?;
            let flen = file
                .metadata()
                .map_err(ioe(|| format!("stat {}", path.display())))?
                .len();
            let mut hb = [0u8; FILE_HDR];
            let n =
                read_fill(&file, &mut hb, 0).map_err(ioe(|| format!("read {}", path.display())))?;
            let hdr = match decode_file_header(&hb[..n], &SEGMENT_MAGIC) {
                Ok(h) => h,
                Err(reason) if last && flen <= FILE_HDR as u64 && i > 0 => {
                    warn!(path = %path.display(), %reason, "removing torn new journal segment");
                    fs::remove_file(&path).map_err(ioe(|| format!("remove {}", path.display())))?;
                    self.counters.torn_tails += 1;
                    continue;
                }
                Err(reason) => return Err(corrupt(&path, 0, reason)),
            };
            if hdr.uuid != self.ident.uuid
                || hdr.generation != self.ident.generation
                || hdr.index != index
            {
                return Err(corrupt(
                    &path,
                    0,
                    "segment belongs to another volume/generation/index",
                ));
            }
            let seg_no = self.segments.len();
            let mut pos = FILE_HDR as u64;
            let mut bad: Option<(u64, String)> = None;
            while pos < flen {
                match self.read_journal_record(&file, pos, flen) {
                    Ok((h, exts, len)) => {
                        if h.magic == REC_COMMIT {
                            self.applied_through = h.id;
                            self.applied_seq = self.applied_seq.max(h.last_seq);
                            self.applied_time_ns = h.time_ns;
                            tail_start = self.records.len();
                        } else if let Some(extents) = exts {
                            self.records.push(UndoRec {
                                chunk_id: h.id,
                                first_seq: h.first_seq,
                                last_seq: h.last_seq,
                                time_ns: h.time_ns,
                                seg: seg_no,
                                rec_off: pos,
                                extents,
                            });
                        }
                        pos += len;
                    }
                    Err(JournalError::Corrupt { reason, .. }) => {
                        bad = Some((pos, reason));
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if let Some((bpos, reason)) = bad {
                if !last {
                    return Err(corrupt(&path, bpos, reason));
                }
                let mut rest = vec![0u8; (flen - bpos) as usize];
                let n = read_fill(&file, &mut rest, bpos)
                    .map_err(ioe(|| format!("read {}", path.display())))?;
                rest.truncate(n);
                if later_valid(&rest, REC_COMMIT, valid_commit) {
                    return Err(corrupt(
                        &path,
                        bpos,
                        format!("{reason} (followed by committed records: not a torn tail)"),
                    ));
                }
                warn!(path = %path.display(), offset = bpos, %reason, "truncating torn journal tail");
                file.set_len(bpos)
                    .and_then(|_| file.sync_all())
                    .map_err(ioe(|| format!("truncate {}", path.display())))?;
                self.counters.torn_tails += 1;
                pos = bpos;
            }
            self.segments.push(Segment {
                index,
                path,
                file,
                len: pos,
            });
        }
        if self.segments.is_empty() {
            let (file, path) = Self::write_segment_header(&jd, 0, &self.ident)?;
            fsync_dir(&jd)?;
            self.segments.push(Segment {
                index: 0,
                path,
                file,
                len: FILE_HDR as u64,
            });
        }
        // Uncommitted tail: verify payloads too (they may be torn although header+table are intact).
        let mut i = tail_start;
        while i < self.records.len() {
            let r = &self.records[i];
            let mut ok = true;
            for x in &r.extents {
                match self.undo_bytes(r, x) {
                    Ok(_) => {}
                    Err(JournalError::Corrupt { .. }) => {
                        ok = false;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if !ok {
                let seg = &mut self.segments[r.seg];
                warn!(path = %seg.path.display(), offset = r.rec_off, "truncating torn journal tail (payload)");
                seg.file
                    .set_len(r.rec_off)
                    .and_then(|_| seg.file.sync_all())
                    .map_err(ioe(|| format!("truncate {}", seg.path.display())))?;
                seg.len = r.rec_off;
                self.counters.torn_tails += 1;
                self.records.truncate(i);
                break;
            }
            i += 1;
        }
        self.commit_written = self.applied_through;
        self.commit_synced = self.applied_through;
        self.counters.journal_records = self.records.len() as u64;
        Ok(tail_start)
    }

    /// Read and validate one journal record at `pos`. Corruption is reported as `Corrupt`.
    #[allow(clippy::type_complexity)]
    fn read_journal_record(
        &self,
        file: &File,
        pos: u64,
        flen: u64,
    ) -> Result<(RecHeader, Option<Vec<UndoExtent>>, u64)> {
        let p = Path::new("segment");
        let mut hb = [0u8; REC_HDR];
        let n = read_fill(file, &mut hb, pos).map_err(ioe(|| "read segment".to_string()))?;
        if n < REC_HDR {
            return Err(corrupt(p, pos, "truncated record header"));
        }
        let h = decode_rec_header(&hb);
        let total = record_len(&h).ok_or_else(|| corrupt(p, pos, "length overflow"))?;
        if pos.checked_add(total).is_none_or(|e| e > flen) {
            return Err(corrupt(p, pos, "record extends past end of segment"));
        }
        match h.magic {
            REC_COMMIT => {
                if h.body_len != 0 || h.n_extents != 0 {
                    return Err(corrupt(p, pos, "bad commit record"));
                }
                let mut t = [0u8; TRAILER];
                file.read_exact_at(&mut t, pos + REC_HDR as u64)
                    .map_err(ioe(|| "read segment".to_string()))?;
                if hash32(&hb) != t {
                    return Err(corrupt(p, pos, "commit checksum mismatch"));
                }
                Ok((h, None, total))
            }
            REC_UNDO => {
                let tl = (h.n_extents as u64)
                    .checked_mul(UNDO_ENTRY as u64)
                    .filter(|t| *t <= h.body_len)
                    .ok_or_else(|| corrupt(p, pos, "extent table larger than record"))?;
                let mut buf = vec![0u8; REC_HDR + tl as usize];
                buf[..REC_HDR].copy_from_slice(&hb);
                file.read_exact_at(&mut buf[REC_HDR..], pos + REC_HDR as u64)
                    .map_err(ioe(|| "read segment".to_string()))?;
                let mut t = [0u8; TRAILER];
                file.read_exact_at(&mut t, pos + REC_HDR as u64 + h.body_len)
                    .map_err(ioe(|| "read segment".to_string()))?;
                if hash32(&buf) != t {
                    return Err(corrupt(p, pos, "undo record checksum mismatch"));
                }
                let ex =
                    parse_undo_table(&h, &buf[REC_HDR..], pos).map_err(|r| corrupt(p, pos, r))?;
                Ok((h, Some(ex), total))
            }
            _ => Err(corrupt(p, pos, "bad record magic")),
        }
    }

    fn load_spool(&mut self) -> Result<()> {
        let sd = self.dir.join(SPOOL_DIR);
        let names = list_indexed(&sd, "spl")?;
        let n = names.len();
        let mut max_id = self.applied_through;
        for r in &self.records {
            max_id = max_id.max(r.chunk_id);
            if r.last_seq != 0 {
                self.durable_seq = self.durable_seq.max(r.last_seq);
            }
        }
        self.durable_seq = self.durable_seq.max(self.applied_seq);
        for (i, (id, path)) in names.into_iter().enumerate() {
            let last = i + 1 == n;
            let buf = fs::read(&path).map_err(ioe(|| format!("read {}", path.display())))?;
            let hdr = match decode_file_header(&buf, &SPOOL_MAGIC) {
                Ok(h) => h,
                Err(reason) if last && buf.len() <= FILE_HDR => {
                    warn!(path = %path.display(), %reason, "removing torn new spool file");
                    fs::remove_file(&path).map_err(ioe(|| format!("remove {}", path.display())))?;
                    self.counters.torn_tails += 1;
                    continue;
                }
                Err(reason) => return Err(corrupt(&path, 0, reason)),
            };
            if hdr.uuid != self.ident.uuid
                || hdr.generation != self.ident.generation
                || hdr.index != id
            {
                return Err(corrupt(
                    &path,
                    0,
                    "spool file belongs to another volume/generation",
                ));
            }
            let mut pos = FILE_HDR;
            let mut prev: Option<RecHeader> = None;
            let mut fmax = 0u64;
            let mut records = 0u64;
            let mut bad = None;
            while pos < buf.len() {
                match parse_spool_record(&buf[pos..]) {
                    Ok((h, exts, total)) => {
                        if h.first_seq > h.last_seq {
                            bad = Some((pos, "bad sequence range".to_string()));
                            break;
                        }
                        if h.id > self.applied_through {
                            let payload: u64 = exts
                                .iter()
                                .map(|e| match &e.data {
                                    ExtentData::Data(d) => d.len() as u64,
                                    ExtentData::Zero(_) => 0,
                                })
                                .sum();
                            let keep = self.cached_bytes + payload <= self.opts.cache_bytes;
                            if keep {
                                self.cached_bytes += payload;
                            }
                            self.pending_bytes += payload;
                            self.pending.push_back(Pending {
                                chunk_id: h.id,
                                first_seq: h.first_seq,
                                last_seq: h.last_seq,
                                time_ns: h.time_ns,
                                payload,
                                span: exts.iter().map(|e| e.data.len()).sum(),
                                file_id: id,
                                rec_off: pos as u64,
                                rec_len: total as u64,
                                ranges: exts.iter().map(|e| (e.offset, e.data.len())).collect(),
                                data: keep.then_some(exts),
                            });
                        }
                        if !(h.first_seq == 0 && h.last_seq == 0) {
                            self.durable_seq = self.durable_seq.max(h.last_seq);
                        }
                        fmax = fmax.max(h.id);
                        max_id = max_id.max(h.id);
                        records += 1;
                        prev = Some(h);
                        pos += total;
                    }
                    Err(reason) => {
                        bad = Some((pos, reason));
                        break;
                    }
                }
            }
            if let Some((bpos, reason)) = bad {
                if !last {
                    return Err(corrupt(&path, bpos as u64, reason));
                }
                // The torn group: records of one group commit are written by one write + fdatasync.
                let torn_group = match prev {
                    Some(p) if p.flags & FLAG_GROUP_END == 0 => p.aux,
                    Some(p) => p.id + 1,
                    // A file is created for (and named after) the group written first into it.
                    None => hdr.index,
                };
                if later_valid(&buf[bpos..], REC_SPOOL, |b| {
                    parse_spool_record(b).is_ok_and(|(h, _, _)| h.aux > torn_group)
                }) {
                    return Err(corrupt(
                        &path,
                        bpos as u64,
                        format!("{reason} (followed by acknowledged records: not a torn tail)"),
                    ));
                }
                warn!(path = %path.display(), offset = bpos, %reason, "truncating torn spool tail");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(ioe(|| format!("open {}", path.display())))?;
                f.set_len(bpos as u64)
                    .and_then(|_| f.sync_all())
                    .map_err(ioe(|| format!("truncate {}", path.display())))?;
                self.counters.torn_tails += 1;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(ioe(|| format!("open {}", path.display())))?;
            self.spool_files.push_back(SpoolFile {
                id,
                path,
                file,
                len: pos as u64,
                max_chunk_id: fmax,
                records,
            });
        }
        self.next_chunk_id = max_id + 1;
        Ok(())
    }

    /// Re-apply chunks that have undo records but no commit record.
    fn recover_tail(&mut self, tail_start: usize) -> Result<()> {
        let tail: Vec<u64> = self.records[tail_start.min(self.records.len())..]
            .iter()
            .map(|r| r.chunk_id)
            .collect();
        if tail.is_empty() {
            return Ok(());
        }
        let mut batch = Vec::new();
        for id in &tail {
            let Some(p) = self.pending.front() else {
                return Err(corrupt(
                    &self.dir,
                    0,
                    format!("journaled chunk {id} missing from spool"),
                ));
            };
            if p.chunk_id != *id {
                return Err(corrupt(
                    &self.dir,
                    0,
                    format!(
                        "journaled chunk {id} is not the next spooled chunk ({})",
                        p.chunk_id
                    ),
                ));
            }
            let mut p = self.pending.pop_front().ok_or(JournalError::Poisoned)?;
            let data = match p.data.take() {
                Some(d) => {
                    self.cached_bytes -= p.payload;
                    d
                }
                None => self.load_chunk(&p)?,
            };
            self.pending_bytes -= p.payload;
            batch.push((p, data));
        }
        warn!(
            chunks = batch.len(),
            "re-applying journaled but uncommitted chunks"
        );
        self.write_replica_batch(&batch)?;
        self.counters.recovered_chunks += batch.len() as u64;
        self.finish_batch(&batch)?;
        self.sync_journal()?;
        Ok(())
    }

    fn load_chunk(&self, p: &Pending) -> Result<Vec<ChunkExtent>> {
        let f = self
            .spool_files
            .iter()
            .find(|f| f.id == p.file_id)
            .ok_or_else(|| {
                corrupt(
                    &self.dir,
                    0,
                    format!("spool file for chunk {} missing", p.chunk_id),
                )
            })?;
        let mut buf = vec![0u8; p.rec_len as usize];
        f.file
            .read_exact_at(&mut buf, p.rec_off)
            .map_err(ioe(|| format!("read {}", f.path.display())))?;
        let (h, exts, _) = parse_spool_record(&buf).map_err(|r| corrupt(&f.path, p.rec_off, r))?;
        if h.id != p.chunk_id {
            return Err(corrupt(&f.path, p.rec_off, "chunk id changed under us"));
        }
        Ok(exts)
    }

    fn check(&self) -> Result<()> {
        if self.poisoned {
            Err(JournalError::Poisoned)
        } else {
            Ok(())
        }
    }

    fn guard<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn validate(&self, c: &ChunkIn) -> Result<()> {
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

    /// Spool one chunk durably (fdatasync before returning). See [`TargetVolume::spool_many`].
    pub fn spool(&mut self, chunk: &ChunkIn) -> Result<SpoolOutcome> {
        let mut v = self.spool_many(std::slice::from_ref(chunk))?;
        v.pop().ok_or(JournalError::Poisoned)
    }

    /// Spool several chunks with one write and one fdatasync (group commit).
    ///
    /// Rules: an ordered chunk (`first_seq..=last_seq`, both non-zero) with
    /// `last_seq <= durable_seq` is a duplicate (acknowledged, not stored). Any other
    /// ordered chunk is stored and raises `durable_seq` to `last_seq`; if it starts after
    /// `durable_seq + 1` the gap is accepted (sequence numbers consumed by bitmap-mode
    /// writes) and counted in [`Counters::seq_gaps`]; a chunk overlapping `durable_seq`
    /// (re-coalesced re-delivery) is stored whole, which is safe because it carries the
    /// net effect of its range. Unordered chunks (0, 0) are always stored.
    ///
    /// Fails without side effects on [`JournalError::InvalidChunk`] and
    /// [`JournalError::SpoolFull`] (nothing of the call is stored then).
    pub fn spool_many(&mut self, chunks: &[ChunkIn]) -> Result<Vec<SpoolOutcome>> {
        self.spool_many_impl(chunks, true)
    }

    /// [`TargetVolume::spool_many`] taking ownership: the payload is moved into the
    /// apply cache instead of copied (one memcpy per byte less).
    pub fn spool_many_owned(&mut self, mut chunks: Vec<ChunkIn>) -> Result<Vec<SpoolOutcome>> {
        let out = self.spool_many_impl(&chunks, false)?;
        let stored: Vec<usize> = out
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, SpoolOutcome::Stored { .. }))
            .map(|(i, _)| i)
            .collect();
        let first = self.pending.len() - stored.len();
        for (k, i) in stored.into_iter().enumerate() {
            let p = &mut self.pending[first + k];
            if self.cached_bytes + p.payload <= self.opts.cache_bytes {
                self.cached_bytes += p.payload;
                p.data = Some(std::mem::take(&mut chunks[i].extents));
            }
        }
        Ok(out)
    }

    fn spool_many_impl(&mut self, chunks: &[ChunkIn], cache: bool) -> Result<Vec<SpoolOutcome>> {
        self.check()?;
        for c in chunks {
            self.validate(c)?;
        }
        let mut durable = self.durable_seq;
        let mut store = Vec::with_capacity(chunks.len());
        let mut incoming = 0u64;
        for c in chunks {
            let dup = c.is_ordered() && c.last_seq <= durable;
            if !dup {
                incoming += c.payload_bytes();
                if c.is_ordered() {
                    durable = c.last_seq;
                }
            }
            store.push(!dup);
        }
        if incoming > 0
            && self.pending_bytes > 0
            && self.pending_bytes + incoming > self.opts.spool_budget_bytes
        {
            return Err(JournalError::SpoolFull {
                pending: self.pending_bytes,
                incoming,
                budget: self.opts.spool_budget_bytes,
            });
        }
        let r = self.spool_inner(chunks, &store, cache);
        self.guard(r)
    }

    fn spool_inner(
        &mut self,
        chunks: &[ChunkIn],
        store: &[bool],
        cache: bool,
    ) -> Result<Vec<SpoolOutcome>> {
        let last_stored = store.iter().rposition(|s| *s);
        let group = self.next_chunk_id;
        let mut buf = Vec::new();
        let mut metas = Vec::new();
        let mut id = self.next_chunk_id;
        for (i, c) in chunks.iter().enumerate() {
            if !store[i] {
                continue;
            }
            let off = buf.len();
            let flags = if Some(i) == last_stored {
                FLAG_GROUP_END
            } else {
                0
            };
            encode_spool_record(&mut buf, id, group, flags, c);
            metas.push((i, id, off as u64, (buf.len() - off) as u64));
            id += 1;
        }
        if !buf.is_empty() {
            let need_new = match self.spool_files.back() {
                None => true,
                Some(f) => f.records > 0 && f.len + buf.len() as u64 > self.opts.spool_file_size,
            };
            if need_new {
                self.new_spool_file(group)?;
            }
            let f = self.spool_files.back_mut().ok_or(JournalError::Poisoned)?;
            let base = f.len;
            f.file
                .write_all_at(&buf, base)
                .map_err(ioe(|| format!("write {}", f.path.display())))?;
            let path = f.path.clone();
            self.faults.hit(FaultPoint::SpoolAfterWrite)?;
            let f = self.spool_files.back_mut().ok_or(JournalError::Poisoned)?;
            f.file
                .sync_data()
                .map_err(ioe(|| format!("fdatasync {}", path.display())))?;
            self.counters.fsyncs += 1;
            self.faults.hit(FaultPoint::SpoolAfterSync)?;
            let f = self.spool_files.back_mut().ok_or(JournalError::Poisoned)?;
            f.len += buf.len() as u64;
            f.records += metas.len() as u64;
            f.max_chunk_id = id - 1;
            let file_id = f.id;
            for (i, cid, off, len) in metas {
                let c = &chunks[i];
                let payload = c.payload_bytes();
                let keep = cache && self.cached_bytes + payload <= self.opts.cache_bytes;
                if keep {
                    self.cached_bytes += payload;
                }
                self.pending_bytes += payload;
                self.pending.push_back(Pending {
                    chunk_id: cid,
                    first_seq: c.first_seq,
                    last_seq: c.last_seq,
                    time_ns: c.source_time_ns,
                    payload,
                    span: c.extents.iter().map(|e| e.data.len()).sum(),
                    file_id,
                    rec_off: base + off,
                    rec_len: len,
                    ranges: c.extents.iter().map(|e| (e.offset, e.data.len())).collect(),
                    data: keep.then(|| c.extents.clone()),
                });
                self.counters.spooled_chunks += 1;
                self.counters.spooled_bytes += payload;
            }
            self.next_chunk_id = id;
        }
        let mut out = Vec::with_capacity(chunks.len());
        let mut ids = self.next_chunk_id - store.iter().filter(|s| **s).count() as u64;
        for (i, c) in chunks.iter().enumerate() {
            if store[i] {
                if c.is_ordered() {
                    if c.first_seq > self.durable_seq + 1 {
                        self.counters.seq_gaps += 1;
                        debug!(
                            first_seq = c.first_seq,
                            durable_seq = self.durable_seq,
                            "sequence gap accepted"
                        );
                    }
                    self.durable_seq = c.last_seq;
                }
                out.push(SpoolOutcome::Stored {
                    chunk_id: ids,
                    durable_seq: self.durable_seq,
                });
                ids += 1;
            } else {
                self.counters.duplicate_chunks += 1;
                out.push(SpoolOutcome::Duplicate {
                    durable_seq: self.durable_seq,
                });
            }
        }
        Ok(out)
    }

    fn new_spool_file(&mut self, id: u64) -> Result<()> {
        let sd = self.dir.join(SPOOL_DIR);
        let path = sd.join(format!("{id:016x}.spl"));
        let hdr = encode_file_header(
            &SPOOL_MAGIC,
            &FileHeader {
                uuid: self.ident.uuid,
                generation: self.ident.generation,
                index: id,
                created_ns: now_ns(),
            },
        );
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(ioe(|| format!("create {}", path.display())))?;
        file.write_all_at(&hdr, 0)
            .and_then(|_| file.sync_data())
            .map_err(ioe(|| format!("write {}", path.display())))?;
        self.counters.fsyncs += 1;
        self.faults.hit(FaultPoint::SpoolFileAfterCreate)?;
        fsync_dir(&sd)?;
        self.spool_files.push_back(SpoolFile {
            id,
            path,
            file,
            len: FILE_HDR as u64,
            max_chunk_id: 0,
            records: 0,
        });
        Ok(())
    }

    /// Apply the oldest spooled chunk (a batch of one). `Ok(None)` when nothing is pending.
    pub fn apply_next(&mut self) -> Result<Option<Applied>> {
        self.check()?;
        let r = self.apply_batch_inner(1);
        self.guard(r)
    }

    /// Apply up to [`TargetOptions::apply_batch_chunks`] chunks with one journal
    /// fdatasync and one replica fdatasync. `Ok(None)` when nothing is pending.
    pub fn apply_batch(&mut self) -> Result<Option<Applied>> {
        self.check()?;
        let n = self.opts.apply_batch_chunks.max(1);
        let r = self.apply_batch_inner(n);
        self.guard(r)
    }

    /// Apply everything spooled (in batches). Returns the total.
    pub fn apply_all(&mut self) -> Result<Applied> {
        let mut tot = Applied {
            applied_seq: self.applied_seq,
            ..Applied::default()
        };
        while let Some(a) = self.apply_batch()? {
            if tot.chunks == 0 {
                tot.first_chunk_id = a.first_chunk_id;
            }
            tot.chunks += a.chunks;
            tot.bytes += a.bytes;
            tot.last_chunk_id = a.last_chunk_id;
            tot.applied_seq = a.applied_seq;
            tot.last_source_time_ns = a.last_source_time_ns;
        }
        Ok(tot)
    }

    /// How many leading pending chunks form the next batch, and whether the single
    /// chunk overlaps itself (then old data is overlaid with its own earlier extents).
    fn plan_batch(&self, max_chunks: usize) -> (usize, bool) {
        let mut iv: BTreeMap<u64, u64> = BTreeMap::new();
        let mut n = 0;
        let mut bytes = 0u64;
        for p in &self.pending {
            if n >= max_chunks || (n > 0 && bytes + p.span > self.opts.apply_batch_bytes) {
                break;
            }
            let mut overlap = false;
            for &(o, l) in &p.ranges {
                if l == 0 {
                    continue;
                }
                let end = o + l;
                if let Some((_, &e)) = iv.range(..end).next_back() {
                    if e > o {
                        overlap = true;
                        break;
                    }
                }
                iv.insert(o, end);
            }
            if overlap {
                if n == 0 {
                    return (1, true);
                }
                break;
            }
            n += 1;
            bytes += p.span;
        }
        (n.max(1), false)
    }

    fn apply_batch_inner(&mut self, max_chunks: usize) -> Result<Option<Applied>> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let t0 = Instant::now();
        let (n, self_overlap) = self.plan_batch(max_chunks);
        let mut batch = Vec::with_capacity(n);
        for _ in 0..n {
            let mut p = self.pending.pop_front().ok_or(JournalError::Poisoned)?;
            let data = match p.data.take() {
                Some(d) => {
                    self.cached_bytes -= p.payload;
                    d
                }
                None => self.load_chunk(&p)?,
            };
            self.pending_bytes -= p.payload;
            batch.push((p, data));
        }
        // 1. old data -> undo records (one per chunk), in one buffer.
        let mut jbuf: Vec<u8> = Vec::new();
        let mut recs = Vec::with_capacity(n);
        for (p, exts) in &batch {
            let rec_start = jbuf.len();
            let mut entries: Vec<(u64, u64, u8, Vec<u8>)> = Vec::new();
            for (ei, e) in exts.iter().enumerate() {
                let end = e.offset + e.data.len();
                let mut o = e.offset;
                while o < end {
                    let pl = (end - o).min(UNDO_PIECE);
                    let mut old = vec![0u8; pl as usize];
                    self.replica.read_exact_at(&mut old, o).map_err(ioe(|| {
                        format!("read replica {}", self.replica_path.display())
                    }))?;
                    self.counters.replica_reads += 1;
                    self.counters.replica_read_bytes += pl;
                    if self_overlap {
                        for prev in &exts[..ei] {
                            overlay_new(&mut old, o, prev);
                        }
                    }
                    let (enc, stored) = encode_old(old, self.zstd.as_mut());
                    self.counters.undo_raw_bytes += pl;
                    self.counters.undo_stored_bytes += stored.len() as u64;
                    entries.push((o, pl, enc, stored));
                    o += pl;
                }
            }
            let nx = entries.len();
            let payload: u64 = entries.iter().map(|e| e.3.len() as u64).sum();
            let h = RecHeader {
                magic: REC_UNDO,
                flags: 0,
                body_len: (nx * UNDO_ENTRY) as u64 + payload,
                id: p.chunk_id,
                first_seq: p.first_seq,
                last_seq: p.last_seq,
                time_ns: p.time_ns,
                n_extents: nx as u32,
                aux: 0,
            };
            encode_rec_header(&h, &mut jbuf);
            let mut ux = Vec::with_capacity(nx);
            let mut cur = (rec_start + REC_HDR + nx * UNDO_ENTRY) as u64;
            for (o, l, enc, stored) in &entries {
                let hash = hash32(stored);
                jbuf.extend_from_slice(&o.to_le_bytes());
                jbuf.extend_from_slice(&l.to_le_bytes());
                jbuf.extend_from_slice(&[*enc, 0, 0, 0, 0, 0, 0, 0]);
                jbuf.extend_from_slice(&(stored.len() as u64).to_le_bytes());
                jbuf.extend_from_slice(&hash);
                ux.push(UndoExtent {
                    offset: *o,
                    len: *l,
                    enc: *enc,
                    stored_len: stored.len() as u64,
                    hash,
                    file_off: cur,
                });
                cur += stored.len() as u64;
            }
            let th = hash32(&jbuf[rec_start..]);
            for e in &entries {
                jbuf.extend_from_slice(&e.3);
            }
            jbuf.extend_from_slice(&th);
            recs.push((rec_start as u64, ux));
        }
        // 2. append + fdatasync (rotate first if the segment is full).
        let need_rotate = {
            let s = self.cur_seg();
            s.len > FILE_HDR as u64 && s.len + jbuf.len() as u64 > self.opts.segment_size
        };
        if need_rotate {
            self.new_segment()?;
        }
        let seg_no = self.segments.len() - 1;
        let base = self.segments[seg_no].len;
        {
            let s = &self.segments[seg_no];
            s.file
                .write_all_at(&jbuf, base)
                .map_err(ioe(|| format!("append {}", s.path.display())))?;
        }
        self.faults.hit(FaultPoint::UndoAfterAppend)?;
        self.sync_journal()?;
        self.faults.hit(FaultPoint::UndoAfterSync)?;
        self.segments[seg_no].len += jbuf.len() as u64;
        self.counters.journal_write_bytes += jbuf.len() as u64;
        for ((p, _), (rel, mut ux)) in batch.iter().zip(recs) {
            for x in &mut ux {
                x.file_off += base;
            }
            self.records.push(UndoRec {
                chunk_id: p.chunk_id,
                first_seq: p.first_seq,
                last_seq: p.last_seq,
                time_ns: p.time_ns,
                seg: seg_no,
                rec_off: base + rel,
                extents: ux,
            });
        }
        self.counters.journal_records = self.records.len() as u64;
        // 3. replica writes + fdatasync.
        self.write_replica_batch(&batch)?;
        // 4. commit.
        let a = self.finish_batch(&batch)?;
        self.counters.apply_batches += 1;
        self.counters.apply_ns += t0.elapsed().as_nanos() as u64;
        // 5. reclaim spool space.
        self.reclaim()?;
        Ok(Some(a))
    }

    fn cur_seg(&self) -> &Segment {
        &self.segments[self.segments.len() - 1]
    }

    fn sync_journal(&mut self) -> Result<()> {
        let s = self.cur_seg();
        s.file
            .sync_data()
            .map_err(ioe(|| format!("fdatasync {}", s.path.display())))?;
        self.counters.fsyncs += 1;
        self.commit_synced = self.commit_written;
        Ok(())
    }

    fn new_segment(&mut self) -> Result<()> {
        let jd = self.dir.join(JOURNAL_DIR);
        let index = self.cur_seg().index + 1;
        // The previous segment's tail (commit record) must be durable before we move on.
        self.sync_journal()?;
        let (file, path) = Self::write_segment_header(&jd, index, &self.ident)?;
        self.counters.fsyncs += 1;
        self.faults.hit(FaultPoint::SegmentAfterCreate)?;
        fsync_dir(&jd)?;
        self.segments.push(Segment {
            index,
            path,
            file,
            len: FILE_HDR as u64,
        });
        let all = self.segments();
        let changed = &all[all.len().saturating_sub(2)..];
        if let Some(c) = self.catalogue.as_mut() {
            if let Err(e) = c.update(changed) {
                // Derived data: the next open rebuilds it from the segments.
                warn!(error = %e, "catalogue update failed");
            }
        }
        Ok(())
    }

    fn write_replica_batch(&mut self, batch: &[(Pending, Vec<ChunkExtent>)]) -> Result<()> {
        static ZEROES: [u8; 1 << 16] = [0u8; 1 << 16];
        let mut first = true;
        for (_, exts) in batch {
            for e in exts {
                match &e.data {
                    ExtentData::Data(d) => {
                        self.replica.write_all_at(d, e.offset).map_err(ioe(|| {
                            format!("write replica {}", self.replica_path.display())
                        }))?;
                        self.counters.replica_writes += 1;
                        self.counters.replica_write_bytes += d.len() as u64;
                    }
                    ExtentData::Zero(n) => {
                        let mut o = e.offset;
                        let end = e.offset + n;
                        while o < end {
                            let k = (end - o).min(ZEROES.len() as u64);
                            self.replica
                                .write_all_at(&ZEROES[..k as usize], o)
                                .map_err(ioe(|| {
                                    format!("write replica {}", self.replica_path.display())
                                }))?;
                            self.counters.replica_writes += 1;
                            self.counters.replica_write_bytes += k;
                            o += k;
                        }
                    }
                }
                if first {
                    first = false;
                    self.faults.hit(FaultPoint::ReplicaMidWrite)?;
                }
            }
        }
        self.faults.hit(FaultPoint::ReplicaAfterWrite)?;
        self.replica.sync_data().map_err(ioe(|| {
            format!("fdatasync replica {}", self.replica_path.display())
        }))?;
        self.counters.fsyncs += 1;
        self.faults.hit(FaultPoint::ReplicaAfterSync)?;
        Ok(())
    }

    /// Append the commit record for a batch whose replica writes are durable.
    fn finish_batch(&mut self, batch: &[(Pending, Vec<ChunkExtent>)]) -> Result<Applied> {
        let mut a = Applied::default();
        for (p, _) in batch {
            if a.chunks == 0 {
                a.first_chunk_id = p.chunk_id;
            }
            a.chunks += 1;
            a.last_chunk_id = p.chunk_id;
            a.bytes += p.span;
            a.last_source_time_ns = p.time_ns;
            if p.last_seq != 0 {
                self.applied_seq = self.applied_seq.max(p.last_seq);
            }
        }
        a.applied_seq = self.applied_seq;
        let mut b = Vec::with_capacity(REC_HDR + TRAILER);
        encode_rec_header(
            &RecHeader {
                magic: REC_COMMIT,
                id: a.last_chunk_id,
                last_seq: self.applied_seq,
                time_ns: a.last_source_time_ns,
                ..RecHeader::default()
            },
            &mut b,
        );
        let h = hash32(&b);
        b.extend_from_slice(&h);
        let s = &self.segments[self.segments.len() - 1];
        s.file
            .write_all_at(&b, s.len)
            .map_err(ioe(|| format!("append {}", s.path.display())))?;
        let sl = self.segments.len() - 1;
        self.segments[sl].len += b.len() as u64;
        self.counters.journal_write_bytes += b.len() as u64;
        self.applied_through = a.last_chunk_id;
        self.applied_time_ns = a.last_source_time_ns;
        self.commit_written = a.last_chunk_id;
        self.counters.applied_chunks += a.chunks;
        self.counters.applied_bytes += a.bytes;
        self.faults.hit(FaultPoint::CommitAfterAppend)?;
        Ok(a)
    }

    /// Delete spool files whose chunks are all committed (after making the commit durable).
    fn reclaim(&mut self) -> Result<()> {
        let n = self.spool_files.len();
        let mut k = 0;
        for (i, f) in self.spool_files.iter().enumerate() {
            let empty_non_last = f.records == 0 && i + 1 < n;
            if empty_non_last || (f.records > 0 && f.max_chunk_id <= self.applied_through) {
                k += 1;
            } else {
                break;
            }
        }
        if k == 0 {
            return Ok(());
        }
        if self.commit_synced < self.commit_written {
            self.sync_journal()?;
        }
        self.faults.hit(FaultPoint::ReclaimBeforeDelete)?;
        for f in self.spool_files.drain(..k) {
            fs::remove_file(&f.path).map_err(ioe(|| format!("remove {}", f.path.display())))?;
        }
        self.faults.hit(FaultPoint::ReclaimAfterDelete)?;
        fsync_dir(&self.dir.join(SPOOL_DIR))?;
        self.counters.fsyncs += 1;
        Ok(())
    }

    /// Old bytes of one undo extent, verified against its blake3 and decoded.
    fn undo_bytes(&self, r: &UndoRec, x: &UndoExtent) -> Result<Vec<u8>> {
        let seg = &self.segments[r.seg];
        if x.enc == ENC_ZERO {
            return Ok(vec![0u8; x.len as usize]);
        }
        let mut stored = vec![0u8; x.stored_len as usize];
        seg.file
            .read_exact_at(&mut stored, x.file_off)
            .map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    corrupt(&seg.path, x.file_off, "undo payload truncated")
                } else {
                    JournalError::Io {
                        context: format!("read {}", seg.path.display()),
                        source: e,
                    }
                }
            })?;
        if hash32(&stored) != x.hash {
            return Err(corrupt(
                &seg.path,
                x.file_off,
                "undo payload checksum mismatch",
            ));
        }
        match x.enc {
            ENC_RAW => Ok(stored),
            _ => {
                let d = zstd::bulk::decompress(&stored, x.len as usize)
                    .map_err(|e| corrupt(&seg.path, x.file_off, format!("zstd: {e}")))?;
                if d.len() as u64 != x.len {
                    return Err(corrupt(&seg.path, x.file_off, "zstd length mismatch"));
                }
                Ok(d)
            }
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.ident.size) {
            return Err(JournalError::OutOfRange {
                offset,
                len,
                size: self.ident.size,
            });
        }
        Ok(())
    }

    /// Number of leading undo records that are at or before `point`.
    fn cutoff(&self, point: Point) -> Result<usize> {
        match point {
            Point::Latest => Ok(self.records.len()),
            Point::Seq(s) => {
                if s > self.applied_seq {
                    return Err(JournalError::PointNotAvailable(format!(
                        "seq {s} is not applied yet (applied_seq {})",
                        self.applied_seq
                    )));
                }
                Ok(self
                    .records
                    .iter()
                    .rposition(|r| r.last_seq != 0 && r.last_seq <= s)
                    .map_or(0, |i| i + 1))
            }
            Point::Time(t) => {
                if let Some(p) = self.pending.front() {
                    if p.time_ns <= t {
                        return Err(JournalError::PointNotAvailable(format!(
                            "time {t} is not fully applied yet"
                        )));
                    }
                }
                Ok(self
                    .records
                    .iter()
                    .rposition(|r| r.time_ns <= t)
                    .map_or(0, |i| i + 1))
            }
        }
    }

    /// Read `len` bytes at `offset` as they were at `point`: the replica overlaid with
    /// the undo records newer than the point, walked newest to oldest (so the oldest
    /// newer record wins, which holds the bytes as they were at the point).
    /// Every undo payload used is blake3-verified; corruption is an error, never data.
    pub fn read_at_point(&self, point: Point, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.check_range(offset, len)?;
        let cut = self.cutoff(point)?;
        let mut buf = vec![0u8; len as usize];
        self.replica
            .read_exact_at(&mut buf, offset)
            .map_err(ioe(|| {
                format!("read replica {}", self.replica_path.display())
            }))?;
        let end = offset + len;
        for r in self.records[cut..].iter().rev() {
            // Reverse within the record too: extents of one chunk may overlap, and the
            // first one touching a byte holds the byte as it was before the chunk.
            for x in r.extents.iter().rev() {
                let (xs, xe) = (x.offset, x.offset + x.len);
                let (s, e) = (xs.max(offset), xe.min(end));
                if s >= e {
                    continue;
                }
                let old = self.undo_bytes(r, x)?;
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&old[(s - xs) as usize..(e - xs) as usize]);
            }
        }
        Ok(buf)
    }

    /// Verify every undo payload of the journal (scrub). Returns the number of extents checked.
    pub fn verify_journal(&self) -> Result<u64> {
        let mut n = 0;
        for r in &self.records {
            for x in &r.extents {
                self.undo_bytes(r, x)?;
                n += 1;
            }
        }
        Ok(n)
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

    /// Chunks spooled and not yet applied.
    pub fn pending_chunks(&self) -> usize {
        self.pending.len()
    }

    /// Metadata of all undo records, oldest first.
    pub fn undo_records(&self) -> Vec<UndoRecordInfo> {
        self.records
            .iter()
            .map(|r| UndoRecordInfo {
                chunk_id: r.chunk_id,
                first_seq: r.first_seq,
                last_seq: r.last_seq,
                source_time_ns: r.time_ns,
                segment: self.segments[r.seg].index,
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
                index: s.index,
                bytes: s.len,
                sealed: i + 1 < n,
                ..SegmentInfo::default()
            })
            .collect();
        for r in &self.records {
            let si = &mut v[r.seg];
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
        c.pending_chunks = self.pending.len() as u64;
        c.pending_bytes = self.pending_bytes;
        c.oldest_unapplied_source_time_ns = self.pending.front().map(|p| p.time_ns);
        c.spool_files = self.spool_files.len() as u64;
        c.spool_disk_bytes = self.spool_files.iter().map(|f| f.len).sum();
        c.journal_bytes = self.segments.iter().map(|s| s.len).sum();
        c.journal_segments = self.segments.len() as u64;
        c
    }
}

/// Overlay the new data of `prev` onto `old` (which holds volume bytes at `o..`).
fn overlay_new(old: &mut [u8], o: u64, prev: &ChunkExtent) {
    let (ps, pe) = (prev.offset, prev.offset + prev.data.len());
    let (s, e) = (ps.max(o), pe.min(o + old.len() as u64));
    if s >= e {
        return;
    }
    let dst = &mut old[(s - o) as usize..(e - o) as usize];
    match &prev.data {
        ExtentData::Data(d) => dst.copy_from_slice(&d[(s - ps) as usize..(e - ps) as usize]),
        ExtentData::Zero(_) => dst.fill(0),
    }
}
