use std::io;
use std::path::PathBuf;

/// Errors of the device-mapper control API. Each names the device and the ioctl involved.
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error("cannot open the device-mapper control device {path}: {source} (is dm-mod loaded?)")]
    Open { path: PathBuf, source: io::Error },

    #[error("invalid {what} {value:?}: it {reason}")]
    InvalidArgument {
        what: &'static str,
        value: String,
        reason: String,
    },

    #[error("{op}: no device-mapper device named {device:?}")]
    NoSuchDevice { op: &'static str, device: String },

    #[error("{op}: the name {device:?} is already in use by another device-mapper device")]
    NameInUse { op: &'static str, device: String },

    #[error("{op} on {device:?}: the device is busy (open or in use); nothing was changed")]
    Busy { op: &'static str, device: String },

    #[error("{op} on {device:?}: the kernel rejected the table [{table}]: {source} (see dmesg)")]
    InvalidTable {
        op: &'static str,
        device: String,
        table: String,
        source: io::Error,
    },

    #[error("{op} on {device:?} failed: {source}")]
    Ioctl {
        op: &'static str,
        device: String,
        source: io::Error,
    },

    #[error("{op} on {device:?}: unexpected reply from the kernel: {reason}")]
    Malformed {
        op: &'static str,
        device: String,
        reason: String,
    },

    #[error("{op} on {device:?}: the reply does not fit in {limit} bytes")]
    ReplyTooLarge {
        op: &'static str,
        device: String,
        limit: usize,
    },

    #[error("device node {path} for {device:?}: {source}")]
    Node {
        device: String,
        path: PathBuf,
        source: io::Error,
    },

    #[error("reloading {device:?} failed ({cause}) and restoring its previous table failed too: {restore}")]
    RollbackFailed {
        device: String,
        cause: Box<DmError>,
        restore: Box<DmError>,
    },
}

impl DmError {
    /// The errno of the failed system call, if the error came from one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            DmError::NoSuchDevice { .. } => Some(libc::ENXIO),
            DmError::NameInUse { .. } | DmError::Busy { .. } => Some(libc::EBUSY),
            DmError::Open { source, .. }
            | DmError::InvalidTable { source, .. }
            | DmError::Ioctl { source, .. }
            | DmError::Node { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
