//! Per-segment index sidecars: `<dir>/journal/<16 hex>.idx` holds, for one
//! **sealed** segment, every undo record's header fields and extent table and a
//! summary of its commit records, so [`TargetVolume::open`] and
//! [`crate::SnapshotView::open_dir`] load sealed segments with one read
//! instead of scanning them record by record. Layout: `docs/journal-format.md`
//! ("Index sidecars").
//!
//! A sidecar is **derived data** and never trusted blindly: it is used only if
//! its checksum verifies, its header names this volume, generation and segment
//! index, and it matches the segment file as opened (the sealed length equals
//! the file length, the blake3 of the segment's file header and the segment's
//! last 32 bytes are equal); every entry is range-checked as well. Anything
//! else (missing, torn, stale, corrupt) makes the reader scan the segment, with
//! a warning when the sidecar existed. Writing is crash-safe (temporary file,
//! fsync, rename, directory fsync); every operation that deletes, truncates or
//! rewrites a segment removes or rewrites its sidecar first, and a sidecar
//! that still went stale is rejected by the match checks above.

use crate::error::{ioe, JournalError, Result};
use crate::format::*;
use crate::fsutil::*;
use crate::segment::{Extents, SegFile, SegReader, UndoExtent, UndoRec};
use crate::{TargetVolume, UNDO_PIECE};
use std::collections::VecDeque;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Sidecar magic.
pub(crate) const SIDECAR_MAGIC: [u8; 8] = *b"RWJSIDX1";
/// Sidecar layout version.
pub(crate) const SIDECAR_VERSION: u32 = 1;
/// Sidecar header length.
pub(crate) const SC_HDR: usize = 192;
/// Length of a record entry.
pub(crate) const SC_REC: usize = 64;
/// Length of an extent entry.
pub(crate) const SC_EXT: usize = 72;

/// The commit records of a segment, summarised.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CommitSummary {
    /// Chunk id of the last commit record.
    pub(crate) id: u64,
    /// Source time of the last commit record.
    pub(crate) time_ns: u64,
    /// Highest applied seq over the segment's commit records.
    pub(crate) max_seq: u64,
    /// Highest consistency horizon (commit `aux`) over the segment's commit records.
    pub(crate) max_horizon: u64,
}

/// What a segment holds, from a scan or from its sidecar.
pub(crate) struct SegContent {
    /// Undo records in file order (from a scan; [`load`] appends them to the
    /// caller's collection instead and leaves this empty).
    pub(crate) records: Vec<UndoRec>,
    /// Record flags (`FLAG_DIRECT`, `FLAG_MERGED`), parallel to `records`.
    pub(crate) flags: Vec<u8>,
    /// The commit records, if any.
    pub(crate) commit: Option<CommitSummary>,
    /// Undo records before the last commit record (all of them without one).
    pub(crate) before_last_commit: usize,
    /// Bytes of the segment covered (the end of the last valid record).
    pub(crate) len: u64,
}

/// Path of the sidecar of the segment at `seg_path` (`<idx>.seg` → `<idx>.idx`).
pub(crate) fn sidecar_path(seg_path: &Path) -> PathBuf {
    seg_path.with_extension("idx")
}

/// Scan `sf` from the first record to `flen`. Returns the content up to the first
/// bad or incomplete record and, if there is one, its offset and the reason.
pub(crate) fn scan_segment(
    sf: &Arc<SegFile>,
    flen: u64,
) -> Result<(SegContent, Option<(u64, String)>)> {
    let mut c = SegContent {
        records: Vec::new(),
        flags: Vec::new(),
        commit: None,
        before_last_commit: 0,
        len: FILE_HDR as u64,
    };
    let mut rd = SegReader::new(&sf.file);
    let mut pos = FILE_HDR as u64;
    while pos < flen {
        match TargetVolume::read_record(&mut rd, pos, flen) {
            Ok((h, exts, len)) => {
                if h.magic == REC_COMMIT {
                    let s = c.commit.get_or_insert_with(CommitSummary::default);
                    s.id = h.id;
                    s.time_ns = h.time_ns;
                    s.max_seq = s.max_seq.max(h.last_seq);
                    s.max_horizon = s.max_horizon.max(h.aux);
                    c.before_last_commit = c.records.len();
                } else if let Some(extents) = exts {
                    c.flags.push(h.flags);
                    c.records
                        .push(UndoRec::from_header(&h, sf.clone(), pos, extents));
                }
                pos += len;
            }
            Err(JournalError::Corrupt { reason, .. }) => {
                c.len = pos;
                if c.commit.is_none() {
                    c.before_last_commit = c.records.len();
                }
                return Ok((c, Some((pos, reason))));
            }
            Err(e) => return Err(e),
        }
    }
    c.len = pos;
    if c.commit.is_none() {
        c.before_last_commit = c.records.len();
    }
    Ok((c, None))
}

/// The match data of a segment file: blake3 of its file header and its last 32 bytes.
fn segment_marks(file: &File, len: u64) -> std::io::Result<([u8; 32], [u8; 32])> {
    let mut hb = [0u8; FILE_HDR];
    file.read_exact_at(&mut hb, 0)?;
    let mut tail = [0u8; 32];
    file.read_exact_at(&mut tail, len - 32)?;
    Ok((hash32(&hb), tail))
}

/// Encode the sidecar of a segment (`c` covers the whole segment, `c.len` bytes).
pub(crate) fn encode(
    uuid: [u8; 16],
    generation: u64,
    index: u64,
    marks: ([u8; 32], [u8; 32]),
    c: &SegContent,
) -> Vec<u8> {
    let n_ext: usize = c.records.iter().map(|r| r.extents.len()).sum();
    let mut b = Vec::with_capacity(SC_HDR + c.records.len() * SC_REC + n_ext * SC_EXT + 32);
    b.extend_from_slice(&SIDECAR_MAGIC);
    b.extend_from_slice(&SIDECAR_VERSION.to_le_bytes());
    b.extend_from_slice(&(SC_HDR as u32).to_le_bytes());
    b.extend_from_slice(&uuid);
    let cs = c.commit.unwrap_or_default();
    for v in [
        generation,
        index,
        c.len,
        c.records.len() as u64,
        n_ext as u64,
        c.commit.is_some() as u64,
        cs.id,
        cs.time_ns,
        cs.max_seq,
        c.before_last_commit as u64,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&marks.0);
    b.extend_from_slice(&marks.1);
    b.extend_from_slice(&cs.max_horizon.to_le_bytes());
    b.resize(SC_HDR, 0);
    let mut first_ext = 0u64;
    for (r, fl) in c.records.iter().zip(&c.flags) {
        for v in [
            r.chunk_id,
            r.first_seq,
            r.last_seq,
            r.time_ns,
            r.rec_off,
            r.merged_from,
            first_ext,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&(r.extents.len() as u32).to_le_bytes());
        b.extend_from_slice(&[*fl, 0, 0, 0]);
        first_ext += r.extents.len() as u64;
    }
    for r in &c.records {
        for x in &r.extents {
            for v in [x.offset, x.len, x.stored_len, x.file_off] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.extend_from_slice(&[x.enc, 0, 0, 0, 0, 0, 0, 0]);
            b.extend_from_slice(&x.hash);
        }
    }
    let h = hash32(&b);
    b.extend_from_slice(&h);
    b
}

/// Why a sidecar was not used.
pub(crate) enum Rejected {
    /// No sidecar file (never written, or removed): scanning is the normal path.
    Missing,
    /// A sidecar exists but is torn, corrupt or stale.
    Invalid(String),
}

/// Load the sidecar of the sealed segment `sf` (file length `flen`), checking it
/// against the segment as described in the module documentation. Its undo
/// records with a chunk id above `after` are appended to `out` (nothing is
/// appended when it is rejected); `flags` in the result covers all of them.
pub(crate) fn load(
    sf: &Arc<SegFile>,
    flen: u64,
    uuid: [u8; 16],
    generation: u64,
    after: u64,
    out: &mut VecDeque<UndoRec>,
) -> std::result::Result<SegContent, Rejected> {
    let p = sidecar_path(&sf.path);
    let f = match File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Rejected::Missing),
        Err(e) => return Err(Rejected::Invalid(format!("open: {e}"))),
    };
    // SAFETY: the map is read-only and private to this call: it is checksummed,
    // decoded into owned memory and dropped before `load` returns. rewind never
    // modifies or truncates a sidecar in place (new ones are renamed over, old
    // ones unlinked: a mapped inode stays intact), so the bytes cannot change
    // under the map unless another program writes the file in place.
    let b = match unsafe { memmap2::MmapOptions::new().populate().map(&f) } {
        Ok(m) => m,
        Err(e) => return Err(Rejected::Invalid(format!("map: {e}"))),
    };
    let n = out.len();
    decode(&b, sf, flen, uuid, generation, after, out).map_err(|r| {
        out.truncate(n);
        Rejected::Invalid(r)
    })
}

fn decode(
    b: &[u8],
    sf: &Arc<SegFile>,
    flen: u64,
    uuid: [u8; 16],
    generation: u64,
    after: u64,
    out: &mut VecDeque<UndoRec>,
) -> std::result::Result<SegContent, String> {
    if b.len() < SC_HDR + 32 {
        return Err(format!("short sidecar ({} bytes)", b.len()));
    }
    if b[0..8] != SIDECAR_MAGIC {
        return Err("bad sidecar magic".into());
    }
    let (body, sum) = b.split_at(b.len() - 32);
    if hash32(body) != sum {
        return Err("sidecar checksum mismatch".into());
    }
    let v = rd32(b, 8);
    if v != SIDECAR_VERSION {
        return Err(format!("unsupported sidecar version {v}"));
    }
    if rd32(b, 12) as usize != SC_HDR {
        return Err("unexpected sidecar header length".into());
    }
    if b[16..32] != uuid || rd64(b, 32) != generation {
        return Err("sidecar belongs to another volume or generation".into());
    }
    if rd64(b, 40) != sf.index {
        return Err(format!(
            "sidecar of segment {} found for segment {}",
            rd64(b, 40),
            sf.index
        ));
    }
    let sealed_len = rd64(b, 48);
    if sealed_len != flen || sealed_len < (FILE_HDR + 32) as u64 {
        return Err(format!(
            "stale sidecar: covers {sealed_len} bytes, segment has {flen}"
        ));
    }
    let marks = segment_marks(&sf.file, sealed_len).map_err(|e| format!("read segment: {e}"))?;
    if b[112..144] != marks.0 || b[144..176] != marks.1 {
        return Err("stale sidecar: segment header or tail differs".into());
    }
    let n_rec = rd64(b, 56);
    let n_ext = rd64(b, 64);
    let expect = n_rec
        .checked_mul(SC_REC as u64)
        .and_then(|r| {
            n_ext
                .checked_mul(SC_EXT as u64)
                .and_then(|x| x.checked_add(r))
        })
        .and_then(|x| x.checked_add((SC_HDR + 32) as u64));
    if expect != Some(b.len() as u64) {
        return Err("sidecar length does not match its entry counts".into());
    }
    let (n_rec, n_ext) = (n_rec as usize, n_ext as usize);
    let commit = match rd64(b, 72) {
        0 => None,
        1 => Some(CommitSummary {
            id: rd64(b, 80),
            time_ns: rd64(b, 88),
            max_seq: rd64(b, 96),
            max_horizon: rd64(b, 176),
        }),
        x => return Err(format!("bad commit flag {x}")),
    };
    let before_last_commit = rd64(b, 104);
    if before_last_commit > n_rec as u64 {
        return Err("bad commit position".into());
    }
    let recs = &b[SC_HDR..SC_HDR + n_rec * SC_REC];
    let exts = &b[SC_HDR + n_rec * SC_REC..SC_HDR + n_rec * SC_REC + n_ext * SC_EXT];
    if n_ext > u32::MAX as usize {
        return Err("too many extent entries".into());
    }
    // Pass 1: check every entry and decode all extents into one shared array.
    let mut all: Vec<UndoExtent> = Vec::with_capacity(n_ext);
    let mut last_id: Option<u64> = None;
    let mut flags = Vec::with_capacity(n_rec);
    let mut next_ext = 0usize;
    let mut min_off = FILE_HDR as u64;
    for i in 0..n_rec {
        let e = &recs[i * SC_REC..(i + 1) * SC_REC];
        let rec_off = rd64(e, 32);
        let first = rd64(e, 48);
        let nx = rd32(e, 56) as usize;
        if first != next_ext as u64 || nx > n_ext - next_ext {
            return Err(format!("bad extent range of record {i}"));
        }
        if rec_off < min_off || rec_off >= sealed_len {
            return Err(format!("bad offset of record {i}"));
        }
        let mut cur = rec_off + (REC_HDR + nx * UNDO_ENTRY) as u64;
        for k in next_ext..next_ext + nx {
            let x = &exts[k * SC_EXT..(k + 1) * SC_EXT];
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&x[40..72]);
            let ux = UndoExtent {
                offset: rd64(x, 0),
                len: rd64(x, 8),
                stored_len: rd64(x, 16),
                file_off: rd64(x, 24),
                enc: x[32],
                hash,
            };
            let ok = match ux.enc {
                ENC_RAW => ux.stored_len == ux.len,
                ENC_ZSTD | ENC_LZ4 => true,
                ENC_ZERO => ux.stored_len == 0,
                _ => false,
            };
            if !ok || ux.len > UNDO_PIECE || ux.file_off != cur {
                return Err(format!("bad extent {k}"));
            }
            cur = cur
                .checked_add(ux.stored_len)
                .filter(|c| *c + TRAILER as u64 <= sealed_len)
                .ok_or_else(|| format!("extent {k} past the segment"))?;
            all.push(ux);
        }
        next_ext += nx;
        min_off = cur + TRAILER as u64;
        let chunk_id = rd64(e, 0);
        if last_id.is_some_and(|l| l >= chunk_id) {
            return Err(format!("chunk ids not increasing at record {i}"));
        }
        last_id = Some(chunk_id);
        flags.push(e[60]);
    }
    // Pass 2: the records, sharing the extent array.
    let all: Arc<Vec<UndoExtent>> = Arc::new(all);
    out.reserve(n_rec);
    for i in 0..n_rec {
        let e = &recs[i * SC_REC..(i + 1) * SC_REC];
        let chunk_id = rd64(e, 0);
        if chunk_id <= after {
            continue;
        }
        out.push_back(UndoRec {
            chunk_id,
            first_seq: rd64(e, 8),
            last_seq: rd64(e, 16),
            time_ns: rd64(e, 24),
            seg: sf.clone(),
            inconsistent: e[60] & FLAG_INCONSISTENT != 0,
            merged_from: rd64(e, 40),
            rec_off: rd64(e, 32),
            extents: Extents::Shared {
                all: all.clone(),
                start: rd64(e, 48) as u32,
                len: rd32(e, 56),
            },
        });
    }
    if next_ext != n_ext {
        return Err("extent entries not all used".into());
    }
    Ok(SegContent {
        records: Vec::new(),
        flags,
        commit,
        before_last_commit: before_last_commit as usize,
        len: sealed_len,
    })
}

/// Remove the sidecar (and any temporary one) of segment `index` in the journal
/// directory `jd`. Missing files are fine. The caller fsyncs `jd` when it matters.
pub(crate) fn remove(jd: &Path, index: u64) -> Result<()> {
    for name in [format!("{index:016x}.idx"), format!("{index:016x}.idx.tmp")] {
        let p = jd.join(name);
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(JournalError::Io {
                    context: format!("remove {}", p.display()),
                    source: e,
                })
            }
        }
    }
    Ok(())
}

/// Remove every sidecar of segment `index` and later ones (before truncating or
/// deleting them), then fsync `jd`.
pub(crate) fn remove_from(jd: &Path, index: u64) -> Result<()> {
    let mut any = false;
    for ext in ["idx", "idx.tmp"] {
        for (i, p) in list_indexed(jd, ext)? {
            if i >= index {
                fs::remove_file(&p).map_err(ioe(|| format!("remove {}", p.display())))?;
                any = true;
            }
        }
    }
    if any {
        fsync_dir(jd)?;
    }
    Ok(())
}

impl TargetVolume {
    /// Write the sidecar of the sealed segment `si` (its length is final): scan
    /// it (the bytes were just written, they are in the page cache), encode,
    /// write `<idx>.idx.tmp`, fsync, rename, fsync the directory. A segment that
    /// does not scan cleanly to its end gets no sidecar (logged).
    pub(crate) fn write_sidecar(&mut self, si: usize) -> Result<()> {
        let jd = self.dir.join(crate::JOURNAL_DIR);
        let (sf, len) = (self.segments[si].sf.clone(), self.segments[si].len);
        let flen = sf
            .file
            .metadata()
            .map_err(ioe(|| format!("stat {}", sf.path.display())))?
            .len();
        if flen != len || len < (FILE_HDR + 32) as u64 {
            tracing::warn!(path = %sf.path.display(), len, flen, "segment length unsettled: no index sidecar");
            return remove(&jd, sf.index);
        }
        let (c, bad) = scan_segment(&sf, flen)?;
        if let Some((pos, reason)) = bad {
            tracing::warn!(path = %sf.path.display(), offset = pos, %reason, "sealed segment does not scan cleanly: no index sidecar");
            return remove(&jd, sf.index);
        }
        self.store_sidecar(&sf, flen, &c)
    }

    /// Write the sidecar of `sf` (length `flen`, content `c` from a clean scan).
    fn store_sidecar(&mut self, sf: &Arc<SegFile>, flen: u64, c: &SegContent) -> Result<()> {
        let jd = self.dir.join(crate::JOURNAL_DIR);
        let marks =
            segment_marks(&sf.file, flen).map_err(ioe(|| format!("read {}", sf.path.display())))?;
        let bytes = encode(self.ident.uuid, self.ident.generation, sf.index, marks, c);
        let fin = sidecar_path(&sf.path);
        let tmp = jd.join(format!("{:016x}.idx.tmp", sf.index));
        let f = File::create(&tmp).map_err(ioe(|| format!("create {}", tmp.display())))?;
        f.write_all_at(&bytes, 0)
            .and_then(|_| f.sync_all())
            .map_err(ioe(|| format!("write {}", tmp.display())))?;
        self.faults
            .hit(crate::fault::FaultPoint::SidecarAfterWrite)?;
        fs::rename(&tmp, &fin).map_err(ioe(|| format!("rename {}", tmp.display())))?;
        fsync_dir(&jd)?;
        self.faults
            .hit(crate::fault::FaultPoint::SidecarAfterRename)
    }

    /// At open: write the missing sidecar of a sealed segment that was scanned
    /// cleanly (`c`). Failures are logged only (the next open scans again).
    pub(crate) fn heal_sidecar(&mut self, sf: &Arc<SegFile>, flen: u64, c: &SegContent) {
        if flen < (FILE_HDR + 32) as u64 {
            return;
        }
        if let Err(e) = self.store_sidecar(sf, flen, c) {
            tracing::warn!(error = %e, segment = sf.index, "index sidecar not written at open");
            let _ = remove(&self.dir.join(crate::JOURNAL_DIR), sf.index);
        }
    }

    /// [`TargetVolume::write_sidecar`] as part of sealing: the sidecar is derived
    /// data, so an I/O error is logged (the segment will be scanned instead) and
    /// does not fail the caller; an injected fault does (crash tests).
    pub(crate) fn seal_sidecar(&mut self, si: usize) -> Result<()> {
        match self.write_sidecar(si) {
            Ok(()) => Ok(()),
            Err(e @ JournalError::Injected(_)) => Err(e),
            Err(e) => {
                let jd = self.dir.join(crate::JOURNAL_DIR);
                let index = self.segments[si].sf.index;
                tracing::warn!(error = %e, segment = index, "index sidecar not written (the segment will be scanned at open)");
                // Never leave a sidecar that may not match (best effort: a stale one is rejected anyway).
                let _ = remove(&jd, index);
                Ok(())
            }
        }
    }
}
