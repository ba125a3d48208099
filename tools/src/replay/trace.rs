//! Block trace parsers: blkparse text, fio iolog v2/v3, MSR Cambridge,
//! Alibaba 2020 and Tencent CBS (formats in `vendor-docs/trace-formats.md`).
//!
//! Every parser is total: any input yields either a [`Trace`] or a
//! [`TraceError`] naming the first bad line; with [`Malformed::Skip`] bad
//! lines are skipped and listed in [`Trace::skipped`] (line number and
//! reason). Nothing panics on any input.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// One trace format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// blkparse text output (`maj,min cpu seq time pid action rwbs sector + n [proc]`).
    Blkparse,
    /// fio iolog version 2 or 3.
    Fio,
    /// MSR Cambridge (SNIA IOTTA) CSV.
    Msr,
    /// Alibaba block traces 2020 CSV.
    Alibaba,
    /// Tencent CBS CSV.
    Tencent,
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OpKind {
    /// Read `len` bytes.
    Read,
    /// Write `len` bytes.
    Write,
    /// Discard `len` bytes.
    Trim,
    /// Cache flush (no range).
    Flush,
}

/// One operation of a trace, in trace order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceOp {
    /// 1-based line number in the trace file.
    pub line: usize,
    /// Time since the first operation, in nanoseconds.
    pub time_ns: u64,
    /// Operation.
    pub kind: OpKind,
    /// Byte offset on the traced device.
    pub offset: u64,
    /// Length in bytes (0 for a flush).
    pub len: u64,
    /// Force unit access.
    pub fua: bool,
    /// A cache flush precedes this operation (blkparse leading `F`).
    pub preflush: bool,
}

/// How malformed lines are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// The first malformed line is an error.
    Refuse,
    /// Malformed lines are skipped and listed.
    Skip,
}

/// A parse error.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A line could not be parsed.
    #[error("line {line}: {reason}: {text:?}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// Why.
        reason: String,
        /// The line (truncated to 200 bytes).
        text: String,
    },
    /// The file could not be read.
    #[error("reading the trace: {0}")]
    Io(#[from] std::io::Error),
    /// The format could not be determined.
    #[error("cannot detect the trace format ({0}); pass --format")]
    Undetected(String),
    /// Several volumes and no filter.
    #[error("the trace holds {n} volumes ({list}); choose one with --volume-filter")]
    ManyVolumes {
        /// How many.
        n: usize,
        /// The busiest ones with their op counts.
        list: String,
    },
    /// Nothing to replay.
    #[error("the trace holds no operations{0}")]
    Empty(String),
}

/// A parsed trace.
#[derive(Debug, Clone)]
pub struct Trace {
    /// The format it was parsed as.
    pub format: Format,
    /// Operations in trace order, times relative to the first one.
    pub ops: Vec<TraceOp>,
    /// Skipped lines: (line number, reason).
    pub skipped: Vec<(usize, String)>,
    /// The volume kept (when the format names volumes).
    pub volume: Option<String>,
    /// Largest `offset + len` of any operation.
    pub max_end: u64,
    /// Queue depth observed in the trace (blkparse: most requests issued and
    /// not completed at once), if the format records it.
    pub queue_depth: Option<usize>,
    /// blkparse: requests merged into others before issue (M/F actions).
    pub merges: u64,
}

fn clip(s: &str) -> String {
    let mut t: String = s.chars().take(200).collect();
    if t.len() < s.len() {
        t.push('…');
    }
    t
}

/// Reads a trace file, decompressing zstd (`.zst` or by magic).
pub fn read_trace_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let raw = std::fs::read(path)?;
    if raw.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let mut out = Vec::new();
        zstd::stream::read::Decoder::new(&raw[..])?.read_to_end(&mut out)?;
        return Ok(out);
    }
    Ok(raw)
}

/// Guesses the format from the first meaningful lines.
pub fn detect(text: &[u8]) -> Result<Format, TraceError> {
    let r = BufReader::new(text);
    for line in r.lines().take(50) {
        let line = match line {
            Ok(l) => l,
            Err(_) => return Err(TraceError::Undetected("not UTF-8 text".into())),
        };
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if t.starts_with("fio version") {
            return Ok(Format::Fio);
        }
        let ws: Vec<&str> = t.split_whitespace().collect();
        if ws.len() >= 6 && ws[0].split_once(',').is_some_and(|(a, b)| num(a) && num(b)) {
            return Ok(Format::Blkparse);
        }
        let cs: Vec<&str> = t.split(',').map(str::trim).collect();
        match cs.len() {
            7 if matches!(cs[3].to_ascii_lowercase().as_str(), "read" | "write") => {
                return Ok(Format::Msr)
            }
            5 if matches!(cs[1], "R" | "W" | "r" | "w") => return Ok(Format::Alibaba),
            5 if matches!(cs[3], "0" | "1") => return Ok(Format::Tencent),
            _ => {}
        }
        return Err(TraceError::Undetected(format!(
            "first line not recognised: {:?}",
            clip(t)
        )));
    }
    Err(TraceError::Undetected("no data lines".into()))
}

fn num(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

struct Builder {
    format: Format,
    mode: Malformed,
    ops: Vec<TraceOp>,
    skipped: Vec<(usize, String)>,
    /// per volume: ops (only used by multi-volume formats)
    by_volume: BTreeMap<String, Vec<TraceOp>>,
    t0: Option<u64>,
}

impl Builder {
    fn new(format: Format, mode: Malformed) -> Self {
        Builder {
            format,
            mode,
            ops: Vec::new(),
            skipped: Vec::new(),
            by_volume: BTreeMap::new(),
            t0: None,
        }
    }
    fn bad(
        &mut self,
        line: usize,
        reason: impl Into<String>,
        text: &str,
    ) -> Result<(), TraceError> {
        let reason = reason.into();
        match self.mode {
            Malformed::Refuse => Err(TraceError::Line {
                line,
                reason,
                text: clip(text),
            }),
            Malformed::Skip => {
                self.skipped.push((line, reason));
                Ok(())
            }
        }
    }
    fn push(&mut self, volume: Option<String>, mut op: TraceOp, raw_time_ns: u64) {
        let t0 = *self.t0.get_or_insert(raw_time_ns);
        op.time_ns = raw_time_ns.saturating_sub(t0);
        match volume {
            Some(v) => self.by_volume.entry(v).or_default().push(op),
            None => self.ops.push(op),
        }
    }
    fn finish(
        mut self,
        filter: Option<&str>,
        queue_depth: Option<usize>,
        merges: u64,
    ) -> Result<Trace, TraceError> {
        let mut volume = None;
        if !self.by_volume.is_empty() {
            let chosen = match filter {
                Some(f) => f.to_string(),
                None if self.by_volume.len() == 1 => {
                    self.by_volume.keys().next().cloned().unwrap_or_default()
                }
                None => {
                    let mut v: Vec<(usize, &String)> =
                        self.by_volume.iter().map(|(k, o)| (o.len(), k)).collect();
                    v.sort_by(|a, b| b.cmp(a));
                    let list = v
                        .iter()
                        .take(8)
                        .map(|(n, k)| format!("{k}: {n} ops"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(TraceError::ManyVolumes {
                        n: self.by_volume.len(),
                        list,
                    });
                }
            };
            self.ops = self.by_volume.remove(&chosen).unwrap_or_default();
            volume = Some(chosen);
        } else if let Some(f) = filter {
            // formats naming one device per line filtered while parsing
            volume = Some(f.to_string());
        }
        if self.ops.is_empty() {
            let why = match &volume {
                Some(v) => format!(" for volume {v:?}"),
                None => String::new(),
            };
            return Err(TraceError::Empty(why));
        }
        // times relative to the first op of the kept volume
        let t0 = self.ops.iter().map(|o| o.time_ns).min().unwrap_or(0);
        for o in &mut self.ops {
            o.time_ns -= t0;
        }
        let max_end = self
            .ops
            .iter()
            .map(|o| o.offset.saturating_add(o.len))
            .max()
            .unwrap_or(0);
        Ok(Trace {
            format: self.format,
            ops: self.ops,
            skipped: self.skipped,
            volume,
            max_end,
            queue_depth,
            merges,
        })
    }
}

fn op(line: usize, kind: OpKind, offset: u64, len: u64) -> TraceOp {
    TraceOp {
        line,
        time_ns: 0,
        kind,
        offset,
        len,
        fua: false,
        preflush: false,
    }
}

/// Parses `text` as `format`, keeping the volume `filter` (formats that name volumes).
pub fn parse(
    text: &[u8],
    format: Format,
    filter: Option<&str>,
    mode: Malformed,
) -> Result<Trace, TraceError> {
    match format {
        Format::Blkparse => parse_blkparse(text, filter, mode),
        Format::Fio => parse_fio(text, mode),
        Format::Msr => parse_csv(text, format, filter, mode),
        Format::Alibaba => parse_csv(text, format, filter, mode),
        Format::Tencent => parse_csv(text, format, filter, mode),
    }
}

fn lines(text: &[u8]) -> impl Iterator<Item = (usize, std::borrow::Cow<'_, str>)> {
    text.split(|&b| b == b'\n').enumerate().map(|(i, l)| {
        let l = l.strip_suffix(b"\r").unwrap_or(l);
        (i + 1, String::from_utf8_lossy(l))
    })
}

/// "sec.nsec" → ns.
fn parse_sec_nsec(s: &str) -> Option<u64> {
    let (a, b) = s.split_once('.').unwrap_or((s, ""));
    let secs: u64 = a.parse().ok()?;
    if !b.bytes().all(|c| c.is_ascii_digit()) || b.len() > 9 {
        return None;
    }
    let frac: u64 = if b.is_empty() {
        0
    } else {
        b.parse::<u64>().ok()? * 10u64.pow(9 - b.len() as u32)
    };
    secs.checked_mul(1_000_000_000)?.checked_add(frac)
}

fn parse_blkparse(text: &[u8], filter: Option<&str>, mode: Malformed) -> Result<Trace, TraceError> {
    let mut b = Builder::new(Format::Blkparse, mode);
    // Q events and D events are kept separately; D (issued) wins when present.
    let mut queued: Vec<(String, TraceOp, u64)> = Vec::new();
    let mut issued: Vec<(String, TraceOp, u64)> = Vec::new();
    let mut merges = 0u64;
    // outstanding issued requests per (dev, sector) for the queue depth
    let mut outstanding: HashMap<(String, u64), usize> = HashMap::new();
    let mut cur_out = 0usize;
    let mut max_out = 0usize;
    for (no, line) in lines(text) {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        // blkparse's per-CPU and total summaries end the event list
        if t.starts_with("CPU") || t.starts_with("Total") {
            break;
        }
        let ws: Vec<&str> = t.split_whitespace().collect();
        if ws.len() < 6 {
            b.bad(no, "too few fields for a blkparse event", t)?;
            continue;
        }
        let dev = ws[0];
        if !dev.split_once(',').is_some_and(|(a, c)| num(a) && num(c)) {
            b.bad(no, "first field is not a maj,min device", t)?;
            continue;
        }
        let Some(time) = parse_sec_nsec(ws[3]) else {
            b.bad(no, "bad timestamp (expected sec.nsec)", t)?;
            continue;
        };
        let action = ws[5];
        // message lines ("m N ...") and plug/unplug/etc. carry no request
        if !matches!(action, "Q" | "D" | "C" | "M" | "F") {
            if action.len() > 2 || !action.bytes().all(|c| c.is_ascii_alphabetic()) {
                b.bad(no, format!("unknown action {action:?}"), t)?;
            }
            continue;
        }
        if let Some(f) = filter {
            if dev != f {
                continue;
            }
        }
        if ws.len() < 7 {
            b.bad(no, "missing RWBS field", t)?;
            continue;
        }
        let rwbs = ws[6];
        let Some((kind, preflush, fua)) = parse_rwbs(rwbs) else {
            b.bad(no, format!("bad RWBS {rwbs:?}"), t)?;
            continue;
        };
        // sector + count (absent for a pure flush)
        let (sector, nsect) = if ws.len() >= 10 && ws[8] == "+" {
            match (ws[7].parse::<u64>(), ws[9].parse::<u64>()) {
                (Ok(s), Ok(n)) => (s, n),
                _ => {
                    b.bad(no, "bad sector or block count", t)?;
                    continue;
                }
            }
        } else if kind == OpKind::Flush {
            (0, 0)
        } else {
            b.bad(no, "missing `sector + count`", t)?;
            continue;
        };
        let (Some(offset), Some(len)) = (sector.checked_mul(512), nsect.checked_mul(512)) else {
            b.bad(no, "sector out of range", t)?;
            continue;
        };
        if kind != OpKind::Flush && len == 0 {
            b.bad(no, "zero-length request", t)?;
            continue;
        }
        let mut o = op(no, kind, offset, len);
        o.fua = fua;
        o.preflush = preflush;
        let key = (dev.to_string(), sector);
        match action {
            "Q" => queued.push((dev.to_string(), o, time)),
            "D" => {
                issued.push((dev.to_string(), o, time));
                *outstanding.entry(key).or_default() += 1;
                cur_out += 1;
                max_out = max_out.max(cur_out);
            }
            "C" => {
                if let Some(n) = outstanding.get_mut(&key) {
                    if *n > 0 {
                        *n -= 1;
                        cur_out = cur_out.saturating_sub(1);
                    }
                }
            }
            _ => merges += 1, // M (back merge), F (front merge)
        }
    }
    let (src, qd) = if issued.is_empty() {
        (queued, None)
    } else {
        (issued, Some(max_out.max(1)))
    };
    let devices: std::collections::BTreeSet<&String> = src.iter().map(|(d, _, _)| d).collect();
    let single = devices.len() == 1;
    for (dev, o, time) in src.iter().cloned() {
        let vol = if filter.is_some() || single {
            None
        } else {
            Some(dev)
        };
        b.push(vol, o, time);
    }
    let mut tr = b.finish(filter, qd, merges)?;
    if tr.volume.is_none() && single {
        tr.volume = devices.into_iter().next().cloned();
    }
    Ok(tr)
}

/// RWBS → (kind, preflush, fua). `F` first = preflush (alone = flush), then
/// D / W / R / N, then F = FUA, then A/S/M/E/... modifiers.
fn parse_rwbs(s: &str) -> Option<(OpKind, bool, bool)> {
    let mut c = s.chars().peekable();
    let mut preflush = false;
    if c.peek() == Some(&'F') {
        preflush = true;
        c.next();
    }
    let kind = match c.peek() {
        Some('D') => Some(OpKind::Trim),
        Some('W') => Some(OpKind::Write),
        Some('R') => Some(OpKind::Read),
        Some('N') => None,
        None if preflush => return Some((OpKind::Flush, false, false)),
        _ => return None,
    };
    c.next();
    // a discard may be written "DW"
    if kind == Some(OpKind::Trim) && c.peek() == Some(&'W') {
        c.next();
    }
    let mut fua = false;
    if c.peek() == Some(&'F') {
        fua = true;
        c.next();
    }
    for m in c {
        if !matches!(m, 'A' | 'S' | 'M' | 'E' | 'B' | 'N') {
            return None;
        }
    }
    match kind {
        Some(k) => Some((k, preflush, fua)),
        None if preflush => Some((OpKind::Flush, false, false)),
        None => None, // "N": no data, no flush
    }
}

fn parse_fio(text: &[u8], mode: Malformed) -> Result<Trace, TraceError> {
    let mut b = Builder::new(Format::Fio, mode);
    let mut version = 0;
    let mut clock_ns: u64 = 0; // v2: accumulated `wait`
    for (no, line) in lines(text) {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        if version == 0 {
            version = match t {
                "fio version 2 iolog" => 2,
                "fio version 3 iolog" => 3,
                _ => {
                    return Err(TraceError::Line {
                        line: no,
                        reason: "expected `fio version 2 iolog` or `fio version 3 iolog`".into(),
                        text: clip(t),
                    })
                }
            };
            continue;
        }
        let mut ws: Vec<&str> = t.split_whitespace().collect();
        let mut time = clock_ns;
        if version == 3 {
            match ws.first().map(|s| s.parse::<u64>()) {
                Some(Ok(us)) if ws.len() >= 3 => {
                    time = us.saturating_mul(1000);
                    ws.remove(0);
                }
                _ => {
                    b.bad(no, "v3 line must be `TIME_US FILE ACTION [...]`", t)?;
                    continue;
                }
            }
        }
        if ws.len() < 2 {
            b.bad(no, "expected `FILE ACTION [...]`", t)?;
            continue;
        }
        let action = ws[1];
        let kind = match action {
            "add" | "open" | "close" => continue,
            "wait" => {
                match ws.get(2).and_then(|v| v.parse::<u64>().ok()) {
                    Some(us) if ws.len() == 3 => clock_ns = clock_ns.saturating_add(us * 1000),
                    _ => b.bad(no, "`wait` needs one microsecond count", t)?,
                }
                continue;
            }
            "read" => OpKind::Read,
            "write" => OpKind::Write,
            "trim" => OpKind::Trim,
            "sync" | "datasync" => OpKind::Flush,
            a => {
                b.bad(no, format!("unknown action {a:?}"), t)?;
                continue;
            }
        };
        let (offset, len) = if kind == OpKind::Flush {
            // fio writes `sync` with or without "0 0"
            (0, 0)
        } else {
            match (
                ws.get(2).map(|v| v.parse::<u64>()),
                ws.get(3).map(|v| v.parse::<u64>()),
            ) {
                (Some(Ok(o)), Some(Ok(l))) if ws.len() == 4 && l > 0 => (o, l),
                (Some(Ok(_)), Some(Ok(0))) => {
                    b.bad(no, "zero length", t)?;
                    continue;
                }
                _ => {
                    b.bad(no, "expected OFFSET LENGTH in bytes", t)?;
                    continue;
                }
            }
        };
        if offset.checked_add(len).is_none() {
            b.bad(no, "offset + length overflows", t)?;
            continue;
        }
        b.push(None, op(no, kind, offset, len), time);
    }
    if version == 0 {
        return Err(TraceError::Empty(
            " (no `fio version N iolog` header)".into(),
        ));
    }
    b.finish(None, None, 0)
}

fn parse_csv(
    text: &[u8],
    format: Format,
    filter: Option<&str>,
    mode: Malformed,
) -> Result<Trace, TraceError> {
    let mut b = Builder::new(format, mode);
    for (no, line) in lines(text) {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = t.split(',').map(str::trim).collect();
        let parsed: Result<(String, OpKind, u64, u64, u64), String> = (|| match format {
            Format::Msr => {
                // Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime
                if f.len() != 7 {
                    return Err(format!("expected 7 fields, found {}", f.len()));
                }
                let ts: u64 = f[0].parse().map_err(|_| "bad FILETIME timestamp")?;
                let kind = match f[3].to_ascii_lowercase().as_str() {
                    "read" => OpKind::Read,
                    "write" => OpKind::Write,
                    _ => return Err(format!("type {:?} is not Read or Write", f[3])),
                };
                let off: u64 = f[4].parse().map_err(|_| "bad offset")?;
                let len: u64 = f[5].parse().map_err(|_| "bad size")?;
                Ok((
                    format!("{}_{}", f[1], f[2]),
                    kind,
                    off,
                    len,
                    ts.saturating_mul(100),
                ))
            }
            Format::Alibaba => {
                // device_id,opcode,offset,length,timestamp(us)
                if f.len() != 5 {
                    return Err(format!("expected 5 fields, found {}", f.len()));
                }
                let kind = match f[1] {
                    "R" | "r" => OpKind::Read,
                    "W" | "w" => OpKind::Write,
                    o => return Err(format!("opcode {o:?} is not R or W")),
                };
                let off: u64 = f[2].parse().map_err(|_| "bad offset")?;
                let len: u64 = f[3].parse().map_err(|_| "bad length")?;
                let ts: u64 = f[4].parse().map_err(|_| "bad timestamp")?;
                Ok((f[0].to_string(), kind, off, len, ts.saturating_mul(1000)))
            }
            _ => {
                // Timestamp(s),Offset(sectors),Size(sectors),IOType,VolumeID
                if f.len() != 5 {
                    return Err(format!("expected 5 fields, found {}", f.len()));
                }
                let ts: u64 = f[0].parse().map_err(|_| "bad timestamp")?;
                let off: u64 = f[1].parse().map_err(|_| "bad offset")?;
                let len: u64 = f[2].parse().map_err(|_| "bad size")?;
                let kind = match f[3] {
                    "0" => OpKind::Read,
                    "1" => OpKind::Write,
                    o => return Err(format!("IOType {o:?} is not 0 or 1")),
                };
                let off = off.checked_mul(512).ok_or("offset overflows")?;
                let len = len.checked_mul(512).ok_or("size overflows")?;
                Ok((
                    f[4].to_string(),
                    kind,
                    off,
                    len,
                    ts.saturating_mul(1_000_000_000),
                ))
            }
        })();
        match parsed {
            Ok((_, _, off, len, _)) if len == 0 || off.checked_add(len).is_none() => {
                b.bad(no, "zero length or range overflow", t)?;
            }
            Ok((vol, kind, off, len, ts)) => {
                if filter.is_some_and(|f| f != vol) {
                    continue;
                }
                b.push(Some(vol), op(no, kind, off, len), ts);
            }
            Err(e) => {
                // a header row is allowed on the first line
                if no == 1
                    && f.iter()
                        .any(|x| x.chars().any(|c| c.is_ascii_alphabetic()) && x.len() > 2)
                    && format != Format::Msr
                {
                    continue;
                }
                b.bad(no, e, t)?;
            }
        }
    }
    b.finish(filter, None, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str, f: Format, m: Malformed) -> Result<Trace, TraceError> {
        parse(s.as_bytes(), f, None, m)
    }

    #[test]
    fn rwbs_letters() {
        assert_eq!(parse_rwbs("W"), Some((OpKind::Write, false, false)));
        assert_eq!(parse_rwbs("WS"), Some((OpKind::Write, false, false)));
        assert_eq!(parse_rwbs("FWFS"), Some((OpKind::Write, true, true)));
        assert_eq!(parse_rwbs("WFS"), Some((OpKind::Write, false, true)));
        assert_eq!(parse_rwbs("FN"), Some((OpKind::Flush, false, false)));
        assert_eq!(parse_rwbs("F"), Some((OpKind::Flush, false, false)));
        assert_eq!(parse_rwbs("D"), Some((OpKind::Trim, false, false)));
        assert_eq!(parse_rwbs("DS"), Some((OpKind::Trim, false, false)));
        assert_eq!(parse_rwbs("RA"), Some((OpKind::Read, false, false)));
        assert_eq!(parse_rwbs("N"), None);
        assert_eq!(parse_rwbs("X"), None);
        assert_eq!(parse_rwbs("WQ"), None);
    }

    #[test]
    fn detects_formats() {
        assert_eq!(detect(b"fio version 3 iolog\n").unwrap(), Format::Fio);
        assert_eq!(
            detect(b"  8,0    0        1     0.000000000  100  Q   W 0 + 8 [a]\n").unwrap(),
            Format::Blkparse
        );
        assert_eq!(
            detect(b"128166372003061629,hm,1,Write,3154128896,4096,1331\n").unwrap(),
            Format::Msr
        );
        assert_eq!(
            detect(b"3,W,4096,4096,1577808000000000\n").unwrap(),
            Format::Alibaba
        );
        assert_eq!(
            detect(b"1538323200,2048,8,1,1283\n").unwrap(),
            Format::Tencent
        );
        assert!(detect(b"hello world\n").is_err());
        assert!(detect(b"").is_err());
    }

    const BLK: &str = "\
  8,0    1        1     0.000000000  100  Q  WS 2048 + 8 [dd]
  8,0    1        2     0.000001000  100  G  WS 2048 + 8 [dd]
  8,0    1        3     0.000002000  100  Q  WS 2056 + 8 [dd]
  8,0    1        4     0.000002500  100  M  WS 2056 + 8 [dd]
  8,0    1        5     0.000003000  100  D  WS 2048 + 16 [dd]
  8,0    1        6     0.000004000  100  Q FWFS 4096 + 8 [jbd2]
  8,0    1        7     0.000004100  100  D FWFS 4096 + 8 [jbd2]
  8,0    0        8     0.000005000    0  C  WS 2048 + 16 [0]
  8,0    1        9     0.000006000  100  Q  DS 8192 + 64 [fstrim]
  8,0    1       10     0.000006100  100  D  DS 8192 + 64 [fstrim]
  8,0    1       11     0.000007000  100  Q  FN [kworker]
  8,0    1       12     0.000007100  100  D  FN [kworker]
  8,0    1       13     0.000008000  100  D   R 0 + 1 [cat]
  8,0    1       14     0.000009000  100  m   N cfq100 alloced
  8,16   1       15     0.000010000  100  D   W 0 + 8 [other]
CPU1 (8,0):
 Reads Queued:           0,        0KiB\t Writes Queued:           3,       12KiB
";

    #[test]
    fn blkparse_uses_issued_requests_with_merges_flush_fua_discard() {
        let t = parse(
            BLK.as_bytes(),
            Format::Blkparse,
            Some("8,0"),
            Malformed::Refuse,
        )
        .unwrap();
        let got: Vec<_> = t
            .ops
            .iter()
            .map(|o| (o.kind, o.offset, o.len, o.preflush, o.fua))
            .collect();
        assert_eq!(
            got,
            vec![
                (OpKind::Write, 2048 * 512, 16 * 512, false, false), // merged D
                (OpKind::Write, 4096 * 512, 8 * 512, true, true),    // FWFS: preflush + FUA
                (OpKind::Trim, 8192 * 512, 64 * 512, false, false),
                (OpKind::Flush, 0, 0, false, false),
                (OpKind::Read, 0, 512, false, false),
            ]
        );
        assert_eq!(t.merges, 1);
        assert_eq!(t.queue_depth, Some(4), "D without C: 4 outstanding at most");
        assert_eq!(t.ops[0].time_ns, 0);
        assert_eq!(t.ops[1].time_ns, 1100);
        assert_eq!(t.ops[0].line, 5);
        // two devices and no filter: refused with the list
        let e = parse(BLK.as_bytes(), Format::Blkparse, None, Malformed::Refuse).unwrap_err();
        assert!(matches!(e, TraceError::ManyVolumes { n: 2, .. }), "{e}");
        // Q events only: the queued requests are replayed
        let qonly: String = BLK
            .lines()
            .filter(|l| !l.contains(" D ") && !l.contains(" C "))
            .map(|l| format!("{l}\n"))
            .collect();
        let t = parse(
            qonly.as_bytes(),
            Format::Blkparse,
            Some("8,0"),
            Malformed::Refuse,
        )
        .unwrap();
        assert_eq!(t.ops.len(), 5);
        assert_eq!(t.queue_depth, None);
    }

    #[test]
    fn blkparse_malformed_lines_are_named() {
        let bad = "  8,0 1 1 0.000000000 100 D W 0 + 8 [a]\n  8,0 1 2 0.0x 100 D W 8 + 8 [a]\n  8,0 1 3 0.1 100 D WQ 8 + 8 [a]\n  8,0 1 4 0.2 100 D W 8 + z [a]\n";
        let e = p(bad, Format::Blkparse, Malformed::Refuse).unwrap_err();
        assert!(e.to_string().starts_with("line 2: bad timestamp"), "{e}");
        let t = p(bad, Format::Blkparse, Malformed::Skip).unwrap();
        assert_eq!(t.ops.len(), 1);
        let lines: Vec<usize> = t.skipped.iter().map(|s| s.0).collect();
        assert_eq!(lines, vec![2, 3, 4]);
        assert!(t.skipped[1].1.contains("RWBS"));
    }

    #[test]
    fn fio_v2_and_v3() {
        let v2 = "fio version 2 iolog\n/dev/x add\n/dev/x open\n/dev/x write 0 4096\n/dev/x wait 1500\n/dev/x read 4096 512\n/dev/x sync 0 0\n/dev/x trim 8192 4096\n/dev/x datasync\n/dev/x close\n";
        let t = p(v2, Format::Fio, Malformed::Refuse).unwrap();
        let got: Vec<_> = t
            .ops
            .iter()
            .map(|o| (o.kind, o.offset, o.len, o.time_ns))
            .collect();
        assert_eq!(
            got,
            vec![
                (OpKind::Write, 0, 4096, 0),
                (OpKind::Read, 4096, 512, 1_500_000),
                (OpKind::Flush, 0, 0, 1_500_000),
                (OpKind::Trim, 8192, 4096, 1_500_000),
                (OpKind::Flush, 0, 0, 1_500_000),
            ]
        );
        let v3 = "fio version 3 iolog\n10 f add\n20 f open\n100 f write 4096 4096\n250 f read 0 4096\n300 f close\n";
        let t = p(v3, Format::Fio, Malformed::Refuse).unwrap();
        assert_eq!(t.ops.len(), 2);
        assert_eq!(t.ops[1].time_ns, 150_000);
        assert_eq!(t.ops[1].line, 5);
        let bad = "fio version 3 iolog\n100 f write 0 4096\nf write 0 4096\n200 f scribble 0 1\n300 f write 0\n400 f write 0 0\n";
        let e = p(bad, Format::Fio, Malformed::Refuse).unwrap_err();
        assert!(e.to_string().starts_with("line 3:"), "{e}");
        let t = p(bad, Format::Fio, Malformed::Skip).unwrap();
        assert_eq!(
            t.skipped.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![3, 4, 5, 6]
        );
        assert!(p("fio version 9 iolog\n", Format::Fio, Malformed::Skip).is_err());
    }

    #[test]
    fn msr_csv() {
        let s = "128166372003061629,hm,1,Write,3154128896,4096,1331\n128166372003071629,hm,1,Read,4096,8192,100\n128166372003081629,hm,0,Write,0,4096,1\nbroken,line\n128166372003091629,hm,1,Erase,0,4096,1\n";
        let e = p(s, Format::Msr, Malformed::Refuse).unwrap_err();
        assert!(e.to_string().starts_with("line 4:"), "{e}");
        let e = parse(s.as_bytes(), Format::Msr, None, Malformed::Skip).unwrap_err();
        assert!(matches!(e, TraceError::ManyVolumes { n: 2, .. }), "{e}");
        let t = parse(s.as_bytes(), Format::Msr, Some("hm_1"), Malformed::Skip).unwrap();
        assert_eq!(t.ops.len(), 2);
        assert_eq!(
            (t.ops[0].kind, t.ops[0].offset, t.ops[0].len),
            (OpKind::Write, 3154128896, 4096)
        );
        assert_eq!(t.ops[1].time_ns, 1_000_000); // 10000 FILETIME ticks of 100 ns
        assert_eq!(
            t.skipped.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert_eq!(t.volume.as_deref(), Some("hm_1"));
    }

    #[test]
    fn alibaba_csv() {
        let s = "3,W,4096,8192,1577808000000000\n3,R,0,4096,1577808000000500\n4,W,0,4096,1577808000000600\n3,X,0,4096,1\n3,W,-1,4096,1\n";
        let t = parse(s.as_bytes(), Format::Alibaba, Some("3"), Malformed::Skip).unwrap();
        assert_eq!(t.ops.len(), 2);
        assert_eq!(t.ops[1].time_ns, 500_000);
        assert_eq!(
            t.skipped.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert!(p(s, Format::Alibaba, Malformed::Refuse).is_err());
    }

    #[test]
    fn tencent_csv() {
        let s = "1538323200,2048,8,1,1283\n1538323201,0,16,0,1283\n1538323201,0,16,2,1283\n1538323202,5,0,1,1283\n";
        let t = p(s, Format::Tencent, Malformed::Skip).unwrap();
        assert_eq!(t.ops.len(), 2);
        assert_eq!(
            (t.ops[0].kind, t.ops[0].offset, t.ops[0].len),
            (OpKind::Write, 2048 * 512, 8 * 512)
        );
        assert_eq!(
            (t.ops[1].kind, t.ops[1].time_ns),
            (OpKind::Read, 1_000_000_000)
        );
        assert_eq!(
            t.skipped.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![3, 4]
        );
        let e = p(s, Format::Tencent, Malformed::Refuse).unwrap_err();
        assert!(e.to_string().starts_with("line 3: IOType"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 300, ..Default::default() })]
        /// No parser panics on any input.
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
                               prefix in proptest::sample::select(vec!["", "fio version 3 iolog\n", "fio version 2 iolog\n", "  8,0 1 1 0.1 1 D W ", "1,W,", "1,2,3,"])) {
            let mut text = prefix.as_bytes().to_vec();
            text.extend_from_slice(&bytes);
            let _ = detect(&text);
            for f in [Format::Blkparse, Format::Fio, Format::Msr, Format::Alibaba, Format::Tencent] {
                for m in [Malformed::Refuse, Malformed::Skip] {
                    let _ = parse(&text, f, None, m);
                    let _ = parse(&text, f, Some("1"), m);
                }
            }
        }

        /// Structured-looking random lines parse or fail cleanly.
        #[test]
        fn parsers_never_panic_on_fieldy_lines(fields in proptest::collection::vec(
            proptest::prop_oneof![proptest::prelude::Just("W".to_string()), proptest::prelude::Just("+".to_string()),
                proptest::prelude::Just("18446744073709551615".to_string()), proptest::prelude::Just("8,0".to_string()),
                "[0-9]{1,20}", "[0-9]{1,3}\\.[0-9]{0,12}", "[A-Z]{1,4}"], 1..12),
            sep in proptest::sample::select(vec![" ", ","])) {
            let line = fields.join(sep);
            for f in [Format::Blkparse, Format::Fio, Format::Msr, Format::Alibaba, Format::Tencent] {
                let _ = parse(format!("fio version 3 iolog\n{line}\n{line}\n").as_bytes(), f, None, Malformed::Skip);
                let _ = parse(format!("{line}\n").as_bytes(), f, None, Malformed::Skip);
            }
        }
    }
}
