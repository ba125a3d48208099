//! Kernel attach: connect the Linux NBD client (`/dev/nbdN`) to this
//! process's [`Server`] over a socketpair.
//!
//! Two control paths (details and kernel behaviour in `vendor-docs/nbd-kernel.md`):
//!
//! * **netlink** (preferred): the `nbd` generic-netlink family.
//!   `NBD_CMD_CONNECT` hands the kernel one end of a socketpair with the size,
//!   block size, transmission flags, request timeout and *dead-connection
//!   timeout*. The configuration belongs to the kernel, not to a process, so it
//!   survives the agent: when the agent dies, the kernel marks the socket dead,
//!   holds new requests for up to the dead-connection timeout and re-sends the
//!   in-flight ones once the request timeout expires; a restarted agent hands a
//!   new socket with `NBD_CMD_RECONFIGURE` ([`attach`] does this by itself when
//!   the device is already configured). `NBD_CMD_DISCONNECT` detaches.
//! * **ioctl** (fallback when the family is missing): `NBD_SET_SOCK`,
//!   `NBD_SET_BLKSIZE`, `NBD_SET_SIZE_BLOCKS`, `NBD_SET_FLAGS`,
//!   `NBD_SET_TIMEOUT`, then `NBD_DO_IT` blocking in a thread until
//!   `NBD_DISCONNECT`. The device is torn down with the process: no reconnect.
//!
//! The kernel client starts in the transmission phase (no handshake), served
//! by [`Server::handle_pre_negotiated`] with simple replies.
//!
//! # Memory-pressure safety
//!
//! [`attach`] calls [`set_io_flusher`] (`PR_SET_IO_FLUSHER`) in the calling
//! thread before it spawns the serving threads, which inherit the flag: their
//! allocations never recurse into filesystem/block I/O (which could wait on
//! this very device) and they are not throttled by dirty-page writeback. The
//! write path does not allocate per request in steady state (preallocated
//! in-flight slots, pooled payload buffers); what still allocates, and what is
//! not done yet (`mlockall`), is listed in `vendor-docs/nbd-kernel.md`. The
//! change log's ring copy is into shared memory mapped at start-up.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::server::{Server, ServerError};

/// Major number of the Linux NBD driver.
pub const NBD_MAJOR: u32 = 43;

/// Errors of kernel attach.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The device path does not exist or is not an NBD device.
    #[error("{path}: {reason}")]
    BadDevice {
        /// The path given.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// The device is connected to a live server already.
    #[error("{path} is already connected to a live NBD server (not a dead connection that could be taken over); disconnect it first")]
    InUse {
        /// The device.
        path: PathBuf,
    },
    /// A netlink request failed.
    #[error("netlink nbd {op} on nbd{index}: {source}")]
    Netlink {
        /// Command name.
        op: &'static str,
        /// Device index.
        index: u32,
        /// The kernel's error.
        source: io::Error,
    },
    /// An NBD ioctl failed.
    #[error("ioctl {op} on {path}: {source}")]
    Ioctl {
        /// Ioctl name.
        op: &'static str,
        /// The device.
        path: PathBuf,
        /// The kernel's error.
        source: io::Error,
    },
    /// Any other I/O error (socketpair, threads, flush).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// The server refused the export.
    #[error(transparent)]
    Server(#[from] ServerError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> AttachError {
    let what = what.into();
    move |source| AttachError::Io { what, source }
}

/// Which control interface to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Netlink if the `nbd` family exists, else ioctls.
    Auto,
    /// Netlink only.
    Netlink,
    /// Ioctls only (no reconnect after an agent restart).
    Ioctl,
}

/// Attach parameters.
#[derive(Debug, Clone)]
pub struct AttachOptions {
    /// Logical block size of `/dev/nbdN` (512..=4096, power of two).
    pub block_size: u32,
    /// Request timeout: an unanswered request is re-sent (on a new socket,
    /// after a reconnect) when it expires. 0 = the kernel's default.
    pub timeout: Duration,
    /// How long the kernel holds I/O waiting for a new socket after the
    /// agent's socket died (netlink only).
    pub dead_conn_timeout: Duration,
    /// Control interface.
    pub method: Method,
    /// If the device is configured already with a dead connection (the
    /// previous agent died), take it over with `NBD_CMD_RECONFIGURE`.
    pub reconnect: bool,
    /// Set `PR_SET_IO_FLUSHER` on the calling thread (inherited by the
    /// serving threads). Failure is logged, not fatal.
    pub io_flusher: bool,
}

impl Default for AttachOptions {
    fn default() -> Self {
        Self {
            block_size: 4096,
            timeout: Duration::from_secs(30),
            dead_conn_timeout: Duration::from_secs(120),
            method: Method::Auto,
            reconnect: true,
            io_flusher: true,
        }
    }
}

/// How an [`Attached`] device was set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// New netlink connection.
    NetlinkConnect,
    /// Took over a configured device whose server had died.
    NetlinkReconfigure,
    /// Ioctl connection.
    Ioctl,
}

/// The index `N` of `/dev/nbdN`, checking that the path is an NBD block device.
pub fn nbd_index(path: &Path) -> Result<u32, AttachError> {
    let bad = |reason: String| AttachError::BadDevice {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| {
        bad(format!(
            "{e} (is the nbd module loaded? `modprobe nbd` creates /dev/nbd0..15)"
        ))
    })?;
    if !meta.file_type().is_block_device() {
        return Err(bad("not a block device".into()));
    }
    use std::os::unix::fs::MetadataExt;
    let rdev = meta.rdev() as libc::dev_t;
    let major = libc::major(rdev);
    if major != NBD_MAJOR {
        return Err(bad(format!(
            "block device major {major} is not NBD ({NBD_MAJOR})"
        )));
    }
    // The minor is index << part_shift; the sysfs name gives N without guessing part_shift.
    let sys = format!("/sys/dev/block/{}:{}", major, libc::minor(rdev));
    let target = std::fs::read_link(&sys).map_err(|e| bad(format!("{sys}: {e}")))?;
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_owned();
    name.strip_prefix("nbd")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| bad(format!("sysfs name {name:?} is not nbdN (a partition?)")))
}

/// Whether `/dev/nbd<index>` is configured (has a size), per sysfs.
pub fn is_configured(index: u32) -> bool {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/size"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|s| s > 0)
}

/// Kernel-side facts about `/dev/nbd<index>` (for `drvutil`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDeviceInfo {
    /// Device index.
    pub index: u32,
    /// Size in bytes (0 = not connected).
    pub size: u64,
    /// Logical block size.
    pub logical_block_size: u32,
    /// The pid that configured it, if sysfs shows one.
    pub pid: Option<u32>,
    /// The backend identifier, if set.
    pub backend: Option<String>,
}

/// Reads `/sys/block/nbd<index>`.
pub fn kernel_device_info(index: u32) -> io::Result<KernelDeviceInfo> {
    let base = format!("/sys/block/nbd{index}");
    let read =
        |f: &str| std::fs::read_to_string(format!("{base}/{f}")).map(|s| s.trim().to_owned());
    let sectors: u64 = read("size")?.parse().unwrap_or(0);
    Ok(KernelDeviceInfo {
        index,
        size: sectors * 512,
        logical_block_size: read("queue/logical_block_size")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        pid: read("pid").ok().and_then(|s| s.parse().ok()),
        backend: read("backend").ok().filter(|s| !s.is_empty()),
    })
}

/// Sets `PR_SET_IO_FLUSHER` on the calling thread (threads it creates
/// afterwards inherit it). Needs `CAP_SYS_RESOURCE`.
pub fn set_io_flusher() -> io::Result<()> {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only; no pointers are passed.
    let r = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1 as libc::c_ulong, 0, 0, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `PR_SET_IO_FLUSHER` is set on the calling thread.
pub fn io_flusher_is_set() -> bool {
    const PR_GET_IO_FLUSHER: libc::c_int = 58;
    // SAFETY: prctl with integer arguments only; no pointers are passed.
    unsafe { libc::prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0) == 1 }
}

struct Shared {
    server: Server,
    export: usize,
    index: u32,
    path: PathBuf,
    stopping: AtomicBool,
    reconnects: std::sync::atomic::AtomicU64,
    opts: AttachOptions,
}

/// A kernel NBD device served by this process. Dropping it without
/// [`Attached::detach`] leaves a netlink device configured (the kernel
/// waits for a reconnect) — what a crash does too.
pub struct Attached {
    shared: Arc<Shared>,
    mode: AttachMode,
    serve: Option<JoinHandle<()>>,
    doit: Option<JoinHandle<io::Result<()>>>,
    ctl: Option<File>,
}

impl std::fmt::Debug for Attached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attached")
            .field("device", &self.shared.path)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

fn socketpair() -> Result<(UnixStream, UnixStream), AttachError> {
    UnixStream::pair().map_err(io_err("socketpair"))
}

/// Connects `device` (`/dev/nbdN`) to export number `export` of `server`,
/// served by a thread of this process. With netlink, a device left
/// configured by a dead agent is taken over (`NBD_CMD_RECONFIGURE`) if
/// `opts.reconnect`; a device served by a live server is refused.
pub fn attach(
    server: &Server,
    export: usize,
    device: &Path,
    opts: &AttachOptions,
) -> Result<Attached, AttachError> {
    let index = nbd_index(device)?;
    let (size, flags) = server
        .export_info(export)
        .ok_or_else(|| AttachError::Server(ServerError::Config(format!("no export #{export}"))))?;
    if !(512..=4096).contains(&opts.block_size) || !opts.block_size.is_power_of_two() {
        return Err(AttachError::BadDevice {
            path: device.into(),
            reason: format!(
                "block size {} must be a power of two from 512 to 4096",
                opts.block_size
            ),
        });
    }
    if opts.io_flusher {
        if let Err(e) = set_io_flusher() {
            warn!(error = %e, "PR_SET_IO_FLUSHER failed (needs CAP_SYS_RESOURCE); the filter may deadlock under memory pressure");
        }
    }
    let shared = Arc::new(Shared {
        server: server.clone(),
        export,
        index,
        path: device.to_path_buf(),
        stopping: AtomicBool::new(false),
        reconnects: 0.into(),
        opts: opts.clone(),
    });
    let netlink = match opts.method {
        Method::Ioctl => None,
        Method::Netlink => Some(Genl::open("nbd").map_err(|source| AttachError::Netlink {
            op: "family lookup",
            index,
            source,
        })?),
        Method::Auto => match Genl::open("nbd") {
            Ok(g) => Some(g),
            Err(e) => {
                info!(error = %e, "nbd netlink family unavailable; using the NBD ioctls");
                None
            }
        },
    };
    let (ours, theirs) = socketpair()?;
    if let Some(nl) = netlink {
        let mode = if is_configured(index) {
            if !opts.reconnect {
                return Err(AttachError::InUse {
                    path: device.into(),
                });
            }
            match nl.reconfigure(index, theirs.as_raw_fd()) {
                Ok(()) => {
                    // The kernel answers success even when it had no dead socket to
                    // replace (it then drops ours): tell by whether our end sees EOF.
                    drop(theirs);
                    if !kernel_kept(&ours) {
                        return Err(AttachError::InUse {
                            path: device.into(),
                        });
                    }
                    info!(device = %device.display(), "NBD device taken over (reconfigured)");
                    return spawn_netlink(shared, ours, AttachMode::NetlinkReconfigure);
                }
                Err(source) => {
                    return Err(AttachError::Netlink {
                        op: "RECONFIGURE",
                        index,
                        source,
                    })
                }
            }
        } else {
            let req = ConnectReq {
                index,
                size,
                block_size: opts.block_size,
                flags,
                timeout: opts.timeout.as_secs(),
                dead_conn_timeout: opts.dead_conn_timeout.as_secs(),
                fd: theirs.as_raw_fd(),
            };
            match nl.connect(&req) {
                Ok(()) => AttachMode::NetlinkConnect,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    return Err(AttachError::InUse {
                        path: device.into(),
                    })
                }
                Err(source) => {
                    return Err(AttachError::Netlink {
                        op: "CONNECT",
                        index,
                        source,
                    })
                }
            }
        };
        // The kernel holds its own reference to the socket now.
        drop(theirs);
        info!(device = %device.display(), ?mode, size, "NBD device attached");
        return spawn_netlink(shared, ours, mode);
    }
    attach_ioctl(shared, size, flags, ours, theirs)
}

fn spawn_netlink(
    shared: Arc<Shared>,
    ours: UnixStream,
    mode: AttachMode,
) -> Result<Attached, AttachError> {
    let sh = shared.clone();
    let serve = std::thread::Builder::new()
        .name(format!("nbd{}-serve", shared.index))
        .spawn(move || serve_netlink(sh, ours))
        .map_err(io_err("spawning the serving thread"))?;
    Ok(Attached {
        shared,
        mode,
        serve: Some(serve),
        doit: None,
        ctl: None,
    })
}

/// After `NBD_CMD_RECONFIGURE` (and closing our copy of the kernel's end):
/// whether the kernel kept the socket. If it had no dead connection to
/// replace, it released the socket, so our end reads EOF at once.
fn kernel_kept(ours: &UnixStream) -> bool {
    let mut pfd = libc::pollfd {
        fd: ours.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: poll on one live pollfd for at most 300 ms.
    let r = unsafe { libc::poll(&mut pfd, 1, 300) };
    if r <= 0 {
        return true; // quiet: the kernel holds the other end
    }
    if pfd.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0 {
        return false;
    }
    let mut b = [0u8; 1];
    // SAFETY: recv into a live 1-byte buffer on an owned socket, peek only.
    let n = unsafe {
        libc::recv(
            ours.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n != 0
}

/// Serves the kernel's socket; when it is lost without a stop (the kernel
/// timed a request out and shut the socket), hands a new one by RECONFIGURE.
fn serve_netlink(sh: Arc<Shared>, first: UnixStream) {
    let mut stream = Some(first);
    while let Some(s) = stream.take() {
        match sh.server.handle_pre_negotiated(s, sh.export) {
            Ok(()) => debug!(index = sh.index, "kernel connection closed"),
            Err(e) => warn!(index = sh.index, error = %e, "kernel connection ended with an error"),
        }
        if sh.stopping.load(Ordering::SeqCst) {
            return;
        }
        let deadline = Instant::now() + sh.opts.dead_conn_timeout;
        while stream.is_none() && !sh.stopping.load(Ordering::SeqCst) && Instant::now() < deadline {
            let r = socketpair()
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|(ours, theirs)| {
                    Genl::open("nbd")?.reconfigure(sh.index, theirs.as_raw_fd())?;
                    drop(theirs);
                    if kernel_kept(&ours) {
                        Ok(ours)
                    } else {
                        Err(io::Error::other(
                            "the kernel had no dead connection to replace",
                        ))
                    }
                });
            match r {
                Ok(s) => {
                    sh.reconnects.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        index = sh.index,
                        "kernel dropped the connection; reconnected"
                    );
                    stream = Some(s);
                }
                Err(e) => {
                    debug!(error = %e, "reconnect failed; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

fn attach_ioctl(
    shared: Arc<Shared>,
    size: u64,
    flags: u16,
    ours: UnixStream,
    theirs: UnixStream,
) -> Result<Attached, AttachError> {
    let path = shared.path.clone();
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err(format!("opening {}", path.display())))?;
    let fd = ctl.as_raw_fd();
    let ioctl = |op: &'static str, req: libc::c_ulong, arg: libc::c_ulong| {
        // SAFETY: NBD ioctls on an open NBD device fd take an integer argument (no pointer).
        let r = unsafe { libc::ioctl(fd, req as _, arg) };
        if r < 0 {
            Err(AttachError::Ioctl {
                op,
                path: path.clone(),
                source: io::Error::last_os_error(),
            })
        } else {
            Ok(())
        }
    };
    let bs = u64::from(shared.opts.block_size);
    ioctl("NBD_SET_BLKSIZE", NBD_SET_BLKSIZE, bs as _)?;
    ioctl("NBD_SET_SIZE_BLOCKS", NBD_SET_SIZE_BLOCKS, (size / bs) as _)?;
    ioctl("NBD_SET_FLAGS", NBD_SET_FLAGS, flags as _)?;
    if !shared.opts.timeout.is_zero() {
        ioctl(
            "NBD_SET_TIMEOUT",
            NBD_SET_TIMEOUT,
            shared.opts.timeout.as_secs() as _,
        )?;
    }
    if let Err(e) = ioctl("NBD_SET_SOCK", NBD_SET_SOCK, theirs.as_raw_fd() as _) {
        let _ = ioctl("NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0);
        return Err(match e {
            AttachError::Ioctl { source, .. } if source.raw_os_error() == Some(libc::EBUSY) => {
                AttachError::InUse { path }
            }
            e => e,
        });
    }
    drop(theirs);
    let doit_fd = ctl.try_clone().map_err(io_err("dup of the device fd"))?;
    let doit = std::thread::Builder::new()
        .name(format!("nbd{}-doit", shared.index))
        .spawn(move || {
            // SAFETY: NBD_DO_IT on an open NBD device fd; blocks until disconnect, no pointer.
            let r = unsafe { libc::ioctl(doit_fd.as_raw_fd(), NBD_DO_IT as _, 0) };
            let res = if r < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            };
            // SAFETY: as above, integer argument.
            unsafe { libc::ioctl(doit_fd.as_raw_fd(), NBD_CLEAR_SOCK as _, 0) };
            res
        })
        .map_err(io_err("spawning the NBD_DO_IT thread"))?;
    let sh = shared.clone();
    let serve = std::thread::Builder::new()
        .name(format!("nbd{}-serve", shared.index))
        .spawn(move || {
            if let Err(e) = sh.server.handle_pre_negotiated(ours, sh.export) {
                warn!(error = %e, "kernel connection ended with an error");
            }
        })
        .map_err(io_err("spawning the serving thread"))?;
    // The size takes effect once NBD_DO_IT runs: wait for it, so that I/O
    // right after attach does not see an empty device.
    let until = Instant::now() + Duration::from_secs(10);
    while !is_configured(shared.index) && !doit.is_finished() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    info!(device = %shared.path.display(), size, "NBD device attached (ioctl)");
    Ok(Attached {
        shared,
        mode: AttachMode::Ioctl,
        serve: Some(serve),
        doit: Some(doit),
        ctl: Some(ctl),
    })
}

impl Attached {
    /// The device path.
    pub fn device(&self) -> &Path {
        &self.shared.path
    }
    /// The device index N.
    pub fn index(&self) -> u32 {
        self.shared.index
    }
    /// How the device was attached.
    pub fn mode(&self) -> AttachMode {
        self.mode
    }
    /// Connections re-handed to the kernel after it dropped one.
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// Detaches cleanly: flushes the device (dirty page cache and a FLUSH to
    /// the server), disconnects (the kernel sends NBD_CMD_DISC after its
    /// in-flight requests), and waits for the serving threads.
    pub fn detach(mut self) -> Result<(), AttachError> {
        let flushed = OpenOptions::new()
            .write(true)
            .open(&self.shared.path)
            .and_then(|f| f.sync_all())
            .map_err(io_err(format!("flushing {}", self.shared.path.display())));
        self.shared.stopping.store(true, Ordering::SeqCst);
        let disc = match self.mode {
            AttachMode::Ioctl => {
                let fd = self.ctl.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
                // SAFETY: NBD_DISCONNECT on an open NBD device fd, no pointer argument.
                let r = unsafe { libc::ioctl(fd, NBD_DISCONNECT as _, 0) };
                if r < 0 {
                    Err(AttachError::Ioctl {
                        op: "NBD_DISCONNECT",
                        path: self.shared.path.clone(),
                        source: io::Error::last_os_error(),
                    })
                } else {
                    Ok(())
                }
            }
            _ => Genl::open("nbd")
                .and_then(|g| g.disconnect(self.shared.index))
                .map_err(|source| AttachError::Netlink {
                    op: "DISCONNECT",
                    index: self.shared.index,
                    source,
                }),
        };
        if disc.is_ok() {
            if let Some(t) = self.doit.take() {
                let _ = t.join();
            }
            if let Some(t) = self.serve.take() {
                let _ = t.join();
            }
        }
        // Wait (briefly) for the kernel to drop the configuration, so that an
        // immediate re-attach does not see a half-torn-down device.
        let until = Instant::now() + Duration::from_secs(5);
        while is_configured(self.shared.index) && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        info!(device = %self.shared.path.display(), "NBD device detached");
        disc.and(flushed)
    }

    /// Whether something holds the device exclusively (a mounted filesystem,
    /// a dm table, swap): an exclusive open fails with EBUSY.
    pub fn device_in_use(&self) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        matches!(
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_EXCL)
                .open(&self.shared.path),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY)
        )
    }

    /// Whether the kernel keeps this device configured after the process
    /// stops serving it (netlink), so [`Attached::abandon`] is a restart, not
    /// an outage.
    pub fn survives_restart(&self) -> bool {
        self.mode != AttachMode::Ioctl && !self.shared.opts.dead_conn_timeout.is_zero()
    }

    /// Stops serving without disconnecting the kernel device (netlink: the
    /// kernel keeps the device and waits `dead_conn_timeout` for a new
    /// server, as after a crash). Used for an agent restart/upgrade.
    pub fn abandon(mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.server.shutdown_handle().shutdown();
        if let Some(t) = self.serve.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
    }
}

/// Disconnects `/dev/nbd<index>` through netlink (e.g. one left behind by a
/// dead agent), without any flush.
pub fn disconnect(index: u32) -> Result<(), AttachError> {
    Genl::open("nbd")
        .and_then(|g| g.disconnect(index))
        .map_err(|source| AttachError::Netlink {
            op: "DISCONNECT",
            index,
            source,
        })
}

// ---------------------------------------------------------------- NBD ioctls

const fn nbd_io(n: libc::c_ulong) -> libc::c_ulong {
    (0xab << 8) | n
}
const NBD_SET_SOCK: libc::c_ulong = nbd_io(0);
const NBD_SET_BLKSIZE: libc::c_ulong = nbd_io(1);
const NBD_DO_IT: libc::c_ulong = nbd_io(3);
const NBD_CLEAR_SOCK: libc::c_ulong = nbd_io(4);
const NBD_SET_SIZE_BLOCKS: libc::c_ulong = nbd_io(7);
const NBD_DISCONNECT: libc::c_ulong = nbd_io(8);
const NBD_SET_TIMEOUT: libc::c_ulong = nbd_io(9);
const NBD_SET_FLAGS: libc::c_ulong = nbd_io(10);

// ---------------------------------------------------------------- generic netlink

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;

const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

struct ConnectReq {
    index: u32,
    size: u64,
    block_size: u32,
    flags: u16,
    timeout: u64,
    dead_conn_timeout: u64,
    fd: RawFd,
}

/// Builds a netlink message with attributes.
struct Msg {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl Msg {
    fn new(family: u16, flags: u16, cmd: u8, version: u8) -> Msg {
        let mut buf = vec![0u8; 20];
        buf[4..6].copy_from_slice(&family.to_ne_bytes());
        buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        buf[16] = cmd;
        buf[17] = version;
        Msg {
            buf,
            nests: Vec::new(),
        }
    }
    fn attr(&mut self, ty: u16, data: &[u8]) -> &mut Self {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(data);
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
        self
    }
    fn u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }
    fn u64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }
    fn begin_nest(&mut self, ty: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.attr(ty | NLA_F_NESTED, &[])
    }
    fn end_nest(&mut self) -> &mut Self {
        let at = self.nests.pop().expect("nest");
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }
    fn finish(&mut self, seq: u32) -> &[u8] {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.buf
    }
}

/// Iterates `(type, payload)` of the attributes in `b`.
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let payload = &b[4..len];
        b = &b[len.next_multiple_of(4).min(b.len())..];
        Some((ty, payload))
    })
}

/// A generic-netlink socket bound to one family.
struct Genl {
    fd: OwnedFd,
    family: u16,
    seq: Mutex<u32>,
}

impl Genl {
    fn socket() -> io::Result<OwnedFd> {
        // SAFETY: socket(2) with constant arguments; the returned fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value (kernel picks the port).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as _;
        // SAFETY: bind with a pointer to a live sockaddr_nl and its exact size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as _,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }

    /// Resolves `name` (ENOENT if the family is not registered: module not loaded).
    fn open(name: &str) -> io::Result<Genl> {
        let ctrl = Genl {
            fd: Self::socket()?,
            family: GENL_ID_CTRL,
            seq: Mutex::new(1),
        };
        let mut name_z = name.as_bytes().to_vec();
        name_z.push(0);
        let mut m = Msg::new(
            GENL_ID_CTRL,
            NLM_F_REQUEST | NLM_F_ACK,
            CTRL_CMD_GETFAMILY,
            1,
        );
        m.attr(CTRL_ATTR_FAMILY_NAME, &name_z);
        let mut family = None;
        ctrl.request(&mut m, |payload| {
            for (ty, v) in attrs(payload) {
                if ty == CTRL_ATTR_FAMILY_ID && v.len() >= 2 {
                    family = Some(u16::from_ne_bytes([v[0], v[1]]));
                }
            }
        })?;
        let family = family.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        Ok(Genl {
            fd: ctrl.fd,
            family,
            seq: Mutex::new(100),
        })
    }

    /// Sends `m` and reads replies until the ACK (or error); `on_reply` gets
    /// each reply's attribute area.
    fn request(&self, m: &mut Msg, mut on_reply: impl FnMut(&[u8])) -> io::Result<()> {
        let seq = {
            let mut s = self.seq.lock().unwrap_or_else(|e| e.into_inner());
            *s += 1;
            *s
        };
        let bytes = m.finish(seq);
        // SAFETY: send of a live buffer with its exact length on an owned socket.
        let r = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 16384];
        loop {
            // SAFETY: recv into a live buffer of the given length on an owned socket.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut b = &buf[..n as usize];
            while b.len() >= 16 {
                let len = u32::from_ne_bytes(b[0..4].try_into().expect("4")) as usize;
                let ty = u16::from_ne_bytes([b[4], b[5]]);
                let mseq = u32::from_ne_bytes(b[8..12].try_into().expect("4"));
                if len < 16 || len > b.len() {
                    return Err(io::Error::other("malformed netlink reply"));
                }
                let body = &b[16..len];
                b = &b[len.next_multiple_of(4).min(b.len())..];
                if mseq != seq {
                    continue;
                }
                match ty {
                    NLMSG_ERROR => {
                        let err = i32::from_ne_bytes(
                            body.get(0..4)
                                .ok_or_else(|| io::Error::other("short netlink error"))?
                                .try_into()
                                .expect("4"),
                        );
                        return if err == 0 {
                            Ok(())
                        } else {
                            Err(io::Error::from_raw_os_error(-err))
                        };
                    }
                    NLMSG_DONE => return Ok(()),
                    _ if body.len() >= 4 => on_reply(&body[4..]),
                    _ => {}
                }
            }
        }
    }

    fn connect(&self, r: &ConnectReq) -> io::Result<()> {
        let mut m = Msg::new(self.family, NLM_F_REQUEST | NLM_F_ACK, NBD_CMD_CONNECT, 1);
        m.u32(NBD_ATTR_INDEX, r.index)
            .u64(NBD_ATTR_SIZE_BYTES, r.size)
            .u64(NBD_ATTR_BLOCK_SIZE_BYTES, u64::from(r.block_size))
            .u64(NBD_ATTR_SERVER_FLAGS, u64::from(r.flags));
        if r.timeout > 0 {
            m.u64(NBD_ATTR_TIMEOUT, r.timeout);
        }
        if r.dead_conn_timeout > 0 {
            m.u64(NBD_ATTR_DEAD_CONN_TIMEOUT, r.dead_conn_timeout);
        }
        m.begin_nest(NBD_ATTR_SOCKETS)
            .begin_nest(NBD_SOCK_ITEM)
            .u32(NBD_SOCK_FD, r.fd as u32)
            .end_nest()
            .end_nest();
        self.request(&mut m, |_| {})
    }

    fn reconfigure(&self, index: u32, fd: RawFd) -> io::Result<()> {
        let mut m = Msg::new(
            self.family,
            NLM_F_REQUEST | NLM_F_ACK,
            NBD_CMD_RECONFIGURE,
            1,
        );
        m.u32(NBD_ATTR_INDEX, index)
            .begin_nest(NBD_ATTR_SOCKETS)
            .begin_nest(NBD_SOCK_ITEM)
            .u32(NBD_SOCK_FD, fd as u32)
            .end_nest()
            .end_nest();
        self.request(&mut m, |_| {})
    }

    fn disconnect(&self, index: u32) -> io::Result<()> {
        let mut m = Msg::new(
            self.family,
            NLM_F_REQUEST | NLM_F_ACK,
            NBD_CMD_DISCONNECT,
            1,
        );
        m.u32(NBD_ATTR_INDEX, index);
        self.request(&mut m, |_| {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_message_layout() {
        let mut m = Msg::new(0x20, NLM_F_REQUEST | NLM_F_ACK, NBD_CMD_RECONFIGURE, 1);
        m.u32(NBD_ATTR_INDEX, 3)
            .begin_nest(NBD_ATTR_SOCKETS)
            .begin_nest(NBD_SOCK_ITEM)
            .u32(NBD_SOCK_FD, 9)
            .end_nest()
            .end_nest();
        let b = m.finish(7).to_vec();
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(b[16], NBD_CMD_RECONFIGURE);
        let top: Vec<_> = attrs(&b[20..]).collect();
        assert_eq!(top.len(), 2);
        assert_eq!(top[0], (NBD_ATTR_INDEX, &3u32.to_ne_bytes()[..]));
        assert_eq!(top[1].0, NBD_ATTR_SOCKETS);
        let item: Vec<_> = attrs(top[1].1).collect();
        assert_eq!(item[0].0, NBD_SOCK_ITEM);
        let fd: Vec<_> = attrs(item[0].1).collect();
        assert_eq!(fd, vec![(NBD_SOCK_FD, &9u32.to_ne_bytes()[..])]);
    }

    #[test]
    fn nonexistent_device_is_a_clear_error() {
        let e = nbd_index(Path::new("/dev/nbd-does-not-exist")).unwrap_err();
        assert!(e.to_string().contains("/dev/nbd-does-not-exist"), "{e}");
        let e = nbd_index(Path::new("/dev/null")).unwrap_err();
        assert!(e.to_string().contains("not a block device"), "{e}");
    }
}
