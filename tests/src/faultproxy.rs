//! A loopback TCP proxy that injects link faults on command: cut every
//! connection (and optionally refuse new ones), stall (stop forwarding while
//! keeping the connections open), or slow to a byte rate. Used between
//! `rewind replicator` and `rewind target` in the link-fault tests.
//!
//! ```no_run
//! # use rewind_tests::faultproxy::FaultProxy;
//! let p = FaultProxy::start("127.0.0.1:7700".parse().unwrap());
//! // point the replicator at p.addr() ...
//! p.stall();
//! p.resume();
//! p.slow(1_000_000);
//! p.cut(true);   // reset all connections and refuse new ones
//! p.resume();    // accept again, no limit
//! ```

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// What the proxy does to the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Forward nothing; connections stay open.
    Stall,
    /// Forward at most this many bytes per second in each direction.
    Slow(u64),
    /// Connections are closed as soon as they are accepted.
    Down,
}

struct Shared {
    mode: Mutex<Mode>,
    /// Incremented by `cut`: pumps of older generations close their sockets.
    generation: AtomicU64,
    stop: AtomicBool,
    forwarded: AtomicU64,
    accepted: AtomicU64,
    conns: Mutex<Vec<(u64, TcpStream, TcpStream)>>,
}

/// The proxy; stops (and closes every connection) on drop.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

const POLL: Duration = Duration::from_millis(20);

impl FaultProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Pass),
            generation: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            forwarded: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            conns: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let acceptor = thread::spawn(move || accept_loop(listener, upstream, sh));
        FaultProxy {
            addr,
            shared,
            acceptor: Some(acceptor),
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.shared.mode.lock().unwrap()
    }

    fn set(&self, m: Mode) {
        *self.shared.mode.lock().unwrap() = m;
    }

    /// Forward normally again (after a stall, a slow-down or a cut).
    pub fn resume(&self) {
        self.set(Mode::Pass);
    }

    /// Stop forwarding, keep the connections open (a black-holed link).
    pub fn stall(&self) {
        self.set(Mode::Stall);
    }

    /// Limit each direction of each connection to `bytes_per_sec`.
    pub fn slow(&self, bytes_per_sec: u64) {
        self.set(Mode::Slow(bytes_per_sec.max(1)));
    }

    /// Reset every open connection; with `keep_down`, refuse new ones until
    /// [`resume`](Self::resume).
    pub fn cut(&self, keep_down: bool) {
        if keep_down {
            self.set(Mode::Down);
        }
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        let conns = std::mem::take(&mut *self.shared.conns.lock().unwrap());
        for (_, a, b) in conns {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    /// Bytes forwarded so far (both directions).
    pub fn forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::Relaxed)
    }

    /// Connections accepted so far (including refused ones in `Down`).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.cut(true);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

fn accept_loop(listener: TcpListener, upstream: SocketAddr, sh: Arc<Shared>) {
    while !sh.stop.load(Ordering::SeqCst) {
        let (client, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(POLL);
                continue;
            }
            Err(_) => {
                thread::sleep(POLL);
                continue;
            }
        };
        sh.accepted.fetch_add(1, Ordering::Relaxed);
        if *sh.mode.lock().unwrap() == Mode::Down {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        }
        let _ = client.set_nonblocking(false);
        let server = match TcpStream::connect_timeout(&upstream, Duration::from_secs(2)) {
            Ok(s) => s,
            Err(_) => {
                let _ = client.shutdown(Shutdown::Both);
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let gen = sh.generation.load(Ordering::SeqCst);
        let (c2, s2) = match (client.try_clone(), server.try_clone()) {
            (Ok(c), Ok(s)) => (c, s),
            _ => continue,
        };
        if let (Ok(c3), Ok(s3)) = (client.try_clone(), server.try_clone()) {
            sh.conns.lock().unwrap().push((gen, c3, s3));
        }
        let a = sh.clone();
        thread::spawn(move || pump(client, server, gen, a));
        let b = sh.clone();
        thread::spawn(move || pump(s2, c2, gen, b));
    }
}

/// Copies `from` to `to` under the current mode until EOF, an error, a cut
/// or the proxy's end; then closes both directions.
fn pump(mut from: TcpStream, mut to: TcpStream, gen: u64, sh: Arc<Shared>) {
    let _ = from.set_read_timeout(Some(POLL));
    let mut buf = vec![0u8; 64 * 1024];
    let alive = |sh: &Shared| {
        !sh.stop.load(Ordering::SeqCst) && sh.generation.load(Ordering::SeqCst) == gen
    };
    'outer: while alive(&sh) {
        let mode = *sh.mode.lock().unwrap();
        let max = match mode {
            Mode::Stall | Mode::Down => {
                thread::sleep(POLL);
                continue;
            }
            Mode::Slow(rate) => ((rate / 20) as usize).clamp(1, buf.len()),
            Mode::Pass => buf.len(),
        };
        let n = match from.read(&mut buf[..max]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        let started = Instant::now();
        let mut off = 0;
        while off < n {
            if !alive(&sh) {
                break 'outer;
            }
            // A stall that begins mid-buffer holds the rest back too.
            let mode = *sh.mode.lock().unwrap();
            if matches!(mode, Mode::Stall | Mode::Down) {
                thread::sleep(POLL);
                continue;
            }
            match to.write(&buf[off..n]) {
                Ok(0) => break 'outer,
                Ok(w) => off += w,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break 'outer,
            }
        }
        sh.forwarded.fetch_add(n as u64, Ordering::Relaxed);
        if let Mode::Slow(rate) = *sh.mode.lock().unwrap() {
            let due = Duration::from_secs_f64(n as f64 / rate as f64);
            if let Some(rest) = due.checked_sub(started.elapsed()) {
                thread::sleep(rest);
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                thread::spawn(move || {
                    let mut b = [0u8; 8192];
                    loop {
                        match s.read(&mut b) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&b[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    fn roundtrip(s: &mut TcpStream, data: &[u8]) -> std::io::Result<Vec<u8>> {
        s.write_all(data)?;
        let mut out = vec![0u8; data.len()];
        s.read_exact(&mut out)?;
        Ok(out)
    }

    #[test]
    fn passes_traffic() {
        let p = FaultProxy::start(echo_server());
        let mut s = TcpStream::connect(p.addr()).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        assert_eq!(roundtrip(&mut s, &data).unwrap(), data);
        // The proxy counts a piece after writing it on, so the echo can arrive
        // before the last count: wait briefly for it.
        let t = std::time::Instant::now();
        while p.forwarded() < 200_000 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(p.forwarded() >= 200_000, "forwarded {}", p.forwarded());
    }

    #[test]
    fn stall_holds_then_resume_delivers() {
        let p = FaultProxy::start(echo_server());
        let mut s = TcpStream::connect(p.addr()).unwrap();
        assert_eq!(roundtrip(&mut s, b"hello").unwrap(), b"hello");
        p.stall();
        s.write_all(b"world").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 5];
        let e = s.read(&mut b).unwrap_err();
        assert!(matches!(
            e.kind(),
            ErrorKind::WouldBlock | ErrorKind::TimedOut
        ));
        p.resume();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"world");
    }

    #[test]
    fn cut_resets_and_down_refuses() {
        let p = FaultProxy::start(echo_server());
        let mut s = TcpStream::connect(p.addr()).unwrap();
        assert_eq!(roundtrip(&mut s, b"x").unwrap(), b"x");
        p.cut(true);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        let r = s.write_all(b"y").and_then(|_| s.read(&mut b));
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        // Down: new connections are closed at once.
        let mut s2 = TcpStream::connect(p.addr()).unwrap();
        s2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let r = s2.write_all(b"z").and_then(|_| s2.read(&mut b));
        assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
        p.resume();
        let mut s3 = TcpStream::connect(p.addr()).unwrap();
        assert_eq!(roundtrip(&mut s3, b"back").unwrap(), b"back");
    }

    #[test]
    fn slow_limits_the_rate() {
        let p = FaultProxy::start(echo_server());
        p.slow(200_000);
        let mut s = TcpStream::connect(p.addr()).unwrap();
        let data = vec![7u8; 200_000];
        let t = Instant::now();
        assert_eq!(roundtrip(&mut s, &data).unwrap(), data);
        let secs = t.elapsed().as_secs_f64();
        // 200 kB each way at 200 kB/s, pipelined: about one second.
        assert!((0.8..3.0).contains(&secs), "took {secs} s");
    }
}
