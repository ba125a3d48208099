//! A small NBD test client speaking raw bytes, plus server fixtures.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_core::{ChangeSink, WriteTicket};
use filter_nbd::proto::*;
use filter_nbd::{Backing, Export, Server, ServerOptions, ShutdownHandle};

/// A running in-process server on a unix socket in a temp dir.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub files: Vec<PathBuf>,
    pub stop: ShutdownHandle,
    pub thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stop.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub struct Spec {
    pub name: &'static str,
    pub size: u64,
    pub read_only: bool,
    pub sink: Option<Arc<dyn ChangeSink>>,
    pub fill: u8,
}

impl Spec {
    pub fn rw(name: &'static str, size: u64) -> Self {
        Self {
            name,
            size,
            read_only: false,
            sink: None,
            fill: 0,
        }
    }
}

pub fn serve(specs: Vec<Spec>, opts: ServerOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut exports = Vec::new();
    let mut files = Vec::new();
    for s in specs {
        let p = dir.path().join(format!(
            "{}.img",
            if s.name.is_empty() { "default" } else { s.name }
        ));
        std::fs::write(&p, vec![s.fill; s.size as usize]).unwrap();
        let b = Backing::open(&p, s.read_only).unwrap();
        exports.push(
            Export::new(s.name, Arc::new(b))
                .with_description(format!("test {}", s.name))
                .with_sink(s.sink),
        );
        files.push(p);
    }
    let sock = dir.path().join("nbd.sock");
    let server = Server::new(exports, opts).unwrap();
    let stop = server.shutdown_handle();
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let thread = std::thread::spawn(move || server.serve_unix_listener(l).unwrap());
    Fixture {
        dir,
        sock,
        files,
        stop,
        thread: Some(thread),
    }
}

pub fn serve_one(size: u64) -> Fixture {
    serve(vec![Spec::rw("vol", size)], ServerOptions::default())
}

pub fn read_file(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Simple,
    Structured,
    Extended,
}

#[derive(Debug, Default)]
pub struct Reply {
    pub handle: u64,
    pub error: u32,
    pub data: Vec<u8>,
    pub extents: Vec<(u64, u32)>,
    pub chunks: Vec<u16>,
}

pub struct Client {
    pub s: UnixStream,
    pub mode: Mode,
    pub size: u64,
    pub flags: u16,
    reads: HashMap<u64, u64>,
    next: u64,
}

pub fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Reads the greeting and sends client flags.
pub fn greet(s: &mut UnixStream) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[0..8], &NBDMAGIC.to_be_bytes());
    assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
    assert_eq!(
        u16::from_be_bytes([g[16], g[17]]),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
}

pub fn send_opt(s: &mut UnixStream, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

/// Reads one option reply: (option, reply type, data).
pub fn read_opt_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(&h[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
    let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).unwrap();
    (opt, ty, d)
}

pub fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

pub fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Asserts the peer closed the connection (EOF or reset) within the timeout.
pub fn assert_closed(s: &mut UnixStream) {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("expected close, got {e}"),
        }
    }
}

impl Client {
    /// Handshake with GO. `mode` selects STRUCTURED_REPLY / EXTENDED_HEADERS.
    pub fn go(path: &Path, name: &str, mode: Mode, meta: bool) -> Client {
        let mut s = connect(path);
        greet(&mut s);
        match mode {
            Mode::Simple => {}
            Mode::Structured => {
                send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]);
                assert_eq!(read_opt_reply(&mut s).1, REP_ACK);
            }
            Mode::Extended => {
                send_opt(&mut s, OPT_EXTENDED_HEADERS, &[]);
                assert_eq!(read_opt_reply(&mut s).1, REP_ACK);
            }
        }
        if meta {
            send_opt(
                &mut s,
                OPT_SET_META_CONTEXT,
                &meta_data(name, &[BASE_ALLOCATION]),
            );
            let (_, ty, d) = read_opt_reply(&mut s);
            assert_eq!(ty, REP_META_CONTEXT);
            assert_eq!(&d[4..], BASE_ALLOCATION.as_bytes());
            assert_eq!(read_opt_reply(&mut s).1, REP_ACK);
        }
        send_opt(&mut s, OPT_GO, &info_data(name, &[INFO_BLOCK_SIZE]));
        let (mut size, mut flags) = (0, 0);
        loop {
            let (opt, ty, d) = read_opt_reply(&mut s);
            assert_eq!(opt, OPT_GO);
            match ty {
                REP_INFO => {
                    if u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT {
                        size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                        flags = u16::from_be_bytes([d[10], d[11]]);
                    }
                }
                REP_ACK => break,
                other => panic!("GO failed: {other:#x}"),
            }
        }
        Client {
            s,
            mode,
            size,
            flags,
            reads: HashMap::new(),
            next: 1,
        }
    }

    /// Handshake with EXPORT_NAME (no structured replies).
    pub fn export_name(path: &Path, name: &str) -> Client {
        let mut s = connect(path);
        greet(&mut s);
        send_opt(&mut s, OPT_EXPORT_NAME, name.as_bytes());
        let mut b = [0u8; 10];
        s.read_exact(&mut b).unwrap();
        let size = u64::from_be_bytes(b[0..8].try_into().unwrap());
        let flags = u16::from_be_bytes([b[8], b[9]]);
        Client {
            s,
            mode: Mode::Simple,
            size,
            flags,
            reads: HashMap::new(),
            next: 1,
        }
    }

    /// Sends a request (with `payload` for WRITE) and returns its handle.
    pub fn send(&mut self, kind: u16, flags: u16, offset: u64, len: u64, payload: &[u8]) -> u64 {
        let h = self.next;
        self.next += 1;
        let mut b = Vec::new();
        encode_request(
            &mut b,
            &Request {
                flags,
                kind,
                handle: h,
                offset,
                len,
            },
            self.mode == Mode::Extended,
        );
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
        if kind == CMD_READ {
            self.reads.insert(h, len);
        }
        h
    }

    /// Reads one complete reply.
    pub fn recv(&mut self) -> Reply {
        let mut r = Reply::default();
        let mut m = [0u8; 4];
        loop {
            self.s.read_exact(&mut m).unwrap();
            let magic = u32::from_be_bytes(m);
            if magic == SIMPLE_REPLY_MAGIC {
                assert_eq!(
                    self.mode,
                    Mode::Simple,
                    "simple reply after structured negotiation"
                );
                let mut b = [0u8; 12];
                self.s.read_exact(&mut b).unwrap();
                r.error = u32::from_be_bytes(b[0..4].try_into().unwrap());
                r.handle = u64::from_be_bytes(b[4..12].try_into().unwrap());
                if let Some(len) = self.reads.remove(&r.handle) {
                    if r.error == 0 {
                        r.data = vec![0u8; len as usize];
                        self.s.read_exact(&mut r.data).unwrap();
                    }
                }
                return r;
            }
            let (flags, ty, len) = if magic == STRUCTURED_REPLY_MAGIC {
                assert_eq!(self.mode, Mode::Structured);
                let mut b = [0u8; 16];
                self.s.read_exact(&mut b).unwrap();
                r.handle = u64::from_be_bytes(b[4..12].try_into().unwrap());
                (
                    u16::from_be_bytes([b[0], b[1]]),
                    u16::from_be_bytes([b[2], b[3]]),
                    u64::from(u32::from_be_bytes(b[12..16].try_into().unwrap())),
                )
            } else if magic == EXTENDED_REPLY_MAGIC {
                assert_eq!(self.mode, Mode::Extended);
                let mut b = [0u8; 28];
                self.s.read_exact(&mut b).unwrap();
                r.handle = u64::from_be_bytes(b[4..12].try_into().unwrap());
                (
                    u16::from_be_bytes([b[0], b[1]]),
                    u16::from_be_bytes([b[2], b[3]]),
                    u64::from_be_bytes(b[20..28].try_into().unwrap()),
                )
            } else {
                panic!("bad reply magic {magic:#x}");
            };
            let mut p = vec![0u8; len as usize];
            self.s.read_exact(&mut p).unwrap();
            r.chunks.push(ty);
            match ty {
                REPLY_TYPE_NONE => {}
                REPLY_TYPE_OFFSET_DATA => r.data.extend_from_slice(&p[8..]),
                REPLY_TYPE_ERROR => r.error = u32::from_be_bytes(p[0..4].try_into().unwrap()),
                REPLY_TYPE_BLOCK_STATUS => {
                    for c in p[4..].chunks(8) {
                        r.extents.push((
                            u64::from(u32::from_be_bytes(c[0..4].try_into().unwrap())),
                            u32::from_be_bytes(c[4..8].try_into().unwrap()),
                        ));
                    }
                }
                REPLY_TYPE_BLOCK_STATUS_EXT => {
                    for c in p[8..].chunks(16) {
                        r.extents.push((
                            u64::from_be_bytes(c[0..8].try_into().unwrap()),
                            u64::from_be_bytes(c[8..16].try_into().unwrap()) as u32,
                        ));
                    }
                }
                other => panic!("unexpected chunk type {other}"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                self.reads.remove(&r.handle);
                return r;
            }
        }
    }

    /// Sends one request and waits for its reply.
    pub fn call(&mut self, kind: u16, flags: u16, offset: u64, len: u64, payload: &[u8]) -> Reply {
        let h = self.send(kind, flags, offset, len, payload);
        let r = self.recv();
        assert_eq!(r.handle, h);
        r
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.call(CMD_WRITE, 0, offset, data.len() as u64, data)
            .error
    }

    pub fn read(&mut self, offset: u64, len: u64) -> Result<Vec<u8>, u32> {
        let r = self.call(CMD_READ, 0, offset, len, &[]);
        if r.error == 0 {
            Ok(r.data)
        } else {
            Err(r.error)
        }
    }

    pub fn disconnect(mut self) {
        self.send(CMD_DISC, 0, 0, 0, &[]);
        assert_closed(&mut self.s);
    }
}

/// A sink that records every call in order.
#[derive(Default)]
pub struct RecordingSink {
    pub log: Mutex<Vec<Event>>,
    next: Mutex<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Begin {
        offset: u64,
        len: u64,
        cookie: u64,
    },
    Write {
        offset: u64,
        len: u64,
        cookie: u64,
        first: u8,
    },
    Zero {
        offset: u64,
        len: u64,
        cookie: u64,
    },
    Abort {
        offset: u64,
        len: u64,
        cookie: u64,
    },
    Read(u64),
}

impl ChangeSink for RecordingSink {
    fn begin(&self, offset: u64, len: u64) -> WriteTicket {
        let mut n = self.next.lock().unwrap();
        *n += 1;
        let cookie = *n;
        self.log.lock().unwrap().push(Event::Begin {
            offset,
            len,
            cookie,
        });
        WriteTicket {
            offset,
            len,
            cookie,
        }
    }
    fn complete_write(&self, t: WriteTicket, data: &[u8]) {
        assert_eq!(data.len() as u64, t.len);
        self.log.lock().unwrap().push(Event::Write {
            offset: t.offset,
            len: t.len,
            cookie: t.cookie,
            first: data.first().copied().unwrap_or(0),
        });
    }
    fn complete_zero(&self, t: WriteTicket) {
        self.log.lock().unwrap().push(Event::Zero {
            offset: t.offset,
            len: t.len,
            cookie: t.cookie,
        });
    }
    fn abort(&self, t: WriteTicket) {
        self.log.lock().unwrap().push(Event::Abort {
            offset: t.offset,
            len: t.len,
            cookie: t.cookie,
        });
    }
    fn note_read(&self, len: u64) {
        self.log.lock().unwrap().push(Event::Read(len));
    }
}
