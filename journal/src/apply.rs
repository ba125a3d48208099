//! Copy-on-write apply: old data -> undo records (durable) -> replica writes
//! (durable) -> commit record; and re-apply of the uncommitted tail at open.

use crate::error::{corrupt, ioe, JournalError, Result};
use crate::fault::FaultPoint;
use crate::format::*;
use crate::fsutil::is_zero;
use crate::segment::{encode_undo_record, UndoRec};
use crate::spool::Pending;
use crate::{Applied, ChunkExtent, ExtentData, TargetVolume, UNDO_PIECE};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::time::Instant;
use tracing::warn;

/// Encode old bytes for the journal: zero elision, then zstd when it saves ≥ 1/8
/// (pieces over 8 KiB are tried only if their first 4 KiB compress).
pub(crate) fn encode_old(
    old: Vec<u8>,
    z: Option<&mut zstd::bulk::Compressor<'static>>,
) -> (u8, Vec<u8>) {
    if is_zero(&old) {
        return (ENC_ZERO, Vec::new());
    }
    if let Some(z) = z {
        // Sample the first 4 KiB of larger pieces: incompressible data (already
        // compressed or encrypted volumes) then costs 4 KiB of zstd, not the whole piece.
        const SAMPLE: usize = 4096;
        if old.len() > 2 * SAMPLE {
            match z.compress(&old[..SAMPLE]) {
                Ok(c) if c.len() <= SAMPLE - SAMPLE / 8 => {}
                _ => return (ENC_RAW, old),
            }
        }
        if let Ok(c) = z.compress(&old) {
            if c.len() <= old.len() - old.len() / 8 {
                return (ENC_ZSTD, c);
            }
        }
    }
    (ENC_RAW, old)
}

/// Overlay the new data of `prev` onto `old` (which holds volume bytes at `o..`).
pub(crate) fn overlay_new(old: &mut [u8], o: u64, prev: &ChunkExtent) {
    let (ps, pe) = (prev.offset, prev.offset + prev.data.len());
    let (s, e) = (ps.max(o), pe.min(o + old.len() as u64));
    if s >= e {
        return;
    }
    let dst = &mut old[(s - o) as usize..(e - o) as usize];
    match &prev.data {
        ExtentData::Data(d) => dst.copy_from_slice(&d[(s - ps) as usize..(e - ps) as usize]),
        ExtentData::Zero(_) => dst.fill(0),
    }
}

impl TargetVolume {
    /// Re-apply chunks that have undo records but no commit record.
    pub(crate) fn recover_tail(&mut self, tail_start: usize) -> Result<()> {
        let tail: Vec<u64> = {
            let idx = self.index();
            idx.records
                .range(tail_start.min(idx.records.len())..)
                .map(|r| r.chunk_id)
                .collect()
        };
        if tail.is_empty() {
            return Ok(());
        }
        let mut batch = Vec::new();
        for id in &tail {
            let Some(p) = self.pending.front() else {
                return Err(corrupt(
                    &self.dir,
                    0,
                    format!("journaled chunk {id} missing from spool"),
                ));
            };
            if p.chunk_id != *id {
                return Err(corrupt(
                    &self.dir,
                    0,
                    format!(
                        "journaled chunk {id} is not the next spooled chunk ({})",
                        p.chunk_id
                    ),
                ));
            }
            let mut p = self.pending.pop_front().ok_or(JournalError::Poisoned)?;
            let data = match p.data.take() {
                Some(d) => {
                    self.cached_bytes -= p.payload;
                    d
                }
                None => self.load_chunk(&p)?,
            };
            self.pending_bytes -= p.payload;
            batch.push((p, data));
        }
        warn!(
            chunks = batch.len(),
            "re-applying journaled but uncommitted chunks"
        );
        self.write_replica_batch(&batch)?;
        self.counters.recovered_chunks += batch.len() as u64;
        self.finish_batch(&batch)?;
        self.sync_journal()?;
        Ok(())
    }

    /// Apply the oldest spooled chunk (a batch of one). `Ok(None)` when nothing is pending.
    pub fn apply_next(&mut self) -> Result<Option<Applied>> {
        self.check()?;
        let r = self.apply_batch_inner(1);
        self.guard(r)
    }

    /// Apply up to [`TargetOptions::apply_batch_chunks`] chunks with one journal
    /// fdatasync and one replica fdatasync. `Ok(None)` when nothing is pending.
    pub fn apply_batch(&mut self) -> Result<Option<Applied>> {
        self.check()?;
        let n = self.opts.apply_batch_chunks.max(1);
        let r = self.apply_batch_inner(n);
        self.guard(r)
    }

    /// Apply everything spooled (in batches). Returns the total.
    pub fn apply_all(&mut self) -> Result<Applied> {
        let mut tot = Applied {
            applied_seq: self.applied_seq,
            ..Applied::default()
        };
        while let Some(a) = self.apply_batch()? {
            if tot.chunks == 0 {
                tot.first_chunk_id = a.first_chunk_id;
            }
            tot.chunks += a.chunks;
            tot.bytes += a.bytes;
            tot.last_chunk_id = a.last_chunk_id;
            tot.applied_seq = a.applied_seq;
            tot.last_source_time_ns = a.last_source_time_ns;
        }
        Ok(tot)
    }

    /// How many leading pending chunks form the next batch, and whether the single
    /// chunk overlaps itself (then old data is overlaid with its own earlier extents).
    pub(crate) fn plan_batch(&self, max_chunks: usize) -> (usize, bool) {
        let mut iv: BTreeMap<u64, u64> = BTreeMap::new();
        let mut n = 0;
        let mut bytes = 0u64;
        for p in &self.pending {
            if n >= max_chunks || (n > 0 && bytes + p.span > self.opts.apply_batch_bytes) {
                break;
            }
            let mut overlap = false;
            for &(o, l) in &p.ranges {
                if l == 0 {
                    continue;
                }
                let end = o + l;
                if let Some((_, &e)) = iv.range(..end).next_back() {
                    if e > o {
                        overlap = true;
                        break;
                    }
                }
                iv.insert(o, end);
            }
            if overlap {
                if n == 0 {
                    return (1, true);
                }
                break;
            }
            n += 1;
            bytes += p.span;
        }
        (n.max(1), false)
    }

    pub(crate) fn apply_batch_inner(&mut self, max_chunks: usize) -> Result<Option<Applied>> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        let t0 = Instant::now();
        let (n, self_overlap) = self.plan_batch(max_chunks);
        let mut batch = Vec::with_capacity(n);
        for _ in 0..n {
            let mut p = self.pending.pop_front().ok_or(JournalError::Poisoned)?;
            let data = match p.data.take() {
                Some(d) => {
                    self.cached_bytes -= p.payload;
                    d
                }
                None => self.load_chunk(&p)?,
            };
            self.pending_bytes -= p.payload;
            batch.push((p, data));
        }
        // 1. old data -> undo records (one per chunk), in one buffer.
        let mut jbuf: Vec<u8> = Vec::new();
        let mut recs = Vec::with_capacity(n);
        for (p, exts) in &batch {
            let rec_start = jbuf.len();
            let mut entries: Vec<(u64, u64, u8, Vec<u8>)> = Vec::new();
            for (ei, e) in exts.iter().enumerate() {
                let end = e.offset + e.data.len();
                let mut o = e.offset;
                while o < end {
                    let pl = (end - o).min(UNDO_PIECE);
                    let mut old = vec![0u8; pl as usize];
                    self.replica.read_exact_at(&mut old, o).map_err(ioe(|| {
                        format!("read replica {}", self.replica_path.display())
                    }))?;
                    self.counters.replica_reads += 1;
                    self.counters.replica_read_bytes += pl;
                    if self_overlap {
                        for prev in &exts[..ei] {
                            overlay_new(&mut old, o, prev);
                        }
                    }
                    let (enc, stored) = encode_old(old, self.zstd.as_mut());
                    self.counters.undo_raw_bytes += pl;
                    self.counters.undo_stored_bytes += stored.len() as u64;
                    entries.push((o, pl, enc, stored));
                    o += pl;
                }
            }
            let ux = encode_undo_record(
                &mut jbuf,
                &RecHeader {
                    magic: REC_UNDO,
                    flags: if p.direct { FLAG_DIRECT } else { 0 }
                        | if p.inconsistent { FLAG_INCONSISTENT } else { 0 },
                    id: p.chunk_id,
                    first_seq: p.first_seq,
                    last_seq: p.last_seq,
                    time_ns: p.time_ns,
                    ..RecHeader::default()
                },
                &entries,
            );
            recs.push((rec_start as u64, ux));
        }
        // 2. append + fdatasync (rotate first if the segment is full).
        let need_rotate = {
            let s = self.cur_seg();
            s.len > FILE_HDR as u64 && s.len + jbuf.len() as u64 > self.opts.segment_size
        };
        if need_rotate {
            self.new_segment()?;
        }
        let seg_no = self.segments.len() - 1;
        let base = self.segments[seg_no].len;
        let sf = self.segments[seg_no].sf.clone();
        {
            let s = &sf;
            s.file
                .write_all_at(&jbuf, base)
                .map_err(ioe(|| format!("append {}", s.path.display())))?;
        }
        self.faults.hit(FaultPoint::UndoAfterAppend)?;
        self.sync_journal()?;
        self.faults.hit(FaultPoint::UndoAfterSync)?;
        self.segments[seg_no].len += jbuf.len() as u64;
        self.counters.journal_write_bytes += jbuf.len() as u64;
        // Into the shared index before any replica write (see view.rs for why).
        let shared = self.shared.clone();
        let mut idx = shared.write();
        for ((p, _), (rel, mut ux)) in batch.iter().zip(recs) {
            for x in &mut ux {
                x.file_off += base;
            }
            idx.push(UndoRec {
                chunk_id: p.chunk_id,
                first_seq: p.first_seq,
                last_seq: p.last_seq,
                time_ns: p.time_ns,
                seg: sf.clone(),
                inconsistent: p.inconsistent,
                merged_from: 0,
                rec_off: base + rel,
                extents: ux.into(),
            });
        }
        self.counters.journal_records = idx.records.len() as u64;
        drop(idx);
        // 3. replica writes + fdatasync.
        self.write_replica_batch(&batch)?;
        // 4. commit.
        let a = self.finish_batch(&batch)?;
        self.counters.apply_batches += 1;
        self.counters.apply_ns += t0.elapsed().as_nanos() as u64;
        // 5. reclaim spool space.
        self.reclaim()?;
        Ok(Some(a))
    }

    pub(crate) fn write_replica_batch(
        &mut self,
        batch: &[(Pending, Vec<ChunkExtent>)],
    ) -> Result<()> {
        static ZEROES: [u8; 1 << 16] = [0u8; 1 << 16];
        let mut first = true;
        for (_, exts) in batch {
            for e in exts {
                match &e.data {
                    ExtentData::Data(d) => {
                        self.replica.write_all_at(d, e.offset).map_err(ioe(|| {
                            format!("write replica {}", self.replica_path.display())
                        }))?;
                        self.counters.replica_writes += 1;
                        self.counters.replica_write_bytes += d.len() as u64;
                    }
                    ExtentData::Zero(n) => {
                        let mut o = e.offset;
                        let end = e.offset + n;
                        while o < end {
                            let k = (end - o).min(ZEROES.len() as u64);
                            self.replica
                                .write_all_at(&ZEROES[..k as usize], o)
                                .map_err(ioe(|| {
                                    format!("write replica {}", self.replica_path.display())
                                }))?;
                            self.counters.replica_writes += 1;
                            self.counters.replica_write_bytes += k;
                            o += k;
                        }
                    }
                }
                if first {
                    first = false;
                    self.faults.hit(FaultPoint::ReplicaMidWrite)?;
                }
            }
        }
        self.faults.hit(FaultPoint::ReplicaAfterWrite)?;
        self.replica.sync_data().map_err(ioe(|| {
            format!("fdatasync replica {}", self.replica_path.display())
        }))?;
        self.counters.fsyncs += 1;
        self.faults.hit(FaultPoint::ReplicaAfterSync)?;
        Ok(())
    }

    /// Append the commit record for a batch whose replica writes are durable.
    pub(crate) fn finish_batch(
        &mut self,
        batch: &[(Pending, Vec<ChunkExtent>)],
    ) -> Result<Applied> {
        let mut a = Applied::default();
        for (p, _) in batch {
            if a.chunks == 0 {
                a.first_chunk_id = p.chunk_id;
            }
            a.chunks += 1;
            a.last_chunk_id = p.chunk_id;
            a.bytes += p.span;
            a.last_source_time_ns = p.time_ns;
            if p.last_seq != 0 {
                self.applied_seq = self.applied_seq.max(p.last_seq);
            }
        }
        a.applied_seq = self.applied_seq;
        let b = encode_commit(
            a.last_chunk_id,
            self.applied_seq,
            a.last_source_time_ns,
            self.horizon_max,
        );
        let s = &self.segments[self.segments.len() - 1];
        s.sf.file
            .write_all_at(&b, s.len)
            .map_err(ioe(|| format!("append {}", s.sf.path.display())))?;
        let sl = self.segments.len() - 1;
        self.segments[sl].len += b.len() as u64;
        self.counters.journal_write_bytes += b.len() as u64;
        self.applied_through = a.last_chunk_id;
        self.applied_time_ns = a.last_source_time_ns;
        self.publish_applied();
        self.commit_written = a.last_chunk_id;
        self.counters.applied_chunks += a.chunks;
        self.counters.applied_bytes += a.bytes;
        self.faults.hit(FaultPoint::CommitAfterAppend)?;
        Ok(a)
    }
}
