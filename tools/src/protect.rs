//! Admin commands that drive a running `rewind replicator` through its
//! admin socket: `rewind protect`, `unprotect`, `pause`, `resume`,
//! `resync`. Each sends one request ([`ControlRequest`]) and prints the
//! daemon's answer; nothing is changed when the daemon refuses (the error
//! says why). `--wait` follows the pair until it reaches Differential Sync
//! with everything shipped, printing progress.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args};
use replicator::pair::PairState;

use crate::admin::{self, AdminError};
use crate::config::{PairConfig, DEFAULT_REPLICATOR_STATE};
use crate::replicate::{ControlReply, ControlRequest, Selector, CONTROL_SOCKET};
use crate::status::ReplicatorStatusFile;

/// How long a command waits for the daemon's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the replicator's admin socket is.
#[derive(Debug, Clone, Args)]
pub struct DaemonAddr {
    /// State directory of `rewind replicator` (its admin socket is STATE_DIR/control.sock).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_REPLICATOR_STATE)]
    pub state_dir: PathBuf,
    /// The admin socket, if not in --state-dir.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

impl DaemonAddr {
    /// The socket path.
    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.state_dir.join(CONTROL_SOCKET))
    }
}

/// Sends `req` to the replicator and explains an unreachable daemon.
pub fn call<T: serde::de::DeserializeOwned>(addr: &DaemonAddr, req: &ControlRequest) -> Result<T> {
    let sock = addr.socket();
    admin::call(&sock, req, CALL_TIMEOUT).map_err(|e| match e {
        AdminError::Unreachable { path, source } => anyhow::anyhow!(
            "cannot reach the replicator at {} ({source}): is `rewind replicator` running with this --state-dir, and are you root?",
            path.display()
        ),
        other => anyhow::Error::new(other),
    })
}

/// Arguments of `rewind protect`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    rewind protect --volume vol0 --device /dev/vg0/vol0\n  \
    rewind protect --volume db1 --device /dev/vg0/db1 --target dr1.example:7700 --group erp --compression zstd:3 --wait\n  \
    rewind protect --volume vol0 --device /srv/vol0.img --shm-dir /dev/shm/rewind --bandwidth 20M\n\n\
The volume must already be served by `rewind export` or `rewind agent` (its change log must exist). \
The pair starts with Resync Step I (the target sends checksums, only differing blocks travel), then \
Resync Step II (what changed meanwhile), then Differential Sync. The pair is remembered across \
restarts of the replicator (STATE_DIR/pairs.json) until `rewind unprotect`.")]
pub struct ProtectArgs {
    /// Volume name (as exported; names its change log and the replica at the target).
    #[arg(long, value_name = "NAME")]
    pub volume: String,
    /// The source volume (file or block device) the export serves.
    #[arg(long, value_name = "PATH")]
    pub device: PathBuf,
    /// Target HOST:PORT (default: the replicator's configured target).
    #[arg(long, value_name = "HOST:PORT")]
    pub target: Option<String>,
    /// Name in the target's certificate (default: the host of --target).
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// Consistency group (pause/resume/resync and bookmarks by group).
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// Directory of the change log (as given to the export).
    #[arg(long, value_name = "DIR", default_value = agent_core::config::DEFAULT_SHM_DIR)]
    pub shm_dir: PathBuf,
    /// off, zstd or zstd:LEVEL (1..19).
    #[arg(long, value_name = "off|zstd:N", default_value = "zstd:1")]
    pub compression: String,
    /// Bandwidth limit of the pair, e.g. 10M (bytes/s), 100Mbit, unlimited.
    #[arg(long, value_name = "RATE")]
    pub bandwidth: Option<String>,
    /// Wait until the pair is in Differential Sync and drained, showing resync progress.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub timeout: u64,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub daemon: DaemonAddr,
}

/// Arguments of `rewind unprotect`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    rewind unprotect --volume vol0\n  \
    rewind unprotect --volume vol0 --state-dir /var/lib/rewind/replicator --json\n\n\
Stops shipping the volume and forgets the pair's state on the source. The replica and its journal \
stay at the target (recover from them, or remove them there). Pairs from the configuration file \
are removed by editing the file and reloading (SIGHUP).")]
pub struct UnprotectArgs {
    /// Volume name.
    #[arg(long, value_name = "NAME")]
    pub volume: String,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub daemon: DaemonAddr,
}

/// Arguments of `rewind pause`, `resume` and `resync`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["volume", "group", "all"])))]
pub struct SelectArgs {
    /// One volume.
    #[arg(long, value_name = "NAME")]
    pub volume: Option<String>,
    /// Every volume of a consistency group.
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// Every protected volume.
    #[arg(long)]
    pub all: bool,
    /// Wait until the pairs are in Differential Sync and drained, showing progress (resume, resync).
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub timeout: u64,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub daemon: DaemonAddr,
}

/// `rewind pause` help.
pub const PAUSE_HELP: &str = "Examples:\n  \
    rewind pause --volume vol0\n  \
    rewind pause --group erp\n  \
    rewind pause --all\n\n\
Shipping stops; the export keeps capturing every write (data, then metadata, then bitmap mode if its \
memory fills), so nothing is lost, and RPO grows until `rewind resume`. The pause survives restarts.";
/// `rewind resume` help.
pub const RESUME_HELP: &str = "Examples:\n  \
    rewind resume --volume vol0\n  \
    rewind resume --group erp --wait\n  \
    rewind resume --all";
/// `rewind resync` help.
pub const RESYNC_HELP: &str = "Examples:\n  \
    rewind resync --volume vol0 --wait\n  \
    rewind resync --group erp\n\n\
A full checksum resync: Resync Step I reads the whole source volume, the target sends blake3 hashes of \
its replica, and only differing blocks travel; Resync Step II then ships what changed meanwhile; the \
pair returns to Differential Sync. Use it when the replica is suspected to differ (e.g. it was \
written to at the target). Writes continue during the resync.";

impl SelectArgs {
    fn selector(&self) -> Selector {
        match (&self.volume, &self.group) {
            (Some(v), _) => Selector::Volume(v.clone()),
            (None, Some(g)) => Selector::Group(g.clone()),
            _ => Selector::All,
        }
    }
}

fn print_reply(r: &ControlReply, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        println!("{}", r.message);
    }
    Ok(())
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("{}", p.display()))
}

/// Follows `volumes` until each is in Differential Sync and drained,
/// printing one progress line per second (unless `quiet`).
pub fn wait_synced(
    addr: &DaemonAddr,
    volumes: &[String],
    timeout: Duration,
    quiet: bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_line = String::new();
    loop {
        let st: ReplicatorStatusFile = call(addr, &ControlRequest::Status)?;
        let mut done = true;
        let mut parts = Vec::new();
        for v in volumes {
            let Some(p) = st.pairs.iter().find(|p| &p.status.volume == v) else {
                bail!("volume {v} is no longer protected");
            };
            let s = &p.status;
            let ok = s.state == PairState::DifferentialSync && s.connected && s.drained;
            done &= ok;
            let detail = match (s.state, s.resync) {
                (PairState::ResyncStep1 | PairState::VolumeResized, Some(r))
                    if r.total_bytes > 0 =>
                {
                    format!(
                        "{:.1}%{}",
                        r.done_bytes as f64 * 100.0 / r.total_bytes as f64,
                        r.eta_secs
                            .map_or(String::new(), |e| format!(", ETA {e:.0} s"))
                    )
                }
                _ => format!("RPO {:.1} s", p.rpo_secs),
            };
            parts.push(format!(
                "{v}: {:?}{} {detail}",
                s.state,
                if s.connected { "" } else { " (not connected)" }
            ));
        }
        let line = parts.join(" | ");
        if !quiet && line != last_line {
            eprintln!("  {line}");
            last_line = line;
        }
        if done {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "not in Differential Sync after {} s: {last_line}",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Runs `rewind protect`.
pub fn run_protect(a: ProtectArgs) -> Result<()> {
    let pair = PairConfig {
        volume: a.volume.clone(),
        shm_dir: absolute(&a.shm_dir)?,
        agent_state_dir: PathBuf::from(agent_core::config::DEFAULT_STATE_DIR),
        device: absolute(&a.device)?,
        compression: a.compression.clone(),
        bandwidth: a.bandwidth.clone(),
        schedule: Vec::new(),
        state_dir: None,
        group: a.group.clone(),
        target: a
            .target
            .as_ref()
            .map(|t| t.strip_prefix("tcp:").unwrap_or(t).to_owned()),
        server_name: a.server_name.clone(),
    };
    let r: ControlReply = call(
        &a.daemon,
        &ControlRequest::Protect {
            pair: Box::new(pair),
        },
    )?;
    print_reply(&r, a.json)?;
    if a.wait {
        wait_synced(
            &a.daemon,
            &r.volumes,
            Duration::from_secs(a.timeout),
            a.json,
        )?;
        if !a.json {
            println!("{} is in Differential Sync: protected", a.volume);
        }
    }
    Ok(())
}

/// Runs `rewind unprotect`.
pub fn run_unprotect(a: UnprotectArgs) -> Result<()> {
    let r: ControlReply = call(
        &a.daemon,
        &ControlRequest::Unprotect {
            volume: a.volume.clone(),
        },
    )?;
    print_reply(&r, a.json)
}

/// Which of pause/resume/resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairCommand {
    /// `rewind pause`.
    Pause,
    /// `rewind resume`.
    Resume,
    /// `rewind resync`.
    Resync,
}

/// Runs `rewind pause|resume|resync`.
pub fn run_select(cmd: PairCommand, a: SelectArgs) -> Result<()> {
    let select = a.selector();
    let req = match cmd {
        PairCommand::Pause => ControlRequest::Pause { select },
        PairCommand::Resume => ControlRequest::Resume { select },
        PairCommand::Resync => ControlRequest::Resync { select },
    };
    let r: ControlReply = call(&a.daemon, &req)?;
    print_reply(&r, a.json)?;
    if a.wait {
        if cmd == PairCommand::Pause {
            bail!("--wait applies to resume and resync");
        }
        if cmd == PairCommand::Resync {
            // Let the pairs leave Differential Sync first.
            std::thread::sleep(Duration::from_millis(500));
        }
        wait_synced(
            &a.daemon,
            &r.volumes,
            Duration::from_secs(a.timeout),
            a.json,
        )?;
        if !a.json {
            println!("{}: in Differential Sync", r.volumes.join(", "));
        }
    }
    Ok(())
}
