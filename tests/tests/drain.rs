//! The replication oracle in miniature: a client writes through `rewind
//! export`, then this test drains the change log exactly as the replicator
//! does (agent-core's `Consumer`: get → apply → commit), applying ring
//! records (data, zero; metadata and bitmap ranges read back from the
//! volume) to a replica that started as a copy of the volume. After the
//! drain the replica must equal the volume byte for byte, and the change log
//! must be empty. Run in data mode (ring order and payloads alone must
//! rebuild the volume), after overflow into metadata/bitmap mode, across an
//! incremental second round, and after kill -9 of the export under load.

use agent_core::consumer::BatchKind;
use agent_core::ring::RecordKind;
use agent_core::Consumer;
use rewind_tests::*;
use std::process::Stdio;
use std::time::Duration;

#[derive(Debug, Default)]
struct Drained {
    data: u64,
    metadata: u64,
    zero: u64,
    bitmap_batches: u64,
    bitmap_bytes: u64,
}

/// Drains everything pending in `ex`'s change log into `replica`.
fn drain(ex: &Export, replica: &mut [u8]) -> Drained {
    let clog = ex.shm_dir.join(format!("{}.clog", ex.volume));
    let mut c =
        Consumer::attach(&clog).unwrap_or_else(|e| panic!("attach {}: {e}", clog.display()));
    assert_eq!(c.volume_size(), replica.len() as u64);
    let mut d = Drained::default();
    let mut guard = 0;
    while let Some(batch) = c.get(4 * MIB).expect("get") {
        guard += 1;
        assert!(guard < 1_000_000, "drain does not terminate");
        match batch.kind() {
            BatchKind::Ring => {
                for r in batch.records() {
                    let (o, l) = (r.offset as usize, r.len as usize);
                    match r.kind {
                        RecordKind::Data => {
                            assert_eq!(
                                r.data.len(),
                                l,
                                "data record payload length, seq {}",
                                r.seq
                            );
                            replica[o..o + l].copy_from_slice(&r.data);
                            d.data += 1;
                        }
                        RecordKind::Zero => {
                            replica[o..o + l].fill(0);
                            d.zero += 1;
                        }
                        RecordKind::Metadata => {
                            replica[o..o + l].copy_from_slice(&read_at(
                                &ex.backing,
                                r.offset,
                                r.len,
                            ));
                            d.metadata += 1;
                        }
                        RecordKind::Tag => {}
                    }
                }
            }
            BatchKind::Bitmap => {
                d.bitmap_batches += 1;
                for &(o, l) in batch.ranges() {
                    replica[o as usize..(o + l) as usize].copy_from_slice(&read_at(
                        &ex.backing,
                        o,
                        l,
                    ));
                    d.bitmap_bytes += l;
                }
            }
        }
        c.commit(batch).expect("commit");
    }
    d
}

fn assert_replica_equals_volume(replica: &[u8], ex: &Export, d: &Drained) {
    let vol = std::fs::read(&ex.backing).expect("read volume");
    assert_eq!(vol.len(), replica.len());
    if vol != replica {
        let first = (0..vol.len()).find(|&i| vol[i] != replica[i]).unwrap();
        let bad = vol
            .chunks(BLOCK as usize)
            .zip(replica.chunks(BLOCK as usize))
            .filter(|(a, b)| a != b)
            .count();
        panic!(
            "replica differs from the volume after the drain: first byte {first:#x}, {bad} blocks differ; drained {d:?}"
        );
    }
    // and nothing is pending any more
    let log = ex.dump().expect("dump");
    assert!(
        log.covered().is_empty(),
        "change log not empty after the drain: {}",
        log.summary()
    );
}

const OVERLAP: &str = r#"
import random, sys, threading
import nbd
uri, span, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
errors = []
def worker(n):
    try:
        rnd = random.Random(seed * 100 + n)
        h = nbd.NBD()
        h.connect_uri(uri)
        bufs = []
        for i in range(400):
            while h.aio_in_flight() >= 32:
                h.poll(-1)
            off = rnd.randrange(0, span - 70000)
            r = rnd.random()
            if r < 0.8:
                ln = rnd.choice([1, 512, 1000, 4096, 4097, 8192, 65536]) + rnd.randrange(0, 3)
                b = nbd.Buffer.from_bytearray(bytearray([rnd.randrange(1, 256)]) * ln)
                bufs.append(b)
                h.aio_pwrite(b, off, flags=(nbd.CMD_FLAG_FUA if r < 0.1 else 0))
            elif r < 0.9:
                h.aio_zero(rnd.randrange(1, 65536), off)
            else:
                h.aio_trim(rnd.randrange(4096, 65536), off)
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.shutdown()
    except Exception as e:
        errors.append(repr(e))
ts = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
for t in ts: t.start()
for t in ts: t.join()
if errors:
    raise SystemExit("worker errors: %s" % errors)
print("ok")
"#;

fn setup(tag: &str, size: u64, opts: ExportOpts) -> (Scratch, Export, Vec<u8>) {
    let s = Scratch::new(tag);
    let backing = s.join("vol.img");
    create_random(&backing, size, 81);
    let replica = std::fs::read(&backing).unwrap();
    let ex = Export::start(&s, &backing, opts);
    (s, ex, replica)
}

fn fio_load(ex: &Export, size: &str, extra: &[&str]) {
    run_ok(
        tool("fio")
            .args([
                "--name=load",
                "--ioengine=nbd",
                &format!("--uri={}", ex.uri()),
            ])
            .args(["--rw=randwrite", "--bsrange=512-64k", "--iodepth=16"])
            .arg(format!("--size={size}"))
            .args(extra),
        Duration::from_secs(240),
    );
}

#[test]
fn drain_rebuilds_volume_from_ring_in_data_mode() {
    let (_s, ex, mut replica) = setup(
        "drain-data",
        16 * MIB,
        ExportOpts {
            ring_size: Some(256 * MIB),
            ..Default::default()
        },
    );
    run_python(
        OVERLAP,
        &[&ex.uri(), &(8 * MIB).to_string(), "9"],
        Duration::from_secs(180),
    );
    let log = ex.dump().expect("dump");
    assert_eq!(log.capture_mode, "data", "{}", log.summary());
    let d = drain(&ex, &mut replica);
    // data mode: ring payloads and their order alone rebuild the volume
    assert_eq!(d.metadata, 0, "{d:?}");
    assert_eq!(d.bitmap_bytes, 0, "{d:?}");
    assert!(d.data > 1000 && d.zero > 100, "{d:?}");
    assert_replica_equals_volume(&replica, &ex, &d);
    ex.stop();
}

#[test]
fn drain_after_ring_overflow_and_incremental_round() {
    let (_s, ex, mut replica) = setup(
        "drain-ovf",
        64 * MIB,
        ExportOpts {
            ring_size: Some(2 * MIB),
            ..Default::default()
        },
    );
    fio_load(&ex, "64m", &[]);
    let d = drain(&ex, &mut replica);
    assert!(
        d.metadata + d.bitmap_bytes > 0,
        "ring did not overflow: {d:?}"
    );
    assert_replica_equals_volume(&replica, &ex, &d);
    // second round on the drained log: back in data mode, incremental
    run_ok(
        tool("qemu-io").args([
            "-f",
            "raw",
            &ex.uri(),
            "-c",
            "write -P 0x61 12345 6789",
            "-c",
            "write -z 1M 1M",
            "-c",
            "write -P 0x62 40M 1M",
        ]),
        Duration::from_secs(60),
    );
    let d = drain(&ex, &mut replica);
    assert!(d.data + d.metadata + d.zero + d.bitmap_batches > 0, "{d:?}");
    assert_replica_equals_volume(&replica, &ex, &d);
    ex.stop();
}

#[test]
fn drain_after_kill9_under_load_rebuilds_volume() {
    if server_kind() != ServerKind::Rewind {
        panic!("crash tests need `rewind export` (unset REWIND_TEST_SERVER)");
    }
    let s = Scratch::new("drain-kill9");
    let backing = s.join("vol.img");
    create_random(&backing, 64 * MIB, 82);
    let mut replica = std::fs::read(&backing).unwrap();
    let opts = ExportOpts {
        ring_size: Some(8 * MIB),
        ..ExportOpts::restartable(&s)
    };
    let ex = Export::start(&s, &backing, opts.clone());
    let mut child = fio_write_load(&ex.uri(), "--bsrange=1k-64k", 32, 30)
        .spawn()
        .expect("spawn fio");
    std::thread::sleep(Duration::from_millis(2000));
    ex.kill9();
    let _ = child.wait();
    let ex = Export::start(&s, &backing, opts);
    let d = drain(&ex, &mut replica);
    assert_replica_equals_volume(&replica, &ex, &d);
    ex.stop();
}

#[test]
fn drain_concurrently_with_write_load_converges() {
    // the replicator's real situation: draining while the client writes,
    // with a small ring so the log moves data -> metadata -> bitmap and back
    let (_s, ex, mut replica) = setup(
        "drain-live",
        64 * MIB,
        ExportOpts {
            ring_size: Some(4 * MIB),
            ..Default::default()
        },
    );
    let mut child = fio_write_load(&ex.uri(), "--bsrange=512-128k", 16, 4)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fio");
    let mut rounds = 0;
    let mut total = Drained::default();
    while child.try_wait().expect("try_wait").is_none() {
        let d = drain(&ex, &mut replica);
        total.data += d.data;
        total.metadata += d.metadata;
        total.zero += d.zero;
        total.bitmap_batches += d.bitmap_batches;
        total.bitmap_bytes += d.bitmap_bytes;
        rounds += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = child.wait().expect("wait");
    assert!(st.success(), "fio failed: {st}");
    let d = drain(&ex, &mut replica);
    total.data += d.data;
    assert!(rounds > 5, "only {rounds} drain rounds ran during the load");
    assert!(total.data > 0, "{total:?}");
    assert_replica_equals_volume(&replica, &ex, &total);
    ex.stop();
}

#[test]
fn clean_restart_after_drain_has_nothing_pending() {
    let s = Scratch::new("drain-restart");
    let backing = s.join("vol.img");
    create_random(&backing, 16 * MIB, 83);
    let mut replica = std::fs::read(&backing).unwrap();
    let opts = ExportOpts::restartable(&s);
    let ex = Export::start(&s, &backing, opts.clone());
    fio_load(&ex, "16m", &[]);
    let d = drain(&ex, &mut replica);
    assert_replica_equals_volume(&replica, &ex, &d);
    ex.stop();
    // a clean restart must not resurrect drained changes (no forced resync)
    let ex = Export::start(&s, &backing, opts);
    let log = ex.dump().expect("dump");
    assert!(
        log.covered().is_empty(),
        "drained changes pending again after a clean restart: {}",
        log.summary()
    );
    ex.stop();
}

#[test]
fn sustained_overload_returns_to_data_mode_while_writes_continue() {
    // The consumer stalls long enough for the ring to overflow into bitmap
    // mode, then drains while fio keeps writing at a constant rate, keeping
    // one batch in flight like the replicator (committed when the next one
    // was handed out). With a batch always in flight and writes always
    // arriving, the bitmap is never empty, so the log must leave bitmap mode
    // per completed consumer sweep (not only when fully drained), while fio
    // still runs; nothing written may be lost.
    let (_s, ex, mut replica) = setup(
        "drain-sweep",
        64 * MIB,
        ExportOpts {
            ring_size: Some(2 * MIB),
            ..Default::default()
        },
    );
    let clog = ex.shm_dir.join(format!("{}.clog", ex.volume));
    let view = agent_core::ChangeLogView::open(&clog).expect("view");
    let mut child = fio_write_load(&ex.uri(), "--bs=4k", 8, 7)
        .arg("--rate=8m")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fio");
    // stall: 8 MiB/s for 1.5 s overflows the 2 MiB ring
    let t0 = std::time::Instant::now();
    while view.stats().mode != agent_core::CaptureMode::Bitmap {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "ring never overflowed: {:?}",
            view.stats().transitions
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut c = Consumer::attach(&clog).expect("attach");
    let mut in_flight: Option<agent_core::Batch> = None;
    let mut data_again_at = None;
    let mut total = Drained::default();
    while child.try_wait().expect("try_wait").is_none() {
        while let Some(batch) = c.get(4 * MIB).expect("get") {
            match batch.kind() {
                BatchKind::Ring => {
                    for r in batch.records() {
                        let (o, l) = (r.offset as usize, r.len as usize);
                        match r.kind {
                            RecordKind::Data => replica[o..o + l].copy_from_slice(&r.data),
                            RecordKind::Zero => replica[o..o + l].fill(0),
                            RecordKind::Metadata => replica[o..o + l].copy_from_slice(&read_at(
                                &ex.backing,
                                r.offset,
                                r.len,
                            )),
                            RecordKind::Tag => {}
                        }
                        total.data += 1;
                    }
                }
                BatchKind::Bitmap => {
                    total.bitmap_batches += 1;
                    for &(o, l) in batch.ranges() {
                        replica[o as usize..(o + l) as usize].copy_from_slice(&read_at(
                            &ex.backing,
                            o,
                            l,
                        ));
                        total.bitmap_bytes += l;
                    }
                }
            }
            if let Some(prev) = in_flight.replace(batch) {
                c.commit(prev).expect("commit");
            }
        }
        if data_again_at.is_none() && view.stats().mode == agent_core::CaptureMode::Data {
            data_again_at = Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let st = child.wait().expect("wait");
    assert!(st.success(), "fio failed: {st}");
    assert!(
        total.data > 0 && total.bitmap_batches > 0,
        "both ring records and bitmap batches drained during the load: {total:?}"
    );
    let stats = view.stats();
    assert!(
        data_again_at.is_some_and(|t| t < Duration::from_secs(6)),
        "the log did not return to data mode while fio was writing: {:?}, {:?}",
        data_again_at,
        stats.transitions
    );
    assert!(
        stats.transitions.bitmap_sweep_exits >= 1 && stats.bitmap_sweeps >= 2,
        "{:?}, sweeps {}",
        stats.transitions,
        stats.bitmap_sweeps
    );
    if let Some(prev) = in_flight.take() {
        c.commit(prev).expect("commit");
    }
    drop(c);
    let d = drain(&ex, &mut replica);
    assert_replica_equals_volume(&replica, &ex, &d);
    ex.stop();
}
