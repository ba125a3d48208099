//! Virtual snapshots: read views of the volume at a recovery point, and
//! materialization of a view to a file or device.
//!
//! # The shared index and why views stay correct while apply continues
//!
//! The undo records, the applied state and the bookmarks live in an [`Index`]
//! behind an `RwLock`, shared (`Arc`) by the [`TargetVolume`] and its views.
//! A view at point P reads the replica and overlays the undo records of chunks
//! newer than P, oldest winning per byte. Apply does, per batch: (1) append the
//! undo records to the segment and fdatasync, (2) **insert them into the index
//! under the write lock**, (3) write the replica. A view read takes the **read
//! lock, then reads the replica, then overlays, then releases**. So for any
//! batch B, either B's records were inserted before the view took the lock (then
//! they are overlaid, and they hold the bytes from before B whatever the replica
//! read saw), or the view's lock is held across the whole read, and B's step (2),
//! hence step (3), has not started: the replica read cannot see B's data. In both
//! cases every byte equals the state at P. A read is split into pieces of at
//! most [`VIEW_LOCK_PIECE`] bytes so apply is never blocked for long.
//!
//! A live view **pins** its point: retention never prunes records a view needs
//! (newer than its point, see `retention.rs`), and rollback refuses while views
//! exist.

use crate::error::{ioe, JournalError, Result};
use crate::point::{RecoveryPoint, RecoveryPoints, ResolvedPoint};
use crate::segment::{undo_bytes, UndoRec};
use crate::{bookmark::StoredBookmark, Bookmark, Point, TargetVolume};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

/// Largest piece of a view read done under one hold of the index read lock.
pub const VIEW_LOCK_PIECE: usize = 1 << 20;

/// The oldest point still available: the state after chunk `chunk_id`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BasePoint {
    pub(crate) chunk_id: u64,
    pub(crate) seq: u64,
    pub(crate) time_ns: u64,
    pub(crate) consistent: bool,
}

/// Everything a point resolution or a view read needs.
pub(crate) struct Index {
    /// Undo records in chunk id order (= apply order).
    pub(crate) records: VecDeque<UndoRec>,
    pub(crate) applied_through: u64,
    pub(crate) applied_seq: u64,
    pub(crate) applied_time_ns: u64,
    pub(crate) base: BasePoint,
    /// Bookmarks ordered by position.
    pub(crate) bookmarks: Vec<StoredBookmark>,
    pub(crate) size: u64,
    /// Spatial index of every undo extent: (volume offset, chunk id, extent
    /// number), one collection per length class ([`LEN_CLASSES`]): the extents
    /// of class `c` overlapping `[o, e)` start in `[o − LEN_CLASSES[c], e)`, so a
    /// small read scans only nearby entries even when large extents exist.
    /// Each class is a sorted vector built in bulk by [`Index::reindex`] (at open:
    /// a sort is far cheaper than 10^6 tree inserts) plus a tree of the entries
    /// pushed since. Removal ([`Index::pop_front`]) is lazy in the vector: an entry
    /// whose chunk has no record any more is skipped by readers (pruned chunk ids
    /// are never reused, and all of them are ≤ the base point, hence ≤ any
    /// view's point) and dropped by [`Index::drop_stale`].
    pub(crate) by_offset: [BTreeSet<(u64, u64, u32)>; 3],
    /// The bulk-built part of the spatial index (see `by_offset`), sorted.
    pub(crate) frozen: [Vec<(u64, u64, u32)>; 3],
}

/// Upper bounds of the extent length classes of the spatial index.
pub(crate) const LEN_CLASSES: [u64; 3] = [4096, 64 << 10, crate::UNDO_PIECE];

fn len_class(len: u64) -> usize {
    LEN_CLASSES.iter().position(|m| len <= *m).unwrap_or(2)
}

impl Index {
    /// Append a record (chunk ids increase) and index its extents.
    pub(crate) fn push(&mut self, r: UndoRec) {
        for (i, x) in r.extents.iter().enumerate() {
            self.by_offset[len_class(x.len)].insert((x.offset, r.chunk_id, i as u32));
        }
        self.records.push_back(r);
    }

    /// Index the extents of `records[first..]` (appended without [`Index::push`]).
    pub(crate) fn index_from(&mut self, first: usize) {
        for r in self.records.range(first..) {
            for (i, x) in r.extents.iter().enumerate() {
                self.by_offset[len_class(x.len)].insert((x.offset, r.chunk_id, i as u32));
            }
        }
    }

    /// Remove the oldest record (its entries in `frozen` stay until [`Index::drop_stale`]).
    pub(crate) fn pop_front(&mut self) -> Option<UndoRec> {
        let r = self.records.pop_front()?;
        for (i, x) in r.extents.iter().enumerate() {
            self.by_offset[len_class(x.len)].remove(&(x.offset, r.chunk_id, i as u32));
        }
        Some(r)
    }

    /// Drop the `frozen` entries of records no longer in the index (after pops).
    pub(crate) fn drop_stale(&mut self) {
        let first = self.records.front().map_or(u64::MAX, |r| r.chunk_id);
        for v in &mut self.frozen {
            v.retain(|e| e.1 >= first);
        }
    }

    /// Rebuild the spatial index from `records` (at open, after a bulk change).
    pub(crate) fn reindex(&mut self) {
        for s in &mut self.by_offset {
            s.clear();
        }
        let mut v: [Vec<(u64, u64, u32)>; 3] = Default::default();
        for r in &self.records {
            for (i, x) in r.extents.iter().enumerate() {
                v[len_class(x.len)].push((x.offset, r.chunk_id, i as u32));
            }
        }
        for c in &mut v {
            sort_by_offset(c);
        }
        self.frozen = v;
    }

    fn record(&self, chunk_id: u64) -> Option<&UndoRec> {
        let i = self.records.partition_point(|r| r.chunk_id < chunk_id);
        self.records.get(i).filter(|r| r.chunk_id == chunk_id)
    }
}

/// Sort spatial index entries by volume offset (the only order range queries
/// need; overlay orders its hits itself): an LSD radix sort on the offset bits
/// that vary (offsets are usually sector aligned), 11 bits per pass — at 10^6
/// entries several times faster than a comparison sort.
pub(crate) fn sort_by_offset(v: &mut Vec<(u64, u64, u32)>) {
    if v.len() < 1 << 12 {
        v.sort_unstable_by_key(|e| e.0);
        return;
    }
    let (mut or, mut max) = (0u64, 0u64);
    for e in v.iter() {
        or |= e.0;
        max = max.max(e.0);
    }
    let mut shift = if or == 0 { 64 } else { or.trailing_zeros() };
    let top = 64 - max.leading_zeros();
    let mut tmp = vec![(0u64, 0u64, 0u32); v.len()];
    while shift < top {
        let mut pos = [0usize; 2048];
        for e in v.iter() {
            pos[((e.0 >> shift) & 2047) as usize] += 1;
        }
        let mut sum = 0;
        for c in pos.iter_mut() {
            let n = *c;
            *c = sum;
            sum += n;
        }
        for e in v.iter() {
            let b = ((e.0 >> shift) & 2047) as usize;
            tmp[pos[b]] = *e;
            pos[b] += 1;
        }
        std::mem::swap(v, &mut tmp);
        shift += 11;
    }
}

#[cfg(test)]
mod tests {
    use super::sort_by_offset;

    #[test]
    fn radix_sort_orders_by_offset() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for (n, mask, align) in [
            (10_000usize, u64::MAX, 0u32),
            (50_000, (1 << 26) - 1, 9),
            (5_000, 7, 0),
            (100, u64::MAX, 3),
        ] {
            let mut v: Vec<(u64, u64, u32)> = (0..n)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ((x & mask) >> align << align, i as u64, i as u32)
                })
                .collect();
            let mut want = v.clone();
            want.sort_by_key(|e| e.0);
            sort_by_offset(&mut v);
            assert!(v.windows(2).all(|w| w[0].0 <= w[1].0));
            let mut a = v.clone();
            a.sort();
            want.sort();
            assert_eq!(a, want);
        }
    }
}

/// State shared by a [`TargetVolume`] and its [`SnapshotView`]s.
pub(crate) struct Shared {
    pub(crate) index: RwLock<Index>,
    /// A read-only descriptor of the replica.
    pub(crate) replica: File,
    pub(crate) replica_path: PathBuf,
    /// Live views: pin id → chunk id of the view's point.
    pub(crate) pins: Mutex<BTreeMap<u64, u64>>,
    pub(crate) next_pin: AtomicU64,
}

impl Shared {
    pub(crate) fn new(replica_path: &Path, size: u64) -> Result<Shared> {
        let replica = File::open(replica_path)
            .map_err(ioe(|| format!("open replica {}", replica_path.display())))?;
        crate::fsutil::no_readahead(&replica, replica_path);
        Ok(Shared {
            index: RwLock::new(Index {
                records: VecDeque::new(),
                applied_through: 0,
                applied_seq: 0,
                applied_time_ns: 0,
                base: BasePoint {
                    consistent: true,
                    ..BasePoint::default()
                },
                bookmarks: Vec::new(),
                size,
                by_offset: Default::default(),
                frozen: Default::default(),
            }),
            replica,
            replica_path: replica_path.to_path_buf(),
            pins: Mutex::new(BTreeMap::new()),
            next_pin: AtomicU64::new(1),
        })
    }

    /// The index for reading. A panic elsewhere never leaves it half-updated
    /// (updates are plain pushes/assignments), so a poisoned lock is recovered.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The index for updating (see [`Shared::read`]).
    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn live_views(&self) -> Result<usize> {
        Ok(self.pins.lock().map_err(|_| JournalError::Poisoned)?.len())
    }

    /// Read `buf.len()` bytes at `offset` as of the state after chunk `cut`
    /// (see the module documentation for the locking argument).
    pub(crate) fn read_point(&self, cut: u64, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(VIEW_LOCK_PIECE);
            let o = offset + done as u64;
            let piece = &mut buf[done..done + n];
            let idx = self.read();
            self.replica.read_exact_at(piece, o).map_err(ioe(|| {
                format!("read replica {}", self.replica_path.display())
            }))?;
            overlay(&idx, cut, piece, o)?;
            drop(idx);
            done += n;
        }
        Ok(())
    }
}

/// Overlay onto `buf` (volume bytes at `offset`) the undo data of the records
/// newer than chunk `cut`: for each byte, the **oldest** such record touching it
/// holds the byte as it was at the point (within a record, the first extent
/// touching it: a chunk's extents apply in order). Candidates come from the
/// spatial index and are taken oldest first; an extent is decoded (and its
/// blake3 verified) only if it still covers a byte no older extent has filled,
/// so a read costs one decode per distinct old piece, not one per record.
fn overlay(idx: &Index, cut: u64, buf: &mut [u8], offset: u64) -> Result<()> {
    let end = offset + buf.len() as u64;
    let mut hits: Vec<(u64, u32)> = Vec::new();
    for ((set, frozen), maxlen) in idx.by_offset.iter().zip(&idx.frozen).zip(LEN_CLASSES) {
        let lo = offset.saturating_sub(maxlen);
        hits.extend(
            set.range((lo, 0, 0)..(end, 0, 0))
                .filter(|(_, c, _)| *c > cut)
                .map(|(_, c, i)| (*c, *i)),
        );
        let a = frozen.partition_point(|e| e.0 < lo);
        let b = frozen.partition_point(|e| e.0 < end);
        hits.extend(
            frozen[a..b]
                .iter()
                .filter(|(_, c, _)| *c > cut)
                .map(|(_, c, i)| (*c, *i)),
        );
    }
    hits.sort_unstable();
    // filled[k] = (start, end) of byte ranges already taken, sorted, disjoint
    let mut filled: Vec<(u64, u64)> = Vec::new();
    for (c, i) in hits {
        let Some(r) = idx.record(c) else { continue };
        let Some(x) = r.extents.get(i as usize) else {
            continue;
        };
        let (xs, xe) = (x.offset.max(offset), (x.offset + x.len).min(end));
        if xs >= xe {
            continue;
        }
        let gaps = gaps_in(&filled, xs, xe);
        if gaps.is_empty() {
            continue;
        }
        let old = undo_bytes(r, x)?;
        for (s, e) in gaps {
            buf[(s - offset) as usize..(e - offset) as usize]
                .copy_from_slice(&old[(s - x.offset) as usize..(e - x.offset) as usize]);
        }
        fill(&mut filled, xs, xe);
    }
    Ok(())
}

/// Sub-ranges of `[s, e)` not covered by `filled` (sorted, disjoint).
fn gaps_in(filled: &[(u64, u64)], s: u64, e: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut cur = s;
    let k = filled.partition_point(|f| f.1 <= s);
    for &(a, b) in &filled[k..] {
        if a >= e {
            break;
        }
        if a > cur {
            out.push((cur, a));
        }
        cur = cur.max(b);
        if cur >= e {
            break;
        }
    }
    if cur < e {
        out.push((cur, e));
    }
    out
}

/// Add `[s, e)` to `filled`, keeping it sorted and disjoint (merging touching ranges).
fn fill(filled: &mut Vec<(u64, u64)>, s: u64, e: u64) {
    let lo = filled.partition_point(|f| f.1 < s);
    let hi = filled.partition_point(|f| f.0 <= e);
    let (mut ns, mut ne) = (s, e);
    if lo < hi {
        ns = ns.min(filled[lo].0);
        ne = ne.max(filled[hi - 1].1);
    }
    filled.splice(lo..hi, [(ns, ne)]);
}

/// A read-only view of the volume at a recovery point ("virtual snapshot").
///
/// Creating one is an index lookup (no data is copied). It is `Send + Sync`:
/// serve reads from many threads while replication keeps applying to the same
/// replica; every read returns exactly the bytes of the volume at the point
/// (module docs). While it lives, retention keeps what it needs and rollback is
/// refused. Dropping it releases the pin.
pub struct SnapshotView {
    shared: Arc<Shared>,
    point: ResolvedPoint,
    /// In-process pin id (0: a directory view, pinned by `pin_file`).
    pin: u64,
    /// Directory views: the scan position for refreshing the private index.
    tail: Option<Mutex<crate::dirview::Tail>>,
    _pin_file: Option<crate::dirview::PinFile>,
}

/// Statistics of a materialization.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaterializeStats {
    /// Volume bytes produced.
    pub bytes: u64,
    /// Bytes actually written (non-zero data, or everything on a device).
    pub written_bytes: u64,
    /// Bytes left as holes (all-zero blocks of a regular-file destination).
    pub sparse_bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Unit of materialization reads and of hole detection.
const MAT_BLOCK: usize = 4 << 20;
const HOLE_GRAIN: usize = 64 << 10;

impl SnapshotView {
    fn new(shared: Arc<Shared>, point: ResolvedPoint) -> Result<SnapshotView> {
        let pin = shared.next_pin.fetch_add(1, Ordering::Relaxed);
        shared
            .pins
            .lock()
            .map_err(|_| JournalError::Poisoned)?
            .insert(pin, point.chunk_id);
        Ok(SnapshotView {
            shared,
            point,
            pin,
            tail: None,
            _pin_file: None,
        })
    }

    pub(crate) fn with_tail(
        shared: Arc<Shared>,
        point: ResolvedPoint,
        tail: Mutex<crate::dirview::Tail>,
        pin_file: crate::dirview::PinFile,
    ) -> Result<SnapshotView> {
        Ok(SnapshotView {
            shared,
            point,
            pin: 0,
            tail: Some(tail),
            _pin_file: Some(pin_file),
        })
    }

    /// Directory view read: replica first, then refresh the index, then overlay
    /// (see `dirview.rs` for why this order is exact).
    fn read_dir_view(
        &self,
        tail: &Mutex<crate::dirview::Tail>,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(VIEW_LOCK_PIECE);
            let o = offset + done as u64;
            let piece = &mut buf[done..done + n];
            self.shared
                .replica
                .read_exact_at(piece, o)
                .map_err(ioe(|| {
                    format!("read replica {}", self.shared.replica_path.display())
                }))?;
            {
                let mut t = tail.lock().map_err(|_| JournalError::Poisoned)?;
                if t.has_news() {
                    let mut idx = self.shared.write();
                    t.refresh(&mut idx)?;
                }
            }
            overlay(&self.shared.read(), self.point.chunk_id, piece, o)?;
            done += n;
        }
        Ok(())
    }

    /// How a directory view ([`SnapshotView::open_dir`]) loaded the journal
    /// so far: segments from index sidecars, scanned, sidecars rejected. All
    /// zero for a view of a volume open in this process.
    pub fn index_load(&self) -> crate::IndexLoad {
        match &self.tail {
            Some(t) => t.lock().map(|t| t.load).unwrap_or_default(),
            None => crate::IndexLoad::default(),
        }
    }

    /// The point this view shows.
    pub fn point(&self) -> &ResolvedPoint {
        &self.point
    }

    /// Volume size of the view in bytes.
    pub fn size(&self) -> u64 {
        self.point.size
    }

    /// Fill `buf` with the volume's bytes at `offset` as they were at the point.
    /// Errors (never wrong data): `OutOfRange`, `Corrupt` undo data, I/O.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > self.point.size) {
            return Err(JournalError::OutOfRange {
                offset,
                len,
                size: self.point.size,
            });
        }
        match &self.tail {
            Some(t) => self.read_dir_view(t, buf, offset),
            None => self.shared.read_point(self.point.chunk_id, buf, offset),
        }
    }

    /// Write the whole volume at the point to `dest` (created if missing). A
    /// regular file is truncated and written sparsely (all-zero 64 KiB blocks
    /// become holes); a block device gets every byte. fsync'ed before `Ok`.
    /// `progress(done, total)` is called after every 4 MiB.
    pub fn materialize(
        &self,
        dest: &Path,
        progress: impl FnMut(u64, u64),
    ) -> Result<MaterializeStats> {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(dest)
            .map_err(ioe(|| format!("open {}", dest.display())))?;
        self.materialize_to(&f, progress)
    }

    /// [`SnapshotView::materialize`] into an open file or device.
    pub fn materialize_to(
        &self,
        dest: &File,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<MaterializeStats> {
        let t0 = Instant::now();
        let md = dest.metadata().map_err(ioe(|| "stat destination".into()))?;
        let rmd = self
            .shared
            .replica
            .metadata()
            .map_err(ioe(|| "stat replica".into()))?;
        {
            use std::os::unix::fs::MetadataExt;
            if md.dev() == rmd.dev() && md.ino() == rmd.ino() {
                return Err(JournalError::Invalid(
                    "materialize destination is the replica itself (use rollback_to)".into(),
                ));
            }
        }
        let is_dev = md.file_type().is_block_device();
        let size = self.point.size;
        if !is_dev {
            dest.set_len(0)
                .and_then(|_| dest.set_len(size))
                .map_err(ioe(|| "size destination".into()))?;
        }
        let mut st = MaterializeStats {
            bytes: size,
            ..MaterializeStats::default()
        };
        let mut buf = vec![0u8; MAT_BLOCK.min(size as usize).max(1)];
        let mut o = 0u64;
        while o < size {
            let n = (size - o).min(buf.len() as u64) as usize;
            self.read_at(&mut buf[..n], o)?;
            if is_dev {
                dest.write_all_at(&buf[..n], o)
                    .map_err(ioe(|| "write destination".into()))?;
                st.written_bytes += n as u64;
            } else {
                let mut k = 0;
                while k < n {
                    let m = (n - k).min(HOLE_GRAIN);
                    let piece = &buf[k..k + m];
                    if crate::fsutil::is_zero(piece) {
                        st.sparse_bytes += m as u64;
                    } else {
                        dest.write_all_at(piece, o + k as u64)
                            .map_err(ioe(|| "write destination".into()))?;
                        st.written_bytes += m as u64;
                    }
                    k += m;
                }
            }
            o += n as u64;
            progress(o, size);
        }
        dest.sync_all()
            .map_err(ioe(|| "fsync destination".into()))?;
        st.elapsed = t0.elapsed();
        Ok(st)
    }
}

impl Drop for SnapshotView {
    fn drop(&mut self) {
        if self.pin == 0 {
            return;
        }
        if let Ok(mut p) = self.shared.pins.lock() {
            p.remove(&self.pin);
        }
    }
}

/// The newest bookmark present (by uuid) and recoverable on every volume, e.g.
/// a group bookmark; `None` if there is none. Errors only on a poisoned handle.
pub fn latest_common_bookmark(volumes: &[&TargetVolume]) -> Result<Option<Bookmark>> {
    let Some((first, rest)) = volumes.split_first() else {
        return Ok(None);
    };
    let mut sets = Vec::new();
    for v in rest {
        let s: std::collections::HashSet<[u8; 16]> = v
            .bookmarks()?
            .into_iter()
            .filter(|b| b.available)
            .map(|b| b.bookmark.uuid)
            .collect();
        sets.push(s);
    }
    let mut best: Option<Bookmark> = None;
    for b in first.bookmarks()?.into_iter().filter(|b| b.available) {
        if sets.iter().all(|s| s.contains(&b.bookmark.uuid))
            && best
                .as_ref()
                .is_none_or(|x| b.bookmark.source_time_ns >= x.source_time_ns)
        {
            best = Some(b.bookmark);
        }
    }
    Ok(best)
}

impl TargetVolume {
    pub(crate) fn index(&self) -> RwLockReadGuard<'_, Index> {
        self.shared.read()
    }

    pub(crate) fn index_mut(&self) -> RwLockWriteGuard<'_, Index> {
        self.shared.write()
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_none_or(|e| e > self.ident.size) {
            return Err(JournalError::OutOfRange {
                offset,
                len,
                size: self.ident.size,
            });
        }
        Ok(())
    }

    /// Resolve a recovery point (an index lookup). Errors: `UnknownBookmark`,
    /// `BeforeWindow`, `InFuture`, `Inconsistent`, `PointNotAvailable` (not yet applied).
    pub fn resolve(&self, rp: &RecoveryPoint) -> Result<ResolvedPoint> {
        let front = self.pending.front().map(|p| p.time_ns);
        self.index().resolve(rp, front)
    }

    /// Summary of the available points (latest, window, consistent ranges, bookmarks).
    pub fn recovery_points(&self) -> Result<RecoveryPoints> {
        self.index().recovery_points()
    }

    /// Open a virtual snapshot at `rp` (see [`SnapshotView`]).
    pub fn snapshot(&self, rp: &RecoveryPoint) -> Result<SnapshotView> {
        let p = self.resolve(rp)?;
        SnapshotView::new(self.shared.clone(), p)
    }

    /// Open a virtual snapshot at an already resolved point (from [`TargetVolume::resolve`]);
    /// fails with `BeforeWindow` if pruning removed it meanwhile.
    pub fn snapshot_at(&self, p: &ResolvedPoint) -> Result<SnapshotView> {
        let idx = self.index();
        if p.chunk_id < idx.base.chunk_id || p.chunk_id > idx.applied_through {
            return Err(JournalError::BeforeWindow {
                requested: format!("chunk {}", p.chunk_id),
                oldest_time_ns: idx.base.time_ns,
                oldest_seq: idx.base.seq,
            });
        }
        drop(idx);
        SnapshotView::new(self.shared.clone(), p.clone())
    }

    /// Read `len` bytes at `offset` as they were at `point` (see [`SnapshotView::read_at`]).
    pub fn read_at_point(&self, point: Point, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.check_range(offset, len)?;
        let rp = match point {
            Point::Latest => RecoveryPoint::Latest,
            Point::Seq(s) => RecoveryPoint::Seq(s),
            Point::Time(t) => RecoveryPoint::Time(t),
        };
        let p = self.resolve(&rp)?;
        let mut buf = vec![0u8; len as usize];
        self.shared.read_point(p.chunk_id, &mut buf, offset)?;
        Ok(buf)
    }

    /// Verify the journal (scrub): every segment is scanned (record headers,
    /// extent tables and their checksums; this also catches damage to a sealed
    /// segment's records that open did not read because it loaded them from the
    /// segment's index sidecar) and must agree with the in-memory index, then
    /// every undo payload is read and checked. Returns the number of extents checked.
    pub fn verify_journal(&self) -> Result<u64> {
        let segs: Vec<_> = self
            .segments
            .iter()
            .map(|s| (s.sf.clone(), s.len))
            .collect();
        for (sf, len) in segs {
            let (c, bad) = crate::sidecar::scan_segment(&sf, len)?;
            if let Some((pos, reason)) = bad {
                return Err(crate::error::corrupt(&sf.path, pos, reason));
            }
            let idx = self.index();
            for r in &c.records {
                if r.chunk_id <= idx.base.chunk_id {
                    continue;
                }
                let same = idx.record(r.chunk_id).is_some_and(|x| {
                    Arc::ptr_eq(&x.seg, &sf)
                        && (x.first_seq, x.last_seq, x.time_ns, x.merged_from, x.rec_off)
                            == (r.first_seq, r.last_seq, r.time_ns, r.merged_from, r.rec_off)
                        && x.inconsistent == r.inconsistent
                        && x.extents == r.extents
                });
                if !same {
                    return Err(crate::error::corrupt(
                        &sf.path,
                        r.rec_off,
                        format!("record of chunk {} differs from the index", r.chunk_id),
                    ));
                }
            }
        }
        let idx = self.index();
        let mut n = 0;
        for r in &idx.records {
            for x in &r.extents {
                undo_bytes(r, x)?;
                n += 1;
            }
        }
        Ok(n)
    }
}
