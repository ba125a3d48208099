//! TLS on loopback with real certificates from `pki`: mutual authentication
//! works; every refusal happens in the TLS handshake, before the server has
//! read a single frame. Only 127.0.0.1 is ever connected to.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use replicator::pki::{self, CertKind};
use replicator::tls::{self, ClientTls, ServerTls, Timeouts, TlsError};
use replicator::wire::{self, Frame, Heartbeat, DEFAULT_MAX_FRAME as MAX};

struct Pki {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    other: PathBuf,
}

/// A CA with a server cert for `localhost`/127.0.0.1, client certs `src-01`
/// and `src-02`; and another CA with its own `src-01`.
fn pki() -> Pki {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let other = tmp.path().join("other");
    pki::init_ca(&dir, false).unwrap();
    pki::issue_with_names(
        &dir,
        "localhost",
        &["127.0.0.1".into()],
        CertKind::Server,
        false,
    )
    .unwrap();
    pki::issue(&dir, "src-01", CertKind::Client, false).unwrap();
    pki::issue(&dir, "src-02", CertKind::Both, false).unwrap();
    pki::init_ca(&other, false).unwrap();
    pki::issue(&other, "src-01", CertKind::Client, false).unwrap();
    Pki {
        _tmp: tmp,
        dir,
        other,
    }
}

fn p(dir: &Path, f: &str) -> PathBuf {
    dir.join(f)
}

fn server_cfg(k: &Pki, allowed: &[&str]) -> ServerTls {
    let mut s = ServerTls::from_pem(
        &p(&k.dir, "ca.pem"),
        &p(&k.dir, "localhost.pem"),
        &p(&k.dir, "localhost.key"),
        allowed.iter().map(|s| s.to_string()).collect(),
    )
    .unwrap();
    s.timeouts = Timeouts {
        connect: Duration::from_secs(5),
        io: Duration::from_secs(5),
    };
    s
}

fn client_cfg(ca_dir: &Path, cert_dir: &Path, host: &str) -> ClientTls {
    let mut c = ClientTls::from_pem(
        &p(ca_dir, "ca.pem"),
        &p(cert_dir, &format!("{host}.pem")),
        &p(cert_dir, &format!("{host}.key")),
    )
    .unwrap();
    c.timeouts = Timeouts {
        connect: Duration::from_secs(5),
        io: Duration::from_secs(5),
    };
    c
}

struct Server {
    addr: SocketAddr,
    frames: Arc<AtomicUsize>,
    handle: JoinHandle<Result<Option<String>, TlsError>>,
}

/// Accepts one connection; if authenticated, echoes frames until EOF,
/// counting them. Returns the accept result (the peer identity on success).
fn serve_once(cfg: ServerTls) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let frames = Arc::new(AtomicUsize::new(0));
    let f2 = frames.clone();
    let handle = thread::spawn(move || {
        let mut t = tls::accept(&listener, &cfg)?;
        let id = t.peer_identity().map(str::to_owned);
        while let Ok(f) = wire::read_frame(&mut t, MAX) {
            f2.fetch_add(1, Ordering::SeqCst);
            if wire::write_frame(&mut t, &f, MAX).is_err() {
                break;
            }
        }
        Ok(id)
    });
    Server {
        addr,
        frames,
        handle,
    }
}

/// Connects and exchanges one heartbeat; returns the first error as text.
fn exchange(addr: SocketAddr, name: &str, cfg: &ClientTls) -> Result<(), String> {
    let mut t = tls::connect(&addr.to_string(), name, cfg).map_err(|e| e.to_string())?;
    let hb = Frame::Heartbeat(Heartbeat { time_ns: 77 });
    wire::write_frame(&mut t, &hb, MAX).map_err(|e| e.to_string())?;
    let back = wire::read_frame(&mut t, MAX).map_err(|e| e.to_string())?;
    assert_eq!(back, hb);
    t.close().map_err(|e| e.to_string())
}

#[test]
fn mutual_auth_works_and_identity_is_reported() {
    let k = pki();
    let srv = serve_once(server_cfg(&k, &["src-01"]));
    exchange(srv.addr, "localhost", &client_cfg(&k.dir, &k.dir, "src-01")).unwrap();
    let id = srv.handle.join().unwrap().unwrap();
    assert_eq!(id.as_deref(), Some("src-01"));
    assert_eq!(srv.frames.load(Ordering::SeqCst), 1);

    // By IP address SAN, and with an empty allow list (any cert of the CA).
    let srv = serve_once(server_cfg(&k, &[]));
    exchange(srv.addr, "127.0.0.1", &client_cfg(&k.dir, &k.dir, "src-02")).unwrap();
    assert_eq!(srv.handle.join().unwrap().unwrap(), None);
    assert_eq!(srv.frames.load(Ordering::SeqCst), 1);
}

/// Runs a refused case: the server's accept must fail with an error
/// containing `server_says`, the client must fail, and no frame was read.
fn refused(
    srv: Server,
    client: impl FnOnce(SocketAddr) -> Result<(), String>,
    server_says: &str,
) -> String {
    let cres = client(srv.addr);
    let sres = srv.handle.join().unwrap();
    let serr = sres
        .expect_err("server accepted a peer it must refuse")
        .to_string();
    assert!(
        serr.contains(server_says),
        "server error {serr:?} lacks {server_says:?}"
    );
    assert_eq!(
        srv.frames.load(Ordering::SeqCst),
        0,
        "a frame was read from a refused peer"
    );
    let cerr = cres.expect_err("client succeeded against a refusing server");
    eprintln!("server: {serr}\nclient: {cerr}");
    cerr
}

#[test]
fn client_without_certificate_is_refused() {
    let k = pki();
    let srv = serve_once(server_cfg(&k, &[]));
    let cfg = ClientTls::without_client_cert(&p(&k.dir, "ca.pem")).unwrap();
    let cerr = refused(
        srv,
        |a| exchange(a, "localhost", &cfg),
        "peer sent no certificates",
    );
    assert!(
        cerr.contains("CertificateRequired") || cerr.contains("alert"),
        "{cerr}"
    );
}

#[test]
fn client_certificate_from_another_ca_is_refused() {
    let k = pki();
    let srv = serve_once(server_cfg(&k, &["src-01"]));
    // Trusts the right CA for the server, presents a cert of the other CA.
    let cfg = client_cfg(&k.dir, &k.other, "src-01");
    let cerr = refused(srv, |a| exchange(a, "localhost", &cfg), "UnknownIssuer");
    assert!(cerr.contains("alert"), "{cerr}");
}

#[test]
fn server_certificate_for_wrong_host_is_refused() {
    let k = pki();
    let srv = serve_once(server_cfg(&k, &[]));
    let cfg = client_cfg(&k.dir, &k.dir, "src-01");
    let cerr = refused(srv, |a| exchange(a, "target.example", &cfg), "alert");
    assert!(cerr.contains("not valid for name"), "{cerr}");
    assert!(
        cerr.starts_with("TLS handshake"),
        "client must fail in connect: {cerr}"
    );
}

#[test]
fn server_from_another_ca_is_refused() {
    let k = pki();
    let srv = serve_once(server_cfg(&k, &[]));
    // The client trusts only the other CA.
    let cfg = client_cfg(&k.other, &k.other, "src-01");
    let cerr = refused(srv, |a| exchange(a, "localhost", &cfg), "alert");
    assert!(cerr.contains("UnknownIssuer"), "{cerr}");
}

#[test]
fn client_identity_not_allowed_is_refused() {
    let k = pki();
    let srv = serve_once(server_cfg(&k, &["src-02", "10.0.0.9"]));
    let cfg = client_cfg(&k.dir, &k.dir, "src-01");
    refused(
        srv,
        |a| exchange(a, "localhost", &cfg),
        "not in the allowed list",
    );
}

#[test]
fn plaintext_client_against_tls_server_is_refused() {
    let k = pki();
    let srv = serve_once(server_cfg(&k, &[]));
    refused(
        srv,
        |a| exchange(a, "localhost", &ClientTls::insecure()),
        "TLS handshake",
    );
}

#[test]
fn silent_client_times_out() {
    let k = pki();
    let mut cfg = server_cfg(&k, &[]);
    cfg.timeouts.io = Duration::from_millis(300);
    let srv = serve_once(cfg);
    let t0 = Instant::now();
    let _s = TcpStream::connect(srv.addr).unwrap();
    let e = srv.handle.join().unwrap().unwrap_err();
    assert!(e.to_string().contains("timed out"), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "handshake not bounded by the timeout"
    );
    assert_eq!(srv.frames.load(Ordering::SeqCst), 0);
    eprintln!("{e}");
}

#[test]
fn insecure_mode_only_on_loopback() {
    // Refused before any connection attempt (TEST-NET and unspecified
    // addresses are never contacted: the check runs on the parsed address).
    for addr in ["192.0.2.1:9", "[2001:db8::1]:9", "0.0.0.0:9"] {
        let e = tls::connect(addr, "x", &ClientTls::insecure()).unwrap_err();
        assert!(matches!(e, TlsError::InsecureNotLoopback(_)), "{addr}: {e}");
        assert!(tls::resolve(addr, true).is_err());
    }
    assert!(tls::check_insecure_listener(&"0.0.0.0:1".parse().unwrap()).is_err());
    assert!(tls::check_insecure_listener(&"127.0.0.1:1".parse().unwrap()).is_ok());
    assert!(tls::is_loopback("::1".parse().unwrap()));
    assert!(tls::is_loopback("::ffff:127.0.0.1".parse().unwrap()));
    assert!(!tls::is_loopback("::ffff:10.0.0.1".parse().unwrap()));

    // On loopback it works, both ways, and is reported as plaintext.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = thread::spawn(move || {
        let mut t = tls::accept(&listener, &ServerTls::insecure()).unwrap();
        assert!(!t.is_tls());
        let f = wire::read_frame(&mut t, MAX).unwrap();
        wire::write_frame(&mut t, &f, MAX).unwrap();
    });
    exchange(addr, "localhost", &ClientTls::insecure()).unwrap();
    h.join().unwrap();
}

#[test]
fn pki_refuses_overwrite_and_protects_keys() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ca = pki::init_ca(d, false).unwrap();
    assert_eq!(
        std::fs::metadata(&ca.key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(matches!(
        pki::init_ca(d, false),
        Err(pki::PkiError::Exists(_))
    ));
    let h = pki::issue(d, "tgt.example", CertKind::Server, false).unwrap();
    assert_eq!(
        std::fs::metadata(&h.key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(matches!(
        pki::issue(d, "tgt.example", CertKind::Server, false),
        Err(pki::PkiError::Exists(_))
    ));
    pki::issue(d, "tgt.example", CertKind::Server, true).unwrap();
    assert!(matches!(
        pki::issue(d, "../evil", CertKind::Server, false),
        Err(pki::PkiError::HostName(_))
    ));
    assert!(matches!(
        pki::issue(d, "", CertKind::Server, false),
        Err(pki::PkiError::HostName(_))
    ));
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        pki::issue(empty.path(), "h", CertKind::Client, false),
        Err(pki::PkiError::NoCa { .. })
    ));
    // Loading garbage PEM is a clear error.
    std::fs::write(d.join("bad.pem"), "not a pem").unwrap();
    assert!(matches!(
        tls::load_certs(&d.join("bad.pem")),
        Err(TlsError::Pem { .. })
    ));
}

#[test]
fn refused_source_gets_a_typed_handshake_error() {
    use replicator::handshake::{self, HandshakeError};
    let k = pki();
    let srv = serve_once(server_cfg(&k, &["src-02"]));
    let cfg = client_cfg(&k.dir, &k.dir, "src-01");
    // TLS 1.3: the client's handshake completes before the server has
    // judged its certificate; the refusal arrives as an alert on first read.
    let mut t = tls::connect(&srv.addr.to_string(), "localhost", &cfg).unwrap();
    let hello = replicator::wire::Hello {
        protocol_version: 1,
        max_frame: MAX,
        volume_name: "v".into(),
        volume_uuid: [1; 16],
        generation: 1,
        size: 1 << 20,
        block_size: 4096,
        source_host: "src-01".into(),
    };
    let e = handshake::client_hello(&mut t, &hello).unwrap_err();
    assert!(matches!(e, HandshakeError::TlsRefused(_)), "{e}");
    eprintln!("{e}");
    assert!(srv.handle.join().unwrap().is_err());
    assert_eq!(srv.frames.load(Ordering::SeqCst), 0);
}

#[test]
fn transport_is_send() {
    fn assert_send<T: Send + std::io::Read + std::io::Write>() {}
    assert_send::<tls::Transport>();
}

#[test]
fn expired_client_certificate_is_refused() {
    let k = pki();
    let opts = pki::IssueOptions {
        extra_names: vec![],
        kind: CertKind::Client,
        days: -2,
        force: false,
    };
    pki::issue_with(&k.dir, "old-src", &opts).unwrap();
    let srv = serve_once(server_cfg(&k, &[]));
    let cfg = client_cfg(&k.dir, &k.dir, "old-src");
    refused(
        srv,
        |a| exchange(a, "localhost", &cfg),
        "certificate expired",
    );
}
