//! `rewind replay`: replays a block trace against an NBD export with
//! self-verifying block contents, then (with `--verify`) checks the
//! source, the replica and the recovery points against the model of what
//! was written. The project's main correctness oracle.
//!
//! Modules: [`trace`] (parsers), [`block`] (the self-verifying block
//! format), [`model`] (the oracle), [`engine`] (replay over NBD),
//! [`verify`] (readers and checks), [`capture`] (`rewind export --trace-out`).

pub mod block;
pub mod capture;
pub mod engine;
pub mod model;
pub mod trace;
pub mod verify;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use filter_nbd::client::{ConnectOptions, Connection, NbdUri};

use engine::{Barrier, EngineOpts, MapMode, Speed};
use trace::{Format, Malformed};

/// Arguments of `rewind replay`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    rewind replay --trace tests/traces/sqlite.iolog.zst --uri 'nbd+unix:///vol0?socket=/run/rewind/vol0.sock'\n  \
    rewind replay --trace msr_hm_0.csv --format msr --volume-filter hm_0 --uri nbd://127.0.0.1:10809/vol0 --speed x10\n  \
    rewind replay --trace build.iolog.zst --uri URI --bookmark-every 500 --verify --replica /srv/replica/vol0.img --json\n\n\
Every 4 KiB block written carries a header (offset, sequence, writer, run, checksum), so a \
misplaced, stale, torn or lost block is detected and named. Exit status 1 on any mismatch.")]
pub struct ReplayArgs {
    /// Trace file (plain or zstd-compressed).
    #[arg(long, value_name = "FILE")]
    pub trace: PathBuf,
    /// Trace format (default: detected from the content).
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Keep only this volume/device of a multi-volume trace (blkparse maj,min;
    /// MSR HOST_DISK; Alibaba device id; Tencent volume id).
    #[arg(long, value_name = "ID")]
    pub volume_filter: Option<String>,
    /// Skip malformed trace lines (listed with their line numbers) instead of refusing the trace.
    #[arg(long)]
    pub skip_malformed: bool,
    /// The export to replay against: nbd+unix:///NAME?socket=PATH or nbd://127.0.0.1:PORT/NAME.
    #[arg(long, value_name = "URI")]
    pub uri: String,
    /// asap, original, or xN (N times faster than recorded, e.g. x10 or x0.5).
    #[arg(long, default_value = "asap", value_parser = parse_speed)]
    pub speed: Speed,
    /// Requests in flight (default: the trace's observed queue depth, else 16).
    #[arg(long, value_name = "N")]
    pub queue_depth: Option<usize>,
    /// When the trace addresses more than the export: wrap offsets or scale them.
    #[arg(long, value_enum, default_value = "wrap")]
    pub map: MapMode,
    /// Insert a bookmark every N trace operations.
    #[arg(long, value_name = "N", conflicts_with = "bookmark_interval")]
    pub bookmark_every: Option<u64>,
    /// Insert a bookmark every DURATION of replay (e.g. 500ms, 2s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub bookmark_interval: Option<Duration>,
    /// Volume name for bookmarks (`rewind bookmark create NAME --volume V`); without it
    /// bookmarks are recorded only in the report (as time points).
    #[arg(long, value_name = "NAME")]
    pub volume: Option<String>,
    /// Extra arguments for `rewind bookmark create` (repeatable, e.g. --bookmark-arg=--admin-socket=PATH).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub bookmark_arg: Vec<String>,
    /// Sample this many additional time points (quiesced barriers) for --verify.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub time_points: u64,
    /// After the replay: check the source, then the replica, then every bookmark and time point.
    #[arg(long)]
    pub verify: bool,
    /// The replica to check (a file or block device), with --verify.
    #[arg(long, value_name = "PATH", conflicts_with = "replica_uri")]
    pub replica: Option<PathBuf>,
    /// The replica served over NBD, with --verify.
    #[arg(long, value_name = "URI")]
    pub replica_uri: Option<String>,
    /// How long to wait for the replica to catch up (drain) before judging it.
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// The target's journal directory of this volume (`rewind target --dir D`: D/VOLUME/journal):
    /// verify every bookmark and time point through read-only snapshot views of it.
    #[arg(long, value_name = "DIR")]
    pub journal_dir: Option<PathBuf>,
    /// Also check this image (file or NBD URI) as the volume after SEQ operations
    /// (repeatable), e.g. a snapshot served by `rewind snapshot create`.
    #[arg(long, value_name = "SEQ=PATH|URI", value_parser = parse_point)]
    pub point: Vec<(u64, String)>,
    /// Do not replay: rebuild the model of run --run-id from the trace and verify only.
    #[arg(long, requires = "run_id")]
    pub verify_only: bool,
    /// At these trace positions (operations done), drain, print a JSON `sync` line on
    /// stdout and wait for a line on stdin (fault-scenario harnesses).
    #[arg(long, value_name = "N")]
    pub sync_at: Vec<u64>,
    /// Replay run id stamped into blocks (default: random).
    #[arg(long, value_name = "N")]
    pub run_id: Option<u32>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to FILE.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

fn parse_point(s: &str) -> Result<(u64, String), String> {
    let (a, b) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected SEQ=PATH or SEQ=URI"))?;
    let seq = a
        .parse()
        .map_err(|_| format!("{a:?} is not an operation count"))?;
    if b.is_empty() {
        return Err(format!("{s:?}: empty path"));
    }
    Ok((seq, b.to_string()))
}

fn parse_speed(s: &str) -> Result<Speed, String> {
    match s {
        "asap" => Ok(Speed::Asap),
        "original" => Ok(Speed::Factor(1.0)),
        _ => match s.strip_prefix('x').and_then(|f| f.parse::<f64>().ok()) {
            Some(f) if f > 0.0 && f.is_finite() => Ok(Speed::Factor(f)),
            _ => Err(format!("{s:?}: use asap, original or xN (N > 0)")),
        },
    }
}

/// Parses `500ms`, `2s`, `1m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 500ms, 2s or 1m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        u => return Err(format!("{s:?}: unknown unit {u:?} (ms, s, m, h)")),
    };
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(format!("{s:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A quiesced point of the replay: everything before `seq` answered and
/// flushed, nothing after it sent.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PointRec {
    /// Bookmark name, or `time-N` for sampled time points.
    pub name: String,
    /// bookmark / time / sync.
    pub kind: &'static str,
    /// Operations done (the model cutoff).
    pub seq: u64,
    /// Wall clock (UTC, ns since the epoch) at the point.
    pub time_ns: u64,
    /// Expected content digest of the touched blocks.
    pub digest: String,
    /// Whether the bookmark was inserted through the agent.
    pub bookmarked: bool,
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Runs `rewind replay`; returns whether everything verified.
pub fn run(args: ReplayArgs) -> Result<bool> {
    let text = trace::read_trace_file(&args.trace)
        .with_context(|| format!("reading {}", args.trace.display()))?;
    let format = match args.format {
        Some(f) => f,
        None => trace::detect(&text).with_context(|| format!("{}", args.trace.display()))?,
    };
    let mode = if args.skip_malformed {
        Malformed::Skip
    } else {
        Malformed::Refuse
    };
    let tr = trace::parse(&text, format, args.volume_filter.as_deref(), mode)
        .with_context(|| format!("parsing {} as {format:?}", args.trace.display()))?;
    for (line, why) in tr.skipped.iter().take(20) {
        eprintln!("replay: skipped line {line}: {why}");
    }
    if tr.skipped.len() > 20 {
        eprintln!("replay: ... {} more lines skipped", tr.skipped.len() - 20);
    }

    let uri: NbdUri = args.uri.parse()?;
    let conn = Connection::connect(&uri, &ConnectOptions::default())
        .with_context(|| format!("connecting to {uri}"))?;
    let size = conn.info.size;
    let (plan, map) = engine::plan(&tr, size, args.map)?;
    if map.mode != MapMode::Identity {
        eprintln!(
            "replay: the trace addresses {} bytes, the export has {size}: offsets {} onto the export",
            map.trace_end,
            if map.mode == MapMode::Wrap { "wrapped" } else { "scaled" }
        );
    }
    if map.rounded > 0 {
        eprintln!(
            "replay: {} operations not aligned to 4 KiB were widened to whole blocks",
            map.rounded
        );
    }
    let qd = args.queue_depth.or(tr.queue_depth).unwrap_or(16).max(1);
    let run_id = args.run_id.unwrap_or_else(rand_u32);
    let mut model = model::Model::new(run_id);

    // barriers: bookmarks every N, sampled time points, sync positions
    let n = plan.len() as u64;
    let mut barriers: Vec<(u64, Barrier)> = Vec::new();
    if let Some(every) = args.bookmark_every.filter(|&e| e > 0) {
        barriers.extend(
            (1..)
                .map(|i| i * every)
                .take_while(|&p| p <= n)
                .map(|p| (p, Barrier::Bookmark)),
        );
    }
    for i in 1..=args.time_points {
        let p = n * i / (args.time_points + 1);
        if p > 0 {
            barriers.push((p, Barrier::TimePoint));
        }
    }
    barriers.extend(args.sync_at.iter().map(|&p| (p, Barrier::Sync)));
    barriers.sort_by_key(|b| b.0);

    let opts = EngineOpts {
        queue_depth: qd,
        speed: args.speed,
        writer: engine::WRITER,
        barriers,
        bookmark_interval: args.bookmark_interval,
        progress: !args.quiet,
    };
    let mut points: Vec<PointRec> = Vec::new();
    if args.verify_only {
        engine::apply_dry(&plan, &mut model, conn.info.flags);
        let last = plan.last().map_or(0, |o| o.seq);
        drop(conn);
        let v = verify::verify_all(&args, &uri, &model, last, &points, None)?;
        let report = serde_json::json!({
            "run_id": run_id, "map": map, "blocks_touched": model.touched_count(),
            "expected_digest": model::hex(&model.digest()), "verify": v.json, "mismatches": v.mismatches,
        });
        return finish_report(&args, &report, v.mismatches, 0, model.touched_count());
    }
    let mut eng = engine::Engine::new(conn);
    let exe = std::env::current_exe().context("locating the rewind binary")?;
    let mut hook = |kind: Barrier, seq: u64, m: &model::Model| -> Result<()> {
        let time_ns = now_ns();
        let digest = model::hex(&m.digest());
        match kind {
            Barrier::Bookmark => {
                let name = format!("replay-{run_id:08x}-{}", points.len());
                let bookmarked = match &args.volume {
                    Some(v) => match create_bookmark(&exe, &name, v, &args.bookmark_arg)? {
                        None => true,
                        Some(why) => {
                            eprintln!("replay: bookmark {name} not inserted: {why}");
                            false
                        }
                    },
                    None => false,
                };
                points.push(PointRec {
                    name,
                    kind: "bookmark",
                    seq,
                    time_ns,
                    digest,
                    bookmarked,
                });
            }
            Barrier::TimePoint => points.push(PointRec {
                name: format!("time-{}", points.len()),
                kind: "time",
                seq,
                time_ns,
                digest,
                bookmarked: false,
            }),
            Barrier::Sync => {
                let line =
                    serde_json::json!({"event": "sync", "position": seq, "time_ns": time_ns});
                let mut out = std::io::stdout().lock();
                writeln!(out, "{line}")?;
                out.flush()?;
                let mut buf = String::new();
                std::io::stdin().lock().read_line(&mut buf)?;
            }
        }
        Ok(())
    };
    let replayed = eng.run(&plan, &mut model, &opts, &mut hook);
    let read_mismatches = std::mem::take(&mut eng.read_mismatches);
    let stats = eng.stats.clone();
    let timeline = eng.timeline();
    let _ = eng.finish();
    replayed?;
    if !args.quiet {
        eprintln!(
            "replay: {} ops in {:.2}s ({:.0} IOPS, {:.1} MB/s), {} blocks touched, {} read blocks checked",
            stats.ops,
            stats.seconds,
            stats.ops as f64 / stats.seconds.max(1e-9),
            (stats.bytes_written + stats.bytes_read) as f64 / stats.seconds.max(1e-9) / 1e6,
            model.touched_count(),
            stats.read_blocks_checked
        );
    }

    let last = plan.last().map_or(0, |o| o.seq);
    let mut report = serde_json::json!({
        "trace": {
            "file": args.trace.display().to_string(),
            "format": tr.format,
            "ops": tr.ops.len(),
            "skipped_lines": tr.skipped.iter().map(|(l, w)| serde_json::json!({"line": l, "reason": w})).collect::<Vec<_>>(),
            "volume": tr.volume,
            "queue_depth": tr.queue_depth,
            "merges": tr.merges,
        },
        "run_id": run_id,
        "queue_depth": qd,
        "map": map,
        "stats": stats,
        "blocks_touched": model.touched_count(),
        "expected_digest": model::hex(&model.digest()),
        "points": points,
        "read_mismatches": read_mismatches,
    });
    let mut mismatches = read_mismatches.len() as u64;

    if args.verify {
        let t = std::time::Instant::now();
        let v = verify::verify_all(&args, &uri, &model, last, &points, Some(&timeline))?;
        mismatches += v.mismatches;
        report["verify"] = v.json;
        report["verify_seconds"] = serde_json::json!(t.elapsed().as_secs_f64());
    }
    report["mismatches"] = serde_json::json!(mismatches);
    finish_report(&args, &report, mismatches, stats.ops, model.touched_count())
}

fn finish_report(
    args: &ReplayArgs,
    report: &serde_json::Value,
    mismatches: u64,
    ops: u64,
    touched: usize,
) -> Result<bool> {
    let text = serde_json::to_string_pretty(report)?;
    if let Some(p) = &args.report {
        std::fs::write(p, &text).with_context(|| format!("writing {}", p.display()))?;
    }
    if args.json {
        println!("{text}");
    } else {
        println!("replayed {ops} ops ({touched} blocks touched); {mismatches} mismatches");
        if let Some(v) = report.get("verify") {
            println!("{}", verify::summary(v));
        }
    }
    Ok(mismatches == 0)
}

/// Inserts bookmark `name` through the agent (`rewind bookmark create`). A
/// refusal because no exact point exists right now (the change log is not in
/// data mode while the replicator catches up) is retried for up to 15 s, then
/// reported as `Ok(Some(reason))`: the replay goes on without that bookmark.
fn create_bookmark(
    exe: &std::path::Path,
    name: &str,
    volume: &str,
    extra: &[String],
) -> Result<Option<String>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let out = std::process::Command::new(exe)
            .args(["bookmark", "create", name, "--volume", volume])
            .args(extra)
            .output()
            .context("running `rewind bookmark create`")?;
        if out.status.success() {
            return Ok(None);
        }
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if !err.contains("not taken") {
            bail!("`rewind bookmark create {name} --volume {volume}` failed: {err}");
        }
        if std::time::Instant::now() >= deadline {
            return Ok(Some(err));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    let v = u32::from_le_bytes(b);
    if v == 0 {
        (now_ns() as u32) | 1
    } else {
        v
    }
}
