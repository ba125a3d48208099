//! `rewind export`: serve one volume through the NBD filter, recording every
//! completed write in the volume's shared-memory change log.
//!
//! Lifecycle: the change log is opened (or recovered, after a crash) before
//! the socket accepts its first connection, and closed cleanly (bitmap
//! persisted, region marked clean) after the server has stopped on SIGINT or
//! SIGTERM, so no write acknowledged to a client is missing from the log.
//!
//! With `--attach /dev/nbdN` the kernel NBD client is connected to the
//! filter over a socketpair (netlink `nbd` family, else the NBD ioctls; see
//! `filter_nbd::attach`). SIGINT/SIGTERM flush the device and disconnect it
//! before the server stops — unless it is in use (mounted): then it is left
//! attached, as after a crash, for the next agent to take over
//! (`--force-detach` disconnects anyway). If the agent dies instead, the kernel keeps the
//! device (netlink only) and holds its I/O for `--dead-conn-timeout`; the
//! same command run again takes the device over (`NBD_CMD_RECONFIGURE`),
//! and requests that were in flight are re-sent by the kernel after
//! `--nbd-timeout`, so a filesystem mounted on it survives the restart.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use agent_core::config::{DEFAULT_SHM_DIR, DEFAULT_STATE_DIR};
use agent_core::{ChangeLog, ChangeLogConfig};
use anyhow::{bail, Context, Result};
use clap::Args;
use filter_nbd::{Backing, BlockSource, Export, Server, ServerOptions};
use nix::sys::signal::{SigSet, Signal};

use crate::listen::ListenAddr;

/// Arguments of `rewind export`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    rewind export --backing /srv/vol0.img --listen unix:/run/rewind/vol0.sock\n  \
    rewind export --backing /dev/vg0/data --listen tcp:127.0.0.1:10809 --volume data --read-only\n  \
    rewind export --backing /srv/vol0.img --volume vol0 --attach /dev/nbd0\n  \
    qemu-io -f raw 'nbd+unix:///vol0?socket=/run/rewind/vol0.sock' -c 'write -P 0xab 0 1M'")]
pub struct ExportArgs {
    /// File or block device holding the volume's data.
    #[arg(long, value_name = "PATH")]
    pub backing: PathBuf,
    /// Where to serve: unix:PATH (default choice; socket mode 0600) or tcp:HOST:PORT.
    /// Optional with --attach.
    #[arg(
        long,
        value_name = "unix:SOCKET|tcp:HOST:PORT",
        required_unless_present = "attach"
    )]
    pub listen: Option<ListenAddr>,
    /// Connect this kernel NBD device (/dev/nbdN) to the filter; a device left
    /// by a crashed agent is taken over.
    #[arg(long, value_name = "/dev/nbdN")]
    pub attach: Option<PathBuf>,
    /// With --attach: seconds the kernel holds I/O while no agent serves the
    /// device (agent restart); 0 = fail I/O at once.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub dead_conn_timeout: u64,
    /// With --attach: request timeout in seconds; an unanswered request is
    /// re-sent (to the restarted agent) when it expires.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub nbd_timeout: u64,
    /// With --attach: logical block size of the kernel device.
    #[arg(long, value_name = "BYTES", default_value = "4K", value_parser = parse_size)]
    pub nbd_block_size: u64,
    /// With --attach: on SIGTERM disconnect the device even if it is in use
    /// (mounted); by default an in-use device is left attached for the next agent.
    #[arg(long)]
    pub force_detach: bool,
    /// With --attach: control interface (auto = netlink, else ioctls).
    #[arg(long, value_name = "auto|netlink|ioctl", default_value = "auto")]
    pub attach_method: String,
    /// Refuse every write-like request with EPERM.
    #[arg(long)]
    pub read_only: bool,
    /// NBD export name (default: the volume name).
    #[arg(long, value_name = "NAME")]
    pub export_name: Option<String>,
    /// Volume name, which names the change log (default: the export name, else the backing file's stem).
    #[arg(long, value_name = "NAME")]
    pub volume: Option<String>,
    /// Directory of the shared-memory change log.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_SHM_DIR)]
    pub shm_dir: PathBuf,
    /// Directory of the persisted bitmap, activity log and volume identity.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Ring (data-mode buffer) size in bytes, e.g. 64M or 1G; used when the change log is created.
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = parse_size)]
    pub ring_size: u64,
    /// Tracking block size (one dirty bit), a power of two from 4K to 1M.
    #[arg(long, value_name = "BYTES", default_value = "4K", value_parser = parse_size)]
    pub block_size: u64,
    /// Serve without any change tracking (a baseline for benchmarks; nothing is protected).
    #[arg(long)]
    pub no_tracking: bool,
    /// Serve backing I/O with plain pread/pwrite instead of io_uring.
    #[arg(long)]
    pub no_io_uring: bool,
    /// Record every request (read, write, trim, flush) as a fio v3 iolog in FILE,
    /// replayable with `rewind replay` or `fio --read_iolog`.
    #[arg(long, value_name = "FILE")]
    pub trace_out: Option<PathBuf>,
    /// Admin socket (bookmarks, `drvutil --stop-filtering`), mode 0600, root
    /// or this user only; default `<shm-dir>/<volume>.admin.sock`.
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
}

/// Parses a byte count with an optional K/M/G/T suffix (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown unit {c:?} (use K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a byte count such as 4096, 64K or 1G"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// The volume name used when `--volume` and `--export-name` are absent.
fn default_volume_name(backing: &Path) -> Result<String> {
    backing
        .file_stem()
        .and_then(|s| s.to_str())
        .map(str::to_owned)
        .filter(|s| !s.is_empty())
        .with_context(|| {
            format!(
                "cannot derive a volume name from {}; pass --volume NAME",
                backing.display()
            )
        })
}

/// Binds a unix socket at `path` (mode 0600), replacing a stale socket file
/// left by a crashed server but refusing to steal the path from a live one.
pub fn bind_unix(path: &Path) -> Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
        if UnixStream::connect(path).is_ok() {
            bail!("another server is already listening on {}", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {}", path.display()))?;
    Ok(listener)
}

/// Runs `rewind export` until SIGINT or SIGTERM.
pub fn run(args: ExportArgs) -> Result<()> {
    // Block the stop signals in every thread; one thread waits for them.
    let mut stop_signals = SigSet::empty();
    stop_signals.add(Signal::SIGINT);
    stop_signals.add(Signal::SIGTERM);
    stop_signals
        .thread_block()
        .context("blocking SIGINT/SIGTERM")?;

    let block_size = u32::try_from(args.block_size)
        .ok()
        .filter(|b| b.is_power_of_two() && (4096..=1 << 20).contains(b))
        .with_context(|| {
            format!(
                "--block-size {} must be a power of two from 4K to 1M",
                args.block_size
            )
        })?;
    let volume = match (&args.volume, &args.export_name) {
        (Some(v), _) => v.clone(),
        (None, Some(e)) => e.clone(),
        (None, None) => default_volume_name(&args.backing)?,
    };
    let export_name = args.export_name.clone().unwrap_or_else(|| volume.clone());

    let backing = Backing::open(&args.backing, args.read_only)
        .with_context(|| format!("opening backing {}", args.backing.display()))?;
    let size = backing.size();
    if size == 0 {
        bail!(
            "backing {} has size 0; nothing to serve",
            args.backing.display()
        );
    }

    let change_log = if args.no_tracking || args.read_only {
        if args.no_tracking {
            tracing::warn!(
                volume,
                "change tracking is OFF: writes to this export are not protected"
            );
        }
        None
    } else {
        let mut cfg = ChangeLogConfig::new(volume.clone(), size);
        cfg.shm_dir = args.shm_dir.clone();
        cfg.state_dir = args.state_dir.clone();
        cfg.block_size = block_size;
        cfg.ring_bytes = args.ring_size;
        let log = ChangeLog::open_or_create(cfg)
            .with_context(|| format!("opening the change log of volume {volume}"))?;
        let log = Arc::new(log);
        log.start_persister();
        Some(log)
    };
    let (volumes, sink) = crate::volumes::single(&volume, change_log.clone(), &args.state_dir);
    let admin_path = args
        .admin_socket
        .clone()
        .unwrap_or_else(|| crate::volumes::export_socket(&args.shm_dir, &volume));
    let admin = volumes
        .serve(&admin_path)
        .with_context(|| format!("starting the admin socket {}", admin_path.display()))?;

    let tracer = match &args.trace_out {
        Some(p) => Some(
            crate::replay::capture::IologWriter::create(p, &volume, size)
                .with_context(|| format!("creating the trace file {}", p.display()))?,
        ),
        None => None,
    };
    let export = Export::new(export_name.clone(), Arc::new(backing))
        .with_description(format!("rewind volume {volume}"))
        .with_read_only(args.read_only)
        .with_sink(sink)
        .with_observer(
            tracer
                .clone()
                .map(|t| t as Arc<dyn filter_nbd::RequestObserver>),
        );
    let opts = ServerOptions {
        io_uring: !args.no_io_uring,
        ..ServerOptions::default()
    };
    let server = Arc::new(Server::new(vec![export], opts).context("creating the NBD server")?);

    let attached = match &args.attach {
        Some(dev) => Some(attach_device(&server, dev, &args)?),
        None => None,
    };
    let attached = Arc::new(std::sync::Mutex::new(attached));

    let stopper = server.shutdown_handle();
    let (stopped_tx, stopped_rx) = std::sync::mpsc::channel::<()>();
    let detach_on_stop = attached.clone();
    let force_detach = args.force_detach;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = stop_signals.wait() {
                tracing::info!(?sig, "stopping");
            }
            // The kernel device first: flush, disconnect, wait for its requests.
            let taken = detach_on_stop
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(a) = taken {
                if a.device_in_use() && a.survives_restart() && !force_detach {
                    // Disconnecting would fail every I/O of the mounted filesystem:
                    // stop serving but leave the device to the next agent.
                    tracing::warn!(
                        device = %a.device().display(),
                        "device in use (mounted?): left attached; the kernel holds its I/O until an agent takes it over (--force-detach to disconnect)"
                    );
                    a.abandon();
                } else if let Err(e) = a.detach() {
                    tracing::error!(error = %e, "detaching the NBD device");
                }
            }
            stopper.shutdown();
            let _ = stopped_tx.send(());
        })
        .context("spawning the signal thread")?;

    tracing::info!(
        volume,
        export = export_name,
        size,
        backing = %args.backing.display(),
        listen = ?args.listen.as_ref().map(|l| l.to_string()),
        attach = ?args.attach,
        tracking = change_log.is_some(),
        "serving"
    );
    let served = match &args.listen {
        None => {
            let _ = stopped_rx.recv();
            Ok(())
        }
        Some(ListenAddr::Unix(path)) => {
            let listener = bind_unix(path)?;
            let r = server.serve_unix_listener(listener);
            let _ = std::fs::remove_file(path);
            r
        }
        Some(ListenAddr::Tcp(addr)) => {
            if !addr.ip().is_loopback() {
                tracing::warn!(%addr, "serving NBD on a non-loopback address: NBD itself is unauthenticated and unencrypted");
            }
            let listener =
                std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
            server.serve_tcp_listener(listener)
        }
    };
    // serve_* returns after every connection thread ended (and the kernel
    // device was detached by the signal thread): no request is in flight, so
    // closing now marks the log cleanly shut down.
    if args.listen.is_some() && served.is_ok() {
        let _ = stopped_rx.recv();
    }
    drop(admin);
    drop(attached);
    drop(server);
    if let Some(log) = change_log {
        log.close().context("closing the change log")?;
    }
    if let Some(t) = tracer {
        t.close().context("closing the trace file")?;
    }
    served.context("serving NBD")?;
    Ok(())
}

/// Connects the kernel device `dev` to export 0 of `server`.
fn attach_device(server: &Server, dev: &Path, args: &ExportArgs) -> Result<filter_nbd::Attached> {
    use filter_nbd::attach::Method;
    let method = match args.attach_method.as_str() {
        "auto" => Method::Auto,
        "netlink" => Method::Netlink,
        "ioctl" => Method::Ioctl,
        m => bail!("--attach-method {m:?}: use auto, netlink or ioctl"),
    };
    let block_size = u32::try_from(args.nbd_block_size)
        .ok()
        .filter(|b| b.is_power_of_two() && (512..=4096).contains(b))
        .with_context(|| {
            format!(
                "--nbd-block-size {} must be a power of two from 512 to 4K",
                args.nbd_block_size
            )
        })?;
    let opts = filter_nbd::AttachOptions {
        block_size,
        timeout: std::time::Duration::from_secs(args.nbd_timeout),
        dead_conn_timeout: std::time::Duration::from_secs(args.dead_conn_timeout),
        method,
        ..Default::default()
    };
    let a = filter_nbd::attach(server, 0, dev, &opts)
        .with_context(|| format!("attaching {}", dev.display()))?;
    tracing::info!(device = %dev.display(), mode = ?a.mode(), "kernel device attached");
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn volume_name_defaults_to_the_file_stem() {
        assert_eq!(
            default_volume_name(Path::new("/srv/vol0.img")).unwrap(),
            "vol0"
        );
        assert!(default_volume_name(Path::new("/")).is_err());
    }
}
