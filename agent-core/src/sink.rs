//! The contract between a filter (which sees the application's I/O) and the
//! change log (which remembers what changed until the target has it).
//!
//! A filter calls, for every write-like request (WRITE, TRIM, WRITE_ZEROES):
//!
//! 1. [`ChangeSink::begin`] **before** issuing the backing write. This marks the
//!    range as "in flight" so that if the filter process dies between the backing
//!    write and step 2, recovery treats the range as dirty (nothing is lost, at
//!    worst re-sent).
//! 2. The backing write.
//! 3. On success, [`ChangeSink::complete_write`] (with the bytes written) or
//!    [`ChangeSink::complete_zero`] (TRIM / WRITE_ZEROES), **after** the backing
//!    write completed and **before** the reply goes to the client. On failure,
//!    [`ChangeSink::abort`]: the backing may have been partly changed, so the
//!    range is still recorded as dirty (without data).
//!
//! Recording never fails: when the memory budget is exhausted the change log
//! degrades from data mode to metadata mode to bitmap mode, but always keeps the
//! range. Overlapping writes must reach the sink in the order they reached the
//! backing store; the filter guarantees that by serialising overlapping writes.

/// A write announced to the sink with [`ChangeSink::begin`] and not yet
/// completed. Pass it back to exactly one of `complete_write`, `complete_zero`
/// or `abort`.
#[derive(Debug)]
#[must_use = "a ticket must be completed or aborted, or the range stays in flight"]
pub struct WriteTicket {
    /// Byte offset of the write on the volume.
    pub offset: u64,
    /// Length of the write in bytes.
    pub len: u64,
    /// Opaque value owned by the sink implementation (e.g. an extent index).
    pub cookie: u64,
}

/// Receives every change a filter makes to a protected volume, plus read
/// statistics. Implementations are shared by all connections of an export.
pub trait ChangeSink: Send + Sync {
    /// Announces a write of `len` bytes at `offset`, before the backing write.
    fn begin(&self, offset: u64, len: u64) -> WriteTicket;
    /// The backing write of `data` at `ticket.offset` completed successfully.
    /// `data.len()` equals `ticket.len`.
    fn complete_write(&self, ticket: WriteTicket, data: &[u8]);
    /// The range of `ticket` now reads as zeroes (TRIM or WRITE_ZEROES completed).
    fn complete_zero(&self, ticket: WriteTicket);
    /// The backing write failed; its range may or may not have changed and is
    /// recorded as dirty without data.
    fn abort(&self, ticket: WriteTicket);
    /// A read of `len` bytes was served (statistics only).
    fn note_read(&self, len: u64);
}
