//! Journal segments: undo/commit record parsing, the scan at open (torn tails),
//! rotation, and verified reads of undo payloads.

use crate::error::{corrupt, ioe, JournalError, Result};
use crate::fault::FaultPoint;
use crate::format::*;
use crate::fsutil::*;
use crate::sidecar;
use crate::{TargetVolume, VolumeIdentity, JOURNAL_DIR, UNDO_PIECE};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::warn;

/// An open segment file, shared (read-only use) by the undo records it holds and
/// by snapshot views: the descriptor stays valid while any of them lives.
pub(crate) struct SegFile {
    pub(crate) index: u64,
    pub(crate) path: PathBuf,
    pub(crate) file: File,
}

/// A segment as the writer sees it: the shared file and its valid length.
pub(crate) struct Segment {
    pub(crate) sf: Arc<SegFile>,
    pub(crate) len: u64,
}

impl Segment {
    pub(crate) fn new(index: u64, path: PathBuf, file: File, len: u64) -> Segment {
        Segment {
            sf: Arc::new(SegFile { index, path, file }),
            len,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct UndoExtent {
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) enc: u8,
    pub(crate) stored_len: u64,
    pub(crate) hash: [u8; 32],
    pub(crate) file_off: u64,
}

pub(crate) struct UndoRec {
    pub(crate) chunk_id: u64,
    pub(crate) first_seq: u64,
    pub(crate) last_seq: u64,
    pub(crate) time_ns: u64,
    pub(crate) seg: Arc<SegFile>,
    /// The state after this chunk is not write-order consistent even though it
    /// carries sequence numbers ([`FLAG_INCONSISTENT`]: below the consistency horizon).
    pub(crate) inconsistent: bool,
    /// 0 for a record of one chunk; for a record merged by sparse retention, the
    /// first chunk id of the merged span (points inside the span are gone).
    pub(crate) merged_from: u64,
    pub(crate) rec_off: u64,
    pub(crate) extents: Extents,
}

/// The extents of one undo record, used as a slice: owned (scanned or newly
/// written records), or a range of an array shared by all the records of a
/// segment loaded from its index sidecar (one allocation per segment instead
/// of one per record, and contiguous for the bulk spatial index build).
#[derive(Clone, Debug)]
pub(crate) enum Extents {
    Owned(Vec<UndoExtent>),
    Shared {
        all: Arc<Vec<UndoExtent>>,
        start: u32,
        len: u32,
    },
}

impl std::ops::Deref for Extents {
    type Target = [UndoExtent];
    fn deref(&self) -> &[UndoExtent] {
        match self {
            Extents::Owned(v) => v,
            Extents::Shared { all, start, len } => {
                &all[*start as usize..*start as usize + *len as usize]
            }
        }
    }
}

impl From<Vec<UndoExtent>> for Extents {
    fn from(v: Vec<UndoExtent>) -> Self {
        Extents::Owned(v)
    }
}

impl<'a> IntoIterator for &'a Extents {
    type Item = &'a UndoExtent;
    type IntoIter = std::slice::Iter<'a, UndoExtent>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl PartialEq for Extents {
    fn eq(&self, o: &Extents) -> bool {
        **self == **o
    }
}

impl UndoRec {
    /// The in-memory record for an undo record header read from segment `seg`
    /// at `rec_off` (flags give `inconsistent` and, with `FLAG_MERGED`, `aux`
    /// the merged span's first chunk id).
    pub(crate) fn from_header(
        h: &RecHeader,
        seg: Arc<SegFile>,
        rec_off: u64,
        extents: impl Into<Extents>,
    ) -> UndoRec {
        UndoRec {
            chunk_id: h.id,
            first_seq: h.first_seq,
            last_seq: h.last_seq,
            time_ns: h.time_ns,
            seg,
            inconsistent: h.flags & FLAG_INCONSISTENT != 0,
            merged_from: if h.flags & FLAG_MERGED != 0 { h.aux } else { 0 },
            rec_off,
            extents: extents.into(),
        }
    }

    /// Whether the state after this record's chunk is a write-order-consistent
    /// state of the source: it carries sequence numbers (not resync/bitmap data)
    /// and is not below the consistency horizon of read-back data.
    pub(crate) fn consistent_after(&self) -> bool {
        self.last_seq != 0 && !self.inconsistent
    }
}

/// Parse the header + extent table of an undo record read from a segment.
pub(crate) fn parse_undo_table(
    h: &RecHeader,
    table: &[u8],
    rec_off: u64,
) -> std::result::Result<Vec<UndoExtent>, String> {
    let n = h.n_extents as usize;
    let mut cur = rec_off + (REC_HDR + n * UNDO_ENTRY) as u64;
    let end = rec_off + REC_HDR as u64 + h.body_len;
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let e = &table[i * UNDO_ENTRY..(i + 1) * UNDO_ENTRY];
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&e[32..64]);
        let x = UndoExtent {
            offset: rd64(e, 0),
            len: rd64(e, 8),
            enc: e[16],
            stored_len: rd64(e, 24),
            hash,
            file_off: cur,
        };
        let ok = match x.enc {
            ENC_RAW => x.stored_len == x.len,
            ENC_ZSTD | ENC_LZ4 => true,
            ENC_ZERO => x.stored_len == 0,
            _ => false,
        };
        if !ok || x.len > UNDO_PIECE {
            return Err(format!("bad undo extent {i}"));
        }
        cur = cur
            .checked_add(x.stored_len)
            .filter(|c| *c <= end)
            .ok_or("undo payload past record")?;
        v.push(x);
    }
    if cur != end {
        return Err("undo payload length mismatch".into());
    }
    Ok(v)
}

pub(crate) fn valid_commit(b: &[u8]) -> bool {
    if b.len() < REC_HDR + TRAILER {
        return false;
    }
    let h = decode_rec_header(&b[..REC_HDR]);
    h.magic == REC_COMMIT
        && h.body_len == 0
        && h.n_extents == 0
        && hash32(&b[..REC_HDR]) == b[REC_HDR..REC_HDR + TRAILER]
}

impl TargetVolume {
    pub(crate) fn write_segment_header(
        jd: &Path,
        index: u64,
        ident: &VolumeIdentity,
    ) -> Result<(File, PathBuf)> {
        let path = jd.join(format!("{index:016x}.seg"));
        let hdr = encode_file_header(
            &SEGMENT_MAGIC,
            &FileHeader {
                uuid: ident.uuid,
                generation: ident.generation,
                index,
                created_ns: now_ns(),
            },
        );
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(ioe(|| format!("create {}", path.display())))?;
        f.write_all_at(&hdr, 0)
            .and_then(|_| f.sync_data())
            .map_err(ioe(|| format!("write {}", path.display())))?;
        Ok((f, path))
    }

    /// Scan segments; returns the undo records, the index of the first uncommitted
    /// one, and the highest chunk id the scan saw (commit or undo record, before
    /// any torn tail is cut): the journal's top, checked against the spool by
    /// [`TargetVolume::load_spool`].
    pub(crate) fn load_journal(&mut self) -> Result<(VecDeque<UndoRec>, usize, u64)> {
        let jd = self.dir.join(JOURNAL_DIR);
        // A compaction interrupted before its rename left `<idx>.seg.tmp`: the original is intact.
        for (_, p) in list_indexed(&jd, "seg.tmp")? {
            warn!(path = %p.display(), "removing unfinished compaction output");
            std::fs::remove_file(&p).map_err(ioe(|| format!("remove {}", p.display())))?;
        }
        // A sidecar write interrupted before its rename.
        for (_, p) in list_indexed(&jd, "idx.tmp")? {
            std::fs::remove_file(&p).map_err(ioe(|| format!("remove {}", p.display())))?;
        }
        let names = list_indexed(&jd, "seg")?;
        let nseg = names.len();
        let mut tail_start = 0usize;
        let mut records: VecDeque<UndoRec> = VecDeque::new();
        // FLAG_DIRECT of the records after the last commit
        let mut direct: Vec<bool> = Vec::new();
        for (i, (index, path)) in names.into_iter().enumerate() {
            let last = i + 1 == nseg;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(ioe(|| format!("open {}", path.display())))?;
            let flen = file
                .metadata()
                .map_err(ioe(|| format!("stat {}", path.display())))?
                .len();
            let mut hb = [0u8; FILE_HDR];
            let n =
                read_fill(&file, &mut hb, 0).map_err(ioe(|| format!("read {}", path.display())))?;
            let removable = last && flen <= FILE_HDR as u64 && i > 0;
            if self
                .check_file_header(&path, &hb[..n], &SEGMENT_MAGIC, index, removable)?
                .is_none()
            {
                continue;
            }
            let sf = Arc::new(SegFile { index, path, file });
            // A sealed segment (a later one exists) comes from its sidecar if that
            // verifies (its records are appended to `records` directly).
            let first = records.len();
            let from_sidecar = if last {
                None
            } else {
                match sidecar::load(
                    &sf,
                    flen,
                    self.ident.uuid,
                    self.ident.generation,
                    0,
                    &mut records,
                ) {
                    Ok(c) => Some(c),
                    Err(sidecar::Rejected::Missing) => None,
                    Err(sidecar::Rejected::Invalid(reason)) => {
                        warn!(path = %sf.path.display(), %reason, "index sidecar rejected: scanning the segment");
                        self.counters.index_load.rejected_sidecars += 1;
                        None
                    }
                }
            };
            let c = match from_sidecar {
                Some(c) => {
                    self.counters.index_load.sidecar_segments += 1;
                    c
                }
                None => {
                    self.counters.index_load.scanned_segments += 1;
                    let (mut c, bad) = sidecar::scan_segment(&sf, flen)?;
                    let (path, file) = (&sf.path, &sf.file);
                    if let Some((bpos, reason)) = bad {
                        if !last {
                            return Err(corrupt(path, bpos, reason));
                        }
                        let mut rest = vec![0u8; (flen - bpos) as usize];
                        let n = read_fill(file, &mut rest, bpos)
                            .map_err(ioe(|| format!("read {}", path.display())))?;
                        rest.truncate(n);
                        if later_valid(&rest, REC_COMMIT, valid_commit) {
                            return Err(corrupt(
                                path,
                                bpos,
                                format!(
                                    "{reason} (followed by committed records: not a torn tail)"
                                ),
                            ));
                        }
                        warn!(path = %path.display(), offset = bpos, %reason, "truncating torn journal tail");
                        file.set_len(bpos)
                            .and_then(|_| file.sync_all())
                            .map_err(ioe(|| format!("truncate {}", path.display())))?;
                        self.counters.torn_tails += 1;
                        c.len = bpos;
                    } else if !last {
                        // Sealed, scanned cleanly, no usable sidecar (older journal,
                        // crash before the sidecar, rejected one): write it now.
                        self.heal_sidecar(&sf, flen, &c);
                    }
                    c
                }
            };
            match c.commit {
                Some(cm) => {
                    self.applied_through = cm.id;
                    self.applied_seq = self.applied_seq.max(cm.max_seq);
                    self.applied_time_ns = cm.time_ns;
                    self.horizon_max = self.horizon_max.max(cm.max_horizon);
                    tail_start = first + c.before_last_commit;
                    direct.clear();
                    direct.extend(
                        c.flags[c.before_last_commit..]
                            .iter()
                            .map(|f| f & FLAG_DIRECT != 0),
                    );
                }
                None => direct.extend(c.flags.iter().map(|f| f & FLAG_DIRECT != 0)),
            }
            records.extend(c.records);
            self.segments.push(Segment { sf, len: c.len });
        }
        // Sidecars of the newest segment (it grows from here) or of no segment: stale.
        let newest = self.segments.last().map_or(0, |s| s.sf.index);
        let mut removed = false;
        for (i, p) in list_indexed(&jd, "idx")? {
            let has_seg = self.segments.iter().any(|s| s.sf.index == i);
            if i >= newest || !has_seg {
                std::fs::remove_file(&p).map_err(ioe(|| format!("remove {}", p.display())))?;
                removed = true;
            }
        }
        if removed {
            fsync_dir(&jd)?;
        }
        let top = records
            .iter()
            .map(|r| r.chunk_id)
            .max()
            .unwrap_or(0)
            .max(self.applied_through);
        if self.segments.is_empty() {
            let (file, path) = Self::write_segment_header(&jd, 0, &self.ident)?;
            fsync_dir(&jd)?;
            self.segments
                .push(Segment::new(0, path, file, FILE_HDR as u64));
        }
        // Uncommitted tail: verify payloads too (they may be torn although header+table are intact).
        let mut i = tail_start;
        while i < records.len() {
            let r = &records[i];
            let mut ok = true;
            for x in &r.extents {
                match undo_bytes(r, x) {
                    Ok(_) => {}
                    Err(JournalError::Corrupt { .. }) => {
                        ok = false;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            if !ok {
                let Some(seg) = self
                    .segments
                    .iter_mut()
                    .find(|s| Arc::ptr_eq(&s.sf, &r.seg))
                else {
                    return Err(JournalError::Poisoned);
                };
                warn!(path = %seg.sf.path.display(), offset = r.rec_off, "truncating torn journal tail (payload)");
                sidecar::remove_from(&jd, seg.sf.index)?;
                seg.sf
                    .file
                    .set_len(r.rec_off)
                    .and_then(|_| seg.sf.file.sync_all())
                    .map_err(ioe(|| format!("truncate {}", seg.sf.path.display())))?;
                seg.len = r.rec_off;
                self.counters.torn_tails += 1;
                records.truncate(i);
                break;
            }
            i += 1;
        }
        direct.truncate(records.len().saturating_sub(tail_start));
        if direct.iter().any(|d| *d) {
            if !direct.iter().all(|d| *d) {
                return Err(corrupt(
                    &jd,
                    0,
                    "uncommitted tail mixes direct and spooled chunks",
                ));
            }
            self.undo_direct_tail(&mut records, tail_start)?;
        }
        self.commit_written = self.applied_through;
        self.commit_synced = self.applied_through;
        self.counters.journal_records = records.len() as u64;
        Ok((records, tail_start, top))
    }

    /// Direct-applied chunks without a durable commit were never acknowledged and
    /// their data is in no spool: write their old data back (newest first, so the
    /// oldest wins), fdatasync the replica, then cut them from the journal.
    /// Idempotent until the cut, so a crash here is recovered by the next open.
    fn undo_direct_tail(
        &mut self,
        records: &mut VecDeque<UndoRec>,
        tail_start: usize,
    ) -> Result<()> {
        let tail = records.range(tail_start..);
        warn!(
            chunks = tail.len(),
            "undoing direct-applied chunks whose commit was not durable (never acknowledged)"
        );
        for r in tail.rev() {
            for x in r.extents.iter().rev() {
                let old = undo_bytes(r, x)?;
                self.replica.write_all_at(&old, x.offset).map_err(ioe(|| {
                    format!("write replica {}", self.replica_path.display())
                }))?;
            }
        }
        self.replica.sync_data().map_err(ioe(|| {
            format!("fdatasync replica {}", self.replica_path.display())
        }))?;
        let first = &records[tail_start];
        let (cut_seg, cut_off) = (first.seg.index, first.rec_off);
        sidecar::remove_from(&self.dir.join(JOURNAL_DIR), cut_seg)?;
        while self.segments.len() > 1 && self.segments.last().is_some_and(|s| s.sf.index > cut_seg)
        {
            if let Some(s) = self.segments.pop() {
                std::fs::remove_file(&s.sf.path)
                    .map_err(ioe(|| format!("remove {}", s.sf.path.display())))?;
            }
        }
        fsync_dir(&self.dir.join(JOURNAL_DIR))?;
        let Some(seg) = self.segments.last_mut() else {
            return Err(JournalError::Poisoned);
        };
        seg.sf
            .file
            .set_len(cut_off)
            .and_then(|_| seg.sf.file.sync_all())
            .map_err(ioe(|| format!("truncate {}", seg.sf.path.display())))?;
        seg.len = cut_off;
        self.counters.torn_tails += 1;
        records.truncate(tail_start);
        Ok(())
    }

    /// Read and validate one journal record at `pos` (file length `flen`) through
    /// `rd`. Corruption (and a record not complete yet) is reported as `Corrupt`.
    #[allow(clippy::type_complexity)]
    pub(crate) fn read_record(
        rd: &mut SegReader<'_>,
        pos: u64,
        flen: u64,
    ) -> Result<(RecHeader, Option<Vec<UndoExtent>>, u64)> {
        let p = Path::new("segment");
        let mut hb = [0u8; REC_HDR];
        let n = rd
            .read(&mut hb, pos)
            .map_err(ioe(|| "read segment".to_string()))?;
        if n < REC_HDR {
            return Err(corrupt(p, pos, "truncated record header"));
        }
        let h = decode_rec_header(&hb);
        let total = record_len(&h).ok_or_else(|| corrupt(p, pos, "length overflow"))?;
        if pos.checked_add(total).is_none_or(|e| e > flen) {
            return Err(corrupt(p, pos, "record extends past end of segment"));
        }
        let mut exact = |buf: &mut [u8], at: u64| -> Result<()> {
            let n = rd
                .read(buf, at)
                .map_err(ioe(|| "read segment".to_string()))?;
            if n < buf.len() {
                return Err(corrupt(p, pos, "record truncated"));
            }
            Ok(())
        };
        match h.magic {
            REC_COMMIT => {
                if h.body_len != 0 || h.n_extents != 0 {
                    return Err(corrupt(p, pos, "bad commit record"));
                }
                let mut t = [0u8; TRAILER];
                exact(&mut t, pos + REC_HDR as u64)?;
                if hash32(&hb) != t {
                    return Err(corrupt(p, pos, "commit checksum mismatch"));
                }
                Ok((h, None, total))
            }
            REC_UNDO => {
                let tl = (h.n_extents as u64)
                    .checked_mul(UNDO_ENTRY as u64)
                    .filter(|t| *t <= h.body_len)
                    .ok_or_else(|| corrupt(p, pos, "extent table larger than record"))?;
                let mut buf = vec![0u8; REC_HDR + tl as usize];
                buf[..REC_HDR].copy_from_slice(&hb);
                exact(&mut buf[REC_HDR..], pos + REC_HDR as u64)?;
                let mut t = [0u8; TRAILER];
                exact(&mut t, pos + REC_HDR as u64 + h.body_len)?;
                if hash32(&buf) != t {
                    return Err(corrupt(p, pos, "undo record checksum mismatch"));
                }
                let ex =
                    parse_undo_table(&h, &buf[REC_HDR..], pos).map_err(|r| corrupt(p, pos, r))?;
                Ok((h, Some(ex), total))
            }
            _ => Err(corrupt(p, pos, "bad record magic")),
        }
    }

    pub(crate) fn cur_seg(&self) -> &Segment {
        &self.segments[self.segments.len() - 1]
    }

    pub(crate) fn sync_journal(&mut self) -> Result<()> {
        let s = &self.cur_seg().sf;
        s.file
            .sync_data()
            .map_err(ioe(|| format!("fdatasync {}", s.path.display())))?;
        self.counters.fsyncs += 1;
        self.commit_synced = self.commit_written;
        Ok(())
    }

    pub(crate) fn new_segment(&mut self) -> Result<()> {
        let jd = self.dir.join(JOURNAL_DIR);
        let index = self.cur_seg().sf.index + 1;
        // The previous segment's tail (commit record) must be durable before we move on.
        self.sync_journal()?;
        // Sealed from here on: its index sidecar is durable before the next segment exists.
        self.seal_sidecar(self.segments.len() - 1)?;
        let (file, path) = Self::write_segment_header(&jd, index, &self.ident)?;
        self.counters.fsyncs += 1;
        self.faults.hit(FaultPoint::SegmentAfterCreate)?;
        fsync_dir(&jd)?;
        self.segments
            .push(Segment::new(index, path, file, FILE_HDR as u64));
        let all = self.segments();
        let changed = &all[all.len().saturating_sub(2)..];
        if let Some(c) = self.catalogue.as_mut() {
            if let Err(e) = c.update(changed) {
                // Derived data: the next open rebuilds it from the segments.
                warn!(error = %e, "catalogue update failed");
            }
        }
        Ok(())
    }
}

/// Old bytes of one undo extent, verified against its blake3 and decoded.
pub(crate) fn undo_bytes(r: &UndoRec, x: &UndoExtent) -> Result<Vec<u8>> {
    let seg = &r.seg;
    if x.enc == ENC_ZERO {
        return Ok(vec![0u8; x.len as usize]);
    }
    let mut stored = vec![0u8; x.stored_len as usize];
    seg.file
        .read_exact_at(&mut stored, x.file_off)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                corrupt(&seg.path, x.file_off, "undo payload truncated")
            } else {
                JournalError::Io {
                    context: format!("read {}", seg.path.display()),
                    source: e,
                }
            }
        })?;
    if hash32(&stored) != x.hash {
        return Err(corrupt(
            &seg.path,
            x.file_off,
            "undo payload checksum mismatch",
        ));
    }
    match x.enc {
        ENC_RAW => Ok(stored),
        ENC_LZ4 => {
            let mut d = vec![0u8; x.len as usize];
            let n = lz4_flex::block::decompress_into(&stored, &mut d)
                .map_err(|e| corrupt(&seg.path, x.file_off, format!("lz4: {e}")))?;
            if n as u64 != x.len {
                return Err(corrupt(&seg.path, x.file_off, "lz4 length mismatch"));
            }
            Ok(d)
        }
        _ => {
            let d = zstd::bulk::decompress(&stored, x.len as usize)
                .map_err(|e| corrupt(&seg.path, x.file_off, format!("zstd: {e}")))?;
            if d.len() as u64 != x.len {
                return Err(corrupt(&seg.path, x.file_off, "zstd length mismatch"));
            }
            Ok(d)
        }
    }
}

/// One undo extent before encoding into a record: `(offset, len, enc, stored bytes)`.
pub(crate) type UndoEntry = (u64, u64, u8, Vec<u8>);

/// Append an undo record (`h` gives magic, flags, id, seqs, time, aux; lengths are
/// computed) with `entries` to `out`. Returns the extents with `file_off`
/// relative to the start of `out`.
pub(crate) fn encode_undo_record(
    out: &mut Vec<u8>,
    h: &RecHeader,
    entries: &[UndoEntry],
) -> Vec<UndoExtent> {
    let rec_start = out.len();
    let nx = entries.len();
    let payload: u64 = entries.iter().map(|e| e.3.len() as u64).sum();
    let h = RecHeader {
        body_len: (nx * UNDO_ENTRY) as u64 + payload,
        n_extents: nx as u32,
        ..*h
    };
    encode_rec_header(&h, out);
    let mut ux = Vec::with_capacity(nx);
    let mut cur = (rec_start + REC_HDR + nx * UNDO_ENTRY) as u64;
    for (o, l, enc, stored) in entries {
        let hash = hash32(stored);
        out.extend_from_slice(&o.to_le_bytes());
        out.extend_from_slice(&l.to_le_bytes());
        out.extend_from_slice(&[*enc, 0, 0, 0, 0, 0, 0, 0]);
        out.extend_from_slice(&(stored.len() as u64).to_le_bytes());
        out.extend_from_slice(&hash);
        ux.push(UndoExtent {
            offset: *o,
            len: *l,
            enc: *enc,
            stored_len: stored.len() as u64,
            hash,
            file_off: cur,
        });
        cur += stored.len() as u64;
    }
    let th = hash32(&out[rec_start..]);
    for e in entries {
        out.extend_from_slice(&e.3);
    }
    out.extend_from_slice(&th);
    ux
}

/// Reads segment bytes through a 1 MiB window, so a scan of small records costs
/// one `pread` per window instead of three per record. Only for scans of bytes
/// that do not change while the reader lives (below a length measured before).
pub(crate) struct SegReader<'a> {
    file: &'a File,
    win: Vec<u8>,
    off: u64,
    len: usize,
}

impl<'a> SegReader<'a> {
    /// A buffered reader.
    pub(crate) fn new(file: &'a File) -> Self {
        SegReader {
            file,
            win: vec![0u8; 1 << 20],
            off: 0,
            len: 0,
        }
    }

    /// Fill `out` from file offset `pos`; returns the bytes available (short only at EOF).
    pub(crate) fn read(&mut self, out: &mut [u8], pos: u64) -> io::Result<usize> {
        if out.len() > self.win.len() / 2 {
            return read_fill(self.file, out, pos);
        }
        let end = pos + out.len() as u64;
        if pos < self.off || end > self.off + self.len as u64 {
            self.off = pos;
            self.len = read_fill(self.file, &mut self.win, pos)?;
        }
        let start = (pos - self.off) as usize;
        let n = out.len().min(self.len.saturating_sub(start));
        out[..n].copy_from_slice(&self.win[start..start + n]);
        Ok(n)
    }
}
