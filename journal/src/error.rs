//! Errors of the journal crate.

use std::io;
use std::path::{Path, PathBuf};

use crate::FaultPoint;

/// Errors of the journal crate.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// An I/O system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (with the path).
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// On-disk bytes failed validation (checksum, magic, bounds, version).
    #[error("corrupt {path}: offset {offset}: {reason}")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// Byte offset of the bad header or record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// The target directory belongs to another volume or generation (split-brain guard).
    #[error("identity mismatch: target holds {found}, caller expects {expected}")]
    IdentityMismatch {
        /// What the caller expected.
        expected: String,
        /// What the directory holds.
        found: String,
    },
    /// `create` on a directory that already holds a target volume.
    #[error("{0} already holds a target volume (use open or reseed)")]
    AlreadyExists(PathBuf),
    /// A chunk that cannot be spooled (bad sequence range, extent out of range).
    #[error("invalid chunk: {0}")]
    InvalidChunk(String),
    /// Accepting the chunks would exceed the spool budget; apply first, then retry.
    #[error("spool full: {pending} bytes pending + {incoming} incoming > budget {budget}")]
    SpoolFull {
        /// Bytes spooled and not applied.
        pending: u64,
        /// Bytes offered.
        incoming: u64,
        /// The configured budget.
        budget: u64,
    },
    /// Storing the chunks would leave too little free space to apply what the
    /// spool holds (see [`crate::TargetOptions::min_free_bytes`]): nothing was
    /// stored; apply first (it frees the applied spool), then retry.
    #[error(
        "target file system low on space: {free} bytes free, {needed} needed to spool {incoming} \
         more bytes and still apply the {pending} pending (apply first, then retry)"
    )]
    LowSpace {
        /// Bytes free on the file system (the smaller one if the replica is elsewhere).
        free: u64,
        /// Bytes the admission rule asks for.
        needed: u64,
        /// Bytes spooled and not applied.
        pending: u64,
        /// Bytes offered.
        incoming: u64,
    },
    /// The requested point is not (or not yet, or no longer) recoverable.
    #[error("point not available: {0}")]
    PointNotAvailable(String),
    /// A range outside the volume.
    #[error("range {offset}+{len} outside the volume ({size} bytes)")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// A fault injected at a [`FaultPoint`] (tests).
    #[error("injected fault at {0:?}")]
    Injected(FaultPoint),
    /// An earlier mutating call failed; drop the handle and reopen.
    #[error("target volume handle poisoned by an earlier failure; reopen it")]
    Poisoned,
    /// A bad argument.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The SQLite catalogue failed (derived data: it is rebuilt at the next open).
    #[error("catalogue: {0}")]
    Catalogue(String),
    /// No bookmark matches (unknown name, or none of that kind at or before the time).
    #[error("unknown bookmark: {0}")]
    UnknownBookmark(String),
    /// The point is older than the oldest point still kept (retention pruned it).
    #[error("point {requested} is before the retention window (oldest available: source time {oldest_time_ns} ns, seq {oldest_seq})")]
    BeforeWindow {
        /// The point asked for.
        requested: String,
        /// Source time of the oldest available point.
        oldest_time_ns: u64,
        /// Sequence number of the oldest available point.
        oldest_seq: u64,
    },
    /// A time after the newest applied source time: the target cannot know the
    /// source's state then (writes may still be on their way).
    #[error("time {time_ns} ns is in the future of the replica (latest applied source time {latest_time_ns} ns)")]
    InFuture {
        /// The time asked for.
        time_ns: u64,
        /// Source time of the newest applied chunk.
        latest_time_ns: u64,
    },
    /// The point falls inside a stretch that is not write-order consistent
    /// (resync/bitmap data applied out of order, or a span merged by sparse retention).
    #[error("point is not consistent: {0}")]
    Inconsistent(String),
    /// The operation conflicts with live state (open snapshot views, unapplied spool data).
    #[error("busy: {0}")]
    Busy(String),
    /// Another process (or handle) has the target directory open.
    #[error("{0} is locked by another target process")]
    Locked(PathBuf),
}

impl JournalError {
    /// Whether this is the file system holding the target directory or the
    /// replica running out of space (`ENOSPC`, or `EDQUOT` for a quota): the
    /// call failed like any I/O error (the handle is poisoned and must be
    /// reopened), but the condition is expected to pass once space is freed,
    /// so callers report it as "storage full" and retry the reopen instead of
    /// giving up. Nothing acknowledged is lost: see "Full disk" in the crate docs.
    pub fn is_no_space(&self) -> bool {
        match self {
            JournalError::Io { source, .. } => is_no_space_io(source),
            _ => false,
        }
    }
}

/// `ENOSPC` or `EDQUOT`.
fn is_no_space_io(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Result alias.
pub type Result<T> = std::result::Result<T, JournalError>;

pub(crate) fn ioe(context: impl FnOnce() -> String) -> impl FnOnce(io::Error) -> JournalError {
    move |source| JournalError::Io {
        context: context(),
        source,
    }
}

pub(crate) fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> JournalError {
    JournalError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}
