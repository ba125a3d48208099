//! Errors of the change log.

use std::path::PathBuf;

/// Everything that can go wrong opening, draining or persisting a change log.
/// Recording a write never returns an error (see [`crate::ChangeSink`]); it
/// degrades to a coarser capture mode instead.
#[derive(Debug, thiserror::Error)]
pub enum ChangeLogError {
    /// An I/O error on a named file or directory.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is unusable (bad block size, zero volume size, ...).
    #[error("invalid change-log configuration: {0}")]
    InvalidConfig(String),
    /// The shared-memory file is not a change-log region of a layout this
    /// build understands, or is damaged.
    #[error("{path}: not a usable change-log region: {reason}")]
    BadRegion {
        /// The region file.
        path: PathBuf,
        /// What did not match.
        reason: String,
    },
    /// The existing region (or persisted state) belongs to a volume of another
    /// geometry or identity than the one configured.
    #[error("{path}: region does not match the configuration: {reason}")]
    Mismatch {
        /// The region or state file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// Another live process already holds the producer (or consumer) role.
    #[error("{path}: another live process is the {role} of this change log")]
    Busy {
        /// The region file.
        path: PathBuf,
        /// "producer" or "consumer".
        role: &'static str,
    },
    /// The consumer found a ring record that fails validation (checksum,
    /// bounds, kind). The ring cannot be drained past it; the producer's next
    /// recovery falls back to the persisted state for the affected extents.
    #[error("corrupt ring record at position {pos}: {reason}")]
    CorruptRecord {
        /// Ring byte position (monotonic) of the bad record.
        pos: u64,
        /// What failed.
        reason: String,
    },
    /// A tag could not be inserted; it was counted in `tags_refused`.
    #[error("tag refused: {0}")]
    TagRefused(&'static str),
    /// `Consumer::commit` was called with a batch that is not the oldest
    /// uncommitted ring batch, or that this consumer never handed out.
    #[error("commit out of order: batch starts at {got}, expected {expected}")]
    CommitOrder {
        /// Ring position the next committed batch must start at.
        expected: u64,
        /// Ring position the offered batch starts at.
        got: u64,
    },
    /// A persisted state file is damaged or of an unknown version.
    #[error("{path}: bad state file: {reason}")]
    BadStateFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl ChangeLogError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ChangeLogError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Shorthand used throughout the crate.
pub type Result<T, E = ChangeLogError> = std::result::Result<T, E>;
