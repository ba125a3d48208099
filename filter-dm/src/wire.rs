//! Encoding and decoding of the device-mapper ioctl buffers (`<linux/dm-ioctl.h>`,
//! interface version 4): a fixed 312-byte `struct dm_ioctl` header followed by a payload
//! area at `data_start`. Pure code: no system calls here (see `sys` for those).

use crate::{DevNum, Target};

/// `sizeof(struct dm_ioctl)`.
pub(crate) const DM_IOCTL_SIZE: usize = 312;
/// `DM_NAME_LEN`: device names are at most 127 bytes plus the NUL.
pub(crate) const NAME_LEN: usize = 128;
/// `DM_UUID_LEN`: uuids are at most 128 bytes plus the NUL.
pub(crate) const UUID_LEN: usize = 129;
/// `DM_MAX_TYPE_NAME`: target type names are at most 15 bytes plus the NUL.
pub(crate) const TYPE_NAME_LEN: usize = 16;
/// `sizeof(struct dm_target_spec)`.
pub(crate) const TARGET_SPEC_SIZE: usize = 40;
/// `sizeof(struct dm_target_msg)` without the message.
pub(crate) const TARGET_MSG_SIZE: usize = 8;

/// `_IOWR(0xfd, 0, struct dm_ioctl)`: the command number goes in the low byte.
pub(crate) const DM_IOCTL_BASE: u32 = (3 << 30) | ((DM_IOCTL_SIZE as u32) << 16) | (0xfd << 8);

// Header field offsets.
const OFF_VERSION: usize = 0;
const OFF_DATA_SIZE: usize = 12;
const OFF_DATA_START: usize = 16;
const OFF_TARGET_COUNT: usize = 20;
const OFF_OPEN_COUNT: usize = 24;
const OFF_FLAGS: usize = 28;
const OFF_EVENT_NR: usize = 32;
const OFF_DEV: usize = 40;
const OFF_NAME: usize = 48;
const OFF_UUID: usize = OFF_NAME + NAME_LEN;

/// `dm_ioctl.flags` bits.
pub(crate) mod flags {
    pub const READONLY: u32 = 1 << 0;
    pub const SUSPEND: u32 = 1 << 1;
    pub const STATUS_TABLE: u32 = 1 << 4;
    pub const ACTIVE_PRESENT: u32 = 1 << 5;
    pub const INACTIVE_PRESENT: u32 = 1 << 6;
    pub const BUFFER_FULL: u32 = 1 << 8;
    pub const DATA_OUT: u32 = 1 << 16;
}

/// The DM ioctl commands used here (`enum { DM_VERSION_CMD = 0, ... }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cmd {
    Version = 0,
    ListDevices = 2,
    DevCreate = 3,
    DevRemove = 4,
    DevSuspend = 6,
    DevStatus = 7,
    TableLoad = 9,
    TableClear = 10,
    TableStatus = 12,
    TargetMsg = 14,
}

impl Cmd {
    pub(crate) fn request(self) -> u32 {
        DM_IOCTL_BASE | self as u32
    }

    /// The ioctl's name as in the kernel header, for error messages.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Cmd::Version => "DM_VERSION",
            Cmd::ListDevices => "DM_LIST_DEVICES",
            Cmd::DevCreate => "DM_DEV_CREATE",
            Cmd::DevRemove => "DM_DEV_REMOVE",
            Cmd::DevSuspend => "DM_DEV_SUSPEND",
            Cmd::DevStatus => "DM_DEV_STATUS",
            Cmd::TableLoad => "DM_TABLE_LOAD",
            Cmd::TableClear => "DM_TABLE_CLEAR",
            Cmd::TableStatus => "DM_TABLE_STATUS",
            Cmd::TargetMsg => "DM_TARGET_MSG",
        }
    }

    #[cfg(test)]
    pub(crate) fn from_request(req: u32) -> Option<Cmd> {
        if req & 0xffff_ff00 != DM_IOCTL_BASE {
            return None;
        }
        [
            Cmd::Version,
            Cmd::ListDevices,
            Cmd::DevCreate,
            Cmd::DevRemove,
            Cmd::DevSuspend,
            Cmd::DevStatus,
            Cmd::TableLoad,
            Cmd::TableClear,
            Cmd::TableStatus,
            Cmd::TargetMsg,
        ]
        .into_iter()
        .find(|c| *c as u32 == req & 0xff)
    }
}

/// The fields of `struct dm_ioctl` (the `padding` and trailing `data[7]` are not kept).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Header {
    pub version: [u32; 3],
    pub data_size: u32,
    pub data_start: u32,
    pub target_count: u32,
    pub open_count: i32,
    pub flags: u32,
    pub event_nr: u32,
    pub dev: u64,
    pub name: String,
    pub uuid: String,
}

/// Why a name, uuid, target type or parameter string cannot be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadString {
    Empty,
    TooLong(usize),
    Nul,
    Slash,
    Dots,
}

impl BadString {
    pub(crate) fn reason(self) -> String {
        match self {
            BadString::Empty => "is empty".into(),
            BadString::TooLong(max) => format!("is longer than {max} bytes"),
            BadString::Nul => "contains a NUL byte".into(),
            BadString::Slash => "contains '/'".into(),
            BadString::Dots => "is \".\" or \"..\"".into(),
        }
    }
}

/// Checks a device name the way the kernel does (`dm_hash_insert`/`check_name`).
pub(crate) fn check_name(name: &str) -> Result<(), BadString> {
    check_cstr(name, NAME_LEN)?;
    if name.is_empty() {
        return Err(BadString::Empty);
    }
    if name.contains('/') {
        return Err(BadString::Slash);
    }
    if name == "." || name == ".." {
        return Err(BadString::Dots);
    }
    Ok(())
}

/// Checks a string that goes into a fixed `char[field]` with its NUL terminator.
pub(crate) fn check_cstr(s: &str, field: usize) -> Result<(), BadString> {
    if s.as_bytes().contains(&0) {
        return Err(BadString::Nul);
    }
    if s.len() >= field {
        return Err(BadString::TooLong(field - 1));
    }
    Ok(())
}

pub(crate) fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}
pub(crate) fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}
pub(crate) fn get_u32(buf: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(buf[off..off + 4].try_into().expect("4 bytes"))
}
pub(crate) fn get_u64(buf: &[u8], off: usize) -> u64 {
    u64::from_ne_bytes(buf[off..off + 8].try_into().expect("8 bytes"))
}
/// Copies `s` into `buf[off..off + field]` (the caller checked that it fits with its NUL).
pub(crate) fn put_cstr(buf: &mut [u8], off: usize, field: usize, s: &str) {
    debug_assert!(s.len() < field);
    buf[off..off + field].fill(0);
    buf[off..off + s.len()].copy_from_slice(s.as_bytes());
}
/// Reads a NUL-terminated string from `buf[off..off + max]` (up to the end if no NUL).
pub(crate) fn get_cstr(buf: &[u8], off: usize, max: usize) -> String {
    let end = (off + max).min(buf.len());
    let field = &buf[off.min(end)..end];
    let len = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..len]).into_owned()
}

pub(crate) fn data_size_field(buf: &[u8]) -> u32 {
    get_u32(buf, OFF_DATA_SIZE)
}

pub(crate) fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// Builds the ioctl buffer: header + `payload` at offset 312, the whole buffer `size` bytes
/// (at least header + payload; the rest is room for the kernel's reply). `data_size` and
/// `data_start` are filled in; `name` and `uuid` must have passed [`check_cstr`].
pub(crate) fn encode(hdr: &Header, payload: &[u8], size: usize) -> Vec<u8> {
    let size = size.max(DM_IOCTL_SIZE + payload.len());
    let mut buf = vec![0u8; size];
    let hdr = Header {
        data_size: size as u32,
        data_start: DM_IOCTL_SIZE as u32,
        ..hdr.clone()
    };
    write_header(&mut buf, &hdr);
    buf[DM_IOCTL_SIZE..DM_IOCTL_SIZE + payload.len()].copy_from_slice(payload);
    buf
}

/// Writes every header field as given (including `data_size` and `data_start`).
pub(crate) fn write_header(buf: &mut [u8], hdr: &Header) {
    for (i, v) in hdr.version.iter().enumerate() {
        put_u32(buf, OFF_VERSION + 4 * i, *v);
    }
    put_u32(buf, OFF_DATA_SIZE, hdr.data_size);
    put_u32(buf, OFF_DATA_START, hdr.data_start);
    put_u32(buf, OFF_TARGET_COUNT, hdr.target_count);
    put_u32(buf, OFF_OPEN_COUNT, hdr.open_count as u32);
    put_u32(buf, OFF_FLAGS, hdr.flags);
    put_u32(buf, OFF_EVENT_NR, hdr.event_nr);
    put_u32(buf, OFF_EVENT_NR + 4, 0); // padding
    put_u64(buf, OFF_DEV, hdr.dev);
    put_cstr(buf, OFF_NAME, NAME_LEN, &hdr.name);
    put_cstr(buf, OFF_UUID, UUID_LEN, &hdr.uuid);
}

/// Reads the header back (the caller made sure the buffer holds at least 312 bytes).
pub(crate) fn decode_header(buf: &[u8]) -> Header {
    Header {
        version: [get_u32(buf, 0), get_u32(buf, 4), get_u32(buf, 8)],
        data_size: get_u32(buf, OFF_DATA_SIZE),
        data_start: get_u32(buf, OFF_DATA_START),
        target_count: get_u32(buf, OFF_TARGET_COUNT),
        open_count: get_u32(buf, OFF_OPEN_COUNT) as i32,
        flags: get_u32(buf, OFF_FLAGS),
        event_nr: get_u32(buf, OFF_EVENT_NR),
        dev: get_u64(buf, OFF_DEV),
        name: get_cstr(buf, OFF_NAME, NAME_LEN),
        uuid: get_cstr(buf, OFF_UUID, UUID_LEN),
    }
}

/// What is wrong with a table before it reaches the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BadTable {
    Empty,
    TargetType(usize, BadString),
    Params(usize, BadString),
}

/// Encodes a table for `DM_TABLE_LOAD`: for each target a `struct dm_target_spec`
/// (sector_start, length, status, next, target_type[16]) followed by its NUL-terminated
/// parameter string, padded to 8 bytes; `next` is the distance from this spec to the next.
pub(crate) fn encode_table(targets: &[Target]) -> Result<Vec<u8>, BadTable> {
    if targets.is_empty() {
        return Err(BadTable::Empty);
    }
    let mut out = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        check_cstr(&t.target_type, TYPE_NAME_LEN).map_err(|e| BadTable::TargetType(i, e))?;
        if t.target_type.is_empty() {
            return Err(BadTable::TargetType(i, BadString::Empty));
        }
        check_cstr(&t.params, usize::MAX).map_err(|e| BadTable::Params(i, e))?;
        let start = out.len();
        let rec = align8(TARGET_SPEC_SIZE + t.params.len() + 1);
        out.resize(start + rec, 0);
        put_u64(&mut out, start, t.start);
        put_u64(&mut out, start + 8, t.len);
        put_u32(&mut out, start + 16, 0);
        put_u32(&mut out, start + 20, rec as u32);
        put_cstr(&mut out, start + 24, TYPE_NAME_LEN, &t.target_type);
        let p = start + TARGET_SPEC_SIZE;
        out[p..p + t.params.len()].copy_from_slice(t.params.as_bytes());
    }
    Ok(out)
}

/// A reply that does not parse as the kernel's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Malformed(pub String);

/// The reply's result area `buf[data_start..data_size]`.
pub(crate) fn result_area<'a>(hdr: &Header, buf: &'a [u8]) -> Result<&'a [u8], Malformed> {
    let (start, end) = (hdr.data_start as usize, hdr.data_size as usize);
    if start < DM_IOCTL_SIZE || start > end || end > buf.len() {
        return Err(Malformed(format!(
            "data_start {start} / data_size {end} outside the {}-byte buffer",
            buf.len()
        )));
    }
    Ok(&buf[start..end])
}

/// Decodes the `DM_TABLE_STATUS` result: `count` target specs, each followed by its
/// status or table string; here `next` is an offset from the start of the result area.
pub(crate) fn decode_targets(area: &[u8], count: u32) -> Result<Vec<Target>, Malformed> {
    let mut out = Vec::with_capacity(count as usize);
    let mut off = 0usize;
    for i in 0..count {
        if off + TARGET_SPEC_SIZE > area.len() {
            return Err(Malformed(format!(
                "target {i} at offset {off} past the result area ({} bytes)",
                area.len()
            )));
        }
        let params_end = area[off + TARGET_SPEC_SIZE..]
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| Malformed(format!("target {i}: unterminated string")))?;
        let params = &area[off + TARGET_SPEC_SIZE..off + TARGET_SPEC_SIZE + params_end];
        out.push(Target {
            start: get_u64(area, off),
            len: get_u64(area, off + 8),
            target_type: get_cstr(area, off + 24, TYPE_NAME_LEN),
            params: String::from_utf8_lossy(params).into_owned(),
        });
        let next = get_u32(area, off + 20) as usize;
        if i + 1 < count && next <= off {
            return Err(Malformed(format!(
                "target {i}: next offset {next} does not advance"
            )));
        }
        off = next;
    }
    Ok(out)
}

/// Decodes the `DM_LIST_DEVICES` result: `struct dm_name_list { u64 dev; u32 next; char
/// name[]; }` records, `next` relative to the record, 0 on the last; `dev == 0` on the first
/// record means no devices.
pub(crate) fn decode_name_list(area: &[u8]) -> Result<Vec<(String, DevNum)>, Malformed> {
    let mut out = Vec::new();
    if area.len() < 8 || get_u64(area, 0) == 0 {
        return Ok(out);
    }
    let mut off = 0usize;
    loop {
        if off + 12 > area.len() {
            return Err(Malformed(format!(
                "name list record at {off} past the result area ({} bytes)",
                area.len()
            )));
        }
        let dev = DevNum::from_kernel(get_u64(area, off));
        let next = get_u32(area, off + 8) as usize;
        let name = get_cstr(area, off + 12, area.len() - off - 12);
        out.push((name, dev));
        if next == 0 {
            return Ok(out);
        }
        off += next;
    }
}

/// Payload of `DM_TARGET_MSG`: `struct dm_target_msg { u64 sector; char message[]; }`.
pub(crate) fn encode_message(sector: u64, msg: &str) -> Vec<u8> {
    let mut out = vec![0u8; align8(TARGET_MSG_SIZE + msg.len() + 1)];
    put_u64(&mut out, 0, sector);
    out[TARGET_MSG_SIZE..TARGET_MSG_SIZE + msg.len()].copy_from_slice(msg.as_bytes());
    out
}

/// A NUL-terminated string at the start of a result area (DM_TARGET_MSG's reply).
pub(crate) fn decode_string(area: &[u8]) -> String {
    get_cstr(area, 0, area.len())
}
