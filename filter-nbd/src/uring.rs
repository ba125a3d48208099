//! A small safe wrapper around one io_uring instance, used per connection.
//!
//! Buffers are moved into the ring with the operation and handed back with
//! its completion, so the kernel never sees a buffer the caller could free or
//! move while the operation is in flight. Submission and
//! completion queues are each guarded by a lock, so the wrapper stays sound
//! even if several threads use it (the server uses it from one thread per
//! connection).

use std::io;
use std::os::fd::RawFd;
use std::sync::Mutex;

use io_uring::{opcode, types, IoUring};

/// An operation to run on the ring.
#[derive(Debug)]
pub(crate) enum IoOp {
    /// `pread` into `buf[start..]` from `offset`.
    Read {
        fd: RawFd,
        offset: u64,
        buf: Vec<u8>,
        start: usize,
    },
    /// `pwrite` of `buf[start..]` at `offset`, with `RWF_DSYNC` if `dsync`.
    Write {
        fd: RawFd,
        offset: u64,
        buf: Vec<u8>,
        start: usize,
        dsync: bool,
    },
    /// `fdatasync`.
    Fsync { fd: RawFd },
    /// One-shot poll for input on a socket.
    PollIn { fd: RawFd },
}

/// A completed operation.
#[derive(Debug)]
pub(crate) struct Completion {
    /// Tag passed to [`Ring::submit`].
    pub tag: u64,
    /// Syscall-style result: bytes transferred, 0, or `-errno`.
    pub result: i32,
    /// The buffer of a Read or Write, given back.
    pub buf: Option<Vec<u8>>,
}

/// One io_uring with owned in-flight buffers.
pub(crate) struct Ring {
    ring: IoUring,
    sq_lock: Mutex<()>,
    cq_lock: Mutex<()>,
    /// Buffers of in-flight operations, indexed by tag.
    bufs: Mutex<Vec<Option<Vec<u8>>>>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").finish_non_exhaustive()
    }
}

/// Tags at or above this value carry no buffer.
pub(crate) const TAG_NO_BUF: u64 = u64::MAX / 2;

impl Ring {
    /// Creates a ring for up to `slots` concurrent tagged operations.
    /// `io_workers` (if non-zero) caps the kernel's bounded io-wq workers of
    /// this ring (used when the filesystem cannot do non-blocking buffered
    /// writes and punts them to worker threads).
    pub(crate) fn new(slots: u32, io_workers: u32) -> io::Result<Self> {
        let entries = (slots * 2).next_power_of_two().max(8);
        let ring = IoUring::builder().build(entries)?;
        if io_workers > 0 {
            let mut max = [io_workers, 0];
            if let Err(e) = ring.submitter().register_iowq_max_workers(&mut max) {
                tracing::debug!(error = %e, "cannot cap io-wq workers");
            }
        }
        let bufs = (0..slots).map(|_| None).collect();
        Ok(Self {
            ring,
            sq_lock: Mutex::new(()),
            cq_lock: Mutex::new(()),
            bufs: Mutex::new(bufs),
        })
    }

    /// Queues `op` under `tag` and hands it to the kernel at once.
    pub(crate) fn submit(&self, tag: u64, op: IoOp) -> io::Result<()> {
        self.push(tag, op)?;
        self.flush()
    }

    /// Hands every queued operation to the kernel (no-op if none).
    pub(crate) fn flush(&self) -> io::Result<()> {
        let _g = self.sq_lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: `sq_lock` gives this thread exclusive access to the
        // submission queue; we only read its length.
        if unsafe { self.ring.submission_shared().is_empty() } {
            return Ok(());
        }
        loop {
            match self.ring.submitter().submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        || e.raw_os_error() == Some(libc::EAGAIN) =>
                {
                    // Completion queue busy; the reaper submits on its next enter.
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Queues `op` under `tag` without entering the kernel (batching); the
    /// caller must [`Ring::flush`] before waiting for its completion. Tags
    /// below [`TAG_NO_BUF`] must be free slot indices (< `slots`) when the op
    /// carries a buffer.
    pub(crate) fn push(&self, tag: u64, op: IoOp) -> io::Result<()> {
        enum K {
            Read {
                fd: RawFd,
                offset: u64,
                start: usize,
            },
            Write {
                fd: RawFd,
                offset: u64,
                start: usize,
                dsync: bool,
            },
            Fsync {
                fd: RawFd,
            },
            Poll {
                fd: RawFd,
            },
        }
        let (buf, kind) = match op {
            IoOp::Read {
                fd,
                offset,
                buf,
                start,
            } => (Some(buf), K::Read { fd, offset, start }),
            IoOp::Write {
                fd,
                offset,
                buf,
                start,
                dsync,
            } => (
                Some(buf),
                K::Write {
                    fd,
                    offset,
                    start,
                    dsync,
                },
            ),
            IoOp::Fsync { fd } => (None, K::Fsync { fd }),
            IoOp::PollIn { fd } => (None, K::Poll { fd }),
        };
        let (p, len) = match buf {
            Some(mut b) => {
                let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
                let slot = usize::try_from(tag)
                    .ok()
                    .and_then(|i| bufs.get_mut(i))
                    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad ring tag"))?;
                if slot.is_some() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "ring tag in use",
                    ));
                }
                let (p, len) = (b.as_mut_ptr(), b.len());
                // The Vec's heap allocation does not move when the Vec is
                // moved into the slot; it stays there until reaped in `wait`.
                *slot = Some(b);
                (p, len)
            }
            None => (std::ptr::null_mut(), 0),
        };
        let entry = match kind {
            K::Read { fd, offset, start } => {
                let start = start.min(len);
                opcode::Read::new(types::Fd(fd), p.wrapping_add(start), (len - start) as u32)
                    .offset(offset + start as u64)
                    .build()
            }
            K::Write {
                fd,
                offset,
                start,
                dsync,
            } => {
                let start = start.min(len);
                let flags = if dsync { libc::RWF_DSYNC } else { 0 };
                opcode::Write::new(
                    types::Fd(fd),
                    p.wrapping_add(start) as *const u8,
                    (len - start) as u32,
                )
                .offset(offset + start as u64)
                .rw_flags(flags)
                .build()
            }
            K::Fsync { fd } => opcode::Fsync::new(types::Fd(fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            K::Poll { fd } => opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build(),
        }
        .user_data(tag);
        let _g = self.sq_lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // SAFETY: `sq_lock` gives this thread exclusive access to the
            // submission queue. The entry's buffer (if any) is owned by
            // `self.bufs[tag]` until its completion is reaped in `wait`, so it
            // stays valid for the kernel; the length never exceeds it.
            let pushed = unsafe { self.ring.submission_shared().push(&entry).is_ok() };
            if pushed {
                break;
            }
            // Queue full: hand the queued entries to the kernel and retry.
            self.ring.submitter().submit()?;
        }
        Ok(())
    }

    /// Waits for at least one completion and appends all available ones to
    /// `out`. Must be called from one thread at a time (enforced by a lock).
    pub(crate) fn wait(&self, out: &mut Vec<Completion>) -> io::Result<()> {
        let _g = self.cq_lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            match self.ring.submitter().submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => break,
                Err(e) => return Err(e),
            }
        }
        drop(_g);
        self.reap(out);
        Ok(())
    }

    /// Appends every completion already available to `out`, without
    /// entering the kernel.
    pub(crate) fn reap(&self, out: &mut Vec<Completion>) {
        let _g = self.cq_lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: `cq_lock` makes this the only user of the completion queue.
        let cq = unsafe { self.ring.completion_shared() };
        let mut bufs = self.bufs.lock().unwrap_or_else(|e| e.into_inner());
        for cqe in cq {
            let tag = cqe.user_data();
            let buf = usize::try_from(tag)
                .ok()
                .and_then(|i| bufs.get_mut(i))
                .and_then(Option::take);
            out.push(Completion {
                tag,
                result: cqe.result(),
                buf,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn write_read_fsync() {
        let Ok(ring) = Ring::new(4, 0) else {
            eprintln!("io_uring unavailable; skipping ring unit test");
            return;
        };
        let f = tempfile::tempfile().unwrap();
        f.set_len(8192).unwrap();
        let fd = f.as_raw_fd();
        ring.submit(
            0,
            IoOp::Write {
                fd,
                offset: 4096,
                buf: vec![7u8; 4096],
                start: 0,
                dsync: true,
            },
        )
        .unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            ring.wait(&mut out).unwrap();
        }
        assert_eq!(out[0].result, 4096);
        assert_eq!(out[0].buf.as_ref().unwrap().len(), 4096);
        out.clear();
        ring.submit(
            1,
            IoOp::Read {
                fd,
                offset: 4096,
                buf: vec![0u8; 4096],
                start: 0,
            },
        )
        .unwrap();
        ring.submit(TAG_NO_BUF, IoOp::Fsync { fd }).unwrap();
        while out.len() < 2 {
            ring.wait(&mut out).unwrap();
        }
        let rd = out.iter().find(|c| c.tag == 1).unwrap();
        assert_eq!(rd.result, 4096);
        assert!(rd.buf.as_ref().unwrap().iter().all(|&b| b == 7));
        assert!(ring
            .submit(
                9,
                IoOp::Read {
                    fd,
                    offset: 0,
                    buf: vec![0; 1],
                    start: 0
                }
            )
            .is_err());
    }
}
