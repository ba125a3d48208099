//! Recovery points: what the caller asks for ([`RecoveryPoint`]), how it resolves
//! to a chunk boundary of the journal ([`ResolvedPoint`]), and the summary of
//! what is available ([`RecoveryPoints`]).
//!
//! A resolved point is "the state after chunk `chunk_id`": the replica overlaid
//! with the undo records of every chunk with a larger id. A point is
//! **consistent** when the last chunk at or before it is ordered (carries ring
//! sequence numbers) and not below the consistency horizon: chunks without
//! sequence numbers are resync/bitmap data, applied out of the source's write
//! order, and data read back from the source volume (metadata-mode records,
//! bitmap sweeps) may already show changes with higher sequence numbers
//! (`ChunkIn::horizon_seq`), so the states after them, until every change up to
//! that horizon is applied, are not states the source volume ever had.

use crate::bookmark::{Bookmark, BookmarkKind};
use crate::error::{JournalError, Result};
use crate::view::Index;

/// A recovery point as asked for by an operator or a CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryPoint {
    /// The replica as applied (may be inside a running resync: see [`ResolvedPoint::consistent`]).
    Latest,
    /// The newest bookmark with this name.
    Bookmark(String),
    /// The newest available bookmark with source time ≤ `time_ns` (of `kind`, if given).
    BookmarkAtOrBefore {
        /// Source time, ns since the Unix epoch (UTC).
        time_ns: u64,
        /// Only bookmarks of this kind.
        kind: Option<BookmarkKind>,
    },
    /// The state after the last applied chunk with source time ≤ `ns`.
    Time(u64),
    /// The state after the last applied ordered chunk with `last_seq ≤ s`
    /// (a point inside a coalesced chunk resolves to the boundary before it).
    Seq(u64),
}

/// A recovery point resolved against the journal (cheap: an index lookup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedPoint {
    /// The state after this chunk id (0 = the state when the journal started).
    pub chunk_id: u64,
    /// Highest ring sequence number included.
    pub seq: u64,
    /// Source time of the last chunk included (0 at the journal start).
    pub source_time_ns: u64,
    /// The bookmark this point came from, if any.
    pub bookmark: Option<Bookmark>,
    /// True when the point is a write-order-consistent state of the source
    /// (only `Latest` may resolve to an inconsistent point; the others are refused).
    pub consistent: bool,
    /// Volume size at the time of resolution.
    pub size: u64,
}

/// A bookmark with where it lies in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookmarkInfo {
    /// The bookmark as recorded.
    pub bookmark: Bookmark,
    /// The last chunk id before it in the stream.
    pub chunk_id: u64,
    /// Every chunk before it is applied.
    pub applied: bool,
    /// It can be recovered now (applied, consistent and not pruned).
    pub available: bool,
}

/// Summary of the recovery points a volume offers (`rewind recover list`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryPoints {
    /// The latest applied point.
    pub latest: ResolvedPoint,
    /// Oldest available point: `(source time, seq)`.
    pub oldest_time_ns: u64,
    /// Sequence number at the oldest point.
    pub oldest_seq: u64,
    /// Source-time ranges `(from, to)` inside which every time is a consistent
    /// point (split by inconsistent stretches and compacted spans), oldest first.
    pub consistent_ranges: Vec<(u64, u64)>,
    /// Bookmarks, oldest first.
    pub bookmarks: Vec<BookmarkInfo>,
}

fn merged_away(what: &str, first: u64, last: u64) -> JournalError {
    JournalError::Inconsistent(format!(
        "{what} falls in a span merged by sparse retention (seqs {first}..={last} kept as one; only the point after it is exact)"
    ))
}

fn before_window(idx: &Index, requested: String) -> JournalError {
    JournalError::BeforeWindow {
        requested,
        oldest_time_ns: idx.oldest_time_ns(),
        oldest_seq: idx.base.seq,
    }
}

impl Index {
    /// True while the base is the replica's starting state (nothing pruned yet):
    /// the state before the first applied chunk (e.g. empty before the initial
    /// sync), which is no recovery point by time.
    fn base_is_start(&self) -> bool {
        self.base.chunk_id == 0
    }

    /// Source time of the oldest point offered by time: the base's time after a
    /// prune, else the first applied chunk's source time (never the 0 of the
    /// starting state; 0 only while nothing is applied).
    pub(crate) fn oldest_time_ns(&self) -> u64 {
        if !self.base_is_start() {
            return self.base.time_ns;
        }
        self.records
            .front()
            .filter(|r| r.chunk_id <= self.applied_through)
            .map_or(self.base.time_ns, |r| r.time_ns)
    }

    /// Position in `records` of the first record with chunk id > `cut`.
    pub(crate) fn after(&self, cut: u64) -> usize {
        self.records.partition_point(|r| r.chunk_id <= cut)
    }

    /// Describe the state after chunk `cut` (which must be in the window).
    pub(crate) fn point_at(&self, cut: u64, bookmark: Option<Bookmark>) -> Result<ResolvedPoint> {
        let i = self.after(cut);
        let (seq, time, consistent) = match i.checked_sub(1).map(|k| &self.records[k]) {
            None => (self.base.seq, self.base.time_ns, self.base.consistent),
            Some(r) => {
                let seq = self.records.range(..i).rev().find(|r| r.last_seq != 0);
                (
                    seq.map_or(self.base.seq, |r| r.last_seq),
                    r.time_ns,
                    r.consistent_after(),
                )
            }
        };
        // A merged (compacted) record covers a span of chunks: points strictly inside it are gone.
        if let Some(r) = self.records.get(i) {
            if r.merged_from != 0 && r.merged_from <= cut {
                return Err(JournalError::Inconsistent(format!(
                    "the point after chunk {cut} was merged away by sparse retention (chunks {}..={} kept as one)",
                    r.merged_from, r.chunk_id
                )));
            }
        }
        Ok(ResolvedPoint {
            chunk_id: cut,
            seq,
            source_time_ns: time,
            bookmark,
            consistent,
            size: self.size,
        })
    }

    fn check_applied_window(&self, cut: u64, what: &str) -> Result<()> {
        if cut > self.applied_through {
            return Err(JournalError::PointNotAvailable(format!(
                "{what} is not applied yet (applied through chunk {})",
                self.applied_through
            )));
        }
        if cut < self.base.chunk_id {
            return Err(before_window(self, what.to_string()));
        }
        Ok(())
    }

    fn consistent_or_err(p: ResolvedPoint, what: &str) -> Result<ResolvedPoint> {
        if p.consistent {
            Ok(p)
        } else {
            Err(JournalError::Inconsistent(format!(
                "{what} falls after data applied out of write order (chunk {}: resync or bitmap \
                 data, or data read back from the source volume in metadata mode, not yet \
                 caught up); choose a point in a consistent range (`rewind recover list`)",
                p.chunk_id
            )))
        }
    }

    /// Resolve `rp`. `pending_front_time` is the source time of the oldest
    /// spooled-but-unapplied chunk, when known.
    pub(crate) fn resolve(
        &self,
        rp: &RecoveryPoint,
        pending_front_time: Option<u64>,
    ) -> Result<ResolvedPoint> {
        match rp {
            RecoveryPoint::Latest => self.point_at(self.applied_through, None),
            RecoveryPoint::Seq(s) => {
                let s = *s;
                if s > self.applied_seq {
                    return Err(JournalError::PointNotAvailable(format!(
                        "seq {s} is not applied yet (applied_seq {})",
                        self.applied_seq
                    )));
                }
                let end = self.after(self.applied_through);
                let cut = match self
                    .records
                    .range(..end)
                    .rposition(|r| r.last_seq != 0 && r.last_seq <= s)
                {
                    Some(k) => self.records[k].chunk_id,
                    None if s >= self.base.seq => self.base.chunk_id,
                    None => return Err(before_window(self, format!("seq {s}"))),
                };
                if let Some(m) = self.records.get(self.after(cut)) {
                    if m.merged_from != 0 && m.first_seq != 0 && m.first_seq <= s {
                        return Err(merged_away(&format!("seq {s}"), m.first_seq, m.last_seq));
                    }
                }
                Self::consistent_or_err(self.point_at(cut, None)?, &format!("seq {s}"))
            }
            RecoveryPoint::Time(t) => {
                let t = *t;
                if t < self.oldest_time_ns() {
                    return Err(before_window(self, format!("time {t}")));
                }
                if let Some(p) = pending_front_time {
                    if p <= t {
                        return Err(JournalError::PointNotAvailable(format!(
                            "time {t} is not fully applied yet"
                        )));
                    }
                }
                if t > self.applied_time_ns {
                    return Err(JournalError::InFuture {
                        time_ns: t,
                        latest_time_ns: self.applied_time_ns,
                    });
                }
                let end = self.after(self.applied_through);
                let (cut, cut_time) = match self.records.range(..end).rposition(|r| r.time_ns <= t)
                {
                    Some(k) => (self.records[k].chunk_id, self.records[k].time_ns),
                    // The starting state (before the first applied chunk) is not offered.
                    None if self.base_is_start() => {
                        return Err(before_window(self, format!("time {t}")))
                    }
                    None => (self.base.chunk_id, self.base.time_ns),
                };
                // The chunks of a merged span have times in (cut_time, m.time_ns]; their
                // individual times are gone, so only the kept point itself is exact.
                if let Some(m) = self.records.get(self.after(cut)) {
                    if m.merged_from != 0 && t > cut_time {
                        return Err(JournalError::Inconsistent(format!(
                            "time {t} falls in a span merged by sparse retention; the nearest kept points are at source times {cut_time} and {}",
                            m.time_ns
                        )));
                    }
                }
                Self::consistent_or_err(self.point_at(cut, None)?, &format!("time {t}"))
            }
            RecoveryPoint::Bookmark(name) => {
                let b = self
                    .bookmarks
                    .iter()
                    .rev()
                    .find(|b| &b.bookmark.name == name)
                    .ok_or_else(|| JournalError::UnknownBookmark(name.clone()))?;
                let what = format!("bookmark {name:?}");
                self.check_applied_window(b.chunk_id, &what)?;
                Self::consistent_or_err(self.point_at(b.chunk_id, Some(b.bookmark.clone()))?, &what)
            }
            RecoveryPoint::BookmarkAtOrBefore { time_ns, kind } => {
                let mut older_than_window = false;
                for b in self.bookmarks.iter().rev() {
                    if b.bookmark.source_time_ns > *time_ns
                        || kind.is_some_and(|k| k != b.bookmark.kind)
                        || b.chunk_id > self.applied_through
                    {
                        continue;
                    }
                    if b.chunk_id < self.base.chunk_id {
                        older_than_window = true;
                        break;
                    }
                    match self.point_at(b.chunk_id, Some(b.bookmark.clone())) {
                        Ok(p) if p.consistent => return Ok(p),
                        _ => continue,
                    }
                }
                let what = format!(
                    "bookmark{} at or before time {time_ns}",
                    kind.map(|k| format!(" of kind {k:?}")).unwrap_or_default()
                );
                if older_than_window {
                    Err(before_window(self, what))
                } else {
                    Err(JournalError::UnknownBookmark(what))
                }
            }
        }
    }

    /// Bookmarks with their state.
    pub(crate) fn bookmark_infos(&self) -> Vec<BookmarkInfo> {
        self.bookmarks
            .iter()
            .map(|b| {
                let applied = b.chunk_id <= self.applied_through;
                let available = applied
                    && b.chunk_id >= self.base.chunk_id
                    && self.point_at(b.chunk_id, None).is_ok_and(|p| p.consistent);
                BookmarkInfo {
                    bookmark: b.bookmark.clone(),
                    chunk_id: b.chunk_id,
                    applied,
                    available,
                }
            })
            .collect()
    }

    /// Source-time ranges in which every time is a consistent point.
    pub(crate) fn consistent_ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let end = self.after(self.applied_through);
        // The starting state is not a point by time: ranges start at an applied chunk.
        let mut start: Option<u64> =
            (self.base.consistent && !self.base_is_start()).then_some(self.base.time_ns);
        for r in self.records.range(..end) {
            if r.merged_from != 0 {
                // The span inside a merged record is gone: close the range before it.
                if let Some(s) = start.take() {
                    out.push((s, s.max(r.time_ns.min(self.prev_time(r.chunk_id)))));
                }
            }
            if !r.consistent_after() {
                if let Some(s) = start.take() {
                    out.push((s, s.max(r.time_ns.saturating_sub(1))));
                }
            } else if start.is_none() {
                start = Some(r.time_ns);
            }
        }
        if let Some(s) = start {
            out.push((s, self.applied_time_ns.max(s)));
        }
        out
    }

    fn prev_time(&self, chunk_id: u64) -> u64 {
        let i = self.records.partition_point(|r| r.chunk_id < chunk_id);
        i.checked_sub(1)
            .map_or(self.base.time_ns, |k| self.records[k].time_ns)
    }

    /// The summary of available points.
    pub(crate) fn recovery_points(&self) -> Result<RecoveryPoints> {
        Ok(RecoveryPoints {
            latest: self.point_at(self.applied_through, None)?,
            oldest_time_ns: self.oldest_time_ns(),
            oldest_seq: self.base.seq,
            consistent_ranges: self.consistent_ranges(),
            bookmarks: self.bookmark_infos(),
        })
    }
}
