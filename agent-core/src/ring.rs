//! Ring record format and a validating reader.
//!
//! A record is a 48-byte header followed by the payload, padded to a multiple
//! of 8 bytes. Records never straddle the end of the ring: when the space left
//! before the end is too small, the producer writes a `Pad` record covering it
//! (or, when fewer than 48 bytes are left, nothing: both sides skip to the
//! start of the ring implicitly).

use serde::Serialize;

use crate::crc::crc32c;
use crate::region::Shared;

/// Size of a record header in the ring.
pub const RECORD_HEADER: u64 = 48;
/// Longest tag name accepted by `insert_tag`, in bytes.
pub const MAX_TAG_NAME: usize = 1024;

pub(crate) const K_DATA: u8 = 1;
pub(crate) const K_METADATA: u8 = 2;
pub(crate) const K_ZERO: u8 = 3;
pub(crate) const K_TAG: u8 = 4;
pub(crate) const K_PAD: u8 = 5;

/// What a ring record describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RecordKind {
    /// A write with its payload: apply the bytes.
    Data,
    /// A write whose payload did not fit in the ring: read `offset..offset+len`
    /// from the source volume after receiving the record, then apply.
    Metadata,
    /// TRIM / WRITE_ZEROES: the range reads as zeroes.
    Zero,
    /// A bookmark in the stream; `offset`/`len` are 0.
    Tag,
}

impl RecordKind {
    pub(crate) fn from_u8(k: u8) -> Option<RecordKind> {
        Some(match k {
            K_DATA => RecordKind::Data,
            K_METADATA => RecordKind::Metadata,
            K_ZERO => RecordKind::Zero,
            K_TAG => RecordKind::Tag,
            _ => return None,
        })
    }
}

/// The kind of a bookmark, as in the seed product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TagType {
    /// Application-consistent (the application was quiesced).
    App,
    /// File-system consistent (the file system was frozen).
    Fs,
    /// User-defined marker (crash-consistent).
    User,
}

impl TagType {
    pub(crate) fn to_u8(self) -> u8 {
        match self {
            TagType::App => 1,
            TagType::Fs => 2,
            TagType::User => 3,
        }
    }
    fn from_u8(v: u8) -> Option<TagType> {
        Some(match v {
            1 => TagType::App,
            2 => TagType::Fs,
            3 => TagType::User,
            _ => return None,
        })
    }
}

/// A bookmark carried by a `Tag` record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tag {
    /// Name given by the caller (UTF-8; invalid bytes are replaced).
    pub name: String,
    /// Tag type.
    pub tag_type: TagType,
    /// Identifier of the tag (shared by all volumes of a group tag).
    pub uuid: [u8; 16],
}

/// One record handed out by [`crate::Consumer::get`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Sequence number, strictly increasing in stream order across the life
    /// of the region (also across producer restarts).
    pub seq: u64,
    /// CLOCK_REALTIME at which the producer recorded the change (after the
    /// backing write completed), in ns since the Unix epoch.
    pub timestamp_ns: u64,
    /// Kind of record.
    pub kind: RecordKind,
    /// Byte offset on the volume (0 for tags).
    pub offset: u64,
    /// Length in bytes on the volume (0 for tags).
    pub len: u64,
    /// The written bytes for `Data` records (`len` bytes), empty otherwise.
    pub data: Vec<u8>,
    /// The bookmark of a `Tag` record.
    pub tag: Option<Tag>,
}

/// Metadata of an unconsumed record, as listed by [`crate::ChangeLogView::records`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RecordInfo {
    /// Ring byte position of the record.
    pub pos: u64,
    /// Sequence number.
    pub seq: u64,
    /// Kind.
    pub kind: RecordKind,
    /// Volume offset.
    pub offset: u64,
    /// Volume length.
    pub len: u64,
    /// Capture time, ns since the Unix epoch.
    pub timestamp_ns: u64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct RecHeader {
    pub kind: u8,
    pub tag_type: u8,
    pub payload_len: u32,
    pub seq: u64,
    pub timestamp_ns: u64,
    pub offset: u64,
    pub len: u64,
    pub total_len: u32,
}

impl RecHeader {
    pub(crate) fn encode(&self) -> [u8; RECORD_HEADER as usize] {
        let mut b = [0u8; RECORD_HEADER as usize];
        b[0] = self.kind;
        b[1] = self.tag_type;
        b[4..8].copy_from_slice(&self.payload_len.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.timestamp_ns.to_le_bytes());
        b[24..32].copy_from_slice(&self.offset.to_le_bytes());
        b[32..40].copy_from_slice(&self.len.to_le_bytes());
        b[40..44].copy_from_slice(&self.total_len.to_le_bytes());
        let crc = crc32c(&b[..44]);
        b[44..48].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8; RECORD_HEADER as usize]) -> Result<RecHeader, &'static str> {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        if u32_at(44) != crc32c(&b[..44]) {
            return Err("header checksum mismatch");
        }
        Ok(RecHeader {
            kind: b[0],
            tag_type: b[1],
            payload_len: u32_at(4),
            seq: u64_at(8),
            timestamp_ns: u64_at(16),
            offset: u64_at(24),
            len: u64_at(32),
            total_len: u32_at(40),
        })
    }
}

/// Rounds up to the record alignment (8).
pub(crate) fn align8(x: u64) -> u64 {
    (x + 7) & !7
}

/// One step of a ring walk.
pub(crate) enum Step {
    /// Skip `n` bytes (implicit skip at the ring end, or a Pad record).
    Skip(u64),
    /// A valid record of `total` bytes.
    Rec(RecHeader),
}

/// Reads and validates the record at monotonic ring position `pos`, which
/// must be `< head`. Every field is checked against the ring and the volume
/// before it is used: the mapped bytes are untrusted.
pub(crate) fn read_step(sh: &Shared, pos: u64, head: u64) -> Result<Step, String> {
    let l = sh.layout();
    let cap = l.ring_capacity;
    let at = pos % cap;
    let to_end = cap - at;
    if pos % 8 != 0 {
        return Err("unaligned position".into());
    }
    if to_end < RECORD_HEADER {
        return Ok(Step::Skip(to_end));
    }
    let mut b = [0u8; RECORD_HEADER as usize];
    sh.ring_read(at, &mut b);
    let h = RecHeader::decode(&b).map_err(String::from)?;
    let total = h.total_len as u64;
    if total < RECORD_HEADER || total % 8 != 0 || total > to_end || pos + total > head {
        return Err(format!(
            "record length {total} out of bounds (to ring end {to_end}, to head {})",
            head - pos
        ));
    }
    if h.kind == K_PAD {
        if total != to_end {
            return Err("pad record does not reach the ring end".into());
        }
        return Ok(Step::Skip(total));
    }
    if RECORD_HEADER + h.payload_len as u64 > total {
        return Err("payload longer than the record".into());
    }
    match h.kind {
        K_DATA | K_METADATA | K_ZERO => {
            if h.offset
                .checked_add(h.len)
                .map_or(true, |e| e > l.volume_size)
                || h.len == 0
            {
                return Err(format!("range {}+{} outside the volume", h.offset, h.len));
            }
            if h.kind == K_DATA && h.payload_len as u64 != h.len {
                return Err("data record payload length differs from its length".into());
            }
            if h.kind != K_DATA && h.payload_len != 0 {
                return Err("payload on a record without data".into());
            }
        }
        K_TAG => {
            if (h.payload_len as usize) < 16
                || h.payload_len as usize > 16 + MAX_TAG_NAME
                || TagType::from_u8(h.tag_type).is_none()
            {
                return Err("malformed tag".into());
            }
        }
        k => return Err(format!("unknown record kind {k}")),
    }
    Ok(Step::Rec(h))
}

/// Builds the public record (copying the payload) for a validated header at `pos`.
/// The record at `pos`; a data record's payload is read into `buf` (a
/// recycled allocation, see [`crate::Consumer::recycle`]).
pub(crate) fn materialise(sh: &Shared, pos: u64, h: &RecHeader, buf: Vec<u8>) -> Record {
    let at = pos % sh.layout().ring_capacity + RECORD_HEADER;
    let mut payload = buf;
    sh.ring_read_into(at, h.payload_len as usize, &mut payload);
    let kind = RecordKind::from_u8(h.kind).unwrap_or(RecordKind::Metadata);
    let mut rec = Record {
        seq: h.seq,
        timestamp_ns: h.timestamp_ns,
        kind,
        offset: h.offset,
        len: h.len,
        data: Vec::new(),
        tag: None,
    };
    match kind {
        RecordKind::Data => rec.data = payload,
        RecordKind::Tag => {
            let mut uuid = [0u8; 16];
            uuid.copy_from_slice(&payload[..16]);
            rec.tag = Some(Tag {
                name: String::from_utf8_lossy(&payload[16..]).into_owned(),
                tag_type: TagType::from_u8(h.tag_type).unwrap_or(TagType::User),
                uuid,
            });
        }
        _ => {}
    }
    rec
}

pub(crate) fn info(pos: u64, h: &RecHeader) -> RecordInfo {
    RecordInfo {
        pos,
        seq: h.seq,
        kind: RecordKind::from_u8(h.kind).unwrap_or(RecordKind::Metadata),
        offset: h.offset,
        len: h.len,
        timestamp_ns: h.timestamp_ns,
    }
}

/// Walks `[from, to)` calling `f(pos, header)` for every valid record.
/// Returns `Ok(end)` or `Err((pos, reason))` at the first invalid record.
pub(crate) fn walk(
    sh: &Shared,
    from: u64,
    to: u64,
    mut f: impl FnMut(u64, &RecHeader) -> bool,
) -> Result<u64, (u64, String)> {
    let mut pos = from;
    while pos < to {
        match read_step(sh, pos, to) {
            Ok(Step::Skip(n)) => pos += n,
            Ok(Step::Rec(h)) => {
                if !f(pos, &h) {
                    return Ok(pos);
                }
                pos += h.total_len as u64;
            }
            Err(e) => return Err((pos, e)),
        }
    }
    Ok(pos)
}
