//! rewind's binaries (`rewind`, `drvutil`, `cdpcli`) share their argument
//! types and command implementations through this library, so each command
//! lives in one module and can be tested without spawning a process.

pub mod admin;
pub mod agent;
pub mod bookmark;
pub mod cdpcli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod drvutil;
pub mod export;
pub mod gate;
pub mod health;
pub mod iopattern;
pub mod kernel_info;
pub mod listen;
pub mod logging;
pub mod metrics;
pub mod pki_cli;
pub mod protect;
pub mod recover;
pub mod recover_cli;
pub mod replay;
pub mod replicate;
pub mod status;
pub mod store;
pub mod target_admin;
pub mod target_cli;
pub mod volumes;
pub mod vsnap;
