//! Local admin sockets of the daemons: a small request/response protocol
//! over a unix stream socket, shared by every daemon that takes commands
//! (`rewind replicator` today; written to be reused by `rewind agent`).
//!
//! Protocol (version 1, documented in `docs/admin-guide.md`): one request
//! per connection. The client writes one line of JSON,
//! `{"v":1,"request":<REQ>}` (at most [`MAX_REQUEST`] bytes), the daemon
//! answers one line, `{"ok":<RESP>}` or `{"error":"<message>"}`, and closes.
//!
//! Access: the socket file is created with mode 0600 (bound under a
//! temporary name, chmod-ed, then renamed into place, so it is never
//! reachable with a wider mode), and every connection's peer credentials
//! (`SO_PEERCRED`) are checked: only root and the daemon's own user are
//! served; anyone else gets an error answer and nothing is executed.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Version of the admin protocol (the `v` field of every request).
pub const ADMIN_PROTOCOL_VERSION: u32 = 1;
/// Largest request line accepted, in bytes.
pub const MAX_REQUEST: usize = 1 << 20;
/// Largest answer a client accepts, in bytes.
pub const MAX_RESPONSE: usize = 64 << 20;
/// How long the daemon waits for a client's request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of the admin socket (both ends).
#[derive(Debug, Error)]
pub enum AdminError {
    /// The socket could not be reached (daemon not running, wrong path, no permission).
    #[error("cannot reach the daemon at {path}: {source}")]
    Unreachable {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// Another process already serves this socket.
    #[error("another daemon is already listening on {0}")]
    InUse(PathBuf),
    /// Local I/O while setting up or talking.
    #[error("{0}: {1}")]
    Io(String, io::Error),
    /// The daemon refused or failed the request; its message.
    #[error("{0}")]
    Refused(String),
    /// The answer was not a valid protocol message.
    #[error("bad answer from the daemon: {0}")]
    Protocol(String),
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    request: T,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Answer<T> {
    Ok(T),
    Error(String),
}

/// A running admin socket server. Dropping it (or [`AdminServer::stop`])
/// stops accepting and removes the socket file.
pub struct AdminServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for AdminServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminServer")
            .field("path", &self.path)
            .finish()
    }
}

/// The uid of the process at the other end of `s`.
pub fn peer_uid(s: &UnixStream) -> io::Result<u32> {
    let c = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(io::Error::from)?;
    Ok(c.uid())
}

/// The effective uid of this process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments, touches no memory of ours and
    // cannot fail.
    unsafe { libc::geteuid() }
}

fn prepare_path(path: &Path) -> Result<(), AdminError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| AdminError::Io(format!("creating {}", dir.display()), e))?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(AdminError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path)
                .map_err(|e| AdminError::Io(format!("removing stale {}", path.display()), e))
        }
        Ok(_) => Err(AdminError::Io(
            path.display().to_string(),
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket; not replacing it",
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AdminError::Io(path.display().to_string(), e)),
    }
}

impl AdminServer {
    /// Binds `path` (mode 0600; a stale socket left by a dead daemon is
    /// replaced, a live one is an error) and serves requests on a thread,
    /// one connection at a time, calling `handler` for each well-formed
    /// request from an authorized peer. The handler's `Err` is sent back as
    /// the error message.
    pub fn start<Req, Resp, F>(path: &Path, handler: F) -> Result<AdminServer, AdminError>
    where
        Req: DeserializeOwned,
        Resp: Serialize,
        F: Fn(Req) -> Result<Resp, String> + Send + 'static,
    {
        prepare_path(path)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "admin.sock".into());
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)
            .map_err(|e| AdminError::Io(format!("binding {}", tmp.display()), e))?;
        let setup = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = setup {
            let _ = std::fs::remove_file(&tmp);
            return Err(AdminError::Io(format!("installing {}", path.display()), e));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let my_uid = effective_uid();
        let st = stop.clone();
        let handle = std::thread::Builder::new()
            .name("admin-socket".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::SeqCst) {
                        break;
                    }
                    match conn {
                        Ok(s) => serve_one(s, my_uid, &handler),
                        Err(e) => {
                            tracing::warn!(error = %e, "admin socket accept failed");
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    }
                }
            })
            .map_err(|e| AdminError::Io("spawning the admin socket thread".into(), e))?;
        Ok(AdminServer {
            path: path.to_path_buf(),
            stop,
            handle: Some(handle),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops serving (waits for a request being handled) and removes the socket.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.path);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.halt();
    }
}

fn reply<T: Serialize>(s: &mut UnixStream, a: &Answer<T>) {
    let mut line = serde_json::to_vec(a).unwrap_or_else(|e| {
        format!("{{\"error\":\"cannot encode the answer: {e}\"}}").into_bytes()
    });
    line.push(b'\n');
    let _ = s.write_all(&line);
}

fn serve_one<Req, Resp, F>(mut s: UnixStream, my_uid: u32, handler: &F)
where
    Req: DeserializeOwned,
    Resp: Serialize,
    F: Fn(Req) -> Result<Resp, String>,
{
    let uid = match peer_uid(&s) {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, "admin socket: no peer credentials; refused");
            return;
        }
    };
    if uid != 0 && uid != my_uid {
        tracing::warn!(
            uid,
            "admin socket: refused a request from an unauthorized user"
        );
        reply::<()>(
            &mut s,
            &Answer::Error(format!(
                "permission denied: uid {uid} may not control this daemon (root only)"
            )),
        );
        return;
    }
    let _ = s.set_read_timeout(Some(REQUEST_TIMEOUT));
    let mut line = Vec::new();
    let r = BufReader::new(&s)
        .take(MAX_REQUEST as u64 + 1)
        .read_until(b'\n', &mut line);
    if let Err(e) = r {
        reply::<()>(&mut s, &Answer::Error(format!("reading the request: {e}")));
        return;
    }
    if line.len() > MAX_REQUEST {
        reply::<()>(
            &mut s,
            &Answer::Error(format!("request over {MAX_REQUEST} bytes")),
        );
        return;
    }
    let env: Envelope<serde_json::Value> = match serde_json::from_slice(&line) {
        Ok(e) => e,
        Err(e) => {
            reply::<()>(&mut s, &Answer::Error(format!("malformed request: {e}")));
            return;
        }
    };
    if env.v != ADMIN_PROTOCOL_VERSION {
        reply::<()>(
            &mut s,
            &Answer::Error(format!(
                "admin protocol version {} not supported (this daemon speaks {ADMIN_PROTOCOL_VERSION})",
                env.v
            )),
        );
        return;
    }
    let req: Req = match serde_json::from_value(env.request) {
        Ok(r) => r,
        Err(e) => {
            reply::<()>(&mut s, &Answer::Error(format!("unknown request: {e}")));
            return;
        }
    };
    match handler(req) {
        Ok(v) => reply(&mut s, &Answer::Ok(v)),
        Err(m) => reply::<()>(&mut s, &Answer::Error(m)),
    }
}

/// Sends `req` to the daemon at `path` and returns its answer; waits at most
/// `timeout` for it. A daemon's error answer is [`AdminError::Refused`].
pub fn call<Req, Resp>(path: &Path, req: &Req, timeout: Duration) -> Result<Resp, AdminError>
where
    Req: Serialize,
    Resp: DeserializeOwned,
{
    let mut s = UnixStream::connect(path).map_err(|e| AdminError::Unreachable {
        path: path.to_path_buf(),
        source: e,
    })?;
    let io = |what: &str| {
        let what = what.to_owned();
        move |e| AdminError::Io(what, e)
    };
    s.set_read_timeout(Some(timeout))
        .map_err(io("setting a timeout"))?;
    s.set_write_timeout(Some(timeout))
        .map_err(io("setting a timeout"))?;
    let mut line = serde_json::to_vec(&Envelope {
        v: ADMIN_PROTOCOL_VERSION,
        request: req,
    })
    .map_err(|e| AdminError::Protocol(format!("encoding the request: {e}")))?;
    line.push(b'\n');
    // A daemon that refuses the peer answers before reading the request:
    // a failed write still leaves its answer to read.
    let sent = s.write_all(&line);
    let mut answer = Vec::new();
    let read = BufReader::new(&s)
        .take(MAX_RESPONSE as u64)
        .read_until(b'\n', &mut answer);
    if answer.is_empty() {
        sent.map_err(io("sending the request"))?;
        read.map_err(io("reading the answer"))?;
        return Err(AdminError::Protocol(
            "the daemon closed the connection without answering".into(),
        ));
    }
    match serde_json::from_slice::<Answer<Resp>>(&answer) {
        Ok(Answer::Ok(v)) => Ok(v),
        Ok(Answer::Error(m)) => Err(AdminError::Refused(m)),
        Err(e) => Err(AdminError::Protocol(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize)]
    #[serde(tag = "cmd", rename_all = "snake_case")]
    enum Req {
        Echo { text: String },
        Fail,
    }

    #[test]
    fn request_answer_error_and_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/admin.sock");
        let srv = AdminServer::start(&p, |r: Req| match r {
            Req::Echo { text } => Ok(text),
            Req::Fail => Err("no such thing".to_string()),
        })
        .unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let got: String = call(&p, &Req::Echo { text: "hi".into() }, REQUEST_TIMEOUT).unwrap();
        assert_eq!(got, "hi");
        match call::<_, String>(&p, &Req::Fail, REQUEST_TIMEOUT) {
            Err(AdminError::Refused(m)) => assert_eq!(m, "no such thing"),
            other => panic!("{other:?}"),
        }
        // Garbage and a wrong version are answered with errors, not crashes.
        let mut s = UnixStream::connect(&p).unwrap();
        s.write_all(b"{\"v\":9,\"request\":{}}\n").unwrap();
        let mut a = String::new();
        s.read_to_string(&mut a).unwrap();
        assert!(a.contains("version 9 not supported"), "{a}");
        let mut s = UnixStream::connect(&p).unwrap();
        s.write_all(b"\xff\xfe garbage\n").unwrap();
        let mut a = String::new();
        s.read_to_string(&mut a).unwrap();
        assert!(a.contains("malformed request"), "{a}");
        // A second server on a live socket is refused; the first still works.
        assert!(matches!(
            AdminServer::start(&p, |_: Req| Ok(())),
            Err(AdminError::InUse(_))
        ));
        let got: String = call(&p, &Req::Echo { text: "x".into() }, REQUEST_TIMEOUT).unwrap();
        assert_eq!(got, "x");
        srv.stop();
        assert!(!p.exists());
        assert!(matches!(
            call::<_, String>(&p, &Req::Fail, REQUEST_TIMEOUT),
            Err(AdminError::Unreachable { .. })
        ));
    }
}
