//! `rewind replicator`: the source-side daemon. Runs one
//! [`replicator::source::Pair`] per protected volume (drain the change log,
//! coalesce, compress, checksum, ship over mutual TLS, commit after the
//! target's durable ack) and takes commands on a local admin socket
//! (`<state_dir>/control.sock`, mode 0600, root only; see [`crate::admin`]):
//! live status, `protect` / `unprotect` (pairs added and removed at run
//! time), `pause` / `resume` / `resync`.
//!
//! Persistence: pair states survive restarts (`<pair state_dir>/`); pairs
//! added with `rewind protect` and the paused flags are kept in
//! `<state_dir>/pairs.json` (written atomically and durably before the
//! command is answered), so a restarted daemon resumes exactly the pairs an
//! admin left. `<state_dir>/status.json` is still rewritten a few times a
//! second as the fallback `rewind status` reads when the daemon is down,
//! and [`crate::health::History`] appends the health history. SIGHUP
//! re-reads the configuration file: pairs added to or removed from it are
//! started or stopped; other changed keys need a restart (logged).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use replicator::bandwidth::{Limiter, PairLimiter};
use replicator::pair::{now_ns, PairState, PairStatus, PersistedPair};
use replicator::source::{Pair, PairConfig as EnginePair};
use replicator::tls::ClientTls;
use replicator::wire;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::admin::AdminServer;
use crate::config::{
    check_name, Compression, PairConfig, ReplicatorConfig, TargetEndpoint, TlsConfig,
    DEFAULT_REPLICATOR_STATE,
};
use crate::daemon;
use crate::health::History;
use crate::metrics::{MetricsServer, PromText};
use crate::status::{write_status, PairReport, ReplicatorStatusFile, Transition};

/// File name of the admin socket in the state directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// File of the pairs added at run time (and paused flags).
pub const RUNTIME_PAIRS: &str = "pairs.json";

/// Arguments of `rewind replicator`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    rewind replicator --config /etc/rewind/replicator.toml\n  \
    rewind replicator --target tcp:10.0.0.7:7700 --server-name dr1.example --tls-dir /etc/rewind/pki --host src1.example \\\n      \
    --volume vol0 --device /srv/vol0.img --compression zstd:3 --bandwidth 50M\n  \
    rewind replicator --target tcp:10.0.0.7:7700 --tls-dir /etc/rewind/pki --host src1.example   # no pair yet: add with `rewind protect`\n  \
    rewind replicator --target tcp:127.0.0.1:7700 --insecure --volume vol0 --device /tmp/vol0.img   # loopback tests only\n\n\
The volume must be served by `rewind export` (or the agent) with the same --shm-dir: the replicator \
attaches to its change log. Admin commands (`rewind status`, `protect`, `unprotect`, `pause`, `resume`, \
`resync`) talk to STATE_DIR/control.sock (mode 0600, root only). Stop with SIGTERM or SIGINT (in-flight \
batches are re-sent later, nothing is lost); SIGHUP re-reads --config (pairs added/removed).")]
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
    #[arg(long, value_name = "NAME", requires = "device")]
    pub volume: Option<String>,
    /// The source volume (file or block device), read in metadata/bitmap modes and during resync.
    #[arg(long, value_name = "PATH", requires = "volume")]
    pub device: Option<PathBuf>,
    /// Consistency group of --volume.
    #[arg(long, value_name = "NAME", requires = "volume")]
    pub group: Option<String>,
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
    /// State directory (pair states, status file, admin socket, health history).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Admin socket (default STATE_DIR/control.sock).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,
    /// Serve Prometheus metrics on IP:PORT (loopback only unless --metrics-allow-remote).
    #[arg(long, value_name = "IP:PORT")]
    pub metrics: Option<String>,
    /// Allow --metrics on a non-loopback address (the endpoint has no authentication).
    #[arg(long)]
    pub metrics_allow_remote: bool,
    /// Seconds per health-history sample (default 60).
    #[arg(long, value_name = "SECS")]
    pub history_interval: Option<f64>,
    /// Resync hash block in bytes (tuning; default 1M): the granularity of checksum comparison.
    #[arg(long, value_name = "BYTES", value_parser = crate::export::parse_size)]
    pub hash_block: Option<u64>,
    /// Largest chunk in bytes (tuning).
    #[arg(long, value_name = "BYTES", value_parser = crate::export::parse_size, hide = true)]
    pub max_chunk: Option<u64>,
}

/// The effective configuration from the flags or the file.
pub fn effective(args: &ReplicatorArgs) -> Result<ReplicatorConfig> {
    let mut cfg = if let Some(path) = &args.config {
        ReplicatorConfig::load(path)?
    } else {
        let Some(target) = &args.target else {
            bail!("give --config FILE, or --target tcp:HOST:PORT (and optionally --volume NAME --device PATH)");
        };
        let tls = TlsConfig::from_flags(
            args.insecure,
            args.tls_dir.as_deref(),
            &args.host,
            Vec::new(),
            "with a loopback target",
        )?;
        let pairs = match (&args.volume, &args.device) {
            (Some(volume), Some(device)) => vec![PairConfig {
                volume: volume.clone(),
                shm_dir: args.shm_dir.clone(),
                agent_state_dir: PathBuf::from(agent_core::config::DEFAULT_STATE_DIR),
                device: device.clone(),
                compression: args.compression.clone(),
                bandwidth: args.bandwidth.clone(),
                schedule: Vec::new(),
                state_dir: None,
                group: args.group.clone(),
                target: None,
                server_name: None,
            }],
            _ => Vec::new(),
        };
        ReplicatorConfig {
            state_dir: PathBuf::from(DEFAULT_REPLICATOR_STATE),
            rpo_threshold_secs: args.rpo_threshold,
            target: TargetEndpoint {
                address: target.strip_prefix("tcp:").unwrap_or(target).to_owned(),
                server_name: args.server_name.clone(),
                bandwidth: None,
            },
            tls,
            pairs,
            control_socket: None,
            metrics: None,
            metrics_allow_remote: false,
            history_interval_secs: 60.0,
            history_days: 31,
        }
    };
    if let Some(s) = &args.state_dir {
        cfg.state_dir = s.clone();
    }
    if let Some(c) = &args.control_socket {
        cfg.control_socket = Some(c.clone());
    }
    if let Some(m) = &args.metrics {
        cfg.metrics = Some(m.clone());
    }
    if args.metrics_allow_remote {
        cfg.metrics_allow_remote = true;
    }
    if let Some(h) = args.history_interval {
        cfg.history_interval_secs = h;
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The admin socket of a replicator configured with `cfg`.
pub fn control_socket_of(cfg: &ReplicatorConfig) -> PathBuf {
    cfg.control_socket
        .clone()
        .unwrap_or_else(|| cfg.state_dir.join(CONTROL_SOCKET))
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

/// Which pairs an admin command is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selector {
    /// One volume.
    Volume(String),
    /// Every pair of a consistency group.
    Group(String),
    /// Every pair.
    All,
}

/// Requests of the replicator's admin socket (`{"cmd": ...}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ControlRequest {
    /// The live status ([`ReplicatorStatusFile`]).
    Status,
    /// Start protecting a volume (persisted in `pairs.json`).
    Protect {
        /// The pair, as in a `[[pair]]` table.
        pair: Box<PairConfig>,
    },
    /// Stop protecting a volume added with `protect` and forget its pair
    /// state (a later `protect` does a checksum resync).
    Unprotect {
        /// Volume.
        volume: String,
    },
    /// Suspend shipping (persisted).
    Pause {
        /// Which pairs.
        select: Selector,
    },
    /// Resume shipping.
    Resume {
        /// Which pairs.
        select: Selector,
    },
    /// Full checksum resync (Resync Step I from offset 0, then Step II).
    Resync {
        /// Which pairs.
        select: Selector,
    },
}

/// Answer to the commands other than `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ControlReply {
    /// What was done, in plain words.
    pub message: String,
    /// The volumes affected.
    pub volumes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuntimePairs {
    version: u32,
    #[serde(default)]
    pairs: Vec<PairConfig>,
    #[serde(default)]
    paused: BTreeSet<String>,
}

impl RuntimePairs {
    fn load(dir: &Path) -> Result<RuntimePairs> {
        let path = dir.join(RUNTIME_PAIRS);
        match std::fs::read(&path) {
            Ok(b) => {
                let r: RuntimePairs = serde_json::from_slice(&b)
                    .with_context(|| format!("parsing {}", path.display()))?;
                if r.version != 1 {
                    bail!("{}: version {} not supported", path.display(), r.version);
                }
                Ok(r)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RuntimePairs {
                version: 1,
                ..RuntimePairs::default()
            }),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn store(&self, dir: &Path) -> Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(RUNTIME_PAIRS);
        let tmp = dir.join(format!(".{RUNTIME_PAIRS}.tmp"));
        let body = serde_json::to_vec_pretty(self)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(&body)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("syncing {}", dir.display()))?;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Config,
    Protect,
}

struct Running {
    pair: Pair,
    spec: PairConfig,
    origin: Origin,
    target: String,
    compression: String,
    limiter: Limiter,
    history: Vec<Transition>,
    step1: u64,
    bitmap: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Tuning {
    hash_block: Option<u32>,
    max_chunk: Option<u64>,
}

struct Shared {
    cfg: Mutex<ReplicatorConfig>,
    tls: ClientTls,
    target_limiter: Option<Limiter>,
    tuning: Tuning,
    pairs: Mutex<BTreeMap<String, Running>>,
    runtime: Mutex<RuntimePairs>,
    started_ns: u64,
    control_socket: PathBuf,
    metrics: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        group: r.spec.group.clone(),
        target: r.target.clone(),
        origin: match r.origin {
            Origin::Config => "config".into(),
            Origin::Protect => "protect".into(),
        },
        status: s,
    }
}

impl Shared {
    /// Starts the engine of `spec` (validated against the configuration).
    fn start_pair(&self, spec: &PairConfig, origin: Origin, key: &str) -> Result<Running> {
        let cfg = lock(&self.cfg).clone();
        let set = cfg.settings_of(spec, key)?;
        let compression = match set.compression {
            Compression::Off => wire::Compression::None,
            Compression::Zstd(l) => wire::Compression::Zstd(l),
        };
        let limiter = Limiter::new(set.schedule.clone());
        let mut e = EnginePair::new(
            spec.volume.clone(),
            spec.shm_dir.join(format!("{}.clog", spec.volume)),
            spec.device.clone(),
            set.target.clone(),
            set.server_name.clone(),
            self.tls.clone(),
            set.state_dir.clone(),
        );
        e.compression = compression;
        e.limiter = PairLimiter {
            pair: limiter.clone(),
            target: self
                .target_limiter
                .clone()
                .filter(|_| set.target == cfg.target.address),
        };
        if let Some(h) = self.tuning.hash_block {
            e.hash_block = h;
        }
        if let Some(m) = self.tuning.max_chunk {
            e.max_chunk_bytes = m;
        }
        info!(volume = %spec.volume, device = %spec.device.display(), target = %set.target, compression = %set.compression, "starting pair");
        let pair = Pair::start(e).with_context(|| format!("{key}: starting the pair"))?;
        if lock(&self.runtime).paused.contains(&spec.volume) {
            pair.pause();
        }
        Ok(Running {
            pair,
            spec: spec.clone(),
            origin,
            target: set.target,
            compression: set.compression.to_string(),
            limiter,
            history: Vec::new(),
            step1: 0,
            bitmap: 0,
        })
    }

    fn snapshot(&self, alive: bool) -> ReplicatorStatusFile {
        // Lock order everywhere: pairs, then runtime, then cfg; cfg is
        // released before pairs is taken here.
        let (threshold, target) = {
            let cfg = lock(&self.cfg);
            (cfg.rpo_threshold_secs, cfg.target.address.clone())
        };
        let mut pairs = lock(&self.pairs);
        let reports = pairs
            .values_mut()
            .map(|r| {
                let s = r.pair.status();
                record(r, &s);
                report(r, s, threshold)
            })
            .collect();
        ReplicatorStatusFile {
            pid: std::process::id(),
            started_ns: self.started_ns,
            updated_ns: now_ns(),
            running: alive,
            target,
            rpo_threshold_secs: threshold,
            pairs: reports,
            control_socket: self.control_socket.display().to_string(),
            metrics: lock(&self.metrics).clone(),
        }
    }

    fn select(&self, sel: &Selector) -> Result<Vec<String>, String> {
        let pairs = lock(&self.pairs);
        let names: Vec<String> = match sel {
            Selector::Volume(v) => {
                if !pairs.contains_key(v) {
                    return Err(format!(
                        "volume {v:?} is not protected by this replicator (protected: {})",
                        list(pairs.keys())
                    ));
                }
                vec![v.clone()]
            }
            Selector::Group(g) => {
                let n: Vec<String> = pairs
                    .iter()
                    .filter(|(_, r)| r.spec.group.as_deref() == Some(g.as_str()))
                    .map(|(k, _)| k.clone())
                    .collect();
                if n.is_empty() {
                    return Err(format!("no protected volume is in group {g:?}"));
                }
                n
            }
            Selector::All => pairs.keys().cloned().collect(),
        };
        Ok(names)
    }

    fn handle(&self, req: ControlRequest) -> Result<serde_json::Value, String> {
        let to_value = |v: ControlReply| serde_json::to_value(v).map_err(|e| e.to_string());
        match req {
            ControlRequest::Status => {
                serde_json::to_value(self.snapshot(true)).map_err(|e| e.to_string())
            }
            ControlRequest::Protect { pair } => self.protect(*pair).and_then(to_value),
            ControlRequest::Unprotect { volume } => self.unprotect(&volume).and_then(to_value),
            ControlRequest::Pause { select } => {
                let names = self.select(&select)?;
                {
                    let mut rt = lock(&self.runtime);
                    let mut next = rt.clone();
                    next.paused.extend(names.iter().cloned());
                    next.store(&lock(&self.cfg).state_dir)
                        .map_err(|e| format!("{e:#}"))?;
                    *rt = next;
                }
                let pairs = lock(&self.pairs);
                for n in &names {
                    if let Some(r) = pairs.get(n) {
                        r.pair.pause();
                    }
                }
                info!(volumes = ?names, "paused by the administrator");
                to_value(ControlReply {
                    message: format!(
                        "paused {}: the change log keeps tracking writes, nothing is shipped until `rewind resume`",
                        names.join(", ")
                    ),
                    volumes: names,
                })
            }
            ControlRequest::Resume { select } => {
                let names = self.select(&select)?;
                {
                    let mut rt = lock(&self.runtime);
                    let mut next = rt.clone();
                    for n in &names {
                        next.paused.remove(n);
                    }
                    next.store(&lock(&self.cfg).state_dir)
                        .map_err(|e| format!("{e:#}"))?;
                    *rt = next;
                }
                let pairs = lock(&self.pairs);
                for n in &names {
                    if let Some(r) = pairs.get(n) {
                        r.pair.resume();
                    }
                }
                info!(volumes = ?names, "resumed by the administrator");
                to_value(ControlReply {
                    message: format!("resumed {}", names.join(", ")),
                    volumes: names,
                })
            }
            ControlRequest::Resync { select } => {
                let names = self.select(&select)?;
                let pairs = lock(&self.pairs);
                for n in &names {
                    if let Some(r) = pairs.get(n) {
                        r.pair.request_resync();
                    }
                }
                info!(volumes = ?names, "full checksum resync requested by the administrator");
                to_value(ControlReply {
                    message: format!(
                        "resync requested for {}: Resync Step I compares checksums of the whole volume and sends only differing blocks, then Step II drains what changed meanwhile",
                        names.join(", ")
                    ),
                    volumes: names,
                })
            }
        }
    }

    fn protect(&self, spec: PairConfig) -> Result<ControlReply, String> {
        check_name(&spec.volume).map_err(|e| format!("--volume: {e}"))?;
        if let Some(r) = lock(&self.pairs).get(&spec.volume) {
            return Err(format!(
                "volume {:?} is already protected (state {:?}, target {})",
                spec.volume,
                r.pair.status().state,
                r.target
            ));
        }
        match std::fs::metadata(&spec.device) {
            Ok(m)
                if m.is_file()
                    || std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()) => {}
            Ok(_) => {
                return Err(format!(
                    "--device {}: not a file or block device",
                    spec.device.display()
                ))
            }
            Err(e) => return Err(format!("--device {}: {e}", spec.device.display())),
        }
        let clog = spec.shm_dir.join(format!("{}.clog", spec.volume));
        if !clog.exists() {
            return Err(format!(
                "no change log at {}: is the volume served by `rewind export`/`rewind agent` with --shm-dir {}?",
                clog.display(),
                spec.shm_dir.display()
            ));
        }
        let key = format!("protect {:?}", spec.volume);
        let running = self
            .start_pair(&spec, Origin::Protect, &key)
            .map_err(|e| format!("{e:#}"))?;
        let target = running.target.clone();
        {
            let mut rt = lock(&self.runtime);
            let mut next = rt.clone();
            next.pairs.retain(|p| p.volume != spec.volume);
            next.pairs.push(spec.clone());
            if let Err(e) = next.store(&lock(&self.cfg).state_dir) {
                drop(rt);
                running.pair.stop();
                return Err(format!("{e:#}"));
            }
            *rt = next;
        }
        lock(&self.pairs).insert(spec.volume.clone(), running);
        info!(volume = %spec.volume, %target, "protected by the administrator");
        Ok(ControlReply {
            message: format!(
                "protecting {} to {target}: the target compares checksums first (Resync Step I), then changes flow continuously (Differential Sync)",
                spec.volume
            ),
            volumes: vec![spec.volume],
        })
    }

    fn unprotect(&self, volume: &str) -> Result<ControlReply, String> {
        let running = {
            let mut pairs = lock(&self.pairs);
            match pairs.get(volume) {
                None => {
                    return Err(format!(
                        "volume {volume:?} is not protected by this replicator (protected: {})",
                        list(pairs.keys())
                    ))
                }
                Some(r) if r.origin == Origin::Config => {
                    return Err(format!(
                        "volume {volume:?} is configured in the replicator's configuration file: remove its [[pair]] there and send SIGHUP (systemctl reload rewind-replicator)"
                    ))
                }
                Some(_) => {}
            }
            {
                let mut rt = lock(&self.runtime);
                let mut next = rt.clone();
                next.pairs.retain(|p| p.volume != volume);
                next.paused.remove(volume);
                next.store(&lock(&self.cfg).state_dir)
                    .map_err(|e| format!("{e:#}"))?;
                *rt = next;
            }
            pairs.remove(volume)
        };
        if let Some(r) = running {
            let state_dir = lock(&self.cfg)
                .settings_of(&r.spec, "unprotect")
                .map(|s| s.state_dir)
                .ok();
            r.pair.stop();
            if let Some(d) = state_dir {
                let _ = std::fs::remove_file(PersistedPair::path(&d, volume));
            }
        }
        info!(volume, "unprotected by the administrator");
        Ok(ControlReply {
            message: format!(
                "stopped protecting {volume}; the replica and its journal stay at the target, and protecting it again resynchronises by checksum"
            ),
            volumes: vec![volume.to_owned()],
        })
    }

    /// SIGHUP: applies pair changes of the configuration file.
    fn reload(&self, path: &Path, state_dir_override: Option<&Path>) {
        let mut new = match ReplicatorConfig::load(path) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "reload refused: the configuration has errors; nothing changed");
                return;
            }
        };
        if let Some(s) = state_dir_override {
            new.state_dir = s.to_path_buf();
        }
        let old = lock(&self.cfg).clone();
        if new.target != old.target
            || new.tls != old.tls
            || new.state_dir != old.state_dir
            || new.control_socket != old.control_socket
            || new.metrics != old.metrics
        {
            warn!("reload: target, tls, state_dir, control_socket and metrics changes need a restart; applying pair changes only");
            new.target = old.target.clone();
            new.tls = old.tls.clone();
            new.state_dir = old.state_dir.clone();
            new.control_socket = old.control_socket.clone();
            new.metrics = old.metrics.clone();
        }
        let wanted: BTreeMap<String, PairConfig> = new
            .pairs
            .iter()
            .map(|p| (p.volume.clone(), p.clone()))
            .collect();
        *lock(&self.cfg) = new;
        let mut to_stop = Vec::new();
        {
            let mut pairs = lock(&self.pairs);
            let names: Vec<String> = pairs.keys().cloned().collect();
            for n in names {
                let keep = match (pairs.get(&n), wanted.get(&n)) {
                    (Some(r), Some(w)) => r.origin != Origin::Config || r.spec == *w,
                    (Some(r), None) => r.origin != Origin::Config,
                    _ => true,
                };
                if !keep {
                    if let Some(r) = pairs.remove(&n) {
                        to_stop.push(r);
                    }
                }
            }
        }
        for r in to_stop {
            info!(volume = %r.spec.volume, "reload: stopping pair");
            r.pair.stop();
        }
        for (n, w) in wanted {
            if lock(&self.pairs).contains_key(&n) {
                continue;
            }
            match self.start_pair(&w, Origin::Config, &format!("pair {n:?}")) {
                Ok(r) => {
                    lock(&self.pairs).insert(n, r);
                }
                Err(e) => warn!(error = %format!("{e:#}"), "reload: cannot start pair"),
            }
        }
        info!("configuration reloaded");
    }
}

fn list<'a>(names: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = names.map(String::as_str).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// Prometheus text of a replicator status.
pub fn render_metrics(st: &ReplicatorStatusFile) -> String {
    let mut m = PromText::new();
    m.sample(
        "rewind_replicator_up",
        "gauge",
        "1 while the replicator daemon runs",
        &[],
        1.0,
    );
    m.sample(
        "rewind_replicator_pairs",
        "gauge",
        "Pairs protected by this replicator",
        &[],
        st.pairs.len() as f64,
    );
    for p in &st.pairs {
        let s = &p.status;
        let group = p.group.clone().unwrap_or_default();
        let l = [("volume", s.volume.as_str()), ("group", group.as_str())];
        let g =
            |m: &mut PromText, name: &str, help: &str, v: f64| m.sample(name, "gauge", help, &l, v);
        let c = |m: &mut PromText, name: &str, help: &str, v: f64| {
            m.sample(name, "counter", help, &l, v)
        };
        g(
            &mut m,
            "rewind_pair_rpo_seconds",
            "now - source time of the oldest change not durable at the target",
            p.rpo_secs,
        );
        g(
            &mut m,
            "rewind_pair_connected",
            "1 when connected to the target",
            f64::from(u8::from(s.connected)),
        );
        let state = format!("{:?}", s.state);
        m.sample(
            "rewind_pair_state",
            "gauge",
            "1 for the pair's current state",
            &[
                ("volume", s.volume.as_str()),
                ("group", group.as_str()),
                ("state", state.as_str()),
            ],
            1.0,
        );
        m.sample(
            "rewind_pair_capture_mode",
            "gauge",
            "1 for the change log's capture mode",
            &[
                ("volume", s.volume.as_str()),
                ("group", group.as_str()),
                ("mode", s.capture_mode.as_str()),
            ],
            1.0,
        );
        g(
            &mut m,
            "rewind_pair_pending_source_bytes",
            "Data pending on the source (ring + dirty blocks)",
            s.pending_source_bytes as f64,
        );
        g(
            &mut m,
            "rewind_pair_in_flight_bytes",
            "Data sent and not yet acknowledged",
            s.in_flight_bytes as f64,
        );
        g(
            &mut m,
            "rewind_pair_target_spool_bytes",
            "Data spooled at the target, not applied",
            s.target_spool_bytes as f64,
        );
        g(
            &mut m,
            "rewind_pair_target_spool_budget_bytes",
            "Spool budget of the target",
            s.target_spool_budget as f64,
        );
        g(
            &mut m,
            "rewind_pair_raw_rate_bytes_per_second",
            "Shipping rate, uncompressed",
            s.raw_rate_bps,
        );
        g(
            &mut m,
            "rewind_pair_wire_rate_bytes_per_second",
            "Shipping rate on the wire",
            s.wire_rate_bps,
        );
        g(
            &mut m,
            "rewind_pair_compression_ratio",
            "Uncompressed / compressed payload bytes",
            s.compression_ratio,
        );
        c(
            &mut m,
            "rewind_pair_shipped_bytes_total",
            "Volume bytes shipped (uncompressed)",
            s.shipped_raw_bytes as f64,
        );
        c(
            &mut m,
            "rewind_pair_wire_bytes_total",
            "Bytes written to the connection",
            s.wire_bytes as f64,
        );
        c(
            &mut m,
            "rewind_pair_reconnects_total",
            "Reconnections to the target",
            s.reconnects as f64,
        );
        c(
            &mut m,
            "rewind_pair_bitmap_mode_entered_total",
            "Times the capture fell back to bitmap mode",
            p.bitmap_mode_entered as f64,
        );
        c(
            &mut m,
            "rewind_pair_resync_step1_entered_total",
            "Times the pair entered Resync Step I",
            p.resync_step1_entered as f64,
        );
        let progress = s.resync.map_or(1.0, |r| {
            if r.total_bytes > 0 {
                r.done_bytes as f64 / r.total_bytes as f64
            } else {
                1.0
            }
        });
        g(
            &mut m,
            "rewind_pair_resync_progress_ratio",
            "Resync progress (1 when not resyncing)",
            progress,
        );
        g(
            &mut m,
            "rewind_pair_alerts",
            "Active alerts",
            p.alerts.len() as f64,
        );
    }
    m.finish()
}

/// Runs `rewind replicator` until SIGTERM/SIGINT.
pub fn run(args: ReplicatorArgs) -> Result<()> {
    crate::logging::init();
    let (stop, reload) = daemon::stop_and_reload_flags()?;
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
    let hash_block = args
        .hash_block
        .map(|h| {
            u32::try_from(h)
                .ok()
                .filter(|h| h.is_power_of_two() && *h >= 4096)
                .with_context(|| format!("--hash-block {h}: a power of two from 4K to 2G"))
        })
        .transpose()?;
    let runtime = RuntimePairs::load(&cfg.state_dir)?;
    let control_socket = control_socket_of(&cfg);
    let shared = Arc::new(Shared {
        cfg: Mutex::new(cfg.clone()),
        tls,
        target_limiter,
        tuning: Tuning {
            hash_block,
            max_chunk: args.max_chunk,
        },
        pairs: Mutex::new(BTreeMap::new()),
        runtime: Mutex::new(runtime.clone()),
        started_ns: now_ns(),
        control_socket: control_socket.clone(),
        metrics: Mutex::new(None),
    });
    for (i, p) in cfg.pairs.iter().enumerate() {
        let r = shared.start_pair(
            p,
            Origin::Config,
            &format!("pair[{i}] (volume {:?})", p.volume),
        )?;
        lock(&shared.pairs).insert(p.volume.clone(), r);
    }
    for p in &runtime.pairs {
        if lock(&shared.pairs).contains_key(&p.volume) {
            warn!(volume = %p.volume, "a pair added with `rewind protect` is now also in the configuration file; the file wins");
            continue;
        }
        let key = format!("{} pair {:?}", RUNTIME_PAIRS, p.volume);
        match shared.start_pair(p, Origin::Protect, &key) {
            Ok(r) => {
                lock(&shared.pairs).insert(p.volume.clone(), r);
            }
            Err(e) => warn!(error = %format!("{e:#}"), "cannot restart a protected pair"),
        }
    }
    let sh = shared.clone();
    let admin = AdminServer::start(&control_socket, move |req: ControlRequest| sh.handle(req))
        .with_context(|| format!("admin socket {}", control_socket.display()))?;
    let _metrics = match &cfg.metrics {
        Some(addr) => {
            let sh = shared.clone();
            let m = MetricsServer::start(addr, cfg.metrics_allow_remote, move || {
                render_metrics(&sh.snapshot(true))
            })?;
            *lock(&shared.metrics) = Some(m.addr().to_string());
            Some(m)
        }
        None => None,
    };
    info!(socket = %control_socket.display(), pairs = lock(&shared.pairs).len(), "replicator ready");
    let mut history = History::new(&cfg.state_dir, cfg.history_interval_secs, cfg.history_days);
    let mut last_tick = Instant::now();
    let mut last_file = Instant::now() - Duration::from_secs(1);
    while !stop.load(Ordering::SeqCst) {
        if reload.swap(false, Ordering::SeqCst) {
            match &args.config {
                Some(p) => shared.reload(p, args.state_dir.as_deref()),
                None => warn!("SIGHUP ignored: started without --config"),
            }
        }
        let st = shared.snapshot(true);
        let dt = last_tick.elapsed().as_secs_f64();
        last_tick = Instant::now();
        history.observe(&st.pairs, st.rpo_threshold_secs, dt);
        if let Err(e) = history.flush(false) {
            warn!(error = %format!("{e:#}"), "cannot write the health history");
        }
        if last_file.elapsed() >= Duration::from_millis(250) {
            last_file = Instant::now();
            if let Err(e) = write_status(&st_dir(&shared), &st) {
                warn!(error = %format!("{e:#}"), "cannot write the status file");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    admin.stop();
    let mut last = shared.snapshot(false);
    history.observe(
        &last.pairs,
        last.rpo_threshold_secs,
        last_tick.elapsed().as_secs_f64(),
    );
    if let Err(e) = history.flush(true) {
        warn!(error = %format!("{e:#}"), "cannot write the health history");
    }
    let running: Vec<Running> = std::mem::take(&mut *lock(&shared.pairs))
        .into_values()
        .collect();
    for r in running {
        r.pair.stop();
    }
    for p in &mut last.pairs {
        p.status.state = PairState::Stopped;
        p.status.connected = false;
    }
    write_status(&st_dir(&shared), &last)?;
    info!("replicator stopped cleanly");
    Ok(())
}

fn st_dir(shared: &Shared) -> PathBuf {
    lock(&shared.cfg).state_dir.clone()
}
