//! A fault scenario through the replay oracle: the fio trace replayed into a
//! protected volume while the replicator is killed (-9), the replication link
//! is cut for 2 s and the target is killed (-9), each at a fixed trace
//! position; afterwards source, replica and every bookmark and time point
//! verify with zero mismatches.

use rewind_tests::replay::committed_traces;
use rewind_tests::scenario::{parse_schedule, run, Options};
use rewind_tests::*;
use std::time::Duration;

#[test]
fn replay_scenario_kill_and_link_cut_end_with_zero_mismatches() {
    let s = Scratch::new("replay-scenario");
    let tr = committed_traces()
        .into_iter()
        .find(|p| p.to_string_lossy().contains("fio-mixed"))
        .expect("fio trace");
    let steps = parse_schedule("700:kill=replicator,1400:cut=2s,2100:kill=target").unwrap();
    let opts = Options {
        size: 160 * MIB,
        bookmark_every: 1000,
        restart_delay: Duration::from_millis(300),
    };
    let r = run(&s, &tr, &steps, &opts);
    let sc = &r["scenario"];
    assert_eq!(sc["faults"].as_array().map(Vec::len), Some(3), "{sc}");
    assert_eq!(
        sc["replay_ok"],
        true,
        "{}",
        serde_json::to_string_pretty(&r).unwrap()
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
    // the link really was cut: the replicator had to reconnect through the proxy
    assert!(
        sc["proxy_connections_accepted"].as_u64().unwrap() >= 2,
        "{sc}"
    );
}
