//! Device-mapper control for rewind: hot insertion of the NBD filter under a live
//! dm device and dm-era change-tracking import (design §5).
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout so
//! that the dependency graph of the design holds from the start. See issue
//! "Kernel paths on a real kernel".
