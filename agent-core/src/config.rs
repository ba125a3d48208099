//! Configuration of one volume's change log.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{ChangeLogError, Result};

/// Default directory of shared-memory regions.
pub const DEFAULT_SHM_DIR: &str = "/dev/shm/rewind";
/// Default directory of persisted per-volume state (bitmap, activity log, identity).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/rewind/volumes";
/// Default tracking block size (one bitmap bit).
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Smallest tracking block size.
pub const MIN_BLOCK_SIZE: u32 = 4096;
/// Largest tracking block size.
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Default ring size (64 MiB: the 256 MiB host budget split over 4 volumes).
pub const DEFAULT_RING_BYTES: u64 = 64 << 20;
/// Default interval of the background `persist()`.
pub const DEFAULT_PERSIST_INTERVAL: Duration = Duration::from_secs(10);

/// Configuration of one protected volume's change log.
#[derive(Debug, Clone)]
pub struct ChangeLogConfig {
    /// Directory of the shared-memory region (`<shm_dir>/<volume_name>.clog`),
    /// created with mode 0700. Default [`DEFAULT_SHM_DIR`].
    pub shm_dir: PathBuf,
    /// Directory of the persisted state (`<volume>.bitmap`, `<volume>.al`,
    /// `<volume>.identity`), created with mode 0700. Default [`DEFAULT_STATE_DIR`].
    pub state_dir: PathBuf,
    /// Volume name: `[A-Za-z0-9._-]`, 1..=128 characters, not starting with '.'.
    pub volume_name: String,
    /// Volume size in bytes (> 0).
    pub volume_size: u64,
    /// Tracking block size: a power of two in 4 KiB..=1 MiB.
    pub block_size: u32,
    /// Ring capacity in bytes (rounded up to a multiple of 4 KiB, at least 4 KiB).
    /// Only used when the region is created; an existing region keeps its size.
    pub ring_bytes: u64,
    /// Interval of the background persister started by
    /// [`crate::ChangeLog::start_persister`]. Default 10 s.
    pub persist_interval: Duration,
    /// Extent size of in-flight counters and of the activity log, as a power of
    /// two: 12..=40 and at least the block size (default 26 = 64 MiB). Smaller
    /// extents mean finer recovery after crashes but more activity-log
    /// updates. Only used when the region is created.
    pub extent_shift: u32,
}

impl ChangeLogConfig {
    /// A configuration with all defaults for `volume_name` of `volume_size` bytes.
    pub fn new(volume_name: impl Into<String>, volume_size: u64) -> Self {
        ChangeLogConfig {
            shm_dir: PathBuf::from(DEFAULT_SHM_DIR),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            volume_name: volume_name.into(),
            volume_size,
            block_size: DEFAULT_BLOCK_SIZE,
            ring_bytes: DEFAULT_RING_BYTES,
            persist_interval: DEFAULT_PERSIST_INTERVAL,
            extent_shift: 26,
        }
    }

    /// Path of the shared-memory region file.
    pub fn region_path(&self) -> PathBuf {
        self.shm_dir.join(format!("{}.clog", self.volume_name))
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ChangeLogError::InvalidConfig(m));
        let n = &self.volume_name;
        if n.is_empty()
            || n.len() > 128
            || n.starts_with('.')
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        {
            return bad(format!(
                "volume name {n:?} must be 1-128 chars of [A-Za-z0-9._-] not starting with '.'"
            ));
        }
        if self.volume_size == 0 {
            return bad("volume size is 0".into());
        }
        if !self.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size)
        {
            return bad(format!(
                "block size {} is not a power of two in 4 KiB..=1 MiB",
                self.block_size
            ));
        }
        if !(12..=40).contains(&self.extent_shift)
            || (1u64 << self.extent_shift) < self.block_size as u64
        {
            return bad(format!(
                "extent shift {} out of range 12..=40 or below the block size",
                self.extent_shift
            ));
        }
        if self.ring_bytes > (1 << 40) {
            return bad("ring larger than 1 TiB".into());
        }
        Ok(())
    }
}
