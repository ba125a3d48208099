//! The target half of the engine: [`TargetServer`] accepts sources, checks
//! the handshake against a [`TargetStore`], spools every data frame durably,
//! acknowledges it, and applies in a separate thread per volume.
//!
//! # Guarantees
//!
//! - **Durable ack**: an `Ack` is sent for a `Chunk`, `ResyncData` or `Tag`
//!   frame only after [`TargetStore::spool`] (or [`TargetStore::tag`])
//!   returned `Ok`, i.e. the frame is on stable storage. Several frames that
//!   arrived together are spooled with one call (one fsync) and then
//!   acknowledged together.
//! - **One response per request, in order**: every frame the source sends
//!   (`Chunk`, `ResyncData`, `Tag`, `Heartbeat`, `ResyncRequest`) gets exactly
//!   one response (`Ack`, or `ResyncHashes` for a `ResyncRequest`), in the
//!   order the frames were received. The source matches responses to its
//!   in-flight frames first in, first out.
//! - **Bad input changes nothing**: a frame that fails decoding (checksum,
//!   bounds, decompression) or that the store refuses as invalid is answered
//!   with an `Error` frame and the connection is closed; the frames of that
//!   connection not yet spooled are dropped (the source re-sends them).
//! - **One writer per volume**: a new connection for a volume supersedes the
//!   previous one (after a link cut the old connection may linger half-open);
//!   the superseded connection can no longer spool anything (checked under
//!   the store lock), so stale frames are never interleaved with new ones.
//! - **Flow control**: while the store's spool is over its budget the
//!   connection stops reading frames (TCP backpressure on the source) until
//!   apply brought it back under the budget; the state is reported in
//!   [`TargetStatus::flow_controlled`] and in every Ack. Likewise while the
//!   store answers [`StoreError::LowSpace`] (the journal keeps the free space
//!   its apply needs): the connection waits for apply, with the reason in
//!   [`TargetStatus::low_space`].
//! - **Apply** runs in one thread per volume calling
//!   [`TargetStore::apply_some`] (a bounded step) under the store lock, so a
//!   spool waits at most for one apply step; or, when the store offers a
//!   [`ConcurrentApply`] handle (the journal store does), without the store
//!   lock, so spooling and acknowledging never wait for apply I/O.
//! - **Full storage** ([`StoreError::NoSpace`]): the store is marked broken
//!   and [`TargetStatus::storage_full`] set (an `error` log line once per
//!   episode); the frame that hit it is not acknowledged: the source gets an
//!   `Error` frame with [`ErrorCode::SpoolFull`] naming the full disk, the
//!   connection is closed and the source reconnects with its backoff (its
//!   change log keeps tracking meanwhile). The apply thread retries
//!   [`TargetStore::recover`] with a backoff (0.5 s doubling to 5 s), so
//!   once space is back the store recovers and applies what it holds even
//!   if no source reconnects; a reconnecting source also reopens a broken
//!   store. `storage_full` is cleared by the next spool or apply that
//!   succeeds (a reopen needs almost no space, so it proves nothing). No
//!   restart, no resync: the source resumes after the target's `durable_seq`.

use bytes::Bytes;
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{debug, error, info, warn};

use crate::handshake::{self, check_known, KnownVolume, Refusal};
use crate::pair::{now_ns, FrameConn, TargetStatus};
use crate::tls::{self, ServerTls};
use crate::wire::{
    Ack, Chunk, ErrorCode, ErrorFrame, ExtentKind, Frame, Hello, ResyncData, ResyncHashes,
    ResyncReason, ResyncRequest, Tag, Welcome, WireError, DEFAULT_MAX_FRAME,
};

/// Identity of a replica volume as its store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreIdentity {
    /// Volume name.
    pub name: String,
    /// Volume UUID.
    pub uuid: [u8; 16],
    /// Generation.
    pub generation: u64,
    /// Replica size in bytes.
    pub size: u64,
    /// Tracking block size.
    pub block_size: u32,
}

/// New contents of one extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreData {
    /// The bytes: usually a slice of the chunk's whole (decompressed)
    /// payload, shared by its extents rather than copied per extent.
    Data(Bytes),
    /// This many zero bytes.
    Zero(u64),
}

impl StoreData {
    /// Length on the volume.
    pub fn len(&self) -> u64 {
        match self {
            StoreData::Data(d) => d.len() as u64,
            StoreData::Zero(n) => *n,
        }
    }

    /// Whether the extent is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One write of a [`StoreChunk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreExtent {
    /// Byte offset on the volume.
    pub offset: u64,
    /// New contents.
    pub data: StoreData,
}

/// A verified, decompressed chunk handed to [`TargetStore::spool`] (shaped
/// like `journal::ChunkIn`, so an adapter is a field-by-field move).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreChunk {
    /// First ring sequence (0 with `last_seq` 0: unordered resync/bitmap data).
    pub first_seq: u64,
    /// Last ring sequence (inclusive).
    pub last_seq: u64,
    /// Source capture time of the newest change (ns since the epoch).
    pub source_time_ns: u64,
    /// Consistency horizon of read-back data (0: none; see `wire::Chunk::horizon_seq`).
    pub horizon_seq: u64,
    /// Sorted, non-overlapping writes.
    pub extents: Vec<StoreExtent>,
}

impl StoreChunk {
    /// Whether the chunk carries ring sequence numbers.
    pub fn is_ordered(&self) -> bool {
        !(self.first_seq == 0 && self.last_seq == 0)
    }

    /// Data bytes (zero extents excluded).
    pub fn payload_bytes(&self) -> u64 {
        self.extents
            .iter()
            .map(|e| match &e.data {
                StoreData::Data(d) => d.len() as u64,
                StoreData::Zero(_) => 0,
            })
            .sum()
    }

    /// The sequence numbers and times of `c`, with no extents yet.
    fn header_of(c: &Chunk) -> Self {
        StoreChunk {
            first_seq: c.first_seq,
            last_seq: c.last_seq,
            source_time_ns: c.source_time_ns,
            horizon_seq: c.horizon_seq,
            extents: Vec::new(),
        }
    }

    /// Decompresses and splits a wire chunk (never more than `bound` bytes).
    pub fn from_chunk(c: &Chunk, bound: u64) -> Result<Self, WireError> {
        let data = Bytes::from(c.data(bound)?.into_owned());
        Ok(Self::split(c, &data))
    }

    /// [`StoreChunk::from_chunk`] taking the frame by value: the payload —
    /// or the decompressed buffer — becomes the chunk's data without a copy,
    /// and every data extent is a slice of it. Same checks, same result.
    pub fn from_chunk_owned(mut c: Chunk, bound: u64) -> Result<Self, WireError> {
        let decompressed = match c.data(bound)? {
            std::borrow::Cow::Owned(v) => Some(v),
            // Uncompressed (its length checked by `data`): the payload itself.
            std::borrow::Cow::Borrowed(_) => None,
        };
        let data = Bytes::from(decompressed.unwrap_or_else(|| std::mem::take(&mut c.payload)));
        Ok(Self::split(&c, &data))
    }

    /// The chunk with `data` (its decompressed data extents, in order) cut
    /// into extents by [`Chunk::split`]: slices of `data`, no copy.
    fn split(c: &Chunk, data: &Bytes) -> Self {
        let extents = c
            .split(data)
            .map(|(e, d)| StoreExtent {
                offset: e.offset,
                data: match (e.kind, d) {
                    (ExtentKind::Data, Some(d)) => StoreData::Data(data.slice_ref(d)),
                    _ => StoreData::Zero(u64::from(e.len)),
                },
            })
            .collect();
        StoreChunk {
            extents,
            ..Self::header_of(c)
        }
    }

    /// An unordered chunk from a resync block.
    pub fn from_resync(r: &ResyncData, bound: u64) -> Result<Self, WireError> {
        let data = Bytes::from(r.data(bound)?.into_owned());
        Ok(StoreChunk {
            first_seq: 0,
            last_seq: 0,
            source_time_ns: now_ns(),
            horizon_seq: r.horizon_seq,
            extents: vec![StoreExtent {
                offset: r.offset,
                data: StoreData::Data(data),
            }],
        })
    }
}

/// Result of one [`TargetStore::apply_some`] step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Chunks applied.
    pub chunks: u64,
    /// Volume bytes written.
    pub bytes: u64,
    /// `applied_seq` after the step.
    pub applied_seq: u64,
    /// Source time of the last chunk applied.
    pub last_source_time_ns: u64,
}

/// Apply steps that run concurrently with the other calls of their store
/// (see [`TargetStore::concurrent_apply`]).
pub trait ConcurrentApply: Send + Sync {
    /// The contract of [`TargetStore::apply_some`] (bounded step in spool
    /// order, `Ok(None)` when nothing is pending), callable while other
    /// threads spool, acknowledge and read the store's counters.
    fn apply_some(&self) -> Result<Option<ApplyReport>, StoreError>;
}

/// Errors of a [`TargetStore`]. After [`StoreError::Failed`] the server
/// considers the store broken: the connection is closed and the next
/// connection for the volume drops the store and opens it again through the
/// [`StoreProvider`] (for the journal: reopen = crash recovery, the rule for
/// a poisoned handle).
#[derive(Debug, Error)]
pub enum StoreError {
    /// The spool is over its budget: nothing was stored; retry after apply.
    #[error("spool full")]
    SpoolFull,
    /// The store's file system is too low on free space to take more before
    /// apply catches up (storing more could leave apply without the space it
    /// needs): like [`StoreError::SpoolFull`] nothing was stored and the
    /// connection waits for apply; the message is shown in
    /// [`TargetStatus::low_space`].
    #[error("low on space: {0}")]
    LowSpace(String),
    /// The request is invalid (extent outside the volume, bad range...):
    /// nothing was stored; the source gets a `BadFrame` error.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The store failed (I/O...); the connection is closed with an
    /// `Internal` error and the source retries later.
    #[error("store failed: {0}")]
    Failed(String),
    /// The store's file system is full (`ENOSPC`/`EDQUOT`). Like
    /// [`StoreError::Failed`] (nothing of the call may be acknowledged; the
    /// store is reopened before it is used again), but expected to pass when
    /// space is freed: reported as storage full, answered with
    /// [`ErrorCode::SpoolFull`], recovery retried with a backoff.
    #[error("target storage full: {0}")]
    NoSpace(String),
}

impl StoreError {
    /// Whether the store must be reopened before further use.
    pub fn breaks_store(&self) -> bool {
        matches!(self, StoreError::Failed(_) | StoreError::NoSpace(_))
    }
}

/// The storage behind one replicated volume at the target (implemented over
/// `journal::TargetVolume` in `tools`; tests use an in-memory double).
///
/// An adapter over the journal is a field-by-field move (sketch; `replicator`
/// does not depend on `journal`):
///
/// ```text
/// struct JournalStore(journal::TargetVolume, /* new replica? */ Option<ResyncReason>);
/// impl TargetStore for JournalStore {
///     fn identity(&self) -> StoreIdentity {
///         let i = self.0.identity();
///         StoreIdentity { name: i.name.clone(), uuid: i.uuid, generation: i.generation,
///                         size: i.size, block_size: i.block_size }
///     }
///     fn durable_seq(&self) -> u64 { self.0.durable_seq() }      // same for applied_seq,
///     fn spool_bytes(&self) -> u64 { self.0.spool_bytes() }      // spool_budget
///     fn spool(&mut self, c: &[StoreChunk]) -> Result<u64, StoreError> {
///         let v: Vec<ChunkIn> = c.iter().map(|c| ChunkIn { first_seq: c.first_seq,
///             last_seq: c.last_seq, source_time_ns: c.source_time_ns, horizon_seq: c.horizon_seq,
///             extents: c.extents.iter().map(|e| ChunkExtent { offset: e.offset,
///                 data: match &e.data { StoreData::Data(d) => ExtentData::Data(d.clone()),
///                                       StoreData::Zero(n) => ExtentData::Zero(*n) } }).collect()
///         }).collect();
///         match self.0.spool_many(&v) {
///             Ok(_) => Ok(self.0.durable_seq()),
///             Err(JournalError::SpoolFull { .. }) => Err(StoreError::SpoolFull),
///             Err(JournalError::InvalidChunk(m)) => Err(StoreError::Invalid(m)),
///             Err(e) => Err(StoreError::Failed(e.to_string())),   // poisoned: reopened
///         }
///     }
///     fn apply_some(&mut self) -> Result<Option<ApplyReport>, StoreError> {
///         self.0.apply_batch().map(|o| o.map(|a| ApplyReport { chunks: a.chunks, bytes: a.bytes,
///             applied_seq: a.applied_seq, last_source_time_ns: a.last_source_time_ns }))
///             .map_err(|e| StoreError::Failed(e.to_string()))
///     }
///     fn block_hashes(&mut self, o: u64, l: u64, b: u64) -> Result<Vec<[u8; 32]>, StoreError> {
///         self.0.block_hashes(o, l, b).map_err(|e| StoreError::Failed(e.to_string()))
///     }
///     fn resize(&mut self, n: u64) -> Result<(), StoreError> { /* self.0.resize(n) */ }
///     fn tag(&mut self, t: &Tag) -> Result<(), StoreError> { /* bookmark in the catalogue, by seq */ }
///     fn resync_reason(&self) -> Option<ResyncReason> { self.1 }   // NewReplica when created,
///     fn resync_started(&mut self) { self.1 = None }                // persist if you can
/// }
/// ```
///
/// All methods are called with the store's lock held, from the connection
/// thread (spool, tag, hashes, resize) or the volume's apply thread
/// (`apply_some`). Implementations must be idempotent by sequence: an ordered
/// chunk with `last_seq <= durable_seq()` is a duplicate (a re-delivery after
/// a reconnect) and must not be applied again.
pub trait TargetStore: Send {
    /// The identity the replica was created with (checked against every
    /// `Hello` with [`handshake::check_known`]).
    fn identity(&self) -> StoreIdentity;
    /// Highest ring sequence durable in the spool (every ordered chunk up to
    /// it survives a crash). Reported in `Welcome` as the resume point.
    fn durable_seq(&self) -> u64;
    /// Highest ring sequence applied to the replica.
    fn applied_seq(&self) -> u64;
    /// Payload bytes spooled and not applied.
    fn spool_bytes(&self) -> u64;
    /// Spool budget (flow control threshold).
    fn spool_budget(&self) -> u64;
    /// Stores `chunks` durably, in order (one fsync for all of them), and
    /// returns the durable sequence afterwards. On error nothing of the call
    /// may be stored.
    fn spool(&mut self, chunks: &[StoreChunk]) -> Result<u64, StoreError>;
    /// Called before each [`TargetStore::spool`]: whether more input was
    /// already waiting on the connection when its batch was taken, i.e. the
    /// source sends faster than this target stores. A store that applies in
    /// place of spooling when idle should spool while this is set, so the
    /// spool absorbs the burst. Default: ignored.
    fn set_incoming_backlog(&mut self, _backlog: bool) {}
    /// What [`TargetStore::spool`] applied to the replica itself since the
    /// last call (a store that applies in place of spooling when idle), for
    /// the applied-bytes and apply-rate figures. Default: nothing.
    fn take_applied_in_spool(&mut self) -> Option<ApplyReport> {
        None
    }
    /// Applies a bounded amount of spooled chunks in spool order; `Ok(None)`
    /// when nothing is pending. The store lock is held for the whole step, so
    /// spooling (and thus every ack) waits for at most one step: keep steps
    /// short (for the journal: `apply_next`, or `apply_batch` with a small
    /// `apply_batch_chunks`/`apply_batch_bytes`).
    fn apply_some(&mut self) -> Result<Option<ApplyReport>, StoreError>;
    /// A handle that runs apply steps *without* the engine's store lock, so
    /// that spooling and acknowledging go on while a step does its I/O (the
    /// store then synchronises spool and apply itself). `None` (the default):
    /// the engine calls [`TargetStore::apply_some`] under the store lock.
    fn concurrent_apply(&self) -> Option<Arc<dyn ConcurrentApply>> {
        None
    }
    /// blake3 of each `hash_block`-sized block of the replica in
    /// `offset..offset + len` (the last may be short), after applying
    /// everything spooled.
    fn block_hashes(
        &mut self,
        offset: u64,
        len: u64,
        hash_block: u64,
    ) -> Result<Vec<[u8; 32]>, StoreError>;
    /// Grows the replica to `new_size` (applies the spool first).
    fn resize(&mut self, new_size: u64) -> Result<(), StoreError>;
    /// Records a bookmark durably at its position in the stream (after every
    /// chunk spooled before it). Must be idempotent by `tag.seq`. The default
    /// ignores tags.
    fn tag(&mut self, tag: &Tag) -> Result<(), StoreError> {
        let _ = tag;
        Ok(())
    }
    /// Why the store wants a full resync (e.g. a new or distrusted replica);
    /// sent in `Welcome`. Default: none.
    fn resync_reason(&self) -> Option<ResyncReason> {
        None
    }
    /// Called when the source starts a resync pass at offset 0 (the reason
    /// from [`TargetStore::resync_reason`] has been heard and may be cleared).
    fn resync_started(&mut self) {}
    /// Brings a store that failed ([`StoreError::breaks_store`]) back in
    /// place: for the journal, drop the handle and open it again (crash
    /// recovery: torn tails cut, journaled-but-uncommitted chunks re-applied
    /// by chunk id, nothing acknowledged lost). `Ok(true)`: usable again;
    /// `Ok(false)`: not supported (the default; the next connection reopens
    /// the store through its [`StoreProvider`]); `Err`: still failing (e.g.
    /// [`StoreError::NoSpace`] while the disk is full), retried later.
    fn recover(&mut self) -> Result<bool, StoreError> {
        Ok(false)
    }
}

/// Opens (or creates) the store for a volume named in a `Hello`, or refuses
/// the source. Called once per volume per server lifetime; later
/// connections reuse the open store.
pub trait StoreProvider: Send + Sync + 'static {
    /// The store for `hello.volume_name`. `peer` is the TLS identity of the
    /// source (allow-list name), `None` in insecure mode.
    fn open(&self, hello: &Hello, peer: Option<&str>) -> Result<Box<dyn TargetStore>, Refusal>;
}

impl<F> StoreProvider for F
where
    F: Fn(&Hello, Option<&str>) -> Result<Box<dyn TargetStore>, Refusal> + Send + Sync + 'static,
{
    fn open(&self, hello: &Hello, peer: Option<&str>) -> Result<Box<dyn TargetStore>, Refusal> {
        self(hello, peer)
    }
}

/// Tunables of a [`TargetServer`].
#[derive(Debug, Clone)]
pub struct TargetOptions {
    /// Largest frame accepted (announced in `Welcome`).
    pub max_frame: u32,
    /// Frames spooled with one store call at most.
    pub max_batch_frames: usize,
    /// Payload bytes spooled with one store call at most.
    pub max_batch_bytes: u64,
    /// A connection silent this long is closed (sources heartbeat every
    /// second when idle).
    pub idle_timeout: Duration,
    /// After an apply step that applied less than `apply_gather_bytes`, the
    /// apply thread lets spooled chunks gather for up to this long (less
    /// once that much is spooled) before the next step, so that a slow
    /// stream is applied in fewer, larger steps: each step pays fixed costs
    /// (an `fdatasync` of the replica and of the journal, a commit record).
    /// Only the replica's lag behind the spool grows, by at most this much;
    /// acknowledgements (and so RPO) do not wait for apply. Zero: apply as
    /// soon as anything is spooled.
    pub apply_gather: Duration,
    /// See [`TargetOptions::apply_gather`].
    pub apply_gather_bytes: u64,
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions {
            max_frame: DEFAULT_MAX_FRAME,
            max_batch_frames: 64,
            max_batch_bytes: 64 << 20,
            idle_timeout: Duration::from_secs(30),
            apply_gather: Duration::from_millis(50),
            apply_gather_bytes: 4 << 20,
        }
    }
}

/// Errors starting a server.
#[derive(Debug, Error)]
pub enum TargetError {
    /// Binding the listener failed.
    #[error("bind {addr}: {source}")]
    Bind {
        /// Address.
        addr: String,
        /// Cause.
        source: std::io::Error,
    },
    /// TLS configuration problem.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct Volume {
    store: Mutex<Box<dyn TargetStore>>,
    status: Mutex<TargetStatus>,
    epoch: AtomicU64,
    wake: (Mutex<u64>, Condvar),
    applier: Mutex<Option<JoinHandle<()>>>,
    /// The store failed (`StoreError::Failed`, e.g. a poisoned journal
    /// handle): the next connection drops it and opens it again through the
    /// provider (which runs the store's recovery).
    broken: AtomicBool,
    /// Connection threads waiting for the store lock to spool (the apply
    /// thread lets them in between its steps, see `start_applier`).
    spool_waiting: AtomicU64,
    /// Bumped whenever `store` is replaced (the apply thread then asks the
    /// new store for its [`TargetStore::concurrent_apply`] handle).
    store_gen: AtomicU64,
    /// Start of the current apply-rate window and bytes applied in it.
    apply_window: Mutex<(Instant, u64)>,
}

/// Placeholder while a failed store is being reopened.
struct Closed(StoreIdentity);

impl TargetStore for Closed {
    fn identity(&self) -> StoreIdentity {
        self.0.clone()
    }
    fn durable_seq(&self) -> u64 {
        0
    }
    fn applied_seq(&self) -> u64 {
        0
    }
    fn spool_bytes(&self) -> u64 {
        0
    }
    fn spool_budget(&self) -> u64 {
        0
    }
    fn spool(&mut self, _: &[StoreChunk]) -> Result<u64, StoreError> {
        Err(StoreError::Failed("store closed".into()))
    }
    fn apply_some(&mut self) -> Result<Option<ApplyReport>, StoreError> {
        Ok(None)
    }
    fn block_hashes(&mut self, _: u64, _: u64, _: u64) -> Result<Vec<[u8; 32]>, StoreError> {
        Err(StoreError::Failed("store closed".into()))
    }
    fn resize(&mut self, _: u64) -> Result<(), StoreError> {
        Err(StoreError::Failed("store closed".into()))
    }
}

impl Volume {
    /// Records a store failure: marks the store broken if it must be
    /// reopened, and reports a full disk (logged once per episode).
    fn store_failed(&self, what: &str, e: &StoreError) {
        if e.breaks_store() {
            self.broken.store(true, Ordering::SeqCst);
        }
        let mut st = lock(&self.status);
        if let StoreError::NoSpace(m) = e {
            if st.storage_full.is_none() {
                error!(volume = %st.volume, during = what, error = %m,
                    "target storage full: replication paused, nothing more is acknowledged until space is freed (the source keeps tracking and retries)");
            }
            st.storage_full = Some(m.clone());
        } else {
            warn!(volume = %st.volume, during = what, error = %e, "target store failed");
        }
        st.last_error = Some(format!("{what}: {e}"));
        st.last_error_ns = now_ns();
    }

    /// The store wrote successfully (spool or apply): a full disk is over.
    fn store_ok(&self) {
        let mut st = lock(&self.status);
        st.last_ok_ns = now_ns();
        if st.storage_full.take().is_some() {
            info!(volume = %st.volume, "target storage available again: replication resumes");
        }
        if st.low_space.take().is_some() {
            info!(volume = %st.volume, "target space sufficient again: spooling resumes");
        }
    }

    /// Spooling waits for apply because the file system is low on space
    /// (logged once per episode).
    fn low_space(&self, m: String) {
        let mut st = lock(&self.status);
        if st.low_space.is_none() {
            warn!(volume = %st.volume, message = %m,
                  "target file system low on space: spooling waits for apply to free space");
        }
        st.low_space = Some(m);
    }

    fn kick(&self) {
        *lock(&self.wake.0) += 1;
        self.wake.1.notify_all();
    }
    /// Counts an apply step's (or a direct apply's) bytes in the status.
    fn account_applied(&self, rep: &ApplyReport) {
        {
            let mut st = lock(&self.status);
            st.applied_bytes += rep.bytes;
            if rep.last_source_time_ns != 0 {
                st.last_applied_source_time_ns = rep.last_source_time_ns;
            }
        }
        // Lock order: the window before the status (as in `roll_apply_rate`).
        lock(&self.apply_window).1 += rep.bytes;
        self.roll_apply_rate();
    }

    /// Publishes the apply rate of the window once it is a second old.
    fn roll_apply_rate(&self) {
        let mut w = lock(&self.apply_window);
        let el = w.0.elapsed();
        if el >= Duration::from_secs(1) {
            lock(&self.status).apply_rate_bps = w.1 as f64 / el.as_secs_f64();
            *w = (Instant::now(), 0);
        }
    }

    fn refresh(&self, s: &dyn TargetStore) {
        let mut st = lock(&self.status);
        st.durable_seq = s.durable_seq();
        st.applied_seq = s.applied_seq();
        st.spool_bytes = s.spool_bytes();
        st.spool_budget = s.spool_budget();
    }
}

struct Shared {
    tls: ServerTls,
    provider: Arc<dyn StoreProvider>,
    opts: TargetOptions,
    stop: AtomicBool,
    volumes: Mutex<HashMap<String, Arc<Volume>>>,
    conns: Mutex<HashMap<u64, TcpStream>>,
    next_conn: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Peers refused before any data frame (TLS or handshake).
    refused: AtomicU64,
    last_refusal: Mutex<Option<String>>,
}

/// Peers the server refused since it started (TLS authentication or
/// handshake), for status commands that should not parse log text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Refusals {
    /// Number of refused connections.
    pub count: u64,
    /// The most recent refusal: peer address and reason.
    pub last: Option<String>,
}

impl Shared {
    fn note_refusal(&self, peer: SocketAddr, why: String) {
        self.refused.fetch_add(1, Ordering::SeqCst);
        *lock(&self.last_refusal) = Some(format!("{peer}: {why}"));
    }
}

/// A running target: one listener, any number of volumes (routed by the
/// volume name of `Hello`), one thread per connection and one apply thread
/// per volume.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use replicator::target::*;
/// # use replicator::tls::ServerTls;
/// # fn provider() -> Arc<dyn StoreProvider> { unimplemented!() }
/// let server = TargetServer::bind("127.0.0.1:0", ServerTls::insecure(), provider(),
///                                 TargetOptions::default()).unwrap();
/// println!("listening on {}", server.local_addr());
/// // ... server.status() for `rewind status`
/// server.shutdown();
/// ```
pub struct TargetServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for TargetServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl TargetServer {
    /// Binds `addr` and starts accepting in a background thread. With
    /// `ServerTls::insecure()` a non-loopback address is refused
    /// ([`TargetError::Tls`]).
    pub fn bind(
        addr: &str,
        tls: ServerTls,
        provider: Arc<dyn StoreProvider>,
        opts: TargetOptions,
    ) -> Result<TargetServer, TargetError> {
        let listener = TcpListener::bind(addr).map_err(|e| TargetError::Bind {
            addr: addr.into(),
            source: e,
        })?;
        Self::from_listener(listener, tls, provider, opts)
    }

    /// Starts serving on an already bound listener.
    pub fn from_listener(
        listener: TcpListener,
        tls: ServerTls,
        provider: Arc<dyn StoreProvider>,
        opts: TargetOptions,
    ) -> Result<TargetServer, TargetError> {
        let addr = listener.local_addr().map_err(|e| TargetError::Bind {
            addr: "listener".into(),
            source: e,
        })?;
        if tls.is_insecure() {
            // Plaintext only on loopback, refused before serving anything.
            tls::check_insecure_listener(&addr)?;
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| TargetError::Bind {
                addr: addr.to_string(),
                source: e,
            })?;
        let shared = Arc::new(Shared {
            tls,
            provider,
            opts,
            stop: AtomicBool::new(false),
            volumes: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            threads: Mutex::new(Vec::new()),
            refused: AtomicU64::new(0),
            last_refusal: Mutex::new(None),
        });
        let sh = shared.clone();
        let accept = std::thread::Builder::new()
            .name("rewind-target-accept".into())
            .spawn(move || accept_loop(listener, sh))
            .map_err(|e| TargetError::Bind {
                addr: addr.to_string(),
                source: e,
            })?;
        info!(%addr, "target listening");
        Ok(TargetServer {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Status of every volume seen since start.
    pub fn status(&self) -> Vec<TargetStatus> {
        let vols = lock(&self.shared.volumes);
        let mut v: Vec<TargetStatus> = vols.values().map(|v| lock(&v.status).clone()).collect();
        v.sort_by(|a, b| a.volume.cmp(&b.volume));
        v
    }

    /// Connections refused since start (bad or missing certificate, identity
    /// not allowed, handshake refused: unknown volume, wrong generation...),
    /// counted when the refusal is logged.
    pub fn refusals(&self) -> Refusals {
        Refusals {
            count: self.shared.refused.load(Ordering::SeqCst),
            last: lock(&self.shared.last_refusal).clone(),
        }
    }

    /// Cuts every current connection (sources reconnect); the listener keeps
    /// accepting. For tests and administrative resets.
    pub fn drop_connections(&self) {
        for (_, s) in lock(&self.shared.conns).drain() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Stops accepting, closes all connections, stops the apply threads and
    /// waits for every thread. Spooled data stays in the stores (they are
    /// dropped here; durable state is whatever the stores made durable).
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.drop_connections();
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let threads: Vec<_> = lock(&self.shared.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
        let vols: Vec<_> = lock(&self.shared.volumes).drain().map(|(_, v)| v).collect();
        for v in vols {
            v.kick();
            if let Some(h) = lock(&v.applier).take() {
                let _ = h.join();
            }
        }
        info!(addr = %self.addr, "target stopped");
    }
}

impl Drop for TargetServer {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.stop_all();
        }
    }
}

fn accept_loop(listener: TcpListener, sh: Arc<Shared>) {
    while !sh.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((sock, peer)) => {
                let _ = sock.set_nonblocking(false);
                let id = sh.next_conn.fetch_add(1, Ordering::SeqCst);
                if let Ok(c) = sock.try_clone() {
                    lock(&sh.conns).insert(id, c);
                }
                let sh2 = sh.clone();
                let h = std::thread::Builder::new()
                    .name(format!("rewind-target-conn-{id}"))
                    .spawn(move || {
                        serve(&sh2, sock, peer);
                        lock(&sh2.conns).remove(&id);
                    });
                match h {
                    Ok(h) => {
                        let mut t = lock(&sh.threads);
                        t.retain(|h| !h.is_finished());
                        t.push(h);
                    }
                    Err(e) => warn!(error = %e, "cannot spawn a connection thread"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn start_applier(sh: &Arc<Shared>, vol: &Arc<Volume>) {
    let v = vol.clone();
    let sh = sh.clone();
    let h = std::thread::Builder::new()
        .name("rewind-target-apply".into())
        .spawn(move || {
            let mut recovery = Recovery::new();
            let mut conc: Option<(u64, Option<Arc<dyn ConcurrentApply>>)> = None;
            while !sh.stop.load(Ordering::SeqCst) {
                if v.broken.load(Ordering::SeqCst) {
                    recovery.step(&v);
                    continue;
                }
                let gen = v.store_gen.load(Ordering::SeqCst);
                if conc.as_ref().map(|c| c.0) != Some(gen) {
                    conc = Some((gen, lock(&v.store).concurrent_apply()));
                }
                let handle = conc.as_ref().and_then(|c| c.1.clone());
                if handle.is_none() {
                    // A mutex is not fair: re-locking right after a step would
                    // often win against a connection thread waiting to spool,
                    // delaying its ack by several steps. Let waiters in first
                    // (bounded, so apply still progresses under a steady stream).
                    let yielded = Instant::now();
                    while v.spool_waiting.load(Ordering::SeqCst) > 0
                        && yielded.elapsed() < Duration::from_millis(20)
                    {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                let seen = *lock(&v.wake.0);
                let r = match handle {
                    // The step runs without the store lock: spools (and acks)
                    // go on meanwhile; the lock is taken only to refresh the status.
                    Some(h) => {
                        let r = h.apply_some();
                        v.refresh(lock(&v.store).as_ref());
                        r
                    }
                    None => {
                        let mut s = lock(&v.store);
                        let r = s.apply_some();
                        v.refresh(s.as_ref());
                        r
                    }
                };
                match r {
                    Ok(Some(rep)) => {
                        v.store_ok();
                        v.account_applied(&rep);
                        if rep.bytes < sh.opts.apply_gather_bytes {
                            gather(&sh, &v);
                        }
                    }
                    Ok(None) => {
                        v.roll_apply_rate();
                        let g = lock(&v.wake.0);
                        if *g == seen {
                            let _ = v.wake.1.wait_timeout(g, Duration::from_millis(50));
                        }
                    }
                    Err(e) => {
                        v.store_failed("apply", &e);
                        std::thread::sleep(Duration::from_millis(500));
                    }
                }
            }
        });
    match h {
        Ok(h) => *lock(&vol.applier) = Some(h),
        Err(e) => warn!(error = %e, "cannot spawn the apply thread"),
    }
}

/// Waits (see [`TargetOptions::apply_gather`]) until `apply_gather` has
/// passed, `apply_gather_bytes` (or half the spool budget) are spooled, or
/// the server stops.
fn gather(sh: &Shared, v: &Volume) {
    let until = Instant::now() + sh.opts.apply_gather;
    loop {
        let now = Instant::now();
        let enough = {
            let st = lock(&v.status);
            st.spool_bytes >= sh.opts.apply_gather_bytes.min(st.spool_budget / 2)
        };
        if now >= until || enough || sh.stop.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep((until - now).min(Duration::from_millis(5)));
    }
}

/// Retries [`TargetStore::recover`] of a broken store from the apply thread,
/// with a backoff (0.5 s doubling to 5 s; a reopen of a big journal reads
/// its whole index, so it is not retried in a tight loop).
struct Recovery {
    next: Instant,
    backoff: Duration,
}

impl Recovery {
    const FIRST: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Recovery {
            next: Instant::now(),
            backoff: Self::FIRST,
        }
    }

    /// One step: wait (at most 50 ms, so stop is noticed) or try once.
    fn step(&mut self, v: &Volume) {
        let now = Instant::now();
        if now < self.next {
            std::thread::sleep((self.next - now).min(Duration::from_millis(50)));
            return;
        }
        let r = {
            let mut s = lock(&v.store);
            if !v.broken.load(Ordering::SeqCst) {
                // A connection reopened it meanwhile.
                Ok(true)
            } else {
                let r = s.recover();
                if matches!(r, Ok(true)) {
                    v.broken.store(false, Ordering::SeqCst);
                    lock(&v.status).store_recoveries += 1;
                    v.refresh(s.as_ref());
                }
                r
            }
        };
        match r {
            Ok(true) => {
                // Reopening needs (almost) no space, so it says nothing about
                // the disk: `storage_full` is cleared by the next spool or
                // apply that really writes.
                info!(volume = %lock(&v.status).volume, "target store recovered in place");
                self.backoff = Self::FIRST;
                v.kick();
            }
            Ok(false) => self.next = Instant::now() + Self::FIRST,
            Err(e) => {
                v.store_failed("recover", &e);
                debug!(retry_in = ?self.backoff, "store recovery failed");
                self.next = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(Self::MAX);
            }
        }
    }
}

/// The refusal for a store that cannot be used (still failing to recover).
fn store_refusal(name: &str, e: &StoreError) -> Refusal {
    match e {
        StoreError::NoSpace(m) => Refusal::new(
            ErrorCode::SpoolFull,
            format!("volume {name:?}: target storage full: {m}"),
        ),
        e => Refusal::new(ErrorCode::Internal, format!("volume {name:?}: {e}")),
    }
}

/// Opens (or reuses) the volume of `hello` and builds the `Welcome`.
fn admit(
    sh: &Arc<Shared>,
    hello: &Hello,
    peer: Option<&str>,
) -> Result<(Arc<Volume>, Welcome, u64), Refusal> {
    // Opening is serialised (the volume map lock is held across the
    // provider call) so one volume is never opened twice.
    let mut vols = lock(&sh.volumes);
    let vol = match vols.get(&hello.volume_name) {
        Some(v) => v.clone(),
        None => {
            let store = sh.provider.open(hello, peer)?;
            let v = Arc::new(Volume {
                status: Mutex::new(TargetStatus {
                    volume: hello.volume_name.clone(),
                    ..TargetStatus::default()
                }),
                store: Mutex::new(store),
                epoch: AtomicU64::new(0),
                wake: (Mutex::new(0), Condvar::new()),
                applier: Mutex::new(None),
                broken: AtomicBool::new(false),
                spool_waiting: AtomicU64::new(0),
                store_gen: AtomicU64::new(0),
                apply_window: Mutex::new((Instant::now(), 0)),
            });
            vols.insert(hello.volume_name.clone(), v.clone());
            start_applier(sh, &v);
            v
        }
    };
    drop(vols);
    let mut s = lock(&vol.store);
    if vol.broken.load(Ordering::SeqCst) {
        warn!(volume = %hello.volume_name, "reopening a failed store");
        match s.recover() {
            Ok(true) => {}
            Ok(false) => {
                // Drop the failed handle first (it may hold locks), then reopen.
                let id = s.identity();
                *s = Box::new(Closed(id));
                vol.store_gen.fetch_add(1, Ordering::SeqCst);
                *s = sh.provider.open(hello, peer)?;
                vol.store_gen.fetch_add(1, Ordering::SeqCst);
            }
            Err(e) => {
                drop(s);
                vol.store_failed("reopen", &e);
                return Err(store_refusal(&hello.volume_name, &e));
            }
        }
        vol.broken.store(false, Ordering::SeqCst);
        lock(&vol.status).store_recoveries += 1;
    }
    let id = s.identity();
    check_known(
        &KnownVolume {
            uuid: id.uuid,
            generation: id.generation,
            block_size: id.block_size,
        },
        hello,
    )?;
    let mut resync = s.resync_reason();
    let replica_size = id.size;
    if hello.size < id.size {
        return Err(Refusal::new(
            ErrorCode::SizeMismatch,
            format!(
                "volume {:?} is {} bytes here, the source has {} bytes: shrinking is not supported",
                hello.volume_name, id.size, hello.size
            ),
        ));
    }
    if hello.size > id.size {
        info!(volume = %hello.volume_name, from = id.size, to = hello.size, "growing the replica");
        s.resize(hello.size).map_err(|e| {
            Refusal::new(
                ErrorCode::SizeMismatch,
                format!("cannot grow the replica: {e}"),
            )
        })?;
        resync = resync.or(Some(ResyncReason::SizeChanged));
    }
    // Supersede any older connection of this volume (under the store lock).
    let epoch = vol.epoch.fetch_add(1, Ordering::SeqCst) + 1;
    let w = Welcome {
        accepted: true,
        protocol_version: hello.protocol_version,
        max_frame: 0,
        durable_seq: s.durable_seq(),
        applied_seq: s.applied_seq(),
        replica_size,
        resync,
    };
    vol.refresh(s.as_ref());
    drop(s);
    Ok((vol, w, epoch))
}

/// The error code a source hears for a store error.
fn error_code(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::NoSpace(_) | StoreError::SpoolFull | StoreError::LowSpace(_) => {
            ErrorCode::SpoolFull
        }
        StoreError::Invalid(_) => ErrorCode::BadFrame,
        StoreError::Failed(_) => ErrorCode::Internal,
    }
}

fn send_error(conn: &mut FrameConn, code: ErrorCode, msg: String) {
    warn!(?code, message = %msg, "closing replication connection with an error");
    let _ = conn.send(&Frame::Error(ErrorFrame { code, message: msg }));
}

fn serve(sh: &Arc<Shared>, sock: TcpStream, peer: SocketAddr) {
    let mut t = match tls::accept_stream(sock, &sh.tls) {
        Ok(t) => t,
        Err(e) => {
            warn!(%peer, error = %e, "replication client refused");
            sh.note_refusal(peer, e.to_string());
            return;
        }
    };
    let ident = t.peer_identity().map(str::to_owned);
    let mut chosen = None;
    let hs = handshake::server_accept_with_max(&mut t, sh.opts.max_frame, |h| {
        let (v, w, e) = admit(sh, h, ident.as_deref())?;
        chosen = Some((v, e));
        Ok(w)
    });
    let hello = match hs {
        Ok((h, _)) => h,
        Err(e) => {
            warn!(%peer, error = %e, "replication handshake failed");
            sh.note_refusal(peer, e.to_string());
            return;
        }
    };
    let Some((vol, epoch)) = chosen else { return };
    {
        let mut st = lock(&vol.status);
        st.connected = true;
        st.peer = Some(peer.to_string());
        st.connections += 1;
    }
    info!(%peer, volume = %hello.volume_name, epoch, "replication source connected");
    let max = hello.max_frame.min(sh.opts.max_frame);
    let mut conn = FrameConn::new(t, max, None);
    let _ = conn.t.set_write_timeout(Some(sh.opts.idle_timeout));
    let r = frame_loop(sh, &vol, epoch, &mut conn, max);
    if let Err(e) = &r {
        let mut st = lock(&vol.status);
        st.last_error = Some(e.clone());
        st.last_error_ns = now_ns();
    }
    if vol.epoch.load(Ordering::SeqCst) == epoch {
        let mut st = lock(&vol.status);
        st.connected = false;
        st.flow_controlled = false;
    }
    info!(%peer, volume = %hello.volume_name, result = ?r, "replication source disconnected");
}

fn ack(s: &dyn TargetStore) -> Frame {
    Frame::Ack(Ack {
        durable_seq: s.durable_seq(),
        applied_seq: s.applied_seq(),
        spool_bytes: s.spool_bytes(),
        spool_budget: s.spool_budget(),
    })
}

enum Item {
    Chunk(StoreChunk, bool),
    Other(Frame),
}

fn frame_loop(
    sh: &Arc<Shared>,
    vol: &Arc<Volume>,
    epoch: u64,
    conn: &mut FrameConn,
    max: u32,
) -> Result<(), String> {
    let current = || vol.epoch.load(Ordering::SeqCst) == epoch && !sh.stop.load(Ordering::SeqCst);
    let mut last_frame = Instant::now();
    let mut pending: Option<Frame> = None;
    loop {
        if !current() {
            return Ok(());
        }
        // Flow control: do not read while the spool is over budget. The
        // figures come from the status (refreshed under the store lock after
        // every spool and apply step), not from the store: taking the store
        // lock here waited for a whole apply step before every frame batch,
        // on top of the wait for the spool itself.
        loop {
            let over = {
                let mut st = lock(&vol.status);
                let over = st.spool_budget > 0 && st.spool_bytes > st.spool_budget;
                st.flow_controlled = over;
                over
            };
            if !over || !current() {
                break;
            }
            vol.kick();
            std::thread::sleep(Duration::from_millis(5));
            last_frame = Instant::now();
        }
        let first = match pending.take() {
            Some(f) => f,
            None => match conn.poll(Duration::from_millis(200)) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    if last_frame.elapsed() > sh.opts.idle_timeout {
                        return Err("source silent: idle timeout".into());
                    }
                    continue;
                }
                Err(e) if e.is_io() => return Err(format!("connection: {e}")),
                Err(e) => {
                    send_error(conn, ErrorCode::BadFrame, format!("bad frame: {e}"));
                    return Err(format!("bad frame: {e}"));
                }
            },
        };
        last_frame = Instant::now();
        // Gather a batch of data frames that are already buffered.
        let mut batch: Vec<Item> = Vec::new();
        let mut bytes = 0u64;
        let mut next = Some(first);
        while let Some(f) = next.take() {
            let item = match f {
                Frame::Chunk(c) => {
                    StoreChunk::from_chunk_owned(c, u64::from(max)).map(|c| Item::Chunk(c, false))
                }
                Frame::ResyncData(r) => {
                    StoreChunk::from_resync(&r, u64::from(max)).map(|c| Item::Chunk(c, true))
                }
                other => Ok(Item::Other(other)),
            };
            let item = match item {
                Ok(i) => i,
                Err(e) => {
                    send_error(conn, ErrorCode::BadFrame, format!("bad chunk: {e}"));
                    return Err(format!("bad chunk: {e}"));
                }
            };
            match item {
                Item::Chunk(c, r) => {
                    bytes += c.payload_bytes();
                    batch.push(Item::Chunk(c, r));
                }
                Item::Other(f) => {
                    if batch.is_empty() {
                        batch.push(Item::Other(f));
                    } else {
                        pending = Some(f);
                    }
                    break;
                }
            }
            if batch.len() >= sh.opts.max_batch_frames || bytes >= sh.opts.max_batch_bytes {
                break;
            }
            match conn.parse() {
                Ok(f) => next = f,
                Err(e) => {
                    send_error(conn, ErrorCode::BadFrame, format!("bad frame: {e}"));
                    return Err(format!("bad frame: {e}"));
                }
            }
        }
        if let [Item::Other(_)] = batch.as_slice() {
            let Some(Item::Other(f)) = batch.pop() else {
                unreachable!()
            };
            handle_other(vol, conn, f, max, &current)?;
            continue;
        }
        spool_batch(vol, conn, batch, &current)?;
    }
}

fn spool_batch(
    vol: &Arc<Volume>,
    conn: &mut FrameConn,
    batch: Vec<Item>,
    current: &dyn Fn() -> bool,
) -> Result<(), String> {
    let mut chunks = Vec::with_capacity(batch.len());
    let mut resync = 0u64;
    for i in batch {
        if let Item::Chunk(c, r) = i {
            resync += r as u64;
            chunks.push(c);
        }
    }
    let n = chunks.len();
    let backlog = conn.input_waiting();
    let acks = loop {
        vol.spool_waiting.fetch_add(1, Ordering::SeqCst);
        let mut s = lock(&vol.store);
        vol.spool_waiting.fetch_sub(1, Ordering::SeqCst);
        if !current() {
            return Ok(());
        }
        if vol.broken.load(Ordering::SeqCst) {
            // Failed under this connection (e.g. apply hit a full disk):
            // nothing more is acknowledged until the store is recovered.
            drop(s);
            let (code, m) = match lock(&vol.status).storage_full.clone() {
                Some(m) => (ErrorCode::SpoolFull, format!("target storage full: {m}")),
                None => (
                    ErrorCode::Internal,
                    "target store failed: recovering".into(),
                ),
            };
            send_error(conn, code, m.clone());
            return Err(m);
        }
        s.set_incoming_backlog(backlog);
        match s.spool(&chunks) {
            Ok(_) => {
                vol.store_ok();
                if let Some(rep) = s.take_applied_in_spool() {
                    vol.account_applied(&rep);
                }
                vol.refresh(s.as_ref());
                let a = ack(s.as_ref());
                break vec![a; n];
            }
            Err(StoreError::SpoolFull) => {
                drop(s);
                vol.kick();
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(StoreError::LowSpace(m)) => {
                drop(s);
                vol.low_space(m);
                vol.kick();
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(StoreError::Invalid(m)) => {
                drop(s);
                send_error(conn, ErrorCode::BadFrame, format!("refused chunk: {m}"));
                return Err(format!("refused chunk: {m}"));
            }
            Err(e) => {
                drop(s);
                vol.store_failed("spool", &e);
                send_error(conn, error_code(&e), format!("spool failed: {e}"));
                return Err(format!("spool failed: {e}"));
            }
        }
    };
    vol.kick();
    {
        let mut st = lock(&vol.status);
        st.chunks_spooled += n as u64 - resync;
        st.resync_blocks += resync;
    }
    debug!(frames = n, "spooled");
    send_all(conn, &acks)
}

fn send_all(conn: &mut FrameConn, frames: &[Frame]) -> Result<(), String> {
    for f in frames {
        conn.send(f).map_err(|e| format!("send: {e}"))?;
    }
    Ok(())
}

fn handle_other(
    vol: &Arc<Volume>,
    conn: &mut FrameConn,
    f: Frame,
    max: u32,
    current: &dyn Fn() -> bool,
) -> Result<(), String> {
    match f {
        Frame::Tag(tag) => {
            let mut s = lock(&vol.store);
            if !current() {
                return Ok(());
            }
            match s.tag(&tag) {
                Ok(()) => {
                    let a = ack(s.as_ref());
                    drop(s);
                    lock(&vol.status).tags += 1;
                    send_all(conn, &[a])
                }
                Err(e) => {
                    drop(s);
                    vol.store_failed("tag", &e);
                    send_error(conn, error_code(&e), format!("tag failed: {e}"));
                    Err(format!("tag failed: {e}"))
                }
            }
        }
        Frame::Heartbeat(_) => {
            let a = ack(lock(&vol.store).as_ref());
            send_all(conn, &[a])
        }
        Frame::ResyncRequest(ResyncRequest {
            offset,
            len,
            hash_block,
        }) => {
            // Bound the answer by the frame size.
            let hb = u64::from(hash_block);
            let max_hashes = (u64::from(max) - 64) / 32;
            let mut s = lock(&vol.store);
            let size = s.identity().size;
            let bad = hb == 0
                || len == 0
                || len.div_ceil(hb) > max_hashes
                || offset.checked_add(len).is_none_or(|e| e > size);
            if bad {
                drop(s);
                let m = format!("bad resync request {offset}+{len}/{hash_block} (volume {size})");
                send_error(conn, ErrorCode::ProtocolViolation, m.clone());
                return Err(m);
            }
            if offset == 0 {
                s.resync_started();
            }
            match s.block_hashes(offset, len, hb) {
                Ok(hashes) => {
                    vol.refresh(s.as_ref());
                    drop(s);
                    send_all(
                        conn,
                        &[Frame::ResyncHashes(ResyncHashes {
                            offset,
                            hash_block,
                            hashes,
                        })],
                    )
                }
                Err(e) => {
                    drop(s);
                    vol.store_failed("resync hashes", &e);
                    send_error(conn, error_code(&e), format!("hashes failed: {e}"));
                    Err(format!("hashes failed: {e}"))
                }
            }
        }
        Frame::Error(ErrorFrame { code, message }) => {
            Err(format!("source reported {code:?}: {message}"))
        }
        other => {
            let m = format!("unexpected {:?} frame", other.frame_type());
            send_error(conn, ErrorCode::ProtocolViolation, m.clone());
            Err(m)
        }
    }
}
