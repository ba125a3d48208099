//! Configuration files of the daemons: `replicator.toml` (`rewind
//! replicator`) and `target.toml` (`rewind target`).
//!
//! Both are strict: unknown keys are refused (`deny_unknown_fields`), and
//! every semantic error names the key it is about (`pair[1].compression: ...`).
//! See `docs/replication.md` for annotated examples.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use replicator::bandwidth::{parse_rate, Schedule, WindowSpec};
use serde::{Deserialize, Serialize};

use crate::export::parse_size;

/// Default directory of daemon configuration files.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/rewind";
/// Default state directory of the replicator.
pub const DEFAULT_REPLICATOR_STATE: &str = "/var/lib/rewind/replicator";
/// Default state directory of the target.
pub const DEFAULT_TARGET_STATE: &str = "/var/lib/rewind/target";

/// TLS settings of either daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// CA certificate (PEM) that signed the peer's certificate.
    pub ca: Option<PathBuf>,
    /// This host's certificate (PEM).
    pub cert: Option<PathBuf>,
    /// This host's private key (PEM).
    pub key: Option<PathBuf>,
    /// Plaintext, no authentication: loopback addresses only (tests).
    #[serde(default)]
    pub insecure: bool,
    /// Target only: client identities (names in the replicator's certificate)
    /// allowed to connect; empty allows any certificate of the CA.
    #[serde(default)]
    pub allowed_clients: Vec<String>,
}

impl TlsConfig {
    /// The TLS settings the daemons' command-line flags describe: `--insecure`
    /// (plaintext, loopback only) or the files `rewind pki issue` wrote for
    /// `host` in `tls_dir`. `insecure_hint` completes the error when neither is given.
    pub fn from_flags(
        insecure: bool,
        tls_dir: Option<&Path>,
        host: &str,
        allowed_clients: Vec<String>,
        insecure_hint: &str,
    ) -> anyhow::Result<TlsConfig> {
        if insecure {
            if tls_dir.is_some() {
                anyhow::bail!("--insecure and --tls-dir exclude each other");
            }
            return Ok(TlsConfig {
                insecure: true,
                ..TlsConfig::default()
            });
        }
        let Some(pki) = tls_dir else {
            anyhow::bail!("give --tls-dir DIR (from `rewind pki`), or --insecure {insecure_hint}");
        };
        let (cert, key) = crate::pki_cli::host_files(pki, host);
        Ok(TlsConfig {
            ca: Some(pki.join(replicator::pki::CA_CERT)),
            cert: Some(cert),
            key: Some(key),
            insecure: false,
            allowed_clients,
        })
    }
}

/// The three PEM files of a mutual-TLS endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificate.
    pub ca: PathBuf,
    /// Own certificate.
    pub cert: PathBuf,
    /// Own key.
    pub key: PathBuf,
}

impl TlsConfig {
    /// `Ok(None)` for insecure, the three files otherwise; errors name `key`.
    pub fn files(&self, key: &str) -> Result<Option<TlsFiles>> {
        if self.insecure {
            if self.ca.is_some() || self.cert.is_some() || self.key.is_some() {
                bail!("{key}.insecure = true cannot be combined with {key}.ca/cert/key");
            }
            return Ok(None);
        }
        let need = |v: &Option<PathBuf>, name: &str| -> Result<PathBuf> {
            v.clone().with_context(|| {
                format!("{key}.{name} is missing (give {key}.ca, {key}.cert and {key}.key, or {key}.insecure = true on loopback)")
            })
        };
        Ok(Some(TlsFiles {
            ca: need(&self.ca, "ca")?,
            cert: need(&self.cert, "cert")?,
            key: need(&self.key, "key")?,
        }))
    }
}

/// Compression of a pair's chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw payloads.
    Off,
    /// zstd at this level (1..=19).
    Zstd(i32),
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match journal::parse_off_or_zstd(s) {
            Some(Ok(None)) => Ok(Compression::Off),
            Some(Ok(Some(level))) => Ok(Compression::Zstd(level)),
            Some(Err(e)) => Err(e),
            None => Err(format!(
                "{s:?}: expected \"off\", \"zstd\" or \"zstd:LEVEL\" (1..19)"
            )),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Off => f.write_str("off"),
            Compression::Zstd(l) => write!(f, "zstd:{l}"),
        }
    }
}

/// Where the replicator ships to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetEndpoint {
    /// `HOST:PORT` of the target.
    pub address: String,
    /// Name expected in the target's certificate (default: the host part of `address`).
    pub server_name: Option<String>,
    /// Limit for all pairs to this target together (see the rate syntax in docs).
    #[serde(default)]
    pub bandwidth: Option<String>,
}

/// One replication pair in `replicator.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairConfig {
    /// Volume name (names the change log and the volume at the target).
    pub volume: String,
    /// Directory of the volume's shared-memory change log.
    #[serde(default = "default_shm_dir")]
    pub shm_dir: PathBuf,
    /// The agent's state directory (persisted bitmap, volume identity).
    #[serde(default = "default_agent_state_dir")]
    pub agent_state_dir: PathBuf,
    /// The source volume (file or block device), read in metadata/bitmap modes and resync.
    pub device: PathBuf,
    /// `off`, `zstd` or `zstd:LEVEL`.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Rate limit of this pair outside schedule windows (`unlimited` by default).
    #[serde(default)]
    pub bandwidth: Option<String>,
    /// Time-of-day windows with their own rate; first match wins.
    #[serde(default)]
    pub schedule: Vec<WindowSpec>,
    /// Pair state directory (default: `<state_dir>/<volume>`).
    pub state_dir: Option<PathBuf>,
    /// Consistency group (shown in status; pause/resume/resync by group).
    #[serde(default)]
    pub group: Option<String>,
    /// `HOST:PORT` of this pair's target (default: `[target] address`).
    #[serde(default)]
    pub target: Option<String>,
    /// Name in this pair's target certificate (default: the pair's target
    /// host, or `[target] server_name` when the pair uses that target).
    #[serde(default)]
    pub server_name: Option<String>,
}

fn default_shm_dir() -> PathBuf {
    PathBuf::from(agent_core::config::DEFAULT_SHM_DIR)
}
fn default_agent_state_dir() -> PathBuf {
    PathBuf::from(agent_core::config::DEFAULT_STATE_DIR)
}
fn default_compression() -> String {
    "zstd:1".into()
}
fn default_replicator_state() -> PathBuf {
    PathBuf::from(DEFAULT_REPLICATOR_STATE)
}
fn default_rpo_threshold() -> f64 {
    300.0
}
fn default_target_state() -> PathBuf {
    PathBuf::from(DEFAULT_TARGET_STATE)
}
fn default_history_interval() -> f64 {
    60.0
}
fn default_history_days() -> u32 {
    31
}

/// `replicator.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicatorConfig {
    /// State of the daemon (pair states, status file).
    #[serde(default = "default_replicator_state")]
    pub state_dir: PathBuf,
    /// RPO above which `rewind status` raises an alert, in seconds.
    #[serde(default = "default_rpo_threshold")]
    pub rpo_threshold_secs: f64,
    /// The target.
    pub target: TargetEndpoint,
    /// TLS (mutual by default).
    #[serde(default)]
    pub tls: TlsConfig,
    /// Pairs (may be empty: pairs are then added with `rewind protect`).
    #[serde(default, rename = "pair")]
    pub pairs: Vec<PairConfig>,
    /// Admin socket (default `<state_dir>/control.sock`, mode 0600, root only).
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Prometheus text endpoint, `IP:PORT` (loopback unless
    /// `metrics_allow_remote`); none by default.
    #[serde(default)]
    pub metrics: Option<String>,
    /// Allow `metrics` on a non-loopback address (the figures are not secret
    /// but unauthenticated; put a firewall in front).
    #[serde(default)]
    pub metrics_allow_remote: bool,
    /// Seconds per health-history sample (`rewind health-report`).
    #[serde(default = "default_history_interval")]
    pub history_interval_secs: f64,
    /// Days of health history kept (one file per day, older ones deleted).
    #[serde(default = "default_history_days")]
    pub history_days: u32,
}

/// A pair with its settings parsed.
#[derive(Debug, Clone)]
pub struct PairSettings {
    /// Compression.
    pub compression: Compression,
    /// Bandwidth schedule.
    pub schedule: Schedule,
    /// Pair state directory.
    pub state_dir: PathBuf,
    /// `HOST:PORT` of the pair's target.
    pub target: String,
    /// Name expected in the pair's target certificate.
    pub server_name: String,
}

impl ReplicatorConfig {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Self = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("{}", path.display()))?;
        Ok(cfg)
    }

    /// The target's server name (explicit or the host part of the address).
    pub fn server_name(&self) -> String {
        self.target
            .server_name
            .clone()
            .unwrap_or_else(|| host_part(&self.target.address))
    }

    /// The target-wide limit.
    pub fn target_schedule(&self) -> Result<Schedule> {
        match &self.target.bandwidth {
            None => Ok(Schedule::unlimited()),
            Some(r) => Schedule::parse(r).map_err(|e| anyhow::anyhow!("target.bandwidth: {e}")),
        }
    }

    /// Parsed settings of pair `i`.
    pub fn pair_settings(&self, i: usize) -> Result<PairSettings> {
        let key = format!("pair[{i}] (volume {:?})", self.pairs[i].volume);
        self.settings_of(&self.pairs[i], &key)
    }

    /// Parsed settings of `p` (a configured pair or one added at run time);
    /// errors start with `key`.
    pub fn settings_of(&self, p: &PairConfig, key: &str) -> Result<PairSettings> {
        let compression = p
            .compression
            .parse::<Compression>()
            .map_err(|e| anyhow::anyhow!("{key}.compression: {e}"))?;
        let default = p.bandwidth.clone().unwrap_or_default();
        parse_rate(&default).map_err(|e| anyhow::anyhow!("{key}.bandwidth: {e}"))?;
        let schedule = Schedule::from_specs(&p.schedule, &default)
            .map_err(|e| anyhow::anyhow!("{key}.schedule: {e}"))?;
        let target = p
            .target
            .clone()
            .unwrap_or_else(|| self.target.address.clone());
        check_host_port(&target).map_err(|e| anyhow::anyhow!("{key}.target: {e}"))?;
        let server_name = match (&p.server_name, &p.target) {
            (Some(n), _) => n.clone(),
            (None, Some(t)) if *t != self.target.address => host_part(t),
            _ => self.server_name(),
        };
        if self.tls.insecure && !is_loopback_host(&host_part(&target)) {
            bail!("{key}.target = {target:?}: plaintext (tls.insecure) is for loopback only");
        }
        if let Some(g) = &p.group {
            check_name(g).map_err(|e| anyhow::anyhow!("{key}.group: {e}"))?;
        }
        Ok(PairSettings {
            compression,
            schedule,
            state_dir: p
                .state_dir
                .clone()
                .unwrap_or_else(|| self.state_dir.join(&p.volume)),
            target,
            server_name,
        })
    }

    /// Semantic checks; every error names its key.
    pub fn validate(&self) -> Result<()> {
        if !(self.rpo_threshold_secs.is_finite() && self.rpo_threshold_secs > 0.0) {
            bail!(
                "rpo_threshold_secs = {}: must be a positive number of seconds",
                self.rpo_threshold_secs
            );
        }
        if self.target.address.trim().is_empty() {
            bail!("target.address is empty (expected HOST:PORT)");
        }
        check_host_port(&self.target.address)
            .map_err(|e| anyhow::anyhow!("target.address: {e}"))?;
        if let Some(m) = &self.metrics {
            crate::metrics::check_bind(m, self.metrics_allow_remote)
                .map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
        }
        if !(self.history_interval_secs.is_finite()
            && (1.0..=3600.0).contains(&self.history_interval_secs))
        {
            bail!(
                "history_interval_secs = {}: must be 1 to 3600 seconds",
                self.history_interval_secs
            );
        }
        if self.history_days == 0 {
            bail!("history_days = 0: keep at least one day");
        }
        self.target_schedule()?;
        let files = self.tls.files("tls")?;
        if !self.tls.allowed_clients.is_empty() {
            bail!("tls.allowed_clients is a target setting (the replicator checks the target by target.server_name)");
        }
        if files.is_none() && !is_loopback_host(&host_part(&self.target.address)) {
            bail!("tls.insecure = true is refused for target.address {:?}: plaintext is for loopback only", self.target.address);
        }
        let mut seen = std::collections::HashSet::new();
        for (i, p) in self.pairs.iter().enumerate() {
            check_name(&p.volume).map_err(|e| anyhow::anyhow!("pair[{i}].volume: {e}"))?;
            if !seen.insert(p.volume.clone()) {
                bail!("pair[{i}].volume: {:?} is configured twice", p.volume);
            }
            if p.device.as_os_str().is_empty() {
                bail!("pair[{i}].device is empty");
            }
            self.pair_settings(i)?;
        }
        Ok(())
    }
}

/// One volume in `target.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// Volume name (as the source calls it).
    pub name: String,
    /// Replica file or block device.
    pub replica: PathBuf,
    /// Journal directory (spool, undo segments, catalogue).
    pub journal_dir: PathBuf,
    /// Spool budget in bytes (`512M`, `4G`); over it the source is flow controlled.
    #[serde(default)]
    pub spool_budget: Option<String>,
    /// Compression of the undo journal's old data: `"off"`, `"lz4"`, `"zstd"`
    /// or `"zstd:LEVEL"` (1..19); default `"lz4"`.
    #[serde(default)]
    pub undo_compression: Option<String>,
    /// Apply received chunks straight to the replica while nothing is
    /// pending, instead of writing them to the spool first (one write of
    /// each byte less; three fdatasyncs in the acknowledgement path).
    #[serde(default)]
    pub direct_apply: Option<bool>,
    /// Retention of this volume (replaces the file's `[retention]`).
    #[serde(default)]
    pub retention: Option<RetentionConfig>,
}

/// Parses a duration: a number with `s`, `m`, `h`, `d` or `w` (`90s`, `24h`,
/// `4w`). Returns nanoseconds.
pub fn parse_duration(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, unit) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&t[..i], c),
        _ => return Err(format!("{s:?}: give a unit, e.g. 90s, 30m, 24h, 7d, 4w")),
    };
    let secs: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        'w' => 7 * 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (s, m, h, d or w)")),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 90s, 24h or 4w"))?;
    n.checked_mul(secs)
        .and_then(|x| x.checked_mul(1_000_000_000))
        .filter(|&x| x > 0)
        .ok_or_else(|| format!("{s:?}: must be > 0 and below 500 years"))
}

/// One sparse retention tier: up to age `until`, keep one point per `every`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    /// Age up to which the tier applies (`48h`).
    pub until: String,
    /// One point per this interval (`4h`).
    pub every: String,
}

/// Keep bookmarks of a kind for a time, whatever the tiers say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BookmarkKeepConfig {
    /// `app`, `fs` or `user`.
    pub kind: String,
    /// How long (`4w`).
    pub keep: String,
}

/// `[retention]` of `target.toml` (or `retention` of one `[[volume]]`):
/// time-based (`keep_all`, `tiers`, `bookmarks`), space-based (`max_bytes`),
/// or both — whichever triggers first. Without it everything is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Keep every point younger than this (`24h`).
    #[serde(default)]
    pub keep_all: Option<String>,
    /// Sparse tiers after `keep_all`, in increasing `until`.
    #[serde(default)]
    pub tiers: Vec<TierConfig>,
    /// Bookmarks kept longer, by kind.
    #[serde(default)]
    pub bookmarks: Vec<BookmarkKeepConfig>,
    /// Journal space limit (`100G`).
    #[serde(default)]
    pub max_bytes: Option<String>,
}

impl RetentionConfig {
    /// The journal policy; errors name the key under `key` (e.g. `retention.tiers[1].every`).
    pub fn policy(&self, key: &str) -> Result<journal::RetentionPolicy> {
        let dur = |k: String, v: &str| parse_duration(v).map_err(|e| anyhow::anyhow!("{k}: {e}"));
        let keep_all_ns = self
            .keep_all
            .as_deref()
            .map(|v| dur(format!("{key}.keep_all"), v))
            .transpose()?;
        if keep_all_ns.is_none() && (!self.tiers.is_empty() || !self.bookmarks.is_empty()) {
            bail!("{key}.keep_all: needed with tiers or bookmarks (the age before the first tier)");
        }
        let mut tiers = Vec::new();
        let mut prev = keep_all_ns.unwrap_or(0);
        for (i, t) in self.tiers.iter().enumerate() {
            let until = dur(format!("{key}.tiers[{i}].until"), &t.until)?;
            let every = dur(format!("{key}.tiers[{i}].every"), &t.every)?;
            if until <= prev {
                bail!(
                    "{key}.tiers[{i}].until: {:?} must be longer than keep_all and the previous tier",
                    t.until
                );
            }
            if every > until - prev {
                bail!(
                    "{key}.tiers[{i}].every: {:?} is longer than the tier itself",
                    t.every
                );
            }
            prev = until;
            tiers.push(journal::SparseTier {
                until_age_ns: until,
                every_ns: every,
            });
        }
        let mut bookmarks = Vec::new();
        for (i, b) in self.bookmarks.iter().enumerate() {
            let kind = crate::vsnap::parse_kind(&b.kind)
                .map_err(|e| anyhow::anyhow!("{key}.bookmarks[{i}].kind: {e}"))?;
            bookmarks.push((kind, dur(format!("{key}.bookmarks[{i}].keep"), &b.keep)?));
        }
        let max_bytes = self
            .max_bytes
            .as_deref()
            .map(|v| {
                parse_size(v).ok().filter(|&b| b > 0).ok_or_else(|| {
                    anyhow::anyhow!("{key}.max_bytes: {v:?} is not a size such as 512M or 100G")
                })
            })
            .transpose()?;
        if keep_all_ns.is_none() && max_bytes.is_none() {
            bail!("{key}: give keep_all, max_bytes or both");
        }
        Ok(journal::RetentionPolicy {
            keep_all_ns,
            tiers,
            bookmarks,
            max_bytes,
        })
    }
}

impl VolumeConfig {
    /// The spool budget in bytes, if set.
    pub fn spool_budget_bytes(&self, key: &str) -> Result<Option<u64>> {
        self.spool_budget
            .as_deref()
            .map(|s| parse_size(s).map_err(|e| anyhow::anyhow!("{key}.spool_budget: {e}")))
            .transpose()
    }

    /// The undo compression, if set.
    pub fn undo_compression(&self, key: &str) -> Result<Option<journal::UndoCompression>> {
        self.undo_compression
            .as_deref()
            .map(|s| {
                s.parse::<journal::UndoCompression>()
                    .map_err(|e| anyhow::anyhow!("{key}.undo_compression: {e}"))
            })
            .transpose()
    }
}

/// `target.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// `HOST:PORT` to listen on.
    pub listen: String,
    /// State of the daemon (status file).
    #[serde(default = "default_target_state")]
    pub state_dir: PathBuf,
    /// Retention of every volume (a volume's own `retention` replaces it).
    #[serde(default)]
    pub retention: Option<RetentionConfig>,
    /// How often retention prunes each open volume (`5m`; default 60s).
    #[serde(default)]
    pub prune_interval: Option<String>,
    /// TLS (mutual by default).
    #[serde(default)]
    pub tls: TlsConfig,
    /// Create the journal of a volume on first contact if it does not exist
    /// (`journal_dir` empty or missing); otherwise unknown volumes are refused.
    #[serde(default = "yes")]
    pub auto_create: bool,
    /// Volumes.
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    /// Prometheus text endpoint, `IP:PORT` (loopback unless
    /// `metrics_allow_remote`); none by default.
    #[serde(default)]
    pub metrics: Option<String>,
    /// Allow `metrics` on a non-loopback address (no authentication).
    #[serde(default)]
    pub metrics_allow_remote: bool,
}

fn yes() -> bool {
    true
}

impl TargetConfig {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Self = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("{}", path.display()))?;
        Ok(cfg)
    }

    /// The listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr> {
        self.listen
            .parse()
            .map_err(|e| anyhow::anyhow!("listen = {:?}: expected IP:PORT ({e})", self.listen))
    }

    /// Semantic checks; every error names its key.
    pub fn validate(&self) -> Result<()> {
        let addr = self.listen_addr()?;
        if let Some(m) = &self.metrics {
            crate::metrics::check_bind(m, self.metrics_allow_remote)
                .map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
        }
        if self.tls.files("tls")?.is_none() && !addr.ip().is_loopback() {
            bail!(
                "tls.insecure = true is refused for listen = {:?}: plaintext is for loopback only",
                self.listen
            );
        }
        for (i, n) in self.tls.allowed_clients.iter().enumerate() {
            if n.trim().is_empty() {
                bail!("tls.allowed_clients[{i}] is empty");
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, v) in self.volumes.iter().enumerate() {
            let key = format!("volume[{i}]");
            check_name(&v.name).map_err(|e| anyhow::anyhow!("{key}.name: {e}"))?;
            if !seen.insert(v.name.clone()) {
                bail!("{key}.name: {:?} is configured twice", v.name);
            }
            if v.replica.as_os_str().is_empty() {
                bail!("{key}.replica is empty");
            }
            if v.journal_dir.as_os_str().is_empty() {
                bail!("{key}.journal_dir is empty");
            }
            v.spool_budget_bytes(&key)?;
            v.undo_compression(&key)?;
            if let Some(r) = &v.retention {
                r.policy(&format!("{key}.retention"))?;
            }
        }
        if let Some(r) = &self.retention {
            r.policy("retention")?;
        }
        self.prune_interval_ns()?;
        Ok(())
    }

    /// The prune interval (default 60 s).
    pub fn prune_interval_ns(&self) -> Result<u64> {
        match &self.prune_interval {
            None => Ok(60_000_000_000),
            Some(v) => parse_duration(v).map_err(|e| anyhow::anyhow!("prune_interval: {e}")),
        }
    }

    /// The retention policy of volume `name` (its own, else the file's).
    pub fn retention_of(&self, name: &str) -> Result<Option<journal::RetentionPolicy>> {
        match self
            .volumes
            .iter()
            .enumerate()
            .find(|(_, v)| v.name == name)
        {
            Some((i, v)) if v.retention.is_some() => v
                .retention
                .as_ref()
                .map(|r| r.policy(&format!("volume[{i}].retention")))
                .transpose(),
            _ => self
                .retention
                .as_ref()
                .map(|r| r.policy("retention"))
                .transpose(),
        }
    }

    /// The configuration of volume `name`.
    pub fn volume(&self, name: &str) -> Option<&VolumeConfig> {
        self.volumes.iter().find(|v| v.name == name)
    }
}

// ---------------------------------------------------------------------------
// agent.toml (`rewind agent`)
// ---------------------------------------------------------------------------

/// Default memory budget of all rings of an agent (split by `memory_share`).
pub const DEFAULT_AGENT_MEMORY_BUDGET: &str = "256M";
/// Default consistency interval (periodic crash-consistent bookmarks).
pub const DEFAULT_CONSISTENCY_INTERVAL: &str = "15m";
/// Smallest ring an agent gives a volume.
pub const MIN_AGENT_RING: u64 = 1 << 20;

fn default_admin_socket() -> PathBuf {
    PathBuf::from(crate::volumes::DEFAULT_AGENT_SOCKET)
}
fn default_memory_budget() -> String {
    DEFAULT_AGENT_MEMORY_BUDGET.into()
}
fn default_interval() -> String {
    DEFAULT_CONSISTENCY_INTERVAL.into()
}
fn default_block() -> String {
    "4K".into()
}
fn default_share() -> u32 {
    1
}
fn default_max_hold() -> u64 {
    crate::bookmark::DEFAULT_MAX_HOLD_MS
}

/// `agent.toml`: the volumes one `rewind agent` serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Directory of the per-volume persisted state (bitmap, identity, resync flag).
    #[serde(default = "default_agent_state_dir")]
    pub state_dir: PathBuf,
    /// Directory of the shared-memory change logs.
    #[serde(default = "default_shm_dir")]
    pub shm_dir: PathBuf,
    /// The agent's admin socket.
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// Memory for all rings together (`256M`), split by `memory_share`.
    #[serde(default = "default_memory_budget")]
    pub memory_budget: String,
    /// Interval of periodic crash-consistent bookmarks per group and per
    /// ungrouped volume (`15m`, `30s`; `off` disables).
    #[serde(default = "default_interval")]
    pub consistency_interval: String,
    /// Bound of the write hold of every bookmark, ms.
    #[serde(default = "default_max_hold")]
    pub max_hold_ms: u64,
    /// Consistency groups.
    #[serde(default, rename = "group")]
    pub groups: Vec<AgentGroupConfig>,
    /// Volumes.
    #[serde(default, rename = "volume")]
    pub volumes: Vec<AgentVolumeConfig>,
}

/// A consistency group in `agent.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentGroupConfig {
    /// Group name.
    pub name: String,
    /// Overrides the agent's `consistency_interval` for this group.
    #[serde(default)]
    pub consistency_interval: Option<String>,
    /// Type of the periodic bookmarks (`user` unless hooks make them `fs`/`app`).
    #[serde(default)]
    pub bookmark_type: crate::bookmark::BookmarkType,
    /// Pre hook of periodic bookmarks (e.g. `fsfreeze -f /srv/db`).
    #[serde(default)]
    pub pre: Option<String>,
    /// Post hook of periodic bookmarks (e.g. `fsfreeze -u /srv/db`).
    #[serde(default)]
    pub post: Option<String>,
}

/// A volume in `agent.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentVolumeConfig {
    /// Volume name (names the change log).
    pub name: String,
    /// Backing file or block device (absolute path, must exist).
    pub backing: PathBuf,
    /// Where the NBD export listens: `unix:PATH` or `tcp:127.0.0.1:PORT`
    /// (loopback only). Optional when `attach` is set.
    #[serde(default)]
    pub listen: Option<String>,
    /// Kernel device to connect to the filter (`/dev/nbdN`).
    #[serde(default)]
    pub attach: Option<PathBuf>,
    /// NBD export name (default: the volume name).
    #[serde(default)]
    pub export_name: Option<String>,
    /// Tracking block size (`4K`..`1M`, power of two).
    #[serde(default = "default_block")]
    pub block_size: String,
    /// Weight of this volume in the memory budget (1..=1000).
    #[serde(default = "default_share")]
    pub memory_share: u32,
    /// Consistency group (must be a `[[group]]`).
    #[serde(default)]
    pub group: Option<String>,
}

/// A volume with its settings parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentVolumeSettings {
    /// The configuration entry.
    pub cfg: AgentVolumeConfig,
    /// Parsed listen address.
    pub listen: Option<crate::listen::ListenAddr>,
    /// Tracking block size.
    pub block_size: u32,
    /// Ring bytes from the budget share.
    pub ring_bytes: u64,
}

/// Parses a consistency interval: `None` for `off`.
pub fn parse_interval(s: &str) -> std::result::Result<Option<std::time::Duration>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let d = crate::replay::parse_duration(t)?;
    if d < std::time::Duration::from_secs(1) {
        return Err(format!("{s:?}: at least 1s (or \"off\")"));
    }
    Ok(Some(d))
}

impl AgentConfig {
    /// Reads and validates a file; errors name the key.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: Self = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("{}", path.display()))?;
        Ok(cfg)
    }

    /// The interval of group `g` (or of ungrouped volumes with `None`).
    pub fn interval_of(&self, g: Option<&str>) -> Option<std::time::Duration> {
        let own = g
            .and_then(|g| self.groups.iter().find(|x| x.name == g))
            .and_then(|x| x.consistency_interval.clone());
        parse_interval(own.as_deref().unwrap_or(&self.consistency_interval))
            .ok()
            .flatten()
    }

    /// Semantic checks (every error names its key) and the parsed volumes.
    pub fn validate(&self) -> Result<Vec<AgentVolumeSettings>> {
        for (key, p) in [
            ("state_dir", &self.state_dir),
            ("shm_dir", &self.shm_dir),
            ("admin_socket", &self.admin_socket),
        ] {
            if !p.is_absolute() {
                bail!(
                    "{key} = {:?}: must be an absolute path",
                    p.display().to_string()
                );
            }
        }
        if self.admin_socket.as_os_str().len() > 100 {
            bail!("admin_socket: path longer than 100 bytes (unix socket limit)");
        }
        let budget =
            parse_size(&self.memory_budget).map_err(|e| anyhow::anyhow!("memory_budget: {e}"))?;
        parse_interval(&self.consistency_interval)
            .map_err(|e| anyhow::anyhow!("consistency_interval: {e}"))?;
        if self.max_hold_ms == 0 || self.max_hold_ms > 60_000 {
            bail!("max_hold_ms = {}: must be 1..=60000", self.max_hold_ms);
        }
        let mut groups = std::collections::HashSet::new();
        for (i, g) in self.groups.iter().enumerate() {
            check_name(&g.name).map_err(|e| anyhow::anyhow!("group[{i}].name: {e}"))?;
            if !groups.insert(g.name.as_str()) {
                bail!("group[{i}].name: {:?} is configured twice", g.name);
            }
            if let Some(iv) = &g.consistency_interval {
                parse_interval(iv).map_err(|e| {
                    anyhow::anyhow!("group[{i}] ({:?}).consistency_interval: {e}", g.name)
                })?;
            }
            for (k, c) in [("pre", &g.pre), ("post", &g.post)] {
                if c.as_deref().is_some_and(|c| c.trim().is_empty()) {
                    bail!("group[{i}] ({:?}).{k} is empty", g.name);
                }
            }
        }
        let total_share: u64 = self.volumes.iter().map(|v| u64::from(v.memory_share)).sum();
        let mut names = std::collections::HashSet::new();
        let mut sockets = std::collections::HashSet::new();
        let mut devices = std::collections::HashSet::new();
        let mut out = Vec::new();
        for (i, v) in self.volumes.iter().enumerate() {
            let key = format!("volume[{i}]");
            check_name(&v.name).map_err(|e| anyhow::anyhow!("{key}.name: {e}"))?;
            let key = format!("volume[{i}] ({:?})", v.name);
            if !names.insert(v.name.as_str()) {
                bail!("{key}.name: {:?} is configured twice", v.name);
            }
            if !v.backing.is_absolute() {
                bail!(
                    "{key}.backing = {:?}: must be an absolute path",
                    v.backing.display().to_string()
                );
            }
            let meta = std::fs::metadata(&v.backing).map_err(|e| {
                anyhow::anyhow!("{key}.backing = {:?}: {e}", v.backing.display().to_string())
            })?;
            {
                use std::os::unix::fs::FileTypeExt;
                let ft = meta.file_type();
                if !(ft.is_file() || ft.is_block_device()) {
                    bail!(
                        "{key}.backing = {:?}: not a regular file or block device",
                        v.backing.display().to_string()
                    );
                }
            }
            let listen = match &v.listen {
                None => None,
                Some(l) => {
                    let a: crate::listen::ListenAddr = l
                        .parse()
                        .map_err(|e| anyhow::anyhow!("{key}.listen: {e}"))?;
                    match &a {
                        crate::listen::ListenAddr::Tcp(addr) if !addr.ip().is_loopback() => {
                            bail!("{key}.listen = {l:?}: NBD is unauthenticated and unencrypted; only loopback addresses are accepted")
                        }
                        crate::listen::ListenAddr::Unix(p) if !p.is_absolute() => {
                            bail!("{key}.listen = {l:?}: the socket path must be absolute")
                        }
                        crate::listen::ListenAddr::Unix(p) if p.as_os_str().len() > 100 => {
                            bail!("{key}.listen = {l:?}: path longer than 100 bytes (unix socket limit)")
                        }
                        _ => {}
                    }
                    if !sockets.insert(a.to_string()) {
                        bail!("{key}.listen = {l:?}: used by another volume");
                    }
                    Some(a)
                }
            };
            if let Some(d) = &v.attach {
                let ok = d
                    .to_str()
                    .and_then(|s| s.strip_prefix("/dev/nbd"))
                    .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
                if !ok {
                    bail!(
                        "{key}.attach = {:?}: expected /dev/nbdN",
                        d.display().to_string()
                    );
                }
                if !devices.insert(d.clone()) {
                    bail!(
                        "{key}.attach = {:?}: used by another volume",
                        d.display().to_string()
                    );
                }
            }
            if listen.is_none() && v.attach.is_none() {
                bail!("{key}: give listen (unix:PATH or tcp:127.0.0.1:PORT) or attach (/dev/nbdN), or both");
            }
            let bs =
                parse_size(&v.block_size).map_err(|e| anyhow::anyhow!("{key}.block_size: {e}"))?;
            let block_size = u32::try_from(bs)
                .ok()
                .filter(|b| b.is_power_of_two() && (4096..=1 << 20).contains(b))
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "{key}.block_size = {:?}: a power of two from 4K to 1M",
                        v.block_size
                    )
                })?;
            if !(1..=1000).contains(&v.memory_share) {
                bail!("{key}.memory_share = {}: must be 1..=1000", v.memory_share);
            }
            if let Some(g) = &v.group {
                if !groups.contains(g.as_str()) {
                    bail!("{key}.group = {g:?}: no [[group]] with that name");
                }
            }
            let ring_bytes = (budget / total_share.max(1) * u64::from(v.memory_share)) & !4095;
            if ring_bytes < MIN_AGENT_RING {
                bail!(
                    "memory_budget = {:?}: {} bytes for volume {:?} (share {} of {total_share}); each volume needs at least 1M",
                    self.memory_budget, ring_bytes, v.name, v.memory_share
                );
            }
            out.push(AgentVolumeSettings {
                cfg: v.clone(),
                listen,
                block_size,
                ring_bytes,
            });
        }
        Ok(out)
    }
}

/// Volume names: 1..=64 of `[A-Za-z0-9._-]`, not starting with a dot.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err(format!("{name:?}: a volume name has 1 to 64 characters"));
    }
    if name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "{name:?}: use letters, digits, '.', '_' and '-' (not starting with '.')"
        ));
    }
    Ok(())
}

/// Whether `host` is `localhost` or a loopback IP address.
pub fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Checks a `HOST:PORT` string (a name or IP, and a port 1..65535).
pub fn check_host_port(addr: &str) -> std::result::Result<(), String> {
    let host = host_part(addr);
    let port = addr.rsplit_once(':').map(|(_, p)| p).unwrap_or("");
    if addr.trim().is_empty() {
        return Err("empty (expected HOST:PORT)".into());
    }
    if host.is_empty() || !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
        return Err(format!("{addr:?}: expected HOST:PORT with a port 1..65535"));
    }
    Ok(())
}

/// The host part of `HOST:PORT` (`[v6]:port` too).
pub fn host_part(addr: &str) -> String {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("").to_owned();
    }
    match addr.rsplit_once(':') {
        Some((h, _)) => h.to_owned(),
        None => addr.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPL: &str = r#"
state_dir = "/tmp/r"
[target]
address = "127.0.0.1:7700"
server_name = "127.0.0.1"
bandwidth = "100M"
[tls]
ca = "/pki/ca.pem"
cert = "/pki/src.pem"
key = "/pki/src.key"
[[pair]]
volume = "vol0"
device = "/srv/vol0.img"
compression = "zstd:3"
bandwidth = "10M"
schedule = [{ from = "08:00", to = "18:00", rate = "1M" }]
"#;

    #[test]
    fn replicator_config_parses() {
        let c: ReplicatorConfig = toml::from_str(REPL).unwrap();
        c.validate().unwrap();
        let s = c.pair_settings(0).unwrap();
        assert_eq!(s.compression, Compression::Zstd(3));
        assert_eq!(s.state_dir, PathBuf::from("/tmp/r/vol0"));
        assert_eq!(s.schedule.default, Some(10_000_000));
        assert_eq!(c.server_name(), "127.0.0.1");
    }

    fn err_of(text: &str) -> String {
        match toml::from_str::<ReplicatorConfig>(text) {
            Err(e) => e.to_string(),
            Ok(c) => format!("{:#}", c.validate().unwrap_err()),
        }
    }

    #[test]
    fn replicator_errors_name_the_key() {
        assert!(err_of(&REPL.replace("zstd:3", "zstd:99"))
            .contains("pair[0] (volume \"vol0\").compression"));
        assert!(err_of(&REPL.replace("rate = \"1M\"", "rate = \"fast\"")).contains("schedule"));
        assert!(err_of(&REPL.replace("volume = ", "volum = ")).contains("volum"));
        assert!(err_of(&REPL.replace("[tls]", "[tls]\ninsecure = true")).contains("tls.insecure"));
        let no_key = REPL.replace("key = \"/pki/src.key\"", "");
        assert!(err_of(&no_key).contains("tls.key is missing"));
        let remote = REPL
            .replace(
                "ca = \"/pki/ca.pem\"\ncert = \"/pki/src.pem\"\nkey = \"/pki/src.key\"",
                "insecure = true",
            )
            .replace("127.0.0.1:7700", "10.1.1.1:7700");
        assert!(
            err_of(&remote).contains("loopback only"),
            "{}",
            err_of(&remote)
        );
        assert!(err_of(&REPL.replace("\"vol0\"", "\"../x\"")).contains("pair[0].volume"));
    }

    #[test]
    fn replicator_ops_keys_name_the_key() {
        let with = |extra: &str| format!("{extra}\n{REPL}");
        assert!(err_of(&with("metrics = \"0.0.0.0:9470\"")).contains("metrics:"));
        assert!(err_of(&with("metrics = \"0.0.0.0:9470\"")).contains("not a loopback"));
        let ok: ReplicatorConfig = toml::from_str(&with(
            "metrics = \"0.0.0.0:9470\"\nmetrics_allow_remote = true",
        ))
        .unwrap();
        ok.validate().unwrap();
        assert!(err_of(&with("history_interval_secs = 0.1")).contains("history_interval_secs"));
        assert!(err_of(&with("history_days = 0")).contains("history_days"));
        assert!(err_of(&with("metrix = 1")).contains("metrix"));
        let p = REPL.replace(
            "compression = \"zstd:3\"",
            "compression = \"zstd:3\"\ngroup = \"a b\"",
        );
        assert!(
            err_of(&p).contains("pair[0] (volume \"vol0\").group"),
            "{}",
            err_of(&p)
        );
        let p = REPL.replace(
            "compression = \"zstd:3\"",
            "compression = \"zstd:3\"\ntarget = \"dr2\"",
        );
        assert!(
            err_of(&p).contains("pair[0] (volume \"vol0\").target"),
            "{}",
            err_of(&p)
        );
        // A pair with its own target checks that target's certificate name.
        let p = REPL.replace(
            "compression = \"zstd:3\"",
            "compression = \"zstd:3\"\ntarget = \"dr2.example:7700\"",
        );
        let c: ReplicatorConfig = toml::from_str(&p).unwrap();
        let s = c.pair_settings(0).unwrap();
        assert_eq!(
            (s.target.as_str(), s.server_name.as_str()),
            ("dr2.example:7700", "dr2.example")
        );
        // No pair at all is fine: pairs come with `rewind protect`.
        let empty = REPL.split("[[pair]]").next().unwrap().to_string();
        let c: ReplicatorConfig = toml::from_str(&empty).unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn installed_examples_are_valid() {
        let r: ReplicatorConfig = toml::from_str(include_str!(
            "../../scripts/systemd/replicator.toml.example"
        ))
        .unwrap();
        r.validate().unwrap();
        let uncommented: String = include_str!("../../scripts/systemd/replicator.toml.example")
            .lines()
            .map(|l| {
                l.strip_prefix("# ")
                    .filter(|x| x.contains(" = ") || x.starts_with("[["))
                    .unwrap_or(l)
            })
            .collect::<Vec<_>>()
            .join("\n");
        let r: ReplicatorConfig = toml::from_str(&uncommented).unwrap();
        r.validate().unwrap();
        assert_eq!(r.pairs.len(), 1);
        assert_eq!(r.metrics.as_deref(), Some("127.0.0.1:9470"));
        let t: TargetConfig =
            toml::from_str(include_str!("../../scripts/systemd/target.toml.example")).unwrap();
        t.validate().unwrap();
    }

    #[test]
    fn target_config() {
        let t = r#"
listen = "127.0.0.1:7700"
[tls]
ca = "a"
cert = "b"
key = "c"
allowed_clients = ["replicator1"]
[[volume]]
name = "vol0"
replica = "/srv/replica/vol0.img"
journal_dir = "/srv/journal/vol0"
spool_budget = "1G"
"#;
        let c: TargetConfig = toml::from_str(t).unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.volume("vol0").unwrap().spool_budget_bytes("v").unwrap(),
            Some(1 << 30)
        );
        let bad: TargetConfig = toml::from_str(&t.replace("1G", "lots")).unwrap();
        assert!(format!("{:#}", bad.validate().unwrap_err()).contains("volume[0].spool_budget"));
        let bad: TargetConfig = toml::from_str(&t.replace("127.0.0.1:7700", "nowhere")).unwrap();
        assert!(format!("{:#}", bad.validate().unwrap_err()).contains("listen"));
        assert!(toml::from_str::<TargetConfig>(&t.replace("listen", "lisen")).is_err());
    }

    #[test]
    fn target_retention_config() {
        let t = r#"
listen = "127.0.0.1:7700"
prune_interval = "30s"
[tls]
insecure = true
[retention]
keep_all = "24h"
max_bytes = "100G"
tiers = [ { until = "48h", every = "4h" }, { until = "7d", every = "1d" } ]
bookmarks = [ { kind = "app", keep = "4w" } ]
[[volume]]
name = "vol0"
replica = "/r"
journal_dir = "/j"
[[volume]]
name = "vol1"
replica = "/r1"
journal_dir = "/j1"
retention = { max_bytes = "1G" }
"#;
        let c: TargetConfig = toml::from_str(t).unwrap();
        c.validate().unwrap();
        let h = 3_600_000_000_000u64;
        let p = c.retention_of("vol0").unwrap().unwrap();
        assert_eq!(p.keep_all_ns, Some(24 * h));
        assert_eq!(p.max_bytes, Some(100 << 30));
        assert_eq!(p.tiers.len(), 2);
        assert_eq!(p.tiers[1].until_age_ns, 7 * 24 * h);
        assert_eq!(p.tiers[1].every_ns, 24 * h);
        assert_eq!(
            p.bookmarks,
            vec![(journal::BookmarkKind::App, 4 * 7 * 24 * h)]
        );
        let p1 = c.retention_of("vol1").unwrap().unwrap();
        assert_eq!((p1.keep_all_ns, p1.max_bytes), (None, Some(1 << 30)));
        assert_eq!(c.prune_interval_ns().unwrap(), 30_000_000_000);
        for (from, to, key) in [
            ("\"24h\"", "\"24x\"", "retention.keep_all"),
            ("\"100G\"", "\"lots\"", "retention.max_bytes"),
            (
                "until = \"7d\"",
                "until = \"40h\"",
                "retention.tiers[1].until",
            ),
            (
                "every = \"1d\"",
                "every = \"9d\"",
                "retention.tiers[1].every",
            ),
            ("\"app\"", "\"db\"", "retention.bookmarks[0].kind"),
            ("\"30s\"", "\"0s\"", "prune_interval"),
            (
                "retention = { max_bytes = \"1G\" }",
                "retention = { tiers = [] }",
                "volume[1].retention",
            ),
        ] {
            let bad: TargetConfig = toml::from_str(&t.replace(from, to)).unwrap();
            let e = format!("{:#}", bad.validate().unwrap_err());
            assert!(e.contains(key), "{key}: {e}");
        }
        assert!(toml::from_str::<TargetConfig>(&t.replace("keep_all", "keep_al")).is_err());
        assert_eq!(parse_duration("90s"), Ok(90_000_000_000));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn compression_strings() {
        assert_eq!("off".parse::<Compression>(), Ok(Compression::Off));
        assert_eq!("zstd".parse::<Compression>(), Ok(Compression::Zstd(1)));
        assert_eq!("zstd:7".parse::<Compression>(), Ok(Compression::Zstd(7)));
        assert!("lz4".parse::<Compression>().is_err());
        assert!("zstd:0".parse::<Compression>().is_err());
    }

    #[test]
    fn host_parts() {
        assert_eq!(host_part("127.0.0.1:7700"), "127.0.0.1");
        assert_eq!(host_part("[::1]:7700"), "::1");
        assert_eq!(host_part("dr.example:1"), "dr.example");
    }
}
