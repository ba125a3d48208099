//! The replicator: the source-side shipper, the target server and the wire
//! protocol (design §6). The byte-level specification and the engine's
//! protocol rules are in `docs/wire-protocol.md`.
//!
//! Foundations:
//!
//! - [`wire`]: the versioned binary frame format (encoding, total and bounded
//!   decoding, streaming read/write, chunk compression);
//! - [`tls`]: TLS 1.3 transports with mutual certificate authentication and
//!   a client identity allow list (rustls, `ring` provider);
//! - [`pki`]: a minimal CA and host certificate issuance (`rewind pki`);
//! - [`handshake`]: `Hello` / `Welcome` / refusal, with the split-brain guard;
//! - [`bandwidth`]: scheduled token-bucket limits, per pair and per target.
//!
//! The engine:
//!
//! - [`source`]: [`source::Pair`] — one volume's change log shipped to one
//!   target (drain, coalesce, read back, compress, pipeline, commit on durable
//!   ack, reconnect with backoff, resync step 1/2, resize, flow control);
//! - [`target`]: [`target::TargetServer`] — accept, handshake against a
//!   [`target::TargetStore`], spool durably, ack, apply in a thread per
//!   volume; several volumes per server through a [`target::StoreProvider`];
//! - [`pair`]: pair states, the persisted pair state, the status snapshots
//!   ([`pair::PairStatus`], [`pair::TargetStatus`], serde);
//! - [`uring`]: reading the source volume with io_uring (pread fallback).
//!
//! # Starting a source pair (in `rewind replicator`)
//!
//! ```no_run
//! use replicator::source::{Pair, PairConfig};
//! use replicator::tls::ClientTls;
//! use replicator::wire::Compression;
//! let tls = ClientTls::from_pem("/etc/rewind/pki/ca.pem".as_ref(),
//!     "/etc/rewind/pki/src-01.pem".as_ref(), "/etc/rewind/pki/src-01.key".as_ref()).unwrap();
//! let mut cfg = PairConfig::new(
//!     "vol0",                              // volume name (routes at the target)
//!     "/dev/shm/rewind/vol0.clog",         // change log region
//!     "/dev/vg0/vol0",                     // source volume (read back, resync)
//!     "dr-site:7070", "dr-site",           // target address, certificate name
//!     tls, "/var/lib/rewind/pairs");       // state dir (<volume>.pair.json)
//! cfg.compression = Compression::Zstd(3);
//! // cfg.limiter = PairLimiter { pair: .., target: Some(shared) };
//! let pair = Pair::start(cfg).unwrap();    // runs in its own thread, reconnects forever
//! let status = pair.status();              // PairStatus: serde_json::to_string(&status)
//! pair.pause(); pair.resume(); pair.request_resync();
//! pair.stop();                             // in-flight batches stay uncommitted (re-delivered)
//! ```
//!
//! # Starting a target server (in `rewind target`)
//!
//! ```no_run
//! use std::sync::Arc;
//! use replicator::handshake::Refusal;
//! use replicator::target::{TargetOptions, TargetServer, TargetStore, StoreProvider};
//! use replicator::tls::ServerTls;
//! use replicator::wire::Hello;
//! # fn open_journal_volume(h: &Hello) -> Result<Box<dyn TargetStore>, Refusal> { unimplemented!() }
//! let tls = ServerTls::from_pem("ca.pem".as_ref(), "dr-site.pem".as_ref(),
//!     "dr-site.key".as_ref(), vec![]).unwrap();
//! // name/identity -> store (e.g. journal::TargetVolume behind an adapter), or a refusal
//! let provider: Arc<dyn StoreProvider> =
//!     Arc::new(|h: &Hello, _peer: Option<&str>| open_journal_volume(h));
//! let server = TargetServer::bind("0.0.0.0:7070", tls, provider, TargetOptions::default()).unwrap();
//! let per_volume = server.status();        // Vec<TargetStatus>
//! server.shutdown();
//! ```
//!
//! # Guarantees (summary; details on each module)
//!
//! - A change-log batch is committed on the source only after the target
//!   acknowledged every frame built from it, and only after every older
//!   batch; the target acknowledges a frame only once it is durable in its
//!   store ([`target::TargetStore::spool`] returned).
//! - Every frame the source sends gets exactly one response, in order (Ack,
//!   or ResyncHashes for a ResyncRequest); responses are matched first in,
//!   first out.
//! - Across reconnects nothing is lost or reordered: the consumer is
//!   re-attached (uncommitted batches come back), records ≤ the target's
//!   `durable_seq` are skipped, the rest is re-sent in ring order; the target
//!   ignores superseded connections of the same volume.
//! - A target refuses a volume of another UUID/generation/block size, and any
//!   bad frame gets an `Error` frame and a closed connection with nothing
//!   spooled from it.

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
