//! Health history of the replicator and `rewind health-report`, the seed
//! product's daily health report.
//!
//! The replicator observes every pair about ten times a second and appends
//! one [`HistorySample`] per pair per interval (default 60 s) as a JSON line
//! to `<state_dir>/history/YYYY-MM-DD.jsonl` (UTC date of the interval
//! start; format version 1, documented in `docs/admin-guide.md`). Each line
//! is written with a single `write` and the file is `fdatasync`ed, so a
//! crash loses at most the current interval and can leave at most one torn
//! last line, which readers skip (and count). Files older than
//! `history_days` are deleted when a sample is written.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use replicator::pair::{now_ns, PairState};
use serde::{Deserialize, Serialize};

use crate::config::DEFAULT_REPLICATOR_STATE;
use crate::status::PairReport;

/// Version of the history line format.
pub const HISTORY_VERSION: u32 = 1;
/// Subdirectory of the replicator's state directory holding the history.
pub const HISTORY_DIR: &str = "history";

/// One pair over one sampling interval.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HistorySample {
    /// Format version ([`HISTORY_VERSION`]).
    pub v: u32,
    /// Interval start, wall clock (ns since the epoch).
    pub start_ns: u64,
    /// Seconds observed in the interval.
    pub secs: f64,
    /// Volume.
    pub volume: String,
    /// Consistency group, if any.
    pub group: Option<String>,
    /// State at the end of the interval.
    pub state: PairState,
    /// Capture mode at the end of the interval.
    pub capture_mode: String,
    /// RPO threshold in force (s).
    pub rpo_threshold_secs: f64,
    /// Largest RPO seen (s).
    pub rpo_max_secs: f64,
    /// Seconds with the RPO over the threshold.
    pub rpo_over_secs: f64,
    /// Seconds flow controlled (target spool over budget).
    pub flow_controlled_secs: f64,
    /// Seconds paused by the administrator.
    pub paused_secs: f64,
    /// Seconds not connected to the target.
    pub disconnected_secs: f64,
    /// Seconds with the capture in bitmap mode.
    pub bitmap_secs: f64,
    /// Seconds resynchronising (step 1, step 2, resized extent).
    pub resync_secs: f64,
    /// Volume bytes shipped (uncompressed) outside checksum resync passes:
    /// the data changes.
    pub raw_bytes: u64,
    /// Volume bytes shipped by checksum resync passes (Resync Step I,
    /// resized extent): differing blocks, not new changes.
    #[serde(default)]
    pub resync_bytes: u64,
    /// Bytes on the wire (compressed, with framing).
    pub wire_bytes: u64,
    /// Bookmarks (tags) acknowledged by the target.
    pub tags: u64,
}

#[derive(Debug, Default)]
struct Acc {
    s: HistorySample,
    prev: Option<(u64, u64, u64)>,
}

fn delta(cur: u64, prev: u64) -> u64 {
    // A counter that went down was restarted (pair restarted).
    if cur >= prev {
        cur - prev
    } else {
        cur
    }
}

/// Accumulates observations and writes one line per pair per interval.
#[derive(Debug)]
pub struct History {
    dir: PathBuf,
    interval_secs: f64,
    days: u32,
    start_ns: u64,
    acc: BTreeMap<String, Acc>,
}

impl History {
    /// A history under `<state_dir>/history`.
    pub fn new(state_dir: &Path, interval_secs: f64, days: u32) -> History {
        History {
            dir: state_dir.join(HISTORY_DIR),
            interval_secs,
            days,
            start_ns: now_ns(),
            acc: BTreeMap::new(),
        }
    }

    /// Records what the pairs look like now, `dt` seconds after the last call.
    pub fn observe(&mut self, pairs: &[PairReport], threshold: f64, dt: f64) {
        for p in pairs {
            let st = &p.status;
            let a = self.acc.entry(st.volume.clone()).or_default();
            let s = &mut a.s;
            s.volume = st.volume.clone();
            s.group = p.group.clone();
            s.state = st.state;
            s.capture_mode = st.capture_mode.clone();
            s.rpo_threshold_secs = threshold;
            s.secs += dt;
            s.rpo_max_secs = s.rpo_max_secs.max(p.rpo_secs);
            if p.rpo_secs > threshold {
                s.rpo_over_secs += dt;
            }
            match st.state {
                PairState::FlowControlled => s.flow_controlled_secs += dt,
                PairState::Paused => s.paused_secs += dt,
                PairState::ResyncStep1 | PairState::ResyncStep2 | PairState::VolumeResized => {
                    s.resync_secs += dt
                }
                _ => {}
            }
            if !st.connected {
                s.disconnected_secs += dt;
            }
            if st.capture_mode == "Bitmap" && !(st.drained && st.dirty_blocks == 0) {
                s.bitmap_secs += dt;
            }
            let cur = (st.shipped_raw_bytes, st.wire_bytes, st.tags_acked);
            if let Some(prev) = a.prev {
                let raw = delta(cur.0, prev.0);
                if matches!(st.state, PairState::ResyncStep1 | PairState::VolumeResized) {
                    s.resync_bytes += raw;
                } else {
                    s.raw_bytes += raw;
                    s.wire_bytes += delta(cur.1, prev.1);
                }
                s.tags += delta(cur.2, prev.2);
            }
            a.prev = Some(cur);
        }
    }

    /// Writes the interval's samples if the interval is over (or `force`).
    pub fn flush(&mut self, force: bool) -> Result<()> {
        let now = now_ns();
        let elapsed = now.saturating_sub(self.start_ns) as f64 / 1e9;
        if !force && elapsed < self.interval_secs {
            return Ok(());
        }
        let start = self.start_ns;
        self.start_ns = now;
        let mut lines = Vec::new();
        for a in self.acc.values_mut() {
            if a.s.secs <= 0.0 {
                continue;
            }
            let mut s = std::mem::take(&mut a.s);
            s.v = HISTORY_VERSION;
            s.start_ns = start;
            let mut l = serde_json::to_vec(&s)?;
            l.push(b'\n');
            lines.extend_from_slice(&l);
        }
        self.acc.retain(|_, a| a.prev.is_some());
        if lines.is_empty() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let path = self.dir.join(format!("{}.jsonl", utc_date(start)));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.write_all(&lines)
            .and_then(|()| f.sync_data())
            .with_context(|| format!("appending to {}", path.display()))?;
        self.rotate(now);
        Ok(())
    }

    /// Forgets a pair (unprotected).
    pub fn forget(&mut self, volume: &str) {
        self.acc.remove(volume);
    }

    fn rotate(&self, now: u64) {
        let oldest = utc_date(now.saturating_sub(u64::from(self.days) * 86_400 * 1_000_000_000));
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(d) = name.strip_suffix(".jsonl") {
                if d.len() == 10 && d < oldest.as_str() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// `YYYY-MM-DD` (UTC) of a wall-clock time in ns.
pub fn utc_date(ns: u64) -> String {
    let days = (ns / 1_000_000_000 / 86_400) as i64;
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Arguments of `rewind health-report`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    rewind health-report                 # today (UTC), every pair\n  \
    rewind health-report --days 7 --json\n  \
    rewind health-report --volume vol0 --state-dir /var/lib/rewind/replicator\n\n\
Per pair and UTC day, from the history the replicator samples (one line per pair per minute under \
STATE_DIR/history/): data changed without and with compression, RPO threshold and the largest RPO \
seen, hours the RPO was not met, hours flow controlled (target spool over budget), hours paused, \
disconnected and in bitmap mode, and the consistency points (bookmarks) replicated.")]
pub struct HealthArgs {
    /// State directory of `rewind replicator`.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_REPLICATOR_STATE)]
    pub state_dir: PathBuf,
    /// Number of days, ending today (UTC).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=366))]
    pub days: u32,
    /// Only this volume.
    #[arg(long, value_name = "NAME")]
    pub volume: Option<String>,
    /// Also report the retention window (available vs policy, now) from the
    /// target daemon with this state directory (same host).
    #[arg(long, value_name = "DIR")]
    pub target_state_dir: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// One pair on one day.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DayHealth {
    /// UTC date.
    pub date: String,
    /// Volume.
    pub volume: String,
    /// Consistency group.
    pub group: Option<String>,
    /// Hours of that day covered by samples.
    pub hours_observed: f64,
    /// Data changes shipped, uncompressed (bytes).
    pub change_bytes: u64,
    /// The same on the wire, compressed (bytes).
    pub change_bytes_compressed: u64,
    /// Bytes shipped by checksum resync passes (not changes).
    pub resync_bytes: u64,
    /// `change_bytes / change_bytes_compressed`.
    pub compression_ratio: f64,
    /// RPO threshold (s).
    pub rpo_threshold_secs: f64,
    /// Largest RPO (s).
    pub rpo_max_secs: f64,
    /// Hours the RPO was over the threshold.
    pub hours_rpo_not_met: f64,
    /// Hours flow controlled.
    pub hours_flow_controlled: f64,
    /// Hours paused.
    pub hours_paused: f64,
    /// Hours not connected.
    pub hours_disconnected: f64,
    /// Hours in bitmap capture mode.
    pub hours_bitmap_mode: f64,
    /// Hours resynchronising.
    pub hours_resync: f64,
    /// Consistency points (bookmarks) replicated that day.
    pub consistency_points: u64,
    /// Retention window available vs policy: not known to the replicator;
    /// `None` until the target exposes it (see the admin guide).
    pub retention: Option<String>,
    /// `OK`, or what is wrong.
    pub health: Vec<String>,
}

/// The report `rewind health-report --json` prints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    /// Days covered, oldest first.
    pub dates: Vec<String>,
    /// Per pair per day.
    pub days: Vec<DayHealth>,
    /// History lines skipped (torn or unreadable).
    pub skipped_lines: u64,
    /// Retention per volume now, from the target (with `--target-state-dir`).
    #[serde(default)]
    pub retention_now: Vec<VolumeRetention>,
}

/// Retention of one volume at the target, now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeRetention {
    /// Volume.
    pub volume: String,
    /// The figures (`None`: no retention policy at the target, or journal not open).
    pub retention: Option<crate::status::RetentionFigures>,
}

/// Reads the history of `dates` and summarises it per pair and day.
pub fn report(state_dir: &Path, dates: &[String], volume: Option<&str>) -> HealthReport {
    let dir = state_dir.join(HISTORY_DIR);
    let mut rep = HealthReport {
        dates: dates.to_vec(),
        ..HealthReport::default()
    };
    for date in dates {
        let Ok(text) = std::fs::read_to_string(dir.join(format!("{date}.jsonl"))) else {
            continue;
        };
        let mut per: BTreeMap<String, DayHealth> = BTreeMap::new();
        for line in text.lines() {
            let s = match serde_json::from_str::<HistorySample>(line) {
                Ok(s) if s.v == HISTORY_VERSION => s,
                _ => {
                    rep.skipped_lines += 1;
                    continue;
                }
            };
            if volume.is_some_and(|v| v != s.volume) {
                continue;
            }
            let d = per.entry(s.volume.clone()).or_insert_with(|| DayHealth {
                date: date.clone(),
                volume: s.volume.clone(),
                ..DayHealth::default()
            });
            d.group = s.group.clone();
            d.hours_observed += s.secs / 3600.0;
            d.change_bytes += s.raw_bytes;
            d.change_bytes_compressed += s.wire_bytes;
            d.resync_bytes += s.resync_bytes;
            d.rpo_threshold_secs = s.rpo_threshold_secs;
            d.rpo_max_secs = d.rpo_max_secs.max(s.rpo_max_secs);
            d.hours_rpo_not_met += s.rpo_over_secs / 3600.0;
            d.hours_flow_controlled += s.flow_controlled_secs / 3600.0;
            d.hours_paused += s.paused_secs / 3600.0;
            d.hours_disconnected += s.disconnected_secs / 3600.0;
            d.hours_bitmap_mode += s.bitmap_secs / 3600.0;
            d.hours_resync += s.resync_secs / 3600.0;
            d.consistency_points += s.tags;
        }
        for (_, mut d) in per {
            d.compression_ratio = if d.change_bytes_compressed > 0 {
                d.change_bytes as f64 / d.change_bytes_compressed as f64
            } else {
                1.0
            };
            if d.hours_rpo_not_met > 0.0 {
                d.health.push(format!(
                    "RPO not met for {} (max {:.0} s, threshold {:.0} s)",
                    hours(d.hours_rpo_not_met),
                    d.rpo_max_secs,
                    d.rpo_threshold_secs
                ));
            }
            if d.hours_flow_controlled > 0.0 {
                d.health.push(format!(
                    "flow controlled for {}",
                    hours(d.hours_flow_controlled)
                ));
            }
            if d.hours_bitmap_mode > 0.0 {
                d.health
                    .push(format!("bitmap mode for {}", hours(d.hours_bitmap_mode)));
            }
            if d.hours_disconnected > 0.0 {
                d.health
                    .push(format!("not connected for {}", hours(d.hours_disconnected)));
            }
            if d.health.is_empty() {
                d.health.push("OK".into());
            }
            rep.days.push(d);
        }
    }
    rep
}

fn hours(h: f64) -> String {
    if h >= 1.0 {
        format!("{h:.1} h")
    } else if h * 60.0 >= 1.0 {
        format!("{:.1} min", h * 60.0)
    } else {
        format!("{:.0} s", h * 3600.0)
    }
}

/// Runs `rewind health-report`.
pub fn run(args: HealthArgs) -> Result<()> {
    let dir = args.state_dir.join(HISTORY_DIR);
    if !dir.is_dir() {
        bail!(
            "no health history in {} (is `rewind replicator` running with --state-dir {}?)",
            dir.display(),
            args.state_dir.display()
        );
    }
    let now = now_ns();
    let dates: Vec<String> = (0..args.days)
        .rev()
        .map(|d| utc_date(now.saturating_sub(u64::from(d) * 86_400 * 1_000_000_000)))
        .collect();
    let mut rep = report(&args.state_dir, &dates, args.volume.as_deref());
    if let Some(t) = &args.target_state_dir {
        let st: crate::status::TargetStatusFile = crate::status::read_status(t)?;
        rep.retention_now = st
            .volumes
            .into_iter()
            .filter(|v| args.volume.as_ref().is_none_or(|n| *n == v.name))
            .map(|v| VolumeRetention {
                volume: v.name,
                retention: v.retention,
            })
            .collect();
        for d in &mut rep.days {
            if let Some(r) = rep
                .retention_now
                .iter()
                .find(|r| r.volume == d.volume)
                .and_then(|r| r.retention.as_ref())
            {
                d.retention = Some(format!("now: {}", crate::status::retention_line(r)));
                if let Some(a) = &r.alert {
                    d.health.retain(|h| h != "OK");
                    d.health.push(format!("retention shorter than policy: {a}"));
                }
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
        return Ok(());
    }
    print!("{}", render(&rep));
    Ok(())
}

/// The human-readable report.
pub fn render(rep: &HealthReport) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "rewind health report, {} to {} (UTC)",
        rep.dates.first().map_or("?", String::as_str),
        rep.dates.last().map_or("?", String::as_str)
    );
    if rep.days.is_empty() {
        let _ = writeln!(o, "\nno samples in that period");
    }
    for d in &rep.days {
        let _ = writeln!(
            o,
            "\n{} {}{} (observed {})",
            d.date,
            d.volume,
            d.group
                .as_ref()
                .map_or(String::new(), |g| format!(" [group {g}]")),
            hours(d.hours_observed)
        );
        let _ = writeln!(
            o,
            "  data changes        {} uncompressed, {} compressed (ratio {:.2})",
            crate::status::human_bytes(d.change_bytes),
            crate::status::human_bytes(d.change_bytes_compressed),
            d.compression_ratio
        );
        let _ = writeln!(
            o,
            "  RPO                 threshold {:.0} s, max {:.1} s, not met for {}",
            d.rpo_threshold_secs,
            d.rpo_max_secs,
            hours(d.hours_rpo_not_met)
        );
        let _ = writeln!(
            o,
            "  flow controlled     {}",
            hours(d.hours_flow_controlled)
        );
        let _ = writeln!(
            o,
            "  paused / offline    {} / {}",
            hours(d.hours_paused),
            hours(d.hours_disconnected)
        );
        let _ = writeln!(
            o,
            "  bitmap mode         {}; resync {}",
            hours(d.hours_bitmap_mode),
            hours(d.hours_resync)
        );
        if d.resync_bytes > 0 {
            let _ = writeln!(
                o,
                "  resync traffic      {} of differing blocks",
                crate::status::human_bytes(d.resync_bytes)
            );
        }
        let _ = writeln!(o, "  consistency points  {}", d.consistency_points);
        let _ = writeln!(
            o,
            "  retention           {}",
            d.retention
                .as_deref()
                .unwrap_or("not known here (give --target-state-dir on the target host, or see cdpcli --showsummary there)")
        );
        let _ = writeln!(o, "  health              {}", d.health.join("; "));
    }
    if rep.skipped_lines > 0 {
        let _ = writeln!(
            o,
            "\n({} unreadable history line(s) skipped)",
            rep.skipped_lines
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_date(0), "1970-01-01");
        assert_eq!(utc_date(951_782_400 * 1_000_000_000), "2000-02-29");
        assert_eq!(utc_date(1_795_000_000 * 1_000_000_000), "2026-11-18");
    }

    #[test]
    fn samples_roundtrip_and_summarise() {
        let d = tempfile::tempdir().unwrap();
        let mut h = History::new(d.path(), 3600.0, 2);
        let mut p = PairReport::default();
        p.status.volume = "vol0".into();
        p.status.connected = true;
        p.status.state = PairState::DifferentialSync;
        p.rpo_secs = 1.0;
        h.observe(std::slice::from_ref(&p), 10.0, 0.5);
        p.status.shipped_raw_bytes = 4000;
        p.status.wire_bytes = 1000;
        p.status.tags_acked = 2;
        p.status.state = PairState::FlowControlled;
        p.rpo_secs = 30.0;
        h.observe(std::slice::from_ref(&p), 10.0, 7.2);
        h.flush(true).unwrap();
        // A torn line is skipped, not fatal.
        let today = utc_date(now_ns());
        let f = d.path().join(HISTORY_DIR).join(format!("{today}.jsonl"));
        let mut file = std::fs::OpenOptions::new().append(true).open(&f).unwrap();
        file.write_all(b"{\"v\":1,\"start").unwrap();
        let r = report(d.path(), &[today], None);
        assert_eq!(r.skipped_lines, 1);
        assert_eq!(r.days.len(), 1);
        let day = &r.days[0];
        assert_eq!(day.change_bytes, 4000);
        assert_eq!(day.change_bytes_compressed, 1000);
        assert!((day.compression_ratio - 4.0).abs() < 1e-9);
        assert_eq!(day.consistency_points, 2);
        assert!((day.hours_rpo_not_met * 3600.0 - 7.2).abs() < 1e-6);
        assert!((day.hours_flow_controlled * 3600.0 - 7.2).abs() < 1e-6);
        assert!((day.rpo_max_secs - 30.0).abs() < 1e-9);
        assert!(day.health.iter().any(|h| h.contains("RPO not met")));
    }
}
