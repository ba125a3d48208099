//! `rewind recover`, `rewind snapshot`, `rewind failover`, `rewind reprotect`
//! and `rewind failback`: recovery at the target (design §7, §8; admin guide
//! in docs/recovery.md).
//!
//! When a `rewind target` runs (its admin socket answers in `--state-dir`)
//! the command is executed by the daemon, which owns the volume directories
//! and keeps applying meanwhile. Otherwise `--target-dir DIR` or
//! `--config target.toml` names where the volumes are, and the command opens
//! the volume itself (the journal's directory lock keeps a target from
//! starting on it meanwhile).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use crate::config::{TargetConfig, DEFAULT_TARGET_STATE};
use crate::recover::{self, FailoverReport, RecoveryList, ReprotectReport, SnapshotRequest};
use crate::store::{Layout, VolumePlace, Volumes};
use crate::target_admin::{AdminClient, AdminReply, AdminRequest};
use crate::vsnap::{self, format_time, MaterializeReport, PointArgs, Progress};

/// Where the target's volumes are.
#[derive(Debug, Clone, Args)]
pub struct TargetLocation {
    /// State directory of the running `rewind target` (its admin socket).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_TARGET_STATE)]
    pub state_dir: PathBuf,
    /// No target running: the `--dir` the target uses (DIR/<volume>/journal).
    #[arg(long, value_name = "DIR", conflicts_with = "config")]
    pub target_dir: Option<PathBuf>,
    /// No target running: the target's configuration file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

enum Access {
    Daemon(AdminClient),
    Local(Arc<Volumes>),
}

impl TargetLocation {
    fn layout(&self) -> Result<Option<Layout>> {
        if let Some(d) = &self.target_dir {
            return Ok(Some(Layout::Dir {
                dir: d.clone(),
                spool_budget: None,
                undo_compression: None,
                direct_apply: None,
                retention: None,
            }));
        }
        if let Some(c) = &self.config {
            let cfg = TargetConfig::load(c)?;
            let mut volumes = std::collections::HashMap::new();
            for (i, v) in cfg.volumes.iter().enumerate() {
                volumes.insert(
                    v.name.clone(),
                    VolumePlace {
                        replica: v.replica.clone(),
                        journal_dir: v.journal_dir.clone(),
                        spool_budget: v.spool_budget_bytes(&format!("volume[{i}]"))?,
                        undo_compression: v.undo_compression(&format!("volume[{i}]"))?,
                        direct_apply: v.direct_apply,
                        retention: None,
                    },
                );
            }
            return Ok(Some(Layout::Configured {
                volumes,
                auto_create: false,
            }));
        }
        Ok(None)
    }

    fn access(&self) -> Result<Access> {
        if let Some(c) = AdminClient::connect(&self.state_dir)? {
            return Ok(Access::Daemon(c));
        }
        match self.layout()? {
            Some(l) => Ok(Access::Local(Arc::new(Volumes::new(l)))),
            None => bail!(
                "no target daemon answers in {} (admin socket) and neither --target-dir nor --config was given",
                self.state_dir.display()
            ),
        }
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()?.join(p))
    }
}

fn absolute_listen(l: &str) -> Result<String> {
    match l.strip_prefix("unix:") {
        Some(p) if !p.is_empty() => Ok(format!("unix:{}", absolute(Path::new(p))?.display())),
        _ => Ok(l.to_string()),
    }
}

fn progress_line(what: &str) -> impl FnMut(Progress) + '_ {
    move |p: Progress| {
        eprintln!("{what}: {}", p.line());
    }
}

fn daemon_call(mut c: AdminClient, req: &AdminRequest, what: &str) -> Result<serde_json::Value> {
    c.send(req)?;
    c.wait_done(&mut progress_line(what))
}

/// `rewind recover ...`.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    #[command(subcommand)]
    cmd: RecoverCmd,
}

#[derive(Debug, Subcommand)]
enum RecoverCmd {
    /// List the recovery points of a volume: latest, bookmarks, consistent time ranges.
    #[command(after_help = "Examples:\n  \
        rewind recover list --volume vol0\n  \
        rewind recover list --volume vol0 --json --state-dir /var/lib/rewind/target\n  \
        rewind recover list --volume vol0 --target-dir /srv/rewind      # no target running\n\n\
Only fully applied points are listed. Times are the source's clock, UTC.")]
    List {
        /// Volume name.
        #[arg(long, value_name = "V")]
        volume: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        loc: TargetLocation,
    },
}

fn render_list(l: &RecoveryList) -> String {
    let mut s = format!("volume {} ({} bytes)\n", l.volume, l.size);
    if let Some(m) = &l.failed_over {
        s.push_str(&format!(
            "FAILED OVER to {} at {} (replica {} in use; `rewind reprotect` protects it again)\n",
            m.point,
            format_time(m.at_ns),
            m.replica
        ));
    }
    s.push_str(&format!(
        "latest       seq {}  {}\n",
        l.latest_seq,
        if l.latest_time.is_empty() {
            "-"
        } else {
            &l.latest_time
        }
    ));
    if l.time_ranges.is_empty() {
        s.push_str("time range   none (no change applied yet)\n");
    }
    for r in &l.time_ranges {
        s.push_str(&format!("time range   {} .. {}\n", r.start, r.end));
    }
    if l.bookmarks.is_empty() {
        s.push_str("bookmarks    none\n");
    } else {
        s.push_str("bookmarks\n");
        let w = l
            .bookmarks
            .iter()
            .map(|b| b.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        s.push_str(&format!(
            "  {:w$}  {:12}  {:30}  SEQ\n",
            "NAME", "TYPE", "TIME (UTC)"
        ));
        for b in &l.bookmarks {
            s.push_str(&format!(
                "  {:w$}  {:12}  {:30}  {}\n",
                b.name, b.kind, b.time, b.seq
            ));
        }
    }
    s
}

/// Runs `rewind recover`.
pub fn run_recover(args: RecoverArgs) -> Result<()> {
    match args.cmd {
        RecoverCmd::List { volume, json, loc } => {
            let l: RecoveryList = match loc.access()? {
                Access::Daemon(c) => serde_json::from_value(daemon_call(
                    c,
                    &AdminRequest::List {
                        volume: volume.clone(),
                    },
                    "list",
                )?)?,
                Access::Local(v) => recover::list(&*v.get(&volume)?)?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                print!("{}", render_list(&l));
            }
            Ok(())
        }
    }
}

/// `rewind snapshot ...`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    cmd: SnapshotCmd,
}

#[derive(Debug, Subcommand)]
enum SnapshotCmd {
    /// Serve the volume as it was at a point over NBD (virtual snapshot), until SIGTERM/SIGINT.
    #[command(after_help = "Examples:\n  \
        rewind snapshot create --volume vol0 --bookmark nightly --listen unix:/run/rewind/vol0-snap.sock\n  \
        rewind snapshot create --volume vol0 --at 2026-11-22T04:50:00Z --listen unix:/tmp/s.sock --rw\n  \
        qemu-img convert -f raw -O raw 'nbd+unix:///vol0?socket=/tmp/s.sock' /tmp/copy.img\n\n\
Prints the NBD URI (export name = the volume name) when it is ready. Read-only unless --rw: \
then writes go to a private temporary overlay file (discarded at the end); the replica and the \
journal are never written. Replication keeps running meanwhile.")]
    Create {
        /// Volume name.
        #[arg(long, value_name = "V")]
        volume: String,
        #[command(flatten)]
        point: PointArgs,
        /// Where to serve: unix:PATH or tcp:127.0.0.1:PORT.
        #[arg(long, value_name = "unix:SOCK")]
        listen: String,
        /// Accept writes into a private temporary overlay.
        #[arg(long)]
        rw: bool,
        /// Directory of the overlay file (default: $TMPDIR or /tmp).
        #[arg(long, value_name = "DIR", requires = "rw")]
        overlay_dir: Option<PathBuf>,
        #[command(flatten)]
        loc: TargetLocation,
    },
    /// Copy the volume as it was at a point into a file or device (physical snapshot).
    #[command(after_help = "Examples:\n  \
        rewind snapshot materialize --volume vol0 --bookmark nightly --out /srv/restore/vol0.img\n  \
        rewind snapshot materialize --volume vol0 --latest --out /dev/vg0/restore\n\n\
A file is created (or truncated) sparse; a device must hold the volume. Progress goes to stderr.")]
    Materialize {
        /// Volume name.
        #[arg(long, value_name = "V")]
        volume: String,
        #[command(flatten)]
        point: PointArgs,
        /// Output file or block device.
        #[arg(long, value_name = "FILE|DEVICE")]
        out: PathBuf,
        /// Machine-readable result.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        loc: TargetLocation,
    },
}

/// Runs `rewind snapshot`.
pub fn run_snapshot(args: SnapshotArgs) -> Result<()> {
    match args.cmd {
        SnapshotCmd::Create {
            volume,
            point,
            listen,
            rw,
            overlay_dir,
            loc,
        } => {
            let stop = crate::daemon::stop_flag()?;
            let req = SnapshotRequest {
                volume,
                point: point.spec()?,
                listen: absolute_listen(&listen)?,
                rw,
                overlay_dir: overlay_dir.as_deref().map(absolute).transpose()?,
            };
            let ready = |uri: &str| -> Result<()> {
                let mut o = std::io::stdout().lock();
                writeln!(o, "{uri}")?;
                o.flush()?;
                Ok(())
            };
            match loc.access()? {
                Access::Daemon(mut c) => {
                    c.send(&AdminRequest::Snapshot(req))?;
                    c.set_timeout(Some(Duration::from_millis(200)))?;
                    loop {
                        match c.next_reply()? {
                            None => {
                                if stop.load(Ordering::SeqCst) {
                                    bail!("interrupted before the snapshot was ready");
                                }
                            }
                            Some(AdminReply::Ready { uri }) => {
                                ready(&uri)?;
                                break;
                            }
                            Some(AdminReply::Error { message }) => bail!("{message}"),
                            Some(other) => bail!("unexpected reply {other:?}"),
                        }
                    }
                    loop {
                        if stop.load(Ordering::SeqCst) {
                            c.stop_snapshot()?;
                            c.set_timeout(None)?;
                            let r = c.wait_done(&mut |_| {})?;
                            tracing::info!(result = %r, "snapshot stopped");
                            return Ok(());
                        }
                        match c.next_reply()? {
                            None => {}
                            Some(AdminReply::Error { message }) => bail!("{message}"),
                            Some(other) => bail!("the target ended the snapshot: {other:?}"),
                        }
                    }
                }
                Access::Local(vols) => {
                    let v = vols.get(&req.volume)?;
                    let snap = recover::start_snapshot(v, &req)?;
                    ready(snap.uri())?;
                    while !stop.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    snap.stop()?;
                    Ok(())
                }
            }
        }
        SnapshotCmd::Materialize {
            volume,
            point,
            out,
            json,
            loc,
        } => {
            let out = absolute(&out)?;
            let spec = point.spec()?;
            let rep: MaterializeReport = match loc.access()? {
                Access::Daemon(c) => serde_json::from_value(daemon_call(
                    c,
                    &AdminRequest::Materialize {
                        volume,
                        point: spec,
                        out,
                    },
                    "materialize",
                )?)?,
                Access::Local(vols) => {
                    let view = recover::open_view(vols.get(&volume)?, &spec)?;
                    vsnap::materialize(&view, &out, &mut progress_line("materialize"))?
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&rep)?);
            } else {
                println!(
                    "{}: {} bytes at {} (seq {}), {} written, {:.1} s",
                    rep.out.display(),
                    rep.bytes,
                    rep.point_time,
                    rep.point_seq,
                    rep.written_bytes,
                    rep.secs
                );
            }
            Ok(())
        }
    }
}

#[derive(Parser)]
struct ExportWrapper {
    #[command(flatten)]
    a: crate::export::ExportArgs,
}

/// `rewind failover`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    rewind failover --volume vol0 --latest\n  \
    rewind failover --volume vol0 --bookmark before-upgrade --export unix:/run/rewind/vol0.sock\n\n\
Stops replication of the volume at this target (new frames are refused, persisted across \
restarts), rolls the replica back to the point, and prints the replica's path. With --export the \
replica is then served read-write through the change-tracking filter (like `rewind export`), so it \
can be protected again (`rewind replicator` towards the original host = failback). \
`rewind reprotect` undoes a failover by discarding the replica's divergence.")]
pub struct FailoverArgs {
    /// Volume name.
    #[arg(long, value_name = "V")]
    pub volume: String,
    #[command(flatten)]
    pub point: PointArgs,
    /// Serve the recovered replica read-write with change tracking here, until SIGTERM.
    #[arg(long, value_name = "unix:SOCK")]
    pub export: Option<String>,
    /// With --export: change-log directory of the export.
    #[arg(long, value_name = "DIR", requires = "export")]
    pub export_shm_dir: Option<PathBuf>,
    /// With --export: state directory of the export's change log.
    #[arg(long, value_name = "DIR", requires = "export")]
    pub export_state_dir: Option<PathBuf>,
    /// Machine-readable result.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub loc: TargetLocation,
}

/// Runs `rewind failover`.
pub fn run_failover(args: FailoverArgs) -> Result<()> {
    let spec = args.point.spec()?;
    let rep: FailoverReport = match args.loc.access()? {
        Access::Daemon(c) => serde_json::from_value(daemon_call(
            c,
            &AdminRequest::Failover {
                volume: args.volume.clone(),
                point: spec,
            },
            "failover",
        )?)?,
        Access::Local(v) => recover::failover(&*v.get(&args.volume)?, &spec)?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "volume {} failed over to {}: replica {} (blake3 {}, {} undo records applied)",
            rep.volume,
            rep.point,
            rep.replica.display(),
            rep.blake3,
            rep.records_undone
        );
    }
    std::io::stdout().flush()?;
    if let Some(listen) = &args.export {
        let mut argv: Vec<std::ffi::OsString> = vec![
            "export".into(),
            "--backing".into(),
            rep.replica.clone().into(),
            "--listen".into(),
            listen.into(),
            "--volume".into(),
            args.volume.clone().into(),
        ];
        if let Some(d) = &args.export_shm_dir {
            argv.extend(["--shm-dir".into(), d.clone().into()]);
        }
        if let Some(d) = &args.export_state_dir {
            argv.extend(["--state-dir".into(), d.clone().into()]);
        }
        let w = ExportWrapper::try_parse_from(argv).context("export options")?;
        return crate::export::run(w.a);
    }
    Ok(())
}

/// `rewind reprotect`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    rewind reprotect --volume vol0\n\n\
Protects a failed-over volume again after a drill: the replica's divergence is discarded (its \
journal and spool are deleted, the replica kept), and the next connection of the source \
replicator runs a checksum resync, so only blocks that differ travel. Stop whatever uses the \
replica first.")]
pub struct ReprotectArgs {
    /// Volume name.
    #[arg(long, value_name = "V")]
    pub volume: String,
    /// Also when the volume is not failed over (discards its journal: every point is lost).
    #[arg(long)]
    pub force: bool,
    /// Machine-readable result.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub loc: TargetLocation,
}

/// Runs `rewind reprotect`.
pub fn run_reprotect(args: ReprotectArgs) -> Result<()> {
    let rep: ReprotectReport = match args.loc.access()? {
        Access::Daemon(c) => serde_json::from_value(daemon_call(
            c,
            &AdminRequest::Reprotect {
                volume: args.volume.clone(),
                force: args.force,
            },
            "reprotect",
        )?)?,
        Access::Local(v) => recover::reprotect(&v, &args.volume, args.force)?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "volume {} re-protected: journal discarded, replica {} kept; the source's next connection resyncs by checksum",
            rep.volume,
            rep.replica.display()
        );
    }
    Ok(())
}

/// `rewind failback`.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples (original source host, after `rewind failover --export` at the DR site):\n  \
    rewind failback --volume vol0 --device /srv/vol0.img --journal-dir /var/lib/rewind/failback/vol0 \\\n      \
    --listen tcp:0.0.0.0:7701 --tls-dir /etc/rewind/pki --host src1.example --allow dr1.example\n  \
  then at the DR site:\n  \
    rewind replicator --target tcp:src1.example:7701 --volume vol0 --device /srv/rewind/vol0/replica.img ...\n\n\
Runs a target that accepts only this volume and writes it into DEVICE (the original source, \
which keeps its contents): the first connection runs a checksum resync, so only blocks that \
differ between the recovered replica and DEVICE travel; then changes stream continuously until \
SIGTERM. See docs/recovery.md for the whole procedure and the way back."
)]
pub struct FailbackArgs {
    /// Volume name (as the recovered side's replicator announces it).
    #[arg(long, value_name = "V")]
    pub volume: String,
    /// The original source file or device, to be brought up to date.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// A new journal directory for the reverse pair (must not hold a journal unless --force).
    #[arg(long, value_name = "DIR")]
    pub journal_dir: PathBuf,
    /// Replace a journal left in --journal-dir by an earlier failback.
    #[arg(long)]
    pub force: bool,
    /// Address to listen on: tcp:IP:PORT.
    #[arg(long, value_name = "tcp:IP:PORT", value_parser = crate::daemon::parse_tcp)]
    pub listen: std::net::SocketAddr,
    /// PKI directory from `rewind pki`: uses ca.pem, <host>.pem and <host>.key.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// This host's certificate name in --tls-dir.
    #[arg(long, value_name = "NAME", default_value = "127.0.0.1")]
    pub host: String,
    /// Client identity allowed to connect; repeatable. None: any certificate of the CA.
    #[arg(long = "allow", value_name = "NAME")]
    pub allow: Vec<String>,
    /// Plaintext without authentication (loopback only, for tests).
    #[arg(long)]
    pub insecure: bool,
    /// State directory (status file, admin socket).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/rewind/failback")]
    pub state_dir: PathBuf,
}

/// Runs `rewind failback` until SIGTERM/SIGINT.
pub fn run_failback(args: FailbackArgs) -> Result<()> {
    let refusals = crate::daemon::init_logging();
    let stop = crate::daemon::stop_flag()?;
    crate::config::check_name(&args.volume).map_err(|e| anyhow::anyhow!("--volume {e}"))?;
    let meta = std::fs::metadata(&args.device)
        .with_context(|| format!("--device {}", args.device.display()))?;
    if !(meta.is_file() || std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type())) {
        bail!(
            "--device {} is neither a file nor a block device",
            args.device.display()
        );
    }
    let jd = &args.journal_dir;
    if jd.join("identity").exists() {
        if !args.force {
            bail!(
                "{} already holds a journal (an earlier failback?); --force replaces it",
                jd.display()
            );
        }
        for sub in ["spool", "journal"] {
            let d = jd.join(sub);
            if d.exists() {
                std::fs::remove_dir_all(&d).with_context(|| format!("removing {}", d.display()))?;
            }
        }
        for f in [
            "identity",
            "catalogue.sqlite",
            "catalogue.sqlite-wal",
            "catalogue.sqlite-shm",
        ] {
            let p = jd.join(f);
            if p.exists() {
                std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            }
        }
    }
    let tls = crate::config::TlsConfig::from_flags(
        args.insecure,
        args.tls_dir.as_deref(),
        &args.host,
        args.allow.clone(),
        "on loopback",
    )?;
    let cfg = TargetConfig {
        listen: args.listen.to_string(),
        state_dir: args.state_dir.clone(),
        tls,
        auto_create: true,
        volumes: Vec::new(),
        retention: None,
        prune_interval: None,
        metrics: None,
        metrics_allow_remote: false,
    };
    cfg.validate()?;
    let mut volumes = std::collections::HashMap::new();
    volumes.insert(
        args.volume.clone(),
        VolumePlace {
            replica: args.device.clone(),
            journal_dir: args.journal_dir.clone(),
            spool_budget: None,
            undo_compression: None,
            direct_apply: None,
            retention: None,
        },
    );
    tracing::info!(volume = %args.volume, device = %args.device.display(), "failback: waiting for the recovered side's replicator");
    crate::target_cli::serve(
        cfg,
        Layout::Configured {
            volumes,
            auto_create: true,
        },
        refusals,
        stop,
    )
}
