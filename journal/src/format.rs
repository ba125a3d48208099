//! On-disk encodings (see `docs/journal-format.md`). All integers little endian.

/// Version of the spool file, segment file and identity file layouts.
pub const FORMAT_VERSION: u32 = 1;
/// Segment version of a segment rewritten by sparse-retention compaction: its
/// undo records may be merged (flag [`FLAG_MERGED`], `aux` = first chunk id of
/// the merged span). Version-1 readers refuse it ("unsupported format version 2")
/// instead of offering the points inside merged spans.
pub const SEGMENT_VERSION_MERGED: u32 = 2;
/// Undo record flag: the chunk was applied straight from memory (`direct_apply`),
/// its new data is in no spool file; uncommitted at open means "undo it".
pub const FLAG_DIRECT: u8 = 2;
/// Undo record flag: the record merges the chunks `aux..=id` (oldest data kept per byte).
pub const FLAG_MERGED: u8 = 1;
/// Length of a spool file / segment file header.
pub const FILE_HDR: usize = 96;
/// Length of a record header.
pub const REC_HDR: usize = 64;
/// Length of a record trailer (blake3).
pub const TRAILER: usize = 32;
/// Length of a spool extent table entry.
pub const SPOOL_ENTRY: usize = 24;
/// Length of an undo extent table entry.
pub const UNDO_ENTRY: usize = 64;

/// Spool file magic.
pub const SPOOL_MAGIC: [u8; 8] = *b"RWSPOOL1";
/// Journal segment magic.
pub const SEGMENT_MAGIC: [u8; 8] = *b"RWJSEGM1";
/// Bookmark log magic.
pub const BOOKMARK_MAGIC: [u8; 8] = *b"RWBKMRK1";
/// Identity file magic.
pub const IDENTITY_MAGIC: [u8; 8] = *b"RWTGTID1";

/// Record magic: spooled chunk.
pub const REC_SPOOL: u32 = u32::from_le_bytes(*b"SPCH");
/// Record magic: undo record (one applied chunk).
pub const REC_UNDO: u32 = u32::from_le_bytes(*b"UNDO");
/// Record magic: commit (all chunks up to `id` are applied and durable on the replica).
pub const REC_COMMIT: u32 = u32::from_le_bytes(*b"CMIT");

/// Record magic: bookmark (in `bookmarks.log`).
pub const REC_BOOKMARK: u32 = u32::from_le_bytes(*b"BMRK");

/// Spool record flag: last record of a group commit.
pub const FLAG_GROUP_END: u8 = 1;
/// Spool and undo record flag: the state after this chunk is **not** a
/// write-order-consistent state of the source, because data read back from the
/// source volume (metadata-mode records, bitmap sweeps) applied at or before it
/// may show changes with sequence numbers above the chunk's `last_seq` (the
/// chunk is below the consistency horizon, see `ChunkIn::horizon_seq`).
pub const FLAG_INCONSISTENT: u8 = 4;
/// Spool record flag: the record body starts with `horizon_seq u64` (before the
/// extent table, counted in `body_len`).
pub const FLAG_HORIZON: u8 = 8;

/// Extent kind in a spool record: payload follows.
pub const SPOOL_DATA: u8 = 0;
/// Extent kind in a spool record: zeroes, no payload.
pub const SPOOL_ZERO: u8 = 1;

/// Undo encoding: raw old bytes.
pub const ENC_RAW: u8 = 0;
/// Undo encoding: zstd frame of the old bytes.
pub const ENC_ZSTD: u8 = 1;
/// Undo encoding: the old bytes were all zero, no payload.
pub const ENC_ZERO: u8 = 2;
/// Undo encoding: one LZ4 block (no size prefix; the extent's `len` is the
/// decompressed size).
pub const ENC_LZ4: u8 = 3;

pub fn rd64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

pub fn rd32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}

pub fn rd16(b: &[u8], o: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[o..o + 2]);
    u16::from_le_bytes(a)
}

pub fn hash32(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
}

/// Header of a spool file or a journal segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    pub uuid: [u8; 16],
    pub generation: u64,
    /// Spool: first chunk id of the file. Segment: segment index.
    pub index: u64,
    pub created_ns: u64,
}

pub fn encode_file_header(magic: &[u8; 8], h: &FileHeader) -> [u8; FILE_HDR] {
    encode_file_header_v(magic, h, FORMAT_VERSION)
}

/// [`encode_file_header`] with an explicit version (segments rewritten by
/// compaction carry [`SEGMENT_VERSION_MERGED`]).
pub fn encode_file_header_v(magic: &[u8; 8], h: &FileHeader, version: u32) -> [u8; FILE_HDR] {
    let mut b = [0u8; FILE_HDR];
    b[0..8].copy_from_slice(magic);
    b[8..12].copy_from_slice(&version.to_le_bytes());
    b[12..16].copy_from_slice(&(FILE_HDR as u32).to_le_bytes());
    b[16..32].copy_from_slice(&h.uuid);
    b[32..40].copy_from_slice(&h.generation.to_le_bytes());
    b[40..48].copy_from_slice(&h.index.to_le_bytes());
    b[48..56].copy_from_slice(&h.created_ns.to_le_bytes());
    let hh = hash32(&b[0..64]);
    b[64..96].copy_from_slice(&hh);
    b
}

pub fn decode_file_header(b: &[u8], magic: &[u8; 8]) -> Result<FileHeader, String> {
    if b.len() < FILE_HDR {
        return Err(format!("short header ({} bytes)", b.len()));
    }
    if &b[0..8] != magic {
        return Err("bad magic".into());
    }
    if hash32(&b[0..64]) != b[64..96] {
        return Err("header checksum mismatch".into());
    }
    let v = rd32(b, 8);
    let ok = v == FORMAT_VERSION || (magic == &SEGMENT_MAGIC && v == SEGMENT_VERSION_MERGED);
    if !ok {
        return Err(format!("unsupported format version {v}"));
    }
    if rd32(b, 12) as usize != FILE_HDR {
        return Err("unexpected header length".into());
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&b[16..32]);
    Ok(FileHeader {
        uuid,
        generation: rd64(b, 32),
        index: rd64(b, 40),
        created_ns: rd64(b, 48),
    })
}

/// Record header (64 bytes), common to spool and journal records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecHeader {
    pub magic: u32,
    pub flags: u8,
    /// Bytes between the header and the trailer (extent table + payload).
    pub body_len: u64,
    /// Chunk id (spool, undo) or applied-through chunk id (commit).
    pub id: u64,
    pub first_seq: u64,
    /// Last sequence number (spool, undo) or applied seq (commit).
    pub last_seq: u64,
    pub time_ns: u64,
    pub n_extents: u32,
    /// Spool: group id (first chunk id of the group commit). Undo/commit: 0.
    pub aux: u64,
}

pub fn encode_rec_header(h: &RecHeader, out: &mut Vec<u8>) {
    out.extend_from_slice(&h.magic.to_le_bytes());
    out.push(h.flags);
    out.extend_from_slice(&[0u8; 3]);
    out.extend_from_slice(&h.body_len.to_le_bytes());
    out.extend_from_slice(&h.id.to_le_bytes());
    out.extend_from_slice(&h.first_seq.to_le_bytes());
    out.extend_from_slice(&h.last_seq.to_le_bytes());
    out.extend_from_slice(&h.time_ns.to_le_bytes());
    out.extend_from_slice(&h.n_extents.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&h.aux.to_le_bytes());
}

pub fn decode_rec_header(b: &[u8]) -> RecHeader {
    RecHeader {
        magic: rd32(b, 0),
        flags: b[4],
        body_len: rd64(b, 8),
        id: rd64(b, 16),
        first_seq: rd64(b, 24),
        last_seq: rd64(b, 32),
        time_ns: rd64(b, 40),
        n_extents: rd32(b, 48),
        aux: rd64(b, 56),
    }
}

/// Total record length for a header, with overflow checks.
pub fn record_len(h: &RecHeader) -> Option<u64> {
    (REC_HDR as u64)
        .checked_add(h.body_len)?
        .checked_add(TRAILER as u64)
}

/// Search `b` (bytes after a bad record, `b[0]` is the bad record) for a valid record of `magic`
/// accepted by `accept`.
pub(crate) fn later_valid(b: &[u8], magic: u32, accept: impl Fn(&[u8]) -> bool) -> bool {
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

/// A commit record: every chunk with id ≤ `id` is applied; `applied_seq`, source
/// `time_ns`; `aux` = the consistency horizon reached so far (highest
/// `horizon_seq` of any chunk spooled before the commit; 0 in older journals).
pub fn encode_commit(id: u64, applied_seq: u64, time_ns: u64, horizon: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(REC_HDR + TRAILER);
    encode_rec_header(
        &RecHeader {
            magic: REC_COMMIT,
            id,
            last_seq: applied_seq,
            time_ns,
            aux: horizon,
            ..RecHeader::default()
        },
        &mut b,
    );
    let h = hash32(&b);
    b.extend_from_slice(&h);
    b
}
