//! `cdpcli`: target inspection with the commands and field names admins of
//! the seed product know (`--listtargetvolumes`, `--displaystatistics`,
//! `--iopattern`, `--showsummary`). Reads the status file of `rewind target`
//! (`<state_dir>/status.json`); `--showsummary` asks the running target
//! through its admin socket, or opens the journal with `--target-dir` when no
//! target runs.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;
use replicator::pair::now_ns;
use serde::Serialize;

use crate::config::DEFAULT_TARGET_STATE;
use crate::status::{liveness, read_status, TargetStatusFile, TargetVolumeReport};

/// Arguments of `cdpcli`.
#[derive(Debug, Parser)]
#[command(
    name = "cdpcli",
    version,
    about = "Inspect replicated volumes at the target (reads the status of `rewind target`)",
    after_help = "Examples:\n  \
    cdpcli --listtargetvolumes\n  \
    cdpcli --displaystatistics --vol=vol0\n  \
    cdpcli --displaystatistics --vol=vol0 --json --state-dir /var/lib/rewind/target\n  \
    cdpcli --iopattern --vol=vol0\n  \
    cdpcli --showsummary --vol=vol0 [--json]\n  \
    cdpcli --showsummary --vol=vol0 --target-dir /srv/rewind      # no target running\n\n\
Fields of --displaystatistics: Diffs pending in CX = bytes received by the target and not yet durable \
in its spool (rewind has no relay; normally 0), Diffs pending in Target = bytes spooled and not yet \
applied to the replica, Current RPO (secs) = now - source time of the oldest change not applied \
(0 when everything received is applied), Apply rate (Bytes/sec) = bytes applied per second of apply \
work, Apply time (secs) = time spent applying since the target started. \
--iopattern: writes received since the target started, by size (512 B .. 4 MiB and larger) and \
random/sequential (sizes as shipped: adjacent writes are coalesced by the replicator; reads never \
reach the target). \
--showsummary: the retention summary: Database (the catalogue), Version (its schema), Revision \
(rewind release), Log Type (Roll-Backward: an undo journal), Disk Space (app) = bytes of journal, \
spool, catalogue and bookmark log, Total Data Files = journal segments, Recovery Time Range(GMT) = \
oldest to latest recoverable source time (UTC)."
)]
pub struct CdpcliArgs {
    /// List the target volumes, one per line.
    #[arg(long)]
    pub listtargetvolumes: bool,
    /// Replication statistics of the volume given with --vol.
    #[arg(long)]
    pub displaystatistics: bool,
    /// Write-size histogram (random/sequential) of the volume given with --vol.
    #[arg(long)]
    pub iopattern: bool,
    /// Retention summary of the volume given with --vol: database, version, log type, disk space,
    /// data files, recovery time range.
    #[arg(long)]
    pub showsummary: bool,
    /// With --showsummary when no target runs: the target's --dir (DIR/<volume>/journal).
    #[arg(long, value_name = "DIR")]
    pub target_dir: Option<PathBuf>,
    /// Volume name.
    #[arg(long, value_name = "V")]
    pub vol: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// State directory of `rewind target`.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_TARGET_STATE)]
    pub state_dir: PathBuf,
}

/// The statistics of `--displaystatistics`.
#[derive(Debug, Clone, Serialize)]
pub struct Statistics {
    /// Target Volume Name.
    #[serde(rename = "Target Volume Name")]
    pub name: String,
    /// Diffs pending in CX (bytes).
    #[serde(rename = "Diffs pending in CX")]
    pub pending_cx: u64,
    /// Diffs pending in Target (bytes).
    #[serde(rename = "Diffs pending in Target")]
    pub pending_target: u64,
    /// Current RPO (secs).
    #[serde(rename = "Current RPO (secs)")]
    pub rpo_secs: u64,
    /// Apply rate (Bytes/sec).
    #[serde(rename = "Apply rate (Bytes/sec)")]
    pub apply_rate: u64,
    /// Apply time (secs).
    #[serde(rename = "Apply time (secs)")]
    pub apply_time_secs: f64,
}

/// Computes the statistics of one volume.
pub fn statistics(v: &TargetVolumeReport) -> Statistics {
    let j = v.journal.unwrap_or_default();
    let pending_target = v.status.as_ref().map_or(j.pending_bytes, |s| s.spool_bytes);
    let rpo_secs = j
        .oldest_unapplied_source_time_ns
        .map_or(0, |t| now_ns().saturating_sub(t) / 1_000_000_000);
    let apply_rate = if j.apply_ns > 0 {
        (j.applied_bytes as f64 * 1e9 / j.apply_ns as f64) as u64
    } else {
        0
    };
    Statistics {
        name: v.name.clone(),
        pending_cx: 0,
        pending_target,
        rpo_secs,
        apply_rate,
        apply_time_secs: j.apply_ns as f64 / 1e9,
    }
}

/// Runs `cdpcli`.
pub fn run(args: CdpcliArgs) -> Result<()> {
    let modes = [
        args.listtargetvolumes,
        args.displaystatistics,
        args.iopattern,
        args.showsummary,
    ];
    if modes.iter().filter(|m| **m).count() != 1 {
        bail!(
            "give exactly one of --listtargetvolumes, --displaystatistics --vol=V, --iopattern --vol=V or --showsummary --vol=V"
        );
    }
    if args.showsummary {
        return show_summary(&args);
    }
    let st: TargetStatusFile = read_status(&args.state_dir)?;
    let state = liveness(st.pid, st.running, st.updated_ns);
    if state != "running" {
        eprintln!(
            "cdpcli: warning: the target daemon is {state}; figures are from its last status"
        );
    }
    if args.listtargetvolumes {
        if args.json {
            let names: Vec<&str> = st.volumes.iter().map(|v| v.name.as_str()).collect();
            println!("{}", serde_json::to_string_pretty(&names)?);
        } else {
            for v in &st.volumes {
                println!("{}", v.name);
            }
        }
        return Ok(());
    }
    let Some(vol) = &args.vol else {
        bail!("--displaystatistics and --iopattern need --vol=V (see --listtargetvolumes)");
    };
    let Some(v) = st.volumes.iter().find(|v| &v.name == vol) else {
        let names: Vec<&str> = st.volumes.iter().map(|v| v.name.as_str()).collect();
        bail!("no target volume {vol:?} (known: {})", names.join(", "));
    };
    if args.iopattern {
        let p = v.io_pattern.clone().unwrap_or_default();
        if args.json {
            println!("{}", serde_json::to_string_pretty(&p)?);
            return Ok(());
        }
        println!("Target Volume Name       : {}", v.name);
        println!(
            "Writes since start       : {} ({} bytes; reads are not seen at the target)",
            p.writes, p.bytes
        );
        println!(
            "{:>12}  {:>14}  {:>14}",
            "IO size", "Write Random", "Write Seq"
        );
        for b in &p.buckets {
            println!(
                "{:>12}  {:>14}  {:>14}",
                crate::iopattern::size_label(b.up_to),
                b.random,
                b.sequential
            );
        }
        return Ok(());
    }
    let s = statistics(v);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!("Target Volume Name       : {}", s.name);
        println!("Diffs pending in CX      : {}", s.pending_cx);
        println!("Diffs pending in Target  : {}", s.pending_target);
        println!("Current RPO (secs)       : {}", s.rpo_secs);
        println!("Apply rate (Bytes/sec)   : {}", s.apply_rate);
        println!("Apply time (secs)        : {:.3}", s.apply_time_secs);
    }
    Ok(())
}

/// `--showsummary`: from the running target (admin socket), else from the
/// journal directory under `--target-dir`.
fn show_summary(args: &CdpcliArgs) -> Result<()> {
    use crate::recover::SummaryDoc;
    use crate::target_admin::{AdminClient, AdminRequest};
    let Some(vol) = &args.vol else {
        bail!("--showsummary needs --vol=V (see --listtargetvolumes)");
    };
    let doc: SummaryDoc = match AdminClient::connect(&args.state_dir)? {
        Some(mut c) => {
            c.send(&AdminRequest::Summary {
                volume: vol.clone(),
            })?;
            serde_json::from_value(c.wait_done(&mut |_| {})?)?
        }
        None => {
            let Some(dir) = &args.target_dir else {
                bail!(
                    "no target daemon answers in {} and no --target-dir was given",
                    args.state_dir.display()
                );
            };
            let vols = crate::store::Volumes::new(crate::store::Layout::Dir {
                dir: dir.clone(),
                spool_budget: None,
                undo_compression: None,
                direct_apply: None,
                retention: None,
            });
            crate::recover::summary(&*vols.get(vol)?)?
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("Target Volume Name       : {}", doc.volume);
    println!("Database                 : {}", doc.database);
    println!("Version                  : {}", doc.version);
    println!("Revision                 : {}", doc.revision);
    println!("Log Type                 : {}", doc.log_type);
    println!("Disk Space (app)         : {} bytes", doc.disk_space);
    println!("Free Space               : {} bytes", doc.free_space);
    println!("Total Data Files         : {}", doc.total_data_files);
    println!("Recovery Time Range(GMT) : {}", doc.recovery_time_range);
    println!("Bookmarks                : {}", doc.bookmarks);
    if let Some(a) = &doc.retention_alert {
        println!("ALERT                    : {a}");
    }
    if let Some(m) = &doc.failed_over {
        println!(
            "FAILED OVER              : to {} (replica {})",
            m.point, m.replica
        );
    }
    Ok(())
}
