//! Retention: the policy, the window it achieves, and pruning.

use crate::apply::{encode_old, UndoEncoder};
use crate::bookmark::atomic_write;
use crate::error::{corrupt, ioe, JournalError, Result};
use crate::fault::FaultPoint;
use crate::format::*;
use crate::fsutil::*;
use crate::segment::{encode_undo_record, undo_bytes, SegFile, Segment, UndoExtent, UndoRec};
use crate::view::{BasePoint, Index};
use crate::{BookmarkKind, TargetVolume, JOURNAL_DIR};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use tracing::warn;

/// One sparse tier: between `from_age_ns` (the end of the previous tier) and
/// `until_age_ns`, keep one point per `every_ns` (the newest point in each interval).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseTier {
    /// Age (now − source time) up to which this tier applies.
    pub until_age_ns: u64,
    /// Keep one point per interval of this length.
    pub every_ns: u64,
}

/// A retention policy. Time-based (`keep_all_ns` + `tiers` + `bookmarks`),
/// space-based (`max_bytes`), or both: whichever triggers first wins — the
/// space limit is always honoured, and when it cuts into what the time policy
/// promises, [`RetentionStatus::alert`] is raised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Keep every point younger than this (`None`: no time limit).
    pub keep_all_ns: Option<u64>,
    /// Sparse tiers after `keep_all_ns`, in increasing `until_age_ns`.
    pub tiers: Vec<SparseTier>,
    /// Keep bookmarks of a kind for this long (age), whatever the tiers say.
    pub bookmarks: Vec<(BookmarkKind, u64)>,
    /// Journal space limit in bytes (`None`: no space limit).
    pub max_bytes: Option<u64>,
}

impl RetentionPolicy {
    /// The age up to which `keep_all_ns` and the tiers promise points (`None`:
    /// no time limit). Bookmark keeps promise only the bookmarks' own points.
    pub fn promised_age_ns(&self) -> Option<u64> {
        let mut a = self.keep_all_ns?;
        for t in &self.tiers {
            a = a.max(t.until_age_ns);
        }
        Some(a)
    }
}

/// The retention window actually available, against the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionStatus {
    /// The policy in force (`None`: keep everything).
    pub policy: Option<RetentionPolicy>,
    /// Source time of the oldest available point.
    pub oldest_time_ns: u64,
    /// Source time of the latest applied point.
    pub latest_time_ns: u64,
    /// `latest − oldest`: the window actually available.
    pub available_window_ns: u64,
    /// Journal bytes now.
    pub journal_bytes: u64,
    /// True when the window is shorter than the policy promises (space limit hit,
    /// or pinned by views / not enough history yet is NOT an alert: only pruning
    /// forced by space is) or the journal exceeds `max_bytes`.
    pub alert: bool,
    /// Why the alert is raised.
    pub alert_reason: Option<String>,
}

impl TargetVolume {
    /// Set the retention policy used by [`TargetVolume::prune`] and reported by the summary.
    pub fn set_retention(&mut self, policy: Option<RetentionPolicy>) {
        self.retention = policy;
    }

    /// The window available now, with the alert flag.
    pub fn retention_status(&self) -> Result<RetentionStatus> {
        let idx = self.index();
        let oldest = idx.oldest_time_ns();
        let latest = idx.applied_time_ns;
        drop(idx);
        let journal_bytes: u64 = self.segments.iter().map(|s| s.len).sum();
        let mut reason = self.retention_alert.clone();
        if let Some(max) = self.retention.as_ref().and_then(|p| p.max_bytes) {
            if journal_bytes > max {
                reason = Some(format!(
                    "journal uses {journal_bytes} bytes > limit {max} (points pinned by live views or needed by promised points)"
                ));
            }
        }
        Ok(RetentionStatus {
            policy: self.retention.clone(),
            oldest_time_ns: oldest,
            latest_time_ns: latest,
            available_window_ns: latest.saturating_sub(oldest),
            journal_bytes,
            alert: reason.is_some(),
            alert_reason: reason,
        })
    }
}

const RETENTION_FILE: &str = "retention";
const RETENTION_TMP: &str = "retention.tmp";
const RETENTION_MAGIC: [u8; 8] = *b"RWRETN01";

/// What one [`TargetVolume::prune`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Source time of the oldest available point after pruning.
    pub oldest_time_ns: u64,
    /// Sequence number at the oldest available point.
    pub oldest_seq: u64,
    /// Segments deleted.
    pub deleted_segments: u64,
    /// Segments rewritten by compaction (sparse tiers).
    pub compacted_segments: u64,
    /// Undo records merged away by compaction.
    pub merged_records: u64,
    /// Bookmarks dropped (older than the oldest available point).
    pub dropped_bookmarks: u64,
    /// Journal bytes before and after.
    pub journal_bytes_before: u64,
    /// Journal bytes after.
    pub journal_bytes_after: u64,
    /// Set when the space limit forced the window below the policy, or could
    /// not be met (pinned by live views).
    pub alert: Option<String>,
}

fn encode_base(b: &BasePoint) -> [u8; 96] {
    let mut x = [0u8; 96];
    x[0..8].copy_from_slice(&RETENTION_MAGIC);
    x[8..12].copy_from_slice(&1u32.to_le_bytes());
    x[12..16].copy_from_slice(&(b.consistent as u32).to_le_bytes());
    x[16..24].copy_from_slice(&b.chunk_id.to_le_bytes());
    x[24..32].copy_from_slice(&b.seq.to_le_bytes());
    x[32..40].copy_from_slice(&b.time_ns.to_le_bytes());
    let h = hash32(&x[..64]);
    x[64..96].copy_from_slice(&h);
    x
}

/// The persisted oldest point (`None` if never pruned).
pub(crate) fn load_base(dir: &Path) -> Result<Option<BasePoint>> {
    let _ = fs::remove_file(dir.join(RETENTION_TMP));
    read_base(dir)
}

/// The persisted oldest point, read-only.
pub(crate) fn read_base(dir: &Path) -> Result<Option<BasePoint>> {
    let p = dir.join(RETENTION_FILE);
    let b = match fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(JournalError::Io {
                context: format!("read {}", p.display()),
                source: e,
            })
        }
    };
    if b.len() != 96 || b[0..8] != RETENTION_MAGIC || hash32(&b[..64]) != b[64..96] {
        return Err(corrupt(&p, 0, "bad retention state file"));
    }
    if rd32(&b, 8) != 1 {
        return Err(corrupt(
            &p,
            0,
            format!("unsupported retention state version {}", rd32(&b, 8)),
        ));
    }
    Ok(Some(BasePoint {
        consistent: rd32(&b, 12) & 1 != 0,
        chunk_id: rd64(&b, 16),
        seq: rd64(&b, 24),
        time_ns: rd64(&b, 32),
    }))
}

/// Remove a base file (re-seed).
pub(crate) fn remove_base(dir: &Path) -> Result<()> {
    match fs::remove_file(dir.join(RETENTION_FILE)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(JournalError::Io {
            context: format!("remove {}", dir.join(RETENTION_FILE).display()),
            source: e,
        }),
    }
}

/// Chunk id of the kept point for each record in the sparse region, and all
/// points of the full region: the set of points compaction must keep.
fn kept_points(idx: &Index, pol: &RetentionPolicy, now: u64, pins: &[u64]) -> (BTreeSet<u64>, u64) {
    let keep_all = pol.keep_all_ns.unwrap_or(u64::MAX);
    let full_from = now.saturating_sub(keep_all);
    let mut k = BTreeSet::new();
    k.insert(idx.base.chunk_id);
    k.extend(pins.iter().copied());
    for b in &idx.bookmarks {
        let age = now.saturating_sub(b.bookmark.source_time_ns);
        if pol
            .bookmarks
            .iter()
            .any(|(kind, keep)| *kind == b.bookmark.kind && age <= *keep)
        {
            k.insert(b.chunk_id);
        }
    }
    // tier of an age: index into pol.tiers, None if younger than keep_all or older than all tiers
    let tier_of = |t: u64| -> Option<usize> {
        let age = now.saturating_sub(t);
        if t >= full_from {
            return None;
        }
        pol.tiers.iter().position(|x| age < x.until_age_ns)
    };
    let n = idx.records.len();
    let mut last_in_full = None;
    for i in 0..n {
        let r = &idx.records[i];
        if r.time_ns >= full_from {
            k.insert(r.chunk_id);
            continue;
        }
        last_in_full = Some(r.chunk_id);
        if !r.consistent_after() {
            continue; // never keep an inconsistent point
        }
        let Some(t) = tier_of(r.time_ns) else {
            continue;
        };
        let every = pol.tiers[t].every_ns.max(1);
        let bucket = r.time_ns / every;
        // keep the last ordered record of its (tier, bucket)
        let later_same = idx
            .records
            .range(i + 1..)
            .find(|x| x.consistent_after())
            .is_some_and(|x| {
                x.time_ns < full_from
                    && tier_of(x.time_ns) == Some(t)
                    && x.time_ns / every == bucket
            });
        if !later_same {
            k.insert(r.chunk_id);
        }
    }
    // the point at full_from itself (after the last record older than it)
    if let Some(c) = last_in_full {
        k.insert(c);
    }
    (k, full_from)
}

impl TargetVolume {
    /// Apply the retention policy at source-clock time `now_ns`:
    ///
    /// 1. **compaction** (sparse tiers): each sealed segment entirely older than
    ///    `keep_all_ns` is rewritten with the undo records between consecutive
    ///    kept points merged (per byte the oldest old data is kept, so the kept
    ///    points stay exact; points inside a merged span are gone). Kept points:
    ///    one per tier interval (the last ordered chunk in it), promised
    ///    bookmarks, live views, the oldest point. Crash-safe: written to
    ///    `<idx>.seg.tmp`, synced, renamed over the original.
    /// 2. **time**: the oldest point advances to the newest point older than the
    ///    policy's whole promise (`keep_all`, tiers, bookmark keeps), never past a
    ///    promised bookmark or a live view.
    /// 3. **space**: while the journal exceeds `max_bytes`, the oldest point
    ///    advances past whole segments (never past a live view); if that cuts
    ///    into the promised window, the report (and [`RetentionStatus`]) carries an alert.
    ///
    /// The new oldest point is made durable (`<dir>/retention`) before any
    /// segment is deleted; an open after a crash finishes the deletion.
    pub fn prune(&mut self, now_ns: u64) -> Result<PruneReport> {
        self.check()?;
        self.check_idle("prune")?;
        let r = self.prune_inner(now_ns);
        self.guard(r)
    }

    fn prune_inner(&mut self, now: u64) -> Result<PruneReport> {
        let before: u64 = self.segments.iter().map(|s| s.len).sum();
        let mut rep = PruneReport {
            journal_bytes_before: before,
            ..PruneReport::default()
        };
        let Some(pol) = self.retention.clone() else {
            let idx = self.index();
            rep.oldest_time_ns = idx.base.time_ns;
            rep.oldest_seq = idx.base.seq;
            rep.journal_bytes_after = before;
            return Ok(rep);
        };
        // The applied state must not live only in segments we may rewrite or delete.
        let c = encode_commit(
            self.applied_through,
            self.applied_seq,
            self.applied_time_ns,
            self.horizon_max,
        );
        {
            let s = self.cur_seg();
            s.sf.file
                .write_all_at(&c, s.len)
                .map_err(ioe(|| format!("append {}", s.sf.path.display())))?;
        }
        let last = self.segments.len() - 1;
        self.segments[last].len += c.len() as u64;
        self.commit_written = self.applied_through;
        self.sync_journal()?;
        // live views: in this process, and pin files of directory views of other processes
        let mut pins: Vec<u64> = self
            .shared
            .pins
            .lock()
            .map_err(|_| JournalError::Poisoned)?
            .values()
            .copied()
            .collect();
        pins.extend(crate::dirview::live_pin_files(&self.dir)?);
        // 1. compaction
        if !pol.tiers.is_empty() {
            let (kept, full_from) = kept_points(&self.index(), &pol, now, &pins);
            for si in 0..self.segments.len().saturating_sub(1) {
                let (merged, did) = self.compact_segment(si, &kept, full_from)?;
                if did {
                    rep.compacted_segments += 1;
                    rep.merged_records += merged;
                }
            }
        }
        // 2. time
        let mut idx_base = self.index().base;
        let min_pin = pins.iter().copied().min();
        let time_cut = {
            let idx = self.index();
            let mut cut = match pol.promised_age_ns() {
                Some(age) => {
                    let h = now.saturating_sub(age);
                    let end = idx.after(idx.applied_through);
                    match idx.records.range(..end).rposition(|r| r.time_ns <= h) {
                        Some(k) => idx.records[k].chunk_id,
                        None => idx.base.chunk_id,
                    }
                }
                None => idx.base.chunk_id,
            };
            for b in &idx.bookmarks {
                let age = now.saturating_sub(b.bookmark.source_time_ns);
                if pol
                    .bookmarks
                    .iter()
                    .any(|(kind, keep)| *kind == b.bookmark.kind && age <= *keep)
                {
                    cut = cut.min(b.chunk_id);
                }
            }
            if let Some(p) = min_pin {
                cut = cut.min(p);
            }
            // never inside a merged span: move back to the start of the span
            let k = idx.after(cut);
            if let Some(r) = idx.records.get(k) {
                if r.merged_from != 0 && r.merged_from <= cut {
                    cut = idx
                        .records
                        .range(..k)
                        .next_back()
                        .map_or(idx.base.chunk_id, |x| x.chunk_id);
                }
            }
            cut.max(idx.base.chunk_id)
        };
        let mut cut = time_cut;
        // 3. space
        if let Some(max) = pol.max_bytes {
            let idx = self.index();
            let mut seg_max: Vec<u64> = vec![0; self.segments.len()];
            let first = self.segments[0].sf.index;
            for r in &idx.records {
                if let Some(m) = seg_max.get_mut((r.seg.index - first) as usize) {
                    *m = (*m).max(r.chunk_id);
                }
            }
            drop(idx);
            let mut used: u64 = self.segments.iter().map(|s| s.len).sum();
            for (i, s) in self
                .segments
                .iter()
                .enumerate()
                .take(self.segments.len() - 1)
            {
                if seg_max[i] <= cut {
                    used -= s.len;
                    continue;
                }
                if used <= max {
                    break;
                }
                if min_pin.is_some_and(|p| p < seg_max[i]) {
                    rep.alert = Some(format!(
                        "journal {used} bytes > limit {max}: a live snapshot view pins older data"
                    ));
                    break;
                }
                cut = seg_max[i];
                used -= s.len;
            }
            if used > max && rep.alert.is_none() {
                rep.alert = Some(format!(
                    "journal {used} bytes > limit {max}: the current segment alone exceeds it"
                ));
            }
            // A space-only policy (no time promise) prunes by space as a matter of course.
            if cut > time_cut && pol.promised_age_ns().is_some() {
                rep.alert = Some(format!(
                    "space limit {max} bytes cut the retention window below the policy"
                ));
            }
        }
        if cut > idx_base.chunk_id {
            let p = self.index().point_at(cut, None)?;
            idx_base = BasePoint {
                chunk_id: cut,
                seq: p.seq,
                time_ns: p.source_time_ns,
                consistent: p.consistent,
            };
            atomic_write(
                &self.dir,
                RETENTION_TMP,
                RETENTION_FILE,
                &encode_base(&idx_base),
            )?;
            self.faults.hit(FaultPoint::PruneAfterBase)?;
            let (segs, bms) = self.apply_base(idx_base, true)?;
            rep.deleted_segments = segs;
            rep.dropped_bookmarks = bms;
        }
        self.retention_alert = rep.alert.clone();
        let segs = self.segments();
        let bms = self.index().bookmarks.clone();
        if let Some(c) = self.catalogue.as_mut() {
            if let Err(e) = c.rebuild(&segs) {
                warn!(error = %e, "catalogue update after prune failed (rebuilt at next open)");
            }
            if let Err(e) = c.rebuild_bookmarks(&bms) {
                warn!(error = %e, "catalogue update after prune failed (rebuilt at next open)");
            }
        }
        rep.oldest_time_ns = idx_base.time_ns;
        rep.oldest_seq = idx_base.seq;
        rep.journal_bytes_after = self.segments.iter().map(|s| s.len).sum();
        Ok(rep)
    }

    /// Install `base` as the oldest point: drop older records from the index and
    /// older bookmarks from the log, delete sealed segments holding only older
    /// records (front first). Idempotent (also run at open to finish a prune).
    /// Returns (segments deleted, bookmarks dropped).
    pub(crate) fn apply_base(&mut self, base: BasePoint, faults: bool) -> Result<(u64, u64)> {
        let shared = self.shared.clone();
        let mut idx = shared.write();
        idx.base = base;
        while idx
            .records
            .front()
            .is_some_and(|r| r.chunk_id <= base.chunk_id)
        {
            idx.pop_front();
        }
        idx.drop_stale();
        let nb = idx.bookmarks.len();
        idx.bookmarks.retain(|b| b.chunk_id >= base.chunk_id);
        let dropped = (nb - idx.bookmarks.len()) as u64;
        let first_kept_seg = idx.records.front().map(|r| r.seg.index);
        let bms = idx.bookmarks.clone();
        drop(idx);
        if dropped > 0 {
            self.rewrite_bookmarks(&bms)?;
        }
        let mut deleted = 0u64;
        while self.segments.len() > 1
            && first_kept_seg.is_none_or(|k| self.segments[0].sf.index < k)
        {
            let s = self.segments.remove(0);
            crate::sidecar::remove(&self.dir.join(JOURNAL_DIR), s.sf.index)?;
            fs::remove_file(&s.sf.path)
                .map_err(ioe(|| format!("remove {}", s.sf.path.display())))?;
            deleted += 1;
            if faults && deleted == 1 {
                self.faults.hit(FaultPoint::PruneMidDelete)?;
            }
        }
        if deleted > 0 {
            fsync_dir(&self.dir.join(JOURNAL_DIR))?;
        }
        let n = self.index().records.len() as u64;
        self.counters.journal_records = n;
        Ok((deleted, dropped))
    }

    /// Rewrite sealed segment `si` with the records between kept points merged.
    /// Returns (records merged away, whether it was rewritten).
    fn compact_segment(
        &mut self,
        si: usize,
        kept: &BTreeSet<u64>,
        full_from: u64,
    ) -> Result<(u64, bool)> {
        let sf = self.segments[si].sf.clone();
        let shared = self.shared.clone();
        let idx = shared.read();
        let recs: Vec<usize> = (0..idx.records.len())
            .filter(|&i| Arc::ptr_eq(&idx.records[i].seg, &sf))
            .collect();
        let (Some(&a), Some(&b)) = (recs.first(), recs.last()) else {
            return Ok((0, false));
        };
        if idx.records[b].time_ns >= full_from || idx.records[a].chunk_id <= idx.base.chunk_id {
            return Ok((0, false));
        }
        // groups split after kept points
        let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
        for i in a..=b {
            if let Some(g) = groups.last_mut() {
                g.push(i);
            }
            if kept.contains(&idx.records[i].chunk_id) && i < b {
                groups.push(Vec::new());
            }
        }
        if groups.iter().all(|g| g.len() < 2) {
            return Ok((0, false));
        }
        let mut out = encode_file_header_v(
            &SEGMENT_MAGIC,
            &FileHeader {
                uuid: self.ident.uuid,
                generation: self.ident.generation,
                index: sf.index,
                created_ns: now_ns(),
            },
            SEGMENT_VERSION_MERGED,
        )
        .to_vec();
        let mut new_recs: Vec<(RecHeader, u64, Vec<UndoExtent>)> = Vec::new();
        let mut merged = 0u64;
        for g in &groups {
            let first = &idx.records[g[0]];
            let lastr = &idx.records[g[g.len() - 1]];
            let rec_off = out.len() as u64;
            let (h, entries) = if g.len() == 1 {
                let mut e = Vec::new();
                for x in &first.extents {
                    e.push((x.offset, x.len, x.enc, read_stored(first, x)?));
                }
                let h = RecHeader {
                    magic: REC_UNDO,
                    flags: if first.merged_from != 0 {
                        FLAG_MERGED
                    } else {
                        0
                    } | if first.inconsistent {
                        FLAG_INCONSISTENT
                    } else {
                        0
                    },
                    id: first.chunk_id,
                    first_seq: first.first_seq,
                    last_seq: first.last_seq,
                    time_ns: first.time_ns,
                    aux: first.merged_from,
                    ..RecHeader::default()
                };
                (h, e)
            } else {
                merged += g.len() as u64 - 1;
                let span_from = if first.merged_from != 0 {
                    first.merged_from
                } else {
                    first.chunk_id
                };
                let mut covered: BTreeMap<u64, u64> = BTreeMap::new();
                let mut e = Vec::new();
                for &i in g {
                    let r = &idx.records[i];
                    for x in &r.extents {
                        let data = undo_bytes(r, x)?;
                        for (s, t) in uncovered(&mut covered, x.offset, x.offset + x.len) {
                            let piece =
                                data[(s - x.offset) as usize..(t - x.offset) as usize].to_vec();
                            let (enc, stored) = encode_old(
                                piece,
                                UndoEncoder::in_slot(
                                    &mut self.undo_encoder,
                                    self.opts.undo_compression,
                                )?,
                            );
                            e.push((s, t - s, enc, stored));
                        }
                    }
                }
                let h = RecHeader {
                    magic: REC_UNDO,
                    flags: FLAG_MERGED
                        | if lastr.inconsistent {
                            FLAG_INCONSISTENT
                        } else {
                            0
                        },
                    id: lastr.chunk_id,
                    first_seq: g
                        .iter()
                        .map(|&i| idx.records[i].first_seq)
                        .find(|s| *s != 0)
                        .unwrap_or(0),
                    last_seq: lastr.last_seq,
                    time_ns: lastr.time_ns,
                    aux: span_from,
                    ..RecHeader::default()
                };
                (h, e)
            };
            // file offsets are positions in `out`, i.e. in the new file
            let ux = encode_undo_record(&mut out, &h, &entries);
            new_recs.push((h, rec_off, ux));
        }
        drop(idx);
        let jd = self.dir.join(JOURNAL_DIR);
        let tmp = jd.join(format!("{:016x}.seg.tmp", sf.index));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(ioe(|| format!("create {}", tmp.display())))?;
        f.write_all_at(&out, 0)
            .and_then(|_| f.sync_data())
            .map_err(ioe(|| format!("write {}", tmp.display())))?;
        self.faults.hit(FaultPoint::CompactAfterWrite)?;
        // The old sidecar describes the old file: gone before the new file takes its name.
        crate::sidecar::remove(&jd, sf.index)?;
        fs::rename(&tmp, &sf.path).map_err(ioe(|| format!("rename {}", tmp.display())))?;
        self.faults.hit(FaultPoint::CompactAfterRename)?;
        fsync_dir(&jd)?;
        let nsf = Arc::new(SegFile {
            index: sf.index,
            path: sf.path.clone(),
            file: f,
        });
        let mut idx = shared.write();
        let recs: Vec<UndoRec> = new_recs
            .into_iter()
            .map(|(h, off, ux)| UndoRec::from_header(&h, nsf.clone(), off, ux))
            .collect();
        let start = idx.records.iter().position(|r| Arc::ptr_eq(&r.seg, &sf));
        if let Some(s) = start {
            let end = s + idx
                .records
                .range(s..)
                .take_while(|r| Arc::ptr_eq(&r.seg, &sf))
                .count();
            let tail: Vec<UndoRec> = idx.records.drain(s..).skip(end - s).collect();
            idx.records.extend(recs);
            idx.records.extend(tail);
            idx.reindex();
        }
        self.counters.journal_records = idx.records.len() as u64;
        drop(idx);
        self.segments[si] = Segment {
            sf: nsf,
            len: out.len() as u64,
        };
        self.seal_sidecar(si)?;
        Ok((merged, true))
    }
}

/// Stored (encoded) bytes of an undo extent, verified against its hash.
fn read_stored(r: &UndoRec, x: &UndoExtent) -> Result<Vec<u8>> {
    let mut b = vec![0u8; x.stored_len as usize];
    r.seg
        .file
        .read_exact_at(&mut b, x.file_off)
        .map_err(ioe(|| format!("read {}", r.seg.path.display())))?;
    if hash32(&b) != x.hash {
        return Err(corrupt(
            &r.seg.path,
            x.file_off,
            "undo payload checksum mismatch",
        ));
    }
    Ok(b)
}

/// The parts of `[s, e)` not in `covered` (disjoint intervals start → end), which
/// are then added to it.
fn uncovered(covered: &mut BTreeMap<u64, u64>, s: u64, e: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut cur = s;
    // intervals that may overlap: the one starting before s, and those starting in [s, e)
    let prev = covered.range(..=s).next_back().map(|(a, b)| (*a, *b));
    let mut list: Vec<(u64, u64)> = prev.into_iter().collect();
    list.extend(covered.range(s + 1..e).map(|(a, b)| (*a, *b)));
    for (a, b) in list {
        if b <= cur {
            continue;
        }
        if a > cur {
            out.push((cur, a.min(e)));
        }
        cur = cur.max(b);
        if cur >= e {
            break;
        }
    }
    if cur < e {
        out.push((cur, e));
    }
    // merge [s, e) into covered
    let mut ns = s;
    let mut ne = e;
    let mut over: Vec<(u64, u64)> = covered
        .range(..s)
        .next_back()
        .filter(|(_, b)| **b >= s)
        .map(|(a, b)| (*a, *b))
        .into_iter()
        .collect();
    over.extend(covered.range(s..=e).map(|(a, b)| (*a, *b)));
    for (a, b) in over {
        ns = ns.min(a);
        ne = ne.max(b);
        covered.remove(&a);
    }
    covered.insert(ns, ne);
    out
}
