//! A hook that sees every transmission request an export receives, in
//! arrival order, before it is validated or executed. `rewind export
//! --trace-out` uses it to record application workloads as replayable traces.

/// The kind of request seen by a [`RequestObserver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOp {
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write,
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim,
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes,
}

impl RequestOp {
    /// Maps an `NBD_CMD_*` value; None for commands that touch no data
    /// (DISC, CACHE, BLOCK_STATUS, unknown).
    pub fn from_cmd(kind: u16) -> Option<RequestOp> {
        use crate::proto::*;
        match kind {
            CMD_READ => Some(RequestOp::Read),
            CMD_WRITE => Some(RequestOp::Write),
            CMD_FLUSH => Some(RequestOp::Flush),
            CMD_TRIM => Some(RequestOp::Trim),
            CMD_WRITE_ZEROES => Some(RequestOp::WriteZeroes),
            _ => None,
        }
    }
}

/// Sees each request of an export when the server starts handling it (all
/// connections; calls may come from several threads at once). It must be
/// cheap and must not block: it runs on the connection's event loop. The
/// request may still be refused afterwards (out of range, read-only export):
/// `offset`/`len` are as the client sent them.
pub trait RequestObserver: Send + Sync {
    /// One request: operation, byte offset, length, FUA flag.
    fn observe(&self, op: RequestOp, offset: u64, len: u64, fua: bool);
}
