//! The only `unsafe` code of this crate: the raw `ioctl(2)` and `mknod(2)` calls, each behind
//! a safe function whose arguments make the call sound.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::wire::{self, DM_IOCTL_SIZE};
use crate::DevNum;

/// Runs one device-mapper ioctl (`request` must be one of the `_IOWR(0xfd, nr, struct
/// dm_ioctl)` numbers of [`wire::Cmd::request`]) on the control device with `buf` as the
/// `struct dm_ioctl` + payload buffer.
pub(crate) fn dm_ioctl(fd: BorrowedFd<'_>, request: u32, buf: &mut [u8]) -> io::Result<()> {
    if request & 0xffff_ff00 != wire::DM_IOCTL_BASE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a DM ioctl request",
        ));
    }
    // The kernel reads and writes back `data_size` bytes (the field at offset 12) from the
    // pointer, never more: refuse a header that claims more than the buffer holds.
    if buf.len() < DM_IOCTL_SIZE || wire::data_size_field(buf) as usize > buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "dm_ioctl data_size exceeds the buffer",
        ));
    }
    // SAFETY: `buf` is a live, exclusively borrowed allocation of at least `data_size` bytes
    // (checked above), which is all the kernel accesses for a DM ioctl; `fd` is an open
    // descriptor for the duration of the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::c_ulong, buf.as_mut_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Block and loop ioctls whose argument is an integer passed by value (never a pointer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IntIoctl {
    /// `LOOP_CTL_GET_FREE` on /dev/loop-control: returns a free loop device number.
    LoopCtlGetFree,
    /// `LOOP_SET_FD` on /dev/loopN: the argument is the backing file's descriptor.
    LoopSetFd,
    /// `LOOP_CLR_FD` on /dev/loopN.
    LoopClrFd,
    /// `BLKFLSBUF` on a block device: writes back and drops its buffer cache.
    BlkFlsBuf,
}

impl IntIoctl {
    fn request(self) -> libc::c_ulong {
        match self {
            IntIoctl::LoopCtlGetFree => 0x4C82,
            IntIoctl::LoopSetFd => 0x4C00,
            IntIoctl::LoopClrFd => 0x4C01,
            IntIoctl::BlkFlsBuf => 0x1261,
        }
    }
}

/// Runs an ioctl whose argument is an integer; returns the ioctl's non-negative result.
pub(crate) fn int_ioctl(fd: BorrowedFd<'_>, req: IntIoctl, arg: libc::c_ulong) -> io::Result<i32> {
    // SAFETY: every request of `IntIoctl` takes its argument by value (an integer or a file
    // descriptor number), so the kernel dereferences no user memory; `fd` is open.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req.request(), arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// `BLKGETSIZE64`: the size of a block device in bytes.
pub(crate) fn blk_getsize64(fd: BorrowedFd<'_>) -> io::Result<u64> {
    const BLKGETSIZE64: libc::c_ulong = 0x8008_1272; // _IOR(0x12, 114, size_t)
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes exactly one u64 through the pointer, which points to a live
    // local u64; `fd` is open.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(size)
    }
}

/// Creates a block device node `path` for `dev` with permissions `mode` (e.g. 0o600).
pub(crate) fn mknod_block(path: &Path, dev: DevNum, mode: u32) -> io::Result<()> {
    mknod(path, libc::S_IFBLK, dev, mode)
}

/// Creates a character device node `path` for `dev` with permissions `mode`.
pub(crate) fn mknod_char(path: &Path, dev: DevNum, mode: u32) -> io::Result<()> {
    mknod(path, libc::S_IFCHR, dev, mode)
}

fn mknod(path: &Path, kind: libc::mode_t, dev: DevNum, mode: u32) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let rdev = libc::makedev(dev.major, dev.minor);
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call; mknod only reads it.
    let r = unsafe { libc::mknod(c.as_ptr(), kind | (mode & 0o7777), rdev) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
