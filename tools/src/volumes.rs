//! The protected volumes live in one agent process (`rewind agent`, or the
//! single volume of `rewind export`), and the admin operations on them
//! ([`AgentRequest`]) served over the agent's admin socket
//! ([`crate::admin`]; requests documented in `docs/admin-protocol.md`).
//!
//! Each volume's writes pass through a [`WriteGate`] in front of its change
//! log, so a bookmark can hold them (see [`crate::bookmark`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use agent_core::{ChangeLog, ChangeSink};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::admin::{AdminError, AdminServer};
use crate::bookmark::{BookmarkRequest, History};
use crate::gate::WriteGate;

/// One protected volume served by this process.
pub struct Volume {
    /// Volume name (names the change log).
    pub name: String,
    /// Consistency group, if any.
    pub group: Option<String>,
    /// The change log; `None` when the volume is served without tracking.
    pub log: Option<Arc<ChangeLog>>,
    /// The gate in front of the change log (`None` without tracking).
    pub gate: Option<Arc<WriteGate>>,
    /// Directory of the volume's persisted state (bitmap, identity, resync marker).
    pub state_dir: PathBuf,
    /// Free-form facts shown by `volumes` (backing, listen address, device).
    pub details: Value,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.name)
            .field("group", &self.group)
            .field("tracked", &self.log.is_some())
            .finish()
    }
}

impl Volume {
    /// A tracked volume: its change log behind a new gate. Returns the volume
    /// and the sink the NBD export must use.
    pub fn tracked(
        name: String,
        group: Option<String>,
        log: Arc<ChangeLog>,
        state_dir: PathBuf,
        details: Value,
    ) -> (Arc<Volume>, Arc<dyn ChangeSink>) {
        let gate = Arc::new(WriteGate::new(log.clone() as Arc<dyn ChangeSink>));
        let v = Arc::new(Volume {
            name,
            group,
            log: Some(log),
            gate: Some(gate.clone()),
            state_dir,
            details,
        });
        (v, gate as Arc<dyn ChangeSink>)
    }

    /// Whether a resync is flagged for this volume.
    pub fn resync_required(&self) -> Option<ResyncMarker> {
        read_resync_marker(&self.state_dir, &self.name)
    }
}

/// Contents of `<state_dir>/<volume>.resync-required`, written when filtering
/// is stopped. Whoever completes a resync of the volume removes the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResyncMarker {
    /// Format version (1).
    pub version: u32,
    /// Volume name.
    pub volume: String,
    /// Why a resync is needed.
    pub reason: String,
    /// When it was flagged, ns since the Unix epoch.
    pub since_ns: u64,
}

/// Path of the resync marker of `volume`.
pub fn resync_marker_path(state_dir: &Path, volume: &str) -> PathBuf {
    state_dir.join(format!("{volume}.resync-required"))
}

/// Reads the resync marker of `volume` (`None` when absent; an unreadable
/// marker still counts as flagged, with the reason saying so).
pub fn read_resync_marker(state_dir: &Path, volume: &str) -> Option<ResyncMarker> {
    let p = resync_marker_path(state_dir, volume);
    match std::fs::read(&p) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).unwrap_or(ResyncMarker {
            version: 1,
            volume: volume.to_owned(),
            reason: format!("marker {} is unreadable", p.display()),
            since_ns: 0,
        })),
        Err(_) => None,
    }
}

/// Writes the resync marker durably (temp file, fsync, rename, fsync dir),
/// keeping an existing one (the first reason and time stay).
pub fn flag_resync(state_dir: &Path, volume: &str, reason: &str) -> std::io::Result<ResyncMarker> {
    use std::io::Write;
    if let Some(m) = read_resync_marker(state_dir, volume) {
        return Ok(m);
    }
    let m = ResyncMarker {
        version: 1,
        volume: volume.to_owned(),
        reason: reason.to_owned(),
        since_ns: now_ns(),
    };
    std::fs::create_dir_all(state_dir)?;
    let p = resync_marker_path(state_dir, volume);
    let tmp = p.with_extension("resync-required.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(&m).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &p)?;
    std::fs::File::open(state_dir)?.sync_all()?;
    Ok(m)
}

/// Now, ns since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The volumes of this process and the admin operations on them.
pub struct Volumes {
    server: &'static str,
    vols: RwLock<BTreeMap<String, Arc<Volume>>>,
    /// Serialises bookmarks (a gate is raised by one bookmark at a time).
    pub(crate) bookmark_lock: Mutex<()>,
    /// Recent bookmarks, successful or not.
    pub(crate) history: History,
}

impl std::fmt::Debug for Volumes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volumes")
            .field("server", &self.server)
            .field("volumes", &self.names())
            .finish()
    }
}

impl Volumes {
    /// An empty set; `server` names the daemon in `hello` (`rewind agent`, `rewind export`).
    pub fn new(server: &'static str) -> Volumes {
        Volumes {
            server,
            vols: RwLock::new(BTreeMap::new()),
            bookmark_lock: Mutex::new(()),
            history: History::default(),
        }
    }

    /// Adds (or replaces) a volume.
    pub fn insert(&self, v: Arc<Volume>) {
        self.vols
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(v.name.clone(), v);
    }

    /// Removes a volume; returns it.
    pub fn remove(&self, name: &str) -> Option<Arc<Volume>> {
        self.vols
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
    }

    /// A volume by name.
    pub fn get(&self, name: &str) -> Option<Arc<Volume>> {
        self.vols
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Volume names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.vols
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// All volumes, sorted by name.
    pub fn all(&self) -> Vec<Arc<Volume>> {
        self.vols
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The volumes of group `g`, sorted by name.
    pub fn group(&self, g: &str) -> Vec<Arc<Volume>> {
        self.all()
            .into_iter()
            .filter(|v| v.group.as_deref() == Some(g))
            .collect()
    }

    /// Resolves the volumes a bookmark request names: a list of volumes, a
    /// group, or (neither) the only volume of this process.
    pub fn select(
        &self,
        volumes: &[String],
        group: Option<&str>,
    ) -> Result<Vec<Arc<Volume>>, String> {
        match (volumes.is_empty(), group) {
            (false, Some(_)) => Err("give volumes or a group, not both".into()),
            (false, None) => {
                let mut out = Vec::new();
                for n in volumes {
                    let v = self.get(n).ok_or_else(|| {
                        format!(
                            "no volume {n:?} here (volumes: {})",
                            self.names().join(", ")
                        )
                    })?;
                    if !out.iter().any(|o: &Arc<Volume>| o.name == v.name) {
                        out.push(v);
                    }
                }
                out.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(out)
            }
            (true, Some(g)) => {
                let vs = self.group(g);
                if vs.is_empty() {
                    return Err(format!("no volume belongs to group {g:?}"));
                }
                Ok(vs)
            }
            (true, None) => {
                let all = self.all();
                if all.len() == 1 {
                    Ok(all)
                } else {
                    Err(format!(
                        "name the volume(s) or the group ({} volumes here)",
                        all.len()
                    ))
                }
            }
        }
    }

    /// Stops or starts filtering of `name` (see [`AgentRequest::SetFiltering`]).
    pub fn set_filtering(&self, name: &str, on: bool) -> Result<Value, String> {
        let v = self
            .get(name)
            .ok_or_else(|| format!("no volume {name:?} here"))?;
        let log = v
            .log
            .as_ref()
            .ok_or_else(|| format!("volume {name:?} is served without change tracking"))?;
        if !on {
            // Flag first: if the flag cannot be made durable, do not stop.
            flag_resync(
                &v.state_dir,
                name,
                "filtering was stopped (drvutil --stop-filtering): write order was not captured",
            )
            .map_err(|e| {
                format!(
                    "cannot write the resync marker in {}: {e}; filtering left on",
                    v.state_dir.display()
                )
            })?;
            log.set_filtering(false);
            tracing::warn!(volume = name, "filtering stopped: resync flagged");
        } else {
            log.set_filtering(true);
            tracing::info!(
                volume = name,
                resync_required = v.resync_required().is_some(),
                "filtering started"
            );
        }
        Ok(self.describe(&v))
    }

    fn describe(&self, v: &Volume) -> Value {
        let stats = v.log.as_ref().map(|l| l.stats());
        json!({
            "name": v.name,
            "group": v.group,
            "tracked": v.log.is_some(),
            "filtering": stats.as_ref().map(|s| s.filtering),
            "capture_mode": stats.as_ref().map(|s| s.mode),
            "resync_required": v.resync_required(),
            "gate": v.gate.as_ref().map(|g| g.stats()),
            "details": v.details,
        })
    }
}

/// Requests of the agent's admin socket (`{"cmd": ...}`), answered by
/// [`Volumes::handle`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentRequest {
    /// Who answers: `{"server", "version", "pid"}`.
    Hello,
    /// The volumes, one object each (see [`Volumes::handle`]).
    Volumes,
    /// Take a bookmark ([`crate::bookmark::take`]); answers a [`crate::bookmark::BookmarkOutcome`].
    Bookmark(BookmarkRequest),
    /// The bookmark history of this process ([`crate::bookmark::HistoryEntry`] list).
    Bookmarks,
    /// `false`: stop capturing (writes are tracked in the dirty bitmap only,
    /// the volume is flagged for resync); `true`: capture again (the flag stays).
    SetFiltering {
        /// Volume name.
        volume: String,
        /// Filtering on or off.
        on: bool,
    },
}

impl Volumes {
    /// Answers one admin request.
    pub fn handle(&self, req: AgentRequest) -> Result<Value, String> {
        match req {
            AgentRequest::Hello => Ok(json!({
                "server": self.server,
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
            })),
            AgentRequest::Volumes => Ok(Value::Array(
                self.all().iter().map(|v| self.describe(v)).collect(),
            )),
            AgentRequest::Bookmark(req) => crate::bookmark::take(self, &req)
                .and_then(|o| serde_json::to_value(o).map_err(|e| e.to_string())),
            AgentRequest::Bookmarks => {
                serde_json::to_value(self.history.list()).map_err(|e| e.to_string())
            }
            AgentRequest::SetFiltering { volume, on } => self.set_filtering(&volume, on),
        }
    }

    /// Serves `self` on the admin socket at `path` (mode 0600, root or this user only).
    pub fn serve(self: &Arc<Self>, path: &Path) -> Result<AdminServer, AdminError> {
        let me = self.clone();
        let server = AdminServer::start(path, move |r: AgentRequest| me.handle(r))?;
        tracing::info!(socket = %path.display(), "admin socket listening");
        Ok(server)
    }
}

/// Default admin socket of `rewind agent`.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/rewind/agent.sock";

/// Default admin socket of `rewind export` of `volume`.
pub fn export_socket(shm_dir: &Path, volume: &str) -> PathBuf {
    shm_dir.join(format!("{volume}.admin.sock"))
}

/// The agent admin socket a client should use: `explicit`, else
/// `$REWIND_ADMIN_SOCKET`, else the socket of a `rewind export` of `volume`
/// ([`export_socket`]) if it exists, else [`DEFAULT_AGENT_SOCKET`].
pub fn resolve_socket(explicit: Option<&Path>, shm_dir: &Path, volume: Option<&str>) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_owned();
    }
    if let Some(p) = std::env::var_os("REWIND_ADMIN_SOCKET").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(v) = volume {
        let p = export_socket(shm_dir, v);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(DEFAULT_AGENT_SOCKET)
}

/// Sends `req` to the agent at `socket`; explains an unreachable agent.
pub fn call<T: serde::de::DeserializeOwned>(
    socket: &Path,
    req: &AgentRequest,
    timeout: std::time::Duration,
) -> anyhow::Result<T> {
    crate::admin::call(socket, req, timeout).map_err(|e| match e {
        AdminError::Unreachable { path, source } => anyhow::anyhow!(
            "cannot reach the agent at {} ({source}): is `rewind agent` or `rewind export` running, and are you root?",
            path.display()
        ),
        other => anyhow::Error::new(other),
    })
}

/// The volume set of `rewind export`: its one volume (behind a gate when
/// tracked). Returns the set and the sink for the export.
pub fn single(
    volume: &str,
    log: Option<Arc<ChangeLog>>,
    state_dir: &Path,
) -> (Arc<Volumes>, Option<Arc<dyn ChangeSink>>) {
    let vols = Arc::new(Volumes::new("rewind export"));
    let sink = match log {
        Some(log) => {
            let (v, sink) = Volume::tracked(
                volume.to_owned(),
                None,
                log,
                state_dir.to_owned(),
                Value::Null,
            );
            vols.insert(v);
            Some(sink)
        }
        None => {
            vols.insert(Arc::new(Volume {
                name: volume.to_owned(),
                group: None,
                log: None,
                gate: None,
                state_dir: state_dir.to_owned(),
                details: Value::Null,
            }));
            None
        }
    };
    (vols, sink)
}
