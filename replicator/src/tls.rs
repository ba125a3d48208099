//! TLS 1.3 with mutual authentication between replicator and target
//! (rustls with the `ring` provider, blocking sockets).
//!
//! Policy (see `docs/wire-protocol.md`, "TLS policy"):
//! - TLS 1.3 only; the server requires a client certificate chaining to the
//!   configured CA, the client verifies the server's certificate against the
//!   CA and the expected host name.
//! - The server additionally checks the client's identity against an allow
//!   list: a client is accepted if its certificate is valid for one of the
//!   listed names (DNS or IP subject alternative names; the CN is not
//!   consulted, as in WebPKI). An **empty list accepts any certificate issued
//!   by the CA**. The check runs inside the certificate verifier, so a refused
//!   peer fails the TLS handshake before any frame is read.
//! - Plaintext exists only as an explicit `insecure` mode, refused unless
//!   every address involved is loopback.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, ServerConnection, SignatureScheme, StreamOwned,
};
use thiserror::Error;

/// Default TCP connect timeout.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default socket read/write timeout (also bounds the TLS handshake).
pub const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of TLS setup, connection and handshake.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Plaintext was asked for on a non-loopback address.
    #[error("insecure (plaintext) mode refused for non-loopback address {0}: use TLS")]
    InsecureNotLoopback(String),
    /// The server name is not a valid DNS name or IP address.
    #[error("invalid server name {0:?}")]
    ServerName(String),
    /// The address did not resolve.
    #[error("cannot resolve {0}")]
    Resolve(String),
    /// TCP connect / accept / socket option failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
    /// The TLS handshake failed (certificate refused, wrong host name, peer
    /// identity not allowed, protocol error...).
    #[error("TLS handshake with {peer} failed: {reason}")]
    Handshake {
        /// Peer address.
        peer: String,
        /// rustls' reason.
        reason: String,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> TlsError {
    let context = context.into();
    move |source| TlsError::Io { context, source }
}

/// Socket timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect timeout.
    pub connect: Duration,
    /// Read and write timeout of the socket (and of the handshake).
    pub io: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: DEFAULT_CONNECT_TIMEOUT,
            io: DEFAULT_IO_TIMEOUT,
        }
    }
}

/// Client (replicator, source side) configuration.
#[derive(Clone)]
pub struct ClientTls {
    mode: ClientMode,
    /// Socket timeouts.
    pub timeouts: Timeouts,
}

#[derive(Clone)]
enum ClientMode {
    Tls(Arc<ClientConfig>),
    Insecure,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            ClientMode::Tls(_) => "tls",
            ClientMode::Insecure => "insecure",
        };
        f.debug_struct("ClientTls")
            .field("mode", &mode)
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

/// Server (target side) configuration.
#[derive(Clone)]
pub struct ServerTls {
    mode: ServerMode,
    allowed: Arc<Vec<String>>,
    /// Socket timeouts.
    pub timeouts: Timeouts,
}

#[derive(Clone)]
enum ServerMode {
    Tls(Arc<ServerConfig>),
    Insecure,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.mode {
            ServerMode::Tls(_) => "tls",
            ServerMode::Insecure => "insecure",
        };
        f.debug_struct("ServerTls")
            .field("mode", &mode)
            .field("allowed", &self.allowed)
            .field("timeouts", &self.timeouts)
            .finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |reason: String| TlsError::Pem {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no certificate found".into()));
    }
    Ok(certs)
}

/// Loads the private key of a PEM file (PKCS#8, SEC1 or PKCS#1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

fn load_roots(ca: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca)? {
        roots.add(c).map_err(|e| TlsError::Pem {
            path: ca.to_owned(),
            reason: format!("not a usable CA certificate: {e}"),
        })?;
    }
    Ok(Arc::new(roots))
}

impl ClientTls {
    /// Mutual TLS: trust `ca`, present `cert` (chain, leaf first) and `key`.
    pub fn from_pem(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let roots = load_roots(ca)?;
        let chain = load_certs(cert)?;
        let key = load_key(key)?;
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        // Every connection does a full handshake with full certificate
        // verification (connections are long-lived; resumption buys nothing).
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(ClientTls {
            mode: ClientMode::Tls(Arc::new(cfg)),
            timeouts: Timeouts::default(),
        })
    }

    /// Server-authenticated TLS without a client certificate (a target with
    /// mutual authentication refuses it; useful only against a target that
    /// explicitly allows anonymous clients, and for tests).
    pub fn without_client_cert(ca: &Path) -> Result<Self, TlsError> {
        let roots = load_roots(ca)?;
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Every connection does a full handshake with full certificate
        // verification (connections are long-lived; resumption buys nothing).
        cfg.resumption = rustls::client::Resumption::disabled();
        Ok(ClientTls {
            mode: ClientMode::Tls(Arc::new(cfg)),
            timeouts: Timeouts::default(),
        })
    }

    /// Plaintext; [`connect`] refuses it unless the address is loopback.
    pub fn insecure() -> Self {
        ClientTls {
            mode: ClientMode::Insecure,
            timeouts: Timeouts::default(),
        }
    }

    /// Whether this is the plaintext mode.
    pub fn is_insecure(&self) -> bool {
        matches!(self.mode, ClientMode::Insecure)
    }
}

impl ServerTls {
    /// Mutual TLS: present `cert`/`key`, require a client certificate issued
    /// by `ca` whose subject alternative names include one of `allowed`
    /// (any certificate of the CA if `allowed` is empty).
    pub fn from_pem(
        ca: &Path,
        cert: &Path,
        key: &Path,
        allowed: Vec<String>,
    ) -> Result<Self, TlsError> {
        let roots = load_roots(ca)?;
        let chain = load_certs(cert)?;
        let key = load_key(key)?;
        let webpki = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        for name in &allowed {
            ServerName::try_from(name.as_str()).map_err(|_| TlsError::ServerName(name.clone()))?;
        }
        let allowed = Arc::new(allowed);
        let verifier = Arc::new(AllowList {
            inner: webpki,
            allowed: allowed.clone(),
        });
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        // No resumption: every client is verified (CA, validity, allow list)
        // on every connection, including after an allow-list change.
        cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
        Ok(ServerTls {
            mode: ServerMode::Tls(Arc::new(cfg)),
            allowed,
            timeouts: Timeouts::default(),
        })
    }

    /// Plaintext; [`accept`] refuses it unless the listener and the peer are
    /// loopback.
    pub fn insecure() -> Self {
        ServerTls {
            mode: ServerMode::Insecure,
            allowed: Arc::new(Vec::new()),
            timeouts: Timeouts::default(),
        }
    }

    /// The client identities allowed (empty: any certificate of the CA).
    pub fn allowed(&self) -> &[String] {
        &self.allowed
    }

    /// Whether this is the plaintext (insecure, loopback-only) mode.
    pub fn is_insecure(&self) -> bool {
        matches!(self.mode, ServerMode::Insecure)
    }
}

/// Client-certificate verifier: the CA chain check, then the allow list.
#[derive(Debug)]
struct AllowList {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Arc<Vec<String>>,
}

/// The allowed name a certificate is valid for, if any.
fn matching_name(allowed: &[String], der: &CertificateDer<'_>) -> Option<String> {
    let ee = webpki::EndEntityCert::try_from(der).ok()?;
    allowed.iter().find_map(|name| {
        let sn = ServerName::try_from(name.as_str()).ok()?;
        ee.verify_is_valid_for_subject_name(&sn)
            .ok()
            .map(|()| name.clone())
    })
}

#[derive(Debug)]
struct NotAllowed {
    presented: String,
    allowed: String,
}

impl fmt::Display for NotAllowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client certificate identity [{}] is not in the allowed list [{}]",
            self.presented, self.allowed
        )
    }
}

impl std::error::Error for NotAllowed {}

impl ClientCertVerifier for AllowList {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed.is_empty() || matching_name(&self.allowed, end_entity).is_some() {
            return Ok(ok);
        }
        let presented = webpki::EndEntityCert::try_from(end_entity)
            .map(|ee| ee.valid_dns_names().collect::<Vec<_>>().join(", "))
            .unwrap_or_default();
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Other(rustls::OtherError(Arc::new(NotAllowed {
                presented,
                allowed: self.allowed.join(", "),
            }))),
        ))
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

enum Inner {
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
    Plain(TcpStream),
}

/// An established, authenticated connection (blocking).
pub struct Transport {
    inner: Inner,
    peer: SocketAddr,
    identity: Option<String>,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.inner {
            Inner::Client(_) => "tls-client",
            Inner::Server(_) => "tls-server",
            Inner::Plain(_) => "plaintext",
        };
        f.debug_struct("Transport")
            .field("kind", &kind)
            .field("peer", &self.peer)
            .field("identity", &self.identity)
            .finish()
    }
}

impl Transport {
    /// The peer's socket address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// On the server: the allowed name the client's certificate matched
    /// (`None` with an empty allow list or in insecure mode). On the client:
    /// the server name that was verified.
    pub fn peer_identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        !matches!(self.inner, Inner::Plain(_))
    }

    fn tcp(&self) -> &TcpStream {
        match &self.inner {
            Inner::Client(s) => &s.sock,
            Inner::Server(s) => &s.sock,
            Inner::Plain(s) => s,
        }
    }

    /// Whether received input is waiting to be read right now: bytes on the
    /// socket, or (TLS) records or plaintext rustls holds. Does not block and
    /// reads nothing the next `read` would not return.
    pub fn input_waiting(&mut self) -> bool {
        let tls_buffered = match &mut self.inner {
            Inner::Client(s) => s
                .conn
                .process_new_packets()
                .is_ok_and(|st| st.plaintext_bytes_to_read() > 0),
            Inner::Server(s) => s
                .conn
                .process_new_packets()
                .is_ok_and(|st| st.plaintext_bytes_to_read() > 0),
            Inner::Plain(_) => false,
        };
        tls_buffered || socket_readable(self.tcp())
    }

    /// Changes the socket's read timeout (`None`: block forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp().set_read_timeout(t)
    }

    /// Changes the socket's write timeout (`None`: block forever).
    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.tcp().set_write_timeout(t)
    }

    /// Sends a TLS close_notify (if TLS) and shuts the socket down.
    pub fn close(mut self) -> io::Result<()> {
        match &mut self.inner {
            Inner::Client(s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
            }
            Inner::Server(s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
            }
            Inner::Plain(_) => {}
        }
        self.tcp().shutdown(Shutdown::Both)
    }
}

/// Whether `s` has bytes (or an end of stream) to read now, without waiting.
fn socket_readable(s: &TcpStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid, initialised pollfd for a descriptor that
    // `s` keeps open for the whole call; a zero timeout never blocks.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & libc::POLLIN != 0
}

impl Read for Transport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Client(s) => s.read(buf),
            Inner::Server(s) => s.read(buf),
            Inner::Plain(s) => s.read(buf),
        }
    }
}

impl Write for Transport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Client(s) => s.write(buf),
            Inner::Server(s) => s.write(buf),
            Inner::Plain(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match &mut self.inner {
            Inner::Client(s) => s.write_vectored(bufs),
            Inner::Server(s) => s.write_vectored(bufs),
            Inner::Plain(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Inner::Client(s) => s.flush(),
            Inner::Server(s) => s.flush(),
            Inner::Plain(s) => s.flush(),
        }
    }
}

/// Whether an IP address is loopback (127.0.0.0/8, ::1, or ::ffff:127.x).
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Resolves `addr` ("host:port"); in insecure mode every resolved address
/// must be loopback. Nothing is connected here.
pub fn resolve(addr: &str, insecure: bool) -> Result<Vec<SocketAddr>, TlsError> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|_| TlsError::Resolve(addr.to_owned()))?
        .collect();
    if addrs.is_empty() {
        return Err(TlsError::Resolve(addr.to_owned()));
    }
    if insecure && !addrs.iter().all(|a| is_loopback(a.ip())) {
        return Err(TlsError::InsecureNotLoopback(addr.to_owned()));
    }
    Ok(addrs)
}

fn set_timeouts(s: &TcpStream, t: &Timeouts) -> Result<(), TlsError> {
    s.set_read_timeout(Some(t.io))
        .map_err(io_err("set read timeout"))?;
    s.set_write_timeout(Some(t.io))
        .map_err(io_err("set write timeout"))?;
    s.set_nodelay(true).map_err(io_err("set TCP_NODELAY"))?;
    Ok(())
}

/// Connects to `addr` ("host:port") and, unless insecure, runs the TLS
/// handshake verifying the server against the CA and `server_name` (a DNS
/// name or an IP address). Insecure mode is refused before connecting unless
/// `addr` resolves only to loopback addresses.
pub fn connect(addr: &str, server_name: &str, cfg: &ClientTls) -> Result<Transport, TlsError> {
    let addrs = resolve(addr, cfg.is_insecure())?;
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|_| TlsError::ServerName(server_name.into()))?;
    let mut last = None;
    let mut sock = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, cfg.timeouts.connect) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let sock = match sock {
        Some(s) => s,
        None => {
            let e = last.unwrap_or_else(|| io::Error::other("no address"));
            return Err(TlsError::Io {
                context: format!("connect to {addr}"),
                source: e,
            });
        }
    };
    set_timeouts(&sock, &cfg.timeouts)?;
    let peer = sock.peer_addr().map_err(io_err("peer address"))?;
    match &cfg.mode {
        ClientMode::Insecure => {
            if !is_loopback(peer.ip()) {
                return Err(TlsError::InsecureNotLoopback(peer.to_string()));
            }
            Ok(Transport {
                inner: Inner::Plain(sock),
                peer,
                identity: None,
            })
        }
        ClientMode::Tls(c) => {
            let conn = ClientConnection::new(c.clone(), name)
                .map_err(|e| TlsError::Config(e.to_string()))?;
            let mut s = StreamOwned::new(conn, sock);
            complete_handshake(&mut s.conn, &mut s.sock, peer)?;
            Ok(Transport {
                inner: Inner::Client(Box::new(s)),
                peer,
                identity: Some(server_name.to_owned()),
            })
        }
    }
}

fn complete_handshake<C, D>(
    conn: &mut C,
    sock: &mut TcpStream,
    peer: SocketAddr,
) -> Result<(), TlsError>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(sock) {
            // Make sure a pending alert reaches the peer (write only: a
            // read here would wait for the peer until the timeout).
            while conn.wants_write() {
                if conn.write_tls(sock).is_err() {
                    break;
                }
            }
            let reason = match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    "timed out waiting for the peer".to_owned()
                }
                io::ErrorKind::UnexpectedEof => {
                    "connection closed by the peer during the handshake".to_owned()
                }
                _ => describe(&e),
            };
            return Err(TlsError::Handshake {
                peer: peer.to_string(),
                reason,
            });
        }
    }
    // Push out anything the handshake left queued (e.g. the client's
    // Finished), so the peer's own handshake completes.
    while conn.wants_write() {
        conn.write_tls(sock).map_err(|e| TlsError::Handshake {
            peer: peer.to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// Readable text for a handshake error (unwraps rustls' custom
/// certificate errors, whose `Display` is a `Debug` dump).
fn describe(e: &io::Error) -> String {
    if let Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(o))) =
        e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
    {
        return format!("invalid peer certificate: {}", o.0);
    }
    e.to_string()
}

/// Accepts one connection on `listener` and authenticates it (see
/// [`accept_stream`]).
pub fn accept(listener: &TcpListener, cfg: &ServerTls) -> Result<Transport, TlsError> {
    let (sock, _) = listener.accept().map_err(io_err("accept"))?;
    accept_stream(sock, cfg)
}

/// Runs the server side of the TLS handshake on an accepted socket. The
/// client must present a certificate of the CA valid for an allowed name; a
/// refused client gets a TLS alert and an error is returned before anything
/// is read from the stream at the application level. Insecure mode is
/// refused unless both ends are loopback.
pub fn accept_stream(sock: TcpStream, cfg: &ServerTls) -> Result<Transport, TlsError> {
    let peer = sock.peer_addr().map_err(io_err("peer address"))?;
    set_timeouts(&sock, &cfg.timeouts)?;
    match &cfg.mode {
        ServerMode::Insecure => {
            let local = sock.local_addr().map_err(io_err("local address"))?;
            if !is_loopback(peer.ip()) || !is_loopback(local.ip()) {
                let _ = sock.shutdown(Shutdown::Both);
                return Err(TlsError::InsecureNotLoopback(format!("{local} <- {peer}")));
            }
            Ok(Transport {
                inner: Inner::Plain(sock),
                peer,
                identity: None,
            })
        }
        ServerMode::Tls(c) => {
            let conn =
                ServerConnection::new(c.clone()).map_err(|e| TlsError::Config(e.to_string()))?;
            let mut s = StreamOwned::new(conn, sock);
            if let Err(e) = complete_handshake(&mut s.conn, &mut s.sock, peer) {
                tracing::warn!(%peer, error = %e, "refused replication client");
                let _ = s.sock.shutdown(Shutdown::Both);
                return Err(e);
            }
            let identity = s
                .conn
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|leaf| matching_name(&cfg.allowed, leaf));
            tracing::info!(%peer, identity = ?identity, "replication client authenticated");
            Ok(Transport {
                inner: Inner::Server(Box::new(s)),
                peer,
                identity,
            })
        }
    }
}

/// Checks that a listener bound for insecure mode is on a loopback address.
pub fn check_insecure_listener(addr: &SocketAddr) -> Result<(), TlsError> {
    if is_loopback(addr.ip()) {
        Ok(())
    } else {
        Err(TlsError::InsecureNotLoopback(addr.to_string()))
    }
}
