//! The target's disk really fills up (ENOSPC) while the source keeps
//! writing: the target keeps running and says so in `rewind status --json`
//! (a `storage_full` status and a "target storage full" alert naming the
//! error), the source hears it and keeps tracking; once the ballast is
//! deleted, everything converges by itself (same target process, no restart
//! by hand), every acknowledged write is in the replica, and no resync runs.
//!
//! And the journal alone, with its directory and its replica on two small
//! file systems filled in turn: a volume opens on a full journal disk, and
//! the apply that fails on the replica write *after* its undo record is
//! durable is finished by the reopen once space is back.

use journal::{
    ChunkExtent, ChunkIn, ExtentData, JournalError, RecoveryPoint, TargetVolume, VolumeIdentity,
};
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
    let export = Export::start(&s, &backing, ExportOpts::for_volume("vol0"));
    let mut target = Target::start_in(
        &s,
        small.mount.join("target"),
        s.join("tstate"),
        TargetOpts::tls(&pki),
    );
    let mut repl = Replicator::start(
        &s,
        target.addr,
        ReplicatorOpts::tls(&pki, "vol0", &backing, &export.shm_dir, "none"),
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
    // The error stays in the status as history, but it is no longer an
    // alert once spooling and applying work again.
    assert!(tv["status"]["last_error"].is_string(), "{tv}");
    assert!(
        !tv["alerts"].as_array().is_some_and(|a| a
            .iter()
            .filter_map(Value::as_str)
            .any(|s| s.starts_with("last error"))),
        "a resolved error is still an alert: {tv}"
    );
    assert!(tv["status"]["store_recoveries"].as_u64() >= Some(1), "{tv}");
    drop(writer);
    repl.daemon.stop();
    target.daemon.stop();
    drop(export);
    drop(small);
}

/// Volume "vol0" of `size` bytes, uuid all `uuid` bytes.
fn identity(uuid: u8, size: u64) -> VolumeIdentity {
    VolumeIdentity {
        name: "vol0".into(),
        uuid: [uuid; 16],
        generation: 1,
        size,
        block_size: 4096,
    }
}

fn chunk(seq: u64, offset: u64, data: &[u8]) -> ChunkIn {
    ChunkIn {
        first_seq: seq,
        last_seq: seq,
        source_time_ns: 1_700_000_000_000_000_000 + seq,
        horizon_seq: 0,
        extents: vec![ChunkExtent {
            offset,
            data: ExtentData::Data(data.to_vec().into()),
        }],
    }
}

#[test]
fn journal_on_full_disks_reopens_and_finishes_the_interrupted_apply() {
    let s = Scratch::new("journal-diskfull");
    let jfs = SmallFs::create(&s, "jfs", 32 * MIB);
    let rfs = SmallFs::create(&s, "rfs", 16 * MIB);
    let dir = jfs.mount.join("vol");
    let replica = rfs.mount.join("replica.img");
    let ident = identity(7, 8 * MIB);
    let mut d = vec![vec![0u8; MIB as usize]; 3];
    for (i, b) in d.iter_mut().enumerate() {
        fill_random(b, 100 + i as u64);
    }
    let mut v = TargetVolume::create(&dir, ident, &replica).expect("create");
    v.spool(&chunk(1, 0, &d[0])).unwrap();
    v.apply_all().unwrap();
    v.spool(&chunk(2, 4 * MIB, &d[1])).unwrap();

    // (A) the journal's file system fills up: the spool is refused (with
    // chunk 2 pending, before writing: it would take the space chunk 2's
    // apply needs) and nothing of it counts; the volume still opens on the
    // full disk (no tail to re-apply; the catalogue is skipped) with chunk 2
    // pending.
    let ballast = Ballast::fill(&dir);
    let e = v
        .spool(&chunk(3, 6 * MIB, &d[2]))
        .expect_err("spool on a full disk");
    assert!(matches!(e, JournalError::LowSpace { .. }), "{e}");
    drop(v);
    // A catalogue that must be made from scratch (derived data: lost, or a
    // version change; SQLite also recreates one it finds unreadable) cannot
    // be written now. (The ballast takes back the space it frees.)
    for f in [
        "catalogue.sqlite",
        "catalogue.sqlite-wal",
        "catalogue.sqlite-shm",
    ] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    std::thread::sleep(Duration::from_millis(200));
    let v = TargetVolume::open(&dir).unwrap_or_else(|e| panic!("open on a full disk: {e}"));
    assert_eq!(v.durable_seq(), 2, "chunk 3 was never acknowledged");
    assert_eq!(v.counters().pending_chunks, 1);
    drop(v);
    ballast.release();

    // (B) the replica's file system fills up: chunk 2's undo record is
    // durable, then its replica write (into a hole) fails.
    let mut v = TargetVolume::open(&dir).unwrap();
    let ballast = Ballast::fill(&rfs.mount);
    let e = v.apply_all().expect_err("apply on a full replica disk");
    assert!(e.is_no_space(), "{e}");
    assert!(e.to_string().contains("replica"), "{e}");
    drop(v);
    // Reopening re-applies the journaled chunk: still no space.
    let e = TargetVolume::open(&dir)
        .err()
        .expect("open cannot finish the apply while the replica disk is full");
    assert!(e.is_no_space(), "{e}");
    ballast.release();
    let mut v = TargetVolume::open(&dir).expect("open after space is back");
    assert_eq!(v.counters().recovered_chunks, 1);
    assert_eq!(v.applied_seq(), 2);
    let mut buf = vec![0u8; MIB as usize];
    let now = v.snapshot(&RecoveryPoint::Latest).unwrap();
    now.read_at(&mut buf, 4 * MIB).unwrap();
    assert!(buf == d[1], "chunk 2 is in the replica");
    // The undo data is the replica before the first attempt (a hole).
    let before = v.snapshot(&RecoveryPoint::Seq(1)).unwrap();
    before.read_at(&mut buf, 4 * MIB).unwrap();
    assert!(
        buf.iter().all(|b| *b == 0),
        "point 1 sees the old (zero) data"
    );
    before.read_at(&mut buf, 0).unwrap();
    assert!(buf == d[0]);
    drop((now, before));
    // The source re-sends chunk 3 (never acknowledged): stored and applied.
    v.spool(&chunk(3, 6 * MIB, &d[2])).unwrap();
    v.apply_all().unwrap();
    assert_eq!(v.applied_seq(), 3);
    drop(v);
    let img = std::fs::read(&replica).unwrap();
    assert!(img[6 * MIB as usize..7 * MIB as usize] == d[2][..]);
    drop((jfs, rfs));
}

/// The spool never takes the space its own apply needs: on a small file
/// system holding both the journal and a sparse replica (each applied byte
/// needs a new replica block), spooling stops with `LowSpace` while space is
/// still free, and everything spooled then applies. (Before this rule the
/// spool filled the disk and apply failed with `ENOSPC` on the replica: a
/// full disk nothing could drain — the target stayed stuck.) A spool append
/// that meets a really full disk with nothing pending fails with `ENOSPC`
/// and stores nothing.
#[test]
fn spool_keeps_the_space_its_apply_needs() {
    let s = Scratch::new("journal-lowspace");
    let fs = SmallFs::create(&s, "lfs", 64 * MIB);
    let dir = fs.mount.join("vol");
    let replica = fs.mount.join("replica.img");
    let ident = identity(9, 48 * MIB);
    let piece = 4 * MIB;
    let data: Vec<Vec<u8>> = (0..12)
        .map(|i| {
            let mut b = vec![0u8; piece as usize];
            fill_random(&mut b, 500 + i);
            b
        })
        .collect();
    let mut v = TargetVolume::create(&dir, ident, &replica).expect("create");
    let mut seq = 0u64;
    let refusal = loop {
        assert!(
            seq < 12,
            "the spool took {seq} pieces and never said low on space"
        );
        match v.spool(&chunk(seq + 1, seq * piece, &data[seq as usize])) {
            Ok(_) => seq += 1,
            Err(e) => break e,
        }
    };
    let free = fs.free_bytes();
    eprintln!("spooled {seq} pieces of 4 MiB, then: {refusal} ({free} bytes free)");
    assert!(
        matches!(refusal, JournalError::LowSpace { .. }),
        "expected a low-space refusal, got: {refusal}"
    );
    assert!(seq >= 2, "{seq}");
    assert!(free > piece, "refused while space is free: {free}");
    assert_eq!(v.durable_seq(), seq, "the refused piece is not stored");
    // Everything spooled applies: the space for it was kept.
    v.apply_all().expect("apply what the spool holds");
    assert_eq!(v.applied_seq(), seq);
    // The applied spool is freed: spooling goes on.
    v.spool(&chunk(seq + 1, seq * piece, &data[seq as usize]))
        .expect("spool after apply");
    seq += 1;
    v.apply_all().expect("apply");

    // A really full disk with nothing pending: the append fails with ENOSPC
    // and stores nothing; once space is back the same chunk goes through.
    let ballast = Ballast::fill(&dir);
    let e = v
        .spool(&chunk(seq + 1, seq * piece, &data[seq as usize]))
        .expect_err("spool on a full disk");
    assert!(e.is_no_space(), "{e}");
    drop(v);
    ballast.release();
    let mut v = TargetVolume::open(&dir).expect("open after space is back");
    assert_eq!(v.durable_seq(), seq, "nothing of the failed append counts");
    v.spool(&chunk(seq + 1, seq * piece, &data[seq as usize]))
        .expect("spool once space is back");
    seq += 1;
    v.apply_all().expect("apply");
    drop(v);
    let img = std::fs::read(&replica).expect("read the replica");
    for (i, d) in data.iter().enumerate().take(seq as usize) {
        let at = i * piece as usize;
        assert!(img[at..at + piece as usize] == d[..], "piece {i}");
    }
    drop(fs);
}
