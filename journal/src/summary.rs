//! The retention summary (`cdpcli --showsummary --vol=V`).

use crate::catalogue::CATALOGUE_VERSION;
use crate::error::Result;
use crate::fsutil::fs_free_bytes;
use crate::{SegmentInfo, TargetVolume, CATALOGUE_FILE};
use std::path::PathBuf;

/// What `--showsummary` prints for one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Path of the SQLite catalogue.
    pub database_path: PathBuf,
    /// Catalogue schema version.
    pub catalogue_version: i64,
    /// Kind of log kept ("undo journal (copy-on-write)").
    pub log_type: &'static str,
    /// Bytes of journal segments.
    pub journal_bytes: u64,
    /// Bytes of spool files.
    pub spool_bytes: u64,
    /// Journal + spool + catalogue + bookmark log bytes.
    pub disk_used_bytes: u64,
    /// Free bytes on the filesystem of the target directory.
    pub disk_free_bytes: u64,
    /// The journal segments (data files), oldest first.
    pub data_files: Vec<SegmentInfo>,
    /// Source-time range of recoverable points `(oldest, latest)`.
    pub recovery_time_range: (u64, u64),
    /// Sub-ranges in which every time is a consistent point.
    pub consistent_ranges: Vec<(u64, u64)>,
    /// Bookmarks recorded / available now.
    pub bookmarks: (usize, usize),
    /// Retention policy in force and the window it achieves (see [`crate::RetentionStatus`]).
    pub retention: crate::RetentionStatus,
}

impl TargetVolume {
    /// The retention summary. Reads only metadata (no payload).
    pub fn summary(&self) -> Result<Summary> {
        let rp = self.recovery_points()?;
        let c = self.counters();
        let file_len = |n: &str| std::fs::metadata(self.dir.join(n)).map_or(0, |m| m.len());
        let extra = file_len(CATALOGUE_FILE)
            + file_len(&format!("{CATALOGUE_FILE}-wal"))
            + file_len(crate::bookmark::BOOKMARK_FILE);
        Ok(Summary {
            database_path: self.dir.join(CATALOGUE_FILE),
            catalogue_version: CATALOGUE_VERSION,
            log_type: "undo journal (copy-on-write)",
            journal_bytes: c.journal_bytes,
            spool_bytes: c.spool_disk_bytes,
            disk_used_bytes: c.journal_bytes + c.spool_disk_bytes + extra,
            disk_free_bytes: fs_free_bytes(&self.dir)?,
            data_files: self.segments(),
            recovery_time_range: (rp.oldest_time_ns, rp.latest.source_time_ns),
            consistent_ranges: rp.consistent_ranges,
            bookmarks: (
                rp.bookmarks.len(),
                rp.bookmarks.iter().filter(|b| b.available).count(),
            ),
            retention: self.retention_status()?,
        })
    }
}
