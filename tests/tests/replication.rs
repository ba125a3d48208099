//! Replication end to end on loopback with mutual TLS (certificates from
//! `rewind pki`): real NBD clients write through `rewind export` while
//! `rewind replicator` ships to `rewind target`; after the drain seen in
//! `rewind status --json`, the replica's blake3 equals the source's.

use rewind_tests::replication::*;
use rewind_tests::*;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

const SIZE: u64 = 64 * MIB;

/// fio (nbd engine, crc32c verify) through the export while replication
/// runs, on a volume that already holds data (so the initial sync has work).
fn fio_replicated(tag: &str, compression: &str) {
    let s = Scratch::new(tag);
    let backing = s.join("vol.img");
    create_random(&backing, SIZE, 11);
    let mut st = Setup::start(&s, &backing, compression);
    let out = s.join("fio.json");
    let o = run(
        tool("fio")
            .arg(format!("--name={tag}"))
            .arg("--ioengine=nbd")
            .arg(format!("--uri={}", st.export.uri()))
            .args(["--rw=randwrite", "--bs=4k", "--size=32m", "--iodepth=16"])
            .args(["--verify=crc32c", "--verify_fatal=1", "--do_verify=1"])
            .args(["--output-format=json", "--runtime=120"])
            .arg(format!("--output={}", out.display())),
        Duration::from_secs(180),
    );
    let report = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        o.status.success(),
        "fio failed: {}\n{}\n{report}",
        o.status,
        text(&o)
    );
    let v: Value =
        serde_json::from_str(&report).unwrap_or_else(|e| panic!("fio JSON: {e}\n{report}"));
    assert_eq!(v["jobs"][0]["error"], 0, "fio job error");
    st.repl.daemon.assert_alive();
    st.target.daemon.assert_alive();
    let doc = st.converge(Duration::from_secs(90), tag);
    let p = &doc["source"]["pairs"][0];
    assert_eq!(p["compression"], compression);
    let ratio = p["status"]["compression_ratio"].as_f64().unwrap_or(0.0);
    if compression == "off" {
        assert!((ratio - 1.0).abs() < 0.01, "uncompressed ratio {ratio}");
    }
    // The initial sync ran (the volume had data), then the differential.
    assert!(p["resync_step1_entered"].as_u64().unwrap_or(0) <= 1);
    // cdpcli agrees with the status.
    let o = run_ok(
        Command::new(rewind_bin("cdpcli"))
            .args(["--displaystatistics", "--vol=vol0", "--json", "--state-dir"])
            .arg(&st.target.state_dir),
        Duration::from_secs(20),
    );
    let c: Value = serde_json::from_slice(&o.stdout).expect("cdpcli json");
    assert_eq!(c["Target Volume Name"], "vol0");
    assert_eq!(c["Diffs pending in Target"], 0);
    assert_eq!(c["Current RPO (secs)"], 0);
    assert!(c["Apply rate (Bytes/sec)"].as_u64().unwrap_or(0) > 0, "{c}");
    st.repl.daemon.stop();
    st.target.daemon.stop();
    st.export.stop();
}

#[test]
fn replication_fio_verify_zstd() {
    fio_replicated("repl-fio-zstd", "zstd:1");
}

#[test]
fn replication_fio_verify_uncompressed() {
    fio_replicated("repl-fio-raw", "off");
}

/// ext4 through nbdfuse + loop (scripts/fs-over-nbd) with replication
/// running; the replica then equals the filesystem image.
#[test]
fn replication_fs_ext4() {
    let _lock = fs_lock();
    let s = Scratch::new("repl-ext4");
    let backing = s.join("fsvol.img");
    create_sparse(&backing, 256 * MIB);
    let st = Setup::start(&s, &backing, "zstd:1");
    let o = run(
        Command::new(script("fs-over-nbd")).args([&st.export.uri(), "ext4", "--dio", "on"]),
        Duration::from_secs(600),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("PASS (ext4)"),
        "fs-over-nbd failed: {}\n{}\n{}",
        o.status,
        text(&o),
        st.export.log_text()
    );
    st.converge(Duration::from_secs(120), "ext4 replica");
    // The replica is a filesystem fsck accepts.
    let o = run(
        Command::new("e2fsck")
            .args(["-fn"])
            .arg(st.target.replica("vol0")),
        Duration::from_secs(120),
    );
    assert!(o.status.success(), "e2fsck on the replica: {}", text(&o));
}

/// A pair limited to 4 MB/s ships incompressible data at that rate within
/// 10% over a 10 s window.
#[test]
fn replication_bandwidth_limit() {
    const RATE: f64 = 4_000_000.0;
    let s = Scratch::new("repl-bw");
    let backing = s.join("vol.img");
    create_sparse(&backing, SIZE);
    let st = Setup::start_with(
        &s,
        &backing,
        "off",
        |_| {},
        |r| {
            r.bandwidth = Some("4M".into());
            // Small frames: wire_bytes moves in frame steps, and 4 MiB steps
            // would be a 10% quantization of a 10 s window by themselves.
            r.max_chunk = Some(256 * KIB);
        },
    );
    st.converge(Duration::from_secs(60), "empty volume");
    // 64 MiB of random data: 16 s of shipping at 4 MB/s.
    let data = s.join("data.bin");
    create_random(&data, SIZE, 5);
    let o = run(
        tool("nbdcopy").arg(&data).arg(st.export.uri()),
        Duration::from_secs(120),
    );
    assert!(o.status.success(), "nbdcopy: {}", text(&o));
    // Bytes and the time they were measured, both from the same engine
    // snapshot (independent of when the test reads the status file).
    let wire = |st: &Setup| {
        let p = st.repl.pair();
        (
            p["status"]["wire_bytes"].as_u64().unwrap_or(0),
            p["status"]["updated_ns"].as_u64().unwrap_or(0),
        )
    };
    // Let the bucket's initial burst pass.
    std::thread::sleep(Duration::from_secs(2));
    let (w0, t0) = wire(&st);
    std::thread::sleep(Duration::from_secs(10));
    let (w1, t1) = wire(&st);
    let rate = (w1 - w0) as f64 / ((t1 - t0) as f64 / 1e9);
    eprintln!(
        "bandwidth: {rate:.0} B/s shipped over {:.2} s with a limit of {RATE} B/s",
        (t1 - t0) as f64 / 1e9
    );
    let p = st.repl.pair();
    assert_eq!(p["bandwidth_bps"], 4_000_000u64, "{p}");
    assert!(
        (rate - RATE).abs() <= RATE * 0.10,
        "shipped {rate:.0} B/s with a limit of {RATE} B/s (status: {p})"
    );
    // Still data pending: the limit, not the workload, set the pace.
    assert!(
        p["status"]["pending_source_bytes"].as_u64().unwrap_or(0) > 0
            || p["status"]["in_flight_bytes"].as_u64().unwrap_or(0) > 0
    );
}

/// A replica that already holds the volume except for 1% of its hash
/// blocks: the initial checksum resync ships only those (wire ≤ 3% of the
/// volume), and ends equal.
#[test]
fn replication_checksum_resync_ships_only_differences() {
    const HB: u64 = 64 * KIB;
    let s = Scratch::new("repl-csum");
    let backing = s.join("vol.img");
    create_random(&backing, SIZE, 21);
    // The target creates DIR/vol0/replica.img only if it is missing: seed it
    // with a copy that differs in 1% of the hash blocks.
    let tdir = s.join("tdir");
    std::fs::create_dir_all(tdir.join("vol0")).unwrap();
    let replica = tdir.join("vol0").join("replica.img");
    std::fs::copy(&backing, &replica).unwrap();
    let nblocks = SIZE / HB;
    let differing = nblocks / 100;
    for i in 0..differing {
        let b = (i * 97 + 13) % nblocks;
        write_at(&replica, b * HB + 512, &[0xee; 4096]);
    }
    let pki = Pki::new(&s, "pki");
    let export = Export::start(&s, &backing, ExportOpts::for_volume("vol0"));
    let target = Target::start_in(&s, tdir, s.join("tstate"), TargetOpts::tls(&pki));
    let repl = Replicator::start(
        &s,
        target.addr,
        ReplicatorOpts {
            hash_block: Some(HB),
            ..ReplicatorOpts::tls(&pki, "vol0", &backing, &export.shm_dir, "off")
        },
    );
    let doc = wait_drained(&repl, &target, Duration::from_secs(60));
    assert_same(&backing, &target.replica("vol0"), "checksum resync");
    let st = &doc["source"]["pairs"][0]["status"];
    let wire = st["wire_bytes"].as_u64().unwrap_or(u64::MAX);
    let sent = st["resync"]["sent_bytes"].as_u64().unwrap_or(u64::MAX);
    eprintln!(
        "checksum resync: {differing} of {nblocks} hash blocks differ; {sent} bytes of blocks sent, {wire} bytes on the wire ({:.2}% of the volume)",
        wire as f64 * 100.0 / SIZE as f64
    );
    assert_eq!(sent, differing * HB, "{st}");
    assert!(
        wire <= SIZE * 3 / 100,
        "{wire} bytes on the wire for a 1% difference: {st}"
    );
    assert_eq!(target.volume_status("vol0")["resync_passes"], 1);
}
