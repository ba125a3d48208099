//! rewind's agent core: the shared-memory change log that sits between the
//! filters (producers) and the replicator (consumer), volume identity and
//! counters. No I/O policy lives here.

pub mod sink;

pub use sink::{ChangeSink, WriteTicket};
