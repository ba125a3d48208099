//! Pure NBD protocol encoding and decoding: constants, option and request
//! decoders, reply encoders. No I/O happens here, so every decoder can be fed
//! arbitrary bytes (see the proptest "decoders never panic" tests).
//!
//! Constants follow the upstream specification,
//! <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.
//! All integers on the wire are big-endian.

/// `NBDMAGIC`, first 8 bytes sent by the server.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, newstyle magic (server greeting and every client option).
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (28-byte) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the client may omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: the flags field is valid.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: NBD_CMD_FLUSH supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: NBD_CMD_FLAG_FUA supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: rotational media (never set by us).
pub const TF_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: NBD_CMD_TRIM supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: NBD_CMD_WRITE_ZEROES supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: NBD_CMD_FLAG_DF supported.
pub const TF_SEND_DF: u16 = 1 << 7;
/// Transmission flag: multiple connections see a consistent view and a flush
/// on one connection covers writes completed on all of them.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: NBD_CMD_FLAG_FAST_ZERO supported.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option: enter transmission on the named export (no reply on failure).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: soft disconnect.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: TLS (not supported).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: extended (64-bit) headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success / end of list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a LIST.
pub const REP_SERVER: u32 = 2;
/// Option reply: one NBD_INFO_* item of INFO/GO.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Option error: option not supported.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Option error: syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// Option error: unsupported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
/// Option error: TLS required.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
/// Option error: export unknown.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Option error: server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
/// Option error: request too big.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
/// Option error: extended headers are (already) in use.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

/// Info item: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info item: canonical name.
pub const INFO_NAME: u16 = 1;
/// Info item: description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info item: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write.
pub const CMD_WRITE: u16 = 1;
/// Command: soft disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Command: cache (not advertised).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: WRITE_ZEROES must not punch holes.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: don't fragment the read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: BLOCK_STATUS returns one extent.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: WRITE_ZEROES must fail fast rather than be slow.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag: (extended headers) the length is a payload length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Reply chunk flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: offset + data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: block status (32-bit descriptors).
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: block status (64-bit descriptors, extended headers).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Chunk type: error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// Error: operation not permitted (write to a read-only export).
pub const EPERM: u32 = 1;
/// Error: I/O error.
pub const EIO: u32 = 5;
/// Error: out of memory.
pub const ENOMEM: u32 = 12;
/// Error: invalid argument.
pub const EINVAL: u32 = 22;
/// Error: no space (write past the end of the export).
pub const ENOSPC: u32 = 28;
/// Error: value too large (DF read that cannot be sent in one chunk).
pub const EOVERFLOW: u32 = 75;
/// Error: not supported (FAST_ZERO that would be slow).
pub const ENOTSUP: u32 = 95;
/// Error: server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// base:allocation status: the extent is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// base:allocation status: the extent reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// The only metadata context we serve.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Size of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Maximum option data length we accept; longer options close the connection.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Maximum string length (names, queries) by the specification.
pub const MAX_STRING_LEN: usize = 4096;

/// Why a client message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The magic number was wrong (fatal to the connection).
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    /// The message was shorter than its fixed part.
    #[error("truncated message")]
    Truncated,
    /// The option length exceeds [`MAX_OPTION_LEN`] (fatal).
    #[error("option length {0} too large")]
    TooLong(u64),
    /// Lengths inside the option data do not add up (reply NBD_REP_ERR_INVALID).
    #[error("malformed option data: {0}")]
    Malformed(&'static str),
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}
fn be64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_be_bytes(a))
}

/// The 16-byte header of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (`OPT_*`).
    pub option: u32,
    /// Length of the option data that follows.
    pub len: u32,
}

/// Decodes an option header, checking the magic and the length bound.
pub fn decode_option_header(b: &[u8]) -> Result<OptionHeader, DecodeError> {
    let magic = be64(b, 0).ok_or(DecodeError::Truncated)?;
    if magic != IHAVEOPT {
        return Err(DecodeError::BadMagic(magic));
    }
    let option = be32(b, 8).ok_or(DecodeError::Truncated)?;
    let len = be32(b, 12).ok_or(DecodeError::Truncated)?;
    if len > MAX_OPTION_LEN {
        return Err(DecodeError::TooLong(len.into()));
    }
    Ok(OptionHeader { option, len })
}

/// Data of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// Requested `INFO_*` items.
    pub requests: Vec<u16>,
}

fn take_string(b: &[u8], at: usize, len: usize) -> Result<String, DecodeError> {
    if len > MAX_STRING_LEN {
        return Err(DecodeError::Malformed("string too long"));
    }
    let end = at
        .checked_add(len)
        .ok_or(DecodeError::Malformed("length"))?;
    let s = b
        .get(at..end)
        .ok_or(DecodeError::Malformed("string past end"))?;
    String::from_utf8(s.to_vec()).map_err(|_| DecodeError::Malformed("string not UTF-8"))
}

/// Decodes the data of NBD_OPT_INFO / NBD_OPT_GO.
pub fn decode_info_request(b: &[u8]) -> Result<InfoRequest, DecodeError> {
    let nlen = be32(b, 0).ok_or(DecodeError::Malformed("no name length"))? as usize;
    let name = take_string(b, 4, nlen)?;
    let at = 4 + nlen;
    let n = be16(b, at).ok_or(DecodeError::Malformed("no info count"))? as usize;
    let at = at + 2;
    if b.len() != at + 2 * n {
        return Err(DecodeError::Malformed("info count does not match length"));
    }
    let requests = (0..n).filter_map(|i| be16(b, at + 2 * i)).collect();
    Ok(InfoRequest { name, requests })
}

/// Data of NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export name.
    pub name: String,
    /// Context queries.
    pub queries: Vec<String>,
}

/// Decodes the data of the meta-context options.
pub fn decode_meta_request(b: &[u8]) -> Result<MetaRequest, DecodeError> {
    let nlen = be32(b, 0).ok_or(DecodeError::Malformed("no name length"))? as usize;
    let name = take_string(b, 4, nlen)?;
    let mut at = 4 + nlen;
    let n = be32(b, at).ok_or(DecodeError::Malformed("no query count"))?;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..n {
        let qlen = be32(b, at).ok_or(DecodeError::Malformed("query length past end"))? as usize;
        at += 4;
        queries.push(take_string(b, at, qlen)?);
        at += qlen;
    }
    if at != b.len() {
        return Err(DecodeError::Malformed("trailing bytes"));
    }
    Ok(MetaRequest { name, queries })
}

/// A decoded request header (compact or extended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command (`CMD_*`).
    pub kind: u16,
    /// Client handle (cookie), echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Effect length, or payload length of a WRITE.
    pub len: u64,
}

impl Request {
    /// Number of payload bytes following this header on the wire.
    pub fn payload_len(&self, extended: bool) -> u64 {
        if self.kind == CMD_WRITE || (extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0) {
            self.len
        } else {
            0
        }
    }
}

/// Decodes a request header: 28 bytes compact, 32 bytes with extended headers.
pub fn decode_request(b: &[u8], extended: bool) -> Result<Request, DecodeError> {
    let magic = be32(b, 0).ok_or(DecodeError::Truncated)?;
    let want = if extended {
        EXTENDED_REQUEST_MAGIC
    } else {
        REQUEST_MAGIC
    };
    if magic != want {
        return Err(DecodeError::BadMagic(magic.into()));
    }
    let flags = be16(b, 4).ok_or(DecodeError::Truncated)?;
    let kind = be16(b, 6).ok_or(DecodeError::Truncated)?;
    let handle = be64(b, 8).ok_or(DecodeError::Truncated)?;
    let offset = be64(b, 16).ok_or(DecodeError::Truncated)?;
    let len = if extended {
        be64(b, 24).ok_or(DecodeError::Truncated)?
    } else {
        u64::from(be32(b, 24).ok_or(DecodeError::Truncated)?)
    };
    Ok(Request {
        flags,
        kind,
        handle,
        offset,
        len,
    })
}

/// Encodes a request header (used by tests and test clients).
pub fn encode_request(out: &mut Vec<u8>, r: &Request, extended: bool) {
    if extended {
        out.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
    } else {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    }
    out.extend_from_slice(&r.flags.to_be_bytes());
    out.extend_from_slice(&r.kind.to_be_bytes());
    out.extend_from_slice(&r.handle.to_be_bytes());
    out.extend_from_slice(&r.offset.to_be_bytes());
    if extended {
        out.extend_from_slice(&r.len.to_be_bytes());
    } else {
        out.extend_from_slice(&(r.len as u32).to_be_bytes());
    }
}

/// Server greeting: NBDMAGIC, IHAVEOPT, handshake flags (18 bytes).
pub fn encode_greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Appends an option reply (header + data).
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// NBD_INFO_EXPORT payload.
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&flags.to_be_bytes());
    b
}

/// NBD_INFO_BLOCK_SIZE payload.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&max.to_be_bytes());
    b
}

/// NBD_INFO_NAME / NBD_INFO_DESCRIPTION payload.
pub fn info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// Reply to NBD_OPT_EXPORT_NAME: size, flags and (unless NO_ZEROES) 124 zeroes.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// Maximum size of a reply header produced by [`encode_reply_header`]
/// (extended header plus an 8-byte OFFSET_DATA offset).
pub const MAX_REPLY_HEADER: usize = 40;

/// Reply framing negotiated for a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// Simple replies only.
    Simple,
    /// Structured reply chunks (compact headers).
    Structured,
    /// Extended headers (64-bit lengths) with structured chunks.
    Extended,
}

/// What kind of reply header to encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    /// Success without data (simple reply, or a NONE chunk with DONE).
    Ok,
    /// Error (simple reply with error, or an ERROR chunk with DONE and an
    /// empty message).
    Error(u32),
    /// Success with `len` bytes of read data at `offset` following the header
    /// (simple reply + data, or an OFFSET_DATA chunk with DONE).
    Data {
        /// Offset of the data.
        offset: u64,
        /// Number of data bytes.
        len: u64,
    },
    /// A chunk of `ty` whose payload (`len` bytes) follows (structured only).
    Chunk {
        /// Chunk type.
        ty: u16,
        /// Payload length.
        len: u64,
    },
}

/// Encodes the header of a complete reply into `out`, returning its length.
/// The caller sends `out[..n]` followed by the payload in one write.
pub fn encode_reply_header(
    out: &mut [u8; MAX_REPLY_HEADER],
    mode: ReplyMode,
    handle: u64,
    req_offset: u64,
    kind: ReplyKind,
) -> usize {
    if mode == ReplyMode::Simple {
        out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        let err = match kind {
            ReplyKind::Error(e) => e,
            _ => 0,
        };
        out[4..8].copy_from_slice(&err.to_be_bytes());
        out[8..16].copy_from_slice(&handle.to_be_bytes());
        return 16;
    }
    let (ty, payload_len, data_offset) = match kind {
        ReplyKind::Ok => (REPLY_TYPE_NONE, 0u64, None),
        ReplyKind::Error(_) => (REPLY_TYPE_ERROR, 6, None),
        ReplyKind::Data { offset, len } => (REPLY_TYPE_OFFSET_DATA, len + 8, Some(offset)),
        ReplyKind::Chunk { ty, len } => (ty, len, None),
    };
    let mut n = if mode == ReplyMode::Extended {
        out[0..4].copy_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        out[6..8].copy_from_slice(&ty.to_be_bytes());
        out[8..16].copy_from_slice(&handle.to_be_bytes());
        out[16..24].copy_from_slice(&req_offset.to_be_bytes());
        out[24..32].copy_from_slice(&payload_len.to_be_bytes());
        32
    } else {
        out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        out[6..8].copy_from_slice(&ty.to_be_bytes());
        out[8..16].copy_from_slice(&handle.to_be_bytes());
        out[16..20].copy_from_slice(&(payload_len as u32).to_be_bytes());
        20
    };
    if let ReplyKind::Error(e) = kind {
        out[n..n + 4].copy_from_slice(&e.to_be_bytes());
        out[n + 4..n + 6].copy_from_slice(&0u16.to_be_bytes());
        n += 6;
    }
    if let Some(off) = data_offset {
        out[n..n + 8].copy_from_slice(&off.to_be_bytes());
        n += 8;
    }
    n
}

/// One extent of a block-status answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub len: u64,
    /// `STATE_*` flags.
    pub flags: u32,
}

/// Encodes a BLOCK_STATUS (or BLOCK_STATUS_EXT) chunk payload for one context.
/// Returns the chunk type to use.
pub fn encode_block_status(out: &mut Vec<u8>, extended: bool, ctx: u32, extents: &[Extent]) -> u16 {
    out.extend_from_slice(&ctx.to_be_bytes());
    if extended {
        out.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        for e in extents {
            out.extend_from_slice(&e.len.to_be_bytes());
            out.extend_from_slice(&u64::from(e.flags).to_be_bytes());
        }
        REPLY_TYPE_BLOCK_STATUS_EXT
    } else {
        for e in extents {
            out.extend_from_slice(&(e.len.min(u64::from(u32::MAX)) as u32).to_be_bytes());
            out.extend_from_slice(&e.flags.to_be_bytes());
        }
        REPLY_TYPE_BLOCK_STATUS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_header_roundtrip() {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&10u32.to_be_bytes());
        assert_eq!(
            decode_option_header(&b),
            Ok(OptionHeader {
                option: OPT_GO,
                len: 10
            })
        );
        b[15] = 0;
        b[13] = 0x10; // 1 MiB
        assert!(matches!(
            decode_option_header(&b),
            Err(DecodeError::TooLong(_))
        ));
        b[0] = 0;
        assert!(matches!(
            decode_option_header(&b),
            Err(DecodeError::BadMagic(_))
        ));
        assert_eq!(decode_option_header(&b[..5]), Err(DecodeError::Truncated));
    }

    #[test]
    fn info_request() {
        let mut b = Vec::new();
        b.extend_from_slice(&3u32.to_be_bytes());
        b.extend_from_slice(b"vol");
        b.extend_from_slice(&2u16.to_be_bytes());
        b.extend_from_slice(&INFO_NAME.to_be_bytes());
        b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let r = decode_info_request(&b).unwrap();
        assert_eq!(r.name, "vol");
        assert_eq!(r.requests, vec![INFO_NAME, INFO_BLOCK_SIZE]);
        b.push(0);
        assert!(decode_info_request(&b).is_err());
        assert!(decode_info_request(&b[..6]).is_err());
        let mut huge = Vec::new();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_info_request(&huge).is_err());
    }

    #[test]
    fn meta_request() {
        let mut b = Vec::new();
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&15u32.to_be_bytes());
        b.extend_from_slice(b"base:allocation");
        let r = decode_meta_request(&b).unwrap();
        assert_eq!(r.name, "");
        assert_eq!(r.queries, vec!["base:allocation".to_string()]);
        b[7] = 200; // 200 queries announced, one present
        assert!(decode_meta_request(&b).is_err());
    }

    #[test]
    fn request_roundtrip() {
        for ext in [false, true] {
            let r = Request {
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                handle: 42,
                offset: 4096,
                len: 512,
            };
            let mut b = Vec::new();
            encode_request(&mut b, &r, ext);
            assert_eq!(
                b.len(),
                if ext {
                    EXTENDED_REQUEST_LEN
                } else {
                    REQUEST_LEN
                }
            );
            assert_eq!(decode_request(&b, ext), Ok(r));
            assert_eq!(r.payload_len(ext), 512);
            assert!(decode_request(&b, !ext).is_err());
        }
        let r = Request {
            flags: 0,
            kind: CMD_WRITE_ZEROES,
            handle: 1,
            offset: 0,
            len: 1 << 40,
        };
        let mut b = Vec::new();
        encode_request(&mut b, &r, true);
        assert_eq!(decode_request(&b, true).unwrap().len, 1 << 40);
        assert_eq!(r.payload_len(true), 0);
    }

    #[test]
    fn reply_headers() {
        let mut h = [0u8; MAX_REPLY_HEADER];
        assert_eq!(
            encode_reply_header(&mut h, ReplyMode::Simple, 7, 0, ReplyKind::Error(EINVAL)),
            16
        );
        assert_eq!(&h[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&h[4..8], &EINVAL.to_be_bytes());
        assert_eq!(&h[8..16], &7u64.to_be_bytes());
        let n = encode_reply_header(
            &mut h,
            ReplyMode::Structured,
            7,
            0,
            ReplyKind::Data {
                offset: 512,
                len: 4096,
            },
        );
        assert_eq!(n, 28);
        assert_eq!(&h[6..8], &REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&h[16..20], &(4096u32 + 8).to_be_bytes());
        assert_eq!(&h[20..28], &512u64.to_be_bytes());
        let n = encode_reply_header(&mut h, ReplyMode::Extended, 7, 9, ReplyKind::Error(EPERM));
        assert_eq!(n, 38);
        assert_eq!(&h[0..4], &EXTENDED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&h[24..32], &6u64.to_be_bytes());
        assert_eq!(&h[32..36], &EPERM.to_be_bytes());
        let n = encode_reply_header(&mut h, ReplyMode::Structured, 7, 0, ReplyKind::Ok);
        assert_eq!(n, 20);
        assert_eq!(&h[4..6], &REPLY_FLAG_DONE.to_be_bytes());
    }

    #[test]
    fn block_status_payload() {
        let ex = [
            Extent {
                len: 4096,
                flags: 0,
            },
            Extent {
                len: 8192,
                flags: STATE_HOLE | STATE_ZERO,
            },
        ];
        let mut b = Vec::new();
        assert_eq!(
            encode_block_status(&mut b, false, 1, &ex),
            REPLY_TYPE_BLOCK_STATUS
        );
        assert_eq!(b.len(), 4 + 16);
        b.clear();
        assert_eq!(
            encode_block_status(&mut b, true, 1, &ex),
            REPLY_TYPE_BLOCK_STATUS_EXT
        );
        assert_eq!(b.len(), 8 + 32);
    }
}
