//! Small filesystem helpers (directory fsync, indexed file listing, lock, reads).

use crate::error::{ioe, JournalError, Result};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub(crate) fn fsync_dir(p: &Path) -> Result<()> {
    File::open(p)
        .and_then(|d| d.sync_all())
        .map_err(ioe(|| format!("fsync directory {}", p.display())))
}

/// Sorted `(index, path)` of files `<16 hex>.<ext>` in `dir`; other names are ignored.
pub(crate) fn list_indexed(dir: &Path, ext: &str) -> Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    let rd = fs::read_dir(dir).map_err(ioe(|| format!("read directory {}", dir.display())))?;
    for e in rd {
        let e = e.map_err(ioe(|| format!("read directory {}", dir.display())))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(ext).and_then(|s| s.strip_suffix('.')) else {
            continue;
        };
        if stem.len() != 16 {
            continue;
        }
        if let Ok(i) = u64::from_str_radix(stem, 16) {
            v.push((i, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

/// Take an exclusive `flock` on `<dir>/lock` (released by the kernel when the process dies).
pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    flock_path(&dir.join("lock"))?.ok_or_else(|| JournalError::Locked(dir.to_path_buf()))
}

/// Open (create) `p` and take a non-blocking exclusive `flock`; `None` if another
/// descriptor holds it. The lock lives as long as the returned file.
pub(crate) fn flock_path(p: &Path) -> Result<Option<File>> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .map_err(ioe(|| format!("open {}", p.display())))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a valid, open file descriptor owned by `f`; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(JournalError::Io {
            context: format!("flock {}", p.display()),
            source: e,
        });
    }
    Ok(Some(f))
}

/// Read as many bytes as available at `off` (short at EOF).
pub(crate) fn read_fill(f: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

pub(crate) fn is_zero(b: &[u8]) -> bool {
    let mut it = b.chunks_exact(64);
    for c in &mut it {
        if c.iter().fold(0u8, |a, &x| a | x) != 0 {
            return false;
        }
    }
    it.remainder().iter().all(|&x| x == 0)
}

/// Lower-case hex of `b`.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Bytes available to unprivileged users on the filesystem holding `p` (statvfs).
pub(crate) fn fs_free_bytes(p: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| JournalError::Invalid(format!("path with NUL: {}", p.display())))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` points to writable
    // memory of the right type; statvfs only writes into it.
    let r = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if r != 0 {
        return Err(JournalError::Io {
            context: format!("statvfs {}", p.display()),
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Deallocates `[offset, offset + len)` of `file` so that it reads as zeros
/// (`fallocate(PUNCH_HOLE | KEEP_SIZE)`: a hole in a file, an unmap with
/// guaranteed zeroing on a block device). `Ok(false)` when the file system or
/// device cannot do it (the caller writes zeros instead); other errors as is.
/// Durable with the file's next `fdatasync`, like a write.
pub(crate) fn punch_zeros(file: &File, offset: u64, len: u64) -> io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Ok(false);
    };
    // SAFETY: plain syscall on a descriptor owned by `file` for the duration
    // of the call; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV) => {
            Ok(false)
        }
        _ => Err(e),
    }
}

/// Turns readahead off for reads through `file` (`POSIX_FADV_RANDOM`; the
/// flag belongs to this open file description, not to the inode).
///
/// Used on every descriptor of the replica. Readahead there (the resync
/// hashes read the whole replica, apply reads the old data of every write)
/// fills the page cache with large folios, and on ext4 every later 4 KiB
/// replica write into such a folio walks all of its buffer heads (write_begin
/// and writeback): measured as more than half of the target's CPU at 4 KiB
/// random writes. The journal's replica reads are explicit ranges, so
/// readahead gains nothing there. Failure only costs performance (logged).
pub(crate) fn no_readahead(file: &File, what: &Path) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise takes a file descriptor and plain integers; the
    // descriptor is owned by `file`, open for the whole call, and no memory
    // is passed to the kernel.
    let r = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    if r != 0 {
        tracing::debug!(errno = r, path = %what.display(), "posix_fadvise(RANDOM) on the replica failed");
    }
}
