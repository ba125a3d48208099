//! rewind's NBD server (the filter).
