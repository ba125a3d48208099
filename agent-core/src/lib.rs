//! rewind's agent core: the shared-memory change log that sits between the
//! filters (producers) and the replicator (consumer), volume identity and
//! counters. No I/O policy lives here.
//!
//! The byte-level format, the mode rules with their correctness argument,
//! recovery and the persisted files are specified in
//! `docs/change-log-format.md`; this page is the API overview.
//!
//! # Roles
//!
//! - **Producer** — [`ChangeLog`], one per volume in the agent (filter)
//!   process, implements [`ChangeSink`]. [`ChangeLog::open_or_create`] maps
//!   `<shm_dir>/<volume>.clog`, creating it if needed, and runs crash recovery.
//!   Any number of threads may record concurrently; they are serialised by one
//!   process-local mutex whose critical section is a memcpy into the ring.
//! - **Consumer** — [`Consumer`], one per volume in the replicator process:
//!   [`Consumer::get`] hands out [`Batch`]es (ring records, or dirty block
//!   ranges when the ring is drained), [`Consumer::commit`] frees them after
//!   the target's durable ack. Uncommitted batches are re-delivered after a
//!   crash.
//! - **Observer** — [`ChangeLogView`], a read-only mapping for `drvutil` and
//!   tests: [`Stats`] (serde), unconsumed records, dirty ranges.
//!
//! # Guarantees
//!
//! - When a `ChangeSink::complete_*` / `abort` call returns, the change is in
//!   the ring (a Data, Metadata or Zero record) or in the dirty bitmap, and it
//!   stays there until a consumer commits it. Recording never fails; it
//!   degrades data → metadata → bitmap mode when the ring is full.
//! - Records are totally ordered (sequence numbers, strictly increasing across
//!   producer restarts and reboots); overlapping writes appear in the order
//!   they reached the backing store (the filter serialises them).
//! - A producer killed at any instant loses nothing: in-flight extents are
//!   marked dirty by the next open. A consumer killed at any instant loses
//!   nothing: uncommitted batches come back. A host crash loses nothing: the
//!   bitmap file plus the activity log (hot extents, made durable before the
//!   first write into an extent) cover every uncommitted change.
//! - Everything read from the mapping or from state files is validated; bad
//!   data is a [`ChangeLogError`], never a panic or an out-of-bounds access.
//!
//! # Example
//!
//! ```no_run
//! use agent_core::{ChangeLog, ChangeLogConfig, ChangeSink, Consumer, BatchKind};
//! # fn main() -> Result<(), agent_core::ChangeLogError> {
//! let log = ChangeLog::open_or_create(ChangeLogConfig::new("vol0", 1 << 30))?;
//! log.start_persister();
//! let t = log.begin(4096, 512);
//! // ... backing write of the 512 bytes at 4096 ...
//! log.complete_write(t, &[0u8; 512]);
//!
//! // in the replicator process:
//! let mut c = Consumer::attach(log.path())?;
//! while let Some(batch) = c.get(4 << 20)? {
//!     match batch.kind() {
//!         BatchKind::Ring => { /* ship batch.records() */ }
//!         BatchKind::Bitmap => { /* read batch.ranges() from the volume now, ship */ }
//!     }
//!     // ... after the target's durable ack:
//!     c.commit(batch)?;
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod config;
pub mod consumer;
mod crc;
pub mod error;
pub mod layout;
pub mod persist;
pub mod producer;
mod region;
pub mod ring;
mod shm;
pub mod sink;
pub mod view;

pub use config::ChangeLogConfig;
pub use consumer::{Batch, BatchKind, Consumer};
pub use error::ChangeLogError;
pub use persist::VolumeIdentity;
pub use producer::{CaptureMode, ChangeLog, OpenReport};
pub use ring::{Record, RecordInfo, RecordKind, Tag, TagType};
pub use sink::{ChangeSink, WriteTicket};
pub use view::{ChangeLogView, Stats, Transitions, HIST_LABELS};
