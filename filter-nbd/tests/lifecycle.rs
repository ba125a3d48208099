//! Listener kinds and lifecycle: TCP (with TCP_NODELAY), a single connection
//! over a socketpair via `handle_connection`, graceful shutdown with requests
//! in flight, configuration errors.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use common::*;
use filter_nbd::proto::*;
use filter_nbd::{Backing, Export, Server, ServerError, ServerOptions};

fn backing(dir: &tempfile::TempDir, size: u64) -> (std::path::PathBuf, Arc<Backing>) {
    let p = dir.path().join("disk.img");
    std::fs::write(&p, vec![0u8; size as usize]).unwrap();
    let b = Arc::new(Backing::open(&p, false).unwrap());
    (p, b)
}

#[test]
fn tcp_listener_serves_and_shuts_down() {
    let dir = tempfile::tempdir().unwrap();
    let (p, b) = backing(&dir, 1 << 20);
    let server = Server::new(vec![Export::new("t", b)], ServerOptions::default()).unwrap();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let stop = server.shutdown_handle();
    let t = std::thread::spawn(move || server.serve_tcp_listener(l).unwrap());

    let mut s = TcpStream::connect(addr).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], &NBDMAGIC.to_be_bytes());
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut o = Vec::new();
    o.extend_from_slice(&IHAVEOPT.to_be_bytes());
    o.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    o.extend_from_slice(&1u32.to_be_bytes());
    o.extend_from_slice(b"t");
    s.write_all(&o).unwrap();
    let mut e = [0u8; 10];
    s.read_exact(&mut e).unwrap();
    assert_eq!(u64::from_be_bytes(e[..8].try_into().unwrap()), 1 << 20);
    let mut r = Vec::new();
    encode_request(
        &mut r,
        &Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            handle: 5,
            offset: 512,
            len: 4,
        },
        false,
    );
    r.extend_from_slice(b"abcd");
    s.write_all(&r).unwrap();
    let mut rep = [0u8; 16];
    s.read_exact(&mut rep).unwrap();
    assert_eq!(&rep[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
    assert_eq!(&rep[4..8], &0u32.to_be_bytes());
    assert_eq!(&rep[8..16], &5u64.to_be_bytes());
    assert_eq!(&std::fs::read(&p).unwrap()[512..516], b"abcd");
    stop.shutdown();
    // The connection is closed by the shutdown, and serve_tcp_listener returns.
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    t.join().unwrap();
}

#[test]
fn handle_connection_over_a_socketpair() {
    let dir = tempfile::tempdir().unwrap();
    let (p, b) = backing(&dir, 1 << 20);
    let server = Server::new(vec![Export::new("", b)], ServerOptions::default()).unwrap();
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || server.handle_connection(ours));
    let mut s = theirs;
    greet(&mut s);
    send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(read_opt_reply(&mut s).1, REP_ACK);
    send_opt(&mut s, OPT_GO, &info_data("", &[]));
    loop {
        let (_, ty, _) = read_opt_reply(&mut s);
        if ty == REP_ACK {
            break;
        }
        assert_eq!(ty, REP_INFO);
    }
    let mut b = Vec::new();
    encode_request(
        &mut b,
        &Request {
            flags: 0,
            kind: CMD_WRITE,
            handle: 1,
            offset: 0,
            len: 3,
        },
        false,
    );
    b.extend_from_slice(b"xyz");
    encode_request(
        &mut b,
        &Request {
            flags: 0,
            kind: CMD_FLUSH,
            handle: 2,
            offset: 0,
            len: 0,
        },
        false,
    );
    encode_request(
        &mut b,
        &Request {
            flags: 0,
            kind: CMD_DISC,
            handle: 3,
            offset: 0,
            len: 0,
        },
        false,
    );
    s.write_all(&b).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    assert_eq!(all.len(), 40, "two NONE chunks then close");
    assert!(t.join().unwrap().is_ok());
    assert_eq!(&std::fs::read(&p).unwrap()[..3], b"xyz");
}

#[test]
fn shutdown_completes_in_flight_requests() {
    let f = serve_one(8 << 20);
    let mut c = Client::go(&f.sock, "vol", Mode::Structured, false);
    let n = 32;
    for i in 0..n {
        c.send(CMD_WRITE, 0, i * 65536, 65536, &vec![i as u8 + 1; 65536]);
    }
    std::thread::sleep(std::time::Duration::from_millis(20));
    f.stop.shutdown();
    // Every request that was sent before the stop is served and replied
    // before the close.
    let mut ok = 0;
    for _ in 0..n {
        let r = c.recv();
        assert_eq!(r.error, 0, "error {}", r.error);
        ok += 1;
    }
    assert_eq!(ok, n);
    assert_closed(&mut c.s);
}

#[test]
fn configuration_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (_, b) = backing(&dir, 4096);
    assert!(matches!(
        Server::new(vec![], ServerOptions::default()),
        Err(ServerError::Config(_))
    ));
    let dup = vec![Export::new("a", b.clone()), Export::new("a", b.clone())];
    assert!(matches!(
        Server::new(dup, ServerOptions::default()),
        Err(ServerError::Config(_))
    ));
    let long = vec![Export::new("x".repeat(5000), b.clone())];
    assert!(matches!(
        Server::new(long, ServerOptions::default()),
        Err(ServerError::Config(_))
    ));
    let e = Export::new("ro", b).with_read_only(true);
    assert!(e.is_read_only());
}

/// Shutdown must stop an idle accept loop even when the socket path was
/// removed meanwhile (it used to wake `accept` by connecting to that path,
/// so the server hung forever), and the listening port must be released.
#[test]
fn shutdown_stops_an_idle_listener_whose_socket_file_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (_, b) = backing(&dir, 1 << 20);
    let sock = dir.path().join("nbd.sock");
    let server = Server::new(vec![Export::new("t", b.clone())], ServerOptions::default()).unwrap();
    let stop = server.shutdown_handle();
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || done_tx.send(server.serve_unix_listener(l).is_ok()));
    std::thread::sleep(std::time::Duration::from_millis(100));
    std::fs::remove_file(&sock).unwrap();
    stop.shutdown();
    let ok = done_rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("serve_unix_listener did not return after shutdown");
    assert!(ok);

    let server = Server::new(vec![Export::new("t", b)], ServerOptions::default()).unwrap();
    let stop = server.shutdown_handle();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || done_tx.send(server.serve_tcp_listener(l).is_ok()));
    std::thread::sleep(std::time::Duration::from_millis(100));
    stop.shutdown();
    let ok = done_rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("serve_tcp_listener did not return after shutdown");
    assert!(ok);
    // The port is free again: nothing kept a copy of the listening socket.
    std::net::TcpListener::bind(addr).expect("the port is released after shutdown");
}

/// Requests a client had already sent when the server began to shut down
/// (still queued in the socket) are served, not failed with ESHUTDOWN: this
/// is the kernel device handed over to a new agent (`Attached::abandon`),
/// where a failed reply is an I/O error for an application write.
#[test]
fn requests_queued_before_shutdown_are_served_not_failed() {
    let dir = tempfile::tempdir().unwrap();
    let (p, b) = backing(&dir, 1 << 20);
    let server = Server::new(vec![Export::new("t", b)], ServerOptions::default()).unwrap();
    let (ours, mut client) = std::os::unix::net::UnixStream::pair().unwrap();
    let n = 16u64;
    let mut wire = Vec::new();
    for i in 0..n {
        encode_request(
            &mut wire,
            &Request {
                flags: 0,
                kind: CMD_WRITE,
                handle: 100 + i,
                offset: i * 4096,
                len: 4096,
            },
            false,
        );
        wire.extend_from_slice(&[i as u8 + 1; 4096]);
    }
    client.write_all(&wire).unwrap();
    // The stop comes before the server read any of them.
    server.shutdown_handle().shutdown();
    server.handle_pre_negotiated(ours, 0).unwrap();
    let mut replies = Vec::new();
    client.read_to_end(&mut replies).unwrap();
    assert_eq!(replies.len() as u64, 16 * n, "one simple reply per request");
    for (i, r) in replies.chunks(16).enumerate() {
        let error = u32::from_be_bytes(r[4..8].try_into().unwrap());
        let handle = u64::from_be_bytes(r[8..16].try_into().unwrap());
        assert_eq!(handle, 100 + i as u64);
        assert_eq!(error, 0, "request {i} failed with errno {error}");
    }
    let img = std::fs::read(&p).unwrap();
    for i in 0..n as usize {
        assert!(
            img[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&x| x == i as u8 + 1),
            "block {i}"
        );
    }
}
