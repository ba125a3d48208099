//! The spool: durable group commit of received chunks, scan and torn-tail
//! handling at open, and reclaim of fully applied spool files.

use crate::error::{corrupt, ioe, JournalError, Result};
use crate::fault::FaultPoint;
use crate::format::*;
use crate::fsutil::*;
use crate::{Applied, ChunkExtent, ChunkIn, ExtentData, SpoolOutcome, TargetVolume, SPOOL_DIR};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use tracing::{debug, warn};

pub(crate) struct SpoolFile {
    pub(crate) id: u64,
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    pub(crate) len: u64,
    pub(crate) max_chunk_id: u64,
    pub(crate) records: u64,
}

pub(crate) struct Pending {
    pub(crate) chunk_id: u64,
    pub(crate) first_seq: u64,
    pub(crate) last_seq: u64,
    pub(crate) time_ns: u64,
    pub(crate) payload: u64,
    pub(crate) span: u64,
    pub(crate) file_id: u64,
    pub(crate) rec_off: u64,
    pub(crate) rec_len: u64,
    pub(crate) ranges: Vec<(u64, u64)>,
    pub(crate) data: Option<Vec<ChunkExtent>>,
    /// Applied straight from memory, never written to the spool (`direct_apply`).
    pub(crate) direct: bool,
    /// The state after this chunk is not write-order consistent ([`FLAG_INCONSISTENT`]).
    pub(crate) inconsistent: bool,
}

/// A parsed spool record: header, extents, record length and consistency horizon.
pub(crate) type ParsedSpool = (RecHeader, Vec<ChunkExtent>, usize, u64);

/// Parse one spool record at the start of `b`; returns header, extents and record length.
pub(crate) fn parse_spool_record(b: &[u8]) -> std::result::Result<ParsedSpool, String> {
    if b.len() < REC_HDR {
        return Err("truncated record header".into());
    }
    let h = decode_rec_header(&b[..REC_HDR]);
    if h.magic != REC_SPOOL {
        return Err("bad record magic".into());
    }
    let total = record_len(&h).ok_or("record length overflow")?;
    if total > b.len() as u64 {
        return Err("record extends past end of file".into());
    }
    let total = total as usize;
    let body_end = REC_HDR + h.body_len as usize;
    if hash32(&b[..body_end]) != b[body_end..total] {
        return Err("record checksum mismatch".into());
    }
    let (horizon, tstart) = if h.flags & FLAG_HORIZON != 0 {
        if h.body_len < 8 {
            return Err("horizon past record".into());
        }
        (rd64(b, REC_HDR), REC_HDR + 8)
    } else {
        (0, REC_HDR)
    };
    let table = (h.n_extents as u64)
        .checked_mul(SPOOL_ENTRY as u64)
        .filter(|t| *t <= (body_end - tstart) as u64)
        .ok_or("extent table larger than record")? as usize;
    let mut cur = tstart + table;
    let mut exts = Vec::with_capacity(h.n_extents as usize);
    for i in 0..h.n_extents as usize {
        let e = &b[tstart + i * SPOOL_ENTRY..tstart + (i + 1) * SPOOL_ENTRY];
        let offset = rd64(e, 0);
        let len = rd64(e, 8);
        match e[16] {
            SPOOL_DATA => {
                let end = (cur as u64)
                    .checked_add(len)
                    .filter(|x| *x <= body_end as u64)
                    .ok_or("extent payload past record")? as usize;
                exts.push(ChunkExtent {
                    offset,
                    data: ExtentData::Data(bytes::Bytes::copy_from_slice(&b[cur..end])),
                });
                cur = end;
            }
            SPOOL_ZERO => exts.push(ChunkExtent {
                offset,
                data: ExtentData::Zero(len),
            }),
            k => return Err(format!("unknown extent kind {k}")),
        }
    }
    if cur != body_end {
        return Err("payload length mismatch".into());
    }
    Ok((h, exts, total, horizon))
}

/// Bytes [`encode_spool_record`] appends for `c`.
fn spool_record_len(c: &ChunkIn) -> usize {
    let horizon = if c.horizon_seq != 0 { 8 } else { 0 };
    REC_HDR + horizon + c.extents.len() * SPOOL_ENTRY + c.payload_bytes() as usize + 32
}

pub(crate) fn encode_spool_record(out: &mut Vec<u8>, id: u64, group: u64, flags: u8, c: &ChunkIn) {
    let start = out.len();
    let n = c.extents.len();
    let (flags, hlen) = if c.horizon_seq != 0 {
        (flags | FLAG_HORIZON, 8)
    } else {
        (flags & !FLAG_HORIZON, 0)
    };
    let h = RecHeader {
        magic: REC_SPOOL,
        flags,
        body_len: hlen + (n * SPOOL_ENTRY) as u64 + c.payload_bytes(),
        id,
        first_seq: c.first_seq,
        last_seq: c.last_seq,
        time_ns: c.source_time_ns,
        n_extents: n as u32,
        aux: group,
    };
    encode_rec_header(&h, out);
    if c.horizon_seq != 0 {
        out.extend_from_slice(&c.horizon_seq.to_le_bytes());
    }
    for e in &c.extents {
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.data.len().to_le_bytes());
        let kind = match e.data {
            ExtentData::Data(_) => SPOOL_DATA,
            ExtentData::Zero(_) => SPOOL_ZERO,
        };
        out.extend_from_slice(&[kind, 0, 0, 0, 0, 0, 0, 0]);
    }
    for e in &c.extents {
        if let ExtentData::Data(d) = &e.data {
            out.extend_from_slice(d);
        }
    }
    let hh = hash32(&out[start..]);
    out.extend_from_slice(&hh);
    debug_assert_eq!(out.len() - start, spool_record_len(c));
}

impl TargetVolume {
    /// Load the spool files (cutting a torn tail of the last one) and check them
    /// against the journal: `journal_top` is the highest chunk id the segment scan
    /// saw. Spool files are deleted only after the commits of all their chunks are
    /// durable, and an empty spool file is named after the next chunk id, so the
    /// lowest chunk id the spool still knows (`floor`) is at most one past the last
    /// durable commit. A floor above `journal_top + 1` means committed journal
    /// records are missing (a damaged, e.g. truncated, segment rather than a
    /// crash's torn tail): recovery points before the damage would be served
    /// without those undo records, so the open is refused with
    /// [`JournalError::Corrupt`] naming the segment and the lost chunk/seq range.
    pub(crate) fn load_spool(&mut self, journal_top: u64) -> Result<()> {
        let sd = self.dir.join(SPOOL_DIR);
        // (lowest chunk id known to the spool above the applied state, first_seq of that chunk)
        let mut floor: Option<(u64, u64)> = None;
        let names = list_indexed(&sd, "spl")?;
        let n = names.len();
        let mut max_id = self.applied_through;
        let shared = self.shared.clone();
        for r in &shared.read().records {
            max_id = max_id.max(r.chunk_id);
            if r.last_seq != 0 {
                self.durable_seq = self.durable_seq.max(r.last_seq);
            }
        }
        self.durable_seq = self.durable_seq.max(self.applied_seq);
        for (i, (id, path)) in names.into_iter().enumerate() {
            let last = i + 1 == n;
            let buf = fs::read(&path).map_err(ioe(|| format!("read {}", path.display())))?;
            let removable = last && buf.len() <= FILE_HDR;
            let Some(hdr) = self.check_file_header(&path, &buf, &SPOOL_MAGIC, id, removable)?
            else {
                continue;
            };
            let mut pos = FILE_HDR;
            let mut prev: Option<RecHeader> = None;
            let mut fmax = 0u64;
            let mut records = 0u64;
            let mut bad = None;
            while pos < buf.len() {
                match parse_spool_record(&buf[pos..]) {
                    Ok((h, exts, total, horizon)) => {
                        self.horizon_max = self.horizon_max.max(horizon);
                        if h.first_seq > h.last_seq {
                            bad = Some((pos, "bad sequence range".to_string()));
                            break;
                        }
                        if h.id > self.applied_through {
                            if floor.is_none_or(|(f, _)| h.id < f) {
                                floor = Some((h.id, h.first_seq));
                            }
                            let payload: u64 = exts
                                .iter()
                                .map(|e| match &e.data {
                                    ExtentData::Data(d) => d.len() as u64,
                                    ExtentData::Zero(_) => 0,
                                })
                                .sum();
                            let keep = self.cached_bytes + payload <= self.opts.cache_bytes;
                            if keep {
                                self.cached_bytes += payload;
                            }
                            self.pending_bytes += payload;
                            self.pending.push_back(Pending {
                                chunk_id: h.id,
                                first_seq: h.first_seq,
                                last_seq: h.last_seq,
                                time_ns: h.time_ns,
                                payload,
                                span: exts.iter().map(|e| e.data.len()).sum(),
                                file_id: id,
                                rec_off: pos as u64,
                                rec_len: total as u64,
                                ranges: exts.iter().map(|e| (e.offset, e.data.len())).collect(),
                                data: keep.then_some(exts),
                                direct: false,
                                inconsistent: h.flags & FLAG_INCONSISTENT != 0,
                            });
                        }
                        if !(h.first_seq == 0 && h.last_seq == 0) {
                            self.durable_seq = self.durable_seq.max(h.last_seq);
                        }
                        fmax = fmax.max(h.id);
                        max_id = max_id.max(h.id);
                        records += 1;
                        prev = Some(h);
                        pos += total;
                    }
                    Err(reason) => {
                        bad = Some((pos, reason));
                        break;
                    }
                }
            }
            if let Some((bpos, reason)) = bad {
                if !last {
                    return Err(corrupt(&path, bpos as u64, reason));
                }
                // The torn group: records of one group commit are written by one write + fdatasync.
                let torn_group = match prev {
                    Some(p) if p.flags & FLAG_GROUP_END == 0 => p.aux,
                    Some(p) => p.id + 1,
                    // A file is created for (and named after) the group written first into it.
                    None => hdr.index,
                };
                if later_valid(&buf[bpos..], REC_SPOOL, |b| {
                    parse_spool_record(b).is_ok_and(|(h, ..)| h.aux > torn_group)
                }) {
                    return Err(corrupt(
                        &path,
                        bpos as u64,
                        format!("{reason} (followed by acknowledged records: not a torn tail)"),
                    ));
                }
                warn!(path = %path.display(), offset = bpos, %reason, "truncating torn spool tail");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(ioe(|| format!("open {}", path.display())))?;
                f.set_len(bpos as u64)
                    .and_then(|_| f.sync_all())
                    .map_err(ioe(|| format!("truncate {}", path.display())))?;
                self.counters.torn_tails += 1;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(ioe(|| format!("open {}", path.display())))?;
            if records == 0 && floor.is_none_or(|(f, _)| id < f) {
                // An empty spool file is named after the next chunk id at its creation.
                floor = Some((id, 0));
            }
            self.spool_files.push_back(SpoolFile {
                id,
                path,
                file,
                len: pos as u64,
                max_chunk_id: fmax,
                records,
            });
        }
        if let Some((f, first_seq)) = floor {
            if f > journal_top + 1 {
                let seg = self.cur_seg();
                let seqs = if first_seq > self.applied_seq + 1 {
                    format!("seq {}..={}", self.applied_seq + 1, first_seq - 1)
                } else {
                    format!("seq from {}", self.applied_seq + 1)
                };
                return Err(corrupt(
                    &seg.sf.path,
                    seg.len,
                    format!(
                        "journal damaged: committed records of chunks {}..={} ({seqs}) lost in segment {} \
                         (journal ends at chunk {journal_top}, spool resumes at chunk {f}); not a torn tail: \
                         recovery points before chunk {f} would lack their undo data",
                        journal_top + 1,
                        f - 1,
                        seg.sf.path.display(),
                    ),
                ));
            }
        }
        self.next_chunk_id = max_id + 1;
        Ok(())
    }

    pub(crate) fn load_chunk(&self, p: &Pending) -> Result<Vec<ChunkExtent>> {
        let f = self
            .spool_files
            .iter()
            .find(|f| f.id == p.file_id)
            .ok_or_else(|| {
                corrupt(
                    &self.dir,
                    0,
                    format!("spool file for chunk {} missing", p.chunk_id),
                )
            })?;
        let mut buf = vec![0u8; p.rec_len as usize];
        f.file
            .read_exact_at(&mut buf, p.rec_off)
            .map_err(ioe(|| format!("read {}", f.path.display())))?;
        let (h, exts, ..) = parse_spool_record(&buf).map_err(|r| corrupt(&f.path, p.rec_off, r))?;
        if h.id != p.chunk_id {
            return Err(corrupt(&f.path, p.rec_off, "chunk id changed under us"));
        }
        Ok(exts)
    }

    /// Spool one chunk durably (fdatasync before returning). See [`TargetVolume::spool_many`].
    pub fn spool(&mut self, chunk: &ChunkIn) -> Result<SpoolOutcome> {
        let mut v = self.spool_many(std::slice::from_ref(chunk))?;
        v.pop().ok_or(JournalError::Poisoned)
    }

    /// Spool several chunks with one write and one fdatasync (group commit).
    ///
    /// Rules: an ordered chunk (`first_seq..=last_seq`, both non-zero) with
    /// `last_seq <= durable_seq` is a duplicate (acknowledged, not stored). Any other
    /// ordered chunk is stored and raises `durable_seq` to `last_seq`; if it starts after
    /// `durable_seq + 1` the gap is accepted (sequence numbers consumed by bitmap-mode
    /// writes) and counted in [`Counters::seq_gaps`]; a chunk overlapping `durable_seq`
    /// (re-coalesced re-delivery) is stored whole, which is safe because it carries the
    /// net effect of its range. Unordered chunks (0, 0) are always stored.
    ///
    /// Fails without side effects on [`JournalError::InvalidChunk`] and
    /// [`JournalError::SpoolFull`] (nothing of the call is stored then).
    pub fn spool_many(&mut self, chunks: &[ChunkIn]) -> Result<Vec<SpoolOutcome>> {
        self.spool_many_impl(chunks, true)
    }

    /// [`TargetVolume::spool_many`] taking ownership: the payload is moved into the
    /// apply cache instead of copied (one memcpy per byte less).
    pub fn spool_many_owned(&mut self, mut chunks: Vec<ChunkIn>) -> Result<Vec<SpoolOutcome>> {
        if self.direct_ok() {
            let (store, incoming) = self.classify(&chunks)?;
            if self.direct_space_ok(incoming) {
                let r = self.spool_direct(chunks, &store);
                return self.guard(r);
            }
        }
        let out = self.spool_many_impl(&chunks, false)?;
        let stored: Vec<usize> = out
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, SpoolOutcome::Stored { .. }))
            .map(|(i, _)| i)
            .collect();
        let first = self.pending.len() - stored.len();
        for (k, i) in stored.into_iter().enumerate() {
            let p = &mut self.pending[first + k];
            if self.cached_bytes + p.payload <= self.opts.cache_bytes {
                self.cached_bytes += p.payload;
                p.data = Some(std::mem::take(&mut chunks[i].extents));
            }
        }
        Ok(out)
    }

    pub(crate) fn spool_many_impl(
        &mut self,
        chunks: &[ChunkIn],
        cache: bool,
    ) -> Result<Vec<SpoolOutcome>> {
        let (store, incoming) = self.classify(chunks)?;
        if self.direct_ok() && self.direct_space_ok(incoming) {
            let r = self.spool_direct(chunks.to_vec(), &store);
            return self.guard(r);
        }
        if incoming > 0
            && self.pending_bytes > 0
            && self.pending_bytes + incoming > self.opts.spool_budget_bytes
        {
            return Err(JournalError::SpoolFull {
                pending: self.pending_bytes,
                incoming,
                budget: self.opts.spool_budget_bytes,
            });
        }
        if incoming > 0 && self.pending_bytes > 0 {
            self.check_space(incoming)?;
        }
        let r = self.spool_inner(chunks, &store, cache);
        self.guard(r)
    }

    /// A direct apply needs the space its spooled apply would: undo data and
    /// new replica blocks for `incoming` bytes, plus the reserve. When short
    /// of it the chunks take the spool path, which applies the admission rule
    /// (and, with nothing pending, fails a truly full disk with `ENOSPC`
    /// without leaving anything half applied).
    fn direct_space_ok(&self, incoming: u64) -> bool {
        incoming == 0 || self.check_space(incoming).is_ok()
    }

    /// The free-space admission rule of [`crate::TargetOptions::min_free_bytes`].
    fn check_space(&self, incoming: u64) -> Result<()> {
        let pending = self.pending_bytes;
        let apply = pending.saturating_add(incoming);
        let reserve = self.opts.min_free_bytes;
        let journal_free = fs_free_bytes(&self.dir)?;
        let journal_need = incoming.saturating_add(apply).saturating_add(reserve);
        let (free, needed) = if journal_free < journal_need {
            (journal_free, journal_need)
        } else if self.replica_elsewhere {
            let replica_free = fs_free_bytes(&self.replica_path)?;
            (replica_free, apply.saturating_add(reserve))
        } else {
            return Ok(());
        };
        if free >= needed {
            return Ok(());
        }
        Err(JournalError::LowSpace {
            free,
            needed,
            pending,
            incoming,
        })
    }

    /// Whether the state after `c` is below the consistency horizon `horizon`
    /// (the running maximum including `c`'s own horizon): see [`FLAG_INCONSISTENT`].
    /// Unordered chunks are inconsistent by their missing sequence numbers already.
    pub(crate) fn below_horizon(c: &ChunkIn, horizon: u64) -> bool {
        c.is_ordered() && c.last_seq < horizon
    }

    /// Validate `chunks` and mark which ones are stored (not duplicates); also
    /// returns the payload bytes of the stored ones.
    fn classify(&self, chunks: &[ChunkIn]) -> Result<(Vec<bool>, u64)> {
        self.check()?;
        for c in chunks {
            self.validate(c)?;
        }
        let mut durable = self.durable_seq;
        let mut store = Vec::with_capacity(chunks.len());
        let mut incoming = 0u64;
        for c in chunks {
            let dup = c.is_ordered() && c.last_seq <= durable;
            if !dup {
                incoming += c.payload_bytes();
                if c.is_ordered() {
                    durable = c.last_seq;
                }
            }
            store.push(!dup);
        }
        Ok((store, incoming))
    }

    /// Direct apply applies in place of spooling: only when enabled, no
    /// backlog of input is reported (bursts go to the spool) and nothing is
    /// pending (chunks must be applied in arrival order).
    fn direct_ok(&self) -> bool {
        self.opts.direct_apply && !self.incoming_backlog && self.pending.is_empty() && !self.busy
    }

    /// Apply the stored chunks straight from memory (no spool write): undo
    /// records flagged `direct`, replica writes, commit, and an fdatasync of the
    /// commit before returning, so `Ok` means durable exactly as for `spool_many`.
    /// A crash before that fdatasync leaves direct records without a durable
    /// commit: open writes their old data back and drops them (never acknowledged).
    fn spool_direct(&mut self, chunks: Vec<ChunkIn>, store: &[bool]) -> Result<Vec<SpoolOutcome>> {
        let metas: Vec<(u64, u64, u64, u64)> = chunks
            .iter()
            .map(|c| (c.first_seq, c.last_seq, c.source_time_ns, c.payload_bytes()))
            .collect();
        let mut below = Vec::with_capacity(chunks.len());
        for (i, c) in chunks.iter().enumerate() {
            if store[i] {
                self.horizon_max = self.horizon_max.max(c.horizon_seq);
            }
            below.push(Self::below_horizon(c, self.horizon_max));
        }
        let ranges: Vec<Vec<(u64, u64)>> = chunks
            .iter()
            .map(|c| c.extents.iter().map(|e| (e.offset, e.data.len())).collect())
            .collect();
        let n_stored = store.iter().filter(|s| **s).count() as u64;
        for (i, c) in chunks.into_iter().enumerate() {
            if !store[i] {
                continue;
            }
            let (first_seq, last_seq, time_ns, payload) = metas[i];
            let span = ranges[i].iter().map(|r| r.1).sum();
            self.pending.push_back(Pending {
                chunk_id: self.next_chunk_id,
                first_seq,
                last_seq,
                time_ns,
                payload,
                span,
                file_id: u64::MAX,
                rec_off: 0,
                rec_len: 0,
                ranges: ranges[i].clone(),
                data: Some(c.extents),
                direct: true,
                inconsistent: below[i],
            });
            self.cached_bytes += payload;
            self.pending_bytes += payload;
            self.next_chunk_id += 1;
        }
        let max = self.opts.apply_batch_chunks.max(1);
        while !self.pending.is_empty() {
            if let Some(a) = self.apply_batch_inner(max)? {
                Applied::accumulate(&mut self.direct_applied, a);
            }
        }
        if n_stored > 0 {
            self.sync_journal()?;
        }
        // outcomes, as spool_inner reports them
        let mut out = Vec::with_capacity(store.len());
        let mut ids = self.next_chunk_id - n_stored;
        for (i, (first_seq, last_seq, _, _)) in metas.iter().enumerate() {
            if store[i] {
                if *last_seq != 0 {
                    if *first_seq > self.durable_seq + 1 {
                        self.counters.seq_gaps += 1;
                    }
                    self.durable_seq = *last_seq;
                }
                out.push(SpoolOutcome::Stored {
                    chunk_id: ids,
                    durable_seq: self.durable_seq,
                });
                ids += 1;
            } else {
                self.counters.duplicate_chunks += 1;
                out.push(SpoolOutcome::Duplicate {
                    durable_seq: self.durable_seq,
                });
            }
        }
        Ok(out)
    }

    pub(crate) fn spool_inner(
        &mut self,
        chunks: &[ChunkIn],
        store: &[bool],
        cache: bool,
    ) -> Result<Vec<SpoolOutcome>> {
        let last_stored = store.iter().rposition(|s| *s);
        let group = self.next_chunk_id;
        // One allocation for the whole batch (no regrowth copies).
        let mut buf = Vec::with_capacity(
            chunks
                .iter()
                .zip(store)
                .filter(|(_, s)| **s)
                .map(|(c, _)| spool_record_len(c))
                .sum(),
        );
        let mut metas = Vec::new();
        let mut id = self.next_chunk_id;
        let mut horizon = self.horizon_max;
        for (i, c) in chunks.iter().enumerate() {
            if !store[i] {
                continue;
            }
            let off = buf.len();
            horizon = horizon.max(c.horizon_seq);
            let below = Self::below_horizon(c, horizon);
            let mut flags = if Some(i) == last_stored {
                FLAG_GROUP_END
            } else {
                0
            };
            if below {
                flags |= FLAG_INCONSISTENT;
            }
            encode_spool_record(&mut buf, id, group, flags, c);
            metas.push((i, id, off as u64, (buf.len() - off) as u64, below));
            id += 1;
        }
        if !buf.is_empty() {
            let need_new = match self.spool_files.back() {
                None => true,
                Some(f) => f.records > 0 && f.len + buf.len() as u64 > self.opts.spool_file_size,
            };
            if need_new {
                self.new_spool_file(group)?;
            }
            let f = self.spool_files.back_mut().ok_or(JournalError::Poisoned)?;
            let base = f.len;
            f.file
                .write_all_at(&buf, base)
                .map_err(ioe(|| format!("write {}", f.path.display())))?;
            let path = f.path.clone();
            self.faults.hit(FaultPoint::SpoolAfterWrite)?;
            let f = self.spool_files.back_mut().ok_or(JournalError::Poisoned)?;
            f.file
                .sync_data()
                .map_err(ioe(|| format!("fdatasync {}", path.display())))?;
            self.counters.fsyncs += 1;
            self.faults.hit(FaultPoint::SpoolAfterSync)?;
            let f = self.spool_files.back_mut().ok_or(JournalError::Poisoned)?;
            f.len += buf.len() as u64;
            f.records += metas.len() as u64;
            f.max_chunk_id = id - 1;
            let file_id = f.id;
            self.horizon_max = horizon;
            for (i, cid, off, len, below) in metas {
                let c = &chunks[i];
                let payload = c.payload_bytes();
                let keep = cache && self.cached_bytes + payload <= self.opts.cache_bytes;
                if keep {
                    self.cached_bytes += payload;
                }
                self.pending_bytes += payload;
                self.pending.push_back(Pending {
                    chunk_id: cid,
                    first_seq: c.first_seq,
                    last_seq: c.last_seq,
                    time_ns: c.source_time_ns,
                    payload,
                    span: c.extents.iter().map(|e| e.data.len()).sum(),
                    file_id,
                    rec_off: base + off,
                    rec_len: len,
                    ranges: c.extents.iter().map(|e| (e.offset, e.data.len())).collect(),
                    data: keep.then(|| c.extents.clone()),
                    direct: false,
                    inconsistent: below,
                });
                self.counters.spooled_chunks += 1;
                self.counters.spooled_bytes += payload;
            }
            self.next_chunk_id = id;
        }
        let mut out = Vec::with_capacity(chunks.len());
        let mut ids = self.next_chunk_id - store.iter().filter(|s| **s).count() as u64;
        for (i, c) in chunks.iter().enumerate() {
            if store[i] {
                if c.is_ordered() {
                    if c.first_seq > self.durable_seq + 1 {
                        self.counters.seq_gaps += 1;
                        debug!(
                            first_seq = c.first_seq,
                            durable_seq = self.durable_seq,
                            "sequence gap accepted"
                        );
                    }
                    self.durable_seq = c.last_seq;
                }
                out.push(SpoolOutcome::Stored {
                    chunk_id: ids,
                    durable_seq: self.durable_seq,
                });
                ids += 1;
            } else {
                self.counters.duplicate_chunks += 1;
                out.push(SpoolOutcome::Duplicate {
                    durable_seq: self.durable_seq,
                });
            }
        }
        Ok(out)
    }

    pub(crate) fn new_spool_file(&mut self, id: u64) -> Result<()> {
        let sd = self.dir.join(SPOOL_DIR);
        let path = sd.join(format!("{id:016x}.spl"));
        let hdr = encode_file_header(
            &SPOOL_MAGIC,
            &FileHeader {
                uuid: self.ident.uuid,
                generation: self.ident.generation,
                index: id,
                created_ns: now_ns(),
            },
        );
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(ioe(|| format!("create {}", path.display())))?;
        file.write_all_at(&hdr, 0)
            .and_then(|_| file.sync_data())
            .map_err(ioe(|| format!("write {}", path.display())))?;
        self.counters.fsyncs += 1;
        self.faults.hit(FaultPoint::SpoolFileAfterCreate)?;
        fsync_dir(&sd)?;
        self.spool_files.push_back(SpoolFile {
            id,
            path,
            file,
            len: FILE_HDR as u64,
            max_chunk_id: 0,
            records: 0,
        });
        Ok(())
    }

    /// Delete spool files whose chunks are all committed (after making the commit durable).
    pub(crate) fn reclaim(&mut self) -> Result<()> {
        let n = self.spool_files.len();
        let mut k = 0;
        for (i, f) in self.spool_files.iter().enumerate() {
            let empty_non_last = f.records == 0 && i + 1 < n;
            if empty_non_last || (f.records > 0 && f.max_chunk_id <= self.applied_through) {
                k += 1;
            } else {
                break;
            }
        }
        if k == 0 {
            return Ok(());
        }
        if self.commit_synced < self.commit_written {
            self.sync_journal()?;
        }
        self.faults.hit(FaultPoint::ReclaimBeforeDelete)?;
        for f in self.spool_files.drain(..k) {
            fs::remove_file(&f.path).map_err(ioe(|| format!("remove {}", f.path.display())))?;
        }
        self.faults.hit(FaultPoint::ReclaimAfterDelete)?;
        if self.spool_files.is_empty() {
            // Keep an empty file named after the next chunk id: it tells the next
            // open where the durable commits reach (see `load_spool`), and the
            // next group is appended to it.
            self.new_spool_file(self.next_chunk_id)?;
        } else {
            fsync_dir(&self.dir.join(SPOOL_DIR))?;
        }
        self.counters.fsyncs += 1;
        Ok(())
    }
}
