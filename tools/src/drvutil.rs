//! `drvutil`: inspect the filter's change logs, as the seed product's
//! `drvutil --ps/--pas` did: capture mode, dirty blocks pending, change-block
//! size, ring fill, write/read counts, IO-size histogram and mode changes.
//!
//! It maps the change log read-only and never consumes or changes it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use agent_core::{CaptureMode, ChangeLogView, RecordKind, Stats, HIST_LABELS};
use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;

/// Arguments of `drvutil`.
#[derive(Debug, Parser)]
#[command(
    name = "drvutil",
    version,
    about = "Inspect rewind's filter: capture mode, dirty blocks, ring fill and I/O statistics per volume",
    after_help = "Examples:\n  drvutil --ps vol0\n  drvutil --pas --json\n  drvutil --stop-filtering vol0   # keep serving, stop capturing, flag a resync\n  drvutil --start-filtering vol0\n  drvutil --dump vol0 --json   # also lists unconsumed ring records and dirty ranges\n  drvutil --kernel             # attached /dev/nbdN, dm tables in force, insertions, eras"
)]
pub struct DrvutilArgs {
    /// Print the statistics of one volume.
    #[arg(long, value_name = "VOLUME", conflicts_with_all = ["pas", "dump"])]
    pub ps: Option<String>,
    /// Print the statistics of every volume with a change log.
    #[arg(long, conflicts_with = "dump")]
    pub pas: bool,
    /// Print one volume's statistics plus its unconsumed ring records and dirty ranges.
    #[arg(long, value_name = "VOLUME")]
    pub dump: Option<String>,
    /// Show the kernel side: connected /dev/nbdN, dm tables in force (filter insertions,
    /// their origin devices) and dm-era state.
    #[arg(long, conflicts_with_all = ["ps", "pas", "dump"])]
    pub kernel: bool,
    /// Stop capturing writes of VOLUME (the agent keeps serving I/O; writes are
    /// tracked in the dirty bitmap only and the volume is flagged for resync).
    #[arg(long, value_name = "VOLUME", conflicts_with_all = ["ps", "pas", "dump", "kernel", "start_filtering"])]
    pub stop_filtering: Option<String>,
    /// Resume capturing writes of VOLUME (a resync flag set by --stop-filtering stays).
    #[arg(long, value_name = "VOLUME", conflicts_with_all = ["ps", "pas", "dump", "kernel"])]
    pub start_filtering: Option<String>,
    /// Admin socket of the agent serving the volume, for --stop/--start-filtering
    /// (default: $REWIND_ADMIN_SOCKET, else `<shm-dir>/<volume>.admin.sock` if
    /// present, else /run/rewind/agent.sock).
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// Machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Directory of the shared-memory change logs.
    #[arg(long, value_name = "DIR", default_value = agent_core::config::DEFAULT_SHM_DIR)]
    pub shm_dir: PathBuf,
    /// The agent's state directory (where a resync flag is kept).
    #[arg(long, value_name = "DIR", default_value = agent_core::config::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

/// Statistics of one volume as `drvutil` reports them.
#[derive(Debug, Serialize)]
pub struct VolumeReport {
    /// Volume name.
    pub volume: String,
    /// Path of the shared-memory change log.
    pub change_log: PathBuf,
    /// Derived figures plus every raw counter of the change log header.
    pub stats: ReportStats,
    /// Unconsumed ring records (only with `--dump`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub records: Option<Vec<RecordOut>>,
    /// Dirty bitmap ranges, active or pending, rounded to the tracking block (only with `--dump`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty_ranges: Option<Vec<RangeOut>>,
}

/// Derived statistics, with the raw header counters flattened beside them.
#[derive(Debug, Serialize)]
pub struct ReportStats {
    /// `data`, `metadata` or `bitmap`.
    pub capture_mode: &'static str,
    /// Dirty blocks not yet acknowledged by the target (active + pending).
    pub dirty_blocks: u64,
    /// Change-block (tracking block) size in bytes.
    pub tracking_block_size: u32,
    /// Ring fill, percent of capacity.
    pub ring_fill_percent: f64,
    /// Bytes of completed writes.
    pub bytes_written: u64,
    /// Alerts an admin must see (bitmap mode, filtering stopped, resync flagged, crashed producer).
    pub alerts: Vec<String>,
    /// Set when a resync of the volume is flagged (filtering was stopped).
    pub resync_required: Option<crate::volumes::ResyncMarker>,
    /// Write-size histogram, smallest bucket first.
    pub write_sizes: Vec<Bucket>,
    /// Read-size histogram, smallest bucket first.
    pub read_sizes: Vec<Bucket>,
    /// The raw counters.
    #[serde(flatten)]
    pub raw: Stats,
}

/// One bucket of an IO-size histogram: requests of at most `size` (the last bucket: larger).
#[derive(Debug, Serialize)]
pub struct Bucket {
    /// Bucket label, e.g. `4K` or `>4M`.
    pub size: &'static str,
    /// Requests counted in it.
    pub count: u64,
}

/// One unconsumed ring record.
#[derive(Debug, Serialize)]
pub struct RecordOut {
    /// Sequence number.
    pub seq: u64,
    /// `data`, `metadata`, `zero` or `tag`.
    pub kind: &'static str,
    /// Volume byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Capture time, ns since the Unix epoch.
    pub timestamp_ns: u64,
}

/// A byte range of the volume.
#[derive(Debug, Serialize)]
pub struct RangeOut {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

fn mode_name(m: CaptureMode) -> &'static str {
    match m {
        CaptureMode::Data => "data",
        CaptureMode::Metadata => "metadata",
        CaptureMode::Bitmap => "bitmap",
    }
}

fn kind_name(k: RecordKind) -> &'static str {
    match k {
        RecordKind::Data => "data",
        RecordKind::Metadata => "metadata",
        RecordKind::Zero => "zero",
        RecordKind::Tag => "tag",
    }
}

fn histogram(counts: &[u64]) -> Vec<Bucket> {
    HIST_LABELS
        .iter()
        .zip(counts)
        .map(|(&size, &count)| Bucket { size, count })
        .collect()
}

fn alerts(s: &Stats) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(since) = s.bitmap_mode_since_ns {
        let secs = agent_core_now_ns().saturating_sub(since) / 1_000_000_000;
        out.push(format!(
            "in bitmap mode for {secs} s: write order is lost until the bitmap drains (no consistent point until then)"
        ));
    }
    if !s.filtering {
        out.push("filtering stopped: writes are tracked in the bitmap only".into());
    }
    let alive = u32::try_from(s.producer_pid).is_ok_and(crate::status::pid_alive);
    if s.producer_state == "running" && !alive {
        out.push(format!(
            "producer pid {} is gone without a clean shutdown: the next open recovers in-flight writes",
            s.producer_pid
        ));
    }
    out
}

fn agent_core_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Builds the report of the change log at `path` (`state_dir`: where a
/// resync flag of the volume would be).
pub fn report(
    volume: &str,
    path: &Path,
    state_dir: &Path,
    with_contents: bool,
) -> Result<VolumeReport> {
    let view = ChangeLogView::open(path).with_context(|| {
        format!(
            "opening the change log of volume {volume} at {}",
            path.display()
        )
    })?;
    let raw = view.stats();
    let resync_required = crate::volumes::read_resync_marker(state_dir, volume);
    let mut alerts = alerts(&raw);
    if let Some(m) = &resync_required {
        alerts.push(format!("resync required: {}", m.reason));
    }
    let stats = ReportStats {
        capture_mode: mode_name(raw.mode),
        dirty_blocks: raw.dirty_blocks_active + raw.dirty_blocks_pending,
        tracking_block_size: raw.block_size,
        ring_fill_percent: if raw.ring_capacity == 0 {
            0.0
        } else {
            (raw.ring_used_bytes as f64 * 1000.0 / raw.ring_capacity as f64).round() / 10.0
        },
        bytes_written: raw.write_bytes,
        alerts,
        resync_required,
        write_sizes: histogram(&raw.write_size_histogram),
        read_sizes: histogram(&raw.read_size_histogram),
        raw,
    };
    let (records, dirty_ranges) = if with_contents {
        let records = view
            .records()
            .map(|r| RecordOut {
                seq: r.seq,
                kind: kind_name(r.kind),
                offset: r.offset,
                len: r.len,
                timestamp_ns: r.timestamp_ns,
            })
            .collect();
        let dirty = view
            .dirty_ranges()
            .into_iter()
            .map(|(offset, len)| RangeOut { offset, len })
            .collect();
        (Some(records), Some(dirty))
    } else {
        (None, None)
    };
    Ok(VolumeReport {
        volume: volume.to_owned(),
        change_log: path.to_owned(),
        stats,
        records,
        dirty_ranges,
    })
}

/// Volume names with a change log in `shm_dir`, sorted.
pub fn list_volumes(shm_dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(shm_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", shm_dir.display())),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", shm_dir.display()))?;
        let name = entry.file_name();
        if let Some(vol) = name.to_str().and_then(|n| n.strip_suffix(".clog")) {
            names.push(vol.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Renders a report as text for an admin.
pub fn render_text(r: &VolumeReport) -> String {
    let s = &r.stats;
    let raw = &s.raw;
    let t = &raw.transitions;
    let mut o = String::new();
    let _ = writeln!(o, "Volume                  : {}", r.volume);
    let _ = writeln!(
        o,
        "Volume UUID / generation: {} / {}",
        raw.volume_uuid, raw.generation
    );
    let _ = writeln!(
        o,
        "Volume size             : {} ({} bytes)",
        human(raw.volume_size),
        raw.volume_size
    );
    let _ = writeln!(o, "Capture mode            : {}", s.capture_mode);
    let _ = writeln!(
        o,
        "Filtering               : {}",
        if raw.filtering { "on" } else { "STOPPED" }
    );
    let _ = writeln!(
        o,
        "Change block size       : {} bytes",
        s.tracking_block_size
    );
    let _ = writeln!(
        o,
        "Dirty blocks pending    : {} ({} not yet taken, {} awaiting target ack)",
        s.dirty_blocks, raw.dirty_blocks_active, raw.dirty_blocks_pending
    );
    let _ = writeln!(
        o,
        "Ring                    : {} of {} used ({:.1}%)",
        human(raw.ring_used_bytes),
        human(raw.ring_capacity),
        s.ring_fill_percent
    );
    let _ = writeln!(
        o,
        "Writes                  : {} ({})",
        raw.writes,
        human(raw.write_bytes)
    );
    let _ = writeln!(
        o,
        "Zero/trim ops           : {} ({})",
        raw.zero_ops,
        human(raw.zero_bytes)
    );
    let _ = writeln!(
        o,
        "Reads                   : {} ({})",
        raw.reads,
        human(raw.read_bytes)
    );
    let _ = writeln!(
        o,
        "Records                 : {} data, {} metadata, {} zero, {} bitmap-only writes",
        raw.data_records, raw.metadata_records, raw.zero_records, raw.bitmap_writes
    );
    let _ = writeln!(
        o,
        "Drained / committed     : {} / {} records, {} / {} bitmap blocks",
        raw.records_drained,
        raw.records_committed,
        raw.bitmap_blocks_drained,
        raw.bitmap_blocks_committed
    );
    let _ = writeln!(
        o,
        "Mode changes            : data->metadata {}, metadata->bitmap {}, data->bitmap {}, bitmap->data {}, metadata->data {}, filtering stops {}",
        t.data_to_metadata, t.metadata_to_bitmap, t.data_to_bitmap, t.bitmap_to_data, t.metadata_to_data, t.filtering_stops
    );
    let _ = writeln!(
        o,
        "Tags                    : {} inserted, {} refused",
        raw.tags_inserted, raw.tags_refused
    );
    let _ = writeln!(
        o,
        "Producer                : pid {} ({})",
        raw.producer_pid, raw.producer_state
    );
    let _ = writeln!(
        o,
        "IO size histogram       :   size      writes       reads"
    );
    for (i, label) in HIST_LABELS.iter().enumerate() {
        let (w, rd) = (raw.write_size_histogram[i], raw.read_size_histogram[i]);
        if w > 0 || rd > 0 {
            let _ = writeln!(o, "                          {label:>6} {w:>11} {rd:>11}");
        }
    }
    for a in &s.alerts {
        let _ = writeln!(o, "ALERT: {a}");
    }
    if let (Some(records), Some(dirty)) = (&r.records, &r.dirty_ranges) {
        let _ = writeln!(o, "Unconsumed ring records : {}", records.len());
        for rec in records {
            let _ = writeln!(
                o,
                "  seq {:>10} {:<8} offset {:>14} len {:>10}",
                rec.seq, rec.kind, rec.offset, rec.len
            );
        }
        let _ = writeln!(o, "Dirty ranges            : {}", dirty.len());
        for d in dirty {
            let _ = writeln!(o, "  offset {:>14} len {:>12}", d.offset, d.len);
        }
    }
    o
}

/// Runs `drvutil` and returns what it prints.
pub fn run(args: &DrvutilArgs) -> Result<String> {
    if args.kernel {
        let r = crate::kernel_info::collect();
        return Ok(if args.json {
            serde_json::to_string_pretty(&r).context("serialising the report")? + "\n"
        } else {
            crate::kernel_info::render_text(&r)
        });
    }
    if let Some((v, on)) = args
        .stop_filtering
        .as_ref()
        .map(|v| (v, false))
        .or(args.start_filtering.as_ref().map(|v| (v, true)))
    {
        return set_filtering(args, v, on);
    }
    let path_of = |v: &str| args.shm_dir.join(format!("{v}.clog"));
    let sd = &args.state_dir;
    let reports = if let Some(v) = &args.ps {
        vec![report(v, &path_of(v), sd, false)?]
    } else if let Some(v) = &args.dump {
        vec![report(v, &path_of(v), sd, true)?]
    } else if args.pas {
        list_volumes(&args.shm_dir)?
            .iter()
            .map(|v| report(v, &path_of(v), sd, false))
            .collect::<Result<Vec<_>>>()?
    } else {
        bail!("nothing to do: pass --ps VOLUME, --pas, --dump VOLUME, --kernel, --stop-filtering VOLUME or --start-filtering VOLUME (see --help)");
    };
    if args.json {
        let text = if args.pas {
            serde_json::to_string_pretty(&reports)
        } else {
            serde_json::to_string_pretty(&reports[0])
        };
        return Ok(text.context("serialising the report")? + "\n");
    }
    if reports.is_empty() {
        return Ok(format!(
            "no protected volumes (no change logs in {})\n",
            args.shm_dir.display()
        ));
    }
    Ok(reports
        .iter()
        .map(render_text)
        .collect::<Vec<_>>()
        .join("\n"))
}

/// `--stop-filtering` / `--start-filtering`: asks the agent serving `volume`
/// over its admin socket.
fn set_filtering(args: &DrvutilArgs, volume: &str, on: bool) -> Result<String> {
    let socket =
        crate::volumes::resolve_socket(args.admin_socket.as_deref(), &args.shm_dir, Some(volume));
    let req = crate::volumes::AgentRequest::SetFiltering {
        volume: volume.to_owned(),
        on,
    };
    let v: serde_json::Value =
        crate::volumes::call(&socket, &req, std::time::Duration::from_secs(30)).with_context(
            || {
                format!(
                    "{} filtering of {volume} via {}",
                    if on { "starting" } else { "stopping" },
                    socket.display()
                )
            },
        )?;
    if args.json {
        return Ok(serde_json::to_string_pretty(&v).context("serialising")? + "\n");
    }
    let resync = if v["resync_required"].is_null() {
        String::new()
    } else {
        format!(
            "; resync required ({})",
            v["resync_required"]["reason"].as_str().unwrap_or("flagged")
        )
    };
    Ok(format!(
        "{volume}: filtering {}{resync}\n",
        if on { "started" } else { "stopped" }
    ))
}
