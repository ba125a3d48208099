//! Named fault points for crash testing.
//!
//! Every durability-relevant step of [`crate::TargetVolume`] calls a fault
//! point. A configured point either returns [`crate::JournalError::Injected`]
//! (in-process crash simulation: the caller drops the handle and reopens) or
//! calls [`std::process::abort`] (a real crash, for kill-style tests). The
//! configuration comes from [`crate::TargetVolume::set_fault`] or from the
//! environment variable `REWIND_JOURNAL_FAULT=<point>[:error|abort][:skip]`,
//! read by `create`/`open`. With no configuration a fault point costs one
//! branch.

use crate::{JournalError, Result};

/// A step of the spool/apply protocol where a crash can be injected.
///
/// The order below is the order in which the points are reached by
/// `spool` followed by `apply`. See `docs/journal-format.md` for why each
/// point recovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// A new spool file was created and its header written, before the directory fsync.
    SpoolFileAfterCreate,
    /// Spool records were written (not yet fdatasync'ed).
    SpoolAfterWrite,
    /// Spool records are durable, the caller has not been acknowledged yet.
    SpoolAfterSync,
    /// A new journal segment was created, header written.
    SegmentAfterCreate,
    /// Undo records were appended to the segment (not yet durable).
    UndoAfterAppend,
    /// Undo records are durable; the replica is untouched.
    UndoAfterSync,
    /// The first extent of the batch was written to the replica, others not.
    ReplicaMidWrite,
    /// All replica writes of the batch were issued (not yet durable).
    ReplicaAfterWrite,
    /// Replica writes are durable; the commit record is not written.
    ReplicaAfterSync,
    /// The commit record was appended (not durable until the next journal sync).
    CommitAfterAppend,
    /// Spool files are about to be deleted (their chunks are committed).
    ReclaimBeforeDelete,
    /// Spool files were deleted (directory not yet synced).
    ReclaimAfterDelete,
    /// Rollback: the intent file (phase 1) is durable; nothing else changed.
    RollbackAfterIntent,
    /// Rollback: the newest undo record was written back to the replica, older ones not.
    RollbackMidUndo,
    /// Rollback: every undo record newer than the point is written back and the replica synced.
    RollbackAfterUndo,
    /// Rollback: the intent moved to phase 2 (replica done), journal not yet cut.
    RollbackAfterPhase2,
    /// Rollback: newer segments deleted and the last one truncated; no commit written yet.
    RollbackAfterTruncate,
    /// Rollback: the new commit record is durable; bookmarks and intent not yet cleaned.
    RollbackAfterCommit,
    /// Prune: the new retention base (oldest point) is durable; no segment deleted yet.
    PruneAfterBase,
    /// Prune: the first of the segments to reclaim was deleted.
    PruneMidDelete,
    /// Compaction: the rewritten segment is complete and synced under its temporary name.
    CompactAfterWrite,
    /// Compaction: the rewritten segment replaced the original (directory not yet synced).
    CompactAfterRename,
    /// Seal: the index sidecar of the segment being sealed is complete and synced
    /// under its temporary name; not renamed, the next segment not created.
    SidecarAfterWrite,
    /// Seal: the sidecar was renamed into place; the next segment is not created yet.
    SidecarAfterRename,
}

impl FaultPoint {
    /// Every fault point of the spool/apply protocol, in protocol order.
    pub const ALL: [FaultPoint; 12] = [
        FaultPoint::SpoolFileAfterCreate,
        FaultPoint::SpoolAfterWrite,
        FaultPoint::SpoolAfterSync,
        FaultPoint::SegmentAfterCreate,
        FaultPoint::UndoAfterAppend,
        FaultPoint::UndoAfterSync,
        FaultPoint::ReplicaMidWrite,
        FaultPoint::ReplicaAfterWrite,
        FaultPoint::ReplicaAfterSync,
        FaultPoint::CommitAfterAppend,
        FaultPoint::ReclaimBeforeDelete,
        FaultPoint::ReclaimAfterDelete,
    ];

    /// Every fault point of [`crate::TargetVolume::rollback_to`], in protocol order.
    pub const ROLLBACK: [FaultPoint; 6] = [
        FaultPoint::RollbackAfterIntent,
        FaultPoint::RollbackMidUndo,
        FaultPoint::RollbackAfterUndo,
        FaultPoint::RollbackAfterPhase2,
        FaultPoint::RollbackAfterTruncate,
        FaultPoint::RollbackAfterCommit,
    ];

    /// Every fault point of [`crate::TargetVolume::prune`] (deletion and compaction).
    pub const RETENTION: [FaultPoint; 4] = [
        FaultPoint::PruneAfterBase,
        FaultPoint::PruneMidDelete,
        FaultPoint::CompactAfterWrite,
        FaultPoint::CompactAfterRename,
    ];

    /// Every fault point of segment sealing (index sidecar writing).
    pub const SIDECAR: [FaultPoint; 2] = [
        FaultPoint::SidecarAfterWrite,
        FaultPoint::SidecarAfterRename,
    ];

    /// Stable name (used in the environment variable).
    pub fn name(self) -> &'static str {
        match self {
            FaultPoint::SpoolFileAfterCreate => "spool-file-after-create",
            FaultPoint::SpoolAfterWrite => "spool-after-write",
            FaultPoint::SpoolAfterSync => "spool-after-sync",
            FaultPoint::SegmentAfterCreate => "segment-after-create",
            FaultPoint::UndoAfterAppend => "undo-after-append",
            FaultPoint::UndoAfterSync => "undo-after-sync",
            FaultPoint::ReplicaMidWrite => "replica-mid-write",
            FaultPoint::ReplicaAfterWrite => "replica-after-write",
            FaultPoint::ReplicaAfterSync => "replica-after-sync",
            FaultPoint::CommitAfterAppend => "commit-after-append",
            FaultPoint::ReclaimBeforeDelete => "reclaim-before-delete",
            FaultPoint::ReclaimAfterDelete => "reclaim-after-delete",
            FaultPoint::RollbackAfterIntent => "rollback-after-intent",
            FaultPoint::RollbackMidUndo => "rollback-mid-undo",
            FaultPoint::RollbackAfterUndo => "rollback-after-undo",
            FaultPoint::RollbackAfterPhase2 => "rollback-after-phase2",
            FaultPoint::RollbackAfterTruncate => "rollback-after-truncate",
            FaultPoint::RollbackAfterCommit => "rollback-after-commit",
            FaultPoint::PruneAfterBase => "prune-after-base",
            FaultPoint::PruneMidDelete => "prune-mid-delete",
            FaultPoint::CompactAfterWrite => "compact-after-write",
            FaultPoint::CompactAfterRename => "compact-after-rename",
            FaultPoint::SidecarAfterWrite => "sidecar-after-write",
            FaultPoint::SidecarAfterRename => "sidecar-after-rename",
        }
    }

    /// Parse a name produced by [`FaultPoint::name`].
    pub fn from_name(s: &str) -> Option<FaultPoint> {
        FaultPoint::ALL
            .into_iter()
            .chain(FaultPoint::ROLLBACK)
            .chain(FaultPoint::RETENTION)
            .chain(FaultPoint::SIDECAR)
            .find(|p| p.name() == s)
    }
}

/// What a triggered fault point does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Return [`JournalError::Injected`]; the handle becomes poisoned.
    Error,
    /// `std::process::abort()`: a crash without unwinding or flushing.
    Abort,
}

/// A fault configuration: trigger `action` at the `skip + 1`-th time `point` is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultConfig {
    /// Where.
    pub point: FaultPoint,
    /// What.
    pub action: FaultAction,
    /// How many hits to let pass first.
    pub skip: u32,
}

impl FaultConfig {
    /// Name of the environment variable read by `create`/`open`.
    pub const ENV: &'static str = "REWIND_JOURNAL_FAULT";

    /// Parse `<point>[:error|abort][:skip]`.
    pub fn parse(s: &str) -> Option<FaultConfig> {
        let mut it = s.split(':');
        let point = FaultPoint::from_name(it.next()?)?;
        let action = match it.next() {
            None | Some("error") => FaultAction::Error,
            Some("abort") => FaultAction::Abort,
            Some(_) => return None,
        };
        let skip = match it.next() {
            None => 0,
            Some(n) => n.parse().ok()?,
        };
        Some(FaultConfig {
            point,
            action,
            skip,
        })
    }

    /// The configuration from [`FaultConfig::ENV`], if set and valid.
    pub fn from_env() -> Option<FaultConfig> {
        std::env::var(Self::ENV).ok().and_then(|s| Self::parse(&s))
    }
}

/// Fault injection state. Clones share it (an apply step running outside
/// the volume, see `ApplyJob`, hits the same configuration and skip count).
#[derive(Debug, Default, Clone)]
pub(crate) struct Faults {
    inner: std::sync::Arc<std::sync::Mutex<(Option<FaultConfig>, u32)>>,
}

impl Faults {
    pub(crate) fn new(cfg: Option<FaultConfig>) -> Self {
        Faults {
            inner: std::sync::Arc::new(std::sync::Mutex::new((cfg, 0))),
        }
    }

    #[inline]
    pub(crate) fn hit(&mut self, p: FaultPoint) -> Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (cfg_slot, hits) = &mut *g;
        let Some(cfg) = *cfg_slot else { return Ok(()) };
        if cfg.point != p {
            return Ok(());
        }
        if *hits < cfg.skip {
            *hits += 1;
            return Ok(());
        }
        match cfg.action {
            FaultAction::Abort => std::process::abort(),
            FaultAction::Error => {
                *cfg_slot = None;
                Err(JournalError::Injected(p))
            }
        }
    }
}

/// A one-shot test hook run by a directory view inside its index refresh.
type RefreshHook = Box<dyn FnOnce() + Send>;

/// Test hook: run once by the next directory-view index refresh, between
/// reading the current segment's length and looking for the next segment —
/// the window in which the daemon may append to that segment, seal it and
/// create the next. Costs one uncontended lock per refresh when unset.
static VIEW_REFRESH_HOOK: std::sync::Mutex<Option<RefreshHook>> = std::sync::Mutex::new(None);

/// Arms [`VIEW_REFRESH_HOOK`] (tests only; process-wide).
#[doc(hidden)]
pub fn set_view_refresh_hook(hook: Option<RefreshHook>) {
    *VIEW_REFRESH_HOOK.lock().unwrap_or_else(|e| e.into_inner()) = hook;
}

pub(crate) fn view_refresh_hook() {
    let hook = VIEW_REFRESH_HOOK
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(f) = hook {
        f();
    }
}
