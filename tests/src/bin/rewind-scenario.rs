//! `rewind-scenario`: replay a trace against a protected volume while faults
//! fire at given trace positions, then verify (see `rewind_tests::scenario`).
//!
//! Usage: rewind-scenario --trace FILE --schedule SCHEDULE [--size-mb N]
//!        [--bookmark-every N] [--restart-delay SECS] [--target-fs-mb N] [--ring-mb N]
//! e.g.   rewind-scenario --trace tests/traces/fio-mixed-ext4.iolog.zst \
//!            --schedule 700:kill=replicator,1400:cut=2s,2100:kill=target
//! Prints the replay report (JSON) with a `scenario` section; exit status 1 on
//! any mismatch. Needs the `rewind` binary (REWIND_BIN_DIR or target/debug).

use rewind_tests::scenario::{parse_schedule, run, Options};
use rewind_tests::Scratch;
use std::time::Duration;

fn usage(why: &str) -> ! {
    eprintln!("rewind-scenario: {why}\nusage: rewind-scenario --trace FILE --schedule SCHEDULE [--size-mb N] [--bookmark-every N] [--restart-delay SECS] [--target-fs-mb N] [--ring-mb N]");
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut trace, mut schedule) = (None, None);
    let mut opts = Options {
        size: 160 << 20,
        bookmark_every: 1000,
        restart_delay: Duration::from_millis(500),
        target_fs_size: 256 << 20,
        ring_size: None,
    };
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--trace" => trace = Some(val()),
            "--schedule" => schedule = Some(val()),
            "--size-mb" => {
                opts.size = val()
                    .parse::<u64>()
                    .unwrap_or_else(|_| usage("--size-mb N"))
                    << 20
            }
            "--target-fs-mb" => {
                opts.target_fs_size = val()
                    .parse::<u64>()
                    .unwrap_or_else(|_| usage("--target-fs-mb N"))
                    << 20
            }
            "--ring-mb" => {
                opts.ring_size = Some(
                    val()
                        .parse::<u64>()
                        .unwrap_or_else(|_| usage("--ring-mb N"))
                        << 20,
                )
            }
            "--bookmark-every" => {
                opts.bookmark_every = val()
                    .parse()
                    .unwrap_or_else(|_| usage("--bookmark-every N"))
            }
            "--restart-delay" => {
                let s: f64 = val()
                    .parse()
                    .unwrap_or_else(|_| usage("--restart-delay SECS"));
                if !(s.is_finite() && s >= 0.0) {
                    usage("--restart-delay SECS");
                }
                opts.restart_delay = Duration::from_secs_f64(s);
            }
            "-h" | "--help" => usage("help"),
            _ => usage(&format!("unknown argument {a:?}")),
        }
    }
    let trace = trace.unwrap_or_else(|| usage("--trace is required"));
    let steps = parse_schedule(&schedule.unwrap_or_else(|| usage("--schedule is required")))
        .unwrap_or_else(|e| usage(&e));
    let scratch = Scratch::new("scenario");
    let report = run(&scratch, std::path::Path::new(&trace), &steps, &opts);
    println!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    let ok = report["mismatches"] == 0 && report["scenario"]["replay_ok"] == true;
    std::process::exit(if ok { 0 } else { 1 });
}
