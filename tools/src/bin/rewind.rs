//! `rewind`: daemons and admin commands of rewind.

use clap::{Parser, Subcommand};
use tools::export::ExportArgs;

#[derive(Debug, Parser)]
#[command(
    name = "rewind",
    version,
    about = "Continuous data protection for Linux block devices",
    long_about = "Continuous data protection for Linux block devices: serve volumes through a \
change-tracking NBD filter (and, as the project grows, replicate them to a target and recover \
any point in time)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve one volume through the change-tracking NBD filter.
    Export(ExportArgs),
    /// Create a CA and host certificates for replication links.
    Pki(tools::pki_cli::PkiArgs),
    /// Run the replicator daemon: ship the volumes' change logs to a target.
    Replicator(tools::replicate::ReplicatorArgs),
    /// Run the target daemon: receive replication streams, spool, apply to replicas.
    Target(tools::target_cli::TargetArgs),
    /// Show replication pairs: state, RPO, resync progress, data pending per stage, alerts.
    Status(tools::status::StatusArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Target(_) | Command::Replicator(_)) {
        tools::logging::init();
    }
    let result = match cli.command {
        Command::Export(args) => tools::export::run(args),
        Command::Pki(args) => tools::pki_cli::run(args),
        Command::Replicator(args) => tools::replicate::run(args),
        Command::Target(args) => tools::target_cli::run(args),
        Command::Status(args) => tools::status::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rewind: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
