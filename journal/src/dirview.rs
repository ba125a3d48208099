//! Snapshot views opened from a target directory by another process (the DR
//! drill while the target daemon keeps applying): [`SnapshotView::open_dir`].
//!
//! The view builds a private index read-only (no lock, no repair): sealed
//! segments from their index sidecars when those verify against the open
//! segment file (`sidecar.rs`), the rest by scanning (it stops at the first
//! incomplete record of the newest segment),
//! and keeps every segment it indexed open, so the daemon deleting or
//! compacting segments never affects it (an unlinked file stays readable
//! through an open descriptor; its space is freed when the view closes).
//!
//! **Correctness while the daemon applies**: a read first reads the replica,
//! then *refreshes* the index (scans records appended since the last refresh,
//! and segments created since), then overlays the records newer than the point.
//! The daemon makes a batch's undo records complete in the segment (one pwrite,
//! then fdatasync) before its first replica write; so if the replica read saw
//! any byte of a batch, the refresh that follows finds that batch's records,
//! and they supply the old bytes. Records still being appended are incomplete
//! and not needed yet: the scan stops there and resumes next time.
//!
//! A view registers a **pin file** `<dir>/pins/<pid>-<n>.pin` (flock held while
//! it lives); rollback refuses while a live pin exists (it truncates segments in
//! place, which open descriptors would see).

use crate::bookmark::read_log_prefix;
use crate::error::{corrupt, ioe, JournalError, Result};
use crate::format::*;
use crate::fsutil::*;
use crate::identity::read_identity;
use crate::point::RecoveryPoint;
use crate::segment::{SegFile, SegReader, UndoRec};
use crate::sidecar;
use crate::view::{BasePoint, Index, Shared, SnapshotView};
use crate::{IndexLoad, TargetVolume, JOURNAL_DIR};
use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub(crate) const PINS_DIR: &str = "pins";
static PIN_SEQ: AtomicU64 = AtomicU64::new(0);

/// Scan position of a directory view: the newest segment and the offset of the
/// first record not indexed yet.
pub(crate) struct Tail {
    dir: PathBuf,
    ident_uuid: [u8; 16],
    generation: u64,
    seg: Option<Arc<SegFile>>,
    pos: u64,
    /// `seg` was just opened: try its sidecar before scanning it.
    fresh: bool,
    /// Append records without indexing them (the caller runs `Index::reindex`).
    bulk: bool,
    /// How the segments were loaded.
    pub(crate) load: IndexLoad,
}

/// A held pin file (removed when dropped).
pub(crate) struct PinFile {
    path: PathBuf,
    _lock: File,
}

impl Drop for PinFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl Tail {
    /// Whether the journal has grown since the last refresh (cheap: one fstat and
    /// one stat), so readers take the index write lock only when needed.
    pub(crate) fn has_news(&self) -> bool {
        let Some(sf) = &self.seg else { return true };
        match sf.file.metadata() {
            Ok(m) if m.len() > self.pos => return true,
            Ok(_) => {}
            Err(_) => return true,
        }
        self.dir
            .join(JOURNAL_DIR)
            .join(format!("{:016x}.seg", sf.index + 1))
            .exists()
            || sf.file.metadata().map_or(true, |m| m.nlink() == 0)
    }

    /// Index records from the tail position to the current end; open segments
    /// created since. Appends to `idx` (records stay in chunk id order).
    pub(crate) fn refresh(&mut self, idx: &mut Index) -> Result<()> {
        let mut rescanned = false;
        loop {
            let mut short = false;
            if let Some(sf) = self.seg.clone() {
                let flen = sf
                    .file
                    .metadata()
                    .map_err(ioe(|| format!("stat {}", sf.path.display())))?
                    .len();
                if std::mem::take(&mut self.fresh) {
                    self.load_sidecar(idx, &sf, flen);
                }
                short = true;
                let mut rd = SegReader::new(&sf.file);
                while self.pos < flen {
                    match TargetVolume::read_record(&mut rd, self.pos, flen) {
                        Ok((h, exts, len)) => {
                            take_record(idx, &sf, &h, exts, self.pos, self.bulk);
                            self.pos += len;
                        }
                        // incomplete (being appended) or torn: stop here, retry next time
                        Err(JournalError::Corrupt { .. }) => break,
                        Err(e) => return Err(e),
                    }
                }
                short = short && self.pos < flen;
            }
            crate::fault::view_refresh_hook();
            let next = self.seg.as_ref().map_or(0, |s| s.index + 1);
            let p = self.dir.join(JOURNAL_DIR).join(format!("{next:016x}.seg"));
            let file = match File::open(&p) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // Prune deletes segments oldest first: if ours is gone, the ones
                    // after it may be too, and their records would be missing.
                    if let Some(sf) = &self.seg {
                        let md = sf
                            .file
                            .metadata()
                            .map_err(ioe(|| format!("stat {}", sf.path.display())))?;
                        if md.nlink() == 0 {
                            return Err(JournalError::PointNotAvailable(format!(
                                "the journal after this view's point was pruned while the view was idle ({} deleted)",
                                sf.path.display()
                            )));
                        }
                    }
                    return Ok(());
                }
                Err(e) => {
                    return Err(JournalError::Io {
                        context: format!("open {}", p.display()),
                        source: e,
                    })
                }
            };
            if !short {
                if let Some(sf) = &self.seg {
                    // The length read above may be older than the next
                    // segment's existence: records appended after that stat,
                    // before the daemon sealed the segment and created the
                    // next one, must be read before moving on (skipping them
                    // left a view without their old data: wrong bytes).
                    let now = sf
                        .file
                        .metadata()
                        .map_err(ioe(|| format!("stat {}", sf.path.display())))?
                        .len();
                    if now > self.pos {
                        continue;
                    }
                }
            }
            if short {
                // The daemon syncs a segment before creating the next one: an
                // unreadable record before the end of a sealed segment is damage.
                if !rescanned {
                    rescanned = true;
                    continue;
                }
                let sf = self
                    .seg
                    .as_ref()
                    .map(|s| s.path.clone())
                    .unwrap_or_default();
                return Err(corrupt(&sf, self.pos, "bad record in a sealed segment"));
            }
            let mut hb = [0u8; FILE_HDR];
            let n =
                read_fill(&file, &mut hb, 0).map_err(ioe(|| format!("read {}", p.display())))?;
            match decode_file_header(&hb[..n], &SEGMENT_MAGIC) {
                Ok(h)
                    if h.uuid == self.ident_uuid
                        && h.generation == self.generation
                        && h.index == next => {}
                // being created: try again later
                Err(_) if n < FILE_HDR => return Ok(()),
                Ok(_) => {
                    return Err(corrupt(
                        &p,
                        0,
                        "segment belongs to another volume/generation/index",
                    ))
                }
                Err(r) => return Err(corrupt(&p, 0, r)),
            }
            self.seg = Some(Arc::new(SegFile {
                index: next,
                path: p,
                file,
            }));
            self.pos = FILE_HDR as u64;
            self.fresh = true;
            rescanned = false;
        }
    }

    /// A just-opened segment that is sealed (a later one exists): take its
    /// records and commits from its sidecar if that verifies against the open
    /// file, and move the scan position to its end; otherwise leave it to the scan.
    fn load_sidecar(&mut self, idx: &mut Index, sf: &Arc<SegFile>, flen: u64) {
        let sealed = self.pos == FILE_HDR as u64
            && self
                .dir
                .join(JOURNAL_DIR)
                .join(format!("{:016x}.seg", sf.index + 1))
                .exists();
        if sealed {
            // records at or below the base are pruned, at or below the last one indexed are known
            let after = idx
                .records
                .back()
                .map_or(0, |r| r.chunk_id)
                .max(idx.base.chunk_id);
            let first = idx.records.len();
            match sidecar::load(
                sf,
                flen,
                self.ident_uuid,
                self.generation,
                after,
                &mut idx.records,
            ) {
                Ok(c) => {
                    if let Some(cm) = c.commit {
                        idx.applied_through = cm.id;
                        idx.applied_seq = idx.applied_seq.max(cm.max_seq);
                        idx.applied_time_ns = cm.time_ns;
                    }
                    if !self.bulk {
                        idx.index_from(first);
                    }
                    self.pos = c.len;
                    self.load.sidecar_segments += 1;
                    return;
                }
                Err(sidecar::Rejected::Missing) => {}
                Err(sidecar::Rejected::Invalid(reason)) => {
                    tracing::warn!(path = %sf.path.display(), %reason, "index sidecar rejected: scanning the segment");
                    self.load.rejected_sidecars += 1;
                }
            }
        }
        self.load.scanned_segments += 1;
    }
}

fn take_record(
    idx: &mut Index,
    sf: &Arc<SegFile>,
    h: &RecHeader,
    exts: Option<Vec<crate::segment::UndoExtent>>,
    pos: u64,
    bulk: bool,
) {
    if h.magic == REC_COMMIT {
        idx.applied_through = h.id;
        idx.applied_seq = idx.applied_seq.max(h.last_seq);
        idx.applied_time_ns = h.time_ns;
        return;
    }
    let Some(extents) = exts else { return };
    let r = UndoRec::from_header(h, sf.clone(), pos, extents);
    add_record(idx, r, bulk);
}

/// Append `r` unless pruned (≤ base) or already indexed; `bulk`: without
/// indexing its extents (a `reindex` follows).
fn add_record(idx: &mut Index, r: UndoRec, bulk: bool) {
    if r.chunk_id <= idx.base.chunk_id
        || idx.records.back().is_some_and(|x| x.chunk_id >= r.chunk_id)
    {
        return;
    }
    if bulk {
        idx.records.push_back(r);
    } else {
        idx.push(r);
    }
}

/// Chunk ids pinned by live pin files in `dir` (stale ones, whose process died,
/// are removed). A pin file whose content is unreadable pins chunk 0 (everything).
pub(crate) fn live_pin_files(dir: &Path) -> Result<Vec<u64>> {
    let pd = dir.join(PINS_DIR);
    let rd = match fs::read_dir(&pd) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(JournalError::Io {
                context: format!("read {}", pd.display()),
                source: e,
            })
        }
    };
    let mut n = Vec::new();
    for e in rd {
        let e = e.map_err(ioe(|| format!("read {}", pd.display())))?;
        let p = e.path();
        if p.extension().is_none_or(|x| x != "pin") {
            continue;
        }
        match flock_path(&p)? {
            Some(_stale) => {
                let _ = fs::remove_file(&p);
            }
            None => {
                let c = fs::read_to_string(&p)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                n.push(c);
            }
        }
    }
    Ok(n)
}

impl SnapshotView {
    /// Open a view at `rp` from the target directory `dir` without taking the
    /// directory lock (the target daemon may be running and applying). Sealed
    /// segments are loaded from their index sidecars when those verify against
    /// the segment files (otherwise scanned); the newest segment is scanned
    /// (record headers and tables: no payload is read or copied).
    /// Errors as [`TargetVolume::resolve`]; the newest applied state is the last
    /// commit record found, so `Time` after it is `InFuture`.
    pub fn open_dir(dir: &Path, rp: &RecoveryPoint) -> Result<SnapshotView> {
        let (ident, replica_path) = read_identity(dir)?;
        let shared = Arc::new(Shared::new(&replica_path, ident.size)?);
        let mut tail = Tail {
            dir: dir.to_path_buf(),
            ident_uuid: ident.uuid,
            generation: ident.generation,
            seg: None,
            pos: 0,
            fresh: false,
            bulk: true,
            load: IndexLoad::default(),
        };
        let jd = dir.join(JOURNAL_DIR);
        let first = list_indexed(&jd, "seg")?.first().map(|(i, _)| *i);
        {
            let mut idx = shared.write();
            if let Some(b) = crate::retention::read_base(dir)? {
                idx.base = b;
            } else {
                idx.base = BasePoint {
                    consistent: true,
                    ..BasePoint::default()
                };
            }
            idx.bookmarks = read_log_prefix(dir)?;
            if let Some(f) = first {
                // start the scan at the oldest segment
                tail.seg = None;
                tail.pos = 0;
                let p = jd.join(format!("{f:016x}.seg"));
                let file = File::open(&p).map_err(ioe(|| format!("open {}", p.display())))?;
                let mut hb = [0u8; FILE_HDR];
                let n = read_fill(&file, &mut hb, 0)
                    .map_err(ioe(|| format!("read {}", p.display())))?;
                let h =
                    decode_file_header(&hb[..n], &SEGMENT_MAGIC).map_err(|r| corrupt(&p, 0, r))?;
                if h.uuid != ident.uuid || h.generation != ident.generation || h.index != f {
                    return Err(corrupt(
                        &p,
                        0,
                        "segment belongs to another volume/generation/index",
                    ));
                }
                tail.seg = Some(Arc::new(SegFile {
                    index: f,
                    path: p,
                    file,
                }));
                tail.pos = FILE_HDR as u64;
                tail.fresh = true;
            }
            tail.refresh(&mut idx)?;
            idx.reindex();
            tail.bulk = false;
            let bc = idx.base.chunk_id;
            idx.bookmarks.retain(|b| b.chunk_id >= bc);
        }
        let point = shared.read().resolve(rp, None)?;
        let pd = dir.join(PINS_DIR);
        fs::create_dir_all(&pd).map_err(ioe(|| format!("create {}", pd.display())))?;
        let path = pd.join(format!(
            "{}-{}.pin",
            std::process::id(),
            PIN_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let lock = flock_path(&path)?
            .ok_or_else(|| JournalError::Busy(format!("pin file {} is locked", path.display())))?;
        {
            use std::io::Write;
            let mut w = &lock;
            w.write_all(format!("{}\n", point.chunk_id).as_bytes())
                .map_err(ioe(|| format!("write {}", path.display())))?;
        }
        let pin = PinFile { path, _lock: lock };
        // Records pruned between the scan and the pin would be caught by the next
        // refresh (an error, never wrong data); check once now.
        {
            let mut idx = shared.write();
            tail.refresh(&mut idx)?;
        }
        SnapshotView::with_tail(shared, point, Mutex::new(tail), pin)
    }
}
