//! The replication wire protocol, version 1 (see `docs/wire-protocol.md`).
//!
//! Every frame is a fixed 44-byte header followed by a payload:
//!
//! | offset | size | field                                   |
//! |-------:|-----:|-----------------------------------------|
//! | 0      | 4    | magic `b"RWND"`                         |
//! | 4      | 2    | protocol version, little endian (1)     |
//! | 6      | 1    | frame type ([`FrameType`])              |
//! | 7      | 1    | flags (must be 0 in version 1)          |
//! | 8      | 4    | payload length, little endian           |
//! | 12     | 32   | blake3 of the payload                   |
//!
//! The codec is hand written, explicit little endian. Decoding is total: any
//! byte string yields a [`Frame`] or a [`WireError`], never a panic, and no
//! allocation is ever sized by a peer-supplied length before that length has
//! been checked against the negotiated maximum (or against the bytes actually
//! present).

use std::borrow::Cow;
use std::io::{self, Read, Write};

use thiserror::Error;

/// Frame magic, the first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"RWND";
/// The protocol version this crate speaks. Version 2 added
/// [`Chunk::horizon_seq`]; a version-1 peer is refused at the handshake.
pub const PROTOCOL_VERSION: u16 = 2;
/// Size of the fixed frame header in bytes.
pub const HEADER_LEN: usize = 44;
/// Default maximum payload length of one frame (64 MiB). The maximum
/// decompressed size of a chunk's data is the same bound.
pub const DEFAULT_MAX_FRAME: u32 = 64 << 20;
/// Smallest maximum frame length a peer may announce (1 MiB).
pub const MIN_MAX_FRAME: u32 = 1 << 20;
/// Maximum length of a volume name or host id, in bytes of UTF-8.
pub const MAX_NAME: usize = 255;
/// Maximum length of a tag name, in bytes of UTF-8 (as in the change log).
pub const MAX_TAG_NAME: usize = 1024;
/// Maximum length of an error message, in bytes of UTF-8.
pub const MAX_MESSAGE: usize = 4096;
/// Maximum zstd level accepted on the wire (informational field).
pub const MAX_ZSTD_LEVEL: i32 = 22;

/// Why a byte string is not a valid frame.
#[derive(Debug, Error)]
pub enum WireError {
    /// The first four bytes are not [`MAGIC`].
    #[error("bad frame magic {0:02x?} (not a rewind replication stream?)")]
    BadMagic([u8; 4]),
    /// The header's protocol version is not one this build speaks.
    #[error("unsupported protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion(u16),
    /// The frame type byte is not a known [`FrameType`].
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// Flags that version 1 does not define are set.
    #[error("unknown frame flags {0:#04x}")]
    UnknownFlags(u8),
    /// The payload length exceeds the negotiated maximum.
    #[error("frame payload of {len} bytes exceeds the maximum of {max}")]
    TooLong {
        /// Announced length.
        len: u64,
        /// Maximum in force.
        max: u64,
    },
    /// The payload does not match the checksum in the header.
    #[error("frame checksum mismatch (corrupted in transit?)")]
    Checksum,
    /// The input ended before the frame (or a field of it) was complete.
    #[error("truncated frame: {0}")]
    Truncated(&'static str),
    /// The payload has bytes after its last field.
    #[error("{0} trailing bytes after the frame's fields")]
    TrailingBytes(usize),
    /// A field has a value outside its domain.
    #[error("invalid field {field}: {reason}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Extents overlap, are out of order, empty, or do not add up to the
    /// payload.
    #[error("inconsistent extents: {0}")]
    Extents(String),
    /// Decompressed data would exceed its bound.
    #[error("decompressed data exceeds the bound of {0} bytes")]
    DecompressedTooLarge(u64),
    /// Decompression failed, or produced a size other than the declared one.
    #[error("decompression failed: {0}")]
    Decompress(String),
    /// The underlying transport failed.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl WireError {
    fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        WireError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// True if the error is a transport error rather than a malformed frame.
    pub fn is_io(&self) -> bool {
        matches!(self, WireError::Io(_))
    }
}

/// The type byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameType {
    /// [`Hello`], source → target, first frame of a connection.
    Hello = 1,
    /// [`Welcome`], target → source, answer to `Hello`.
    Welcome = 2,
    /// [`Chunk`], source → target.
    Chunk = 3,
    /// [`Tag`], source → target.
    Tag = 4,
    /// [`ResyncRequest`], target → source.
    ResyncRequest = 5,
    /// [`ResyncHashes`], target → source.
    ResyncHashes = 6,
    /// [`ResyncData`], source → target.
    ResyncData = 7,
    /// [`Ack`], target → source.
    Ack = 8,
    /// [`Heartbeat`], either direction.
    Heartbeat = 9,
    /// [`ErrorFrame`], either direction; the sender closes after it.
    Error = 10,
}

impl FrameType {
    /// The frame type for a type byte, if known.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Hello,
            2 => Self::Welcome,
            3 => Self::Chunk,
            4 => Self::Tag,
            5 => Self::ResyncRequest,
            6 => Self::ResyncHashes,
            7 => Self::ResyncData,
            8 => Self::Ack,
            9 => Self::Heartbeat,
            10 => Self::Error,
            _ => return None,
        })
    }
}

/// Compression of a chunk's or resync block's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Raw bytes.
    #[default]
    None,
    /// One zstd frame at the given level (the level is informational for the
    /// receiver; 1..=22, negative levels are zstd's fast modes).
    Zstd(i32),
}

impl Compression {
    fn encode(self, out: &mut Vec<u8>) {
        match self {
            Compression::None => out.extend_from_slice(&[0, 0]),
            Compression::Zstd(l) => {
                let l = l.clamp(-128, MAX_ZSTD_LEVEL) as i8;
                out.extend_from_slice(&[1, l as u8]);
            }
        }
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let kind = r.u8("compression")?;
        let level = r.u8("compression level")? as i8;
        match kind {
            0 if level == 0 => Ok(Compression::None),
            0 => Err(WireError::invalid(
                "compression level",
                "must be 0 without compression",
            )),
            1 if i32::from(level) <= MAX_ZSTD_LEVEL => Ok(Compression::Zstd(level.into())),
            1 => Err(WireError::invalid(
                "compression level",
                format!("zstd level {level} > {MAX_ZSTD_LEVEL}"),
            )),
            k => Err(WireError::invalid(
                "compression",
                format!("unknown kind {k}"),
            )),
        }
    }
}

/// What an extent of a chunk carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// `len` bytes of the chunk's (decompressed) payload.
    Data = 0,
    /// Zeroes; no payload bytes.
    Zero = 1,
}

/// A byte range of the volume written by a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset on the volume.
    pub offset: u64,
    /// Length in bytes (> 0).
    pub len: u32,
    /// Data or zeroes.
    pub kind: ExtentKind,
}

/// Encoded size of one extent.
pub const EXTENT_LEN: usize = 13;

/// First frame of a connection, source → target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version the source asks for (the target accepts it only if
    /// it speaks exactly that version; a source may retry with an older one).
    pub protocol_version: u16,
    /// Largest frame payload the source accepts.
    pub max_frame: u32,
    /// Volume (pair) name, 1..=255 bytes of UTF-8.
    pub volume_name: String,
    /// Volume UUID from the change log header.
    pub volume_uuid: [u8; 16],
    /// Generation of the volume (bumped on a split: failover, resume).
    pub generation: u64,
    /// Volume size in bytes.
    pub size: u64,
    /// Tracking block size in bytes.
    pub block_size: u32,
    /// Source host identity, 0..=255 bytes of UTF-8.
    pub source_host: String,
}

/// Why the target wants a resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncReason {
    /// The replica is new or was never completely synchronized.
    NewReplica = 1,
    /// The volume size changed.
    SizeChanged = 2,
    /// The target lost or distrusts its state (spool, journal or replica).
    TargetStateLost = 3,
    /// An administrator asked for it.
    Requested = 4,
    /// The target's sequence numbers are ahead of the source (source state
    /// was reset).
    SequenceGap = 5,
}

impl ResyncReason {
    fn from_u8(b: u8) -> Option<Option<Self>> {
        Some(match b {
            0 => None,
            1 => Some(Self::NewReplica),
            2 => Some(Self::SizeChanged),
            3 => Some(Self::TargetStateLost),
            4 => Some(Self::Requested),
            5 => Some(Self::SequenceGap),
            _ => return None,
        })
    }
}

/// Answer to [`Hello`] when the target accepts the pair, target → source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Always true when sent by [`crate::handshake::server_accept`]; refusals
    /// travel as [`ErrorFrame`]s.
    pub accepted: bool,
    /// Protocol version chosen for the connection.
    pub protocol_version: u16,
    /// Largest frame payload the target accepts.
    pub max_frame: u32,
    /// Highest ring sequence durably spooled at the target (0 if none).
    pub durable_seq: u64,
    /// Highest ring sequence applied to the replica (0 if none).
    pub applied_seq: u64,
    /// Replica size in bytes.
    pub replica_size: u64,
    /// Whether a resync is required, and why.
    pub resync: Option<ResyncReason>,
}

/// A unit of replicated changes, source → target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// First ring sequence in the chunk (0 with `last_seq` 0 for unordered
    /// bitmap or resync data).
    pub first_seq: u64,
    /// Last ring sequence in the chunk (inclusive).
    pub last_seq: u64,
    /// Capture time (ns since the Unix epoch) of the newest change.
    pub source_time_ns: u64,
    /// Consistency horizon (0: none). Non-zero when some of the chunk's data
    /// was read back from the source volume (metadata records, bitmap
    /// sweeps) instead of captured with the write: such data may already
    /// show changes with sequence numbers up to `horizon_seq`, so no state of
    /// the replica is write-order consistent until every change up to
    /// `horizon_seq` is applied. For an ordered chunk, `horizon_seq ≥ last_seq`.
    pub horizon_seq: u64,
    /// How `payload` is compressed.
    pub compression: Compression,
    /// Sorted, non-overlapping extents.
    pub extents: Vec<Extent>,
    /// Concatenated data of the `Data` extents, compressed as a whole.
    pub payload: Vec<u8>,
}

/// Tag (bookmark) type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagKind {
    /// Application consistent.
    App = 1,
    /// File-system consistent.
    Fs = 2,
    /// User defined.
    User = 3,
}

/// A bookmark in the change stream, source → target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    /// Ring sequence of the tag record.
    pub seq: u64,
    /// Tag name, 0..=1024 bytes of UTF-8.
    pub name: String,
    /// Tag type.
    pub kind: TagKind,
    /// Tag UUID (shared by the volumes of a group tag).
    pub uuid: [u8; 16],
    /// Source time (ns since the Unix epoch).
    pub source_time_ns: u64,
}

/// Source → target: send blake3 hashes of this range (resync step 1; the
/// target answers with [`ResyncHashes`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncRequest {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Hash granularity in bytes (> 0).
    pub hash_block: u32,
}

/// Hashes of consecutive `hash_block`-sized blocks starting at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncHashes {
    /// Byte offset of the first block.
    pub offset: u64,
    /// Block size in bytes (> 0).
    pub hash_block: u32,
    /// One blake3 per block (the last block may be short at the volume end).
    pub hashes: Vec<[u8; 32]>,
}

/// A range of the source volume sent during resync, source → target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncData {
    /// Byte offset.
    pub offset: u64,
    /// Uncompressed length in bytes.
    pub len: u64,
    /// Consistency horizon of the data (read from the source volume while
    /// writes may continue): see [`Chunk::horizon_seq`]; 0 = none.
    pub horizon_seq: u64,
    /// How `payload` is compressed.
    pub compression: Compression,
    /// The data.
    pub payload: Vec<u8>,
}

/// Target → source progress report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Highest ring sequence durably spooled.
    pub durable_seq: u64,
    /// Highest ring sequence applied to the replica.
    pub applied_seq: u64,
    /// Bytes currently in the spool.
    pub spool_bytes: u64,
    /// Spool budget in bytes (flow control: the source slows down near it).
    pub spool_budget: u64,
}

/// Keep-alive, either direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// Sender's wall clock (ns since the Unix epoch).
    pub time_ns: u64,
}

/// Error codes carried by [`ErrorFrame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The protocol version is not supported.
    UnsupportedVersion,
    /// The volume is known with another generation (split brain guard).
    GenerationMismatch,
    /// The volume name is known with another UUID.
    UuidMismatch,
    /// The tracking block size differs from the replica's.
    BlockSizeMismatch,
    /// The volume size differs and the target cannot follow.
    SizeMismatch,
    /// A frame could not be decoded.
    BadFrame,
    /// A valid frame arrived at the wrong time.
    ProtocolViolation,
    /// The peer is not allowed to replicate this volume.
    Unauthorized,
    /// The target is busy (e.g. another connection holds the volume).
    Busy,
    /// The spool is full.
    SpoolFull,
    /// Anything else.
    Internal,
    /// A code this build does not know (kept verbatim).
    Other(u16),
}

impl ErrorCode {
    /// Wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            Self::UnsupportedVersion => 1,
            Self::GenerationMismatch => 2,
            Self::UuidMismatch => 3,
            Self::BlockSizeMismatch => 4,
            Self::SizeMismatch => 5,
            Self::BadFrame => 6,
            Self::ProtocolViolation => 7,
            Self::Unauthorized => 8,
            Self::Busy => 9,
            Self::SpoolFull => 10,
            Self::Internal => 11,
            Self::Other(c) => c,
        }
    }

    /// From the wire value (unknown values become [`ErrorCode::Other`]).
    pub fn from_u16(c: u16) -> Self {
        match c {
            1 => Self::UnsupportedVersion,
            2 => Self::GenerationMismatch,
            3 => Self::UuidMismatch,
            4 => Self::BlockSizeMismatch,
            5 => Self::SizeMismatch,
            6 => Self::BadFrame,
            7 => Self::ProtocolViolation,
            8 => Self::Unauthorized,
            9 => Self::Busy,
            10 => Self::SpoolFull,
            11 => Self::Internal,
            c => Self::Other(c),
        }
    }
}

/// An error report; the sender closes the connection after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    /// What went wrong.
    pub code: ErrorCode,
    /// Human-readable detail, 0..=4096 bytes of UTF-8.
    pub message: String,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Chunk`].
    Chunk(Chunk),
    /// See [`Tag`].
    Tag(Tag),
    /// See [`ResyncRequest`].
    ResyncRequest(ResyncRequest),
    /// See [`ResyncHashes`].
    ResyncHashes(ResyncHashes),
    /// See [`ResyncData`].
    ResyncData(ResyncData),
    /// See [`Ack`].
    Ack(Ack),
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`ErrorFrame`].
    Error(ErrorFrame),
}

impl Frame {
    /// The frame's type byte.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello(_) => FrameType::Hello,
            Frame::Welcome(_) => FrameType::Welcome,
            Frame::Chunk(_) => FrameType::Chunk,
            Frame::Tag(_) => FrameType::Tag,
            Frame::ResyncRequest(_) => FrameType::ResyncRequest,
            Frame::ResyncHashes(_) => FrameType::ResyncHashes,
            Frame::ResyncData(_) => FrameType::ResyncData,
            Frame::Ack(_) => FrameType::Ack,
            Frame::Heartbeat(_) => FrameType::Heartbeat,
            Frame::Error(_) => FrameType::Error,
        }
    }

    /// Encodes the frame (header + payload). Fails if a field is out of its
    /// domain (e.g. a name too long, inconsistent extents) or the payload
    /// exceeds `max` bytes: what this function writes, [`decode`] accepts.
    pub fn encode(&self, max: u32) -> Result<Vec<u8>, WireError> {
        let (mut out, bulk) = self.encode_split(max)?;
        out.extend_from_slice(bulk);
        Ok(out)
    }

    /// [`Frame::encode`] in two parts that, concatenated, are exactly the
    /// encoded frame: the header and fields, and the bulk payload of a
    /// `Chunk` / `ResyncData` (empty for other frames), borrowed rather than
    /// copied, so a sender can write both with one vectored write.
    pub fn encode_split(&self, max: u32) -> Result<(Vec<u8>, &[u8]), WireError> {
        let bulk: &[u8] = match self {
            Frame::Chunk(c) => &c.payload,
            Frame::ResyncData(d) => &d.payload,
            _ => &[],
        };
        let hint = match self {
            Frame::Chunk(c) => c.extents.len() * EXTENT_LEN + 64,
            Frame::ResyncHashes(h) => h.hashes.len() * 32 + 32,
            _ => 256,
        };
        let mut out = Vec::with_capacity(HEADER_LEN + hint);
        out.resize(HEADER_LEN, 0);
        self.encode_payload(&mut out)?;
        let plen = out.len() - HEADER_LEN + bulk.len();
        if plen as u64 > u64::from(max) {
            return Err(WireError::TooLong {
                len: plen as u64,
                max: max.into(),
            });
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&out[HEADER_LEN..]);
        hasher.update(bulk);
        let hash = hasher.finalize();
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        out[6] = self.frame_type() as u8;
        out[7] = 0;
        out[8..12].copy_from_slice(&(plen as u32).to_le_bytes());
        out[12..44].copy_from_slice(hash.as_bytes());
        Ok((out, bulk))
    }

    fn encode_payload(&self, out: &mut Vec<u8>) -> Result<(), WireError> {
        match self {
            Frame::Hello(h) => {
                put_u16(out, h.protocol_version);
                put_u32(out, h.max_frame);
                out.extend_from_slice(&h.volume_uuid);
                put_u64(out, h.generation);
                put_u64(out, h.size);
                put_u32(out, h.block_size);
                put_str(out, "volume_name", &h.volume_name, 1, MAX_NAME)?;
                put_str(out, "source_host", &h.source_host, 0, MAX_NAME)?;
            }
            Frame::Welcome(w) => {
                out.push(u8::from(w.accepted));
                put_u16(out, w.protocol_version);
                put_u32(out, w.max_frame);
                put_u64(out, w.durable_seq);
                put_u64(out, w.applied_seq);
                put_u64(out, w.replica_size);
                out.push(w.resync.map_or(0, |r| r as u8));
            }
            Frame::Chunk(c) => {
                check_seqs(c.first_seq, c.last_seq)?;
                check_horizon(c.last_seq, c.horizon_seq)?;
                let data = check_extents(&c.extents)?;
                if c.compression == Compression::None && data != c.payload.len() as u64 {
                    return Err(WireError::Extents(format!(
                        "payload of {} bytes, data extents sum to {data}",
                        c.payload.len()
                    )));
                }
                put_u64(out, c.first_seq);
                put_u64(out, c.last_seq);
                put_u64(out, c.source_time_ns);
                put_u64(out, c.horizon_seq);
                c.compression.encode(out);
                let n = u32::try_from(c.extents.len())
                    .map_err(|_| WireError::Extents("too many extents".into()))?;
                put_u32(out, n);
                for e in &c.extents {
                    put_u64(out, e.offset);
                    put_u32(out, e.len);
                    out.push(e.kind as u8);
                }
                // The payload follows (added by `encode_split`'s caller).
            }
            Frame::Tag(t) => {
                put_u64(out, t.seq);
                out.push(t.kind as u8);
                out.extend_from_slice(&t.uuid);
                put_u64(out, t.source_time_ns);
                put_str(out, "tag name", &t.name, 0, MAX_TAG_NAME)?;
            }
            Frame::ResyncRequest(r) => {
                if r.hash_block == 0 {
                    return Err(WireError::invalid("hash_block", "must be > 0"));
                }
                put_u64(out, r.offset);
                put_u64(out, r.len);
                put_u32(out, r.hash_block);
            }
            Frame::ResyncHashes(h) => {
                if h.hash_block == 0 {
                    return Err(WireError::invalid("hash_block", "must be > 0"));
                }
                put_u64(out, h.offset);
                put_u32(out, h.hash_block);
                let n = u32::try_from(h.hashes.len())
                    .map_err(|_| WireError::invalid("hashes", "too many"))?;
                put_u32(out, n);
                for x in &h.hashes {
                    out.extend_from_slice(x);
                }
            }
            Frame::ResyncData(d) => {
                if d.compression == Compression::None && d.len != d.payload.len() as u64 {
                    return Err(WireError::invalid(
                        "len",
                        "differs from the uncompressed payload length",
                    ));
                }
                put_u64(out, d.offset);
                put_u64(out, d.len);
                put_u64(out, d.horizon_seq);
                d.compression.encode(out);
                // The payload follows (added by `encode_split`'s caller).
            }
            Frame::Ack(a) => {
                put_u64(out, a.durable_seq);
                put_u64(out, a.applied_seq);
                put_u64(out, a.spool_bytes);
                put_u64(out, a.spool_budget);
            }
            Frame::Heartbeat(h) => put_u64(out, h.time_ns),
            Frame::Error(e) => {
                put_u16(out, e.code.to_u16());
                // Truncate over-long messages at a char boundary rather than
                // failing: an error report must always be sendable.
                let mut m = e.message.as_str();
                if m.len() > MAX_MESSAGE {
                    let mut cut = MAX_MESSAGE;
                    while !m.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    m = &m[..cut];
                }
                put_str(out, "message", m, 0, MAX_MESSAGE)?;
            }
        }
        Ok(())
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_str(
    out: &mut Vec<u8>,
    field: &'static str,
    s: &str,
    min: usize,
    max: usize,
) -> Result<(), WireError> {
    if s.len() < min || s.len() > max {
        return Err(WireError::invalid(
            field,
            format!("length {} not in {min}..={max}", s.len()),
        ));
    }
    put_u16(out, s.len() as u16);
    out.extend_from_slice(s.as_bytes());
    Ok(())
}

fn check_horizon(last: u64, horizon: u64) -> Result<(), WireError> {
    if horizon != 0 && horizon < last {
        return Err(WireError::invalid(
            "horizon_seq",
            format!("{horizon} below last_seq {last} (0 = none, else ≥ last_seq)"),
        ));
    }
    Ok(())
}

fn check_seqs(first: u64, last: u64) -> Result<(), WireError> {
    if (first == 0) != (last == 0) || first > last {
        return Err(WireError::invalid(
            "first_seq/last_seq",
            format!("{first}..={last}: both 0 (unordered) or 0 < first <= last"),
        ));
    }
    Ok(())
}

/// Checks that extents are non-empty, sorted and non-overlapping; returns the
/// total length of the data extents.
fn check_extents(ext: &[Extent]) -> Result<u64, WireError> {
    let mut end = 0u64;
    let mut data = 0u64;
    for (i, e) in ext.iter().enumerate() {
        if e.len == 0 {
            return Err(WireError::Extents(format!("extent {i} is empty")));
        }
        if i > 0 && e.offset < end {
            return Err(WireError::Extents(format!(
                "extent {i} at {} overlaps or precedes the previous one ending at {end}",
                e.offset
            )));
        }
        end = e
            .offset
            .checked_add(u64::from(e.len))
            .ok_or_else(|| WireError::Extents(format!("extent {i} wraps past 2^64")))?;
        if e.kind == ExtentKind::Data {
            data += u64::from(e.len);
        }
    }
    Ok(data)
}

/// Bounds-checked little-endian reader over a payload.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn arr<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.arr::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.arr(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &'static str, min: usize, max: usize) -> Result<String, WireError> {
        let n = usize::from(self.u16(what)?);
        if n < min || n > max {
            return Err(WireError::invalid(
                what,
                format!("length {n} not in {min}..={max}"),
            ));
        }
        let bytes = self.take(n, what)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| WireError::invalid(what, "not UTF-8"))
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    fn end(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes(self.b.len()))
        }
    }
}

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Frame type.
    pub frame_type: FrameType,
    /// Payload length (already checked against the maximum).
    pub len: u32,
    /// blake3 of the payload.
    pub hash: [u8; 32],
}

/// Parses and validates a 44-byte header against a maximum payload length.
pub fn decode_header(h: &[u8; HEADER_LEN], max: u32) -> Result<Header, WireError> {
    let mut r = Reader { b: h };
    let magic: [u8; 4] = r.arr("magic")?;
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let version = r.u16("version")?;
    if version != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    let t = r.u8("type")?;
    let frame_type = FrameType::from_u8(t).ok_or(WireError::UnknownType(t))?;
    let flags = r.u8("flags")?;
    if flags != 0 {
        return Err(WireError::UnknownFlags(flags));
    }
    let len = r.u32("length")?;
    if len > max {
        return Err(WireError::TooLong {
            len: len.into(),
            max: max.into(),
        });
    }
    let hash = r.arr("checksum")?;
    Ok(Header {
        frame_type,
        len,
        hash,
    })
}

/// Decodes one complete frame from `buf` (which must hold exactly one frame).
pub fn decode(buf: &[u8], max: u32) -> Result<Frame, WireError> {
    if buf.len() < HEADER_LEN {
        return Err(WireError::Truncated("header"));
    }
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(&buf[..HEADER_LEN]);
    let header = decode_header(&h, max)?;
    let payload = &buf[HEADER_LEN..];
    if payload.len() < header.len as usize {
        return Err(WireError::Truncated("payload"));
    }
    if payload.len() > header.len as usize {
        return Err(WireError::TrailingBytes(
            payload.len() - header.len as usize,
        ));
    }
    decode_payload(&header, payload, max)
}

/// Verifies the checksum and decodes a payload whose header was validated by
/// [`decode_header`].
pub fn decode_payload(h: &Header, payload: &[u8], max: u32) -> Result<Frame, WireError> {
    if payload.len() != h.len as usize {
        return Err(WireError::Truncated("payload"));
    }
    if blake3::hash(payload).as_bytes() != &h.hash {
        return Err(WireError::Checksum);
    }
    let mut r = Reader { b: payload };
    let f = match h.frame_type {
        FrameType::Hello => Frame::Hello(Hello {
            protocol_version: r.u16("protocol_version")?,
            max_frame: r.u32("max_frame")?,
            volume_uuid: r.arr("volume_uuid")?,
            generation: r.u64("generation")?,
            size: r.u64("size")?,
            block_size: r.u32("block_size")?,
            volume_name: r.string("volume_name", 1, MAX_NAME)?,
            source_host: r.string("source_host", 0, MAX_NAME)?,
        }),
        FrameType::Welcome => {
            let accepted = match r.u8("accepted")? {
                0 => false,
                1 => true,
                v => {
                    return Err(WireError::invalid(
                        "accepted",
                        format!("{v} is not a boolean"),
                    ))
                }
            };
            let protocol_version = r.u16("protocol_version")?;
            let max_frame = r.u32("max_frame")?;
            let durable_seq = r.u64("durable_seq")?;
            let applied_seq = r.u64("applied_seq")?;
            let replica_size = r.u64("replica_size")?;
            let rr = r.u8("resync")?;
            let resync = ResyncReason::from_u8(rr)
                .ok_or_else(|| WireError::invalid("resync", format!("unknown reason {rr}")))?;
            Frame::Welcome(Welcome {
                accepted,
                protocol_version,
                max_frame,
                durable_seq,
                applied_seq,
                replica_size,
                resync,
            })
        }
        FrameType::Chunk => {
            let first_seq = r.u64("first_seq")?;
            let last_seq = r.u64("last_seq")?;
            check_seqs(first_seq, last_seq)?;
            let source_time_ns = r.u64("source_time_ns")?;
            let horizon_seq = r.u64("horizon_seq")?;
            check_horizon(last_seq, horizon_seq)?;
            let compression = Compression::decode(&mut r)?;
            let n = r.u32("extent count")? as usize;
            // Bound the allocation by the bytes actually present.
            let need = n
                .checked_mul(EXTENT_LEN)
                .ok_or(WireError::Truncated("extents"))?;
            let ext_bytes = r.take(need, "extents")?;
            let mut extents = Vec::with_capacity(n);
            for e in ext_bytes.chunks_exact(EXTENT_LEN) {
                let mut er = Reader { b: e };
                let offset = er.u64("extent offset")?;
                let len = er.u32("extent len")?;
                let kind = match er.u8("extent kind")? {
                    0 => ExtentKind::Data,
                    1 => ExtentKind::Zero,
                    k => return Err(WireError::Extents(format!("unknown extent kind {k}"))),
                };
                extents.push(Extent { offset, len, kind });
            }
            let data = check_extents(&extents)?;
            if data > u64::from(max) {
                return Err(WireError::DecompressedTooLarge(max.into()));
            }
            let payload = r.rest();
            match compression {
                Compression::None if payload.len() as u64 != data => {
                    return Err(WireError::Extents(format!(
                        "payload of {} bytes, data extents sum to {data}",
                        payload.len()
                    )))
                }
                Compression::Zstd(_) => check_zstd_header(payload, data)?,
                Compression::None => {}
            }
            Frame::Chunk(Chunk {
                first_seq,
                last_seq,
                source_time_ns,
                horizon_seq,
                compression,
                extents,
                payload: payload.to_vec(),
            })
        }
        FrameType::Tag => {
            let seq = r.u64("seq")?;
            let kind = match r.u8("tag type")? {
                1 => TagKind::App,
                2 => TagKind::Fs,
                3 => TagKind::User,
                k => return Err(WireError::invalid("tag type", format!("unknown type {k}"))),
            };
            let uuid = r.arr("tag uuid")?;
            let source_time_ns = r.u64("source_time_ns")?;
            let name = r.string("tag name", 0, MAX_TAG_NAME)?;
            Frame::Tag(Tag {
                seq,
                name,
                kind,
                uuid,
                source_time_ns,
            })
        }
        FrameType::ResyncRequest => {
            let offset = r.u64("offset")?;
            let len = r.u64("len")?;
            let hash_block = r.u32("hash_block")?;
            if hash_block == 0 {
                return Err(WireError::invalid("hash_block", "must be > 0"));
            }
            offset
                .checked_add(len)
                .ok_or_else(|| WireError::invalid("len", "offset + len wraps"))?;
            Frame::ResyncRequest(ResyncRequest {
                offset,
                len,
                hash_block,
            })
        }
        FrameType::ResyncHashes => {
            let offset = r.u64("offset")?;
            let hash_block = r.u32("hash_block")?;
            if hash_block == 0 {
                return Err(WireError::invalid("hash_block", "must be > 0"));
            }
            let n = r.u32("hash count")? as usize;
            let need = n.checked_mul(32).ok_or(WireError::Truncated("hashes"))?;
            let bytes = r.take(need, "hashes")?;
            let hashes = bytes
                .chunks_exact(32)
                .map(|c| {
                    let mut a = [0u8; 32];
                    a.copy_from_slice(c);
                    a
                })
                .collect();
            Frame::ResyncHashes(ResyncHashes {
                offset,
                hash_block,
                hashes,
            })
        }
        FrameType::ResyncData => {
            let offset = r.u64("offset")?;
            let len = r.u64("len")?;
            let horizon_seq = r.u64("horizon_seq")?;
            let compression = Compression::decode(&mut r)?;
            offset
                .checked_add(len)
                .ok_or_else(|| WireError::invalid("len", "offset + len wraps"))?;
            if len > u64::from(max) {
                return Err(WireError::DecompressedTooLarge(max.into()));
            }
            let payload = r.rest();
            match compression {
                Compression::None if payload.len() as u64 != len => {
                    return Err(WireError::invalid(
                        "len",
                        "differs from the uncompressed payload length",
                    ))
                }
                Compression::Zstd(_) => check_zstd_header(payload, len)?,
                Compression::None => {}
            }
            Frame::ResyncData(ResyncData {
                offset,
                len,
                horizon_seq,
                compression,
                payload: payload.to_vec(),
            })
        }
        FrameType::Ack => Frame::Ack(Ack {
            durable_seq: r.u64("durable_seq")?,
            applied_seq: r.u64("applied_seq")?,
            spool_bytes: r.u64("spool_bytes")?,
            spool_budget: r.u64("spool_budget")?,
        }),
        FrameType::Heartbeat => Frame::Heartbeat(Heartbeat {
            time_ns: r.u64("time_ns")?,
        }),
        FrameType::Error => {
            let code = ErrorCode::from_u16(r.u16("error code")?);
            let message = r.string("message", 0, MAX_MESSAGE)?;
            Frame::Error(ErrorFrame { code, message })
        }
    };
    r.end()?;
    Ok(f)
}

/// Cheap early check of a zstd payload: if the frame header declares a
/// content size, it must equal the expected size.
fn check_zstd_header(payload: &[u8], expected: u64) -> Result<(), WireError> {
    match zstd::zstd_safe::get_frame_content_size(payload) {
        Ok(Some(n)) if n != expected => Err(WireError::Extents(format!(
            "zstd frame declares {n} bytes, extents/len declare {expected}"
        ))),
        Ok(_) => Ok(()),
        Err(_) => Err(WireError::Decompress("not a zstd frame".into())),
    }
}

/// Reads one frame from a stream: the header, then at most `max` payload
/// bytes (the buffer grows with the bytes actually received, so a peer
/// announcing a large frame and sending nothing costs no memory).
pub fn read_frame(r: &mut impl Read, max: u32) -> Result<Frame, WireError> {
    let mut h = [0u8; HEADER_LEN];
    read_exact_or(r, &mut h, "header")?;
    let header = decode_header(&h, max)?;
    let len = header.len as usize;
    let mut payload = Vec::with_capacity(len.min(1 << 16));
    let got = r.take(len as u64).read_to_end(&mut payload)?;
    if got != len {
        return Err(WireError::Truncated("payload"));
    }
    decode_payload(&header, &payload, max)
}

fn read_exact_or(r: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), WireError> {
    let mut off = 0;
    while off < buf.len() {
        match r.read(&mut buf[off..]) {
            Ok(0) if off == 0 && what == "header" => {
                return Err(WireError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed",
                )))
            }
            Ok(0) => return Err(WireError::Truncated(what)),
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Encodes and writes one frame, then flushes.
pub fn write_frame(w: &mut impl Write, f: &Frame, max: u32) -> Result<(), WireError> {
    let buf = f.encode(max)?;
    w.write_all(&buf)?;
    w.flush()?;
    Ok(())
}

/// Compresses `data` for a chunk or resync payload.
pub fn compress(data: &[u8], c: Compression) -> Result<Vec<u8>, WireError> {
    match c {
        Compression::None => Ok(data.to_vec()),
        Compression::Zstd(level) => ZSTD_CX.with(|cell| {
            // One compression context per thread and level, reused: creating
            // one per chunk costs an allocation and initialisation of
            // several hundred KiB.
            let mut slot = cell.borrow_mut();
            if slot.as_ref().is_none_or(|(l, _)| *l != level) {
                let mut cx = zstd::bulk::Compressor::new(level)
                    .map_err(|e| WireError::Decompress(e.to_string()))?;
                // Declare the content size so the receiver can check it early.
                cx.include_contentsize(true)
                    .map_err(|e| WireError::Decompress(e.to_string()))?;
                *slot = Some((level, cx));
            }
            let (_, cx) = slot.as_mut().expect("just set");
            cx.compress(data)
                .map_err(|e| WireError::Decompress(e.to_string()))
        }),
    }
}

thread_local! {
    static ZSTD_CX: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static ZSTD_DX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses a payload that must yield exactly `expected` bytes, never
/// producing (or allocating) more than `bound` bytes.
pub fn decompress(
    payload: &[u8],
    c: Compression,
    expected: u64,
    bound: u64,
) -> Result<Cow<'_, [u8]>, WireError> {
    if expected > bound {
        return Err(WireError::DecompressedTooLarge(bound));
    }
    match c {
        Compression::None => {
            if payload.len() as u64 != expected {
                return Err(WireError::Decompress(format!(
                    "{} bytes, expected {expected}",
                    payload.len()
                )));
            }
            Ok(Cow::Borrowed(payload))
        }
        Compression::Zstd(_) => {
            let cap =
                usize::try_from(expected).map_err(|_| WireError::DecompressedTooLarge(bound))?;
            // Fast path: the frame declares exactly the expected size, so a
            // one-shot decompression into a buffer of that size (bounded by
            // `bound`) cannot produce more.
            if let Ok(Some(n)) = zstd::zstd_safe::get_frame_content_size(payload) {
                if n == expected {
                    let mut out = Vec::with_capacity(cap);
                    let got = ZSTD_DX.with(|cell| {
                        let mut slot = cell.borrow_mut();
                        if slot.is_none() {
                            *slot = Some(
                                zstd::bulk::Decompressor::new()
                                    .map_err(|e| WireError::Decompress(e.to_string()))?,
                            );
                        }
                        let dx = slot.as_mut().expect("just set");
                        dx.decompress_to_buffer(payload, &mut out)
                            .map_err(|e| WireError::Decompress(e.to_string()))
                    })?;
                    if got != cap {
                        return Err(WireError::Decompress(format!(
                            "{got} bytes, expected {expected}"
                        )));
                    }
                    return Ok(Cow::Owned(out));
                }
            }
            let mut d = zstd::stream::read::Decoder::new(payload)
                .map_err(|e| WireError::Decompress(e.to_string()))?;
            // Refuse frames whose window (the decoder's allocation) is larger
            // than the data they may produce.
            let log = (64 - expected.max(1024).saturating_sub(1).leading_zeros()).clamp(10, 31);
            d.window_log_max(log)
                .map_err(|e| WireError::Decompress(e.to_string()))?;
            // Reading one byte past `expected` detects over-long streams.
            // Grow with the output actually produced rather than trusting
            // the declared size for the allocation.
            let mut out = Vec::with_capacity(cap.min(256 << 10));
            (&mut d)
                .take(expected + 1)
                .read_to_end(&mut out)
                .map_err(|e| WireError::Decompress(e.to_string()))?;
            if out.len() as u64 != expected {
                if out.len() as u64 > expected {
                    return Err(WireError::DecompressedTooLarge(expected));
                }
                return Err(WireError::Decompress(format!(
                    "{} bytes, expected {expected}",
                    out.len()
                )));
            }
            Ok(Cow::Owned(out))
        }
    }
}

impl Chunk {
    /// Builds a chunk from extents and the concatenated data of the data
    /// extents, compressing it as asked.
    pub fn build(
        first_seq: u64,
        last_seq: u64,
        source_time_ns: u64,
        extents: Vec<Extent>,
        data: &[u8],
        compression: Compression,
    ) -> Result<Self, WireError> {
        Self::check_build(first_seq, last_seq, &extents, data.len())?;
        let payload = compress(data, compression)?;
        Ok(Chunk {
            first_seq,
            last_seq,
            source_time_ns,
            horizon_seq: 0,
            compression,
            extents,
            payload,
        })
    }

    fn check_build(
        first_seq: u64,
        last_seq: u64,
        extents: &[Extent],
        data_len: usize,
    ) -> Result<(), WireError> {
        check_seqs(first_seq, last_seq)?;
        let sum = check_extents(extents)?;
        if sum != data_len as u64 {
            return Err(WireError::Extents(format!(
                "{data_len} data bytes, data extents sum to {sum}"
            )));
        }
        Ok(())
    }

    /// [`Chunk::build`] taking the data by value: uncompressed, it becomes
    /// the payload without a copy.
    pub fn build_owned(
        first_seq: u64,
        last_seq: u64,
        source_time_ns: u64,
        extents: Vec<Extent>,
        data: Vec<u8>,
        compression: Compression,
    ) -> Result<Self, WireError> {
        Self::check_build(first_seq, last_seq, &extents, data.len())?;
        let payload = match compression {
            Compression::None => data,
            c => compress(&data, c)?,
        };
        Ok(Chunk {
            first_seq,
            last_seq,
            source_time_ns,
            horizon_seq: 0,
            compression,
            extents,
            payload,
        })
    }

    /// Sets [`Chunk::horizon_seq`] (builder style); see there for the rule.
    pub fn with_horizon(mut self, horizon_seq: u64) -> Result<Self, WireError> {
        check_horizon(self.last_seq, horizon_seq)?;
        self.horizon_seq = horizon_seq;
        Ok(self)
    }

    /// Total length of the data extents (the decompressed payload length).
    pub fn data_len(&self) -> u64 {
        self.extents
            .iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .map(|e| u64::from(e.len))
            .sum()
    }

    /// The decompressed data of the data extents, bounded by `bound` bytes.
    pub fn data(&self, bound: u64) -> Result<Cow<'_, [u8]>, WireError> {
        decompress(&self.payload, self.compression, self.data_len(), bound)
    }

    /// Iterates over `(extent, data)` pairs: `data` is the extent's slice of
    /// `decompressed` for data extents, `None` for zero extents.
    pub fn split<'a>(
        &'a self,
        decompressed: &'a [u8],
    ) -> impl Iterator<Item = (Extent, Option<&'a [u8]>)> + 'a {
        let mut pos = 0usize;
        self.extents.iter().map(move |e| match e.kind {
            ExtentKind::Zero => (*e, None),
            ExtentKind::Data => {
                let start = pos.min(decompressed.len());
                let end = (pos + e.len as usize).min(decompressed.len());
                pos += e.len as usize;
                (*e, Some(&decompressed[start..end]))
            }
        })
    }
}

impl ResyncData {
    /// Builds a resync block from raw data.
    pub fn build(offset: u64, data: &[u8], compression: Compression) -> Result<Self, WireError> {
        Ok(ResyncData {
            offset,
            len: data.len() as u64,
            horizon_seq: 0,
            compression,
            payload: compress(data, compression)?,
        })
    }

    /// The decompressed data, bounded by `bound` bytes.
    pub fn data(&self, bound: u64) -> Result<Cow<'_, [u8]>, WireError> {
        decompress(&self.payload, self.compression, self.len, bound)
    }
}
