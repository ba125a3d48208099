//! Pair state shared by the source and target halves of the engine: the
//! state machine labels, the persisted pair state (survives restarts), the
//! live status snapshots, and the framed connection both halves use.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::bandwidth::PairLimiter;
use crate::tls::Transport;
use crate::wire::{self, Frame, WireError, HEADER_LEN};

/// Nanoseconds since the Unix epoch (wall clock).
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// State of a replication pair (design §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum PairState {
    /// Not connected yet / starting.
    #[default]
    Starting,
    /// Full (or partial) pass over the volume comparing blake3 hashes of
    /// blocks; only differing blocks are sent. The change log keeps tracking
    /// writes meanwhile and is not drained.
    ResyncStep1,
    /// Draining what changed during step 1 (the replica is not consistent
    /// until this ends).
    ResyncStep2,
    /// Steady state: draining the change log as it fills.
    DifferentialSync,
    /// Shipping suspended by the administrator (the change log keeps
    /// tracking; nothing is lost).
    Paused,
    /// The source volume grew: the target was grown and only the new extent
    /// is being resynchronised (a step 1 restricted to that extent).
    VolumeResized,
    /// The target's spool is over its budget: shipping is held back until it
    /// drains (the agent falls back to metadata/bitmap mode meanwhile).
    FlowControlled,
    /// Disconnected, waiting to reconnect (backoff).
    Reconnecting,
    /// The pair was stopped.
    Stopped,
}

/// The pair state persisted in `<state_dir>/<volume>.pair.json` (written
/// atomically: temporary file, fsync, rename, fsync of the directory).
///
/// Only the durable parts of the state machine are kept: which phase the
/// pair is in and, during step 1, the offset up to which every block is
/// known to be durable at the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedPair {
    /// Format version (1).
    pub version: u32,
    /// Volume UUID (hex) the state belongs to; another UUID means a new pair.
    pub volume_uuid: String,
    /// Volume generation the state belongs to.
    pub generation: u64,
    /// `ResyncStep1`, `VolumeResized`, `ResyncStep2` or `DifferentialSync`.
    pub state: PairState,
    /// Step 1: every byte below this offset was compared/sent and is durable
    /// at the target (resume point).
    pub resync_offset: u64,
    /// Step 1: end of the range being resynchronised.
    pub resync_end: u64,
    /// Step 1: start of the range being resynchronised (for progress).
    pub resync_start: u64,
    /// Volume size fully known to the target (a bigger source volume means
    /// `VolumeResized` for the new extent).
    pub synced_size: u64,
    /// Paused by the administrator.
    pub paused: bool,
}

impl PersistedPair {
    /// Path of the state file of `volume` in `dir`.
    pub fn path(dir: &Path, volume: &str) -> PathBuf {
        dir.join(format!("{volume}.pair.json"))
    }

    /// Loads the state, `Ok(None)` when there is none.
    pub fn load(dir: &Path, volume: &str) -> io::Result<Option<PersistedPair>> {
        match fs::read(Self::path(dir, volume)) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes the state atomically and durably.
    pub fn store(&self, dir: &Path, volume: &str) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        let path = Self::path(dir, volume);
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &path)?;
        fs::File::open(dir)?.sync_all()?;
        Ok(())
    }
}

/// Progress of a resync pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ResyncProgress {
    /// Bytes of the range compared and durable at the target.
    pub done_bytes: u64,
    /// Bytes of the range to compare.
    pub total_bytes: u64,
    /// Bytes of differing blocks sent.
    pub sent_bytes: u64,
    /// Estimated seconds to the end of the pass (from the rate since it
    /// (re)started), `None` before a rate is known.
    pub eta_secs: Option<f64>,
}

/// Live measures of a source pair (`rewind status`), serde-serialisable.
/// Updated by the pair's thread; read with [`crate::source::Pair::status`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PairStatus {
    /// Volume name.
    pub volume: String,
    /// Current state.
    pub state: PairState,
    /// Whether a connection to the target is established.
    pub connected: bool,
    /// Capture mode of the change log (`Data`, `Metadata`, `Bitmap`).
    pub capture_mode: String,
    /// Recovery point objective in ns: now − source time of the oldest
    /// change not yet durable at the target (0 when drained).
    pub rpo_ns: u64,
    /// Bytes used in the change-log ring (not committed).
    pub ring_used_bytes: u64,
    /// Dirty blocks in the bitmap (active + pending).
    pub dirty_blocks: u64,
    /// Data pending on the source: ring bytes + dirty blocks × block size.
    pub pending_source_bytes: u64,
    /// Frames sent and not yet acknowledged.
    pub in_flight_frames: u64,
    /// Raw (uncompressed) bytes sent and not yet acknowledged.
    pub in_flight_bytes: u64,
    /// Spool bytes at the target (from the last Ack).
    pub target_spool_bytes: u64,
    /// Spool budget of the target (from the last Ack).
    pub target_spool_budget: u64,
    /// Highest sequence durable at the target (last Ack).
    pub target_durable_seq: u64,
    /// Highest sequence applied at the target (last Ack).
    pub target_applied_seq: u64,
    /// Volume bytes shipped (uncompressed payload of chunks and resync data).
    pub shipped_raw_bytes: u64,
    /// Bytes written to the connection (frames, headers included).
    pub wire_bytes: u64,
    /// `shipped_raw_bytes / payload bytes on the wire` (1.0 uncompressed).
    pub compression_ratio: f64,
    /// Chunk frames acknowledged.
    pub chunks_acked: u64,
    /// Tag frames acknowledged.
    pub tags_acked: u64,
    /// Change-log batches committed.
    pub batches_committed: u64,
    /// Raw shipping rate over the last status interval (bytes/s).
    pub raw_rate_bps: f64,
    /// Wire rate over the last status interval (bytes/s).
    pub wire_rate_bps: f64,
    /// Successful connections after the first.
    pub reconnects: u64,
    /// Last error (connection, handshake, I/O), if any.
    pub last_error: Option<String>,
    /// Resync progress (step 1 or resized extent).
    pub resync: Option<ResyncProgress>,
    /// Whether everything captured up to `drained_as_of_ns` is durable at
    /// the target (the change log was found empty then, and everything
    /// handed out before is committed).
    pub drained: bool,
    /// Wall-clock time (ns) as of which `drained` holds (0 if not drained).
    pub drained_as_of_ns: u64,
    /// Wall clock of the snapshot (ns).
    pub updated_ns: u64,
}

/// Live measures of one volume at the target, serde-serialisable.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TargetStatus {
    /// Volume name.
    pub volume: String,
    /// Whether a source is connected.
    pub connected: bool,
    /// Peer address of the current connection.
    pub peer: Option<String>,
    /// Highest ring sequence durable in the spool.
    pub durable_seq: u64,
    /// Highest ring sequence applied to the replica.
    pub applied_seq: u64,
    /// Bytes in the spool, not applied.
    pub spool_bytes: u64,
    /// Spool budget.
    pub spool_budget: u64,
    /// Whether reading is held back because the spool is over budget.
    pub flow_controlled: bool,
    /// Chunk frames spooled.
    pub chunks_spooled: u64,
    /// Resync data frames spooled.
    pub resync_blocks: u64,
    /// Tags recorded.
    pub tags: u64,
    /// Volume bytes applied (total).
    pub applied_bytes: u64,
    /// Apply rate over the last second (bytes/s).
    pub apply_rate_bps: f64,
    /// Source time of the last chunk applied (ns).
    pub last_applied_source_time_ns: u64,
    /// Connections accepted for this volume.
    pub connections: u64,
    /// Last error on this volume (kept as history after it is resolved).
    pub last_error: Option<String>,
    /// When `last_error` happened (ns since the epoch, 0: never).
    #[serde(default)]
    pub last_error_ns: u64,
    /// When a spool or apply last succeeded (ns since the epoch, 0: never):
    /// an error older than this is resolved.
    #[serde(default)]
    pub last_ok_ns: u64,
    /// Set while the volume's storage is out of space (`ENOSPC`/`EDQUOT` on
    /// the spool, journal or replica): the error. Replication is paused
    /// (sources are answered with `SpoolFull` errors and retry; nothing is
    /// acknowledged that is not durable) and the store is reopened
    /// periodically; cleared as soon as a spool or apply succeeds.
    #[serde(default)]
    pub storage_full: Option<String>,
    /// Set while spooling waits because the store's file system is low on
    /// free space (the journal keeps what applying the spool needs): the
    /// store's message. Cleared by the next spool that succeeds.
    #[serde(default)]
    pub low_space: Option<String>,
    /// Times the volume's store was recovered in place (reopened, running
    /// the journal's crash recovery) after failing.
    #[serde(default)]
    pub store_recoveries: u64,
}

/// A framed connection: buffered frame reading that survives read timeouts
/// (partial frames are kept), counted writes through the bandwidth limiter.
pub(crate) struct FrameConn {
    pub(crate) t: Transport,
    inbuf: Vec<u8>,
    /// Received bytes not yet parsed are `inbuf[start..end]`; `inbuf` beyond
    /// `end` is initialised spare room (zero-filled once when it grows, not
    /// before every read).
    start: usize,
    end: usize,
    pub(crate) max_frame: u32,
    timeout: Option<Duration>,
    pub(crate) wire_out: u64,
    limiter: Option<PairLimiter>,
}

impl FrameConn {
    pub(crate) fn new(t: Transport, max_frame: u32, limiter: Option<PairLimiter>) -> Self {
        FrameConn {
            t,
            inbuf: Vec::new(),
            start: 0,
            end: 0,
            max_frame,
            timeout: None,
            wire_out: 0,
            limiter,
        }
    }

    /// Encodes and writes a frame (after the bandwidth limiter allows it).
    /// The bulk payload of a chunk is not copied into the frame buffer: head
    /// and payload go out with vectored writes (TLS records span both).
    pub(crate) fn send(&mut self, f: &Frame) -> Result<usize, WireError> {
        let (head, bulk) = f.encode_split(self.max_frame)?;
        let total = head.len() + bulk.len();
        if let Some(l) = &self.limiter {
            l.acquire(total as u64);
        }
        let mut parts = [std::io::IoSlice::new(&head), std::io::IoSlice::new(bulk)];
        let mut bufs: &mut [std::io::IoSlice<'_>] = &mut parts;
        while !bufs.is_empty() {
            match self.t.write_vectored(bufs) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        "connection closed while writing a frame",
                    )
                    .into())
                }
                Ok(n) => std::io::IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.t.flush()?;
        self.wire_out += total as u64;
        Ok(total)
    }

    /// Whether more input is already here: unparsed bytes in the buffer, or
    /// bytes the connection would return without waiting.
    pub(crate) fn input_waiting(&mut self) -> bool {
        self.start < self.end || self.t.input_waiting()
    }

    /// A complete frame from the buffer, without reading the socket.
    pub(crate) fn parse(&mut self) -> Result<Option<Frame>, WireError> {
        let avail = &self.inbuf[self.start..self.end];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&avail[..HEADER_LEN]);
        let header = wire::decode_header(&h, self.max_frame)?;
        let total = HEADER_LEN + header.len as usize;
        if avail.len() < total {
            return Ok(None);
        }
        let f = wire::decode_payload(&header, &avail[HEADER_LEN..total], self.max_frame);
        self.start += total;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        f.map(Some)
    }

    /// Waits up to `timeout` for a complete frame (`Ok(None)` on timeout).
    pub(crate) fn poll(&mut self, timeout: Duration) -> Result<Option<Frame>, WireError> {
        if let Some(f) = self.parse()? {
            return Ok(Some(f));
        }
        let timeout = timeout.max(Duration::from_millis(1));
        if self.timeout != Some(timeout) {
            self.t.set_read_timeout(Some(timeout))?;
            self.timeout = Some(timeout);
        }
        if self.start > 0 && self.start * 2 > self.end {
            self.inbuf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        const READ_ROOM: usize = 256 << 10;
        if self.inbuf.len() < self.end + READ_ROOM {
            self.inbuf.resize(self.end + READ_ROOM, 0);
        }
        let r = self.t.read(&mut self.inbuf[self.end..]);
        match r {
            Ok(0) => Err(WireError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by the peer",
            ))),
            Ok(n) => {
                self.end += n;
                self.parse()
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}
