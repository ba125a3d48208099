//! `rewind agent`: serves every volume of `/etc/rewind/agent.toml` through
//! the change-tracking NBD filter in one process, with one admin socket
//! (bookmarks, filtering control), periodic crash-consistent bookmarks per
//! consistency group, and SIGHUP reload.
//!
//! Guarantees:
//! - Nothing starts half-configured: the whole file is validated first
//!   (every error names its key, unknown keys are errors, backings must
//!   exist); then the admin socket is bound, then each volume started; if any
//!   of these fails, what was started is stopped again (change logs closed
//!   cleanly) and the agent exits non-zero.
//! - SIGHUP re-reads the file. An invalid file changes nothing (logged).
//!   Volumes added are started, volumes removed are stopped (their change
//!   log closed cleanly), a volume's group may change; changing a live
//!   volume's backing, listen address, device, block size or memory share is
//!   not applied (logged: remove it, reload, add it back), nor are
//!   `admin_socket`, `shm_dir` and `state_dir`. Volumes not touched by the
//!   reload keep serving without interruption.
//! - SIGINT/SIGTERM stop every volume (kernel devices flushed and detached
//!   unless mounted, servers stopped, change logs closed cleanly).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_core::{ChangeLog, ChangeLogConfig};
use anyhow::{Context, Result};
use clap::Args;
use filter_nbd::{Backing, BlockSource, Export, Server, ServerOptions};
use nix::sys::signal::{SigSet, Signal};
use serde_json::json;

use crate::bookmark::BookmarkRequest;
use crate::config::{AgentConfig, AgentVolumeSettings};
use crate::listen::ListenAddr;
use crate::volumes::{Volume, Volumes};

/// Arguments of `rewind agent`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    rewind agent --config /etc/rewind/agent.toml\n  \
    rewind agent --config ./agent.toml --check     # validate the file and exit\n  \
    kill -HUP $(pidof rewind)                      # reload: add/remove volumes\n\n\
See docs/admin-guide.md, section \"Agent\", for the file format.")]
pub struct AgentArgs {
    /// Configuration file.
    #[arg(long, value_name = "FILE", default_value = "/etc/rewind/agent.toml")]
    pub config: PathBuf,
    /// Only validate the configuration and exit (0 when valid).
    #[arg(long)]
    pub check: bool,
}

/// One volume being served.
struct Served {
    settings: AgentVolumeSettings,
    log: Arc<ChangeLog>,
    server: Arc<Server>,
    thread: Option<std::thread::JoinHandle<()>>,
    attached: Option<filter_nbd::Attached>,
    socket: Option<PathBuf>,
}

fn start_volume(s: &AgentVolumeSettings, cfg: &AgentConfig, vols: &Volumes) -> Result<Served> {
    let v = &s.cfg;
    let backing = Backing::open(&v.backing, false)
        .with_context(|| format!("opening backing {}", v.backing.display()))?;
    let size = backing.size();
    anyhow::ensure!(size > 0, "backing {} has size 0", v.backing.display());
    let mut lc = ChangeLogConfig::new(v.name.clone(), size);
    lc.shm_dir = cfg.shm_dir.clone();
    lc.state_dir = cfg.state_dir.clone();
    lc.block_size = s.block_size;
    lc.ring_bytes = s.ring_bytes;
    let log = Arc::new(
        ChangeLog::open_or_create(lc)
            .with_context(|| format!("opening the change log of volume {}", v.name))?,
    );
    log.start_persister();
    let details = json!({
        "backing": v.backing,
        "listen": v.listen,
        "attach": v.attach,
        "ring_bytes": s.ring_bytes,
        "block_size": s.block_size,
    });
    let (volume, sink) = Volume::tracked(
        v.name.clone(),
        v.group.clone(),
        log.clone(),
        cfg.state_dir.clone(),
        details,
    );
    let export = Export::new(
        v.export_name.clone().unwrap_or_else(|| v.name.clone()),
        Arc::new(backing),
    )
    .with_description(format!("rewind volume {}", v.name))
    .with_sink(Some(sink));
    let server = Arc::new(
        Server::new(vec![export], ServerOptions::default()).context("creating the NBD server")?,
    );
    let mut served = Served {
        settings: s.clone(),
        log,
        server: server.clone(),
        thread: None,
        attached: None,
        socket: None,
    };
    let bound = match &s.listen {
        None => Ok(None),
        Some(ListenAddr::Unix(p)) => crate::export::bind_unix(p).map(|l| {
            served.socket = Some(p.clone());
            Some((Some(l), None))
        }),
        Some(ListenAddr::Tcp(a)) => std::net::TcpListener::bind(a)
            .with_context(|| format!("binding {a}"))
            .map(|l| Some((None, Some(l)))),
    };
    let bound = match bound {
        Ok(b) => b,
        Err(e) => {
            served.stop();
            return Err(e);
        }
    };
    if let Some((unix, tcp)) = bound {
        let srv = server.clone();
        let name = v.name.clone();
        let t = std::thread::Builder::new()
            .name(format!("nbd-{}", v.name))
            .spawn(move || {
                let r = match (unix, tcp) {
                    (Some(l), _) => srv.serve_unix_listener(l),
                    (None, Some(l)) => srv.serve_tcp_listener(l),
                    (None, None) => Ok(()),
                };
                if let Err(e) = r {
                    tracing::error!(volume = name, error = %e, "NBD server stopped with an error");
                }
            })
            .context("spawning the server thread");
        match t {
            Ok(t) => served.thread = Some(t),
            Err(e) => {
                served.stop();
                return Err(e);
            }
        }
    }
    if let Some(dev) = &v.attach {
        match filter_nbd::attach(&server, 0, dev, &filter_nbd::AttachOptions::default()) {
            Ok(a) => served.attached = Some(a),
            Err(e) => {
                served.stop();
                return Err(anyhow::Error::new(e).context(format!("attaching {}", dev.display())));
            }
        }
    }
    vols.insert(volume);
    tracing::info!(
        volume = v.name,
        size,
        backing = %v.backing.display(),
        listen = ?v.listen,
        attach = ?v.attach,
        group = ?v.group,
        ring_bytes = s.ring_bytes,
        "volume serving"
    );
    Ok(served)
}

impl Served {
    /// Stops serving and closes the change log cleanly.
    fn stop(mut self) {
        let name = self.settings.cfg.name.clone();
        if let Some(a) = self.attached.take() {
            if a.device_in_use() && a.survives_restart() {
                tracing::warn!(volume = name, device = %a.device().display(), "device in use (mounted?): left attached for the next agent");
                a.abandon();
            } else if let Err(e) = a.detach() {
                tracing::error!(volume = name, error = %e, "detaching the NBD device");
            }
        }
        self.server.shutdown_handle().shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
        if let Err(e) = self.log.close() {
            tracing::error!(volume = name, error = %e, "closing the change log");
        }
        tracing::info!(volume = name, "volume stopped");
    }
}

enum Event {
    Stop,
    Reload,
}

/// Runs `rewind agent` until SIGINT/SIGTERM.
pub fn run(args: AgentArgs) -> Result<()> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()
        .context("blocking SIGINT/SIGTERM/SIGHUP")?;
    let cfg = AgentConfig::load(&args.config)?;
    let settings = cfg.validate()?;
    if args.check {
        println!(
            "{}: valid ({} volume(s), {} group(s))",
            args.config.display(),
            settings.len(),
            cfg.groups.len()
        );
        return Ok(());
    }
    let vols = Arc::new(Volumes::new("rewind agent"));
    let admin = vols
        .serve(&cfg.admin_socket)
        .with_context(|| format!("admin_socket {}", cfg.admin_socket.display()))?;
    let mut served: BTreeMap<String, Served> = BTreeMap::new();
    for s in &settings {
        match start_volume(s, &cfg, &vols) {
            Ok(sv) => {
                served.insert(s.cfg.name.clone(), sv);
            }
            Err(e) => {
                for (n, sv) in std::mem::take(&mut served) {
                    vols.remove(&n);
                    sv.stop();
                }
                drop(admin);
                return Err(e.context(format!(
                    "starting volume {:?}; nothing left running",
                    s.cfg.name
                )));
            }
        }
    }
    let (tx, rx) = std::sync::mpsc::channel::<Event>();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match set.wait() {
                Ok(Signal::SIGHUP) => {
                    if tx.send(Event::Reload).is_err() {
                        return;
                    }
                }
                Ok(sig) => {
                    tracing::info!(?sig, "stopping");
                    let _ = tx.send(Event::Stop);
                    return;
                }
                Err(_) => return,
            }
        })
        .context("spawning the signal thread")?;
    tracing::info!(
        config = %args.config.display(),
        volumes = served.len(),
        admin_socket = %cfg.admin_socket.display(),
        "agent running"
    );
    let mut cfg = cfg;
    let mut sched = Scheduler::default();
    sched.plan(&cfg, &vols);
    loop {
        let wait = sched.next_wait().min(Duration::from_secs(1));
        match rx.recv_timeout(wait) {
            Ok(Event::Stop) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Ok(Event::Reload) => {
                reload(&args, &mut cfg, &mut served, &vols);
                sched.plan(&cfg, &vols);
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        sched.run_due(&cfg, &vols);
    }
    drop(admin);
    for (n, sv) in served {
        vols.remove(&n);
        sv.stop();
    }
    tracing::info!("agent stopped");
    Ok(())
}

fn reload(
    args: &AgentArgs,
    cfg: &mut AgentConfig,
    served: &mut BTreeMap<String, Served>,
    vols: &Volumes,
) {
    let new = match AgentConfig::load(&args.config).and_then(|c| c.validate().map(|s| (c, s))) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                "reload refused: the running configuration is unchanged"
            );
            return;
        }
    };
    let (mut new_cfg, settings) = new;
    for (key, old, newv) in [
        ("admin_socket", &cfg.admin_socket, &new_cfg.admin_socket),
        ("shm_dir", &cfg.shm_dir, &new_cfg.shm_dir),
        ("state_dir", &cfg.state_dir, &new_cfg.state_dir),
    ] {
        if old != newv {
            tracing::warn!(
                key,
                "changed in the file but not applied by a reload: restart the agent"
            );
        }
    }
    new_cfg.admin_socket = cfg.admin_socket.clone();
    new_cfg.shm_dir = cfg.shm_dir.clone();
    new_cfg.state_dir = cfg.state_dir.clone();
    let wanted: BTreeMap<String, AgentVolumeSettings> = settings
        .into_iter()
        .map(|s| (s.cfg.name.clone(), s))
        .collect();
    let gone: Vec<String> = served
        .keys()
        .filter(|n| !wanted.contains_key(*n))
        .cloned()
        .collect();
    for n in gone {
        if let Some(sv) = served.remove(&n) {
            tracing::info!(
                volume = n,
                "reload: volume removed from the configuration; stopping it"
            );
            vols.remove(&n);
            sv.stop();
        }
    }
    for (n, s) in &wanted {
        match served.get_mut(n) {
            None => match start_volume(s, &new_cfg, vols) {
                Ok(sv) => {
                    tracing::info!(volume = n, "reload: volume added");
                    served.insert(n.clone(), sv);
                }
                Err(e) => {
                    tracing::error!(
                        volume = n,
                        error = format!("{e:#}"),
                        "reload: volume not started"
                    );
                }
            },
            Some(sv) => {
                let old = &sv.settings;
                let mut same = s.cfg.clone();
                same.group = old.cfg.group.clone();
                if same != old.cfg || s.ring_bytes != old.ring_bytes {
                    tracing::warn!(
                        volume = n,
                        "reload: changing a live volume's backing, listen, attach, export name, block size or memory share is not applied (it keeps its old settings); remove it, reload, add it back"
                    );
                }
                if s.cfg.group != old.cfg.group {
                    if let Some(v) = vols.get(n) {
                        vols.insert(Arc::new(Volume {
                            name: v.name.clone(),
                            group: s.cfg.group.clone(),
                            log: v.log.clone(),
                            gate: v.gate.clone(),
                            state_dir: v.state_dir.clone(),
                            details: v.details.clone(),
                        }));
                    }
                    tracing::info!(volume = n, group = ?s.cfg.group, "reload: consistency group changed");
                    sv.settings.cfg.group = s.cfg.group.clone();
                }
            }
        }
    }
    *cfg = new_cfg;
    tracing::info!(volumes = served.len(), "configuration reloaded");
}

/// Periodic bookmarks: one unit per group, and per ungrouped volume.
#[derive(Default)]
struct Scheduler {
    due: BTreeMap<String, (Instant, Duration)>,
}

/// A scheduling unit: `g:NAME` for a group, `v:NAME` for an ungrouped volume.
fn units(vols: &Volumes) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut groups = std::collections::BTreeSet::new();
    for v in vols.all() {
        match &v.group {
            Some(g) => {
                groups.insert(g.clone());
            }
            None => out.push((format!("v:{}", v.name), None)),
        }
    }
    out.extend(groups.into_iter().map(|g| (format!("g:{g}"), Some(g))));
    out
}

impl Scheduler {
    /// Recomputes the units; keeps the due time of units whose interval is unchanged.
    fn plan(&mut self, cfg: &AgentConfig, vols: &Volumes) {
        let mut next = BTreeMap::new();
        for (key, group) in units(vols) {
            let Some(iv) = cfg.interval_of(group.as_deref()) else {
                continue;
            };
            let due = match self.due.get(&key) {
                Some(&(d, old)) if old == iv => d,
                _ => Instant::now() + iv,
            };
            next.insert(key, (due, iv));
        }
        self.due = next;
    }

    fn next_wait(&self) -> Duration {
        let now = Instant::now();
        self.due
            .values()
            .map(|&(d, _)| d.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_secs(3600))
    }

    fn run_due(&mut self, cfg: &AgentConfig, vols: &Volumes) {
        let now = Instant::now();
        for (key, (due, iv)) in self.due.iter_mut() {
            if *due > now {
                continue;
            }
            *due = now + *iv;
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let (kind, rest) = key.split_at(2);
            let mut req = BookmarkRequest {
                name: format!("periodic-{rest}-{secs}"),
                max_hold_ms: Some(cfg.max_hold_ms),
                ..Default::default()
            };
            if kind == "g:" {
                req.group = Some(rest.to_owned());
                if let Some(g) = cfg.groups.iter().find(|g| g.name == rest) {
                    req.kind = g.bookmark_type;
                    req.pre = g.pre.clone();
                    req.post = g.post.clone();
                }
            } else {
                req.volumes = vec![rest.to_owned()];
            }
            match crate::bookmark::take_periodic(vols, &req) {
                Ok(o) => tracing::info!(
                    bookmark = o.name,
                    hold_us = o.hold_us,
                    "periodic bookmark taken"
                ),
                Err(e) => {
                    tracing::warn!(bookmark = req.name, error = %e, "periodic bookmark failed")
                }
            }
        }
    }
}
