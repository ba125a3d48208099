//! Fault scenarios through the replay oracle: the fio trace replayed into a
//! protected volume while the replicator is killed (-9), the replication link
//! is cut for 2 s, the target's disk is full for 4 s and the target is
//! killed (-9), each at a fixed trace position; afterwards source, replica
//! and every bookmark and time point verify with zero mismatches.

use rewind_tests::scenario::{parse_schedule, run, Options};
use rewind_tests::*;
use serde_json::Value;
use std::time::Duration;

/// Zero mismatches, replica equal to the source, bookmarks verified.
fn assert_verified(r: &Value) {
    let sc = &r["scenario"];
    assert_eq!(
        sc["replay_ok"],
        true,
        "{}",
        serde_json::to_string_pretty(r).unwrap()
    );
    assert_eq!(
        r["mismatches"],
        0,
        "{}",
        serde_json::to_string_pretty(&r["verify"]).unwrap()
    );
    let v = &r["verify"];
    assert_eq!(v["replica"]["compare_with_source"]["differing_blocks"], 0);
    assert!(v["source"]["blocks_checked"].as_u64().unwrap() > 1000);
    let verified = v["points"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["blocks_checked"].as_u64().is_some_and(|n| n > 0))
        .count();
    assert!(verified >= 2, "{}", v["points"]);
}

fn fio_trace() -> std::path::PathBuf {
    rewind_tests::replay::committed_traces()
        .into_iter()
        .find(|p| p.to_string_lossy().contains("fio-mixed"))
        .expect("fio trace")
}

#[test]
fn replay_scenario_kill_and_link_cut_end_with_zero_mismatches() {
    let s = Scratch::new("replay-scenario");
    let tr = fio_trace();
    let steps = parse_schedule("700:kill=replicator,1400:cut=2s,2100:kill=target").unwrap();
    let opts = Options {
        size: 160 * MIB,
        bookmark_every: 1000,
        restart_delay: Duration::from_millis(300),
        target_fs_size: 256 * MIB,
        ring_size: None,
    };
    let r = run(&s, &tr, &steps, &opts);
    let sc = &r["scenario"];
    assert_eq!(sc["faults"].as_array().map(Vec::len), Some(3), "{sc}");
    assert_verified(&r);
    // the link really was cut: the replicator had to reconnect through the proxy
    assert!(
        sc["proxy_connections_accepted"].as_u64().unwrap() >= 2,
        "{sc}"
    );
}

/// The target's file system (its own small ext4) filled until `ENOSPC` for
/// 4 s mid-trace, between a link cut and a kill -9 of the target (which then
/// restarts on the still-full disk): the target reports the full disk in its
/// status, nobody restarts anything by hand, and afterwards source, replica
/// and every bookmark verify with zero mismatches, without a resync.
#[test]
fn replay_scenario_target_disk_full_ends_with_zero_mismatches() {
    let s = Scratch::new("replay-diskfull");
    let steps = parse_schedule("700:cut=2s,1400:diskfull=4s,2100:kill=target").unwrap();
    let opts = Options {
        size: 160 * MIB,
        bookmark_every: 1000,
        restart_delay: Duration::from_millis(300),
        // Replica (up to 160 MiB: trims and write-zeroes now punch holes, but
        // the trace's data lands anywhere), journal and spool grow with the
        // outage: 256 MiB once filled up with the target's own data and never
        // recovered (a spool that could eat the space its apply needed, since
        // fixed by the low-space admission). The ballast fills whatever is
        // left, so headroom costs nothing but the ballast's size.
        target_fs_size: 512 * MIB,
        // Holds every write of the trace: the outage must not push the
        // source into metadata/bitmap mode, where the journal rightly refuses
        // the time points of the overflow (covered apart by
        // `replay_time_points_in_metadata_mode_are_exact_or_refused`), so this
        // test can expect every point served.
        ring_size: Some(256 * MIB),
    };
    let r = run(&s, &fio_trace(), &steps, &opts);
    let sc = &r["scenario"];
    assert_eq!(sc["faults"].as_array().map(Vec::len), Some(3), "{sc}");
    assert_verified(&r);
    // The disk really was full and the target said so while it was.
    let df = &sc["disk_full"][0];
    assert!(df["ballast_bytes"].as_u64().unwrap() > 0, "{sc}");
    assert!(
        df["alert"].as_str().is_some_and(
            |a| a.starts_with("target storage full") && a.contains("No space left on device")
        ),
        "no storage-full alert while the disk was full: {sc}"
    );
    // ... and no longer does.
    let alerts = sc["target_alerts_after"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        !alerts.iter().any(|a| a
            .as_str()
            .is_some_and(|a| a.starts_with("target storage full"))),
        "{sc}"
    );
    assert_eq!(sc["resync_passes"], 1, "a resync ran: {sc}");
    assert_eq!(sc["bitmap_mode_entered"], 0, "{sc}");
}
