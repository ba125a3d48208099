//! rewind's own NBD client: fixed-newstyle handshake with `NBD_OPT_GO`
//! (falling back to `NBD_OPT_EXPORT_NAME`), optional structured replies,
//! and READ / WRITE (+FUA) / FLUSH / TRIM / WRITE_ZEROES / DISC with several
//! requests in flight.
//!
//! Used by `rewind replay` (the trace-replay oracle) and by tests that need a
//! pipelined client under their own control.
//!
//! # Guarantees
//!
//! * **Total decoding**: every byte sequence a server may send is either
//!   decoded or rejected with a [`ClientError`]; nothing panics, and no
//!   allocation is sized by the peer beyond [`MAX_OPTION_REPLY`] or the length
//!   of a READ this client asked for.
//! * **Matching**: a reply is matched to its request by handle; a reply for
//!   an unknown handle, or a structured chunk outside the requested range, is
//!   a protocol error (the connection is no longer trusted).
//! * **Ordering**: requests are sent in the order [`RequestSender::send`] is
//!   called; replies may arrive in any order. As in the NBD specification, a
//!   FLUSH covers the writes whose replies were received before it was sent.
//!
//! ```no_run
//! use filter_nbd::client::{Connection, ConnectOptions, NbdUri};
//! let uri: NbdUri = "nbd+unix:///vol0?socket=/run/rewind/vol0.sock".parse()?;
//! let mut c = Connection::connect(&uri, &ConnectOptions::default())?;
//! c.write(0, &[0xab; 4096], true)?;
//! assert_eq!(c.read(0, 4096)?, vec![0xab; 4096]);
//! c.disconnect()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use crate::proto::*;

/// Largest option reply payload accepted during the handshake.
pub const MAX_OPTION_REPLY: u32 = 64 * 1024;
/// Largest READ this client issues in one request (replies are buffered whole).
pub const MAX_READ: u64 = 32 * 1024 * 1024;

const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed (including EOF from the server).
    #[error("NBD connection: {0}")]
    Io(#[from] io::Error),
    /// The server broke the protocol; the connection must be dropped.
    #[error("NBD protocol violation: {0}")]
    Protocol(String),
    /// The server refused an option (`NBD_REP_ERR_*`), with its message.
    #[error("server refused option {option}: reply {reply:#x} {message:?}")]
    Refused {
        /// The option code.
        option: u32,
        /// The error reply type.
        reply: u32,
        /// The server's message, if any.
        message: String,
    },
    /// The server answered a request with an error (errno value).
    #[error("server error {errno} ({}) on {what}", errno_name(*errno))]
    Server {
        /// NBD error value (errno numbering).
        errno: u32,
        /// Which request.
        what: String,
    },
    /// The caller asked for something the export or this client cannot do.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The URI could not be parsed.
    #[error("bad NBD URI {uri:?}: {why}")]
    BadUri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        why: String,
    },
}

fn errno_name(e: u32) -> &'static str {
    match e {
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown",
    }
}

type Result<T> = std::result::Result<T, ClientError>;

fn proto_err<T>(s: impl Into<String>) -> Result<T> {
    Err(ClientError::Protocol(s.into()))
}

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// A unix socket path.
    Unix(PathBuf),
    /// `host:port` for TCP.
    Tcp(String),
}

/// A parsed NBD URI: `nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST[:PORT]/EXPORT`
/// (port 10809 by default). TLS URIs (`nbds`) are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Server address.
    pub addr: NbdAddr,
    /// Export name (may be empty: the server's default export).
    pub export: String,
}

impl FromStr for NbdUri {
    type Err = ClientError;
    fn from_str(s: &str) -> Result<NbdUri> {
        let bad = |why: &str| ClientError::BadUri {
            uri: s.to_string(),
            why: why.to_string(),
        };
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let (path, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("missing ?socket=PATH"))?;
            let export = path.strip_prefix('/').unwrap_or(path).to_string();
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .filter(|p| !p.is_empty())
                .ok_or_else(|| bad("missing socket=PATH in the query"))?;
            return Ok(NbdUri {
                addr: NbdAddr::Unix(PathBuf::from(socket)),
                export,
            });
        }
        if let Some(rest) = s.strip_prefix("nbd://") {
            let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
            if hostport.is_empty() {
                return Err(bad("missing host"));
            }
            let has_port = if let Some(h) = hostport.strip_prefix('[') {
                h.contains("]:")
            } else {
                hostport.contains(':')
            };
            let addr = if has_port {
                hostport.to_string()
            } else {
                format!("{hostport}:10809")
            };
            return Ok(NbdUri {
                addr: NbdAddr::Tcp(addr),
                export: export.to_string(),
            });
        }
        if s.starts_with("nbds") {
            return Err(bad("TLS NBD URIs are not supported"));
        }
        Err(bad(
            "expected nbd+unix:///EXPORT?socket=PATH or nbd://HOST:PORT/EXPORT",
        ))
    }
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.addr {
            NbdAddr::Unix(p) => write!(f, "nbd+unix:///{}?socket={}", self.export, p.display()),
            NbdAddr::Tcp(a) => write!(f, "nbd://{a}/{}", self.export),
        }
    }
}

/// Handshake choices.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Ask for structured replies (`NBD_OPT_STRUCTURED_REPLY`); used if the server agrees.
    pub structured_replies: bool,
}

/// What the server told us about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`TF_*`).
    pub flags: u16,
    /// Minimum / preferred / maximum block size (NBD_INFO_BLOCK_SIZE), if sent.
    pub block_size: Option<(u32, u32, u32)>,
    /// Whether structured replies are in use.
    pub structured: bool,
}

impl ExportInfo {
    /// The largest payload to put in one request.
    pub fn max_payload(&self) -> u64 {
        match self.block_size {
            Some((_, _, max)) if max > 0 => u64::from(max).min(MAX_READ),
            _ => MAX_READ,
        }
    }
}

enum Sock {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Sock {
    fn try_clone(&self) -> io::Result<Sock> {
        Ok(match self {
            Sock::Unix(s) => Sock::Unix(s.try_clone()?),
            Sock::Tcp(s) => Sock::Tcp(s.try_clone()?),
        })
    }
    fn shutdown(&self) {
        let _ = match self {
            Sock::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Sock::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }
}

impl Read for Sock {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.read(b),
            Sock::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Unix(s) => s.write(b),
            Sock::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A request to send.
#[derive(Debug, Clone, Copy)]
pub enum Cmd<'a> {
    /// Read `len` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Write `data` at `offset`, with FUA if `fua`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Payload.
        data: &'a [u8],
        /// Force unit access.
        fua: bool,
    },
    /// Flush everything written before.
    Flush,
    /// Discard `len` bytes at `offset`.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Force unit access.
        fua: bool,
    },
    /// Zero `len` bytes at `offset`.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Force unit access.
        fua: bool,
    },
}

impl Cmd<'_> {
    fn header(&self) -> (u16, u16, u64, u64) {
        let f = |fua: bool| if fua { CMD_FLAG_FUA } else { 0 };
        match *self {
            Cmd::Read { offset, len } => (CMD_READ, 0, offset, len),
            Cmd::Write { offset, data, fua } => (CMD_WRITE, f(fua), offset, data.len() as u64),
            Cmd::Flush => (CMD_FLUSH, 0, 0, 0),
            Cmd::Trim { offset, len, fua } => (CMD_TRIM, f(fua), offset, len),
            Cmd::WriteZeroes { offset, len, fua } => (CMD_WRITE_ZEROES, f(fua), offset, len),
        }
    }
    fn name(&self) -> &'static str {
        match self {
            Cmd::Read { .. } => "READ",
            Cmd::Write { .. } => "WRITE",
            Cmd::Flush => "FLUSH",
            Cmd::Trim { .. } => "TRIM",
            Cmd::WriteZeroes { .. } => "WRITE_ZEROES",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    kind: u16,
    offset: u64,
    len: u64,
}

type PendingMap = Arc<Mutex<HashMap<u64, Pending>>>;

/// A decoded reply to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The handle of the request.
    pub handle: u64,
    /// `NBD_CMD_*` of the request.
    pub kind: u16,
    /// Offset of the request.
    pub offset: u64,
    /// Ok (with the data of a READ, empty otherwise) or the server's errno.
    pub result: std::result::Result<Vec<u8>, u32>,
}

impl Reply {
    /// The data (READ) or unit, or a [`ClientError::Server`].
    pub fn into_result(self) -> Result<Vec<u8>> {
        let what = format!("{} at {}", cmd_name(self.kind), self.offset);
        self.result
            .map_err(|errno| ClientError::Server { errno, what })
    }
}

fn cmd_name(k: u16) -> &'static str {
    match k {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_DISC => "DISC",
        _ => "?",
    }
}

/// The sending half of a connection (see [`Connection::split`]).
pub struct RequestSender {
    sock: Box<dyn Write + Send>,
    pending: PendingMap,
    info: ExportInfo,
    next_handle: u64,
    buf: Vec<u8>,
}

impl RequestSender {
    /// Sends `cmd`, returning its handle. Checks the range against the
    /// export size and the maximum payload first (nothing is sent then).
    pub fn send(&mut self, cmd: Cmd<'_>) -> Result<u64> {
        let (kind, flags, offset, len) = cmd.header();
        if kind != CMD_FLUSH {
            let end = offset.checked_add(len);
            if !matches!(end, Some(e) if e <= self.info.size) {
                return Err(ClientError::Invalid(format!(
                    "{} of {len} bytes at {offset} is beyond the export size {}",
                    cmd.name(),
                    self.info.size
                )));
            }
            if len == 0 {
                return Err(ClientError::Invalid(format!("{} of 0 bytes", cmd.name())));
            }
        }
        if matches!(cmd, Cmd::Read { .. } | Cmd::Write { .. }) && len > self.info.max_payload() {
            return Err(ClientError::Invalid(format!(
                "{} of {len} bytes exceeds the maximum payload {}",
                cmd.name(),
                self.info.max_payload()
            )));
        }
        if len > u64::from(u32::MAX) {
            return Err(ClientError::Invalid(format!(
                "{} length {len} > 4 GiB",
                cmd.name()
            )));
        }
        let need = |flag: u16, what: &str| -> Result<()> {
            if self.info.flags & flag == 0 {
                return Err(ClientError::Invalid(format!(
                    "the export does not support {what}"
                )));
            }
            Ok(())
        };
        match cmd {
            Cmd::Flush => need(TF_SEND_FLUSH, "FLUSH")?,
            Cmd::Trim { .. } => need(TF_SEND_TRIM, "TRIM")?,
            Cmd::WriteZeroes { .. } => need(TF_SEND_WRITE_ZEROES, "WRITE_ZEROES")?,
            _ => {}
        }
        if flags & CMD_FLAG_FUA != 0 {
            need(TF_SEND_FUA, "FUA")?;
        }
        if kind != CMD_READ && self.info.flags & TF_READ_ONLY != 0 {
            return Err(ClientError::Invalid(format!(
                "{} on a read-only export",
                cmd.name()
            )));
        }
        let handle = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(handle, Pending { kind, offset, len });
        self.buf.clear();
        encode_request(
            &mut self.buf,
            &Request {
                flags,
                kind,
                handle,
                offset,
                len,
            },
            false,
        );
        let r = match cmd {
            Cmd::Write { data, .. } => {
                // one write for small payloads, two for large ones
                if data.len() <= 64 * 1024 {
                    self.buf.extend_from_slice(data);
                    self.sock.write_all(&self.buf)
                } else {
                    self.sock
                        .write_all(&self.buf)
                        .and_then(|_| self.sock.write_all(data))
                }
            }
            _ => self.sock.write_all(&self.buf),
        };
        if let Err(e) = r {
            self.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&handle);
            return Err(e.into());
        }
        Ok(handle)
    }

    /// Sends `NBD_CMD_DISC` (no reply follows; the server closes).
    pub fn disconnect(&mut self) -> Result<()> {
        self.buf.clear();
        encode_request(
            &mut self.buf,
            &Request {
                flags: 0,
                kind: CMD_DISC,
                handle: u64::MAX,
                offset: 0,
                len: 0,
            },
            false,
        );
        self.sock.write_all(&self.buf)?;
        Ok(())
    }

    /// The handle the next [`send`](Self::send) will use (handles count up from 1).
    pub fn next_handle(&self) -> u64 {
        self.next_handle
    }

    /// Number of requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// The receiving half of a connection: decodes replies from any byte stream.
pub struct ReplyReceiver<R: Read> {
    sock: R,
    pending: PendingMap,
    structured: bool,
    /// Partially assembled structured READ replies: handle → (buffer, error).
    partial: HashMap<u64, (Vec<u8>, Option<u32>)>,
}

impl<R: Read> ReplyReceiver<R> {
    /// A receiver reading from `sock`; `pending` are the requests it may be
    /// answering (see [`Connection::split`]); public so that fuzz tests can
    /// feed arbitrary bytes.
    pub fn from_reader(sock: R, structured: bool) -> (ReplyReceiver<R>, PendingHandle) {
        let pending: PendingMap = Arc::default();
        (
            ReplyReceiver {
                sock,
                pending: pending.clone(),
                structured,
                partial: HashMap::new(),
            },
            PendingHandle(pending),
        )
    }

    fn lookup(&self, handle: u64) -> Result<Pending> {
        match self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&handle)
        {
            Some(p) => Ok(*p),
            None => proto_err(format!("reply for unknown handle {handle:#x}")),
        }
    }

    fn finish(
        &mut self,
        handle: u64,
        p: Pending,
        result: std::result::Result<Vec<u8>, u32>,
    ) -> Reply {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&handle);
        Reply {
            handle,
            kind: p.kind,
            offset: p.offset,
            result,
        }
    }

    /// Blocks until one request is completely answered and returns its reply.
    pub fn recv(&mut self) -> Result<Reply> {
        loop {
            let mut magic = [0u8; 4];
            self.sock.read_exact(&mut magic)?;
            match u32::from_be_bytes(magic) {
                SIMPLE_REPLY_MAGIC => {
                    let mut h = [0u8; 12];
                    self.sock.read_exact(&mut h)?;
                    let errno = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                    let handle =
                        u64::from_be_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
                    let p = self.lookup(handle)?;
                    if self.partial.contains_key(&handle) {
                        return proto_err("simple reply after structured chunks");
                    }
                    if errno != 0 {
                        return Ok(self.finish(handle, p, Err(errno)));
                    }
                    let mut data = Vec::new();
                    if p.kind == CMD_READ {
                        if self.structured {
                            return proto_err(
                                "simple reply with data to a READ under structured replies",
                            );
                        }
                        data = vec![0u8; p.len as usize];
                        self.sock.read_exact(&mut data)?;
                    }
                    return Ok(self.finish(handle, p, Ok(data)));
                }
                STRUCTURED_REPLY_MAGIC => {
                    if !self.structured {
                        return proto_err("structured reply without negotiation");
                    }
                    let mut h = [0u8; 16];
                    self.sock.read_exact(&mut h)?;
                    let flags = u16::from_be_bytes([h[0], h[1]]);
                    let ty = u16::from_be_bytes([h[2], h[3]]);
                    let handle =
                        u64::from_be_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
                    let plen = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
                    let p = self.lookup(handle)?;
                    if let Some(r) = self.chunk(handle, p, flags, ty, plen)? {
                        return Ok(r);
                    }
                }
                m => return proto_err(format!("bad reply magic {m:#x}")),
            }
        }
    }

    fn chunk(
        &mut self,
        handle: u64,
        p: Pending,
        flags: u16,
        ty: u16,
        plen: u32,
    ) -> Result<Option<Reply>> {
        let done = flags & REPLY_FLAG_DONE != 0;
        let in_range = |off: u64, len: u64| {
            off >= p.offset
                && off
                    .checked_add(len)
                    .is_some_and(|e| e <= p.offset.saturating_add(p.len))
        };
        match ty {
            REPLY_TYPE_NONE => {
                if plen != 0 {
                    return proto_err("NONE chunk with a payload");
                }
                if !done {
                    return proto_err("NONE chunk without DONE");
                }
            }
            REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                if p.kind != CMD_READ {
                    return proto_err("data chunk in reply to a non-READ");
                }
                let mut o = [0u8; 8];
                if plen < 8 || (ty == REPLY_TYPE_OFFSET_HOLE && plen != 12) {
                    return proto_err("data/hole chunk too short");
                }
                self.sock.read_exact(&mut o)?;
                let off = u64::from_be_bytes(o);
                let len = if ty == REPLY_TYPE_OFFSET_DATA {
                    u64::from(plen - 8)
                } else {
                    let mut l = [0u8; 4];
                    self.sock.read_exact(&mut l)?;
                    u64::from(u32::from_be_bytes(l))
                };
                if !in_range(off, len) || len == 0 {
                    return proto_err(format!(
                        "chunk [{off}, +{len}) outside the READ [{}, +{})",
                        p.offset, p.len
                    ));
                }
                let entry = self
                    .partial
                    .entry(handle)
                    .or_insert_with(|| (vec![0u8; p.len as usize], None));
                let at = (off - p.offset) as usize;
                let dst = &mut entry.0[at..at + len as usize];
                if ty == REPLY_TYPE_OFFSET_DATA {
                    self.sock.read_exact(dst)?;
                } else {
                    dst.fill(0);
                }
            }
            REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                let min = if ty == REPLY_TYPE_ERROR { 6 } else { 14 };
                if plen < min || plen > MAX_OPTION_REPLY {
                    return proto_err("error chunk of a bad length");
                }
                let mut b = vec![0u8; plen as usize];
                self.sock.read_exact(&mut b)?;
                let errno = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                let mlen = u16::from_be_bytes([b[4], b[5]]) as u32;
                if mlen + min != plen {
                    return proto_err("error chunk message length does not add up");
                }
                let entry = self
                    .partial
                    .entry(handle)
                    .or_insert_with(|| (Vec::new(), None));
                entry.1.get_or_insert(if errno == 0 { EIO } else { errno });
            }
            t => return proto_err(format!("unexpected chunk type {t}")),
        }
        if !done {
            return Ok(None);
        }
        let (data, err) = self.partial.remove(&handle).unwrap_or_default();
        let result = match err {
            Some(e) => Err(e),
            None if p.kind == CMD_READ && data.len() as u64 != p.len => {
                // a READ answered by NONE alone: the spec forbids it
                return proto_err("READ finished without data chunks");
            }
            None => Ok(data),
        };
        Ok(Some(self.finish(handle, p, result)))
    }
}

/// Registers expected requests with a receiver made by
/// [`ReplyReceiver::from_reader`] (for tests feeding recorded bytes).
pub struct PendingHandle(PendingMap);

impl PendingHandle {
    /// Declares request `handle` of `kind` over `[offset, offset+len)` as in flight.
    pub fn expect(&self, handle: u64, kind: u16, offset: u64, len: u64) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(
            handle,
            Pending {
                kind,
                offset,
                len: len.min(MAX_READ),
            },
        );
    }
}

/// An established NBD connection in transmission phase.
pub struct Connection {
    /// What the server said about the export.
    pub info: ExportInfo,
    sender: RequestSender,
    receiver: ReplyReceiver<Box<dyn Read + Send>>,
    closer: Sock,
}

fn read_exact_opt(s: &mut Sock, n: usize) -> Result<Vec<u8>> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v)?;
    Ok(v)
}

fn send_option(s: &mut Sock, option: u32, data: &[u8]) -> Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)?;
    Ok(())
}

/// Reads one option reply: (reply type, data).
fn read_option_reply(s: &mut Sock, option: u32) -> Result<(u32, Vec<u8>)> {
    let h = read_exact_opt(s, 20)?;
    let magic = u64::from_be_bytes(h[0..8].try_into().unwrap_or_default());
    if magic != OPTION_REPLY_MAGIC {
        return proto_err(format!("bad option reply magic {magic:#x}"));
    }
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap_or_default());
    let reply = u32::from_be_bytes(h[12..16].try_into().unwrap_or_default());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default());
    if opt != option {
        return proto_err(format!("reply to option {opt}, expected {option}"));
    }
    if len > MAX_OPTION_REPLY {
        return proto_err(format!("option reply of {len} bytes"));
    }
    let data = read_exact_opt(s, len as usize)?;
    Ok((reply, data))
}

impl Connection {
    /// Connects to `uri` and negotiates the export (fixed newstyle, GO).
    pub fn connect(uri: &NbdUri, opts: &ConnectOptions) -> Result<Connection> {
        let sock = match &uri.addr {
            NbdAddr::Unix(p) => Sock::Unix(UnixStream::connect(p)?),
            NbdAddr::Tcp(a) => {
                let s = TcpStream::connect(a.as_str())?;
                s.set_nodelay(true)?;
                Sock::Tcp(s)
            }
        };
        Self::handshake(sock, &uri.export, opts)
    }

    fn handshake(mut s: Sock, export: &str, opts: &ConnectOptions) -> Result<Connection> {
        let g = read_exact_opt(&mut s, 18)?;
        let m1 = u64::from_be_bytes(g[0..8].try_into().unwrap_or_default());
        let m2 = u64::from_be_bytes(g[8..16].try_into().unwrap_or_default());
        let hflags = u16::from_be_bytes([g[16], g[17]]);
        if m1 != NBDMAGIC {
            return proto_err(format!("bad greeting magic {m1:#x}"));
        }
        if m2 != IHAVEOPT {
            return proto_err("oldstyle negotiation is not supported");
        }
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return proto_err("server is not fixed-newstyle");
        }
        let no_zeroes = hflags & FLAG_NO_ZEROES != 0;
        let cflags = FLAG_C_FIXED_NEWSTYLE | if no_zeroes { FLAG_C_NO_ZEROES } else { 0 };
        s.write_all(&cflags.to_be_bytes())?;

        let mut structured = false;
        if opts.structured_replies {
            send_option(&mut s, OPT_STRUCTURED_REPLY, &[])?;
            let (r, _) = read_option_reply(&mut s, OPT_STRUCTURED_REPLY)?;
            structured = r == REP_ACK;
        }

        let mut go = Vec::new();
        go.extend_from_slice(&(export.len() as u32).to_be_bytes());
        go.extend_from_slice(export.as_bytes());
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        send_option(&mut s, OPT_GO, &go)?;
        let mut size_flags = None;
        let mut block_size = None;
        loop {
            let (reply, data) = read_option_reply(&mut s, OPT_GO)?;
            match reply {
                REP_ACK => break,
                REP_INFO => {
                    if data.len() < 2 {
                        return proto_err("short NBD_REP_INFO");
                    }
                    match u16::from_be_bytes([data[0], data[1]]) {
                        INFO_EXPORT if data.len() == 12 => {
                            let size =
                                u64::from_be_bytes(data[2..10].try_into().unwrap_or_default());
                            let flags = u16::from_be_bytes([data[10], data[11]]);
                            size_flags = Some((size, flags));
                        }
                        INFO_BLOCK_SIZE if data.len() == 14 => {
                            let g = |i: usize| {
                                u32::from_be_bytes(data[i..i + 4].try_into().unwrap_or_default())
                            };
                            block_size = Some((g(2), g(6), g(10)));
                        }
                        INFO_EXPORT | INFO_BLOCK_SIZE => {
                            return proto_err("NBD_REP_INFO of a bad length")
                        }
                        _ => {}
                    }
                }
                REP_ERR_UNSUP => {
                    // an old server: NBD_OPT_EXPORT_NAME (no error reply possible)
                    let mut b = Vec::new();
                    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
                    b.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
                    b.extend_from_slice(&(export.len() as u32).to_be_bytes());
                    b.extend_from_slice(export.as_bytes());
                    s.write_all(&b)?;
                    let d = read_exact_opt(&mut s, 10)?;
                    let size = u64::from_be_bytes(d[0..8].try_into().unwrap_or_default());
                    let flags = u16::from_be_bytes([d[8], d[9]]);
                    if !no_zeroes {
                        read_exact_opt(&mut s, 124)?;
                    }
                    size_flags = Some((size, flags));
                    structured = false;
                    break;
                }
                r if r & (1 << 31) != 0 => {
                    return Err(ClientError::Refused {
                        option: OPT_GO,
                        reply: r,
                        message: String::from_utf8_lossy(&data).into_owned(),
                    })
                }
                _ => {}
            }
        }
        let (size, flags) = size_flags.ok_or_else(|| {
            ClientError::Protocol("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT".into())
        })?;
        let info = ExportInfo {
            size,
            flags,
            block_size,
            structured,
        };
        let closer = s.try_clone()?;
        let rd = s.try_clone()?;
        let pending: PendingMap = Arc::default();
        Ok(Connection {
            info,
            sender: RequestSender {
                sock: Box::new(s),
                pending: pending.clone(),
                info,
                next_handle: 1,
                buf: Vec::with_capacity(64 * 1024 + 64),
            },
            receiver: ReplyReceiver {
                sock: Box::new(rd),
                pending,
                structured,
                partial: HashMap::new(),
            },
            closer,
        })
    }

    /// Splits into a sender and a receiver, for pipelining from two threads.
    pub fn split(self) -> (RequestSender, ReplyReceiver<Box<dyn Read + Send>>) {
        (self.sender, self.receiver)
    }

    fn call(&mut self, cmd: Cmd<'_>) -> Result<Vec<u8>> {
        if self.sender.in_flight() != 0 {
            return Err(ClientError::Invalid("requests still in flight".into()));
        }
        let h = self.sender.send(cmd)?;
        let r = self.receiver.recv()?;
        if r.handle != h {
            return proto_err("reply to another request");
        }
        r.into_result()
    }

    /// Reads `len` bytes at `offset` (split into requests of the maximum payload).
    pub fn read(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len.min(MAX_READ * 4) as usize);
        let step = self.info.max_payload();
        let mut at = offset;
        while at < offset + len {
            let n = step.min(offset + len - at);
            out.extend_from_slice(&self.call(Cmd::Read { offset: at, len: n })?);
            at += n;
        }
        Ok(out)
    }

    /// Writes `data` at `offset`; with `fua` durable before returning.
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let step = self.info.max_payload() as usize;
        for (i, c) in data.chunks(step.max(1)).enumerate() {
            let offset = offset + (i * step) as u64;
            self.call(Cmd::Write {
                offset,
                data: c,
                fua,
            })?;
        }
        Ok(())
    }

    /// Flushes the export (every write answered before is durable).
    pub fn flush(&mut self) -> Result<()> {
        self.call(Cmd::Flush).map(|_| ())
    }

    /// Discards a range.
    pub fn trim(&mut self, offset: u64, len: u64) -> Result<()> {
        self.call(Cmd::Trim {
            offset,
            len,
            fua: false,
        })
        .map(|_| ())
    }

    /// Zeroes a range.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.call(Cmd::WriteZeroes {
            offset,
            len,
            fua: false,
        })
        .map(|_| ())
    }

    /// Sends DISC and closes the socket.
    pub fn disconnect(mut self) -> Result<()> {
        let r = self.sender.disconnect();
        self.closer.shutdown();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Cursor;

    #[test]
    fn uris_parse() {
        let u: NbdUri = "nbd+unix:///vol0?socket=/tmp/a.sock".parse().unwrap();
        assert_eq!(u.addr, NbdAddr::Unix("/tmp/a.sock".into()));
        assert_eq!(u.export, "vol0");
        let u: NbdUri = "nbd://127.0.0.1:1234/x".parse().unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("127.0.0.1:1234".into()));
        assert_eq!(u.export, "x");
        let u: NbdUri = "nbd://[::1]".parse().unwrap();
        assert_eq!(u.addr, NbdAddr::Tcp("[::1]:10809".into()));
        assert!("nbd+unix:///x".parse::<NbdUri>().is_err());
        assert!("nbds://h/x".parse::<NbdUri>().is_err());
        assert!("http://h".parse::<NbdUri>().is_err());
    }

    fn simple(errno: u32, handle: u64, data: &[u8]) -> Vec<u8> {
        let mut b = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&errno.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    fn chunk(flags: u16, ty: u16, handle: u64, payload: &[u8]) -> Vec<u8> {
        let mut b = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&ty.to_be_bytes());
        b.extend_from_slice(&handle.to_be_bytes());
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(payload);
        b
    }

    #[test]
    fn simple_replies_decode() {
        let mut bytes = simple(0, 7, &[1, 2, 3, 4]);
        bytes.extend(simple(EIO, 8, &[]));
        let (mut r, p) = ReplyReceiver::from_reader(Cursor::new(bytes), false);
        p.expect(7, CMD_READ, 100, 4);
        p.expect(8, CMD_WRITE, 0, 4096);
        let a = r.recv().unwrap();
        assert_eq!((a.handle, a.result), (7, Ok(vec![1, 2, 3, 4])));
        let b = r.recv().unwrap();
        assert_eq!(b.result, Err(EIO));
        assert!(matches!(
            b.into_result(),
            Err(ClientError::Server { errno: EIO, .. })
        ));
        assert!(matches!(r.recv(), Err(ClientError::Io(_))));
    }

    #[test]
    fn structured_read_assembles_chunks() {
        let mut d = 16u64.to_be_bytes().to_vec();
        d.extend_from_slice(&[9, 9]);
        let mut hole = 10u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&6u32.to_be_bytes());
        let mut bytes = chunk(0, REPLY_TYPE_OFFSET_DATA, 1, &d);
        bytes.extend(chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 1, &hole));
        let (mut r, p) = ReplyReceiver::from_reader(Cursor::new(bytes), true);
        p.expect(1, CMD_READ, 10, 8);
        assert_eq!(r.recv().unwrap().result, Ok(vec![0, 0, 0, 0, 0, 0, 9, 9]));
    }

    #[test]
    fn bad_replies_are_errors() {
        // unknown handle
        let (mut r, _p) = ReplyReceiver::from_reader(Cursor::new(simple(0, 5, &[])), false);
        assert!(matches!(r.recv(), Err(ClientError::Protocol(_))));
        // chunk outside the read range
        let mut d = 0u64.to_be_bytes().to_vec();
        d.extend_from_slice(&[1; 8]);
        let (mut r, p) = ReplyReceiver::from_reader(
            Cursor::new(chunk(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1, &d)),
            true,
        );
        p.expect(1, CMD_READ, 4, 8);
        assert!(matches!(r.recv(), Err(ClientError::Protocol(_))));
        // structured without negotiation
        let (mut r, p) = ReplyReceiver::from_reader(
            Cursor::new(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, &[])),
            false,
        );
        p.expect(1, CMD_FLUSH, 0, 0);
        assert!(matches!(r.recv(), Err(ClientError::Protocol(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
        /// The reply decoder never panics, whatever the server sends.
        #[test]
        fn reply_decoder_is_total(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            structured in any::<bool>(),
            kinds in proptest::collection::vec((0u16..8, 0u64..64, 0u64..64), 0..4),
        ) {
            let (mut r, p) = ReplyReceiver::from_reader(Cursor::new(bytes), structured);
            for (h, (k, o, l)) in kinds.iter().enumerate() {
                p.expect(h as u64, *k, *o, *l);
            }
            for _ in 0..8 {
                if r.recv().is_err() { break; }
            }
        }

        /// Replies built from valid headers with a random handle/length mix decode
        /// or fail cleanly.
        #[test]
        fn reply_decoder_handles_framed_noise(
            handle in 0u64..4,
            ty in prop_oneof![Just(0u16), Just(1), Just(2), Just(32769), Just(32770), any::<u16>()],
            flags in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let (mut r, p) = ReplyReceiver::from_reader(Cursor::new(chunk(flags, ty, handle, &payload)), true);
            p.expect(handle, CMD_READ, 0, 32);
            let _ = r.recv();
        }
    }
}
