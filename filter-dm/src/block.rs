//! Small block-device helpers.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use crate::sys::{self, IntIoctl};
use crate::DevNum;

/// Size of an open block device in bytes (`BLKGETSIZE64`).
pub fn size_bytes(dev: &File) -> io::Result<u64> {
    sys::blk_getsize64(dev.as_fd())
}

/// Writes back and drops the device's buffer cache (`BLKFLSBUF`), so that the next reads
/// come from the device below rather than from pages cached before.
pub fn flush_buffers(dev: &File) -> io::Result<()> {
    sys::int_ioctl(dev.as_fd(), IntIoctl::BlkFlsBuf, 0).map(|_| ())
}

/// The device number of an open block device node.
pub fn dev_num(dev: &File) -> io::Result<DevNum> {
    let m = dev.metadata()?;
    use std::os::unix::fs::FileTypeExt;
    if !m.file_type().is_block_device() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a block device",
        ));
    }
    Ok(DevNum::from_rdev(m.rdev()))
}
