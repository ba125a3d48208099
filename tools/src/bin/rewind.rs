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
    /// Start replicating a volume (through the running replicator).
    Protect(tools::protect::ProtectArgs),
    /// Stop replicating a volume added with `rewind protect`.
    Unprotect(tools::protect::UnprotectArgs),
    /// Suspend shipping of pairs (capture continues; nothing is lost).
    #[command(after_help = tools::protect::PAUSE_HELP)]
    Pause(tools::protect::SelectArgs),
    /// Resume shipping of paused pairs.
    #[command(after_help = tools::protect::RESUME_HELP)]
    Resume(tools::protect::SelectArgs),
    /// Full checksum resync of pairs (Resync Step I and II).
    #[command(after_help = tools::protect::RESYNC_HELP)]
    Resync(tools::protect::SelectArgs),
    /// Daily health report: changes, RPO, flow control, consistency points.
    HealthReport(tools::health::HealthArgs),
    /// Protect a volume, write ext4 on it, recover it at a local recovery site, verify (needs root).
    Demo(tools::demo::DemoArgs),
    /// Replay a block trace against an export with self-verifying blocks, then verify.
    Replay(tools::replay::ReplayArgs),
    /// Recovery points of a replicated volume at the target.
    Recover(tools::recover_cli::RecoverArgs),
    /// Virtual (NBD) and physical snapshots of a replicated volume at a point in time.
    Snapshot(tools::recover_cli::SnapshotArgs),
    /// Roll a replica back to a point and hand it over (stops its replication).
    Failover(tools::recover_cli::FailoverArgs),
    /// Protect a failed-over volume again: discard the replica's divergence, resync by checksum.
    Reprotect(tools::recover_cli::ReprotectArgs),
    /// Receive a recovered volume back into the original source device (reverse replication).
    Failback(tools::recover_cli::FailbackArgs),
    /// Take bookmarks (crash-, fs- or app-consistent points) through the agent's admin socket.
    Bookmark(tools::bookmark::BookmarkArgs),
    /// Run the agent daemon: serve every volume of agent.toml through the filter.
    Agent(tools::agent::AgentArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Target(_) | Command::Replicator(_) | Command::Failback(_)
    ) {
        tools::logging::init();
    }
    let result = match cli.command {
        Command::Export(args) => tools::export::run(args),
        Command::Pki(args) => tools::pki_cli::run(args),
        Command::Replicator(args) => tools::replicate::run(args),
        Command::Target(args) => tools::target_cli::run(args),
        Command::Status(args) => tools::status::run(args),
        Command::Protect(args) => tools::protect::run_protect(args),
        Command::Unprotect(args) => tools::protect::run_unprotect(args),
        Command::Pause(args) => {
            tools::protect::run_select(tools::protect::PairCommand::Pause, args)
        }
        Command::Resume(args) => {
            tools::protect::run_select(tools::protect::PairCommand::Resume, args)
        }
        Command::Resync(args) => {
            tools::protect::run_select(tools::protect::PairCommand::Resync, args)
        }
        Command::HealthReport(args) => tools::health::run(args),
        Command::Demo(args) => tools::demo::run(args),
        Command::Replay(args) => match tools::replay::run(args) {
            Ok(true) => Ok(()),
            Ok(false) => return std::process::ExitCode::FAILURE,
            Err(e) => Err(e),
        },
        Command::Recover(args) => tools::recover_cli::run_recover(args),
        Command::Snapshot(args) => tools::recover_cli::run_snapshot(args),
        Command::Failover(args) => tools::recover_cli::run_failover(args),
        Command::Reprotect(args) => tools::recover_cli::run_reprotect(args),
        Command::Failback(args) => tools::recover_cli::run_failback(args),
        Command::Bookmark(args) => tools::bookmark::run(args).map(|out| print!("{out}")),
        Command::Agent(args) => tools::agent::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rewind: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
