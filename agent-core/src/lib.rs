//! rewind's agent core: the shared-memory change log that sits between the
//! filters (producers) and the replicator (consumer), volume identity and
//! counters. No I/O policy lives here.
//!
//! (full crate documentation below)

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
