//! Backing stores: the [`BlockSource`] trait and its file / block-device
//! implementation [`Backing`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use nix::fcntl::FallocateFlags;
use nix::unistd::Whence;

use crate::proto::{Extent, STATE_HOLE, STATE_ZERO};

/// Result of a TRIM on a backing store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrimOutcome {
    /// The range now reads as zeroes (recorded with `complete_zero`).
    Zeroed,
    /// The store ignored the trim; the range keeps its old contents (the
    /// server records it with `abort`, i.e. dirty without data).
    Ignored,
}

/// A byte-addressed store served as an NBD export. The file-backed
/// [`Backing`] is one implementation; a virtual snapshot (read view of a
/// replica at a point in time) is another.
///
/// Callers guarantee `offset + len <= size()` for every call, and never call
/// a write-like method when [`BlockSource::read_only`] is true.
pub trait BlockSource: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether the store refuses writes.
    fn read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset`; with `fua` the data is durable on return.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zeroes. `may_trim`: holes may be
    /// punched. `fast_only`: fail with [`io::ErrorKind::Unsupported`] (before
    /// changing anything) rather than fall back to writing zeroes.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast_only: bool,
    ) -> io::Result<()>;
    /// Discards a range (advisory).
    fn trim(&self, offset: u64, len: u64) -> io::Result<TrimOutcome>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Appends `base:allocation` extents describing `[offset, offset+len)` to
    /// `out`, at most `max_extents`; the extents are contiguous from `offset`
    /// and their total never exceeds `len`.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()>;
    /// A file descriptor on which the server may issue `pread`/`pwrite`/
    /// `fdatasync` through io_uring instead of calling `read_at`/`write_at`/
    /// `flush`. `None` (the default) disables the io_uring path.
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

/// A regular file or block device opened as an export's backing store.
#[derive(Debug)]
pub struct Backing {
    file: File,
    size: u64,
    read_only: bool,
    block_device: bool,
}

/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

fn blkdev_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to
    // a live, properly aligned local; the fd is owned by `file` and open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

fn fallocate(file: &File, mode: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let l = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        match nix::fcntl::fallocate(file.as_raw_fd(), mode, off, l) {
            Ok(()) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e as i32)),
        }
    }
}

fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV)
    )
}

fn lseek(file: &File, offset: u64, whence: Whence) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    match nix::unistd::lseek(file.as_raw_fd(), off, whence) {
        Ok(r) => Ok(Some(r as u64)),
        Err(nix::errno::Errno::ENXIO) => Ok(None),
        Err(e) => Err(io::Error::from_raw_os_error(e as i32)),
    }
}

impl Backing {
    /// Opens a file or block device. The size comes from the file's metadata
    /// or, for a block device, the `BLKGETSIZE64` ioctl.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Self::from_file(file, read_only)
    }

    /// Wraps an already opened file or block device.
    pub fn from_file(file: File, read_only: bool) -> io::Result<Self> {
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            blkdev_size(&file)?
        } else {
            meta.len()
        };
        Ok(Self {
            file,
            size,
            read_only,
            block_device,
        })
    }

    /// Whether the backing is a block device.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    fn write_zero_buffer(&self, mut offset: u64, mut len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; (1usize << 20).min(len as usize)];
        while len > 0 {
            let n = len.min(zeroes.len() as u64) as usize;
            self.file.write_all_at(&zeroes[..n], offset)?;
            offset += n as u64;
            len -= n as u64;
        }
        Ok(())
    }
}

impl BlockSource for Backing {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fast_only: bool,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut r = if may_trim {
            fallocate(
                &self.file,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            )
        } else {
            Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
        };
        if matches!(&r, Err(e) if is_unsupported(e)) {
            r = fallocate(
                &self.file,
                FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            );
        }
        match r {
            Err(e) if is_unsupported(&e) => {
                if fast_only {
                    Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "no fast zeroing",
                    ))
                } else {
                    self.write_zero_buffer(offset, len)
                }
            }
            other => other,
        }
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<TrimOutcome> {
        if len == 0 {
            return Ok(TrimOutcome::Zeroed);
        }
        match fallocate(
            &self.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(TrimOutcome::Zeroed),
            Err(e) if is_unsupported(&e) => Ok(TrimOutcome::Ignored),
            Err(e) => Err(e),
        }
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
        out: &mut Vec<Extent>,
    ) -> io::Result<()> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(());
        }
        if self.block_device {
            out.push(Extent {
                len: end - offset,
                flags: 0,
            });
            return Ok(());
        }
        let mut pos = offset;
        while pos < end && out.len() < max_extents.max(1) {
            // Is `pos` in data or in a hole?
            let data = match lseek(&self.file, pos, Whence::SeekData) {
                Ok(Some(d)) => d,
                Ok(None) => end, // no data after pos: hole to the end
                Err(_) => {
                    // SEEK_DATA unsupported: report everything as data.
                    out.push(Extent {
                        len: end - pos,
                        flags: 0,
                    });
                    return Ok(());
                }
            };
            if data > pos {
                let stop = data.min(end);
                out.push(Extent {
                    len: stop - pos,
                    flags: STATE_HOLE | STATE_ZERO,
                });
                pos = stop;
                continue;
            }
            let hole = lseek(&self.file, pos, Whence::SeekHole)?.unwrap_or(end);
            let stop = hole.min(end).max(pos + 1);
            out.push(Extent {
                len: stop - pos,
                flags: 0,
            });
            pos = stop;
        }
        Ok(())
    }
    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }
}
