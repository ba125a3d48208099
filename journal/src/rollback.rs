//! Rollback for failover: bring the replica itself back to a recovery point by
//! writing back the undo records newer than it (newest first), then cut the
//! journal there. Crash-safe through an intent file `<dir>/rollback`:
//!
//! * **phase 1** (intent written and synced): spool files are deleted, every
//!   undo record after the point is written to the replica newest first, the
//!   replica is fdatasync'ed, the intent moves to phase 2. Redoing phase 1 after
//!   a crash is exact whatever the replica holds: nothing of the journal has
//!   been removed yet, and writing back all records after the point, newest
//!   first, leaves every byte covered by one of them with the oldest one's old
//!   data (its value at the point); bytes covered by none were not written since.
//! * **phase 2** (replica done): segments after the cut are deleted, the cut
//!   segment is truncated at the first record after the point, a commit record
//!   for the point is appended and synced, bookmarks after the point are
//!   dropped, and the intent is removed. Every step is idempotent.
//!
//! [`TargetVolume::open`] finishes an interrupted rollback before anything else.

use crate::bookmark::{read_log_prefix, write_log};
use crate::error::{corrupt, ioe, JournalError, Result};
use crate::fault::{FaultPoint, Faults};
use crate::format::*;
use crate::fsutil::*;
use crate::point::{RecoveryPoint, ResolvedPoint};
use crate::segment::{undo_bytes, SegFile, SegReader, UndoRec};
use crate::{TargetVolume, VolumeIdentity, JOURNAL_DIR, SPOOL_DIR};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use tracing::{info, warn};

pub(crate) const ROLLBACK_FILE: &str = "rollback";
const ROLLBACK_TMP: &str = "rollback.tmp";
const ROLLBACK_MAGIC: [u8; 8] = *b"RWRBACK1";
const INTENT_LEN: usize = 96;

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackReport {
    /// The point the replica now holds.
    pub point: ResolvedPoint,
    /// Undo records written back to the replica.
    pub undone_records: u64,
    /// Spooled, unapplied chunks discarded.
    pub discarded_chunks: u64,
    /// Bookmarks after the point that were dropped.
    pub dropped_bookmarks: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Intent {
    phase: u32,
    chunk_id: u64,
    seq: u64,
    time_ns: u64,
    /// First record after the point: segment index and offset (the cut).
    seg: u64,
    off: u64,
}

fn encode(i: &Intent) -> [u8; INTENT_LEN] {
    let mut b = [0u8; INTENT_LEN];
    b[0..8].copy_from_slice(&ROLLBACK_MAGIC);
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    b[12..16].copy_from_slice(&i.phase.to_le_bytes());
    b[16..24].copy_from_slice(&i.chunk_id.to_le_bytes());
    b[24..32].copy_from_slice(&i.seq.to_le_bytes());
    b[32..40].copy_from_slice(&i.time_ns.to_le_bytes());
    b[40..48].copy_from_slice(&i.seg.to_le_bytes());
    b[48..56].copy_from_slice(&i.off.to_le_bytes());
    let h = hash32(&b[..64]);
    b[64..96].copy_from_slice(&h);
    b
}

fn decode(b: &[u8], path: &Path) -> Result<Intent> {
    if b.len() != INTENT_LEN || b[0..8] != ROLLBACK_MAGIC || hash32(&b[..64]) != b[64..96] {
        return Err(corrupt(path, 0, "bad rollback intent file"));
    }
    let v = rd32(b, 8);
    if v != 1 {
        return Err(corrupt(
            path,
            0,
            format!("unsupported rollback intent version {v}"),
        ));
    }
    let phase = rd32(b, 12);
    if phase != 1 && phase != 2 {
        return Err(corrupt(path, 0, format!("bad rollback phase {phase}")));
    }
    Ok(Intent {
        phase,
        chunk_id: rd64(b, 16),
        seq: rd64(b, 24),
        time_ns: rd64(b, 32),
        seg: rd64(b, 40),
        off: rd64(b, 48),
    })
}

fn write_intent(dir: &Path, i: &Intent) -> Result<()> {
    crate::bookmark::atomic_write(dir, ROLLBACK_TMP, ROLLBACK_FILE, &encode(i))
}

/// Finish an interrupted rollback, if `<dir>/rollback` exists. Returns whether one ran.
pub(crate) fn resume(
    dir: &Path,
    ident: &VolumeIdentity,
    replica: &File,
    faults: &mut Faults,
) -> Result<bool> {
    let p = dir.join(ROLLBACK_FILE);
    let b = match fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(JournalError::Io {
                context: format!("read {}", p.display()),
                source: e,
            })
        }
    };
    let i = decode(&b, &p)?;
    warn!(dir = %dir.display(), phase = i.phase, chunk = i.chunk_id, "finishing an interrupted rollback");
    run(dir, ident, replica, i, faults)?;
    Ok(true)
}

/// The undo records from the cut to the end of the journal, oldest first.
fn records_after_cut(dir: &Path, i: &Intent) -> Result<Vec<UndoRec>> {
    let jd = dir.join(JOURNAL_DIR);
    let mut out = Vec::new();
    for (index, path) in list_indexed(&jd, "seg")? {
        if index < i.seg {
            continue;
        }
        let file = File::open(&path).map_err(ioe(|| format!("open {}", path.display())))?;
        let flen = file
            .metadata()
            .map_err(ioe(|| format!("stat {}", path.display())))?
            .len();
        let sf = Arc::new(SegFile { index, path, file });
        let mut pos = if index == i.seg {
            i.off
        } else {
            FILE_HDR as u64
        };
        let mut rd = SegReader::new(&sf.file);
        while pos < flen {
            let (h, exts, len) =
                TargetVolume::read_record(&mut rd, pos, flen).map_err(|e| match e {
                    JournalError::Corrupt { offset, reason, .. } => {
                        corrupt(&sf.path, offset, reason)
                    }
                    e => e,
                })?;
            if let Some(extents) = exts {
                out.push(UndoRec {
                    chunk_id: h.id,
                    first_seq: h.first_seq,
                    last_seq: h.last_seq,
                    time_ns: h.time_ns,
                    seg: sf.clone(),
                    inconsistent: h.flags & FLAG_INCONSISTENT != 0,
                    merged_from: 0,
                    rec_off: pos,
                    extents: extents.into(),
                });
            }
            pos += len;
        }
    }
    Ok(out)
}

/// Run the rollback from the phase recorded in `i`. Returns the records undone.
fn run(
    dir: &Path,
    ident: &VolumeIdentity,
    replica: &File,
    mut i: Intent,
    faults: &mut Faults,
) -> Result<u64> {
    let mut undone = 0u64;
    if i.phase == 1 {
        // The spool holds only chunks after the point (or already applied ones).
        let sd = dir.join(SPOOL_DIR);
        for (_, p) in list_indexed(&sd, "spl")? {
            fs::remove_file(&p).map_err(ioe(|| format!("remove {}", p.display())))?;
        }
        fsync_dir(&sd)?;
        let recs = records_after_cut(dir, &i)?;
        for (n, r) in recs.iter().rev().enumerate() {
            if r.chunk_id <= i.chunk_id {
                return Err(corrupt(
                    &r.seg.path,
                    r.rec_off,
                    format!("record of chunk {} after the rollback cut", r.chunk_id),
                ));
            }
            for x in r.extents.iter().rev() {
                let old = undo_bytes(r, x)?;
                replica
                    .write_all_at(&old, x.offset)
                    .map_err(ioe(|| "write replica (rollback)".to_string()))?;
            }
            undone += 1;
            if n == 0 {
                faults.hit(FaultPoint::RollbackMidUndo)?;
            }
        }
        replica
            .sync_data()
            .map_err(ioe(|| "fdatasync replica (rollback)".to_string()))?;
        faults.hit(FaultPoint::RollbackAfterUndo)?;
        i.phase = 2;
        write_intent(dir, &i)?;
        faults.hit(FaultPoint::RollbackAfterPhase2)?;
    }
    // Phase 2: cut the journal. Sidecars of the cut segment and later ones go
    // first (they would describe bytes about to be removed).
    let jd = dir.join(JOURNAL_DIR);
    crate::sidecar::remove_from(&jd, i.seg)?;
    let mut later: Vec<_> = list_indexed(&jd, "seg")?
        .into_iter()
        .filter(|(x, _)| *x > i.seg)
        .collect();
    later.reverse();
    for (_, p) in &later {
        fs::remove_file(p).map_err(ioe(|| format!("remove {}", p.display())))?;
    }
    fsync_dir(&jd)?;
    let sp = jd.join(format!("{:016x}.seg", i.seg));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&sp)
        .map_err(ioe(|| format!("open {}", sp.display())))?;
    let len = f
        .metadata()
        .map_err(ioe(|| format!("stat {}", sp.display())))?
        .len();
    // Horizon 0: the rolled-back journal ends at a consistent point (rollback
    // refuses others) and replication restarts from it with a resync.
    let commit = encode_commit(i.chunk_id, i.seq, i.time_ns, 0);
    let done = len == i.off + commit.len() as u64 && {
        let mut b = vec![0u8; commit.len()];
        f.read_exact_at(&mut b, i.off).is_ok() && b == commit
    };
    if !done {
        if len < i.off {
            return Err(corrupt(&sp, len, "segment shorter than the rollback cut"));
        }
        f.set_len(i.off)
            .and_then(|_| f.sync_all())
            .map_err(ioe(|| format!("truncate {}", sp.display())))?;
        faults.hit(FaultPoint::RollbackAfterTruncate)?;
        f.write_all_at(&commit, i.off)
            .and_then(|_| f.sync_data())
            .map_err(ioe(|| format!("append {}", sp.display())))?;
        faults.hit(FaultPoint::RollbackAfterCommit)?;
    }
    let bms = read_log_prefix(dir)?;
    let keep: Vec<_> = bms
        .iter()
        .filter(|b| b.chunk_id <= i.chunk_id)
        .cloned()
        .collect();
    if keep.len() != bms.len() {
        write_log(dir, ident, &keep)?;
    }
    fs::remove_file(dir.join(ROLLBACK_FILE)).map_err(ioe(|| {
        format!("remove {}", dir.join(ROLLBACK_FILE).display())
    }))?;
    fsync_dir(dir)?;
    Ok(undone)
}

impl TargetVolume {
    /// Roll the replica itself back to `rp` (failover): undo records newer than
    /// the point are written back to the replica newest first, then the journal
    /// after the point is discarded; `durable_seq`/`applied_seq` become the
    /// point's seq, bookmarks after it are dropped. Crash-safe (module docs):
    /// an interrupted rollback is finished by the next open.
    ///
    /// Refused with `Busy` while snapshot views are open, or while the spool holds
    /// unapplied chunks unless `discard_spool` (they are then dropped). The point
    /// must be consistent (`Inconsistent` otherwise).
    pub fn rollback_to(
        &mut self,
        rp: &RecoveryPoint,
        discard_spool: bool,
    ) -> Result<RollbackReport> {
        self.check()?;
        self.check_idle("rollback")?;
        let views = self.shared.live_views()? + crate::dirview::live_pin_files(&self.dir)?.len();
        if views > 0 {
            return Err(JournalError::Busy(format!(
                "{views} snapshot view(s) open; close them before a rollback"
            )));
        }
        if !self.pending.is_empty() && !discard_spool {
            return Err(JournalError::Busy(format!(
                "{} spooled chunk(s) not applied; apply them or discard the spool",
                self.pending.len()
            )));
        }
        let point = self.resolve(rp)?;
        if !point.consistent {
            return Err(JournalError::Inconsistent(format!(
                "refusing to roll back to an inconsistent point (chunk {})",
                point.chunk_id
            )));
        }
        let (seg, off, n_after) = {
            let idx = self.index();
            let k = idx.after(point.chunk_id);
            match idx.records.get(k) {
                Some(r) => (r.seg.index, r.rec_off, (idx.records.len() - k) as u64),
                None => {
                    let s = self.cur_seg();
                    (s.sf.index, s.len, 0)
                }
            }
        };
        let discarded = self.pending.len() as u64;
        let bookmarks_before = self.index().bookmarks.len() as u64;
        let intent = Intent {
            phase: 1,
            chunk_id: point.chunk_id,
            seq: point.seq,
            time_ns: point.source_time_ns,
            seg,
            off,
        };
        let r = (|| {
            self.sync_journal()?;
            write_intent(&self.dir, &intent)?;
            self.faults.hit(FaultPoint::RollbackAfterIntent)?;
            run(
                &self.dir,
                &self.ident,
                &self.replica,
                intent,
                &mut self.faults,
            )
        })();
        let undone = self.guard(r)?;
        debug_assert_eq!(undone, n_after);
        info!(dir = %self.dir.display(), chunk = point.chunk_id, seq = point.seq, undone, discarded, "replica rolled back");
        // Reload in place (same lock: a dup of the locked descriptor keeps the flock).
        let lock = self
            ._lock
            .try_clone()
            .map_err(ioe(|| "dup lock descriptor".to_string()))?;
        let fresh = Self::open_locked(&self.dir.clone(), self.opts.clone(), lock);
        *self = self.guard(fresh)?;
        let dropped = bookmarks_before.saturating_sub(self.index().bookmarks.len() as u64);
        Ok(RollbackReport {
            point,
            undone_records: undone,
            discarded_chunks: discarded,
            dropped_bookmarks: dropped,
        })
    }
}
