//! `rewind replicator`: the source-side daemon. Runs one
//! [`replicator::source::Pair`] per configured volume (drain the change log,
//! coalesce, compress, checksum, ship over mutual TLS, commit after the
//! target's durable ack), and keeps `<state_dir>/status.json` up to date for
//! `rewind status`. Pair states survive restarts (`<state_dir>/<volume>/`).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use replicator::bandwidth::{Limiter, PairLimiter};
use replicator::pair::{now_ns, PairState, PairStatus};
use replicator::source::{Pair, PairConfig as EnginePair};
use replicator::tls::ClientTls;
use replicator::wire;
use tracing::{info, warn};

use crate::config::{
    Compression, PairConfig, ReplicatorConfig, TargetEndpoint, TlsConfig, DEFAULT_REPLICATOR_STATE,
};
use crate::daemon;
use crate::status::{write_status, PairReport, ReplicatorStatusFile, Transition};

/// Arguments of `rewind replicator`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    rewind replicator --config /etc/rewind/replicator.toml\n  \
    rewind replicator --target tcp:10.0.0.7:7700 --server-name dr1.example --tls-dir /etc/rewind/pki --host src1.example \\\n      \
    --volume vol0 --device /srv/vol0.img --compression zstd:3 --bandwidth 50M\n  \
    rewind replicator --target tcp:127.0.0.1:7700 --insecure --volume vol0 --device /tmp/vol0.img   # loopback tests only\n\n\
The volume must be served by `rewind export` (or the agent) with the same --shm-dir: the replicator \
attaches to its change log. Stop with SIGTERM or SIGINT (in-flight batches are re-sent later, nothing \
is lost). Status: `rewind status --state-dir STATE_DIR`.")]
pub struct ReplicatorArgs {
    /// replicator.toml (the per-pair flags below are then not allowed).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["target", "volume", "device"])]
    pub config: Option<PathBuf>,
    /// Target address: tcp:HOST:PORT.
    #[arg(long, value_name = "tcp:HOST:PORT")]
    pub target: Option<String>,
    /// Name in the target's certificate (default: the host of --target).
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// PKI directory from `rewind pki`: uses ca.pem, <host>.pem and <host>.key.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// This host's certificate name in --tls-dir.
    #[arg(long, value_name = "NAME", default_value = "replicator")]
    pub host: String,
    /// Plaintext without authentication (loopback targets only, for tests).
    #[arg(long)]
    pub insecure: bool,
    /// Volume name (its change log is SHM_DIR/<volume>.clog).
    #[arg(long, value_name = "NAME")]
    pub volume: Option<String>,
    /// The source volume (file or block device), read in metadata/bitmap modes and during resync.
    #[arg(long, value_name = "PATH")]
    pub device: Option<PathBuf>,
    /// Directory of the change log (as given to `rewind export --shm-dir`).
    #[arg(long, value_name = "DIR", default_value = agent_core::config::DEFAULT_SHM_DIR)]
    pub shm_dir: PathBuf,
    /// off, zstd or zstd:LEVEL (1..19).
    #[arg(long, value_name = "off|zstd:N", default_value = "zstd:1")]
    pub compression: String,
    /// Bandwidth limit of the pair, e.g. 10M (bytes/s), 100Mbit, unlimited.
    #[arg(long, value_name = "RATE")]
    pub bandwidth: Option<String>,
    /// RPO alert threshold in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300.0)]
    pub rpo_threshold: f64,
    /// State directory (pair states, status file).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Resync hash block in bytes (tuning; default 1M): the granularity of checksum comparison.
    #[arg(long, value_name = "BYTES", value_parser = crate::export::parse_size)]
    pub hash_block: Option<u64>,
    /// Largest chunk in bytes (tuning).
    #[arg(long, value_name = "BYTES", value_parser = crate::export::parse_size, hide = true)]
    pub max_chunk: Option<u64>,
}

/// The effective configuration from the flags or the file.
pub fn effective(args: &ReplicatorArgs) -> Result<ReplicatorConfig> {
    if let Some(path) = &args.config {
        let mut cfg = ReplicatorConfig::load(path)?;
        if let Some(s) = &args.state_dir {
            cfg.state_dir = s.clone();
        }
        return Ok(cfg);
    }
    let (Some(target), Some(volume), Some(device)) = (&args.target, &args.volume, &args.device)
    else {
        bail!("give --config FILE, or --target tcp:HOST:PORT, --volume NAME and --device PATH");
    };
    let tls = TlsConfig::from_flags(
        args.insecure,
        args.tls_dir.as_deref(),
        &args.host,
        Vec::new(),
        "with a loopback target",
    )?;
    let cfg = ReplicatorConfig {
        state_dir: args
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_REPLICATOR_STATE)),
        rpo_threshold_secs: args.rpo_threshold,
        target: TargetEndpoint {
            address: target.strip_prefix("tcp:").unwrap_or(target).to_owned(),
            server_name: args.server_name.clone(),
            bandwidth: None,
        },
        tls,
        pairs: vec![PairConfig {
            volume: volume.clone(),
            shm_dir: args.shm_dir.clone(),
            agent_state_dir: PathBuf::from(agent_core::config::DEFAULT_STATE_DIR),
            device: device.clone(),
            compression: args.compression.clone(),
            bandwidth: args.bandwidth.clone(),
            schedule: Vec::new(),
            state_dir: None,
        }],
    };
    cfg.validate()?;
    Ok(cfg)
}

fn client_tls(tls: &TlsConfig) -> Result<ClientTls> {
    match tls.files("tls")? {
        None => Ok(ClientTls::insecure()),
        Some(f) => ClientTls::from_pem(&f.ca, &f.cert, &f.key).with_context(|| {
            format!(
                "loading TLS files {}, {}, {}",
                f.ca.display(),
                f.cert.display(),
                f.key.display()
            )
        }),
    }
}

struct Running {
    pair: Pair,
    compression: String,
    limiter: Limiter,
    history: Vec<Transition>,
    step1: u64,
    bitmap: u64,
}

fn record(r: &mut Running, s: &PairStatus) {
    let changed = match r.history.last() {
        None => true,
        Some(t) => {
            t.state != s.state || t.capture_mode != s.capture_mode || t.connected != s.connected
        }
    };
    if !changed {
        return;
    }
    let prev_bitmap = r.history.last().is_some_and(|t| t.capture_mode == "Bitmap");
    if s.capture_mode == "Bitmap" && !prev_bitmap {
        r.bitmap += 1;
    }
    if s.state == PairState::ResyncStep1
        && r.history
            .last()
            .is_none_or(|t| t.state != PairState::ResyncStep1)
    {
        r.step1 += 1;
    }
    r.history.push(Transition {
        at_ns: now_ns(),
        state: s.state,
        capture_mode: s.capture_mode.clone(),
        connected: s.connected,
    });
    if r.history.len() > 64 {
        r.history.remove(0);
    }
}

fn report(r: &Running, s: PairStatus, threshold: f64) -> PairReport {
    let rpo_secs = s.rpo_ns as f64 / 1e9;
    let mut alerts = Vec::new();
    // The change log leaves bitmap mode lazily (at the next write once
    // drained): a drained pair still showing it is not an alert.
    if s.capture_mode == "Bitmap" && !(s.drained && s.dirty_blocks == 0) {
        alerts.push("capture in bitmap mode: changes are tracked as dirty blocks only (no write order until drained)".into());
    } else if r.bitmap > 0 {
        alerts.push(format!(
            "capture fell back to bitmap mode {} time(s) since the replicator started",
            r.bitmap
        ));
    }
    if rpo_secs > threshold {
        alerts.push(format!(
            "RPO {rpo_secs:.0} s over the threshold of {threshold:.0} s"
        ));
    }
    if s.state == PairState::FlowControlled
        || (s.target_spool_budget > 0 && s.target_spool_bytes > s.target_spool_budget)
    {
        alerts.push(format!(
            "target spool over budget ({} of {} bytes): flow controlled",
            s.target_spool_bytes, s.target_spool_budget
        ));
    }
    if !s.connected {
        if let Some(e) = &s.last_error {
            alerts.push(format!("not connected: {e}"));
        }
    }
    PairReport {
        rpo_secs,
        compression: r.compression.clone(),
        bandwidth_bps: r.limiter.current_rate(),
        resync_step1_entered: r.step1,
        bitmap_mode_entered: r.bitmap,
        history: r.history.clone(),
        alerts,
        status: s,
    }
}

/// Runs `rewind replicator` until SIGTERM/SIGINT.
pub fn run(args: ReplicatorArgs) -> Result<()> {
    crate::logging::init();
    let stop = daemon::stop_flag()?;
    let cfg = effective(&args)?;
    let tls = client_tls(&cfg.tls)?;
    if cfg.tls.insecure {
        warn!(target = %cfg.target.address, "plaintext replication (insecure): loopback only, no authentication");
    }
    let target_limiter = cfg
        .target
        .bandwidth
        .as_ref()
        .map(|_| cfg.target_schedule().map(Limiter::new))
        .transpose()?;
    let server_name = cfg.server_name();
    let mut running = Vec::new();
    for (i, p) in cfg.pairs.iter().enumerate() {
        let set = cfg.pair_settings(i)?;
        let compression = match set.compression {
            Compression::Off => wire::Compression::None,
            Compression::Zstd(l) => wire::Compression::Zstd(l),
        };
        let limiter = Limiter::new(set.schedule.clone());
        let mut e = EnginePair::new(
            p.volume.clone(),
            p.shm_dir.join(format!("{}.clog", p.volume)),
            p.device.clone(),
            cfg.target.address.clone(),
            server_name.clone(),
            tls.clone(),
            set.state_dir.clone(),
        );
        e.compression = compression;
        e.limiter = PairLimiter {
            pair: limiter.clone(),
            target: target_limiter.clone(),
        };
        if let Some(h) = args.hash_block {
            e.hash_block = u32::try_from(h)
                .ok()
                .filter(|h| h.is_power_of_two() && *h >= 4096)
                .with_context(|| format!("--hash-block {h}: a power of two from 4K to 2G"))?;
        }
        if let Some(m) = args.max_chunk {
            e.max_chunk_bytes = m;
        }
        info!(volume = %p.volume, device = %p.device.display(), target = %cfg.target.address, compression = %set.compression, "starting pair");
        let pair = Pair::start(e).with_context(|| format!("pair[{i}] (volume {:?})", p.volume))?;
        running.push(Running {
            pair,
            compression: set.compression.to_string(),
            limiter,
            history: Vec::new(),
            step1: 0,
            bitmap: 0,
        });
    }
    let started_ns = now_ns();
    let snapshot = |running: &mut Vec<Running>, alive: bool| -> ReplicatorStatusFile {
        let pairs = running
            .iter_mut()
            .map(|r| {
                let s = r.pair.status();
                record(r, &s);
                report(r, s, cfg.rpo_threshold_secs)
            })
            .collect();
        ReplicatorStatusFile {
            pid: std::process::id(),
            started_ns,
            updated_ns: now_ns(),
            running: alive,
            target: cfg.target.address.clone(),
            rpo_threshold_secs: cfg.rpo_threshold_secs,
            pairs,
        }
    };
    while !stop.load(Ordering::SeqCst) {
        let st = snapshot(&mut running, true);
        if let Err(e) = write_status(&cfg.state_dir, &st) {
            warn!(error = %format!("{e:#}"), "cannot write the status file");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut last = snapshot(&mut running, false);
    for r in running {
        r.pair.stop();
    }
    for p in &mut last.pairs {
        p.status.state = PairState::Stopped;
        p.status.connected = false;
    }
    write_status(&cfg.state_dir, &last)?;
    info!("replicator stopped cleanly");
    Ok(())
}
