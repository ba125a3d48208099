//! The consumer side: transactional drain of a change log by the replicator.

use std::collections::VecDeque;
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::*};
use std::time::{Duration, Instant};

use nix::fcntl::Flock;
use tracing::info;

use crate::error::{ChangeLogError, Result};
use crate::layout::{stat, *};
use crate::producer::take_lock;
use crate::region::Shared;
use crate::ring::{materialise, read_step, Record, Step};

static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// What a [`Batch`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// Ring records, in stream order.
    Ring,
    /// Dirty block ranges: read the data from the source volume *after*
    /// receiving the batch, then apply.
    Bitmap,
}

#[derive(Debug)]
enum Content {
    Ring {
        start: u64,
        end: u64,
        records: Vec<Record>,
        bytes: u64,
    },
    Bitmap {
        ranges: Vec<(u64, u64)>,
        masks: Vec<(u64, u64)>,
        blocks: u64,
        changed_since_ns: Option<u64>,
    },
}

/// A unit of drain handed out by [`Consumer::get`]. Apply it to the target in
/// the order batches were handed out, then pass it to [`Consumer::commit`]
/// once the target has it durably. Dropping a batch without committing is
/// allowed: it is re-delivered after the consumer re-attaches.
#[derive(Debug)]
pub struct Batch {
    id: u64,
    owner: u64,
    content: Content,
}

impl Batch {
    /// Identifier, increasing per consumer handle.
    pub fn id(&self) -> u64 {
        self.id
    }
    /// Ring or bitmap batch.
    pub fn kind(&self) -> BatchKind {
        match self.content {
            Content::Ring { .. } => BatchKind::Ring,
            Content::Bitmap { .. } => BatchKind::Bitmap,
        }
    }
    /// Records of a ring batch in stream order (empty for bitmap batches; a
    /// ring batch may also be empty when it only spans ring padding — commit
    /// it like any other).
    pub fn records(&self) -> &[Record] {
        match &self.content {
            Content::Ring { records, .. } => records,
            Content::Bitmap { .. } => &[],
        }
    }
    /// The records of a ring batch, mutable, so that a shipper can move the
    /// payloads out (`std::mem::take(&mut r.data)`) instead of copying them.
    /// [`Consumer::commit`] only uses the batch's ring positions and record
    /// count, so emptied records commit like the originals.
    pub fn records_mut(&mut self) -> &mut [Record] {
        match &mut self.content {
            Content::Ring { records, .. } => records,
            Content::Bitmap { .. } => &mut [],
        }
    }
    /// Dirty byte ranges `(offset, len)` of a bitmap batch, sorted and
    /// coalesced, block aligned (the last block clamped to the volume size).
    pub fn ranges(&self) -> &[(u64, u64)] {
        match &self.content {
            Content::Bitmap { ranges, .. } => ranges,
            Content::Ring { .. } => &[],
        }
    }
    /// A lower bound of the capture time (ns since the epoch) of the oldest
    /// change the batch carries, for RPO accounting: the oldest record
    /// timestamp of a ring batch; for a bitmap batch the start of the last
    /// bitmap sweep this consumer completed before taking it (every bit set
    /// earlier was taken by that sweep), `None` while no sweep has completed
    /// since attach (bits restored from an earlier consumer may be older).
    /// `None` for an empty ring batch.
    pub fn oldest_change_bound_ns(&self) -> Option<u64> {
        match &self.content {
            Content::Ring { records, .. } => records.iter().map(|r| r.timestamp_ns).min(),
            Content::Bitmap {
                changed_since_ns, ..
            } => *changed_since_ns,
        }
    }
    /// Ring positions `[start, end)` covered by a ring batch.
    pub fn ring_span(&self) -> Option<(u64, u64)> {
        match self.content {
            Content::Ring { start, end, .. } => Some((start, end)),
            Content::Bitmap { .. } => None,
        }
    }
}

/// The consumer role of a change log (one live consumer per volume, enforced
/// with an exclusive `flock`; normally in the replicator process).
///
/// Protocol and guarantees:
/// - [`Consumer::get`] returns ring records from the read cursor (several
///   batches may be outstanding), and only when every record published so far
///   has been handed out, a bitmap batch (blocks moved `active → pending`);
/// - ring space is freed and pending bits cleared only by [`Consumer::commit`];
///   ring batches must be committed in the order they were handed out;
/// - if the consumer dies (or is dropped) with batches outstanding, the next
///   [`Consumer::attach`] restarts at the committed tail and ORs `pending`
///   back into `active`: everything uncommitted is delivered again (the target
///   must apply idempotently, e.g. by sequence number);
/// - bitmap **sweeps**: consecutive bitmap takes walk the words of `active`
///   cyclically; a sweep is complete when every word has been visited once
///   since it started, so every bit set before its start has been taken.
///   Completed sweeps are counted in the region header; the producer leaves
///   bitmap mode once a sweep that started after it entered bitmap mode has
///   completed (docs/change-log-format.md §4).
pub struct Consumer {
    sh: Shared,
    _lock: Flock<File>,
    owner: u64,
    cursor: u64,
    outstanding: VecDeque<(u64, u64)>,
    deferred: Option<(u64, Batch)>,
    scan_word: u64,
    last_full_scan: Option<Instant>,
    next_id: u64,
    /// Words visited in the current sweep.
    sweep_words: u64,
    /// When the current sweep started (ns since the epoch).
    sweep_start_ns: u64,
    /// When the last completed sweep started.
    done_sweep_start_ns: Option<u64>,
    /// Spent record buffers handed back by [`Consumer::recycle`], reused for
    /// the payloads of the next data records.
    spare: Vec<Vec<u8>>,
    /// Sum of the capacities in `spare`.
    spare_bytes: usize,
}

/// Most bytes of allocation [`Consumer::recycle`] keeps for reuse.
const SPARE_BYTES_MAX: usize = 32 << 20;

impl Consumer {
    /// Attaches to the region at `path` as its consumer. Fails with
    /// [`ChangeLogError::Busy`] if another live consumer holds the role.
    pub fn attach(path: impl AsRef<Path>) -> Result<Consumer> {
        let path = path.as_ref();
        let sh = Shared::open(path, true)?;
        let lock = take_lock(&path.with_extension("consumer.lock"), "consumer", path)?;
        let restored = sh.restore_pending();
        sh.field(OFF_PENDING_COUNT).store(0, SeqCst);
        let tail = sh.tail().load(Acquire);
        let head = sh.head().load(Acquire);
        if tail > head || head - tail > sh.layout().ring_capacity || tail % 8 != 0 {
            return Err(ChangeLogError::CorruptRecord {
                pos: tail,
                reason: format!("tail {tail} inconsistent with head {head}"),
            });
        }
        sh.field(OFF_CONSUMER_PID)
            .store(std::process::id() as u64, SeqCst);
        sh.bump(stat::CONSUMER_ATTACHES, 1);
        info!(path = %path.display(), tail, head, restored_pending_blocks = restored, "consumer attached");
        let owner = (std::process::id() as u64) << 32 | NEXT_OWNER.fetch_add(1, Relaxed);
        Ok(Consumer {
            sh,
            _lock: lock,
            owner,
            cursor: tail,
            outstanding: VecDeque::new(),
            deferred: None,
            scan_word: 0,
            last_full_scan: None,
            next_id: 1,
            sweep_words: 0,
            sweep_start_ns: crate::producer::now_ns(),
            done_sweep_start_ns: None,
            spare: Vec::new(),
            spare_bytes: 0,
        })
    }

    fn new_batch(&mut self, content: Content) -> Batch {
        self.next_id += 1;
        Batch {
            id: self.next_id - 1,
            owner: self.owner,
            content,
        }
    }

    /// Next batch of at most about `max_bytes` (ring bytes, or bitmap bytes of
    /// volume data; at least one record or block), or `None` when there is
    /// nothing to drain right now.
    ///
    /// Ordering: a bitmap batch is only produced when the ring is empty up to
    /// the head; if records were published while the bits were being taken,
    /// those records are handed out first and the bitmap batch right after
    /// them, so data read back for the bits is never overwritten by an older
    /// record.
    pub fn get(&mut self, max_bytes: u64) -> Result<Option<Batch>> {
        if let Some((limit, _)) = &self.deferred {
            let limit = *limit;
            if self.cursor < limit {
                return self.ring_batch(limit, max_bytes).map(Some);
            }
            return Ok(self.deferred.take().map(|(_, b)| b));
        }
        let head = self.sh.head().load(Acquire);
        if self.cursor > head {
            return Err(ChangeLogError::CorruptRecord { pos: self.cursor, reason: format!("head {head} moved behind the read cursor (producer recovery truncated the ring); re-attach") });
        }
        if self.cursor < head {
            return self.ring_batch(head, max_bytes).map(Some);
        }
        let Some(batch) = self.take_bitmap(max_bytes) else {
            return Ok(None);
        };
        let h2 = self.sh.head().load(SeqCst);
        if h2 > self.cursor {
            self.deferred = Some((h2, batch));
            return self.ring_batch(h2, max_bytes).map(Some);
        }
        Ok(Some(batch))
    }

    /// Hands back record payload buffers the caller is done with (e.g. after
    /// copying them into a chunk): the next batches read data records into
    /// them instead of allocating. Keeps at most 32 MiB of allocation; the
    /// rest is freed. Purely an optimisation: contents are always replaced.
    pub fn recycle(&mut self, bufs: impl IntoIterator<Item = Vec<u8>>) {
        for b in bufs {
            let c = b.capacity();
            if c == 0 || self.spare_bytes + c > SPARE_BYTES_MAX {
                continue;
            }
            self.spare_bytes += c;
            self.spare.push(b);
        }
    }

    /// A recycled buffer for the next data record's payload (empty if none).
    fn spare_buffer(&mut self) -> Vec<u8> {
        let b = self.spare.pop().unwrap_or_default();
        self.spare_bytes -= b.capacity();
        b
    }

    fn ring_batch(&mut self, limit: u64, max_bytes: u64) -> Result<Batch> {
        let start = self.cursor;
        let mut pos = start;
        let mut records = Vec::new();
        let mut bytes = 0u64;
        while pos < limit && (records.is_empty() || bytes < max_bytes) {
            match read_step(&self.sh, pos, limit) {
                Ok(Step::Skip(n)) => pos += n,
                Ok(Step::Rec(h)) => {
                    let is_data =
                        crate::RecordKind::from_u8(h.kind) == Some(crate::RecordKind::Data);
                    let buf = if is_data {
                        self.spare_buffer()
                    } else {
                        Vec::new()
                    };
                    records.push(materialise(&self.sh, pos, &h, buf));
                    bytes += h.total_len as u64;
                    pos += h.total_len as u64;
                }
                Err(reason) => return Err(ChangeLogError::CorruptRecord { pos, reason }),
            }
        }
        self.cursor = pos;
        self.outstanding.push_back((start, pos));
        self.sh.bump(stat::RECORDS_DRAINED, records.len() as u64);
        self.sh.bump(stat::BYTES_DRAINED, pos - start);
        Ok(self.new_batch(Content::Ring {
            start,
            end: pos,
            records,
            bytes: pos - start,
        }))
    }

    fn take_bitmap(&mut self, max_bytes: u64) -> Option<Batch> {
        let sh = &self.sh;
        let l = *sh.layout();
        let counted = sh.field(OFF_ACTIVE_COUNT).load(SeqCst);
        // The counter is a hint: rescan anyway every 500 ms in case it drifted.
        if counted == 0
            && self
                .last_full_scan
                .is_some_and(|t| t.elapsed() < Duration::from_millis(500))
        {
            return None;
        }
        let limit = (max_bytes >> l.block_shift).max(1);
        let mut masks: Vec<(u64, u64)> = Vec::new();
        let mut taken = 0u64;
        let words = l.bitmap_words;
        // Bits taken now were set after the start of the last completed sweep.
        let changed_since_ns = self.done_sweep_start_ns;
        // Words fully visited by this call (a word left with bits because the
        // batch is full is visited again by the next call).
        let mut visited = words;
        for i in 0..words {
            let w = (self.scan_word + i) % words;
            let v = sh.active(w).load(SeqCst);
            if v == 0 {
                continue;
            }
            let mut m = v;
            let room = limit - taken;
            if m.count_ones() as u64 > room {
                let mut keep = 0u64;
                let mut x = m;
                for _ in 0..room {
                    let low = x & x.wrapping_neg();
                    keep |= low;
                    x &= x - 1;
                }
                m = keep;
            }
            sh.take_bits(w, m);
            masks.push((w, m));
            taken += m.count_ones() as u64;
            if taken >= limit {
                self.scan_word = w;
                visited = i;
                break;
            }
        }
        self.sweep_words += visited;
        if self.sweep_words >= words {
            // Every word was visited since the sweep started: every bit set
            // before `sweep_start_ns` has been taken.
            let now = crate::producer::now_ns();
            self.done_sweep_start_ns = Some(self.sweep_start_ns);
            self.sweep_start_ns = now;
            self.sweep_words = 0;
            sh.field(OFF_SWEEPS_DONE).fetch_add(1, SeqCst);
        }
        if masks.is_empty() {
            self.last_full_scan = Some(Instant::now());
            return None;
        }
        masks.sort_unstable();
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for &(w, m) in &masks {
            let mut x = m;
            while x != 0 {
                let bit = x.trailing_zeros() as u64;
                let run = (x >> bit).trailing_ones() as u64;
                let a = w * 64 + bit;
                let (s, n) = sh.blocks_to_bytes(a, a + run - 1);
                crate::region::push_range(&mut ranges, s, n);
                x &= if bit + run >= 64 {
                    0
                } else {
                    !0u64 << (bit + run)
                };
            }
        }
        sh.bump(stat::BITMAP_BATCHES, 1);
        sh.bump(stat::BITMAP_BLOCKS_DRAINED, taken);
        Some(self.new_batch(Content::Bitmap {
            ranges,
            masks,
            blocks: taken,
            changed_since_ns,
        }))
    }

    /// Declares `batch` durably applied at the target. A ring batch advances
    /// the ring tail (freeing its space; must be the oldest outstanding ring
    /// batch); a bitmap batch clears its bits from `pending` (bits set again in
    /// `active` meanwhile stay set).
    pub fn commit(&mut self, batch: Batch) -> Result<()> {
        if batch.owner != self.owner {
            return Err(ChangeLogError::CommitOrder {
                expected: self.sh.tail().load(Acquire),
                got: u64::MAX,
            });
        }
        match batch.content {
            Content::Ring {
                start,
                end,
                records,
                bytes,
            } => {
                match self.outstanding.front() {
                    Some(&(s, e)) if s == start && e == end => {}
                    Some(&(s, _)) => {
                        return Err(ChangeLogError::CommitOrder {
                            expected: s,
                            got: start,
                        })
                    }
                    None => {
                        return Err(ChangeLogError::CommitOrder {
                            expected: self.cursor,
                            got: start,
                        })
                    }
                }
                self.outstanding.pop_front();
                self.sh.tail().store(end, Release);
                self.sh.bump(stat::RECORDS_COMMITTED, records.len() as u64);
                self.sh.bump(stat::BYTES_COMMITTED, bytes);
            }
            Content::Bitmap { masks, blocks, .. } => {
                for (w, m) in masks {
                    self.sh.clear_pending(w, m);
                }
                self.sh.bump(stat::BITMAP_BLOCKS_COMMITTED, blocks);
            }
        }
        Ok(())
    }

    /// Volume size of the region.
    pub fn volume_size(&self) -> u64 {
        self.sh.layout().volume_size
    }

    /// Tracking block size of the region.
    pub fn block_size(&self) -> u32 {
        self.sh.layout().block_size
    }

    /// A lower bound of when the oldest change still in the `active` bitmap
    /// was captured (ns since the epoch): the start of the last sweep this
    /// consumer completed. `None` until a sweep completed since attach.
    pub fn dirty_since_bound_ns(&self) -> Option<u64> {
        self.done_sweep_start_ns
    }

    /// Ring bytes published by the producer and not yet handed out (what
    /// the next [`Consumer::get`] would return before any bitmap batch).
    pub fn ready_ring_bytes(&self) -> u64 {
        self.sh.head().load(Acquire).saturating_sub(self.cursor)
    }

    /// The sequence number the producer will give its next record. Every
    /// change whose data a read of the volume could have seen *and* that was
    /// acknowledged before that read finished has a smaller sequence number
    /// (the producer records a write before it is acknowledged), so a read
    /// finished before this call shows no acknowledged change with a sequence
    /// number ≥ the value returned: the **consistency horizon** of data read
    /// back from the volume (metadata records, bitmap sweeps).
    pub fn producer_next_seq(&self) -> u64 {
        use crate::layout::OFF_NEXT_SEQ;
        self.sh
            .field(OFF_NEXT_SEQ)
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Blocks marked dirty in the active bitmap and not yet taken by a sweep:
    /// changes acknowledged without a ring record (bitmap mode, filtering
    /// stopped, failed captures) that no batch handed out so far contains.
    pub fn active_dirty_blocks(&self) -> u64 {
        use crate::layout::OFF_ACTIVE_COUNT;
        self.sh
            .field(OFF_ACTIVE_COUNT)
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Ring batches handed out and not yet committed.
    pub fn outstanding_ring_batches(&self) -> usize {
        self.outstanding.len() + self.deferred.is_some() as usize
    }
}
