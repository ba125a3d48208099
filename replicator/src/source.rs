//! The source half of the engine: a [`Pair`] drains one volume's change log
//! and ships it to a target.
//!
//! # Loop
//!
//! `Consumer::get` → coalesce the writes of the batch into chunk extents (a
//! later write wins where ranges overlap; tags cut the chunk so they keep
//! their exact position) → read the data back from the source volume for
//! `Metadata` records and bitmap batches (io_uring, pread fallback) →
//! compress → `Chunk` frame → send, several frames in flight → each `Ack`
//! (one per frame, in order) marks a frame durable at the target → batches
//! whose frames are all durable are committed to the change log, in the order
//! they were handed out.
//!
//! # What is committed when
//!
//! A change-log batch is committed only after the target acknowledged every
//! frame built from it (the target acks after its spool is durable), and
//! never before an older batch. A batch that produced no frame (ring
//! padding, records already durable at the target) is committed in order
//! like the others.
//!
//! # Ordering across reconnects
//!
//! On any connection or protocol error the session ends: the `Consumer` is
//! dropped without committing what is in flight, and the next session
//! re-attaches, which restarts at the committed ring tail and turns the
//! taken-but-uncommitted bitmap bits back into dirty bits (agent-core's
//! transactional drain). The target only ever holds a *prefix* of the frames
//! of the old connection (it processes frames in order and ignores a
//! superseded connection), so after the new handshake the source skips every
//! ring record with a sequence ≤ the target's `durable_seq` (already durable
//! there, in order) and re-sends the rest in ring order; bitmap ranges are
//! re-read (current data). Nothing is lost (uncommitted = re-delivered) and
//! no ordered change is applied before an older one.
//!
//! # Resync
//!
//! Step 1 (full pass, or only the new extent after a volume grew) is driven
//! by the source: `ResyncRequest{offset,len,hash_block}` for windows of the
//! volume, the target answers `ResyncHashes`, the source hashes its own
//! blocks (blake3) and sends `ResyncData` for the differing ones. During step
//! 1 the change log is **not drained**: every write made meanwhile stays in
//! the ring or the bitmap and is shipped in step 2, after the pass, so it is
//! applied after (and wins over) any block content read by the pass. The
//! step-1 resume offset (every block below it is durable at the target) is
//! persisted in the pair state file, so an interrupted pass resumes there.
//! Step 2 drains until the change log is empty once, then the pair is in
//! `DifferentialSync`.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agent_core::{Batch, BatchKind, ChangeLogError, ChangeLogView, Consumer, RecordKind, TagType};
use thiserror::Error;
use tracing::{info, warn};

use crate::bandwidth::PairLimiter;
use crate::handshake::{self, HandshakeError};
use crate::pair::{now_ns, FrameConn, PairState, PairStatus, PersistedPair, ResyncProgress};
use crate::tls::{self, ClientTls, TlsError};
use crate::uring::VolumeReader;
use crate::wire::{
    Chunk, Compression, ErrorFrame, Extent, ExtentKind, Frame, Heartbeat, Hello, ResyncData,
    ResyncReason, ResyncRequest, Tag, TagKind, WireError, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};

/// Configuration of one replication pair (source side).
#[derive(Debug, Clone)]
pub struct PairConfig {
    /// Volume name (the change log's volume name; routes at the target).
    pub volume: String,
    /// Path of the change-log region (`<shm_dir>/<volume>.clog`).
    pub change_log: PathBuf,
    /// The source volume (file or block device), read in metadata/bitmap
    /// modes and during resync.
    pub source_volume: PathBuf,
    /// Target address, `host:port`.
    pub target_addr: String,
    /// Name the target's certificate must be valid for.
    pub server_name: String,
    /// TLS client configuration (or `ClientTls::insecure()` on loopback).
    pub tls: ClientTls,
    /// Directory of the persisted pair state (`<volume>.pair.json`).
    pub state_dir: PathBuf,
    /// Source host identity sent in `Hello`.
    pub source_host: String,
    /// Compression of chunk and resync payloads.
    pub compression: Compression,
    /// Bandwidth limits (pair and target).
    pub limiter: PairLimiter,
    /// Data bytes per chunk (and per change-log batch), default 4 MiB.
    pub max_chunk_bytes: u64,
    /// Frames sent and not yet acknowledged at most (pipelining), default 16.
    pub max_in_flight: usize,
    /// How long ring records may wait to be shipped together (default
    /// 20 ms): while less than half a chunk is ready and the first of it was
    /// seen less than this long ago, the pair waits for more. Bigger chunks
    /// mean fewer frames, fewer fsyncs at the target and less CPU per byte
    /// on both sides, for at most this much RPO. Zero ships at once.
    pub coalesce_delay: Duration,
    /// Resync hash block, default 1 MiB.
    pub hash_block: u32,
    /// Hash blocks per `ResyncRequest`, default 64.
    pub resync_window_blocks: u32,
    /// Idle heartbeat interval, default 1 s.
    pub heartbeat: Duration,
    /// First reconnect delay, default 100 ms (doubles up to `backoff_max`).
    pub backoff_initial: Duration,
    /// Reconnect delay cap, default 5 s.
    pub backoff_max: Duration,
    /// Read the source volume with io_uring (falls back to pread).
    pub use_io_uring: bool,
    /// Largest frame this side accepts / sends.
    pub max_frame: u32,
    /// A target that answers nothing for this long is considered gone.
    pub response_timeout: Duration,
}

impl PairConfig {
    /// A configuration with defaults (zstd level 1, unlimited bandwidth).
    pub fn new(
        volume: impl Into<String>,
        change_log: impl Into<PathBuf>,
        source_volume: impl Into<PathBuf>,
        target_addr: impl Into<String>,
        server_name: impl Into<String>,
        tls: ClientTls,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        PairConfig {
            volume: volume.into(),
            change_log: change_log.into(),
            source_volume: source_volume.into(),
            target_addr: target_addr.into(),
            server_name: server_name.into(),
            tls,
            state_dir: state_dir.into(),
            source_host: std::env::var("HOSTNAME").unwrap_or_default(),
            compression: Compression::Zstd(1),
            limiter: PairLimiter::unlimited(),
            max_chunk_bytes: 4 << 20,
            max_in_flight: 16,
            coalesce_delay: Duration::from_millis(20),
            hash_block: 1 << 20,
            resync_window_blocks: 64,
            heartbeat: Duration::from_secs(1),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            use_io_uring: true,
            max_frame: DEFAULT_MAX_FRAME,
            response_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a session with the target ended (the pair reconnects after all of
/// them; they are reported in [`PairStatus::last_error`]).
#[derive(Debug, Error)]
pub enum SourceError {
    /// Change-log access failed.
    #[error("change log: {0}")]
    ChangeLog(#[from] ChangeLogError),
    /// TLS or TCP connection failed.
    #[error("connect: {0}")]
    Connect(#[from] TlsError),
    /// The handshake failed or the target refused the pair.
    #[error("handshake: {0}")]
    Handshake(#[from] HandshakeError),
    /// Frame encoding/decoding or transport error.
    #[error("wire: {0}")]
    Wire(#[from] WireError),
    /// The target sent an `Error` frame.
    #[error("target error {code:?}: {message}")]
    Remote {
        /// Code.
        code: crate::wire::ErrorCode,
        /// Message.
        message: String,
    },
    /// The target answered something unexpected.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Local I/O (source volume, state file).
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
}

struct Control {
    stop: AtomicBool,
    paused: AtomicBool,
    resync: AtomicBool,
    reconnect: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running replication pair: one thread that connects, ships, reconnects
/// with exponential backoff, until [`Pair::stop`].
///
/// ```no_run
/// use replicator::source::{Pair, PairConfig};
/// use replicator::tls::ClientTls;
/// let cfg = PairConfig::new("vol0", "/dev/shm/rewind/vol0.clog", "/dev/vg0/vol0",
///     "dr-site:7070", "dr-site", ClientTls::from_pem("ca.pem".as_ref(), "src.pem".as_ref(),
///     "src.key".as_ref()).unwrap(), "/var/lib/rewind/pairs");
/// let pair = Pair::start(cfg).unwrap();
/// println!("{}", serde_json::to_string(&pair.status()).unwrap());
/// pair.stop();
/// ```
pub struct Pair {
    status: Arc<Mutex<PairStatus>>,
    ctl: Arc<Control>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Pair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pair")
            .field("status", &self.status())
            .finish()
    }
}

impl Pair {
    /// Starts the pair's thread. Fails only on an unusable configuration
    /// (state directory); connection problems are retried forever and
    /// reported in the status.
    pub fn start(cfg: PairConfig) -> Result<Pair, SourceError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| SourceError::Io("state dir", e))?;
        let persisted = PersistedPair::load(&cfg.state_dir, &cfg.volume)
            .map_err(|e| SourceError::Io("pair state", e))?;
        let ctl = Arc::new(Control {
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(persisted.as_ref().is_some_and(|p| p.paused)),
            resync: AtomicBool::new(false),
            reconnect: AtomicBool::new(false),
        });
        let status = Arc::new(Mutex::new(PairStatus {
            volume: cfg.volume.clone(),
            compression_ratio: 1.0,
            ..PairStatus::default()
        }));
        let (c2, s2) = (ctl.clone(), status.clone());
        let handle = std::thread::Builder::new()
            .name(format!("rewind-pair-{}", cfg.volume))
            .spawn(move || run(cfg, &c2, &s2))
            .map_err(|e| SourceError::Io("spawn", e))?;
        Ok(Pair {
            status,
            ctl,
            handle: Some(handle),
        })
    }

    /// A snapshot of the live measures.
    pub fn status(&self) -> PairStatus {
        lock(&self.status).clone()
    }

    /// The shared status, for a status server that outlives borrows.
    pub fn status_handle(&self) -> Arc<Mutex<PairStatus>> {
        self.status.clone()
    }

    /// Suspends shipping (persisted; the change log keeps tracking).
    pub fn pause(&self) {
        self.ctl.paused.store(true, Ordering::SeqCst);
    }

    /// Resumes shipping.
    pub fn resume(&self) {
        self.ctl.paused.store(false, Ordering::SeqCst);
    }

    /// Starts a full checksum resync (step 1 from offset 0).
    pub fn request_resync(&self) {
        self.ctl.resync.store(true, Ordering::SeqCst);
    }

    /// Drops the current connection (the pair reconnects, as after a link
    /// cut). For tests and administrative resets.
    pub fn reconnect(&self) {
        self.ctl.reconnect.store(true, Ordering::SeqCst);
    }

    /// Waits until the pair is in `DifferentialSync` with everything
    /// captured before this call durable at the target (the change log was
    /// found empty after the call and every batch handed out before is
    /// committed), or `timeout`. Returns whether it drained.
    pub fn wait_drained(&self, timeout: Duration) -> bool {
        let since = now_ns();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            {
                let s = lock(&self.status);
                if s.drained && s.drained_as_of_ns > since && s.state == PairState::DifferentialSync
                {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Stops the pair and waits for its thread. Batches in flight are not
    /// committed (they are re-delivered to the next consumer).
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.ctl.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        lock(&self.status).state = PairState::Stopped;
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.halt();
    }
}

fn set_state(status: &Mutex<PairStatus>, st: PairState) {
    let mut s = lock(status);
    if s.state != st {
        info!(volume = %s.volume, from = ?s.state, to = ?st, "pair state");
        s.state = st;
    }
}

fn run(cfg: PairConfig, ctl: &Control, status: &Mutex<PairStatus>) {
    let mut backoff = cfg.backoff_initial;
    let mut sessions = 0u64;
    let mut offline = Offline::default();
    while !ctl.stop.load(Ordering::SeqCst) {
        let mut connected = false;
        let started = Instant::now();
        let r = session(&cfg, ctl, status, &mut connected, sessions);
        if connected {
            sessions += 1;
            // A session that fails right after connecting keeps backing off.
            if started.elapsed() >= cfg.backoff_max {
                backoff = cfg.backoff_initial;
            }
        }
        {
            let mut s = lock(status);
            s.connected = false;
            s.in_flight_frames = 0;
            s.in_flight_bytes = 0;
            s.drained = false;
            s.drained_as_of_ns = 0;
        }
        match r {
            Ok(()) => {
                if ctl.stop.load(Ordering::SeqCst) {
                    break;
                }
            }
            Err(e) => {
                warn!(volume = %cfg.volume, error = %e, retry_in = ?backoff, "replication session ended");
                lock(status).last_error = Some(e.to_string());
            }
        }
        set_state(status, PairState::Reconnecting);
        let until = Instant::now() + backoff;
        while Instant::now() < until && !ctl.stop.load(Ordering::SeqCst) {
            offline.update(&cfg, status);
            std::thread::sleep(Duration::from_millis(10));
        }
        backoff = (backoff * 2).min(cfg.backoff_max);
    }
    set_state(status, PairState::Stopped);
}

/// Keeps the source-side measures (pending data, capture mode, RPO) live
/// while disconnected.
#[derive(Default)]
struct Offline {
    view: Option<ChangeLogView>,
    last: Option<Instant>,
    oldest: Option<u64>,
    dirty_since: Option<u64>,
}

impl Offline {
    fn update(&mut self, cfg: &PairConfig, status: &Mutex<PairStatus>) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_millis(500))
        {
            return;
        }
        self.last = Some(Instant::now());
        if self.view.is_none() {
            self.view = ChangeLogView::open(&cfg.change_log).ok();
        }
        let Some(v) = &self.view else { return };
        let st = v.stats();
        let now = now_ns();
        let dirty = st.dirty_blocks_active + st.dirty_blocks_pending;
        self.dirty_since = (dirty > 0).then(|| self.dirty_since.unwrap_or(now));
        if st.ring_used_bytes > 0 {
            if self.oldest.is_none() {
                self.oldest = v.first_record().map(|r| r.timestamp_ns);
            }
        } else {
            self.oldest = None;
        }
        let oldest = match (self.oldest, self.dirty_since) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut s = lock(status);
        s.capture_mode = format!("{:?}", st.mode);
        s.ring_used_bytes = st.ring_used_bytes;
        s.dirty_blocks = dirty;
        s.pending_source_bytes = st.ring_used_bytes + dirty * u64::from(st.block_size);
        s.rpo_ns = oldest.map_or(0, |o| now.saturating_sub(o));
        s.updated_ns = now;
    }
}

fn parse_uuid(s: &str) -> [u8; 16] {
    let hex: Vec<u8> = s.bytes().filter(|c| c.is_ascii_hexdigit()).collect();
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let h = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
        if let (Some(&a), Some(&b)) = (hex.get(2 * i), hex.get(2 * i + 1)) {
            *o = h(a) << 4 | h(b);
        }
    }
    out
}

fn hexs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn session(
    cfg: &PairConfig,
    ctl: &Control,
    status: &Mutex<PairStatus>,
    connected: &mut bool,
    sessions: u64,
) -> Result<(), SourceError> {
    let view = ChangeLogView::open(&cfg.change_log)?;
    let stats = view.stats();
    let consumer = Consumer::attach(&cfg.change_log)?;
    let size = consumer.volume_size();
    let uuid = parse_uuid(&stats.volume_uuid);
    let reader = VolumeReader::open(&cfg.source_volume, cfg.use_io_uring)
        .map_err(|e| SourceError::Io("open source volume", e))?;
    let mut t = tls::connect(&cfg.target_addr, &cfg.server_name, &cfg.tls)?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        max_frame: cfg.max_frame,
        volume_name: cfg.volume.clone(),
        volume_uuid: uuid,
        generation: stats.generation,
        size,
        block_size: consumer.block_size(),
        source_host: cfg.source_host.clone(),
    };
    let welcome = handshake::client_hello(&mut t, &hello)?;
    let _ = t.set_write_timeout(Some(cfg.response_timeout));
    if welcome.durable_seq > 0 && welcome.durable_seq >= stats.next_seq {
        return Err(SourceError::Protocol(format!(
            "the target has sequences up to {} but the change log only reached {}: the source state was \
             reset without a generation bump; refusing to ship (changes would be dropped as duplicates)",
            welcome.durable_seq, stats.next_seq
        )));
    }
    *connected = true;
    {
        let mut s = lock(status);
        s.connected = true;
        if sessions > 0 {
            s.reconnects += 1;
        }
        s.last_error = None;
        s.target_durable_seq = welcome.durable_seq;
        s.target_applied_seq = welcome.applied_seq;
    }
    info!(volume = %cfg.volume, durable_seq = welcome.durable_seq, resync = ?welcome.resync,
          io_uring = reader.uses_io_uring(), "connected to target");

    // Decide the phase from the persisted state and the welcome.
    let uuid_hex = hexs(&uuid);
    let mut ps = match PersistedPair::load(&cfg.state_dir, &cfg.volume)
        .map_err(|e| SourceError::Io("pair state", e))?
    {
        Some(p) if p.volume_uuid == uuid_hex && p.generation == stats.generation => p,
        other => {
            if other.is_some() {
                info!(volume = %cfg.volume, "volume identity changed: new pair state");
            }
            PersistedPair {
                version: 1,
                volume_uuid: uuid_hex,
                generation: stats.generation,
                state: PairState::ResyncStep1,
                resync_offset: 0,
                resync_end: size,
                resync_start: 0,
                synced_size: 0,
                paused: false,
            }
        }
    };
    let full = |ps: &mut PersistedPair| {
        ps.state = PairState::ResyncStep1;
        ps.resync_start = 0;
        ps.resync_offset = 0;
        ps.resync_end = size;
    };
    match welcome.resync {
        Some(ResyncReason::SizeChanged) => {
            let in_full = ps.state == PairState::ResyncStep1 && ps.resync_start == 0;
            if !in_full {
                let from = ps.synced_size.min(welcome.replica_size);
                ps.state = PairState::VolumeResized;
                ps.resync_start = from;
                ps.resync_offset = from;
                ps.resync_end = size;
            } else {
                ps.resync_end = size;
            }
        }
        Some(r) => {
            info!(volume = %cfg.volume, reason = ?r, "target asks for a full resync");
            full(&mut ps);
        }
        None => {
            if matches!(
                ps.state,
                PairState::ResyncStep2 | PairState::DifferentialSync
            ) && ps.synced_size < size
            {
                let from = ps.synced_size.min(welcome.replica_size);
                ps.state = PairState::VolumeResized;
                ps.resync_start = from;
                ps.resync_offset = from;
                ps.resync_end = size;
            }
        }
    }
    if ctl.resync.swap(false, Ordering::SeqCst) {
        full(&mut ps);
    }
    ps.paused = ctl.paused.load(Ordering::SeqCst);
    ps.store(&cfg.state_dir, &cfg.volume)
        .map_err(|e| SourceError::Io("pair state", e))?;

    let max_frame = cfg.max_frame.min(welcome.max_frame);
    let max_data = cfg
        .max_chunk_bytes
        .clamp(4096, u64::from(max_frame).saturating_sub(1 << 16).max(4096));
    let conn = FrameConn::new(t, max_frame, Some(cfg.limiter.clone()));
    let mut s = Session {
        cfg,
        ctl,
        status,
        conn,
        consumer,
        view,
        reader,
        ps,
        size,
        max_data,
        skip_seq: welcome.durable_seq,
        inflight: VecDeque::new(),
        batches: VecDeque::new(),
        front_no: 0,
        next_no: 0,
        windows: VecDeque::new(),
        next_window: 0,
        rs_next: 0,
        rs_clock: (Instant::now(), 0),
        rs_sent: 0,
        last_persist: Instant::now(),
        last_send: Instant::now(),
        last_recv: Instant::now(),
        last_status: Instant::now() - Duration::from_secs(1),
        flow_controlled: false,
        ring_empty: false,
        empty_at: None,
        ready_since: None,
        dirty_since: None,
        rate_mark: (Instant::now(), 0, 0),
        wire_base: lock(status).wire_bytes,
    };
    s.rs_next = s.ps.resync_offset;
    s.rs_clock = (Instant::now(), s.ps.resync_offset);
    let r = s.run();
    if r.is_ok() {
        // Stopped: close cleanly (TLS close_notify) so the target logs a
        // normal disconnect. Unacknowledged batches stay uncommitted.
        let _ = s.conn.t.close();
    }
    r
}

/// What the target owes us, in order.
enum Expect {
    Data {
        batch: Option<u64>,
        window: Option<u64>,
        raw: u64,
        tag: bool,
    },
    Heartbeat,
    Hashes {
        offset: u64,
        len: u64,
        window: u64,
    },
}

struct PendingBatch {
    batch: Batch,
    outstanding: usize,
    oldest_ns: u64,
}

struct Window {
    id: u64,
    end: u64,
    outstanding: usize,
    hashed: bool,
}

struct Session<'a> {
    cfg: &'a PairConfig,
    ctl: &'a Control,
    status: &'a Mutex<PairStatus>,
    conn: FrameConn,
    consumer: Consumer,
    view: ChangeLogView,
    reader: VolumeReader,
    ps: PersistedPair,
    size: u64,
    max_data: u64,
    skip_seq: u64,
    inflight: VecDeque<Expect>,
    batches: VecDeque<PendingBatch>,
    front_no: u64,
    next_no: u64,
    windows: VecDeque<Window>,
    next_window: u64,
    rs_next: u64,
    rs_clock: (Instant, u64),
    rs_sent: u64,
    last_persist: Instant,
    last_send: Instant,
    last_recv: Instant,
    last_status: Instant,
    flow_controlled: bool,
    ring_empty: bool,
    empty_at: Option<u64>,
    /// When ring bytes were first seen ready and not yet shipped.
    ready_since: Option<Instant>,
    dirty_since: Option<u64>,
    rate_mark: (Instant, u64, u64),
    wire_base: u64,
}

impl Session<'_> {
    fn run(&mut self) -> Result<(), SourceError> {
        loop {
            if self.ctl.stop.load(Ordering::SeqCst) {
                self.persist()?;
                return Ok(());
            }
            if self.ctl.reconnect.swap(false, Ordering::SeqCst) {
                return Err(SourceError::Protocol("reconnect requested".into()));
            }
            if self.ctl.resync.swap(false, Ordering::SeqCst) {
                self.begin_full_resync()?;
            }
            let paused = self.ctl.paused.load(Ordering::SeqCst);
            if paused != self.ps.paused {
                self.ps.paused = paused;
                self.persist()?;
            }
            let worked = if paused || self.flow_controlled {
                false
            } else {
                match self.ps.state {
                    PairState::ResyncStep1 | PairState::VolumeResized => self.resync_pump()?,
                    _ => self.pump()?,
                }
            };
            // Responses.
            let full = self.inflight.len() >= self.cfg.max_in_flight;
            let wait = if full {
                Duration::from_millis(50)
            } else if worked {
                Duration::from_millis(1)
            } else {
                Duration::from_millis(5)
            };
            if !self.inflight.is_empty() || !worked {
                if let Some(f) = self.conn.poll(wait)? {
                    self.on_response(f)?;
                    while let Some(f) = self.conn.parse()? {
                        self.on_response(f)?;
                    }
                }
            }
            if !self.inflight.is_empty() && self.last_recv.elapsed() > self.cfg.response_timeout {
                return Err(SourceError::Protocol("target stopped answering".into()));
            }
            let hb = if self.flow_controlled || paused {
                Duration::from_millis(50).min(self.cfg.heartbeat)
            } else {
                self.cfg.heartbeat
            };
            if self.last_send.elapsed() >= hb
                && !self.inflight.iter().any(|e| matches!(e, Expect::Heartbeat))
            {
                self.send(
                    &Frame::Heartbeat(Heartbeat { time_ns: now_ns() }),
                    Expect::Heartbeat,
                )?;
            }
            self.transitions()?;
            if self.last_status.elapsed() >= Duration::from_millis(100) {
                self.update_status();
            }
        }
    }

    fn persist(&mut self) -> Result<(), SourceError> {
        self.last_persist = Instant::now();
        self.ps
            .store(&self.cfg.state_dir, &self.cfg.volume)
            .map_err(|e| SourceError::Io("pair state", e))
    }

    fn begin_full_resync(&mut self) -> Result<(), SourceError> {
        info!(volume = %self.cfg.volume, "full resync requested");
        // Let frames already sent settle first by keeping their expectations;
        // new windows start at 0.
        self.ps.state = PairState::ResyncStep1;
        self.ps.resync_start = 0;
        self.ps.resync_offset = 0;
        self.ps.resync_end = self.size;
        self.windows.clear();
        self.rs_next = 0;
        self.rs_clock = (Instant::now(), 0);
        self.rs_sent = 0;
        self.persist()
    }

    fn send(&mut self, f: &Frame, e: Expect) -> Result<(), SourceError> {
        if self.inflight.is_empty() {
            self.last_recv = Instant::now();
        }
        self.conn.send(f)?;
        self.inflight.push_back(e);
        self.last_send = Instant::now();
        Ok(())
    }

    /// Ships one change-log batch if the pipeline has room.
    fn pump(&mut self) -> Result<bool, SourceError> {
        if self.inflight.len() >= self.cfg.max_in_flight {
            return Ok(false);
        }
        // Let a small amount of ring data wait a little for more, so that
        // it travels in fewer, larger chunks (see `coalesce_delay`).
        let ready = self.consumer.ready_ring_bytes();
        if ready > 0 && ready < self.max_data / 2 && !self.cfg.coalesce_delay.is_zero() {
            let since = *self.ready_since.get_or_insert_with(Instant::now);
            if since.elapsed() < self.cfg.coalesce_delay {
                return Ok(false);
            }
        }
        self.ready_since = None;
        let Some(mut batch) = self.consumer.get(self.max_data)? else {
            self.ring_empty = true;
            self.empty_at = Some(now_ns());
            return Ok(false);
        };
        self.ring_empty = false;
        self.empty_at = None;
        let frames = self.build_frames(&mut batch)?;
        let no = self.next_no;
        self.next_no += 1;
        // Ring batches: the oldest record. Bitmap batches: the start of the
        // consumer's last completed sweep (every bit set earlier was taken
        // by it); before the first sweep, when dirty bits were first seen.
        let oldest_ns = batch
            .oldest_change_bound_ns()
            .or(match batch.kind() {
                BatchKind::Bitmap => self.dirty_since,
                BatchKind::Ring => None,
            })
            .unwrap_or_else(now_ns);
        self.batches.push_back(PendingBatch {
            batch,
            outstanding: frames.len(),
            oldest_ns,
        });
        let mut raw_total = 0;
        let mut payload_total = 0;
        for (f, raw, payload) in frames {
            raw_total += raw;
            payload_total += payload;
            let tag = matches!(f, Frame::Tag(_));
            self.send(
                &f,
                Expect::Data {
                    batch: Some(no),
                    window: None,
                    raw,
                    tag,
                },
            )?;
        }
        self.account(raw_total, payload_total);
        self.commit_ready()?;
        Ok(true)
    }

    fn account(&mut self, raw: u64, payload: u64) {
        let mut s = lock(self.status);
        s.shipped_raw_bytes += raw;
        // Keep the payload total in the ratio: ratio = raw / payload.
        let prev_payload = if s.compression_ratio > 0.0 {
            (s.shipped_raw_bytes - raw) as f64 / s.compression_ratio
        } else {
            0.0
        };
        let tot = prev_payload + payload as f64;
        if tot > 0.0 {
            s.compression_ratio = s.shipped_raw_bytes as f64 / tot;
        }
    }

    /// Frames for a batch: `(frame, raw bytes, payload bytes on the wire)`.
    fn build_frames(&mut self, batch: &mut Batch) -> Result<Vec<(Frame, u64, u64)>, SourceError> {
        let mut out = Vec::new();
        let comp = self.cfg.compression;
        match batch.kind() {
            BatchKind::Bitmap => {
                let t = now_ns();
                let mut group: Vec<(u64, u64)> = Vec::new();
                let mut bytes = 0;
                let mut pieces = Vec::new();
                for &(off, len) in batch.ranges() {
                    let mut o = 0;
                    while o < len {
                        let n = (len - o).min(self.max_data);
                        pieces.push((off + o, n));
                        o += n;
                    }
                }
                for (off, n) in pieces {
                    if bytes + n > self.max_data && !group.is_empty() {
                        out.push(self.unordered(&group, t, comp)?);
                        group.clear();
                        bytes = 0;
                    }
                    group.push((off, n));
                    bytes += n;
                }
                if !group.is_empty() {
                    out.push(self.unordered(&group, t, comp)?);
                }
            }
            BatchKind::Ring => {
                // Writes acknowledged in bitmap mode (bits not yet taken by a
                // sweep) have no sequence number and are older than some of
                // this batch's records: no state after these chunks is
                // write-order consistent until a sweep ships them (its own
                // horizon then decides), so each chunk's horizon is set past it.
                let unswept = self.consumer.active_dirty_blocks() > 0;
                let mut cb = ChunkBuilder {
                    unswept,
                    ..ChunkBuilder::default()
                };
                for r in batch.records_mut() {
                    if r.seq <= self.skip_seq {
                        continue;
                    }
                    match r.kind {
                        RecordKind::Tag => {
                            if let Some(f) = cb.take(comp)? {
                                out.push(f);
                            }
                            if let Some(t) = &r.tag {
                                let kind = match t.tag_type {
                                    TagType::App => TagKind::App,
                                    TagType::Fs => TagKind::Fs,
                                    TagType::User => TagKind::User,
                                };
                                out.push((
                                    Frame::Tag(Tag {
                                        seq: r.seq,
                                        name: t.name.clone(),
                                        kind,
                                        uuid: t.uuid,
                                        source_time_ns: r.timestamp_ns,
                                    }),
                                    0,
                                    0,
                                ));
                            }
                        }
                        RecordKind::Zero => {
                            cb.insert(r.seq, r.timestamp_ns, r.offset, r.len, None);
                        }
                        RecordKind::Data | RecordKind::Metadata => {
                            let mut read_back = 0;
                            let data = if r.kind == RecordKind::Data {
                                // Moved, not copied: the batch is only
                                // committed by position later.
                                std::mem::take(&mut r.data)
                            } else {
                                let mut v = Vec::with_capacity(r.len as usize);
                                self.reader
                                    .read_ranges(&[(r.offset, r.len)], &mut v)
                                    .map_err(|e| SourceError::Io("read source volume", e))?;
                                // The data is as of now, not as of r.seq.
                                read_back = self.read_horizon().max(r.seq);
                                cb.horizon = cb.horizon.max(read_back);
                                v
                            };
                            if cb.data_bytes + data.len() as u64 > self.max_data {
                                // Keep every chunk within max_data.
                                if let Some(f) = cb.take(comp)? {
                                    out.push(f);
                                }
                            }
                            if data.len() as u64 > self.max_data {
                                // A record bigger than a chunk: ship its head
                                // as unordered pieces, in stream position, and
                                // its tail as an ordered chunk carrying its
                                // sequence. If the link breaks before the tail
                                // is durable, durable_seq < seq and the whole
                                // record is re-sent; once the tail is durable
                                // the head (spooled before it) is too.
                                if let Some(f) = cb.take(comp)? {
                                    out.push(f);
                                }
                                let m = self.max_data as usize;
                                let cut = (data.len() - 1) / m * m;
                                let t = now_ns();
                                for (i, piece) in data[..cut].chunks(m).enumerate() {
                                    let off = r.offset + (i * m) as u64;
                                    out.push(one_unordered(off, piece, t, read_back, comp)?);
                                }
                                cb.insert(
                                    r.seq,
                                    r.timestamp_ns,
                                    r.offset + cut as u64,
                                    (data.len() - cut) as u64,
                                    Some(data[cut..].to_vec()),
                                );
                            } else {
                                cb.insert(r.seq, r.timestamp_ns, r.offset, r.len, Some(data));
                            }
                        }
                    }
                    if cb.data_bytes >= self.max_data {
                        if let Some(f) = cb.take(comp)? {
                            out.push(f);
                        }
                    }
                }
                if let Some(f) = cb.take(comp)? {
                    out.push(f);
                }
                self.consumer.recycle(std::mem::take(&mut cb.spent));
            }
        }
        Ok(out)
    }

    fn unordered(
        &mut self,
        ranges: &[(u64, u64)],
        t: u64,
        comp: Compression,
    ) -> Result<(Frame, u64, u64), SourceError> {
        let mut data = Vec::new();
        self.reader
            .read_ranges(ranges, &mut data)
            .map_err(|e| SourceError::Io("read source volume", e))?;
        let extents = ranges
            .iter()
            .map(|&(o, l)| Extent {
                offset: o,
                len: l as u32,
                kind: ExtentKind::Data,
            })
            .collect();
        let raw = data.len() as u64;
        let horizon = self.read_horizon();
        let c = Chunk::build_owned(0, 0, t, extents, data, comp)?.with_horizon(horizon)?;
        let p = c.payload.len() as u64;
        Ok((Frame::Chunk(c), raw, p))
    }

    /// Consistency horizon of data read back from the volume just now: the
    /// last sequence number the producer has handed out (see
    /// `Consumer::producer_next_seq`); 0 when it has recorded nothing.
    fn read_horizon(&self) -> u64 {
        self.consumer.producer_next_seq().saturating_sub(1)
    }

    fn commit_ready(&mut self) -> Result<(), SourceError> {
        while self.batches.front().is_some_and(|b| b.outstanding == 0) {
            let b = self.batches.pop_front().expect("checked");
            self.front_no += 1;
            self.consumer.commit(b.batch)?;
            lock(self.status).batches_committed += 1;
        }
        Ok(())
    }

    fn on_response(&mut self, f: Frame) -> Result<(), SourceError> {
        self.last_recv = Instant::now();
        if let Frame::Error(ErrorFrame { code, message }) = f {
            return Err(SourceError::Remote { code, message });
        }
        let Some(exp) = self.inflight.pop_front() else {
            return Err(SourceError::Protocol(format!(
                "unsolicited {:?} frame",
                f.frame_type()
            )));
        };
        match (exp, f) {
            (
                Expect::Data {
                    batch,
                    window,
                    raw,
                    tag,
                },
                Frame::Ack(a),
            ) => {
                self.on_ack(&a);
                {
                    let mut s = lock(self.status);
                    if tag {
                        s.tags_acked += 1;
                    } else if raw > 0 || window.is_none() {
                        s.chunks_acked += 1;
                    }
                }
                if let Some(no) = batch {
                    let i = (no - self.front_no) as usize;
                    if let Some(b) = self.batches.get_mut(i) {
                        b.outstanding = b.outstanding.saturating_sub(1);
                    }
                    self.commit_ready()?;
                }
                if let Some(w) = window {
                    if let Some(win) = self.windows.iter_mut().find(|x| x.id == w) {
                        win.outstanding = win.outstanding.saturating_sub(1);
                    }
                    self.advance_windows()?;
                }
            }
            (Expect::Heartbeat, Frame::Ack(a)) => self.on_ack(&a),
            (
                Expect::Hashes {
                    offset,
                    len,
                    window,
                },
                Frame::ResyncHashes(h),
            ) => {
                let hb = u64::from(self.cfg.hash_block);
                if h.offset != offset
                    || u64::from(h.hash_block) != hb
                    || h.hashes.len() as u64 != len.div_ceil(hb)
                {
                    return Err(SourceError::Protocol(format!(
                        "hashes for {}+{} blocks of {}, asked {offset}+{len}",
                        h.offset,
                        h.hashes.len(),
                        h.hash_block
                    )));
                }
                self.compare_window(window, offset, len, &h.hashes)?;
            }
            (_, f) => {
                return Err(SourceError::Protocol(format!(
                    "unexpected {:?} frame",
                    f.frame_type()
                )))
            }
        }
        Ok(())
    }

    fn on_ack(&mut self, a: &crate::wire::Ack) {
        let over = a.spool_budget > 0 && a.spool_bytes > a.spool_budget;
        let under = a.spool_budget == 0 || a.spool_bytes <= a.spool_budget / 4 * 3;
        if over && !self.flow_controlled {
            self.flow_controlled = true;
            info!(volume = %self.cfg.volume, spool = a.spool_bytes, budget = a.spool_budget,
                  "target spool over budget: flow controlled");
        } else if under && self.flow_controlled {
            self.flow_controlled = false;
            info!(volume = %self.cfg.volume, "target spool drained: resuming");
        }
        let mut s = lock(self.status);
        s.target_durable_seq = a.durable_seq;
        s.target_applied_seq = a.applied_seq;
        s.target_spool_bytes = a.spool_bytes;
        s.target_spool_budget = a.spool_budget;
    }

    /// Step 1: keeps up to two windows of hash requests outstanding.
    fn resync_pump(&mut self) -> Result<bool, SourceError> {
        let mut worked = false;
        while self.windows.len() < 2
            && self.rs_next < self.ps.resync_end
            && self.inflight.len() < self.cfg.max_in_flight
        {
            let hb = u64::from(self.cfg.hash_block);
            let w = hb * u64::from(self.cfg.resync_window_blocks.max(1));
            let len = w.min(self.ps.resync_end - self.rs_next);
            let offset = self.rs_next;
            let id = self.next_window;
            self.next_window += 1;
            self.send(
                &Frame::ResyncRequest(ResyncRequest {
                    offset,
                    len,
                    hash_block: self.cfg.hash_block,
                }),
                Expect::Hashes {
                    offset,
                    len,
                    window: id,
                },
            )?;
            self.windows.push_back(Window {
                id,
                end: offset + len,
                outstanding: 0,
                hashed: false,
            });
            self.rs_next += len;
            worked = true;
        }
        Ok(worked)
    }

    fn compare_window(
        &mut self,
        id: u64,
        offset: u64,
        len: u64,
        theirs: &[[u8; 32]],
    ) -> Result<(), SourceError> {
        let mut data = Vec::with_capacity(len as usize);
        self.reader
            .read_ranges(&[(offset, len)], &mut data)
            .map_err(|e| SourceError::Io("read source volume", e))?;
        let horizon = self.read_horizon();
        let hb = self.cfg.hash_block as usize;
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (i, block) in data.chunks(hb).enumerate() {
            if blake3::hash(block).as_bytes() != &theirs[i] {
                let s = i * hb;
                match runs.last_mut() {
                    Some(r) if r.1 == s && (r.1 - r.0 + block.len()) as u64 <= self.max_data => {
                        r.1 = s + block.len()
                    }
                    _ => runs.push((s, s + block.len())),
                }
            }
        }
        let mut sent = 0;
        for &(a, b) in &runs {
            let mut rd = ResyncData::build(offset + a as u64, &data[a..b], self.cfg.compression)?;
            rd.horizon_seq = horizon;
            let p = rd.payload.len() as u64;
            self.send(
                &Frame::ResyncData(rd),
                Expect::Data {
                    batch: None,
                    window: Some(id),
                    raw: (b - a) as u64,
                    tag: false,
                },
            )?;
            self.account((b - a) as u64, p);
            sent += (b - a) as u64;
        }
        if let Some(w) = self.windows.iter_mut().find(|w| w.id == id) {
            w.outstanding += runs.len();
            w.hashed = true;
        }
        self.rs_sent += sent;
        self.advance_windows()
    }

    fn advance_windows(&mut self) -> Result<(), SourceError> {
        let mut moved = false;
        while self
            .windows
            .front()
            .is_some_and(|w| w.hashed && w.outstanding == 0)
        {
            let w = self.windows.pop_front().expect("checked");
            self.ps.resync_offset = w.end;
            moved = true;
        }
        if moved
            && (self.last_persist.elapsed() >= Duration::from_millis(500)
                || self.ps.resync_offset >= self.ps.resync_end)
        {
            self.persist()?;
        }
        Ok(())
    }

    fn transitions(&mut self) -> Result<(), SourceError> {
        let pass_done = self.windows.is_empty() && self.ps.resync_offset >= self.ps.resync_end;
        let drained = self.ring_empty && self.batches.is_empty() && self.data_in_flight() == 0;
        match self.ps.state {
            PairState::ResyncStep1 | PairState::VolumeResized if pass_done => {
                info!(volume = %self.cfg.volume, "resync pass complete: step 2");
                self.ps.state = PairState::ResyncStep2;
                self.ring_empty = false;
                self.persist()?;
            }
            PairState::ResyncStep2 if drained => {
                info!(volume = %self.cfg.volume, "change log drained: differential sync");
                self.ps.state = PairState::DifferentialSync;
                self.ps.synced_size = self.size;
                self.persist()?;
            }
            _ => {}
        }
        Ok(())
    }

    fn data_in_flight(&self) -> u64 {
        self.inflight
            .iter()
            .filter(|e| matches!(e, Expect::Data { .. } | Expect::Hashes { .. }))
            .count() as u64
    }

    fn update_status(&mut self) {
        self.last_status = Instant::now();
        let st = self.view.stats();
        let now = now_ns();
        let dirty = st.dirty_blocks_active + st.dirty_blocks_pending;
        if dirty > 0 {
            self.dirty_since.get_or_insert(now);
        } else {
            self.dirty_since = None;
        }
        let mut oldest = self.batches.iter().map(|b| b.oldest_ns).min();
        if oldest.is_none() && st.ring_used_bytes > 0 {
            // The first unconsumed record, read afresh every time (one
            // header): a value cached for up to a second (the ring walk it
            // replaced was O(records)) still named records shipped and
            // acknowledged since, and inflated the RPO by up to a second.
            oldest = self.view.first_record().map(|r| r.timestamp_ns);
        }
        // Bits still in `active` were set after the start of the consumer's
        // last completed sweep (taken bits are in `self.batches`); before a
        // sweep completed, fall back to when dirty bits were first seen.
        let active_since = if st.dirty_blocks_active > 0 {
            self.consumer.dirty_since_bound_ns().or(self.dirty_since)
        } else {
            None
        };
        if let Some(d) = active_since {
            oldest = Some(oldest.map_or(d, |o| o.min(d)));
        }
        let in_flight_raw: u64 = self
            .inflight
            .iter()
            .map(|e| match e {
                Expect::Data { raw, .. } => *raw,
                _ => 0,
            })
            .sum();
        let data_in_flight = self.data_in_flight();
        let state = if self.ps.paused {
            PairState::Paused
        } else if self.flow_controlled {
            PairState::FlowControlled
        } else {
            self.ps.state
        };
        let resync = matches!(
            self.ps.state,
            PairState::ResyncStep1 | PairState::VolumeResized
        )
        .then(|| {
            let done = self.ps.resync_offset - self.ps.resync_start;
            let total = self.ps.resync_end - self.ps.resync_start;
            let el = self.rs_clock.0.elapsed().as_secs_f64();
            let progressed = self.ps.resync_offset.saturating_sub(self.rs_clock.1);
            let eta = (progressed > 0 && el > 0.0)
                .then(|| (total - done) as f64 / (progressed as f64 / el));
            (done, total, eta)
        });
        set_state(self.status, state);
        let mut s = lock(self.status);
        s.capture_mode = format!("{:?}", st.mode);
        s.ring_used_bytes = st.ring_used_bytes;
        s.dirty_blocks = dirty;
        s.pending_source_bytes = st.ring_used_bytes + dirty * u64::from(st.block_size);
        s.in_flight_frames = data_in_flight;
        s.in_flight_bytes = in_flight_raw;
        s.rpo_ns = oldest.map_or(0, |o| now.saturating_sub(o));
        s.wire_bytes = self.wire_base + self.conn.wire_out;
        match resync {
            Some((done, total, eta)) => {
                let r = s.resync.get_or_insert_with(ResyncProgress::default);
                r.done_bytes = done;
                r.total_bytes = total;
                r.eta_secs = eta;
                r.sent_bytes = self.rs_sent;
            }
            None => {
                if let Some(r) = s.resync.as_mut() {
                    r.done_bytes = r.total_bytes;
                    r.eta_secs = Some(0.0);
                    r.sent_bytes = self.rs_sent;
                }
            }
        }
        // Drained as of the last `get` that found nothing, once everything
        // handed out before it is committed.
        let drained = matches!(self.ps.state, PairState::DifferentialSync)
            && self.batches.is_empty()
            && data_in_flight == 0
            && st.ring_used_bytes == 0;
        s.drained = drained && self.empty_at.is_some();
        s.drained_as_of_ns = if s.drained {
            self.empty_at.unwrap_or(0)
        } else {
            0
        };
        if s.drained {
            s.rpo_ns = 0;
        }
        let el = self.rate_mark.0.elapsed().as_secs_f64();
        if el >= 1.0 {
            s.raw_rate_bps = (s.shipped_raw_bytes - self.rate_mark.1) as f64 / el;
            s.wire_rate_bps = s.wire_bytes.saturating_sub(self.rate_mark.2) as f64 / el;
            self.rate_mark = (Instant::now(), s.shipped_raw_bytes, s.wire_bytes);
        }
        s.updated_ns = now;
    }
}

fn one_unordered(
    off: u64,
    data: &[u8],
    t: u64,
    horizon: u64,
    comp: Compression,
) -> Result<(Frame, u64, u64), SourceError> {
    let c = Chunk::build(
        0,
        0,
        t,
        vec![Extent {
            offset: off,
            len: data.len() as u32,
            kind: ExtentKind::Data,
        }],
        data,
        comp,
    )?
    .with_horizon(horizon)?;
    let p = c.payload.len() as u64;
    Ok((Frame::Chunk(c), data.len() as u64, p))
}

/// Largest zero extent in one wire extent (aligned, below `u32::MAX`).
const MAX_ZERO_EXTENT: u64 = 1 << 30;

/// Coalesces the writes of a ring batch into non-overlapping extents, a later
/// write winning over the bytes of an earlier one.
#[derive(Default)]
struct ChunkBuilder {
    map: BTreeMap<u64, (u64, Option<Vec<u8>>)>,
    first_seq: u64,
    last_seq: u64,
    /// Capture time of the newest write inserted: the chunk's `source_time_ns`
    /// (a recovery point at time `t` includes a chunk only if all its writes are
    /// at or before `t`). The source's own RPO comes from the batch, not from here.
    newest_ns: u64,
    data_bytes: u64,
    /// Consistency horizon of read-back data in the chunk (0: all captured).
    horizon: u64,
    /// Acknowledged bitmap-mode writes were waiting for a sweep when the batch
    /// was taken: the state after the chunk is not consistent (horizon past it).
    unswept: bool,
    /// Write buffers whose bytes were copied into a chunk (or overwritten),
    /// for the change log consumer to reuse ([`Consumer::recycle`]).
    spent: Vec<Vec<u8>>,
}

impl ChunkBuilder {
    fn insert(&mut self, seq: u64, ts: u64, off: u64, len: u64, data: Option<Vec<u8>>) {
        if len == 0 {
            return;
        }
        if self.first_seq == 0 {
            self.first_seq = seq;
        }
        self.last_seq = seq;
        self.newest_ns = self.newest_ns.max(ts);
        let end = off + len;
        let overlapping: Vec<u64> = self
            .map
            .range(..end)
            .rev()
            .take_while(|(&s, (l, _))| s + l > off)
            .map(|(&s, _)| s)
            .collect();
        for s in overlapping {
            let (l, d) = self.map.remove(&s).expect("present");
            if d.is_some() {
                self.data_bytes -= l;
            }
            if s < off {
                let keep = off - s;
                let head = d.as_ref().map(|d| d[..keep as usize].to_vec());
                if head.is_some() {
                    self.data_bytes += keep;
                }
                self.map.insert(s, (keep, head));
            }
            if s + l > end {
                let keep = s + l - end;
                let tail = d.as_ref().map(|d| d[(end - s) as usize..].to_vec());
                if tail.is_some() {
                    self.data_bytes += keep;
                }
                self.map.insert(end, (keep, tail));
            }
            self.spent.extend(d);
        }
        if data.is_some() {
            self.data_bytes += len;
        }
        self.map.insert(off, (len, data));
    }

    /// The chunk frame of what was inserted (and resets), `None` if empty.
    fn take(&mut self, comp: Compression) -> Result<Option<(Frame, u64, u64)>, SourceError> {
        if self.map.is_empty() {
            *self = ChunkBuilder {
                unswept: self.unswept,
                spent: std::mem::take(&mut self.spent),
                ..ChunkBuilder::default()
            };
            return Ok(None);
        }
        let mut extents: Vec<Extent> = Vec::new();
        let single_data = self.map.len() == 1 && self.map.values().all(|(_, d)| d.is_some());
        let mut data = if single_data {
            Vec::new()
        } else {
            Vec::with_capacity(self.data_bytes as usize)
        };
        for (off, (len, d)) in std::mem::take(&mut self.map) {
            let kind = if d.is_some() {
                ExtentKind::Data
            } else {
                ExtentKind::Zero
            };
            match d {
                // One write alone in the chunk: its buffer is the payload.
                Some(d) if single_data => data = d,
                Some(d) => {
                    data.extend_from_slice(&d);
                    self.spent.push(d);
                }
                None => {}
            }
            let mut o = off;
            let mut left = len;
            while left > 0 {
                let cap = if kind == ExtentKind::Zero {
                    MAX_ZERO_EXTENT
                } else {
                    u64::from(u32::MAX) & !4095
                };
                match extents.last_mut() {
                    Some(e)
                        if e.kind == kind
                            && e.offset + u64::from(e.len) == o
                            && u64::from(e.len) + left <= cap =>
                    {
                        e.len += left as u32;
                        left = 0;
                    }
                    _ => {
                        let n = left.min(cap);
                        extents.push(Extent {
                            offset: o,
                            len: n as u32,
                            kind,
                        });
                        o += n;
                        left -= n;
                    }
                }
            }
        }
        let raw = data.len() as u64;
        let mut horizon = if self.horizon == 0 {
            0
        } else {
            self.horizon.max(self.last_seq)
        };
        if self.unswept {
            horizon = horizon.max(self.last_seq + 1);
        }
        let c = Chunk::build_owned(
            self.first_seq,
            self.last_seq,
            self.newest_ns,
            extents,
            data,
            comp,
        )?
        .with_horizon(horizon)?;
        *self = ChunkBuilder {
            unswept: self.unswept,
            spent: std::mem::take(&mut self.spent),
            ..ChunkBuilder::default()
        };
        let p = c.payload.len() as u64;
        Ok(Some((Frame::Chunk(c), raw, p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Coalescing a sequence of writes gives the same bytes as applying
    /// them one by one (a later write wins), with valid wire extents.
    #[test]
    fn coalescing_matches_sequential_apply() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        for round in 0..300 {
            let size = 64 << 10;
            let base: Vec<u8> = (0..size).map(|_| rng.gen()).collect();
            let mut naive = base.clone();
            let mut cb = ChunkBuilder::default();
            let n_writes = rng.gen_range(1..40u64);
            for seq in 1..=n_writes {
                let off = rng.gen_range(0..size - 1);
                let len = rng.gen_range(1..=(size - off).min(9000));
                if rng.gen_bool(0.2) {
                    naive[off..off + len].fill(0);
                    cb.insert(seq, 100 + seq, off as u64, len as u64, None);
                } else {
                    let d: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    naive[off..off + len].copy_from_slice(&d);
                    cb.insert(seq, 100 + seq, off as u64, len as u64, Some(d));
                }
            }
            let comp = if round % 2 == 0 {
                Compression::None
            } else {
                Compression::Zstd(1)
            };
            let (f, raw, _) = cb.take(comp).unwrap().unwrap();
            let Frame::Chunk(c) = f else { panic!() };
            // Round trip through the codec (validates extents).
            let enc = Frame::Chunk(c).encode(DEFAULT_MAX_FRAME).unwrap();
            let Frame::Chunk(c) = crate::wire::decode(&enc, DEFAULT_MAX_FRAME).unwrap() else {
                panic!()
            };
            assert_eq!(c.first_seq, 1);
            // stamped with the NEWEST write's capture time (writes at 100 + seq)
            assert_eq!(c.source_time_ns, 100 + n_writes);
            assert_eq!(c.data_len(), raw);
            let data = c.data(DEFAULT_MAX_FRAME as u64).unwrap();
            let mut out = base.clone();
            for (e, d) in c.split(&data) {
                let o = e.offset as usize;
                match d {
                    Some(d) => out[o..o + d.len()].copy_from_slice(d),
                    None => out[o..o + e.len as usize].fill(0),
                }
            }
            assert_eq!(out, naive, "round {round}");
        }
    }
}
