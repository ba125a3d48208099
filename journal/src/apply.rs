//! Copy-on-write apply: old data -> undo records (durable) -> replica writes
//! (durable) -> commit record; and re-apply of the uncommitted tail at open.

use crate::error::{corrupt, ioe, JournalError, Result};
use crate::fault::FaultPoint;
use crate::fault::Faults;
use crate::format::*;
use crate::fsutil::{is_zero, punch_zeros};
use crate::segment::{encode_undo_record, SegFile, UndoExtent, UndoRec};
use crate::spool::Pending;
use crate::view::Shared;
use crate::{
    Applied, ChunkExtent, Counters, ExtentData, TargetVolume, UndoCompression, UNDO_PIECE,
};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tracing::warn;

/// The undo data compressor of one volume (the state behind
/// [`crate::UndoCompression`]; a zstd context is reused across pieces).
pub(crate) enum UndoEncoder {
    Off,
    Lz4,
    Zstd(Box<zstd::bulk::Compressor<'static>>),
}

impl UndoEncoder {
    pub(crate) fn new(c: UndoCompression) -> std::io::Result<Self> {
        Ok(match c {
            UndoCompression::Off => UndoEncoder::Off,
            UndoCompression::Lz4 => UndoEncoder::Lz4,
            UndoCompression::Zstd(l) => {
                UndoEncoder::Zstd(Box::new(zstd::bulk::Compressor::new(l)?))
            }
        })
    }

    /// The encoder in `slot`, created for `c` if the slot is empty (a volume's
    /// encoder is lent to its running apply step).
    pub(crate) fn in_slot(
        slot: &mut Option<UndoEncoder>,
        c: UndoCompression,
    ) -> Result<&mut UndoEncoder> {
        let enc = match slot.take() {
            Some(e) => e,
            None => UndoEncoder::new(c).map_err(ioe(|| format!("undo compression {c}")))?,
        };
        Ok(slot.insert(enc))
    }

    /// `(encoding, compressed)` if compression saves at least 1/8 of `data`.
    fn compress(&mut self, data: &[u8]) -> Option<(u8, Vec<u8>)> {
        let keep = data.len() - data.len() / 8;
        match self {
            UndoEncoder::Off => None,
            UndoEncoder::Lz4 => {
                let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(data.len())];
                let n = lz4_flex::block::compress_into(data, &mut out).ok()?;
                out.truncate(n);
                (n <= keep).then_some((ENC_LZ4, out))
            }
            UndoEncoder::Zstd(z) => {
                let c = z.compress(data).ok()?;
                (c.len() <= keep).then_some((ENC_ZSTD, c))
            }
        }
    }
}

/// Encode old bytes for the journal: zero elision, then compression when it
/// saves ≥ 1/8 (pieces over 8 KiB are tried only if their first 4 KiB compress).
pub(crate) fn encode_old(old: Vec<u8>, enc: &mut UndoEncoder) -> (u8, Vec<u8>) {
    if is_zero(&old) {
        return (ENC_ZERO, Vec::new());
    }
    if matches!(enc, UndoEncoder::Off) {
        return (ENC_RAW, old);
    }
    // Sample the first 4 KiB of larger pieces: incompressible data (already
    // compressed or encrypted volumes) then costs 4 KiB of compression, not the whole piece.
    const SAMPLE: usize = 4096;
    if old.len() > 2 * SAMPLE && enc.compress(&old[..SAMPLE]).is_none() {
        return (ENC_RAW, old);
    }
    match enc.compress(&old) {
        Some(c) => c,
        None => (ENC_RAW, old),
    }
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
        write_replica_batch(
            &self.replica,
            &self.replica_path,
            &mut self.faults,
            &mut self.counters,
            &batch,
        )?;
        self.counters.recovered_chunks += batch.len() as u64;
        self.finish_batch(&batch)?;
        self.sync_journal()?;
        Ok(())
    }

    /// Apply the oldest spooled chunk (a batch of one). `Ok(None)` when nothing is pending.
    pub fn apply_next(&mut self) -> Result<Option<Applied>> {
        self.check()?;
        self.check_idle("apply")?;
        let r = self.apply_batch_inner(1);
        self.guard(r)
    }

    /// Apply up to [`TargetOptions::apply_batch_chunks`] chunks with one journal
    /// fdatasync and one replica fdatasync. `Ok(None)` when nothing is pending.
    pub fn apply_batch(&mut self) -> Result<Option<Applied>> {
        self.check()?;
        self.check_idle("apply")?;
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
        let Some(mut job) = self.begin_job(max_chunks)? else {
            return Ok(None);
        };
        let r = job.prepare();
        let r = r.and_then(|_| self.place_job(&mut job));
        let r = r.and_then(|_| job.run());
        self.finish_job(job, r).map(Some)
    }

    /// Takes the next apply step out of the volume: an [`ApplyJob`] whose
    /// [`ApplyJob::run`] does the step's I/O (old data -> undo records,
    /// journal fdatasync, replica writes, replica fdatasync) without borrowing
    /// the volume, so that its owner can go on spooling (and acknowledging)
    /// meanwhile; [`TargetVolume::apply_finish`] then commits it. `Ok(None)`
    /// when nothing is pending.
    ///
    /// While a job is out the volume is *busy*: spooling and read-only calls
    /// work; apply, rollback, prune and resize return [`JournalError::Busy`];
    /// direct apply spools instead. A job must be given back to
    /// [`TargetVolume::apply_finish`] (dropping it leaves the volume busy
    /// until reopened). Every step writes the same bytes in the same order as
    /// [`TargetVolume::apply_batch`], so crash recovery is unchanged.
    pub fn apply_begin(&mut self) -> Result<Option<ApplyJob>> {
        self.check()?;
        self.check_idle("apply")?;
        let n = self.opts.apply_batch_chunks.max(1);
        let r = self.begin_job(n);
        self.guard(r)
    }

    /// Commits a job taken by [`TargetVolume::apply_begin`] whose
    /// [`ApplyJob::run`] returned `run` (commit record, counters, spool
    /// reclaim). An error, from `run` or here, poisons the handle as in
    /// [`TargetVolume::apply_batch`].
    pub fn apply_finish(&mut self, job: ApplyJob, run: Result<()>) -> Result<Applied> {
        if !self.busy {
            return Err(JournalError::Invalid(
                "apply_finish without a job out".into(),
            ));
        }
        let r = self.finish_job(job, run);
        self.guard(r)
    }

    /// Gives a prepared job ([`ApplyJob::prepare`]) its position in the
    /// journal, rotating the segment first if its records do not fit.
    pub fn apply_place(&mut self, job: &mut ApplyJob) -> Result<()> {
        if !self.busy {
            return Err(JournalError::Invalid(
                "apply_place without a job out".into(),
            ));
        }
        let r = self.place_job(job);
        self.guard(r)
    }

    fn place_job(&mut self, job: &mut ApplyJob) -> Result<()> {
        if !job.prepared || job.place.is_some() {
            return Err(JournalError::Invalid(
                "apply step placed before it was prepared, or twice".into(),
            ));
        }
        let need_rotate = {
            let s = self.cur_seg();
            s.len > FILE_HDR as u64 && s.len + job.jbuf.len() as u64 > self.opts.segment_size
        };
        if need_rotate {
            self.new_segment()?;
        }
        let s = self.cur_seg();
        job.place = Some((s.sf.clone(), s.len));
        Ok(())
    }

    /// Whether an [`ApplyJob`] is out (see [`TargetVolume::apply_begin`]).
    pub fn apply_busy(&self) -> bool {
        self.busy
    }

    /// `Busy` while an apply job is out.
    pub(crate) fn check_idle(&self, what: &str) -> Result<()> {
        if self.busy {
            return Err(JournalError::Busy(format!(
                "{what}: an apply step is in progress"
            )));
        }
        Ok(())
    }

    fn begin_job(&mut self, max_chunks: usize) -> Result<Option<ApplyJob>> {
        self.check_idle("apply")?;
        if self.pending.is_empty() {
            return Ok(None);
        }
        let t0 = Instant::now();
        let (n, self_overlap) = self.plan_batch(max_chunks);
        let mut batch = Vec::with_capacity(n);
        let (mut payload, mut cached) = (0u64, 0u64);
        for _ in 0..n {
            let mut p = self.pending.pop_front().ok_or(JournalError::Poisoned)?;
            let data = match p.data.take() {
                Some(d) => {
                    cached += p.payload;
                    d
                }
                // An error here poisons the handle (the caller's guard).
                None => self.load_chunk(&p)?,
            };
            payload += p.payload;
            batch.push((p, data));
        }
        let replica = self.replica.try_clone().map_err(ioe(|| {
            format!("dup replica {}", self.replica_path.display())
        }))?;
        let job = ApplyJob {
            oldest_time_ns: batch.first().map_or(0, |(p, _)| p.time_ns),
            batch,
            self_overlap,
            payload,
            cached,
            replica,
            replica_path: self.replica_path.clone(),
            undo_encoder: self.undo_encoder.take(),
            undo_compression: self.opts.undo_compression,
            faults: self.faults.clone(),
            jbuf: Vec::new(),
            recs: Vec::new(),
            prepared: false,
            place: None,
            shared: self.shared.clone(),
            counters: Counters::default(),
            jlen: 0,
            t0,
        };
        self.busy = true;
        self.busy_oldest_time_ns = Some(job.oldest_time_ns);
        self.busy_chunks = job.batch.len() as u64;
        Ok(Some(job))
    }

    fn finish_job(&mut self, job: ApplyJob, run: Result<()>) -> Result<Applied> {
        let ApplyJob {
            batch,
            payload,
            cached,
            undo_encoder,
            place,
            jlen,
            counters: c,
            t0,
            ..
        } = job;
        self.busy = false;
        self.busy_oldest_time_ns = None;
        self.busy_chunks = 0;
        self.undo_encoder = undo_encoder;
        self.pending_bytes -= payload;
        self.cached_bytes -= cached;
        let k = &mut self.counters;
        k.replica_reads += c.replica_reads;
        k.replica_read_bytes += c.replica_read_bytes;
        k.undo_raw_bytes += c.undo_raw_bytes;
        k.undo_stored_bytes += c.undo_stored_bytes;
        k.journal_write_bytes += c.journal_write_bytes;
        k.fsyncs += c.fsyncs;
        k.replica_writes += c.replica_writes;
        k.replica_write_bytes += c.replica_write_bytes;
        k.replica_punched_bytes += c.replica_punched_bytes;
        let records = self.index().records.len() as u64;
        self.counters.journal_records = records;

        run?;
        let sl = self.segments.len() - 1;
        let Some((seg, _)) = place else {
            return Err(JournalError::Invalid(
                "apply step finished without its journal position".into(),
            ));
        };
        if !Arc::ptr_eq(&self.segments[sl].sf, &seg) {
            return Err(JournalError::Invalid(
                "the journal segment changed during an apply step".into(),
            ));
        }
        self.segments[sl].len += jlen;
        // The job's fdatasync of the segment made every commit written before it durable.
        self.commit_synced = self.commit_written;
        // 4. commit.
        let a = self.finish_batch(&batch)?;
        self.counters.apply_batches += 1;
        self.counters.apply_ns += t0.elapsed().as_nanos() as u64;
        // 5. reclaim spool space.
        self.reclaim()?;
        Ok(a)
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

/// One apply step out of its volume (see [`TargetVolume::apply_begin`]): the
/// chunks, a descriptor of the replica, the journal segment and the position
/// to append at. `Send`: it may run on another thread than the owner's.
pub struct ApplyJob {
    batch: Vec<(Pending, Vec<ChunkExtent>)>,
    self_overlap: bool,
    payload: u64,
    cached: u64,
    oldest_time_ns: u64,
    replica: File,
    replica_path: PathBuf,
    undo_encoder: Option<UndoEncoder>,
    undo_compression: UndoCompression,
    faults: Faults,
    jbuf: Vec<u8>,
    recs: Vec<(u64, Vec<UndoExtent>)>,
    prepared: bool,
    place: Option<(Arc<SegFile>, u64)>,
    shared: Arc<Shared>,
    counters: Counters,
    jlen: u64,
    t0: Instant,
}

impl ApplyJob {
    /// Chunks in the step.
    pub fn chunks(&self) -> usize {
        self.batch.len()
    }

    /// Step 1 of copy-on-write apply: reads the old data of every range the
    /// step overwrites and encodes the undo records. Needs no access to the
    /// volume; then [`TargetVolume::apply_place`], then [`ApplyJob::run`].
    pub fn prepare(&mut self) -> Result<()> {
        if self.prepared {
            return Ok(());
        }
        let mut jbuf: Vec<u8> = Vec::new();
        let mut recs = Vec::with_capacity(self.batch.len());
        for (p, exts) in &self.batch {
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
                    if self.self_overlap {
                        for prev in &exts[..ei] {
                            overlay_new(&mut old, o, prev);
                        }
                    }
                    let (enc, stored) = encode_old(
                        old,
                        UndoEncoder::in_slot(&mut self.undo_encoder, self.undo_compression)?,
                    );
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
        self.jbuf = jbuf;
        self.recs = recs;
        self.prepared = true;
        Ok(())
    }

    /// Steps 2-3 of copy-on-write apply, for a prepared and placed job: the
    /// undo records appended and fdatasync'ed, into the shared index, replica
    /// writes, fdatasync. Needs no access to the volume; the commit record
    /// (step 4) is written by [`TargetVolume::apply_finish`].
    pub fn run(&mut self) -> Result<()> {
        let Some((seg, base)) = self.place.clone() else {
            return Err(JournalError::Invalid(
                "apply step run before it was placed".into(),
            ));
        };
        let jbuf = std::mem::take(&mut self.jbuf);
        let recs = std::mem::take(&mut self.recs);
        seg.file
            .write_all_at(&jbuf, base)
            .map_err(ioe(|| format!("append {}", seg.path.display())))?;
        self.faults.hit(FaultPoint::UndoAfterAppend)?;
        seg.file
            .sync_data()
            .map_err(ioe(|| format!("fdatasync {}", seg.path.display())))?;
        self.counters.fsyncs += 1;
        self.faults.hit(FaultPoint::UndoAfterSync)?;
        self.jlen = jbuf.len() as u64;
        self.counters.journal_write_bytes += jbuf.len() as u64;
        // Into the shared index before any replica write (see view.rs for why).
        {
            let mut idx = self.shared.write();
            for ((p, _), (rel, mut ux)) in self.batch.iter().zip(recs) {
                for x in &mut ux {
                    x.file_off += base;
                }
                idx.push(UndoRec {
                    chunk_id: p.chunk_id,
                    first_seq: p.first_seq,
                    last_seq: p.last_seq,
                    time_ns: p.time_ns,
                    seg: seg.clone(),
                    inconsistent: p.inconsistent,
                    merged_from: 0,
                    rec_off: base + rel,
                    extents: ux.into(),
                });
            }
        }
        // 3. replica writes + fdatasync.
        write_replica_batch(
            &self.replica,
            &self.replica_path,
            &mut self.faults,
            &mut self.counters,
            &self.batch,
        )
    }
}

/// Writes the new data of `batch` to the replica, then fdatasyncs it.
pub(crate) fn write_replica_batch(
    replica: &File,
    replica_path: &Path,
    faults: &mut Faults,
    counters: &mut Counters,
    batch: &[(Pending, Vec<ChunkExtent>)],
) -> Result<()> {
    static ZEROES: [u8; 1 << 16] = [0u8; 1 << 16];
    let write_err = || format!("write replica {}", replica_path.display());
    let mut first = true;
    for (_, exts) in batch {
        for e in exts {
            match &e.data {
                ExtentData::Data(d) => {
                    replica.write_all_at(d, e.offset).map_err(ioe(write_err))?;
                    counters.replica_writes += 1;
                    counters.replica_write_bytes += d.len() as u64;
                }
                ExtentData::Zero(n) => {
                    let mut o = e.offset;
                    let end = e.offset + n;
                    // Trims and write-zeroes free the replica's space where
                    // the file system or device can (the old bytes are in
                    // the undo record already); zeros are written otherwise.
                    if *n > 0 && punch_zeros(replica, e.offset, *n).map_err(ioe(write_err))? {
                        counters.replica_punched_bytes += n;
                        o = end;
                    }
                    while o < end {
                        let k = (end - o).min(ZEROES.len() as u64);
                        replica
                            .write_all_at(&ZEROES[..k as usize], o)
                            .map_err(ioe(write_err))?;
                        counters.replica_writes += 1;
                        counters.replica_write_bytes += k;
                        o += k;
                    }
                }
            }
            if first {
                first = false;
                faults.hit(FaultPoint::ReplicaMidWrite)?;
            }
        }
    }
    faults.hit(FaultPoint::ReplicaAfterWrite)?;
    replica.sync_data().map_err(ioe(|| {
        format!("fdatasync replica {}", replica_path.display())
    }))?;
    counters.fsyncs += 1;
    faults.hit(FaultPoint::ReplicaAfterSync)?;
    Ok(())
}
