//! `drvutil` reports what a real change log holds: counts, histogram, mode,
//! alerts, ring records and dirty ranges.

use agent_core::{ChangeLog, ChangeLogConfig, ChangeSink};
use tools::drvutil::{run, DrvutilArgs};

fn args(dir: &std::path::Path) -> DrvutilArgs {
    DrvutilArgs {
        ps: None,
        pas: false,
        dump: None,
        kernel: false,
        json: true,
        shm_dir: dir.join("shm"),
        state_dir: dir.join("state"),
        stop_filtering: None,
        start_filtering: None,
        admin_socket: None,
    }
}

fn open_log(dir: &std::path::Path, name: &str, ring_bytes: u64) -> ChangeLog {
    let mut cfg = ChangeLogConfig::new(name, 64 << 20);
    cfg.shm_dir = dir.join("shm");
    cfg.state_dir = dir.join("state");
    cfg.ring_bytes = ring_bytes;
    ChangeLog::open_or_create(cfg).expect("open change log")
}

fn write(log: &ChangeLog, offset: u64, len: usize) {
    let t = log.begin(offset, len as u64);
    log.complete_write(t, &vec![0x5a; len]);
}

#[test]
fn dump_lists_records_histogram_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let log = open_log(dir.path(), "vol0", 1 << 20);
    write(&log, 0, 4096);
    write(&log, 1 << 20, 65536);
    let t = log.begin(8 << 20, 1 << 20);
    log.complete_zero(t);
    log.note_read(512);

    let mut a = args(dir.path());
    a.dump = Some("vol0".into());
    let v: serde_json::Value = serde_json::from_str(&run(&a).unwrap()).unwrap();
    let s = &v["stats"];
    assert_eq!(s["capture_mode"], "data");
    assert_eq!(s["writes"], 2);
    assert_eq!(s["bytes_written"], 4096 + 65536);
    assert_eq!(s["tracking_block_size"], 4096);
    let hist: Vec<(String, u64)> = s["write_sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["size"].as_str().unwrap().to_owned(),
                b["count"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(hist.first().unwrap().0, "512B", "smallest bucket first");
    assert!(
        hist.contains(&("4K".into(), 1)) && hist.contains(&("64K".into(), 1)),
        "{hist:?}"
    );
    let reads: u64 = s["read_sizes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["count"].as_u64().unwrap())
        .sum();
    assert_eq!(reads, 1);
    let recs: Vec<(String, u64, u64)> = v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_owned(),
                r["offset"].as_u64().unwrap(),
                r["len"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        recs,
        vec![
            ("data".into(), 0, 4096),
            ("data".into(), 1 << 20, 65536),
            ("zero".into(), 8 << 20, 1 << 20)
        ]
    );
    assert_eq!(v["dirty_ranges"].as_array().unwrap().len(), 0);
    log.close().unwrap();
}

#[test]
fn bitmap_mode_is_reported_as_an_alert_with_dirty_ranges() {
    let dir = tempfile::tempdir().unwrap();
    // A 4 KiB ring cannot hold a 64 KiB payload, nor many metadata records.
    let log = open_log(dir.path(), "tiny", 4096);
    for i in 0..200u64 {
        write(&log, i * 65536, 65536);
    }
    let mut a = args(dir.path());
    a.dump = Some("tiny".into());
    let v: serde_json::Value = serde_json::from_str(&run(&a).unwrap()).unwrap();
    assert_eq!(v["stats"]["capture_mode"], "bitmap");
    let alerts = v["stats"]["alerts"].as_array().unwrap();
    assert!(
        alerts
            .iter()
            .any(|a| a.as_str().unwrap().contains("bitmap mode")),
        "{alerts:?}"
    );
    assert!(v["stats"]["dirty_blocks"].as_u64().unwrap() > 0);
    assert!(!v["dirty_ranges"].as_array().unwrap().is_empty());

    // Text output names the mode and the alert too.
    a.json = false;
    let text = run(&a).unwrap();
    assert!(text.contains("Capture mode            : bitmap"), "{text}");
    assert!(text.contains("ALERT: in bitmap mode"), "{text}");
    log.close().unwrap();
}

#[test]
fn pas_lists_every_volume_and_ps_refuses_unknown_ones() {
    let dir = tempfile::tempdir().unwrap();
    let a_log = open_log(dir.path(), "alpha", 1 << 20);
    let b_log = open_log(dir.path(), "beta", 1 << 20);
    let mut a = args(dir.path());
    a.pas = true;
    let v: serde_json::Value = serde_json::from_str(&run(&a).unwrap()).unwrap();
    let names: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["volume"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "beta"]);

    let mut a = args(dir.path());
    a.ps = Some("gamma".into());
    let err = format!("{:#}", run(&a).unwrap_err());
    assert!(err.contains("gamma"), "{err}");

    let a = args(dir.path());
    assert!(run(&a).is_err(), "no action must be an error");
    a_log.close().unwrap();
    b_log.close().unwrap();
}
