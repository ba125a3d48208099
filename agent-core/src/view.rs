//! Read-only observation of a change log from any process (`drvutil`, tests).

use std::path::Path;
use std::sync::atomic::Ordering::*;

use serde::Serialize;

use crate::error::Result;
use crate::layout::{stat, *};
use crate::producer::CaptureMode;
use crate::region::Shared;
use crate::ring::{info, walk, RecordInfo, RecordKind};

/// Labels of the IO-size histogram buckets (upper bounds, inclusive).
pub const HIST_LABELS: [&str; HIST_BUCKETS] = [
    "512B", "1K", "2K", "4K", "8K", "16K", "32K", "64K", "128K", "256K", "512K", "1M", "2M", "4M",
    ">4M",
];

/// Capture-mode transition counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Transitions {
    /// Ring could not hold a payload.
    pub data_to_metadata: u64,
    /// Ring could not hold even a metadata record.
    pub metadata_to_bitmap: u64,
    /// Ring could not hold a zero/metadata record while in data mode.
    pub data_to_bitmap: u64,
    /// Bitmap mode left: drained (active == pending == 0), or a consumer
    /// sweep took every bit set before it was entered (counted also in
    /// `bitmap_sweep_exits`).
    pub bitmap_to_data: u64,
    /// Bitmap → data transitions taken under load, with bits still set, after
    /// a completed consumer sweep.
    pub bitmap_sweep_exits: u64,
    /// Ring usage fell to half or less.
    pub metadata_to_data: u64,
    /// `set_filtering(false)` forced bitmap mode.
    pub filtering_stops: u64,
}

/// A snapshot of a change log's header: identity, mode and counters. Each
/// field is read atomically, the whole is not a consistent cut.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Volume UUID (hyphenated).
    pub volume_uuid: String,
    /// Generation of the volume identity.
    pub generation: u64,
    /// Volume size in bytes.
    pub volume_size: u64,
    /// Tracking block size.
    pub block_size: u32,
    /// When the shared-memory region was created (ns since the epoch).
    pub region_created_ns: u64,
    /// Current capture mode.
    pub mode: CaptureMode,
    /// Filtering enabled (false: writes tracked in the bitmap only).
    pub filtering: bool,
    /// Since when (ns since the epoch) the log is in bitmap mode; `None` when
    /// not in bitmap mode. Being in bitmap mode is an alert condition.
    pub bitmap_mode_since_ns: Option<u64>,
    /// PID of the last producer.
    pub producer_pid: u64,
    /// "running", "clean-shutdown", "none" (or "invalid") (the last producer's state;
    /// "running" with a dead pid means it crashed).
    pub producer_state: &'static str,
    /// PID of the last consumer.
    pub consumer_pid: u64,
    /// Next sequence number.
    pub next_seq: u64,
    /// Ring capacity in bytes.
    pub ring_capacity: u64,
    /// Ring bytes not yet committed by the consumer.
    pub ring_used_bytes: u64,
    /// Ring head (producer publish position).
    pub ring_head: u64,
    /// Ring tail (consumer commit position).
    pub ring_tail: u64,
    /// Blocks set in `active`.
    pub dirty_blocks_active: u64,
    /// Blocks set in `pending` (taken by the consumer, not yet acknowledged).
    pub dirty_blocks_pending: u64,
    /// Completed writes.
    pub writes: u64,
    /// Bytes of completed writes.
    pub write_bytes: u64,
    /// Reads served.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Completed TRIM / WRITE_ZEROES.
    pub zero_ops: u64,
    /// Bytes of TRIM / WRITE_ZEROES.
    pub zero_bytes: u64,
    /// Aborted writes (recorded as dirty bits).
    pub aborts: u64,
    /// Write sizes, buckets as [`HIST_LABELS`].
    pub write_size_histogram: [u64; HIST_BUCKETS],
    /// Read sizes, buckets as [`HIST_LABELS`].
    pub read_size_histogram: [u64; HIST_BUCKETS],
    /// Data records appended.
    pub data_records: u64,
    /// Metadata records appended.
    pub metadata_records: u64,
    /// Zero records appended.
    pub zero_records: u64,
    /// Writes recorded only as bitmap bits.
    pub bitmap_writes: u64,
    /// Writes larger than a quarter of the ring, recorded as metadata in data mode.
    pub oversize_metadata_records: u64,
    /// Mode transitions.
    pub transitions: Transitions,
    /// Records handed out by `Consumer::get`.
    pub records_drained: u64,
    /// Ring bytes handed out.
    pub bytes_drained: u64,
    /// Records committed.
    pub records_committed: u64,
    /// Ring bytes committed.
    pub bytes_committed: u64,
    /// Bitmap batches handed out.
    pub bitmap_batches: u64,
    /// Blocks handed out in bitmap batches.
    pub bitmap_blocks_drained: u64,
    /// Blocks committed from bitmap batches.
    pub bitmap_blocks_committed: u64,
    /// Tags inserted.
    pub tags_inserted: u64,
    /// Tags refused.
    pub tags_refused: u64,
    /// Producer crash recoveries performed.
    pub recoveries: u64,
    /// Consumer attaches.
    pub consumer_attaches: u64,
    /// Activity-log (hot extent) updates.
    pub al_updates: u64,
    /// Bitmap-file persists.
    pub persists: u64,
    /// Bitmap sweeps completed by consumers (full passes over `active`).
    pub bitmap_sweeps: u64,
    /// Failed persist / activity-log writes.
    pub persist_errors: u64,
}

pub(crate) fn read_stats(sh: &Shared) -> Stats {
    let f = |o: usize| sh.field(o).load(Relaxed);
    let s = |i: usize| sh.stat(i).load(Relaxed);
    let hist = |base: usize| {
        let mut h = [0u64; HIST_BUCKETS];
        for (i, v) in h.iter_mut().enumerate() {
            *v = s(base + i);
        }
        h
    };
    let l = sh.layout();
    let head = f(OFF_HEAD);
    let tail = f(OFF_TAIL);
    let since = f(OFF_BITMAP_SINCE_NS);
    let mode = CaptureMode::from_u64(f(OFF_MODE));
    Stats {
        volume_uuid: uuid::Uuid::from_bytes(sh.hdr.uuid).hyphenated().to_string(),
        generation: sh.hdr.generation,
        volume_size: l.volume_size,
        block_size: l.block_size,
        region_created_ns: sh.hdr.created_ns,
        mode,
        filtering: f(OFF_FILTERING) != 0,
        bitmap_mode_since_ns: (mode == CaptureMode::Bitmap && since != 0).then_some(since),
        producer_pid: f(OFF_PRODUCER_PID),
        producer_state: match f(OFF_PRODUCER_STATE) {
            PRODUCER_RUNNING => "running",
            PRODUCER_CLEAN => "clean-shutdown",
            PRODUCER_NONE => "none",
            _ => "invalid",
        },
        consumer_pid: f(OFF_CONSUMER_PID),
        next_seq: f(OFF_NEXT_SEQ),
        ring_capacity: l.ring_capacity,
        ring_used_bytes: head.saturating_sub(tail),
        ring_head: head,
        ring_tail: tail,
        dirty_blocks_active: f(OFF_ACTIVE_COUNT),
        dirty_blocks_pending: f(OFF_PENDING_COUNT),
        writes: s(stat::WRITES),
        write_bytes: s(stat::WRITE_BYTES),
        reads: s(stat::READS),
        read_bytes: s(stat::READ_BYTES),
        zero_ops: s(stat::ZERO_OPS),
        zero_bytes: s(stat::ZERO_BYTES),
        aborts: s(stat::ABORTS),
        write_size_histogram: hist(stat::WRITE_HIST),
        read_size_histogram: hist(stat::READ_HIST),
        data_records: s(stat::DATA_RECORDS),
        metadata_records: s(stat::METADATA_RECORDS),
        zero_records: s(stat::ZERO_RECORDS),
        bitmap_writes: s(stat::BITMAP_WRITES),
        oversize_metadata_records: s(stat::OVERSIZE_METADATA),
        transitions: Transitions {
            data_to_metadata: s(stat::DATA_TO_METADATA),
            metadata_to_bitmap: s(stat::METADATA_TO_BITMAP),
            data_to_bitmap: s(stat::DATA_TO_BITMAP),
            bitmap_to_data: s(stat::BITMAP_TO_DATA),
            bitmap_sweep_exits: s(stat::BITMAP_SWEEP_EXITS),
            metadata_to_data: s(stat::METADATA_TO_DATA),
            filtering_stops: s(stat::FILTERING_STOPS),
        },
        records_drained: s(stat::RECORDS_DRAINED),
        bytes_drained: s(stat::BYTES_DRAINED),
        records_committed: s(stat::RECORDS_COMMITTED),
        bytes_committed: s(stat::BYTES_COMMITTED),
        bitmap_batches: s(stat::BITMAP_BATCHES),
        bitmap_blocks_drained: s(stat::BITMAP_BLOCKS_DRAINED),
        bitmap_blocks_committed: s(stat::BITMAP_BLOCKS_COMMITTED),
        tags_inserted: s(stat::TAGS_INSERTED),
        tags_refused: s(stat::TAGS_REFUSED),
        recoveries: s(stat::RECOVERIES),
        consumer_attaches: s(stat::CONSUMER_ATTACHES),
        al_updates: s(stat::AL_UPDATES),
        persists: s(stat::PERSISTS),
        bitmap_sweeps: f(OFF_SWEEPS_DONE),
        persist_errors: s(stat::PERSIST_ERRORS),
    }
}

/// A read-only mapping of a change-log region. Takes no role, modifies
/// nothing, and may be opened while producer and consumer run.
pub struct ChangeLogView {
    sh: Shared,
}

impl ChangeLogView {
    /// Maps the region at `path` read-only, validating its header.
    pub fn open(path: impl AsRef<Path>) -> Result<ChangeLogView> {
        Ok(ChangeLogView {
            sh: Shared::open(path.as_ref(), false)?,
        })
    }

    /// Statistics and state from the header.
    pub fn stats(&self) -> Stats {
        read_stats(&self.sh)
    }

    /// Current capture mode.
    pub fn mode(&self) -> CaptureMode {
        CaptureMode::from_u64(self.sh.field(OFF_MODE).load(Relaxed))
    }

    /// The records between tail and head (not consumed), without consuming
    /// them. The walk stops early (without error) at a record that the
    /// consumer committed while we read, or that fails validation.
    pub fn records(&self) -> impl Iterator<Item = RecordInfo> {
        let sh = &self.sh;
        let tail = sh.tail().load(Acquire);
        let head = sh.head().load(Acquire);
        let mut out = Vec::new();
        if tail <= head && head - tail <= sh.layout().ring_capacity {
            let _ = walk(sh, tail, head, |pos, h| {
                if sh.tail().load(Acquire) > pos {
                    return false;
                }
                out.push(info(pos, h));
                true
            });
        }
        out.into_iter()
    }

    /// The oldest record not consumed yet (the first one after the committed
    /// tail), reading one record header: what [`ChangeLogView::records`]
    /// would yield first, without walking the ring. `None` if the ring is
    /// empty (or the record was committed while we read).
    pub fn first_record(&self) -> Option<RecordInfo> {
        let sh = &self.sh;
        let tail = sh.tail().load(Acquire);
        let head = sh.head().load(Acquire);
        let mut first = None;
        if tail < head && head - tail <= sh.layout().ring_capacity {
            let _ = walk(sh, tail, head, |pos, h| {
                if sh.tail().load(Acquire) <= pos {
                    first = Some(info(pos, h));
                }
                false
            });
        }
        first
    }

    /// Byte ranges of the blocks dirty in `active | pending`, sorted and coalesced.
    pub fn dirty_ranges(&self) -> Vec<(u64, u64)> {
        self.sh
            .ranges_of(|w| self.sh.active(w).load(SeqCst) | self.sh.pending(w).load(SeqCst))
    }

    /// Every byte range that is still owed to the target: dirty blocks plus
    /// the ranges of unconsumed Data/Metadata/Zero records, coalesced.
    pub fn uncommitted_ranges(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .records()
            .filter(|r| r.kind != RecordKind::Tag && r.len > 0)
            .map(|r| (r.offset, r.len))
            .collect();
        v.extend(self.dirty_ranges());
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (s, l) in v {
            match out.last_mut() {
                Some(last) if last.0 + last.1 >= s => last.1 = last.1.max(s + l - last.0),
                _ => out.push((s, l)),
            }
        }
        out
    }
}
