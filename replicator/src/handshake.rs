//! The connection handshake: `Hello` (source → target), then `Welcome` or
//! `Error` (target → source). See `docs/wire-protocol.md`, "Handshake".

use std::io::{Read, Write};

use thiserror::Error;

use crate::wire::{
    self, ErrorCode, ErrorFrame, Frame, Hello, Welcome, WireError, DEFAULT_MAX_FRAME,
    MIN_MAX_FRAME, PROTOCOL_VERSION,
};

/// Maximum payload of a handshake frame (they are small; a peer announcing
/// more is not speaking this protocol).
pub const HANDSHAKE_MAX_FRAME: u32 = 64 << 10;

/// Smallest and largest tracking block sizes accepted (4 KiB – 1 MiB).
pub const BLOCK_SIZE_RANGE: (u32, u32) = (4096, 1 << 20);

/// Why the target refused a `Hello`: sent to the source as an `Error` frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{code:?}: {message}")]
pub struct Refusal {
    /// Error code.
    pub code: ErrorCode,
    /// Explanation for the administrator on the source side.
    pub message: String,
}

impl Refusal {
    /// A refusal with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// Errors of the handshake, on either side.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// The target refused the pair (its `Error` frame).
    #[error("target refused the pair: {code:?}: {message}")]
    Refused {
        /// Code sent by the target.
        code: ErrorCode,
        /// Message sent by the target.
        message: String,
    },
    /// This side refused the peer (target: the `Error` frame sent).
    #[error("refused the source: {0}")]
    RefusedPeer(Refusal),
    /// The peer sent something other than the expected frame.
    #[error("protocol violation: expected {expected}, got {got}")]
    Unexpected {
        /// Expected frame.
        expected: &'static str,
        /// Received frame type.
        got: String,
    },
    /// The target refused the TLS session after the handshake (TLS 1.3
    /// reports a refused client certificate only with the first read).
    #[error(
        "the target refused the TLS session (alert {0}): is our client certificate issued by the target's CA, \
         and our host name in its allowed list?"
    )]
    TlsRefused(String),
    /// The peer's frame was malformed, or the transport failed.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Maps a transport error carrying a received TLS alert to
/// [`HandshakeError::TlsRefused`].
fn classify(e: WireError) -> HandshakeError {
    if let WireError::Io(io) = &e {
        if let Some(rustls::Error::AlertReceived(a)) =
            io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
        {
            return HandshakeError::TlsRefused(format!("{a:?}"));
        }
    }
    HandshakeError::Wire(e)
}

/// Negotiated parameters of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Protocol version in use.
    pub version: u16,
    /// Maximum frame payload either side may send (min of both announces).
    pub max_frame: u32,
}

impl Negotiated {
    /// What a `Hello` and its `Welcome` agree on.
    pub fn from(hello: &Hello, welcome: &Welcome) -> Self {
        Negotiated {
            version: welcome.protocol_version,
            max_frame: hello.max_frame.min(welcome.max_frame).max(MIN_MAX_FRAME),
        }
    }
}

/// Source side: sends `hello`, waits for the answer. Returns the target's
/// `Welcome`, or [`HandshakeError::Refused`] with the target's reason.
pub fn client_hello<T: Read + Write>(t: &mut T, hello: &Hello) -> Result<Welcome, HandshakeError> {
    wire::write_frame(t, &Frame::Hello(hello.clone()), HANDSHAKE_MAX_FRAME).map_err(classify)?;
    match wire::read_frame(t, HANDSHAKE_MAX_FRAME).map_err(classify)? {
        Frame::Welcome(w) if w.accepted => {
            if w.protocol_version != hello.protocol_version {
                return Err(HandshakeError::Unexpected {
                    expected: "the protocol version we asked for",
                    got: format!("version {}", w.protocol_version),
                });
            }
            Ok(w)
        }
        Frame::Welcome(_) => Err(HandshakeError::Refused {
            code: ErrorCode::Other(0),
            message: "target answered accepted=false without a reason".into(),
        }),
        Frame::Error(ErrorFrame { code, message }) => {
            Err(HandshakeError::Refused { code, message })
        }
        other => Err(HandshakeError::Unexpected {
            expected: "Welcome or Error",
            got: format!("{:?}", other.frame_type()),
        }),
    }
}

/// Generic checks every target applies before its own policy: protocol
/// version, block size, name.
pub fn check_hello(h: &Hello) -> Result<(), Refusal> {
    if h.protocol_version != PROTOCOL_VERSION {
        return Err(Refusal::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "source speaks protocol version {}, this target speaks version {PROTOCOL_VERSION}",
                h.protocol_version
            ),
        ));
    }
    let (lo, hi) = BLOCK_SIZE_RANGE;
    if !h.block_size.is_power_of_two() || h.block_size < lo || h.block_size > hi {
        return Err(Refusal::new(
            ErrorCode::BlockSizeMismatch,
            format!(
                "tracking block size {} is not a power of two in {lo}..={hi}",
                h.block_size
            ),
        ));
    }
    if h.max_frame < MIN_MAX_FRAME {
        return Err(Refusal::new(
            ErrorCode::ProtocolViolation,
            format!(
                "max frame {} below the minimum {MIN_MAX_FRAME}",
                h.max_frame
            ),
        ));
    }
    Ok(())
}

/// What a target knows about a volume it already replicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownVolume {
    /// Volume UUID recorded at the first handshake.
    pub uuid: [u8; 16],
    /// Generation recorded.
    pub generation: u64,
    /// Tracking block size of the replica.
    pub block_size: u32,
}

/// The standard split-brain guard: a known volume name must come with the
/// same UUID, generation and block size.
pub fn check_known(known: &KnownVolume, h: &Hello) -> Result<(), Refusal> {
    if known.uuid != h.volume_uuid {
        return Err(Refusal::new(
            ErrorCode::UuidMismatch,
            format!(
                "volume {:?} is known here with UUID {}, the source sent UUID {}: refusing (another volume with the \
                 same name?)",
                h.volume_name,
                hex(&known.uuid),
                hex(&h.volume_uuid)
            ),
        ));
    }
    if known.generation != h.generation {
        return Err(Refusal::new(
            ErrorCode::GenerationMismatch,
            format!(
                "volume {:?} is at generation {} here, the source is at generation {}: refusing to mix histories \
                 (split brain guard); resolve with an explicit resync/resume",
                h.volume_name, known.generation, h.generation
            ),
        ));
    }
    if known.block_size != h.block_size {
        return Err(Refusal::new(
            ErrorCode::BlockSizeMismatch,
            format!(
                "volume {:?} uses a tracking block size of {} here, the source sent {}",
                h.volume_name, known.block_size, h.block_size
            ),
        ));
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Target side: reads the `Hello`, applies [`check_hello`] and then `check`,
/// and answers with `Welcome` (the version and max frame fields are filled
/// in here) or with an `Error` frame carrying the refusal. Returns the hello
/// and the welcome sent, or the refusal as [`HandshakeError::RefusedPeer`].
pub fn server_accept<T, F>(t: &mut T, check: F) -> Result<(Hello, Welcome), HandshakeError>
where
    T: Read + Write,
    F: FnOnce(&Hello) -> Result<Welcome, Refusal>,
{
    server_accept_with_max(t, DEFAULT_MAX_FRAME, check)
}

/// [`server_accept`] announcing `max_frame` as the target's maximum frame.
pub fn server_accept_with_max<T, F>(
    t: &mut T,
    max_frame: u32,
    check: F,
) -> Result<(Hello, Welcome), HandshakeError>
where
    T: Read + Write,
    F: FnOnce(&Hello) -> Result<Welcome, Refusal>,
{
    let refuse = |t: &mut T, r: Refusal| -> HandshakeError {
        let f = Frame::Error(ErrorFrame {
            code: r.code,
            message: r.message.clone(),
        });
        // Best effort: the peer may already be gone.
        tracing::warn!(code = ?r.code, message = %r.message, "refusing replication source");
        let _ = wire::write_frame(t, &f, HANDSHAKE_MAX_FRAME);
        HandshakeError::RefusedPeer(r)
    };
    let hello = match wire::read_frame(t, HANDSHAKE_MAX_FRAME) {
        Ok(Frame::Hello(h)) => h,
        Ok(other) => {
            let got = format!("{:?}", other.frame_type());
            let _ = refuse(t, Refusal::new(ErrorCode::ProtocolViolation, format!("expected Hello, got {got}")));
            return Err(HandshakeError::Unexpected { expected: "Hello", got });
        }
        Err(WireError::UnsupportedVersion(v)) => {
            return Err(refuse(
                t,
                Refusal::new(
                    ErrorCode::UnsupportedVersion,
                    format!("frame version {v} not supported, this target speaks version {PROTOCOL_VERSION}"),
                ),
            ))
        }
        Err(e) if e.is_io() => return Err(e.into()),
        Err(e) => {
            let _ = refuse(t, Refusal::new(ErrorCode::BadFrame, format!("bad Hello: {e}")));
            return Err(e.into());
        }
    };
    if let Err(r) = check_hello(&hello) {
        return Err(refuse(t, r));
    }
    let mut welcome = match check(&hello) {
        Ok(w) => w,
        Err(r) => return Err(refuse(t, r)),
    };
    welcome.accepted = true;
    welcome.protocol_version = hello.protocol_version;
    welcome.max_frame = max_frame;
    wire::write_frame(t, &Frame::Welcome(welcome.clone()), HANDSHAKE_MAX_FRAME)?;
    Ok((hello, welcome))
}
