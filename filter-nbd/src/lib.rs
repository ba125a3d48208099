//! rewind's NBD server (the filter).
//!
//! A fixed-newstyle NBD server, written for this project from the protocol
//! specification (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>,
//! our notes in `vendor-docs/nbd-protocol.md`). Every completed write-like
//! request (WRITE, TRIM, WRITE_ZEROES) is recorded in the export's
//! [`agent_core::ChangeSink`] before the reply goes to the client.
//!
//! # Starting a server
//!
//! ```no_run
//! use std::sync::Arc;
//! use filter_nbd::{Backing, Export, Server, ServerOptions};
//!
//! let backing = Backing::open("/var/lib/rewind/vol0.img", false)?;
//! let export = Export::new("vol0", Arc::new(backing)).with_description("protected volume");
//! let server = Server::new(vec![export], ServerOptions::default())?;
//! let stop = server.shutdown_handle(); // call stop.shutdown() from a signal handler thread
//! server.serve_unix("/run/rewind/vol0.sock")?; // blocks until shut down
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Guarantees
//!
//! * **Recording order**: for every WRITE/TRIM/WRITE_ZEROES the server calls
//!   `ChangeSink::begin` before the backing I/O, then `complete_write` /
//!   `complete_zero` on success or `abort` on failure, and only then replies.
//!   Overlapping write-like requests of one export (across all its
//!   connections) are serialised by an in-flight range tracker, so they reach
//!   the sink in the order they reached the backing store. A TRIM the backing
//!   ignores is recorded with `abort` (dirty, contents unchanged).
//! * **Durability**: a WRITE with FUA is written with `RWF_DSYNC` (or
//!   followed by `fdatasync`) before its reply; TRIM/WRITE_ZEROES with FUA
//!   are followed by `fdatasync`; FLUSH is an `fdatasync` of the whole
//!   backing file, issued after every write replied before the FLUSH
//!   was received, so it covers writes completed on *any* connection: this
//!   is why `NBD_FLAG_CAN_MULTI_CONN` is advertised.
//! * **Isolation of bad input**: a bad request gets an NBD error reply and
//!   never changes the backing; a malformed handshake or a protocol
//!   violation closes that connection only.
//! * **Concurrency**: each connection is served by one thread running an
//!   event loop over a per-connection io_uring: it parses requests from a
//!   256 KiB input buffer, queues READ/WRITE/FLUSH on the ring (one
//!   `io_uring_enter` per batch), and while requests are in flight waits in
//!   the ring for either a completion or socket input (a POLL_ADD on the
//!   socket), never in `recv`. Completions are recorded in the sink and
//!   replied; the replies of one batch go out in one write (each reply is
//!   complete, replies never interleave). Up to 64 requests / 128 MiB of
//!   payload are in flight per connection, and they may complete out of
//!   order. On filesystems without non-blocking buffered writes (ext4) the
//!   kernel runs each write on an io-wq worker thread. If io_uring cannot be
//!   set up (or the source has no file descriptor) the connection logs a
//!   warning and runs requests synchronously with `pread`/`pwrite`.
//!   TRIM, WRITE_ZEROES and BLOCK_STATUS (`fallocate`, `lseek`) always run
//!   synchronously in the connection thread.

#![warn(missing_docs)]

pub mod attach;
pub mod client;
pub mod observe;
pub mod proto;
mod range;
mod server;
mod source;
mod uring;

pub use attach::{attach, AttachError, AttachOptions, Attached};
pub use observe::{RequestObserver, RequestOp};
pub use range::RangeLocks;
pub use server::{Export, Server, ServerError, ServerOptions, ShutdownHandle, Stream};
pub use source::{Backing, BlockSource, TrimOutcome};
