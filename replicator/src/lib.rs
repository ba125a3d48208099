//! The replicator: the source-side shipper and the wire protocol (design §6).
//!
//! This crate currently provides the foundations of replication:
//!
//! - [`wire`]: the versioned binary frame format (encoding, total and bounded
//!   decoding, streaming read/write, chunk compression);
//! - [`tls`]: TLS 1.3 transports with mutual certificate authentication and
//!   a client identity allow list (rustls, `ring` provider);
//! - [`pki`]: a minimal CA and host certificate issuance (`rewind pki`);
//! - [`handshake`]: `Hello` / `Welcome` / refusal, with the split-brain guard;
//! - [`bandwidth`]: scheduled token-bucket limits, per pair and per target.
//!
//! The drain/ship loop, the resync engine and the target daemon build on
//! these. The byte-level specification is `docs/wire-protocol.md`.

#![warn(missing_docs)]

pub mod bandwidth;
pub mod handshake;
pub mod pair;
pub mod pki;
pub mod source;
pub mod target;
pub mod tls;
pub mod uring;
pub mod wire;
