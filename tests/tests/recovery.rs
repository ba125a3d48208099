//! Recovery at the target (issue 4 items 4–6): recovery points, virtual
//! snapshots read by third-party NBD clients, materialization, against the
//! exact bytes the source had at each point; replication keeps running
//! while snapshots are served.

use rewind_tests::recovery::*;
use rewind_tests::replication::{blake3_file, Setup};
use rewind_tests::*;
use std::time::Duration;

const SIZE: u64 = 16 * MIB;

/// Random workload through the export in rounds; after each round the pair
/// is drained and the source's blake3 recorded with the time. Every recorded
/// time then recovers to exactly those bytes, through the vsnap NBD export
/// (qemu-img and nbdcopy) and through materialize — while the target keeps
/// applying a later workload.
#[test]
fn recovery_time_points_exact_through_vsnap_and_materialize() {
    let s = Scratch::new("rec-time");
    let backing = s.join("vol.img");
    create_random(&backing, SIZE, 1);
    let st = Setup::start(&s, &backing, "zstd:1");
    st.converge(Duration::from_secs(60), "initial sync");
    let mut points = Vec::new();
    for round in 0..4u64 {
        random_writes(&st.export.uri(), SIZE, 40, 100 + round);
        st.converge(Duration::from_secs(60), "round");
        points.push((now_ns(), blake3_file(&backing)));
        std::thread::sleep(Duration::from_millis(20));
    }
    let sd = st.target.state_dir.to_str().unwrap().to_string();
    let list = rewind_json(&["recover", "list", "--volume", "vol0", "--state-dir", &sd]);
    assert!(list["latest_seq"].as_u64().unwrap() > 0, "{list}");
    // More writes keep arriving while the earlier points are read back.
    random_writes(&st.export.uri(), SIZE, 40, 999);
    for (i, (t, h)) in points.iter().enumerate() {
        let snap = Snapshot::start(&s, "vol0", &["--at", &at_arg(*t), "--state-dir", &sd]);
        let img = s.join("p.raw");
        if i % 2 == 0 {
            qemu_img_copy(&snap.uri, &img);
        } else {
            nbdcopy(&snap.uri, &img);
        }
        assert_eq!(
            &blake3_file(&img),
            h,
            "point {i} through the vsnap\n{}",
            snap.log_text()
        );
        snap.stop();
        let out = s.join("m.raw");
        let o = rewind(&[
            "snapshot",
            "materialize",
            "--volume",
            "vol0",
            "--at",
            &at_arg(*t),
            "--out",
            out.to_str().unwrap(),
            "--state-dir",
            &sd,
        ]);
        assert!(o.status.success(), "materialize: {}", text(&o));
        assert_eq!(&blake3_file(&out), h, "point {i} materialized");
    }
    st.converge(Duration::from_secs(60), "after the reads");
}

/// Random workload with a bookmark every 30 writes and the source's blake3
/// recorded at each: after drain `rewind recover list` shows every bookmark
/// (name, type, seq, time), and every bookmark plus the time right after each
/// recovers to exactly the recorded bytes, through the vsnap NBD export read
/// by qemu-img / nbdcopy and through materialize. A read-write snapshot takes
/// writes in its overlay while replication keeps applying, and the replica
/// never sees them.
#[test]
fn recovery_bookmarks_exact_and_rw_snapshot_isolated() {
    let s = Scratch::new("rec-bm");
    let backing = s.join("vol.img");
    create_random(&backing, SIZE, 2);
    let st = Setup::start(&s, &backing, "zstd:1");
    st.converge(Duration::from_secs(60), "initial sync");
    let mut expect = Vec::new();
    for k in 0..5u64 {
        random_writes(&st.export.uri(), SIZE, 30, 200 + k);
        let name = format!("bm{k}");
        let kind = if k % 2 == 0 { "user" } else { "app" };
        create_bookmark(&st.export, &name, Some(kind));
        let t = now_ns();
        expect.push((name, t, blake3_file(&backing)));
        std::thread::sleep(Duration::from_millis(5));
    }
    random_writes(&st.export.uri(), SIZE, 30, 299);
    st.converge(Duration::from_secs(60), "after the workload");
    let sd = st.target.state_dir.to_str().unwrap().to_string();
    let list = rewind_json(&["recover", "list", "--volume", "vol0", "--state-dir", &sd]);
    let bms = list["bookmarks"].as_array().expect("bookmarks");
    assert_eq!(bms.len(), expect.len(), "{list}");
    for (k, (b, (name, t, _))) in bms.iter().zip(&expect).enumerate() {
        assert_eq!(b["name"], name.as_str(), "{list}");
        assert_eq!(b["kind"], if k % 2 == 0 { "user" } else { "app" }, "{list}");
        assert!(b["seq"].as_u64().unwrap() > 0, "{list}");
        let bt = b["time_ns"].as_u64().unwrap();
        assert!(
            bt <= *t && bt + 60_000_000_000 > *t,
            "bookmark time {bt} vs {t}"
        );
    }
    let h = list["time_ranges"].as_array().expect("ranges");
    assert!(!h.is_empty(), "{list}");
    // Human form lists them too.
    let o = rewind(&["recover", "list", "--volume", "vol0", "--state-dir", &sd]);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("bm4"),
        "{}",
        text(&o)
    );

    for (i, (name, t, h)) in expect.iter().enumerate() {
        let snap = Snapshot::start(&s, "vol0", &["--bookmark", name, "--state-dir", &sd]);
        let img = s.join("b.raw");
        if i % 2 == 0 {
            qemu_img_copy(&snap.uri, &img);
        } else {
            nbdcopy(&snap.uri, &img);
        }
        assert_eq!(&blake3_file(&img), h, "bookmark {name} through the vsnap");
        snap.stop();
        let snap = Snapshot::start(&s, "vol0", &["--at", &at_arg(*t), "--state-dir", &sd]);
        assert_eq!(&export_blake3(&s, &snap.uri), h, "time after {name}");
        snap.stop();
        let out = s.join("m.raw");
        let o = rewind(&[
            "snapshot",
            "materialize",
            "--volume",
            "vol0",
            "--bookmark",
            name,
            "--out",
            out.to_str().unwrap(),
            "--state-dir",
            &sd,
        ]);
        assert!(o.status.success(), "materialize {name}: {}", text(&o));
        assert_eq!(&blake3_file(&out), h, "bookmark {name} materialized");
    }

    // Read-write snapshot of bm1 while replication applies new writes.
    let replica = st.target.replica("vol0");
    let snap = Snapshot::start(
        &s,
        "vol0",
        &["--bookmark", "bm1", "--rw", "--state-dir", &sd],
    );
    random_writes(&snap.uri, SIZE, 50, 777);
    random_writes(&st.export.uri(), SIZE, 30, 778);
    st.converge(Duration::from_secs(60), "replication during an rw snapshot");
    let after = blake3_file(&replica);
    assert_eq!(after, blake3_file(&backing));
    let snap_img = s.join("rw.raw");
    nbdcopy(&snap.uri, &snap_img);
    assert_ne!(
        blake3_file(&snap_img),
        expect[1].2,
        "the rw snapshot took no write"
    );
    snap.stop();
    // A new snapshot of the same bookmark is pristine: the overlay was private.
    let snap = Snapshot::start(&s, "vol0", &["--bookmark", "bm1", "--state-dir", &sd]);
    assert_eq!(export_blake3(&s, &snap.uri), expect[1].2);
    snap.stop();
    assert_eq!(
        blake3_file(&replica),
        after,
        "the replica changed after the rw snapshot"
    );
}

/// ext4 written through the filter (scripts/fs-over-nbd), a file-system
/// bookmark after it is unmounted, more writes: the vsnap of the bookmark
/// passes e2fsck and holds exactly the files written, read-only mounted
/// through nbdfuse + loop.
#[test]
fn recovery_fs_ext4_bookmark_vsnap_mounts() {
    let _lock = fs_lock();
    let s = Scratch::new("rec-ext4");
    let backing = s.join("fsvol.img");
    create_sparse(&backing, 128 * MIB);
    let st = Setup::start(&s, &backing, "zstd:1");
    let sums = s.join("sums");
    let o = run(
        std::process::Command::new(script("fs-over-nbd"))
            .args([&st.export.uri(), "ext4", "--data-mb", "24", "--save-sums"])
            .arg(&sums),
        Duration::from_secs(600),
    );
    assert!(o.status.success(), "fs-over-nbd: {}", text(&o));
    create_bookmark(&st.export, "fs-clean", Some("fs"));
    // Damage after the bookmark: must not show in the snapshot.
    random_writes(&st.export.uri(), 128 * MIB, 40, 5);
    st.converge(Duration::from_secs(120), "ext4 volume");
    let sd = st.target.state_dir.to_str().unwrap().to_string();
    let snap = Snapshot::start(&s, "vol0", &["--bookmark", "fs-clean", "--state-dir", &sd]);
    let o = run(
        std::process::Command::new(script("fs-over-nbd"))
            .args([&snap.uri, "ext4", "--check-sums"])
            .arg(&sums),
        Duration::from_secs(600),
    );
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("PASS (check ext4)"),
        "snapshot check: {}\n{}",
        text(&o),
        snap.log_text()
    );
    snap.stop();
}
