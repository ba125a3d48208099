//! Retention: the policy, the window it achieves, and pruning.

use crate::error::Result;
use crate::{BookmarkKind, TargetVolume};

/// One sparse tier: between `from_age_ns` (the end of the previous tier) and
/// `until_age_ns`, keep one point per `every_ns` (the newest point in each interval).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SparseTier {
    /// Age (now − source time) up to which this tier applies.
    pub until_age_ns: u64,
    /// Keep one point per interval of this length.
    pub every_ns: u64,
}

/// A retention policy. Time-based (`keep_all_ns` + `tiers` + `bookmarks`),
/// space-based (`max_bytes`), or both: whichever triggers first wins — the
/// space limit is always honoured, and when it cuts into what the time policy
/// promises, [`RetentionStatus::alert`] is raised.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Keep every point younger than this (`None`: no time limit).
    pub keep_all_ns: Option<u64>,
    /// Sparse tiers after `keep_all_ns`, in increasing `until_age_ns`.
    pub tiers: Vec<SparseTier>,
    /// Keep bookmarks of a kind for this long (age), whatever the tiers say.
    pub bookmarks: Vec<(BookmarkKind, u64)>,
    /// Journal space limit in bytes (`None`: no space limit).
    pub max_bytes: Option<u64>,
}

impl RetentionPolicy {
    /// The age up to which the time policy promises some point (0 = unlimited).
    pub fn promised_age_ns(&self) -> Option<u64> {
        let mut a = self.keep_all_ns?;
        for t in &self.tiers {
            a = a.max(t.until_age_ns);
        }
        for (_, k) in &self.bookmarks {
            a = a.max(*k);
        }
        Some(a)
    }
}

/// The retention window actually available, against the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionStatus {
    /// The policy in force (`None`: keep everything).
    pub policy: Option<RetentionPolicy>,
    /// Source time of the oldest available point.
    pub oldest_time_ns: u64,
    /// Source time of the latest applied point.
    pub latest_time_ns: u64,
    /// `latest − oldest`: the window actually available.
    pub available_window_ns: u64,
    /// Journal bytes now.
    pub journal_bytes: u64,
    /// True when the window is shorter than the policy promises (space limit hit,
    /// or pinned by views / not enough history yet is NOT an alert: only pruning
    /// forced by space is) or the journal exceeds `max_bytes`.
    pub alert: bool,
    /// Why the alert is raised.
    pub alert_reason: Option<String>,
}

impl TargetVolume {
    /// Set the retention policy used by [`TargetVolume::prune`] and reported by the summary.
    pub fn set_retention(&mut self, policy: Option<RetentionPolicy>) {
        self.retention = policy;
    }

    /// The window available now, with the alert flag.
    pub fn retention_status(&self) -> Result<RetentionStatus> {
        let idx = self.index();
        let oldest = idx.base.time_ns;
        let latest = idx.applied_time_ns;
        drop(idx);
        let journal_bytes: u64 = self.segments.iter().map(|s| s.len).sum();
        let mut reason = self.retention_alert.clone();
        if let Some(max) = self.retention.as_ref().and_then(|p| p.max_bytes) {
            if journal_bytes > max {
                reason = Some(format!(
                    "journal uses {journal_bytes} bytes > limit {max} (points pinned by live views or needed by promised points)"
                ));
            }
        }
        Ok(RetentionStatus {
            policy: self.retention.clone(),
            oldest_time_ns: oldest,
            latest_time_ns: latest,
            available_window_ns: latest.saturating_sub(oldest),
            journal_bytes,
            alert: reason.is_some(),
            alert_reason: reason,
        })
    }
}
