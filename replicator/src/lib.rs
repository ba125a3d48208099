//! The source-side shipper and the wire protocol (design §6).
//!
//! Not implemented yet: see the issue "Replication end to end".
