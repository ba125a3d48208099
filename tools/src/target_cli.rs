//! `rewind target`: the target daemon. Receives replication streams over
//! mutual TLS, spools every chunk durably in the volume's journal before
//! acknowledging it, applies in order to the replica, and keeps
//! `<state_dir>/status.json` up to date for `rewind status` and `cdpcli`.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use replicator::pair::now_ns;
use replicator::target::{TargetOptions, TargetServer};
use replicator::tls::ServerTls;
use tracing::info;

use crate::config::{
    BookmarkKeepConfig, RetentionConfig, TargetConfig, TierConfig, TlsConfig, DEFAULT_TARGET_STATE,
};
use crate::daemon;
use crate::export::parse_size;
use crate::status::{
    write_status, JournalFigures, RetentionFigures, TargetStatusFile, TargetVolumeReport,
};
use crate::store::{
    resync_passes, CounterBoard, JournalProvider, Layout, VolumePlace, Volumes, NEEDS_SYNC,
};
use crate::target_admin::AdminServer;

/// Arguments of `rewind target`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    rewind target --config /etc/rewind/target.toml\n  \
    rewind target --listen tcp:0.0.0.0:7700 --dir /srv/rewind --tls-dir /etc/rewind/pki --host dr1.example --allow src1.example\n  \
    rewind target --listen tcp:127.0.0.1:7700 --dir /tmp/replicas --insecure      # loopback tests only\n\n\
With --dir, every volume a source announces gets DIR/<volume>/replica.img and DIR/<volume>/journal \
(created on first contact). With --config, only the volumes listed there are accepted. \
Stop with SIGTERM or SIGINT; status is written to STATE_DIR/status.json (see `rewind status`).")]
pub struct TargetArgs {
    /// target.toml; the flags below are then not allowed (except --state-dir to override).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["listen", "dir"])]
    pub config: Option<PathBuf>,
    /// Address to listen on: tcp:IP:PORT (port 0 picks a free port, shown in the status file).
    #[arg(long, value_name = "tcp:IP:PORT", value_parser = daemon::parse_tcp)]
    pub listen: Option<std::net::SocketAddr>,
    /// Directory holding one subdirectory per volume (replica + journal).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// PKI directory from `rewind pki`: uses ca.pem, <host>.pem and <host>.key.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// This host's certificate name in --tls-dir.
    #[arg(long, value_name = "NAME", default_value = "127.0.0.1")]
    pub host: String,
    /// Client identity (name in the replicator's certificate) allowed to connect; repeatable. None: any certificate of the CA.
    #[arg(long = "allow", value_name = "NAME")]
    pub allow: Vec<String>,
    /// Plaintext without authentication (loopback only, for tests).
    #[arg(long)]
    pub insecure: bool,
    /// Spool budget per volume, e.g. 512M (over it the source is flow controlled).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub spool_budget: Option<u64>,
    /// Compression of the undo journal's old data per volume: off, lz4, zstd
    /// or zstd:LEVEL (1..19); default lz4. zstd stores less on compressible
    /// data at about 4x the CPU of lz4 (about 6 instead of 1.6 cycles per
    /// changed byte at 4 KiB here); off stores old data raw.
    #[arg(long, value_name = "off|lz4|zstd:LEVEL", conflicts_with = "config")]
    pub undo_compression: Option<journal::UndoCompression>,
    /// Apply received chunks straight to the replica while nothing is
    /// pending instead of spooling them first: saves one write of every
    /// byte, adds two fdatasyncs to the acknowledgement path. With a backlog
    /// the target spools as usual.
    #[arg(long, value_name = "true|false", conflicts_with = "config")]
    pub direct_apply: Option<bool>,
    /// State directory (status file).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Serve Prometheus metrics on IP:PORT (loopback only unless --metrics-allow-remote).
    #[arg(long, value_name = "IP:PORT")]
    pub metrics: Option<String>,
    /// Allow --metrics on a non-loopback address (the endpoint has no authentication).
    #[arg(long)]
    pub metrics_allow_remote: bool,
    /// Retention: keep every point younger than this (e.g. 24h); with --dir.
    #[arg(long, value_name = "AGE", conflicts_with = "config")]
    pub keep_all: Option<String>,
    /// Retention: after --keep-all, up to age UNTIL keep one point per EVERY (e.g. 48h:4h); repeatable, increasing.
    #[arg(
        long = "keep-tier",
        value_name = "UNTIL:EVERY",
        conflicts_with = "config"
    )]
    pub keep_tiers: Vec<String>,
    /// Retention: keep bookmarks of KIND (app, fs, user) up to AGE (e.g. app:4w); repeatable.
    #[arg(
        long = "keep-bookmarks",
        value_name = "KIND:AGE",
        conflicts_with = "config"
    )]
    pub keep_bookmarks: Vec<String>,
    /// Retention: journal space limit per volume (e.g. 100G).
    #[arg(long, value_name = "BYTES", conflicts_with = "config")]
    pub max_journal: Option<String>,
    /// How often retention prunes each volume (e.g. 60s, 5m).
    #[arg(long, value_name = "DURATION")]
    pub prune_interval: Option<String>,
}

/// The `[retention]` equivalent of the retention flags (`None` without any).
fn retention_flags(args: &TargetArgs) -> Result<Option<RetentionConfig>> {
    if args.keep_all.is_none()
        && args.max_journal.is_none()
        && args.keep_tiers.is_empty()
        && args.keep_bookmarks.is_empty()
    {
        return Ok(None);
    }
    let pair = |flag: &str, v: &str| -> Result<(String, String)> {
        v.split_once(':')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .with_context(|| format!("{flag} {v:?}: expected A:B"))
    };
    let mut tiers = Vec::new();
    for t in &args.keep_tiers {
        let (until, every) = pair("--keep-tier", t)?;
        tiers.push(TierConfig { until, every });
    }
    let mut bookmarks = Vec::new();
    for b in &args.keep_bookmarks {
        let (kind, keep) = pair("--keep-bookmarks", b)?;
        bookmarks.push(BookmarkKeepConfig { kind, keep });
    }
    Ok(Some(RetentionConfig {
        keep_all: args.keep_all.clone(),
        tiers,
        bookmarks,
        max_bytes: args.max_journal.clone(),
    }))
}

fn server_tls(tls: &TlsConfig) -> Result<ServerTls> {
    match tls.files("tls")? {
        None => Ok(ServerTls::insecure()),
        Some(f) => ServerTls::from_pem(&f.ca, &f.cert, &f.key, tls.allowed_clients.clone())
            .with_context(|| {
                format!(
                    "loading TLS files {}, {}, {}",
                    f.ca.display(),
                    f.cert.display(),
                    f.key.display()
                )
            }),
    }
}

/// Builds the effective configuration from the flags or the file.
pub fn effective(args: &TargetArgs) -> Result<(TargetConfig, Layout)> {
    if let Some(path) = &args.config {
        let mut cfg = TargetConfig::load(path)?;
        if let Some(s) = &args.state_dir {
            cfg.state_dir = s.clone();
        }
        if args.metrics.is_some() {
            cfg.metrics = args.metrics.clone();
        }
        cfg.metrics_allow_remote |= args.metrics_allow_remote;
        if args.prune_interval.is_some() {
            cfg.prune_interval = args.prune_interval.clone();
        }
        cfg.validate()?;
        let mut volumes = HashMap::new();
        for (i, v) in cfg.volumes.iter().enumerate() {
            volumes.insert(
                v.name.clone(),
                VolumePlace {
                    replica: v.replica.clone(),
                    journal_dir: v.journal_dir.clone(),
                    spool_budget: v.spool_budget_bytes(&format!("volume[{i}]"))?,
                    undo_compression: v.undo_compression(&format!("volume[{i}]"))?,
                    direct_apply: v.direct_apply,
                    retention: cfg.retention_of(&v.name)?,
                },
            );
        }
        let layout = Layout::Configured {
            volumes,
            auto_create: cfg.auto_create,
        };
        return Ok((cfg, layout));
    }
    let (Some(listen), Some(dir)) = (args.listen, args.dir.clone()) else {
        bail!("give --config FILE, or --listen tcp:IP:PORT and --dir DIR");
    };
    let tls = TlsConfig::from_flags(
        args.insecure,
        args.tls_dir.as_deref(),
        &args.host,
        args.allow.clone(),
        "on loopback",
    )?;
    let cfg = TargetConfig {
        listen: listen.to_string(),
        state_dir: args
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_TARGET_STATE)),
        tls,
        auto_create: true,
        volumes: Vec::new(),
        retention: retention_flags(args)?,
        prune_interval: args.prune_interval.clone(),
        metrics: args.metrics.clone(),
        metrics_allow_remote: args.metrics_allow_remote,
    };
    cfg.validate()?;
    let layout = Layout::Dir {
        dir,
        spool_budget: args.spool_budget,
        undo_compression: args.undo_compression,
        direct_apply: args.direct_apply,
        retention: cfg.retention_of("")?,
    };
    Ok((cfg, layout))
}

/// Runs `rewind target` until SIGTERM/SIGINT.
pub fn run(args: TargetArgs) -> Result<()> {
    let refusals = daemon::init_logging();
    let stop = daemon::stop_flag()?;
    let (cfg, layout) = effective(&args)?;
    serve(cfg, layout, refusals, stop)
}

/// Runs a target daemon on a validated configuration until `stop` is raised:
/// the replication listener, the apply threads, the admin socket
/// (`<state_dir>/admin.sock`, see [`crate::target_admin`]) and the status file.
pub fn serve(
    cfg: TargetConfig,
    layout: Layout,
    refusals: Arc<daemon::Refusals>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    let tls = server_tls(&cfg.tls)?;
    let addr = cfg.listen_addr()?;
    if cfg.tls.insecure {
        replicator::tls::check_insecure_listener(&addr).context("--insecure")?;
        tracing::warn!(%addr, "plaintext replication (insecure): loopback only, no authentication");
    }
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    let bound = listener.local_addr()?;
    let board: CounterBoard = Arc::new(Mutex::new(HashMap::new()));
    let volumes = Arc::new(Volumes::new(layout.clone()));
    let provider = Arc::new(JournalProvider {
        volumes: volumes.clone(),
        board: board.clone(),
    });
    let server = TargetServer::from_listener(listener, tls, provider, TargetOptions::default())
        .context("starting the target server")?;
    let latest: Arc<Mutex<Option<TargetStatusFile>>> = Arc::new(Mutex::new(None));
    let metrics = match &cfg.metrics {
        Some(a) => {
            let l = latest.clone();
            Some(crate::metrics::MetricsServer::start(
                a,
                cfg.metrics_allow_remote,
                move || {
                    let st = l.lock().map(|g| g.clone()).unwrap_or_default();
                    st.map(|s| render_metrics(&s)).unwrap_or_default()
                },
            )?)
        }
        None => None,
    };
    let metrics_addr = metrics.as_ref().map(|m| m.addr().to_string());
    let admin =
        AdminServer::start(&cfg.state_dir, volumes.clone()).context("starting the admin socket")?;
    info!(listen = %bound, state_dir = %cfg.state_dir.display(), "target ready");
    let started_ns = now_ns();
    // Retention figures take the volume lock: refreshed every 2 s, not per status.
    let retention_cache: Mutex<(
        Option<std::time::Instant>,
        HashMap<String, RetentionFigures>,
    )> = Mutex::new((None, HashMap::new()));
    let retention_of = |name: &str| -> Option<RetentionFigures> {
        let mut c = retention_cache.lock().ok()?;
        if c.0.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
            c.0 = Some(std::time::Instant::now());
            c.1.clear();
        }
        if let Some(f) = c.1.get(name) {
            return Some(f.clone());
        }
        let v = volumes.if_open(name).filter(|v| v.has_retention())?;
        let r = v.with(|t| t.retention_status()).ok()?;
        let f = RetentionFigures {
            available_window_secs: r.available_window_ns as f64 / 1e9,
            policy_window_secs: r
                .policy
                .as_ref()
                .and_then(|p| p.promised_age_ns())
                .map(|a| a as f64 / 1e9),
            max_journal_bytes: r.policy.as_ref().and_then(|p| p.max_bytes),
            journal_bytes: r.journal_bytes,
            alert: r.alert_reason,
        };
        c.1.insert(name.to_owned(), f.clone());
        Some(f)
    };
    let snapshot = |running: bool| -> TargetStatusFile {
        let live = server.status();
        let counters = board.lock().map(|b| b.clone()).unwrap_or_default();
        let mut names: Vec<String> = layout.known().into_iter().map(|(n, _)| n).collect();
        for s in &live {
            if !names.contains(&s.volume) {
                names.push(s.volume.clone());
            }
        }
        names.sort();
        let volumes = names
            .into_iter()
            .map(|name| {
                let place = layout.place(&name).map(|(p, _)| p);
                let status = live.iter().find(|s| s.volume == name).cloned();
                let journal = counters.get(&name).copied().map(JournalFigures::from);
                let mut alerts = Vec::new();
                if let Some(s) = &status {
                    if s.spool_budget > 0 && s.spool_bytes > s.spool_budget {
                        alerts.push(format!(
                            "spool over budget: {} > {} bytes",
                            s.spool_bytes, s.spool_budget
                        ));
                    } else if s.flow_controlled {
                        alerts.push("flow controlled: the spool is at its budget".into());
                    }
                    let journal_dir = place
                        .as_ref()
                        .map(|p| p.journal_dir.display().to_string())
                        .unwrap_or_default();
                    if let Some(e) = &s.storage_full {
                        alerts.push(format!(
                            "target storage full: {e}; replication paused (the source keeps tracking and retries, nothing acknowledged is lost): free space on the file system of {journal_dir}"
                        ));
                    }
                    if let Some(e) = &s.low_space {
                        alerts.push(format!(
                            "target low on space: {e}; the source is held back until apply frees the applied spool (free space on the file system of {journal_dir})"
                        ));
                    }
                    // An alert while unresolved: no spool or apply has
                    // succeeded since (the error stays in `last_error`).
                    let unresolved = s.last_error_ns > s.last_ok_ns;
                    if let Some(e) = s.last_error.as_ref().filter(|_| unresolved) {
                        alerts.push(format!("last error: {e}"));
                    }
                }
                let retention = retention_of(&name);
                if let Some(a) = retention.as_ref().and_then(|r| r.alert.as_ref()) {
                    alerts.push(format!("retention shorter than policy: {a}"));
                }
                TargetVolumeReport {
                    status,
                    journal,
                    replica: place
                        .as_ref()
                        .map(|p| p.replica.display().to_string())
                        .unwrap_or_default(),
                    journal_dir: place
                        .as_ref()
                        .map(|p| p.journal_dir.display().to_string())
                        .unwrap_or_default(),
                    needs_initial_sync: place
                        .as_ref()
                        .is_some_and(|p| p.journal_dir.join(NEEDS_SYNC).exists()),
                    resync_passes: place.as_ref().map_or(0, |p| resync_passes(&p.journal_dir)),
                    alerts,
                    io_pattern: crate::iopattern::get(&name),
                    retention,
                    name,
                }
            })
            .collect();
        TargetStatusFile {
            pid: std::process::id(),
            started_ns,
            updated_ns: now_ns(),
            running,
            listen: bound.to_string(),
            refused: refusals.count.load(Ordering::Relaxed),
            last_refusal: refusals.last.lock().ok().and_then(|l| l.clone()),
            volumes,
            metrics: metrics_addr.clone(),
        }
    };
    let pruner = start_pruner(volumes.clone(), cfg.prune_interval_ns()?, stop.clone())?;
    while !stop.load(Ordering::SeqCst) {
        let st = snapshot(true);
        if let Ok(mut l) = latest.lock() {
            *l = Some(st.clone());
        }
        if let Err(e) = write_status(&cfg.state_dir, &st) {
            tracing::warn!(error = %format!("{e:#}"), "cannot write the status file");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let last = snapshot(false);
    admin.shutdown();
    let _ = pruner.join();
    server.shutdown();
    write_status(&cfg.state_dir, &last)?;
    info!("target stopped cleanly");
    Ok(())
}

/// Prometheus text of a target status (refreshed with the status file,
/// five times a second).
pub fn render_metrics(st: &TargetStatusFile) -> String {
    let mut m = crate::metrics::PromText::new();
    m.sample(
        "rewind_target_up",
        "gauge",
        "1 while the target daemon runs",
        &[],
        1.0,
    );
    m.sample(
        "rewind_target_refused_total",
        "counter",
        "Connections refused (TLS, handshake)",
        &[],
        st.refused as f64,
    );
    for v in &st.volumes {
        let l = [("volume", v.name.as_str())];
        if let Some(s) = &v.status {
            let g = |m: &mut crate::metrics::PromText, n: &str, h: &str, x: f64| {
                m.sample(n, "gauge", h, &l, x)
            };
            g(
                &mut m,
                "rewind_target_connected",
                "1 when a source is connected",
                f64::from(u8::from(s.connected)),
            );
            g(
                &mut m,
                "rewind_target_durable_seq",
                "Highest sequence durable in the spool",
                s.durable_seq as f64,
            );
            g(
                &mut m,
                "rewind_target_applied_seq",
                "Highest sequence applied to the replica",
                s.applied_seq as f64,
            );
            g(
                &mut m,
                "rewind_target_spool_bytes",
                "Spooled bytes not yet applied",
                s.spool_bytes as f64,
            );
            g(
                &mut m,
                "rewind_target_spool_budget_bytes",
                "Spool budget",
                s.spool_budget as f64,
            );
            g(
                &mut m,
                "rewind_target_flow_controlled",
                "1 while the spool is over budget",
                f64::from(u8::from(s.flow_controlled)),
            );
            g(
                &mut m,
                "rewind_target_apply_rate_bytes_per_second",
                "Apply rate over the last second",
                s.apply_rate_bps,
            );
            m.sample(
                "rewind_target_applied_bytes_total",
                "counter",
                "Volume bytes applied",
                &l,
                s.applied_bytes as f64,
            );
        }
        if let Some(j) = &v.journal {
            m.sample(
                "rewind_target_journal_bytes",
                "gauge",
                "Undo journal bytes",
                &l,
                j.journal_bytes as f64,
            );
        }
        m.sample(
            "rewind_target_alerts",
            "gauge",
            "Active alerts",
            &l,
            v.alerts.len() as f64,
        );
    }
    m.finish()
}

/// Prunes every open volume that has a retention policy every `interval_ns`
/// (journal `prune`: promised points, bookmarks kept by the policy and live
/// snapshot views are never pruned), until `stop`. A failed-over volume is
/// left alone (its journal describes the replica before the failover).
fn start_pruner(
    volumes: Arc<Volumes>,
    interval_ns: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::thread::JoinHandle<()>> {
    let every = Duration::from_nanos(interval_ns);
    std::thread::Builder::new()
        .name("rewind-prune".into())
        .spawn(move || {
            let mut last = std::time::Instant::now();
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100));
                if last.elapsed() < every {
                    continue;
                }
                last = std::time::Instant::now();
                for name in volumes.open_names() {
                    let Ok(v) = volumes.get(&name) else { continue };
                    if v.fenced() || !v.has_retention() {
                        continue;
                    }
                    match v.with(|t| t.prune(now_ns())) {
                        Ok(r) => {
                            if r.deleted_segments > 0
                                || r.compacted_segments > 0
                                || r.dropped_bookmarks > 0
                            {
                                info!(volume = %name, deleted = r.deleted_segments, compacted = r.compacted_segments,
                                    dropped_bookmarks = r.dropped_bookmarks, oldest = %crate::vsnap::format_time(r.oldest_time_ns),
                                    bytes_before = r.journal_bytes_before, bytes_after = r.journal_bytes_after,
                                    oldest_seq = r.oldest_seq, "retention pruned the journal");
                            }
                            if let Some(a) = r.alert {
                                tracing::warn!(volume = %name, alert = %a, "retention");
                            }
                        }
                        Err(e) => tracing::warn!(volume = %name, error = %e, "retention prune failed"),
                    }
                }
            }
        })
        .context("spawning the retention thread")
}
