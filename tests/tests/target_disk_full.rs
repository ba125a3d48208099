//! The target's disk really fills up (ENOSPC) while the source keeps
//! writing: the target keeps running and says so in `rewind status --json`
//! (a `storage_full` status and a "target storage full" alert naming the
//! error), the source hears it and keeps tracking; once the ballast is
//! deleted, everything converges by itself (same target process, no restart
//! by hand), every acknowledged write is in the replica, and no resync runs.

use rewind_tests::diskfull::{Ballast, SmallFs};
use rewind_tests::replication::*;
use rewind_tests::*;
use serde_json::Value;
use std::time::{Duration, Instant};

const SIZE: u64 = 32 * MIB;

fn target_volume(doc: &Value) -> Value {
    doc["target"]["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|x| x["name"] == "vol0").cloned())
        .unwrap_or(Value::Null)
}

fn storage_full_alert(tv: &Value) -> Option<String> {
    tv["alerts"].as_array().and_then(|a| {
        a.iter()
            .filter_map(Value::as_str)
            .find(|s| s.starts_with("target storage full"))
            .map(str::to_owned)
    })
}

#[test]
fn target_disk_full_is_reported_and_converges_without_resync() {
    let s = Scratch::new("target-diskfull");
    let backing = s.join("vol.img");
    create_sparse(&backing, SIZE);
    // The replica (sparse, 32 MiB at most), journal and spool on 96 MiB of ext4.
    let small = SmallFs::create(&s, "tfs", 96 * MIB);
    let pki = Pki::new(&s, "pki");
    let export = Export::start(
        &s,
        &backing,
        ExportOpts {
            volume: Some("vol0".into()),
            export_name: Some("vol0".into()),
            ..Default::default()
        },
    );
    let mut target = Target::start_in(
        &s,
        small.mount.join("target"),
        s.join("tstate"),
        TargetOpts::tls(&pki),
    );
    let mut repl = Replicator::start(
        &s,
        target.addr,
        ReplicatorOpts {
            auth: Auth::Tls(pki.dir.clone()),
            host: "replicator".into(),
            server_name: "127.0.0.1".into(),
            volume: "vol0".into(),
            device: backing.clone(),
            shm_dir: export.shm_dir.clone(),
            compression: "none".into(),
            bandwidth: None,
            max_chunk: None,
            hash_block: None,
        },
    );
    let writer = Writer::start(export.uri(), SIZE, 11);
    writer.resume();
    std::thread::sleep(Duration::from_millis(800));
    writer.pause();
    wait_drained(&repl, &target, Duration::from_secs(60));
    let before = target.volume_status("vol0");
    let passes = before["resync_passes"].clone();
    let step1 =
        repl.status_json(Some(&target))["source"]["pairs"][0]["resync_step1_entered"].clone();
    let resync_blocks = before["status"]["resync_blocks"].clone();
    let pid = target.daemon.pid();

    // Fill the disk, keep writing at the source.
    let ballast = Ballast::fill(&target.dir);
    eprintln!(
        "ballast: {} bytes, {} bytes free",
        ballast.bytes(),
        small.free_bytes()
    );
    writer.resume();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (alert, tv, pair) = loop {
        let doc = repl.status_json(Some(&target));
        let tv = target_volume(&doc);
        let pair = doc["source"]["pairs"][0]["status"].clone();
        if let Some(a) = storage_full_alert(&tv) {
            break (a, tv, pair);
        }
        assert!(
            Instant::now() < deadline,
            "no storage-full report within 20 s:\n{}\n{}",
            serde_json::to_string_pretty(&doc).unwrap_or_default(),
            target.daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // The source's view is best effort: it usually hears the `SpoolFull`
    // error frame, but may be cut off by the close first (broken pipe).
    eprintln!("alert: {alert}\nsource: {}", pair["last_error"]);
    assert!(alert.contains("No space left on device"), "{alert}");
    assert!(
        tv["status"]["storage_full"]
            .as_str()
            .is_some_and(|m| m.contains("No space left on device")),
        "{tv}"
    );
    // Stays full for a while with writes going on: the target lives on.
    std::thread::sleep(Duration::from_secs(2));
    target.daemon.assert_alive();
    assert!(
        std::fs::read_to_string(&target.daemon.log)
            .unwrap_or_default()
            .contains("target storage full"),
        "the target logs the full disk"
    );
    writer.pause();
    let held = ballast.release();
    eprintln!("space released ({held} ballast bytes)");

    // Converges by itself: same process, no resync, every acked write there.
    let doc = wait_drained(&repl, &target, Duration::from_secs(60));
    target.daemon.assert_alive();
    assert_eq!(target.daemon.pid(), pid);
    assert_same(&backing, &target.replica("vol0"), "after the disk was full");
    let checked = writer.check(&target.replica("vol0"));
    assert!(checked > 0);
    let tv = target_volume(&doc);
    assert_eq!(tv["resync_passes"], passes, "a resync pass ran: {tv}");
    assert_eq!(tv["status"]["resync_blocks"], resync_blocks, "{tv}");
    assert_eq!(
        doc["source"]["pairs"][0]["resync_step1_entered"], step1,
        "{doc}"
    );
    assert!(tv["status"]["storage_full"].is_null(), "{tv}");
    assert_eq!(storage_full_alert(&tv), None, "{tv}");
    assert!(tv["status"]["store_recoveries"].as_u64() >= Some(1), "{tv}");
    drop(writer);
    repl.daemon.stop();
    target.daemon.stop();
    drop(export);
    drop(small);
}
