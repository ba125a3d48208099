//! Device-mapper control for rewind (design §5), through the DM ioctls on
//! `/dev/mapper/control`: no dmsetup or libdevmapper at run time.
//!
//! - [`DmControl`]: create, load, suspend, resume, remove, status, table, list, info, message
//!   and [`DmControl::reload_preserving`], the all-or-nothing table swap that hot insertion
//!   of the NBD filter under a live device is built on.
//! - [`LoopDevice`] and [`block`]: loop devices and block-device helpers, for tests and tools.
//!
//! No udev is assumed (the semantics of `DM_DISABLE_UDEV=1`): `/dev/mapper/<name>` nodes are
//! created with mknod when missing and removed with the device.
//!
//! - [`era`]: dm-era as a kernel-side change tracker: [`Era`] drives the target
//!   (checkpoint, metadata snapshots, status) and [`era::meta`] parses its on-disk metadata
//!   into the byte ranges written since an era.
//!
//! The hot insertion itself is not implemented yet (issue "Kernel paths on a real kernel").

pub mod block;
mod control;
pub mod era;
mod error;
pub mod insert;
mod loopdev;
mod sys;
mod wire;

pub use control::{DeviceInfo, DmControl, DM_CONTROL_PATH};
pub use era::{Era, EraError, EraStatus};
pub use error::DmError;
pub use loopdev::LoopDevice;

use std::fmt;

/// A block device number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl DevNum {
    pub fn new(major: u32, minor: u32) -> Self {
        DevNum { major, minor }
    }

    /// Decodes the kernel's `huge_encode_dev` form used in `dm_ioctl.dev` and the name list:
    /// minor bits 0-7, major bits 8-19, minor bits 8-19 at bits 20-31.
    pub fn from_kernel(v: u64) -> Self {
        let v = v as u32;
        DevNum {
            major: (v >> 8) & 0xfff,
            minor: (v & 0xff) | ((v >> 12) & 0xfff00),
        }
    }

    /// The kernel's `huge_encode_dev` form.
    pub fn to_kernel(self) -> u64 {
        u64::from((self.minor & 0xff) | ((self.major & 0xfff) << 8) | ((self.minor & !0xff) << 12))
    }

    /// From a `st_rdev` as returned by stat(2).
    pub fn from_rdev(rdev: u64) -> Self {
        DevNum {
            major: libc::major(rdev as libc::dev_t),
            minor: libc::minor(rdev as libc::dev_t),
        }
    }
}

impl fmt::Display for DevNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// One line of a device-mapper table: `sectors [start, start + len)` are mapped by
/// `target_type` with `params` (e.g. `linear` with `"7:0 2048"`). Status replies use the same
/// shape with the target's status string in `params`. Sectors are 512 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub start: u64,
    pub len: u64,
    pub target_type: String,
    pub params: String,
}

impl Target {
    pub fn new(
        start: u64,
        len: u64,
        target_type: impl Into<String>,
        params: impl Into<String>,
    ) -> Self {
        Target {
            start,
            len,
            target_type: target_type.into(),
            params: params.into(),
        }
    }

    /// A `linear` target mapping `[start, start + len)` to `dev` from sector `offset`.
    pub fn linear(start: u64, len: u64, dev: DevNum, offset: u64) -> Self {
        Target::new(start, len, "linear", format!("{dev} {offset}"))
    }
}

impl fmt::Display for Target {
    /// The dmsetup table line format: `start len type params`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.start, self.len, self.target_type)?;
        if !self.params.is_empty() {
            write!(f, " {}", self.params)?;
        }
        Ok(())
    }
}

/// A table in the dmsetup text form, one target per line.
pub fn table_to_string(targets: &[Target]) -> String {
    targets
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests;
