//! The target daemon's admin socket (`<state_dir>/admin.sock`, mode 0600):
//! how `rewind recover`, `rewind snapshot`, `rewind failover` and
//! `rewind reprotect` reach a running `rewind target`, which owns the volume
//! directories (the journal's directory lock admits one process). The
//! daemon runs the operation on the same volume handle it applies through,
//! so a snapshot stays exact while replication continues.
//!
//! Protocol (version 1): the client sends one JSON [`AdminRequest`] line;
//! the daemon answers with JSON [`AdminReply`] lines: any number of
//! `progress`, then `done` or `error` — except for a snapshot, which answers
//! `ready` (with the NBD URI) and serves until the client sends a `stop`
//! line or closes the connection, then answers `done`. A client that dies
//! therefore never leaves a snapshot behind.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::recover::{self, SnapshotRequest};
use crate::store::Volumes;
use crate::vsnap::{self, PointSpec, Progress};

/// File name of the admin socket in the target's state directory.
pub const ADMIN_SOCKET: &str = "admin.sock";

/// A request to the target daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum AdminRequest {
    /// Recovery points of a volume.
    List {
        /// Volume.
        volume: String,
    },
    /// Retention summary of a volume (`cdpcli --showsummary`).
    Summary {
        /// Volume.
        volume: String,
    },
    /// Serve a virtual snapshot until the client stops it.
    Snapshot(SnapshotRequest),
    /// Copy a point into a file or device (written by the daemon).
    Materialize {
        /// Volume.
        volume: String,
        /// Point.
        point: PointSpec,
        /// Absolute output path.
        out: PathBuf,
    },
    /// Fence the volume, roll its replica back to the point, hand it over.
    Failover {
        /// Volume.
        volume: String,
        /// Point.
        point: PointSpec,
    },
    /// Discard the journal of a failed-over volume and resync from the source.
    Reprotect {
        /// Volume.
        volume: String,
        /// Also when the volume is not failed over.
        force: bool,
    },
}

/// One reply line.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AdminReply {
    /// Long work in progress.
    Progress(Progress),
    /// A snapshot is being served at this NBD URI.
    Ready {
        /// NBD URI.
        uri: String,
    },
    /// Finished; the operation's result document.
    Done {
        /// Result (per operation).
        result: serde_json::Value,
    },
    /// Failed; nothing was changed unless the message says so.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// The listening admin socket of a target daemon.
pub struct AdminServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

fn send(w: &mut UnixStream, r: &AdminReply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

fn done<T: Serialize>(v: &T) -> AdminReply {
    match serde_json::to_value(v) {
        Ok(result) => AdminReply::Done { result },
        Err(e) => AdminReply::Error {
            message: e.to_string(),
        },
    }
}

fn err(e: anyhow::Error) -> AdminReply {
    AdminReply::Error {
        message: format!("{e:#}"),
    }
}

impl AdminServer {
    /// Binds `<state_dir>/admin.sock` (replacing a stale socket, refusing a
    /// live one) and serves requests on `volumes` until [`AdminServer::shutdown`].
    pub fn start(state_dir: &Path, volumes: Arc<Volumes>) -> Result<AdminServer> {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        let path = state_dir.join(ADMIN_SOCKET);
        let l = crate::export::bind_unix(&path)?;
        l.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
        let (st, cs) = (stop.clone(), conns.clone());
        let accept = std::thread::Builder::new()
            .name("rewind-admin".into())
            .spawn(move || {
                while !st.load(Ordering::SeqCst) {
                    match l.accept() {
                        Ok((s, _)) => {
                            let (v, st2) = (volumes.clone(), st.clone());
                            let h = std::thread::Builder::new()
                                .name("rewind-admin-conn".into())
                                .spawn(move || handle(s, &v, &st2));
                            if let Ok(h) = h {
                                let mut c = cs.lock().unwrap_or_else(|e| e.into_inner());
                                c.retain(|h| !h.is_finished());
                                c.push(h);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        Err(e) => {
                            warn!(error = %e, "admin socket accept failed");
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    }
                }
            })?;
        info!(socket = %path.display(), "admin socket ready");
        Ok(AdminServer {
            path,
            stop,
            accept: Some(accept),
            conns,
        })
    }

    /// Stops accepting, stops every snapshot served, waits for the requests
    /// in progress, removes the socket.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let hs: Vec<_> = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for h in hs {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        if self.accept.is_some() {
            self.stop_all();
        }
    }
}

fn handle(mut s: UnixStream, volumes: &Volumes, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    // Same rule as the replicator's admin socket: root and our own user only.
    match crate::admin::peer_uid(&s) {
        Ok(uid) if uid == 0 || uid == crate::admin::effective_uid() => {}
        Ok(uid) => {
            warn!(
                uid,
                "target admin socket: refused a request from an unauthorized user"
            );
            let _ = send(
                &mut s,
                &AdminReply::Error {
                    message: format!("permission denied: uid {uid} may not control this target"),
                },
            );
            return;
        }
        Err(e) => {
            warn!(error = %e, "target admin socket: no peer credentials; refused");
            return;
        }
    }
    let Ok(rd) = s.try_clone() else { return };
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    if rd.read_line(&mut line).is_err() {
        return;
    }
    let req: AdminRequest = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => {
            let _ = send(
                &mut s,
                &AdminReply::Error {
                    message: format!("bad admin request: {e}"),
                },
            );
            return;
        }
    };
    info!(?req, "admin request");
    let reply = match req {
        AdminRequest::List { volume } => match volumes.get(&volume).and_then(|v| recover::list(&v))
        {
            Ok(l) => done(&l),
            Err(e) => err(e),
        },
        AdminRequest::Summary { volume } => {
            match volumes.get(&volume).and_then(|v| recover::summary(&v)) {
                Ok(l) => done(&l),
                Err(e) => err(e),
            }
        }
        AdminRequest::Materialize { volume, point, out } => {
            let mut w = match s.try_clone() {
                Ok(w) => w,
                Err(_) => return,
            };
            let r = volumes.get(&volume).and_then(|v| {
                let view = recover::open_view(v, &point)?;
                vsnap::materialize(&view, &out, &mut |pr| {
                    let _ = send(&mut w, &AdminReply::Progress(pr));
                })
            });
            match r {
                Ok(rep) => done(&rep),
                Err(e) => err(e),
            }
        }
        AdminRequest::Failover { volume, point } => {
            match volumes
                .get(&volume)
                .and_then(|v| recover::failover(&v, &point))
            {
                Ok(r) => done(&r),
                Err(e) => err(e),
            }
        }
        AdminRequest::Reprotect { volume, force } => {
            match recover::reprotect(volumes, &volume, force) {
                Ok(r) => done(&r),
                Err(e) => err(e),
            }
        }
        AdminRequest::Snapshot(req) => {
            let snap = match volumes
                .get(&req.volume)
                .and_then(|v| recover::start_snapshot(v, &req))
            {
                Ok(s) => s,
                Err(e) => {
                    let _ = send(&mut s, &err(e));
                    return;
                }
            };
            if send(
                &mut s,
                &AdminReply::Ready {
                    uri: snap.uri().to_string(),
                },
            )
            .is_err()
            {
                let _ = snap.stop();
                return;
            }
            // Serve until the client says stop, goes away, or the daemon stops.
            let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            loop {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                line.clear();
                match rd.read_line(&mut line) {
                    Ok(0) => break,
                    Ok(_) if line.trim() == "stop" => break,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
            match snap.stop() {
                Ok(r) => done(&r),
                Err(e) => err(e),
            }
        }
    };
    let _ = send(&mut s, &reply);
}

/// A connection to a running target's admin socket.
pub struct AdminClient {
    s: UnixStream,
    rd: BufReader<UnixStream>,
}

impl AdminClient {
    /// Connects to `<state_dir>/admin.sock`; `Ok(None)` when no daemon
    /// listens there (no socket, or a stale one).
    pub fn connect(state_dir: &Path) -> Result<Option<AdminClient>> {
        let path = state_dir.join(ADMIN_SOCKET);
        match UnixStream::connect(&path) {
            Ok(s) => {
                let rd = BufReader::new(s.try_clone()?);
                Ok(Some(AdminClient { s, rd }))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e).with_context(|| format!("connecting to {}", path.display())),
        }
    }

    /// Sends the request.
    pub fn send(&mut self, req: &AdminRequest) -> Result<()> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        self.s.write_all(&line).context("sending the admin request")
    }

    /// The next reply line; `Ok(None)` on a read timeout (see [`AdminClient::set_timeout`]).
    pub fn next_reply(&mut self) -> Result<Option<AdminReply>> {
        let mut line = String::new();
        match self.rd.read_line(&mut line) {
            Ok(0) => bail!("the target daemon closed the admin connection (stopped?)"),
            Ok(_) => Ok(Some(
                serde_json::from_str(line.trim()).context("bad reply from the target daemon")?,
            )),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e).context("reading the admin reply"),
        }
    }

    /// Read timeout of [`AdminClient::next_reply`].
    pub fn set_timeout(&self, t: Option<Duration>) -> Result<()> {
        self.s.set_read_timeout(t)?;
        Ok(())
    }

    /// Asks a snapshot to stop.
    pub fn stop_snapshot(&mut self) -> Result<()> {
        self.s.write_all(b"stop\n").context("sending stop")
    }

    /// Waits for `done` (returning its result) or `error`, passing progress on.
    pub fn wait_done(&mut self, progress: &mut dyn FnMut(Progress)) -> Result<serde_json::Value> {
        loop {
            match self.next_reply()? {
                None => continue,
                Some(AdminReply::Progress(p)) => progress(p),
                Some(AdminReply::Done { result }) => return Ok(result),
                Some(AdminReply::Error { message }) => bail!("{message}"),
                Some(AdminReply::Ready { uri }) => bail!("unexpected ready ({uri})"),
            }
        }
    }
}
