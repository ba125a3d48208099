//! The target side: spool, copy-on-write apply, undo journal, catalogue,
//! retention and point-in-time reads (design §7).
//!
//! Not implemented yet: see the issue "The retention journal and recovery".
