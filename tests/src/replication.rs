//! Helpers of the replication tests (filled in below).
