//! The NBD server: listeners, handshake, transmission.

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use agent_core::{ChangeSink, WriteTicket};
use tracing::{debug, info, warn};

use crate::proto::{self, *};
use crate::range::RangeLocks;
use crate::source::{BlockSource, TrimOutcome};
use crate::uring::{Completion, IoOp, Ring, TAG_NO_BUF};

/// Errors of the server API. Per-connection protocol violations are logged
/// and close that connection only; they are not returned from `serve_*`.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Socket or backing I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol; the connection was closed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Invalid configuration (no export, duplicate or over-long name).
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// One export: a named [`BlockSource`] plus the optional change sink that
/// records every write made through it.
#[derive(Clone)]
pub struct Export {
    /// Export name (the empty name selects the first export).
    pub name: String,
    /// Human-readable description (NBD_INFO_DESCRIPTION, LIST details).
    pub description: String,
    /// The backing store.
    pub source: Arc<dyn BlockSource>,
    /// Refuse writes even if the source accepts them.
    pub read_only: bool,
    /// Change recording (None = tracking off).
    pub sink: Option<Arc<dyn ChangeSink>>,
    /// Sees every request first (trace capture); None = off.
    pub observer: Option<Arc<dyn crate::RequestObserver>>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.source.size())
            .field("read_only", &self.is_read_only())
            .field("tracking", &self.sink.is_some())
            .finish()
    }
}

impl Export {
    /// An export of `source` named `name`, writable if the source is, with
    /// no description and tracking off.
    pub fn new(name: impl Into<String>, source: Arc<dyn BlockSource>) -> Self {
        Self {
            name: name.into(),
            description: String::new(),
            source,
            read_only: false,
            sink: None,
            observer: None,
        }
    }
    /// An export of the file or block device at `path` (opened read-only if
    /// `read_only`), with tracking off.
    pub fn open_file(
        name: impl Into<String>,
        path: impl AsRef<std::path::Path>,
        read_only: bool,
    ) -> io::Result<Self> {
        let backing = crate::source::Backing::open(path, read_only)?;
        Ok(Self::new(name, Arc::new(backing)).with_read_only(read_only))
    }
    /// Sets the description.
    pub fn with_description(mut self, d: impl Into<String>) -> Self {
        self.description = d.into();
        self
    }
    /// Forces the export read-only.
    pub fn with_read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }
    /// Sets the change sink.
    pub fn with_sink(mut self, sink: Option<Arc<dyn ChangeSink>>) -> Self {
        self.sink = sink;
        self
    }
    /// Sets the request observer (trace capture).
    pub fn with_observer(mut self, o: Option<Arc<dyn crate::RequestObserver>>) -> Self {
        self.observer = o;
        self
    }
    /// Whether writes are refused (forced, or the source is read-only).
    pub fn is_read_only(&self) -> bool {
        self.read_only || self.source.read_only()
    }
}

/// Server tuning.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest READ/WRITE payload (NBD_INFO_BLOCK_SIZE maximum). Default 32 MiB.
    pub max_payload: u32,
    /// Use io_uring for READ/WRITE/FLUSH when the source exposes a file
    /// descriptor. Falls back to synchronous I/O if ring setup fails.
    pub io_uring: bool,
    /// Maximum requests in flight per connection (the reader stops reading
    /// further requests until one completes). Default 64.
    pub max_inflight: u32,
    /// Maximum payload bytes in flight per connection. Default 128 MiB.
    pub max_inflight_bytes: u64,
    /// Oversized WRITE payloads up to this size are read and discarded (the
    /// request fails with EINVAL); larger ones close the connection.
    /// Default 4 GiB.
    pub max_discard: u64,
    /// Cap on the kernel io-wq worker threads per connection ring (0 = kernel
    /// default). Filesystems without non-blocking buffered writes (ext4)
    /// run every write on such a worker. Default 0.
    pub io_workers: u32,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_payload: 32 << 20,
            io_uring: true,
            max_inflight: 64,
            max_inflight_bytes: 128 << 20,
            max_discard: 1 << 32,
            io_workers: 0,
        }
    }
}

/// A connection's socket.
#[derive(Debug)]
pub enum Stream {
    /// Unix domain socket (including one end of a socketpair).
    Unix(UnixStream),
    /// TCP socket.
    Tcp(TcpStream),
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Self {
        Stream::Unix(s)
    }
}
impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Self {
        Stream::Tcp(s)
    }
}

impl Stream {
    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }
    fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
    fn shutdown(&self, how: Shutdown) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(how),
            Stream::Tcp(s) => s.shutdown(how),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write_vectored(bufs),
            Stream::Tcp(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes `a` then `b` completely, with as few syscalls as possible
/// (normally one `writev`).
fn write_all2(w: &mut impl Write, a: &[u8], b: &[u8]) -> io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() || !b.is_empty() {
        let n = if a.is_empty() {
            w.write(b)?
        } else if b.is_empty() {
            w.write(a)?
        } else {
            w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)])?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let na = n.min(a.len());
        a = &a[na..];
        b = &b[(n - na)..];
    }
    Ok(())
}

/// Buffered socket input that can also be topped up without blocking, so
/// the single connection thread never sleeps in `recv` while it still has
/// io_uring completions to handle.
struct Input {
    stream: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

/// Outcome of a non-blocking read attempt.
enum Fill {
    Data,
    WouldBlock,
    Eof,
}

impl Input {
    fn new(stream: Stream, cap: usize) -> Self {
        Self {
            stream,
            buf: vec![0; cap],
            start: 0,
            end: 0,
        }
    }

    fn available(&self) -> usize {
        self.end - self.start
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Waits until the socket is readable (or closed, or in error).
    ///
    /// A unix stream socket wakes a thread blocked in `recv` on *every*
    /// wake-up of its wait queue, including "write space" wake-ups caused by
    /// the peer consuming our replies: a blocked `recv` is then woken and
    /// put back to sleep once per reply, doubling the context switches per
    /// request. `poll` for `POLLIN` is woken only for input, so the connection
    /// thread sleeps here and then reads without blocking. TCP sockets do not
    /// have the spurious wake-up and skip the extra call.
    fn wait_readable(&self) -> io::Result<()> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let Stream::Unix(s) = &self.stream else {
            return Ok(());
        };
        let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
        loop {
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from_raw_os_error(e as i32)),
            }
        }
    }

    /// Reads whatever the socket has, without blocking.
    fn fill_nonblocking(&mut self) -> io::Result<Fill> {
        self.compact();
        if self.end == self.buf.len() {
            return Ok(Fill::Data);
        }
        loop {
            match nix::sys::socket::recv(
                self.stream.raw_fd(),
                &mut self.buf[self.end..],
                nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(0) => return Ok(Fill::Eof),
                Ok(n) => {
                    self.end += n;
                    return Ok(Fill::Data);
                }
                Err(nix::errno::Errno::EAGAIN) => return Ok(Fill::WouldBlock),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from_raw_os_error(e as i32)),
            }
        }
    }
}

impl Read for Input {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.available() == 0 {
            self.wait_readable()?;
            if out.len() >= self.buf.len() {
                return self.stream.read(out);
            }
            self.start = 0;
            self.end = self.stream.read(&mut self.buf)?;
        }
        let n = out.len().min(self.available());
        out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

struct ExportState {
    export: Export,
    ranges: RangeLocks,
}

struct Inner {
    exports: Vec<ExportState>,
    opts: ServerOptions,
    shutting_down: AtomicBool,
    conns: Mutex<HashMap<u64, Stream>>,
    next_conn: AtomicU64,
    /// Duplicates of the listening sockets of the running `serve_*` calls,
    /// by serve id: shutting one down wakes its blocked `accept`.
    listeners: Mutex<Vec<(u64, OwnedFd)>>,
}

/// The NBD server. Cheap to clone (shared state); every clone serves the
/// same exports and shares the per-export in-flight range trackers.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.inner.exports.len())
            .finish_non_exhaustive()
    }
}

/// Stops a running server: no new connections or requests; requests the
/// clients had already sent (in flight or still queued in the socket) are
/// served and replied, then every connection is closed.
#[derive(Clone)]
pub struct ShutdownHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShutdownHandle")
    }
}

impl ShutdownHandle {
    /// Initiates shutdown; `serve_*` return once all connections ended.
    pub fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        for s in self
            .inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            s.shutdown(Shutdown::Read);
        }
        // Wake a blocking accept(): a listening socket shut down for reading
        // fails it (EINVAL), even if its path was removed meanwhile.
        for (_, l) in self
            .inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
    }
}

impl Server {
    /// Creates a server for `exports` (at least one; names unique and at most
    /// 4096 bytes). The first export is the default (empty name).
    pub fn new(exports: Vec<Export>, opts: ServerOptions) -> Result<Self, ServerError> {
        if exports.is_empty() {
            return Err(ServerError::Config("no export".into()));
        }
        for (i, e) in exports.iter().enumerate() {
            if e.name.len() > MAX_STRING_LEN || e.description.len() > MAX_STRING_LEN {
                return Err(ServerError::Config(format!(
                    "export name or description too long: {:?}",
                    e.name
                )));
            }
            if exports[..i].iter().any(|o| o.name == e.name) {
                return Err(ServerError::Config(format!(
                    "duplicate export {:?}",
                    e.name
                )));
            }
        }
        if opts.max_payload == 0 || opts.max_inflight == 0 {
            return Err(ServerError::Config(
                "max_payload and max_inflight must be > 0".into(),
            ));
        }
        let exports = exports
            .into_iter()
            .map(|export| ExportState {
                export,
                ranges: RangeLocks::new(),
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                exports,
                opts,
                shutting_down: AtomicBool::new(false),
                conns: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(0),
                listeners: Mutex::new(Vec::new()),
            }),
        })
    }

    /// A handle that stops this server (and every `serve_*` running on it).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            inner: self.inner.clone(),
        }
    }

    /// Binds a unix socket at `path` (a stale socket file is replaced) and
    /// serves until shut down. Each connection runs in its own thread.
    pub fn serve_unix(&self, path: impl AsRef<Path>) -> Result<(), ServerError> {
        let path = path.as_ref();
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        let l = UnixListener::bind(path)?;
        info!(path = %path.display(), "NBD server listening on unix socket");
        self.serve_unix_listener(l)
    }

    /// Serves connections accepted from a bound unix listener until shut down.
    pub fn serve_unix_listener(&self, l: UnixListener) -> Result<(), ServerError> {
        let dup = l.as_fd().try_clone_to_owned()?;
        self.accept_loop(dup, || l.accept().map(|(s, _)| Stream::Unix(s)))
    }

    /// Binds `addr` and serves TCP connections until shut down.
    pub fn serve_tcp(&self, addr: impl ToSocketAddrs) -> Result<(), ServerError> {
        let l = TcpListener::bind(addr)?;
        info!(addr = %l.local_addr()?, "NBD server listening on TCP");
        self.serve_tcp_listener(l)
    }

    /// Serves connections accepted from a bound TCP listener until shut down.
    pub fn serve_tcp_listener(&self, l: TcpListener) -> Result<(), ServerError> {
        let dup = l.as_fd().try_clone_to_owned()?;
        self.accept_loop(dup, || l.accept().map(|(s, _)| Stream::Tcp(s)))
    }

    /// Accepts connections until shut down; `listener` is a duplicate of the
    /// listening socket, registered so that [`ShutdownHandle::shutdown`] can
    /// wake a blocked `accept` (and unregistered, closed, on return).
    fn accept_loop(
        &self,
        listener: OwnedFd,
        mut accept: impl FnMut() -> io::Result<Stream>,
    ) -> Result<(), ServerError> {
        let id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        self.inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, listener));
        let r = self.accept_until_shutdown(&mut accept);
        self.inner
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(i, _)| *i != id);
        r
    }

    fn accept_until_shutdown(
        &self,
        accept: &mut impl FnMut() -> io::Result<Stream>,
    ) -> Result<(), ServerError> {
        let mut threads: Vec<std::thread::JoinHandle<()>> = Vec::new();
        loop {
            if self.inner.shutting_down.load(Ordering::SeqCst) {
                break;
            }
            let s = match accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) if self.inner.shutting_down.load(Ordering::SeqCst) => break,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    continue;
                }
            };
            if self.inner.shutting_down.load(Ordering::SeqCst) {
                break;
            }
            threads.retain(|t| !t.is_finished());
            let srv = self.clone();
            let t = std::thread::Builder::new()
                .name("nbd-conn".into())
                .spawn(move || {
                    if let Err(e) = srv.handle_connection(s) {
                        debug!(error = %e, "connection ended with error");
                    }
                })?;
            threads.push(t);
        }
        for t in threads {
            let _ = t.join();
        }
        Ok(())
    }

    /// Serves one already connected stream (e.g. one end of a socketpair
    /// handed to the kernel NBD client) in the calling thread, until the
    /// client disconnects. Protocol errors close this connection only and are
    /// returned as `Err`; a clean disconnect returns `Ok`.
    pub fn handle_connection(&self, stream: impl Into<Stream>) -> Result<(), ServerError> {
        self.track_connection(stream.into(), None)
    }

    /// Serves one stream that starts directly in the transmission phase,
    /// with no handshake: the kernel NBD client after `NBD_CMD_CONNECT` or
    /// `NBD_SET_SOCK` (see `crate::attach`). Simple replies only, export
    /// index `export`. Blocks until the client disconnects.
    pub fn handle_pre_negotiated(
        &self,
        stream: impl Into<Stream>,
        export: usize,
    ) -> Result<(), ServerError> {
        if export >= self.inner.exports.len() {
            return Err(ServerError::Config(format!("no export #{export}")));
        }
        self.track_connection(stream.into(), Some(export))
    }

    /// Size and transmission flags of export `export` as a client without
    /// structured replies (the kernel) must be told them.
    pub fn export_info(&self, export: usize) -> Option<(u64, u16)> {
        let e = &self.inner.exports.get(export)?.export;
        Some((e.source.size(), tx_flags(e, ReplyMode::Simple)))
    }

    fn track_connection(&self, stream: Stream, pre: Option<usize>) -> Result<(), ServerError> {
        if let Stream::Tcp(t) = &stream {
            let _ = t.set_nodelay(true);
        }
        let id = self.inner.next_conn.fetch_add(1, Ordering::Relaxed);
        self.inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, stream.try_clone()?);
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            stream.shutdown(Shutdown::Read);
        }
        let r = match pre {
            None => self.run_connection(stream),
            Some(export) => {
                let writer = stream.try_clone()?;
                let reader = Input::new(stream, 256 << 10);
                let session = Session {
                    export,
                    mode: ReplyMode::Simple,
                    meta: false,
                };
                transmission(
                    &self.inner,
                    &self.inner.exports[export],
                    session,
                    reader,
                    writer,
                )
            }
        };
        if let Some(s) = self
            .inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
        {
            s.shutdown(Shutdown::Both);
        }
        r
    }

    fn run_connection(&self, stream: Stream) -> Result<(), ServerError> {
        let mut writer = stream.try_clone()?;
        let mut reader = Input::new(stream, 256 << 10);
        let Some(session) = self.handshake(&mut reader, &mut writer)? else {
            return Ok(());
        };
        let exp = &self.inner.exports[session.export];
        debug!(export = %exp.export.name, mode = ?session.mode, "entering transmission");
        transmission(&self.inner, exp, session, reader, writer)
    }

    fn find_export(&self, name: &str) -> Option<usize> {
        if name.is_empty() {
            return Some(0);
        }
        self.inner
            .exports
            .iter()
            .position(|e| e.export.name == name)
    }

    fn handshake(&self, r: &mut impl Read, w: &mut Stream) -> Result<Option<Session>, ServerError> {
        w.write_all(&encode_greeting())?;
        let mut cf = [0u8; 4];
        r.read_exact(&mut cf)?;
        let cflags = u32::from_be_bytes(cf);
        if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(ServerError::Protocol(format!(
                "unknown client flags {cflags:#x}"
            )));
        }
        let no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
        let mut mode = ReplyMode::Simple;
        let mut meta: Option<String> = None; // export name base:allocation was set for
        let mut out = Vec::with_capacity(512);
        loop {
            let mut hb = [0u8; 16];
            r.read_exact(&mut hb)?;
            let h = decode_option_header(&hb).map_err(|e| ServerError::Protocol(e.to_string()))?;
            let mut data = vec![0u8; h.len as usize]; // bounded by MAX_OPTION_LEN
            r.read_exact(&mut data)?;
            out.clear();
            let opt = h.option;
            if self.inner.shutting_down.load(Ordering::SeqCst) && opt != OPT_ABORT {
                if opt == OPT_EXPORT_NAME {
                    return Ok(None);
                }
                encode_option_reply(&mut out, opt, REP_ERR_SHUTDOWN, b"server shutting down");
                w.write_all(&out)?;
                continue;
            }
            match opt {
                OPT_EXPORT_NAME => {
                    let Some(idx) = std::str::from_utf8(&data)
                        .ok()
                        .and_then(|n| self.find_export(n))
                    else {
                        return Err(ServerError::Protocol(
                            "EXPORT_NAME of an unknown export".into(),
                        ));
                    };
                    let e = &self.inner.exports[idx].export;
                    encode_export_name_reply(
                        &mut out,
                        e.source.size(),
                        tx_flags(e, mode),
                        no_zeroes,
                    );
                    w.write_all(&out)?;
                    let meta_ok = meta.as_deref().and_then(|n| self.find_export(n)) == Some(idx);
                    return Ok(Some(Session {
                        export: idx,
                        mode,
                        meta: meta_ok,
                    }));
                }
                OPT_ABORT => {
                    encode_option_reply(&mut out, opt, REP_ACK, &[]);
                    let _ = w.write_all(&out);
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        encode_option_reply(&mut out, opt, REP_ERR_INVALID, b"LIST takes no data");
                    } else {
                        for e in &self.inner.exports {
                            let mut d = Vec::with_capacity(
                                4 + e.export.name.len() + e.export.description.len(),
                            );
                            d.extend_from_slice(&(e.export.name.len() as u32).to_be_bytes());
                            d.extend_from_slice(e.export.name.as_bytes());
                            d.extend_from_slice(e.export.description.as_bytes());
                            encode_option_reply(&mut out, opt, REP_SERVER, &d);
                        }
                        encode_option_reply(&mut out, opt, REP_ACK, &[]);
                    }
                }
                OPT_STARTTLS => {
                    encode_option_reply(&mut out, opt, REP_ERR_UNSUP, b"TLS not supported")
                }
                OPT_INFO | OPT_GO => match decode_info_request(&data) {
                    Err(e) => encode_option_reply(
                        &mut out,
                        opt,
                        REP_ERR_INVALID,
                        e.to_string().as_bytes(),
                    ),
                    Ok(req) => match self.find_export(&req.name) {
                        None => {
                            encode_option_reply(&mut out, opt, REP_ERR_UNKNOWN, b"no such export")
                        }
                        Some(idx) => {
                            let e = &self.inner.exports[idx].export;
                            encode_option_reply(
                                &mut out,
                                opt,
                                REP_INFO,
                                &info_export(e.source.size(), tx_flags(e, mode)),
                            );
                            if req.requests.contains(&INFO_NAME) {
                                encode_option_reply(
                                    &mut out,
                                    opt,
                                    REP_INFO,
                                    &info_string(INFO_NAME, &e.name),
                                );
                            }
                            if req.requests.contains(&INFO_DESCRIPTION) && !e.description.is_empty()
                            {
                                encode_option_reply(
                                    &mut out,
                                    opt,
                                    REP_INFO,
                                    &info_string(INFO_DESCRIPTION, &e.description),
                                );
                            }
                            encode_option_reply(
                                &mut out,
                                opt,
                                REP_INFO,
                                &info_block_size(1, 4096, self.inner.opts.max_payload),
                            );
                            encode_option_reply(&mut out, opt, REP_ACK, &[]);
                            if opt == OPT_GO {
                                w.write_all(&out)?;
                                let meta_ok =
                                    meta.as_deref().and_then(|n| self.find_export(n)) == Some(idx);
                                return Ok(Some(Session {
                                    export: idx,
                                    mode,
                                    meta: meta_ok,
                                }));
                            }
                        }
                    },
                },
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        encode_option_reply(&mut out, opt, REP_ERR_INVALID, b"no data expected");
                    } else if mode == ReplyMode::Extended {
                        encode_option_reply(
                            &mut out,
                            opt,
                            REP_ERR_EXT_HEADER_REQD,
                            b"extended headers already negotiated",
                        );
                    } else if mode == ReplyMode::Structured {
                        encode_option_reply(&mut out, opt, REP_ERR_INVALID, b"already negotiated");
                    } else {
                        mode = ReplyMode::Structured;
                        encode_option_reply(&mut out, opt, REP_ACK, &[]);
                    }
                }
                OPT_EXTENDED_HEADERS => {
                    if !data.is_empty() {
                        encode_option_reply(&mut out, opt, REP_ERR_INVALID, b"no data expected");
                    } else if mode == ReplyMode::Extended {
                        encode_option_reply(&mut out, opt, REP_ERR_INVALID, b"already negotiated");
                    } else {
                        mode = ReplyMode::Extended;
                        encode_option_reply(&mut out, opt, REP_ACK, &[]);
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    let set = opt == OPT_SET_META_CONTEXT;
                    if set {
                        meta = None;
                    }
                    match decode_meta_request(&data) {
                        Err(e) => encode_option_reply(
                            &mut out,
                            opt,
                            REP_ERR_INVALID,
                            e.to_string().as_bytes(),
                        ),
                        Ok(_) if set && mode == ReplyMode::Simple => encode_option_reply(
                            &mut out,
                            opt,
                            REP_ERR_INVALID,
                            b"structured replies not negotiated",
                        ),
                        Ok(req) => match self.find_export(&req.name) {
                            None => encode_option_reply(
                                &mut out,
                                opt,
                                REP_ERR_UNKNOWN,
                                b"no such export",
                            ),
                            Some(_) => {
                                let matches = if set {
                                    req.queries.iter().any(|q| q == BASE_ALLOCATION)
                                } else {
                                    req.queries.is_empty()
                                        || req
                                            .queries
                                            .iter()
                                            .any(|q| q == BASE_ALLOCATION || q == "base:")
                                };
                                if matches {
                                    let mut d = Vec::with_capacity(4 + BASE_ALLOCATION.len());
                                    d.extend_from_slice(&META_CONTEXT_ID.to_be_bytes());
                                    d.extend_from_slice(BASE_ALLOCATION.as_bytes());
                                    encode_option_reply(&mut out, opt, REP_META_CONTEXT, &d);
                                    if set {
                                        meta = Some(req.name.clone());
                                    }
                                }
                                encode_option_reply(&mut out, opt, REP_ACK, &[]);
                            }
                        },
                    }
                }
                _ => {
                    debug!(option = opt, "unsupported option");
                    encode_option_reply(&mut out, opt, REP_ERR_UNSUP, b"option not supported");
                }
            }
            w.write_all(&out)?;
        }
    }
}

/// Context id of `base:allocation`.
const META_CONTEXT_ID: u32 = 1;

fn tx_flags(e: &Export, mode: ReplyMode) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN;
    if e.is_read_only() {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    if mode != ReplyMode::Simple {
        f |= TF_SEND_DF;
    }
    f
}

struct Session {
    export: usize,
    mode: ReplyMode,
    meta: bool,
}

/// Maps an I/O error to the NBD error sent to the client.
fn nbd_errno(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => proto::EPERM,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => proto::ENOSPC,
        Some(libc::EINVAL) => proto::EINVAL,
        Some(libc::ENOMEM) => proto::ENOMEM,
        Some(libc::EOPNOTSUPP) => proto::ENOTSUP,
        _ if e.kind() == io::ErrorKind::Unsupported => proto::ENOTSUP,
        _ => proto::EIO,
    }
}

/// Pool of payload buffers, so steady-state requests do not allocate.
/// Keeps at most [`POOL_KEEP_COUNT`] buffers and [`POOL_KEEP_BYTES`] of
/// capacity per connection.
struct BufPool {
    free: Mutex<(Vec<Vec<u8>>, usize)>,
}

const POOL_KEEP_MAX_CAP: usize = 4 << 20;
const POOL_KEEP_COUNT: usize = 128;
const POOL_KEEP_BYTES: usize = 16 << 20;

impl BufPool {
    fn new() -> Self {
        Self {
            free: Mutex::new((Vec::new(), 0)),
        }
    }

    fn get(&self, len: usize) -> Vec<u8> {
        let mut b = {
            let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let i =
                f.0.iter()
                    .rposition(|b| b.capacity() >= len)
                    .or_else(|| f.0.len().checked_sub(1));
            match i {
                Some(i) => {
                    let b = f.0.swap_remove(i);
                    f.1 -= b.capacity();
                    b
                }
                None => Vec::new(),
            }
        };
        b.resize(len, 0);
        b
    }

    fn put(&self, b: Vec<u8>) {
        let cap = b.capacity();
        if cap <= POOL_KEEP_MAX_CAP {
            let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
            if f.0.len() < POOL_KEEP_COUNT && f.1 + cap <= POOL_KEEP_BYTES {
                f.1 += cap;
                f.0.push(b);
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum OpKind {
    Read,
    Write,
    Flush,
}

/// A request handed to io_uring.
struct Slot {
    kind: OpKind,
    handle: u64,
    offset: u64,
    len: u64,
    fua: bool,
    ticket: Option<WriteTicket>,
    range: Option<u64>,
    /// Bytes transferred so far (short reads/writes are resubmitted).
    done: u64,
}

struct Inflight {
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    bytes: u64,
    count: usize,
    /// FLUSH requests among `count`.
    flushes: usize,
}

/// Per-connection transmission state (used by the connection's thread).
struct Conn<'a> {
    inner: &'a Inner,
    exp: &'a ExportState,
    mode: ReplyMode,
    writer: Mutex<Stream>,
    broken: AtomicBool,
    pool: BufPool,
    ring: Option<Ring>,
    fd: Option<std::os::fd::RawFd>,
    inflight: Mutex<Inflight>,
    /// Replies not yet written (io_uring mode): written with one write before
    /// the connection thread may block, or when large.
    batch: Mutex<Vec<u8>>,
    /// Scratch list of reaped completions.
    reaped: Mutex<Vec<Completion>>,
    /// A POLL_ADD on the socket is queued in the ring.
    poll_armed: AtomicBool,
}

/// Writes up to this size without FUA are done with a synchronous pwrite on
/// the connection thread even in io_uring mode (see `Conn::start_write`).
const INLINE_WRITE_MAX: u64 = 64 << 10;

/// Replies with payloads above this size are written directly, not batched.
const BATCH_MAX_PAYLOAD: usize = 64 << 10;
/// A reply batch is written out once it reaches this size.
const BATCH_FLUSH_AT: usize = 256 << 10;

const TAG_POLL: u64 = TAG_NO_BUF + 1;

fn transmission(
    inner: &Inner,
    exp: &ExportState,
    session: Session,
    mut reader: Input,
    writer: Stream,
) -> Result<(), ServerError> {
    let fd = exp.export.source.raw_fd();
    let ring = if inner.opts.io_uring && fd.is_some() {
        match Ring::new(inner.opts.max_inflight, inner.opts.io_workers) {
            Ok(r) => Some(r),
            Err(e) => {
                warn!(error = %e, "io_uring setup failed; using synchronous pread/pwrite");
                None
            }
        }
    } else {
        None
    };
    let n = inner.opts.max_inflight;
    let conn = Conn {
        inner,
        exp,
        mode: session.mode,
        writer: Mutex::new(writer),
        broken: AtomicBool::new(false),
        pool: BufPool::new(),
        ring,
        fd,
        inflight: Mutex::new(Inflight {
            slots: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
            bytes: 0,
            count: 0,
            flushes: 0,
        }),

        batch: Mutex::new(Vec::new()),
        reaped: Mutex::new(Vec::with_capacity(n as usize)),
        poll_armed: AtomicBool::new(false),
    };
    let r = conn.request_loop(&mut reader, session.meta);
    // Let in-flight requests finish and reply.
    conn.wait_idle();
    r
}

enum Next {
    Continue,
    Stop,
}

impl Conn<'_> {
    fn export(&self) -> &Export {
        &self.exp.export
    }

    /// Sends one complete reply (header + payload) with a single write. In
    /// io_uring mode, small replies are appended to the reply batch instead
    /// and written together by [`Conn::flush_batch`] before the thread may
    /// block (one write for
    /// several complete replies; a reply is never split across writes
    /// interleaved with another).
    fn reply(&self, handle: u64, req_offset: u64, kind: ReplyKind, payload: &[u8]) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let mut h = [0u8; MAX_REPLY_HEADER];
        let n = encode_reply_header(&mut h, self.mode, handle, req_offset, kind);
        if self.ring.is_some() {
            if payload.len() <= BATCH_MAX_PAYLOAD {
                let full = {
                    let mut b = self.batch.lock().unwrap_or_else(|e| e.into_inner());
                    b.extend_from_slice(&h[..n]);
                    b.extend_from_slice(payload);
                    b.len() >= BATCH_FLUSH_AT
                };
                if full {
                    self.flush_batch();
                }
                return;
            }
            self.flush_batch();
        }
        self.write_reply(&h[..n], payload);
    }

    fn write_reply(&self, a: &[u8], b: &[u8]) {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = write_all2(&mut *w, a, b) {
            debug!(error = %e, "reply write failed; closing connection");
            self.broken.store(true, Ordering::Relaxed);
            w.shutdown(Shutdown::Both);
        }
    }

    /// Writes the batched replies.
    fn flush_batch(&self) {
        let mut b = self.batch.lock().unwrap_or_else(|e| e.into_inner());
        if !b.is_empty() {
            if !self.broken.load(Ordering::Relaxed) {
                self.write_reply(&b, &[]);
            }
            b.clear();
        }
    }

    fn reply_err(&self, handle: u64, req_offset: u64, err: u32) {
        self.reply(handle, req_offset, ReplyKind::Error(err), &[]);
    }

    /// Exactly one request in flight and it is not a FLUSH (which may be slow).
    fn only_one_fast_op(&self) -> bool {
        let g = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        g.count == 1 && g.flushes == 0
    }

    fn in_flight(&self) -> usize {
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .count
    }

    /// Completes and replies to every request in flight.
    fn wait_idle(&self) {
        while self.ring.is_some() && self.in_flight() > 0 {
            self.wait_events();
        }
        self.flush_batch();
    }

    /// Queues a POLL_ADD for socket input, unless one is pending.
    fn arm_poll(&self, fd: std::os::fd::RawFd) {
        if let Some(ring) = &self.ring {
            if !self.poll_armed.swap(true, Ordering::Relaxed) {
                if let Err(e) = ring.push(TAG_POLL, IoOp::PollIn { fd }) {
                    warn!(error = %e, "cannot arm socket poll");
                    self.poll_armed.store(false, Ordering::Relaxed);
                }
            }
        }
    }

    /// Submits queued operations, writes batched replies, then waits for at
    /// least one completion (or socket input, if a poll is armed) and
    /// handles every available completion.
    fn wait_events(&self) {
        let Some(ring) = &self.ring else { return };
        if !self
            .batch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            // Start the queued I/O before spending time on the reply write.
            self.kick();
            self.flush_batch();
        }
        // `wait` submits any queued operations in the same io_uring_enter.
        let mut done = std::mem::take(&mut *self.reaped.lock().unwrap_or_else(|e| e.into_inner()));
        if let Err(e) = ring.wait(&mut done) {
            // In-flight operations still own their buffers in the ring:
            // keep reaping rather than abandon them.
            warn!(error = %e, "io_uring wait failed; retrying");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        self.handle_completions(&mut done);
        *self.reaped.lock().unwrap_or_else(|e| e.into_inner()) = done;
    }

    /// Handles completions that are already available, without blocking.
    fn reap_ready(&self) {
        let Some(ring) = &self.ring else { return };
        let mut done = std::mem::take(&mut *self.reaped.lock().unwrap_or_else(|e| e.into_inner()));
        ring.reap(&mut done);
        self.handle_completions(&mut done);
        *self.reaped.lock().unwrap_or_else(|e| e.into_inner()) = done;
    }

    fn handle_completions(&self, done: &mut Vec<Completion>) {
        for c in done.drain(..) {
            if c.tag == TAG_POLL {
                self.poll_armed.store(false, Ordering::Relaxed);
                continue;
            }
            self.complete(c);
        }
    }

    /// Hands queued io_uring operations to the kernel. The connection thread
    /// batches submissions and calls this before it may block (socket read,
    /// waiting for completions or for a range), so a queued operation is
    /// never waited for unsubmitted.
    fn kick(&self) {
        if let Some(r) = &self.ring {
            if let Err(e) = r.flush() {
                warn!(error = %e, "io_uring submit failed");
            }
        }
    }

    /// Allocates an in-flight slot, handling completions while all are busy.
    fn alloc_slot(&self, slot: Slot, bytes: u64) -> u32 {
        let max = self.inner.opts.max_inflight_bytes;
        loop {
            {
                let mut g = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                let over = g.count > 0 && g.bytes + bytes > max;
                if !over {
                    if let Some(i) = g.free.pop() {
                        if slot.kind == OpKind::Flush {
                            g.flushes += 1;
                        }
                        g.slots[i as usize] = Some(slot);
                        g.bytes += bytes;
                        g.count += 1;
                        return i;
                    }
                }
            }
            self.wait_events();
        }
    }

    /// Takes a slot's request out; the slot stays allocated (counted as in
    /// flight) until [`Conn::release_slot`], so `wait_idle` covers the reply.
    fn take_slot(&self, i: u32) -> Option<Slot> {
        let mut g = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        g.slots.get_mut(i as usize).and_then(Option::take)
    }

    fn release_slot(&self, i: u32, bytes: u64, flush: bool) {
        let mut g = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        if flush {
            g.flushes = g.flushes.saturating_sub(1);
        }
        g.free.push(i);
        g.bytes = g.bytes.saturating_sub(bytes);
        g.count = g.count.saturating_sub(1);
        drop(g);
    }

    fn discard(&self, r: &mut impl Read, mut len: u64) -> io::Result<()> {
        self.kick();
        self.flush_batch();
        let mut scratch = [0u8; 8192];
        while len > 0 {
            let n = len.min(scratch.len() as u64) as usize;
            r.read_exact(&mut scratch[..n])?;
            len -= n as u64;
        }
        Ok(())
    }

    fn request_loop(&self, r: &mut Input, meta: bool) -> Result<(), ServerError> {
        let ext = self.mode == ReplyMode::Extended;
        let hlen = if ext {
            EXTENDED_REQUEST_LEN
        } else {
            REQUEST_LEN
        };
        let mut hb = [0u8; EXTENDED_REQUEST_LEN];
        let mut scratch = Vec::new();
        loop {
            if self.broken.load(Ordering::Relaxed) {
                return Ok(());
            }
            if self.ring.is_some() {
                self.reap_ready();
                // Wait for a complete header without sleeping in recv while
                // requests are in flight: their completions must be handled.
                while r.available() < hlen && self.in_flight() > 0 {
                    if self.only_one_fast_op() {
                        // Typical of a queue-depth-1 client: nothing else
                        // will arrive before this reply; just complete it.
                        self.wait_events();
                        continue;
                    }
                    match r.fill_nonblocking()? {
                        Fill::Data => continue,
                        Fill::Eof => break,
                        Fill::WouldBlock => {
                            self.arm_poll(r.stream.raw_fd());
                            self.wait_events();
                        }
                    }
                }
                if r.available() < hlen {
                    self.kick();
                    self.flush_batch();
                }
            }
            match r.read_exact(&mut hb[..hlen]) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    debug!("client closed the connection");
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
            let req = decode_request(&hb[..hlen], ext)
                .map_err(|e| ServerError::Protocol(e.to_string()))?;
            match self.dispatch(r, req, meta, &mut scratch)? {
                Next::Continue => {}
                Next::Stop => return Ok(()),
            }
        }
    }

    /// Checks `[offset, offset+len)` against the export; `Err(errno)` if bad.
    fn check_range(&self, offset: u64, len: u64, write_like: bool) -> Result<(), u32> {
        let Some(end) = offset.checked_add(len) else {
            return Err(proto::EINVAL);
        };
        if end > self.export().source.size() {
            return Err(if write_like {
                proto::ENOSPC
            } else {
                proto::EINVAL
            });
        }
        Ok(())
    }

    fn dispatch(
        &self,
        r: &mut Input,
        req: Request,
        meta: bool,
        scratch: &mut Vec<u8>,
    ) -> Result<Next, ServerError> {
        let ext = self.mode == ReplyMode::Extended;
        let payload = req.payload_len(ext);
        let (h, off) = (req.handle, req.offset);
        let max = u64::from(self.inner.opts.max_payload);
        let ro = self.export().is_read_only();
        // Requests carrying a payload we will not use: consume it to stay in
        // sync, then fail the request.
        let reject_payload = |err: u32, r: &mut Input| -> Result<Next, ServerError> {
            if payload > self.inner.opts.max_discard {
                return Err(ServerError::Protocol(format!(
                    "payload of {payload} bytes is too large to discard"
                )));
            }
            self.discard(r, payload)?;
            self.reply_err(h, off, err);
            Ok(Next::Continue)
        };
        // During shutdown no new request can arrive (the socket is shut for
        // reading), but requests the client sent before are still queued:
        // they are served like any other, not failed. A kernel device being
        // handed over to a new agent (`Attached::abandon`) must not see an
        // I/O error for a write it had already sent.
        if let (Some(o), Some(op)) = (
            &self.export().observer,
            crate::RequestOp::from_cmd(req.kind),
        ) {
            o.observe(op, off, req.len, req.flags & CMD_FLAG_FUA != 0);
        }
        match req.kind {
            CMD_WRITE => {
                if payload > max {
                    return reject_payload(proto::EINVAL, r);
                }
                if ro {
                    return reject_payload(proto::EPERM, r);
                }
                if let Err(e) = self.check_range(off, req.len, true) {
                    return reject_payload(e, r);
                }
                let mut buf = self.pool.get(payload as usize);
                if (r.available() as u64) < payload {
                    self.kick();
                    self.flush_batch();
                }
                r.read_exact(&mut buf)?;
                self.start_write(req, buf);
                Ok(Next::Continue)
            }
            _ if payload > 0 => reject_payload(proto::EINVAL, r),
            CMD_READ => {
                if req.len > max {
                    let e = if req.flags & CMD_FLAG_DF != 0 {
                        proto::EOVERFLOW
                    } else {
                        proto::EINVAL
                    };
                    self.reply_err(h, off, e);
                } else if let Err(e) = self.check_range(off, req.len, false) {
                    self.reply_err(h, off, e);
                } else {
                    self.start_read(req);
                }
                Ok(Next::Continue)
            }
            CMD_FLUSH => {
                self.start_flush(req);
                Ok(Next::Continue)
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                if ro {
                    self.reply_err(h, off, proto::EPERM);
                } else if let Err(e) = self.check_range(off, req.len, req.kind == CMD_WRITE_ZEROES)
                {
                    self.reply_err(h, off, e);
                } else {
                    self.zero_or_trim(req);
                }
                Ok(Next::Continue)
            }
            CMD_BLOCK_STATUS => {
                if !meta || req.len == 0 {
                    self.reply_err(h, off, proto::EINVAL);
                } else if let Err(e) = self.check_range(off, req.len, false) {
                    self.reply_err(h, off, e);
                } else {
                    self.block_status(req, scratch);
                }
                Ok(Next::Continue)
            }
            CMD_DISC => {
                debug!("client sent NBD_CMD_DISC");
                Ok(Next::Stop)
            }
            other => {
                debug!(command = other, "unknown command");
                self.reply_err(h, off, proto::EINVAL);
                Ok(Next::Continue)
            }
        }
    }

    fn sink(&self) -> Option<&Arc<dyn ChangeSink>> {
        self.export().sink.as_ref()
    }

    /// Orders against overlapping in-flight writes and announces the write.
    fn begin_write(&self, offset: u64, len: u64) -> (Option<WriteTicket>, Option<u64>) {
        match self.sink() {
            Some(s) => {
                let id = loop {
                    if let Some(id) = self.exp.ranges.try_acquire(offset, len) {
                        break id;
                    }
                    if self.in_flight() > 0 {
                        // Possibly held by one of our own writes: complete them.
                        self.wait_events();
                        continue;
                    }
                    // Held by another connection, which progresses on its own.
                    self.kick();
                    self.flush_batch();
                    break self.exp.ranges.acquire(offset, len);
                };
                (Some(s.begin(offset, len)), Some(id))
            }
            None => (None, None),
        }
    }

    fn end_write(
        &self,
        ticket: Option<WriteTicket>,
        range: Option<u64>,
        outcome: Result<Recorded<'_>, ()>,
    ) {
        if let (Some(s), Some(t)) = (self.sink(), ticket) {
            match outcome {
                Ok(Recorded::Data(d)) => s.complete_write(t, d),
                Ok(Recorded::Zero) => s.complete_zero(t),
                Ok(Recorded::Dirty) | Err(()) => s.abort(t),
            }
        }
        if let Some(id) = range {
            self.exp.ranges.release(id);
        }
    }

    fn start_write(&self, req: Request, buf: Vec<u8>) {
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let (ticket, range) = self.begin_write(req.offset, req.len);
        // Small non-FUA writes go to the page cache with a plain pwrite on
        // this thread: filesystems without non-blocking buffered writes
        // (ext4) make io_uring punt every write to a worker thread, and the
        // hand-offs and wake-ups cost more than the copy (measured: ~2x the
        // export's CPU per byte for 4 KiB writes). Replies stay batched.
        let inline = !fua && req.len <= INLINE_WRITE_MAX;
        if let (Some(ring), Some(fd), false) = (&self.ring, self.fd, inline) {
            let slot = Slot {
                kind: OpKind::Write,
                handle: req.handle,
                offset: req.offset,
                len: req.len,
                fua,
                ticket,
                range,
                done: 0,
            };
            let tag = self.alloc_slot(slot, req.len);
            if let Err(e) = ring.push(
                u64::from(tag),
                IoOp::Write {
                    fd,
                    offset: req.offset,
                    buf,
                    start: 0,
                    dsync: fua,
                },
            ) {
                warn!(error = %e, "io_uring submit failed");
                self.finish(tag, Err(io::Error::from_raw_os_error(libc::EIO)), None);
            }
            return;
        }
        let res = self.export().source.write_at(&buf, req.offset, fua);
        let outcome = if res.is_ok() {
            Ok(Recorded::Data(&buf))
        } else {
            Err(())
        };
        self.end_write(ticket, range, outcome);
        match res {
            Ok(()) => self.reply(req.handle, req.offset, ReplyKind::Ok, &[]),
            Err(e) => self.reply_err(req.handle, req.offset, nbd_errno(&e)),
        }
        self.pool.put(buf);
    }

    fn start_read(&self, req: Request) {
        let buf = self.pool.get(req.len as usize);
        if let (Some(ring), Some(fd)) = (&self.ring, self.fd) {
            let slot = Slot {
                kind: OpKind::Read,
                handle: req.handle,
                offset: req.offset,
                len: req.len,
                fua: false,
                ticket: None,
                range: None,
                done: 0,
            };
            let tag = self.alloc_slot(slot, req.len);
            if let Err(e) = ring.push(
                u64::from(tag),
                IoOp::Read {
                    fd,
                    offset: req.offset,
                    buf,
                    start: 0,
                },
            ) {
                warn!(error = %e, "io_uring submit failed");
                self.finish(tag, Err(io::Error::from_raw_os_error(libc::EIO)), None);
            }
            return;
        }
        let mut buf = buf;
        let res = self.export().source.read_at(&mut buf, req.offset);
        self.finish_read(req.handle, req.offset, res, &buf);
        self.pool.put(buf);
    }

    fn finish_read(&self, handle: u64, offset: u64, res: io::Result<()>, buf: &[u8]) {
        match res {
            Ok(()) => {
                if let Some(s) = self.sink() {
                    s.note_read(buf.len() as u64);
                }
                let kind = if buf.is_empty() && self.mode != ReplyMode::Simple {
                    ReplyKind::Ok
                } else {
                    ReplyKind::Data {
                        offset,
                        len: buf.len() as u64,
                    }
                };
                self.reply(handle, offset, kind, buf);
            }
            Err(e) => self.reply_err(handle, offset, nbd_errno(&e)),
        }
    }

    fn start_flush(&self, req: Request) {
        if let (Some(ring), Some(fd)) = (&self.ring, self.fd) {
            let slot = Slot {
                kind: OpKind::Flush,
                handle: req.handle,
                offset: req.offset,
                len: 0,
                fua: false,
                ticket: None,
                range: None,
                done: 0,
            };
            let tag = self.alloc_slot(slot, 0);
            if let Err(e) = ring.push(u64::from(tag), IoOp::Fsync { fd }) {
                warn!(error = %e, "io_uring submit failed");
                self.finish(tag, Err(io::Error::from_raw_os_error(libc::EIO)), None);
            }
            return;
        }
        match self.export().source.flush() {
            Ok(()) => self.reply(req.handle, req.offset, ReplyKind::Ok, &[]),
            Err(e) => self.reply_err(req.handle, req.offset, nbd_errno(&e)),
        }
    }

    fn zero_or_trim(&self, req: Request) {
        self.kick();
        let src = &self.export().source;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let (ticket, range) = self.begin_write(req.offset, req.len);
        let res = if req.kind == CMD_TRIM {
            src.trim(req.offset, req.len).map(|o| match o {
                TrimOutcome::Zeroed => Recorded::Zero,
                TrimOutcome::Ignored => Recorded::Dirty,
            })
        } else {
            let may_trim = req.flags & CMD_FLAG_NO_HOLE == 0;
            let fast = req.flags & CMD_FLAG_FAST_ZERO != 0;
            src.write_zeroes(req.offset, req.len, may_trim, fast)
                .map(|()| Recorded::Zero)
        };
        let res = match res {
            Ok(rec) if fua => src.flush().map(|()| rec),
            other => other,
        };
        match res {
            Ok(rec) => {
                self.end_write(ticket, range, Ok(rec));
                self.reply(req.handle, req.offset, ReplyKind::Ok, &[]);
            }
            Err(e) => {
                self.end_write(ticket, range, Err(()));
                self.reply_err(req.handle, req.offset, nbd_errno(&e));
            }
        }
    }

    fn block_status(&self, req: Request, scratch: &mut Vec<u8>) {
        self.kick();
        let ext = self.mode == ReplyMode::Extended;
        let max_extents = if req.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            1024
        };
        // Compact replies carry 32-bit extent lengths.
        let len = if ext {
            req.len
        } else {
            req.len.min(u64::from(u32::MAX) & !4095)
        };
        let mut extents = Vec::new();
        if let Err(e) =
            self.export()
                .source
                .block_status(req.offset, len, max_extents, &mut extents)
        {
            self.reply_err(req.handle, req.offset, nbd_errno(&e));
            return;
        }
        if extents.is_empty() {
            extents.push(Extent { len, flags: 0 });
        }
        scratch.clear();
        let ty = encode_block_status(scratch, ext, META_CONTEXT_ID, &extents);
        self.reply(
            req.handle,
            req.offset,
            ReplyKind::Chunk {
                ty,
                len: scratch.len() as u64,
            },
            scratch,
        );
    }

    fn complete(&self, c: Completion) {
        let Ok(tag) = u32::try_from(c.tag) else {
            return;
        };
        let n = u64::try_from(c.result).unwrap_or(0);
        let (kind, len, offset, fua, done) = {
            let mut g = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            match g.slots.get_mut(tag as usize).and_then(Option::as_mut) {
                Some(s) => {
                    s.done += n;
                    (s.kind, s.len, s.offset, s.fua, s.done)
                }
                None => return,
            }
        };
        if c.result < 0 {
            self.finish(tag, Err(io::Error::from_raw_os_error(-c.result)), c.buf);
            return;
        }
        match (kind, c.buf) {
            (OpKind::Flush, _) => self.finish(tag, Ok(()), None),
            (_, None) => self.finish(tag, Err(io::Error::from_raw_os_error(libc::EIO)), None),
            (_, Some(buf)) if done >= len => self.finish(tag, Ok(()), Some(buf)),
            // A zero-length transfer before the end: the backing shrank.
            (_, Some(buf)) if n == 0 => {
                self.finish(tag, Err(io::Error::from_raw_os_error(libc::EIO)), Some(buf))
            }
            (k, Some(buf)) => {
                let (Some(ring), Some(fd)) = (&self.ring, self.fd) else {
                    return;
                };
                let start = done as usize;
                let op = if k == OpKind::Read {
                    IoOp::Read {
                        fd,
                        offset,
                        buf,
                        start,
                    }
                } else {
                    IoOp::Write {
                        fd,
                        offset,
                        buf,
                        start,
                        dsync: fua,
                    }
                };
                if let Err(e) = ring.submit(c.tag, op) {
                    warn!(error = %e, "io_uring resubmit failed");
                    self.finish(tag, Err(io::Error::from_raw_os_error(libc::EIO)), None);
                }
            }
        }
    }

    /// Completes a ring request: records it in the sink, replies, frees the slot.
    fn finish(&self, tag: u32, res: io::Result<()>, buf: Option<Vec<u8>>) {
        let Some(slot) = self.take_slot(tag) else {
            return;
        };
        let is_flush = slot.kind == OpKind::Flush;
        let bytes = slot.len;
        match slot.kind {
            OpKind::Read => {
                let b = buf.as_deref().unwrap_or(&[]);
                self.finish_read(slot.handle, slot.offset, res, b);
            }
            OpKind::Write => {
                let outcome = match (&res, buf.as_deref()) {
                    (Ok(()), Some(b)) => Ok(Recorded::Data(b)),
                    _ => Err(()),
                };
                self.end_write(slot.ticket, slot.range, outcome);
                match res {
                    Ok(()) => self.reply(slot.handle, slot.offset, ReplyKind::Ok, &[]),
                    Err(e) => self.reply_err(slot.handle, slot.offset, nbd_errno(&e)),
                }
            }
            OpKind::Flush => match res {
                Ok(()) => self.reply(slot.handle, slot.offset, ReplyKind::Ok, &[]),
                Err(e) => self.reply_err(slot.handle, slot.offset, nbd_errno(&e)),
            },
        }
        if let Some(b) = buf {
            self.pool.put(b);
        }
        self.release_slot(tag, bytes, is_flush);
    }
}

enum Recorded<'a> {
    Data(&'a [u8]),
    Zero,
    Dirty,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Voluntary context switches of the calling thread so far.
    fn own_voluntary_switches() -> u64 {
        let status = std::fs::read_to_string("/proc/thread-self/status").expect("thread status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("voluntary_ctxt_switches")
    }

    /// The peer consuming our replies must not wake the connection thread
    /// while it waits for the next request: on a unix socket every reply the
    /// client reads used to wake a thread blocked in `recv` (and put it back
    /// to sleep), one extra context switch per request.
    #[test]
    fn waiting_for_input_is_not_woken_by_the_peer_reading_replies() {
        let (ours, peer) = UnixStream::pair().expect("socketpair");
        let mut writer = ours.try_clone().expect("clone");
        let mut input = Input::new(Stream::Unix(ours), 4096);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let before = own_voluntary_switches();
            ready_tx.send(()).expect("signal ready");
            let mut one = [0u8; 1];
            input.read_exact(&mut one).expect("read the request");
            own_voluntary_switches() - before
        });
        ready_rx.recv().expect("reader started");
        // Let the reader block in its wait for input.
        std::thread::sleep(std::time::Duration::from_millis(100));
        const REPLIES: u64 = 500;
        let mut peer_r = peer.try_clone().expect("clone");
        let mut reply = [0u8; 40];
        for _ in 0..REPLIES {
            writer.write_all(&reply).expect("write a reply");
            // Reading it frees the reply's buffer on our socket: "write space".
            peer_r.read_exact(&mut reply).expect("peer reads the reply");
            // Give a woken reader the time to run and sleep again.
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        let mut peer_w = peer;
        peer_w.write_all(&[1]).expect("send the request");
        let switches = reader.join().expect("reader thread");
        eprintln!("reader thread: {switches} voluntary context switches");
        assert!(
            switches < REPLIES / 10,
            "the waiting connection thread was woken {switches} times by {REPLIES} replies read by the peer"
        );
    }
}
