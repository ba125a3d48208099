//! Virtual and physical snapshots of a replicated volume (design §7).
//!
//! * [`PointSpec`]: a recovery point as an admin names it (`--latest`,
//!   `--at TIME`, `--bookmark NAME`, `--seq N`), with [`parse_time`] for
//!   RFC 3339 UTC and unix seconds.
//! * [`VsnapSource`]: a [`filter_nbd::BlockSource`] serving the volume as it
//!   was at a point: reads go to the journal's point-in-time view (replica
//!   overlaid with the undo records newer than the point: an index lookup,
//!   no copy). Read-only, or read-write through an [`Overlay`]: a private
//!   temporary file that takes every write, so neither the replica nor the
//!   journal is ever written.
//! * [`materialize`]: copy a point to a file or device (physical snapshot),
//!   with progress.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use filter_nbd::proto::Extent;
use filter_nbd::{BlockSource, TrimOutcome};
use serde::{Deserialize, Serialize};

use crate::store::SharedVolume;

/// A recovery point as named on the command line or in an admin request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointSpec {
    /// The latest fully applied state.
    Latest,
    /// The state after the last applied change with source time ≤ this (ns since the epoch, UTC).
    Time(u64),
    /// A bookmark by name (the newest of that name).
    Bookmark(String),
    /// The newest bookmark at or before this time (ns), of this kind if given.
    BookmarkBefore {
        /// Source time, ns since the epoch (UTC).
        time_ns: u64,
        /// `app`, `fs` or `user`.
        kind: Option<String>,
    },
    /// The state after the last applied change with sequence ≤ this.
    Seq(u64),
}

/// Parses a bookmark kind: `app`, `fs` or `user`.
pub fn parse_kind(s: &str) -> Result<journal::BookmarkKind, String> {
    match s {
        "app" | "application" => Ok(journal::BookmarkKind::App),
        "fs" | "filesystem" => Ok(journal::BookmarkKind::Fs),
        "user" => Ok(journal::BookmarkKind::User),
        _ => Err(format!("{s:?}: a bookmark kind is app, fs or user")),
    }
}

/// The name of a bookmark kind as shown and parsed.
pub fn kind_name(k: journal::BookmarkKind) -> &'static str {
    match k {
        journal::BookmarkKind::App => "app",
        journal::BookmarkKind::Fs => "fs",
        journal::BookmarkKind::User => "user",
    }
}

impl PointSpec {
    /// The journal's recovery point.
    pub fn to_recovery_point(&self) -> Result<journal::RecoveryPoint> {
        Ok(match self {
            PointSpec::Latest => journal::RecoveryPoint::Latest,
            PointSpec::Time(t) => journal::RecoveryPoint::Time(*t),
            PointSpec::Bookmark(b) => journal::RecoveryPoint::Bookmark(b.clone()),
            PointSpec::BookmarkBefore { time_ns, kind } => {
                journal::RecoveryPoint::BookmarkAtOrBefore {
                    time_ns: *time_ns,
                    kind: kind
                        .as_deref()
                        .map(parse_kind)
                        .transpose()
                        .map_err(|e| anyhow::anyhow!("{e}"))?,
                }
            }
            PointSpec::Seq(s) => journal::RecoveryPoint::Seq(*s),
        })
    }
}

impl std::fmt::Display for PointSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PointSpec::Latest => write!(f, "latest"),
            PointSpec::Time(t) => write!(f, "time {}", format_time(*t)),
            PointSpec::Bookmark(b) => write!(f, "bookmark {b:?}"),
            PointSpec::BookmarkBefore { time_ns, kind } => write!(
                f,
                "latest {}bookmark at or before {}",
                kind.as_deref().map(|k| format!("{k} ")).unwrap_or_default(),
                format_time(*time_ns)
            ),
            PointSpec::Seq(s) => write!(f, "seq {s}"),
        }
    }
}

/// Clap arguments choosing a point: exactly one of `--latest`, `--at`,
/// `--bookmark`, `--bookmark-before`, `--seq`.
#[derive(Debug, Clone, clap::Args)]
pub struct PointArgs {
    /// The latest fully applied state.
    #[arg(long)]
    pub latest: bool,
    /// A time: RFC 3339 in UTC (2026-11-22T04:50:00Z, fractions allowed) or unix seconds (1795323000.5).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub at: Option<u64>,
    /// A bookmark by name (see `rewind recover list`).
    #[arg(long, value_name = "NAME")]
    pub bookmark: Option<String>,
    /// The newest bookmark at or before TIME (RFC 3339 UTC or unix seconds).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub bookmark_before: Option<u64>,
    /// A change sequence number (the state after the last change with seq <= N).
    #[arg(long, value_name = "N")]
    pub seq: Option<u64>,
    /// With --bookmark-before: only bookmarks of this kind (app, fs, user).
    #[arg(long, value_name = "KIND", requires = "bookmark_before", value_parser = ["app", "fs", "user"])]
    pub bookmark_kind: Option<String>,
}

impl PointArgs {
    /// The point chosen; an error unless exactly one was given.
    pub fn spec(&self) -> Result<PointSpec> {
        let n = usize::from(self.latest)
            + usize::from(self.at.is_some())
            + usize::from(self.bookmark.is_some())
            + usize::from(self.bookmark_before.is_some())
            + usize::from(self.seq.is_some());
        if n != 1 {
            bail!("give exactly one of --latest, --at TIME, --bookmark NAME, --bookmark-before TIME, --seq N");
        }
        Ok(if let Some(t) = self.at {
            PointSpec::Time(t)
        } else if let Some(b) = &self.bookmark {
            PointSpec::Bookmark(b.clone())
        } else if let Some(t) = self.bookmark_before {
            PointSpec::BookmarkBefore {
                time_ns: t,
                kind: self.bookmark_kind.clone(),
            }
        } else if let Some(s) = self.seq {
            PointSpec::Seq(s)
        } else {
            PointSpec::Latest
        })
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Formats ns since the epoch as RFC 3339 UTC with nanoseconds trimmed to what is set.
pub fn format_time(ns: u64) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let frac = ns % 1_000_000_000;
    let (y, m, d) = civil_from_days(secs.div_euclid(86400));
    let r = secs.rem_euclid(86400);
    let base = format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        r / 3600,
        r / 60 % 60,
        r % 60
    );
    if frac == 0 {
        format!("{base}Z")
    } else {
        let f = format!("{frac:09}");
        format!("{base}.{}Z", f.trim_end_matches('0'))
    }
}

fn parse_frac(s: &str) -> Result<u64, String> {
    if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?}: a fraction of a second has 1 to 9 digits"));
    }
    let mut v: u64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    for _ in s.len()..9 {
        v *= 10;
    }
    Ok(v)
}

/// Parses a time: RFC 3339 in UTC (`2026-11-22T04:50:00Z`, `...T04:50:00.25Z`,
/// a space instead of `T`, `+00:00` for `Z`) or unix seconds with an optional
/// fraction (`1795323000`, `1795323000.25`). Returns ns since the epoch.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let err = |why: &str| {
        format!("{s:?}: {why}; give RFC 3339 in UTC (e.g. 2026-11-22T04:50:00Z) or unix seconds")
    };
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let (i, f) = s.split_once('.').unwrap_or((s, ""));
        let secs: u64 = i.parse().map_err(|_| err("bad seconds"))?;
        let frac = if f.is_empty() {
            0
        } else {
            parse_frac(f).map_err(|e| err(&e))?
        };
        return secs
            .checked_mul(1_000_000_000)
            .and_then(|n| n.checked_add(frac))
            .ok_or_else(|| err("too large"));
    }
    let body = if let Some(b) = s.strip_suffix('Z').or_else(|| s.strip_suffix('z')) {
        b
    } else if let Some(b) = s
        .strip_suffix("+00:00")
        .or_else(|| s.strip_suffix("-00:00"))
    {
        b
    } else {
        return Err(err("only UTC times are accepted (end with Z)"));
    };
    let b = body.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(err("expected YYYY-MM-DDTHH:MM:SS[.frac]Z"));
    }
    let num = |r: std::ops::Range<usize>| -> Result<u32, String> {
        let t = &body[r];
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return Err(err("expected digits"));
        }
        t.parse().map_err(|_| err("expected digits"))
    };
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    let frac = match &body[19..] {
        "" => 0,
        f => match f.strip_prefix('.') {
            Some(f) => parse_frac(f).map_err(|e| err(&e))?,
            None => return Err(err("unexpected text after the seconds")),
        },
    };
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let mdays = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&mo)
        || d == 0
        || d > mdays[(mo - 1) as usize]
        || h > 23
        || mi > 59
        || se > 60
    {
        return Err(err("date or time out of range"));
    }
    let days = days_from_civil(y as i64, mo, d);
    if days < 0 {
        return Err(err("before 1970"));
    }
    let secs = days as u64 * 86400 + h as u64 * 3600 + mi as u64 * 60 + se as u64;
    Ok(secs * 1_000_000_000 + frac)
}

/// Reads of a volume at a fixed point: the journal's [`journal::SnapshotView`]
/// (an index lookup, no copy), which stays exact while the target keeps
/// applying and pins its point against retention. Counted in the volume's
/// live views while it exists (re-protection refuses meanwhile).
pub struct PointView {
    view: journal::SnapshotView,
    vol: Arc<SharedVolume>,
}

impl PointView {
    /// Opens a view of `vol` at `spec`, with the journal's errors for points
    /// that are unknown, outside the window, in the future or inconsistent.
    pub fn open(vol: Arc<SharedVolume>, spec: &PointSpec) -> Result<Self> {
        let rp = spec.to_recovery_point()?;
        let view = vol
            .with(|v| v.snapshot(&rp))
            .with_context(|| format!("volume {}: {spec}", vol.name))?;
        if !view.point().consistent {
            bail!(
                "volume {}: {spec} is inside a resync (not a state the source ever had); pick a later point",
                vol.name
            );
        }
        vol.view_opened();
        Ok(PointView { view, vol })
    }

    /// The resolved point.
    pub fn point(&self) -> &journal::ResolvedPoint {
        self.view.point()
    }

    /// Volume size in bytes.
    pub fn size(&self) -> u64 {
        self.view.size()
    }

    /// Fills `buf` with the bytes at `offset` as they were at the point.
    /// Corrupt journal data is an error, never data.
    pub fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.view
            .read_at(buf, offset)
            .map_err(|e| io::Error::other(format!("volume {}: {e}", self.vol.name)))
    }
}

impl Drop for PointView {
    fn drop(&mut self) {
        self.vol.view_closed();
    }
}

/// Block size of the read-write overlay map.
pub const OVERLAY_BLOCK: u64 = 4096;

/// The private write layer of a read-write snapshot: a sparse temporary file
/// (unnamed, `O_TMPFILE`, so it disappears with the process) holding every
/// block written, plus an in-memory bitmap of the blocks it holds. Nothing is
/// persisted: a snapshot's writes are discarded when it stops.
pub struct Overlay {
    file: File,
    map: Mutex<Vec<u64>>,
}

impl Overlay {
    /// Creates the overlay for a volume of `size` bytes in directory `dir`.
    pub fn create(dir: &Path, size: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
            .mode(0o600)
            .open(dir)
            .with_context(|| format!("creating the overlay file in {}", dir.display()))?;
        file.set_len(size)
            .with_context(|| format!("sizing the overlay file in {}", dir.display()))?;
        let blocks = size.div_ceil(OVERLAY_BLOCK);
        Ok(Overlay {
            file,
            map: Mutex::new(vec![0u64; blocks.div_ceil(64) as usize]),
        })
    }

    /// Blocks written so far.
    pub fn blocks_written(&self) -> u64 {
        let m = self.map.lock().unwrap_or_else(|e| e.into_inner());
        m.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

fn bit(map: &[u64], b: u64) -> bool {
    map[(b / 64) as usize] >> (b % 64) & 1 == 1
}

fn set_bit(map: &mut [u64], b: u64) {
    map[(b / 64) as usize] |= 1 << (b % 64);
}

/// A virtual snapshot served over NBD: the volume at a point, read-only or
/// with a private [`Overlay`] for writes.
pub struct VsnapSource {
    view: PointView,
    overlay: Option<Overlay>,
}

impl VsnapSource {
    /// Read-only when `overlay` is `None`.
    pub fn new(view: PointView, overlay: Option<Overlay>) -> Self {
        VsnapSource { view, overlay }
    }

    /// The overlay, for a read-write snapshot.
    pub fn overlay(&self) -> Option<&Overlay> {
        self.overlay.as_ref()
    }

    /// The point served.
    pub fn view(&self) -> &PointView {
        &self.view
    }

    /// Writes `len` bytes at `offset` into the overlay: `data` (or zeroes when
    /// `None`). Partial blocks are completed from the point-in-time view first.
    fn overlay_write(
        &self,
        ov: &Overlay,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> io::Result<()> {
        let mut map = ov.map.lock().unwrap_or_else(|e| e.into_inner());
        let end = offset + len;
        let mut blk = offset / OVERLAY_BLOCK;
        let size = self.view.size();
        let mut tmp = vec![0u8; OVERLAY_BLOCK as usize];
        while blk * OVERLAY_BLOCK < end {
            let bs = blk * OVERLAY_BLOCK;
            let be = (bs + OVERLAY_BLOCK).min(size);
            let (s, e) = (offset.max(bs), end.min(be));
            let full = s == bs && e == be;
            let block = &mut tmp[..(be - bs) as usize];
            if !full {
                if bit(&map, blk) {
                    ov.file.read_exact_at(block, bs)?;
                } else {
                    self.view.read(block, bs)?;
                }
            }
            let dst = &mut block[(s - bs) as usize..(e - bs) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(s - offset) as usize..(e - offset) as usize]),
                None => dst.fill(0),
            }
            ov.file.write_all_at(block, bs)?;
            set_bit(&mut map, blk);
            blk += 1;
        }
        Ok(())
    }
}

impl BlockSource for VsnapSource {
    fn size(&self) -> u64 {
        self.view.size()
    }

    fn read_only(&self) -> bool {
        self.overlay.is_none()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let Some(ov) = &self.overlay else {
            return self.view.read(buf, offset);
        };
        let map = ov.map.lock().unwrap_or_else(|e| e.into_inner());
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let blk = pos / OVERLAY_BLOCK;
            let written = bit(&map, blk);
            // A run of blocks with the same state.
            let mut run_end = ((blk + 1) * OVERLAY_BLOCK).min(end);
            while run_end < end && bit(&map, run_end / OVERLAY_BLOCK) == written {
                run_end = ((run_end / OVERLAY_BLOCK + 1) * OVERLAY_BLOCK).min(end);
            }
            let dst = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            if written {
                ov.file.read_exact_at(dst, pos)?;
            } else {
                self.view.read(dst, pos)?;
            }
            pos = run_end;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        match &self.overlay {
            // The overlay is temporary by design: FUA needs no sync.
            Some(ov) => self.overlay_write(ov, offset, buf.len() as u64, Some(buf)),
            None => Err(io::Error::from_raw_os_error(libc::EPERM)),
        }
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        _may_trim: bool,
        _fast_only: bool,
    ) -> io::Result<()> {
        match &self.overlay {
            Some(ov) => self.overlay_write(ov, offset, len, None),
            None => Err(io::Error::from_raw_os_error(libc::EPERM)),
        }
    }

    fn trim(&self, _offset: u64, _len: u64) -> io::Result<TrimOutcome> {
        Ok(TrimOutcome::Ignored)
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
        _max: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        let end = offset.saturating_add(len).min(self.view.size());
        if offset < end {
            out.push(Extent {
                len: end - offset,
                flags: 0,
            });
        }
        Ok(())
    }
}

/// Progress of a long copy, reported about once a second and at the end.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes done.
    pub done: u64,
    /// Bytes in total.
    pub total: u64,
    /// Seconds since the start.
    pub elapsed_secs: f64,
}

impl Progress {
    /// One human-readable line: done/total, percent, rate, ETA.
    pub fn line(&self) -> String {
        let mib = |b: u64| b as f64 / 1048576.0;
        let rate = if self.elapsed_secs > 0.0 {
            self.done as f64 / self.elapsed_secs
        } else {
            0.0
        };
        let pct = if self.total > 0 {
            self.done as f64 * 100.0 / self.total as f64
        } else {
            100.0
        };
        let eta = if rate > 0.0 {
            format!("{:.0} s", (self.total - self.done) as f64 / rate)
        } else {
            "-".into()
        };
        format!(
            "{:.1}/{:.1} MiB ({pct:.0}%), {:.1} MiB/s, ETA {eta}",
            mib(self.done),
            mib(self.total),
            rate / 1048576.0
        )
    }
}

/// What a physical snapshot did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MaterializeReport {
    /// The output.
    pub out: PathBuf,
    /// The point (RFC 3339 source time of its last change, and its sequence).
    pub point_time: String,
    /// Sequence number of the point.
    pub point_seq: u64,
    /// Bytes of the volume.
    pub bytes: u64,
    /// Bytes written (the rest are holes in a regular file).
    pub written_bytes: u64,
    /// Seconds it took.
    pub secs: f64,
}

/// Copies the volume at the view's point into `out` with the journal's
/// materialization: a regular file is created (or truncated) and written
/// sparsely, a block device must hold the volume and gets every byte; fsync'ed
/// before returning. Calls `progress` about once a second and at the end.
pub fn materialize(
    view: &PointView,
    out: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<MaterializeReport> {
    let is_dev = std::fs::metadata(out)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if is_dev {
        let dev = filter_nbd::Backing::open(out, true)
            .with_context(|| format!("opening {}", out.display()))?;
        if dev.size() < view.size() {
            bail!(
                "{} has {} bytes, the volume needs {}",
                out.display(),
                dev.size(),
                view.size()
            );
        }
    }
    let f = OpenOptions::new()
        .write(true)
        .create(!is_dev)
        .truncate(false)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("opening {}", out.display()))?;
    let start = Instant::now();
    let mut last = Instant::now();
    let st = view
        .view
        .materialize_to(&f, |done, total| {
            if last.elapsed() >= Duration::from_secs(1) || done == total {
                last = Instant::now();
                progress(Progress {
                    done,
                    total,
                    elapsed_secs: start.elapsed().as_secs_f64(),
                });
            }
        })
        .with_context(|| format!("materializing into {}", out.display()))?;
    Ok(MaterializeReport {
        out: out.to_path_buf(),
        point_time: format_time(view.point().source_time_ns),
        point_seq: view.point().seq,
        bytes: st.bytes,
        written_bytes: st.written_bytes,
        secs: st.elapsed.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_both_forms() {
        assert_eq!(parse_time("0"), Ok(0));
        assert_eq!(parse_time("1795323000"), Ok(1_795_323_000_000_000_000));
        assert_eq!(parse_time("1.5"), Ok(1_500_000_000));
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(
            parse_time("2026-11-22T04:50:00Z"),
            Ok(1_795_323_000_000_000_000)
        );
        assert_eq!(
            parse_time("2026-11-22 04:50:00.25+00:00"),
            Ok(1_795_323_000_250_000_000)
        );
        assert_eq!(
            parse_time("2024-02-29T12:00:00Z"),
            Ok(1_709_208_000_000_000_000)
        );
        for bad in [
            "",
            "yesterday",
            "2026-11-22T04:50:00",
            "2026-11-22T04:50:00+01:00",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-22T24:00:00Z",
            "2026-11-22T04:50:00.1234567891Z",
            "1.2.3",
            "99999999999999999999",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn times_format_back() {
        for s in [
            "2026-11-22T04:50:00Z",
            "2024-02-29T12:00:00.25Z",
            "1970-01-01T00:00:00Z",
        ] {
            assert_eq!(format_time(parse_time(s).unwrap()), s);
        }
    }
}
