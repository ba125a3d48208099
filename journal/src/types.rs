//! Plain data types of the public API (chunks, outcomes, options, counters, infos).

use crate::fsutil::hex;
use bytes::Bytes;

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
    pub(crate) fn describe(&self) -> String {
        format!(
            "volume {} uuid {} generation {}",
            self.name,
            hex(&self.uuid),
            self.generation
        )
    }
}

/// Payload of one extent of a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentData {
    /// New bytes: a shared, immutable buffer (often a slice of the chunk's
    /// whole payload, so splitting a chunk into extents and handing it on
    /// copies no data). `Vec<u8>` converts with `.into()`, without a copy.
    Data(Bytes),
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
    /// Consistency horizon (0: none): some of the chunk's data was read back from
    /// the source volume and may show changes up to this ring sequence number, so
    /// the state after this chunk, and after every later chunk until one with
    /// `last_seq ≥ horizon_seq` is applied, is not write-order consistent: such
    /// points are refused as `Inconsistent` (never served as exact states).
    pub horizon_seq: u64,
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

impl Applied {
    /// Adds `later` (the next apply call) to `total`, or starts it: the sum
    /// of both calls as if they had been one.
    pub fn accumulate(total: &mut Option<Applied>, later: Applied) {
        match total {
            None => *total = Some(later),
            Some(t) => {
                t.chunks += later.chunks;
                t.last_chunk_id = later.last_chunk_id;
                t.bytes += later.bytes;
                t.applied_seq = later.applied_seq;
                t.last_source_time_ns = later.last_source_time_ns;
            }
        }
    }
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
    /// Free space kept on the journal's (and the replica's) file system beyond
    /// what applying the spool needs. While chunks are pending, `spool`
    /// accepts `incoming` bytes only if the file system of the journal keeps
    /// `incoming` (the spool record) + `pending + incoming` (their apply: an
    /// undo record of the old bytes, or new replica blocks where the replica
    /// is sparse — never both for one byte) + this much free, and the
    /// replica's, if elsewhere, `pending + incoming` + this much; otherwise it
    /// returns [`crate::JournalError::LowSpace`] without storing anything. So
    /// the spool can never take the space its own apply needs (that would
    /// leave a full disk nothing can drain). An empty spool always accepts
    /// (then a truly full disk fails the write with `ENOSPC`).
    pub min_free_bytes: u64,
    /// A spool file is rotated when it would exceed this size.
    pub spool_file_size: u64,
    /// A journal segment is rotated when it would exceed this size.
    pub segment_size: u64,
    /// Compression of undo data (old bytes). Compressed data is kept only
    /// when it saves ≥ 1/8; all-zero pieces are never stored.
    pub undo_compression: UndoCompression,
    /// Apply at most this many chunks per batch (one journal fdatasync + one replica fdatasync per batch).
    pub apply_batch_chunks: usize,
    /// Apply at most about this many volume bytes per batch.
    pub apply_batch_bytes: u64,
    /// Payload bytes of spooled chunks kept in memory so apply does not re-read the spool.
    pub cache_bytes: u64,
    /// When nothing is pending, apply received chunks straight from memory
    /// instead of spooling them (`spool_many` returns after the apply is
    /// durable): 1 replica read + 2 writes per changed byte instead of 3 writes,
    /// at the cost of 3 fdatasyncs per call in the acknowledgement path.
    /// Not while the caller reports a backlog of incoming data
    /// ([`crate::TargetVolume::set_incoming_backlog`]): bursts are spooled.
    pub direct_apply: bool,
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions {
            spool_budget_bytes: 8 << 30,
            min_free_bytes: 16 << 20,
            spool_file_size: 64 << 20,
            segment_size: 256 << 20,
            undo_compression: UndoCompression::Lz4,
            apply_batch_chunks: 1024,
            apply_batch_bytes: 64 << 20,
            cache_bytes: 256 << 20,
            direct_apply: false,
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
    /// Replica bytes of zero extents (trims, write-zeroes) deallocated
    /// instead of written (`fallocate` punch hole).
    pub replica_punched_bytes: u64,
    /// Journal bytes appended since open (the "second write").
    pub journal_write_bytes: u64,
    /// fdatasync/fsync calls.
    pub fsyncs: u64,
    /// Torn tails truncated at open.
    pub torn_tails: u64,
    /// Journaled-but-uncommitted chunks re-applied at open.
    pub recovered_chunks: u64,
    /// How the journal index was loaded at open.
    pub index_load: IndexLoad,
}

/// How an index of the journal was loaded (at [`crate::TargetVolume::open`] or
/// [`crate::SnapshotView::open_dir`]): sealed segments come from their index
/// sidecar when it verifies, everything else is scanned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexLoad {
    /// Sealed segments loaded from their sidecar.
    pub sidecar_segments: u64,
    /// Segments scanned record by record (the newest one, and sealed ones without a usable sidecar).
    pub scanned_segments: u64,
    /// Sidecars that existed but were rejected (corrupt, torn or stale; logged), their segment scanned.
    pub rejected_sidecars: u64,
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

/// How the journal compresses undo data, the old bytes it saves before a
/// chunk overwrites them. Each undo piece (≤ 1 MiB) is compressed on its
/// own, so one piece can be read back without its neighbours; any setting
/// reads journals written with any other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UndoCompression {
    /// Raw old bytes (all-zero pieces are still elided).
    Off,
    /// LZ4 block format: about 3× less CPU than zstd level 1 on 4 KiB pieces,
    /// at a somewhat lower ratio on compressible data. The default.
    Lz4,
    /// zstd at this level (1..=19).
    Zstd(i32),
}

impl std::str::FromStr for UndoCompression {
    type Err = String;
    /// Parses `off` (or `none`), `lz4`, `zstd` (level 1) or `zstd:LEVEL` (1..=19).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("lz4") {
            return Ok(UndoCompression::Lz4);
        }
        match parse_off_or_zstd(s) {
            Some(Ok(None)) => Ok(UndoCompression::Off),
            Some(Ok(Some(level))) => Ok(UndoCompression::Zstd(level)),
            Some(Err(e)) => Err(e),
            None => Err(format!(
                "{s:?}: expected \"off\", \"lz4\", \"zstd\" or \"zstd:LEVEL\" (1..19)"
            )),
        }
    }
}

/// Parses the settings every compression option shares: `off` (or `none`)
/// as `Some(Ok(None))`, `zstd` (level 1) or `zstd:LEVEL` (1..=19) as
/// `Some(Ok(Some(level)))`, a bad level as `Some(Err)`; `None` for anything
/// else (the caller names what it accepts).
pub fn parse_off_or_zstd(s: &str) -> Option<std::result::Result<Option<i32>, String>> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("off") || t.eq_ignore_ascii_case("none") {
        return Some(Ok(None));
    }
    if t.eq_ignore_ascii_case("zstd") {
        return Some(Ok(Some(1)));
    }
    let l = t.strip_prefix("zstd:")?;
    Some(match l.parse::<i32>() {
        Err(_) => Err(format!(
            "{s:?}: the zstd level must be a number (zstd:1 .. zstd:19)"
        )),
        Ok(level) if !(1..=19).contains(&level) => {
            Err(format!("{s:?}: the zstd level must be 1..=19"))
        }
        Ok(level) => Ok(Some(level)),
    })
}

impl std::fmt::Display for UndoCompression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UndoCompression::Off => f.write_str("off"),
            UndoCompression::Lz4 => f.write_str("lz4"),
            UndoCompression::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}
