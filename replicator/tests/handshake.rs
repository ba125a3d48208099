//! Handshake over a real TLS connection on loopback: acceptance, and the
//! refusals (wrong generation, wrong UUID, block size, protocol version)
//! reaching the source as typed errors with the target's message.

use std::net::TcpListener;
use std::path::PathBuf;
use std::thread;

use replicator::handshake::{self, HandshakeError, KnownVolume, Negotiated, Refusal};
use replicator::pki::{self, CertKind};
use replicator::tls::{self, ClientTls, ServerTls};
use replicator::wire::{
    self, ErrorCode, Frame, Hello, Welcome, WireError, DEFAULT_MAX_FRAME, HEADER_LEN,
    PROTOCOL_VERSION,
};

fn hello() -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        max_frame: 16 << 20,
        volume_name: "vol-a".into(),
        volume_uuid: [0xab; 16],
        generation: 5,
        size: 1 << 30,
        block_size: 4096,
        source_host: "src-01".into(),
    }
}

fn known() -> KnownVolume {
    KnownVolume {
        uuid: [0xab; 16],
        generation: 5,
        block_size: 4096,
    }
}

fn welcome() -> Welcome {
    Welcome {
        accepted: true,
        protocol_version: 0, // filled in by server_accept
        max_frame: 0,        // idem
        durable_seq: 41,
        applied_seq: 40,
        replica_size: 1 << 30,
        resync: None,
    }
}

struct Certs {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

fn certs() -> Certs {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    pki::init_ca(&dir, false).unwrap();
    pki::issue(&dir, "localhost", CertKind::Server, false).unwrap();
    pki::issue(&dir, "src-01", CertKind::Client, false).unwrap();
    Certs { _tmp: tmp, dir }
}

/// Runs a target that knows `known` and a source sending `h`, over TLS.
fn run(
    c: &Certs,
    h: Hello,
    known: KnownVolume,
) -> (
    Result<Welcome, HandshakeError>,
    Result<(Hello, Welcome), HandshakeError>,
) {
    let d = &c.dir;
    let scfg = ServerTls::from_pem(
        &d.join("ca.pem"),
        &d.join("localhost.pem"),
        &d.join("localhost.key"),
        vec!["src-01".into()],
    )
    .unwrap();
    let ccfg = ClientTls::from_pem(
        &d.join("ca.pem"),
        &d.join("src-01.pem"),
        &d.join("src-01.key"),
    )
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let srv = thread::spawn(move || {
        let mut t = tls::accept(&listener, &scfg).unwrap();
        handshake::server_accept(&mut t, |h| {
            handshake::check_known(&known, h)?;
            Ok(welcome())
        })
    });
    let mut t = tls::connect(&addr, "localhost", &ccfg).unwrap();
    let cres = handshake::client_hello(&mut t, &h);
    (cres, srv.join().unwrap())
}

#[test]
fn accepted_pair_negotiates() {
    let c = certs();
    let (cres, sres) = run(&c, hello(), known());
    let w = cres.unwrap();
    assert!(w.accepted);
    assert_eq!(w.durable_seq, 41);
    assert_eq!(w.protocol_version, PROTOCOL_VERSION);
    assert_eq!(w.max_frame, DEFAULT_MAX_FRAME);
    let (h, w2) = sres.unwrap();
    assert_eq!(h, hello());
    assert_eq!(w2, w);
    let n = Negotiated::from(&h, &w);
    assert_eq!(n.max_frame, 16 << 20);
}

fn expect_refused(r: Result<Welcome, HandshakeError>, code: ErrorCode, words: &str) {
    match r {
        Err(HandshakeError::Refused { code: c, message }) => {
            assert_eq!(c, code, "{message}");
            assert!(message.contains(words), "{message:?} lacks {words:?}");
            eprintln!("refused as expected: {c:?}: {message}");
        }
        other => panic!("expected refusal {code:?}, got {other:?}"),
    }
}

#[test]
fn wrong_generation_is_refused() {
    let c = certs();
    let mut h = hello();
    h.generation = 6;
    let (cres, sres) = run(&c, h, known());
    expect_refused(cres, ErrorCode::GenerationMismatch, "split brain");
    assert!(matches!(
        sres,
        Err(HandshakeError::RefusedPeer(Refusal {
            code: ErrorCode::GenerationMismatch,
            ..
        }))
    ));
}

#[test]
fn wrong_uuid_is_refused() {
    let c = certs();
    let mut h = hello();
    h.volume_uuid = [0xcd; 16];
    let (cres, _) = run(&c, h, known());
    expect_refused(cres, ErrorCode::UuidMismatch, "cdcdcdcd");
}

#[test]
fn block_size_mismatch_is_refused() {
    let c = certs();
    let mut h = hello();
    h.block_size = 65536;
    let (cres, _) = run(&c, h, known());
    expect_refused(cres, ErrorCode::BlockSizeMismatch, "65536");
    // And a block size that is not a power of two, whatever the target knows.
    let mut h = hello();
    h.block_size = 5000;
    let (cres, _) = run(&c, h, known());
    expect_refused(cres, ErrorCode::BlockSizeMismatch, "power of two");
}

#[test]
fn unsupported_protocol_version_is_refused() {
    let c = certs();
    let mut h = hello();
    h.protocol_version = PROTOCOL_VERSION + 1;
    let (cres, _) = run(&c, h, known());
    expect_refused(
        cres,
        ErrorCode::UnsupportedVersion,
        &format!("version {}", PROTOCOL_VERSION + 1),
    );
    // A source of the previous version (no consistency horizon in its chunks) too.
    let mut h = hello();
    h.protocol_version = PROTOCOL_VERSION - 1;
    let (cres, _) = run(&c, h, known());
    expect_refused(
        cres,
        ErrorCode::UnsupportedVersion,
        &format!("version {}", PROTOCOL_VERSION - 1),
    );
}

/// A future source whose frames carry the next header version: the target
/// answers with an Error frame the source can read.
#[test]
fn future_frame_version_gets_a_readable_refusal() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let srv = thread::spawn(move || {
        let mut t = tls::accept(&listener, &ServerTls::insecure()).unwrap();
        handshake::server_accept(&mut t, |_| Ok(welcome()))
    });
    let mut t = tls::connect(&addr, "localhost", &ClientTls::insecure()).unwrap();
    let mut b = Frame::Hello(hello()).encode(DEFAULT_MAX_FRAME).unwrap();
    b[4] = (PROTOCOL_VERSION + 1) as u8;
    std::io::Write::write_all(&mut t, &b).unwrap();
    match wire::read_frame(&mut t, DEFAULT_MAX_FRAME).unwrap() {
        Frame::Error(e) => {
            assert_eq!(e.code, ErrorCode::UnsupportedVersion);
            let v = format!("version {}", PROTOCOL_VERSION + 1);
            assert!(e.message.contains(&v), "{}", e.message);
        }
        f => panic!("{f:?}"),
    }
    assert!(matches!(
        srv.join().unwrap(),
        Err(HandshakeError::RefusedPeer(_))
    ));
    assert!(b.len() > HEADER_LEN);
}

#[test]
fn first_frame_must_be_hello() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let srv = thread::spawn(move || {
        let mut t = tls::accept(&listener, &ServerTls::insecure()).unwrap();
        handshake::server_accept(&mut t, |_| Ok(welcome()))
    });
    let mut t = tls::connect(&addr, "localhost", &ClientTls::insecure()).unwrap();
    let hb = Frame::Heartbeat(wire::Heartbeat { time_ns: 1 });
    wire::write_frame(&mut t, &hb, DEFAULT_MAX_FRAME).unwrap();
    match wire::read_frame(&mut t, DEFAULT_MAX_FRAME).unwrap() {
        Frame::Error(e) => assert_eq!(e.code, ErrorCode::ProtocolViolation),
        f => panic!("{f:?}"),
    }
    assert!(matches!(
        srv.join().unwrap(),
        Err(HandshakeError::Unexpected { .. })
    ));
    // And garbage gets a BadFrame error.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let srv = thread::spawn(move || {
        let mut t = tls::accept(&listener, &ServerTls::insecure()).unwrap();
        handshake::server_accept(&mut t, |_| Ok(welcome()))
    });
    let mut t = tls::connect(&addr, "localhost", &ClientTls::insecure()).unwrap();
    std::io::Write::write_all(&mut t, &[0u8; HEADER_LEN]).unwrap();
    match wire::read_frame(&mut t, DEFAULT_MAX_FRAME).unwrap() {
        Frame::Error(e) => assert_eq!(e.code, ErrorCode::BadFrame),
        f => panic!("{f:?}"),
    }
    assert!(matches!(
        srv.join().unwrap(),
        Err(HandshakeError::Wire(WireError::BadMagic(_)))
    ));
}

#[test]
fn check_known_is_pure() {
    assert!(handshake::check_known(&known(), &hello()).is_ok());
    assert!(handshake::check_hello(&hello()).is_ok());
    let mut h = hello();
    h.max_frame = 1000;
    assert_eq!(
        handshake::check_hello(&h).unwrap_err().code,
        ErrorCode::ProtocolViolation
    );
}
