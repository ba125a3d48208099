//! Concurrency and crashes: many connections with deep queues of
//! overlapping, unaligned writes, zeroes and trims; and kill -9 of the
//! export in the middle of a write load, then restart (bytes lost = 0).

use rewind_tests::*;
use std::time::Duration;

/// 4 connections x 400 async ops, up to 32 in flight per connection, at
/// random unaligned offsets inside `span` bytes: pwrite (some FUA), zero,
/// trim. Prints the list of [kind, off, len] it issued.
const SCRIPT: &str = r#"
import json, random, sys, threading
import nbd
uri, span, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
issued = []
lock = threading.Lock()
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
                kind = "write"
            elif r < 0.9:
                ln = rnd.randrange(1, 65536)
                h.aio_zero(ln, off)
                kind = "zero"
            else:
                ln = rnd.randrange(4096, 65536)
                h.aio_trim(ln, off)
                kind = "trim"
            with lock:
                issued.append([kind, off, ln])
        while h.aio_in_flight() > 0:
            h.poll(-1)
        h.flush()
        h.shutdown()
    except Exception as e:
        errors.append(repr(e))
ts = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
for t in ts: t.start()
for t in ts: t.join()
if errors:
    raise SystemExit("worker errors: %s" % errors)
print(json.dumps(issued))
"#;

#[test]
fn four_connections_deep_queues_overlapping() {
    let s = Scratch::new("stress-mc");
    let span = 8 * MIB;
    let backing = s.join("vol.img");
    create_random(&backing, 16 * MIB, 61);
    let before = ImageCopy::capture(&s, &backing);
    let ex = Export::start(&s, &backing, ExportOpts::default());
    let o = run_python(
        SCRIPT,
        &[&ex.uri(), &span.to_string(), "7"],
        Duration::from_secs(180),
    );
    let issued: Vec<(String, u64, u64)> =
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}\n{}", text(&o)));
    assert_eq!(issued.len(), 1600);
    let written = RangeSet::from_extents(issued.iter().map(|(_, o, l)| (*o, *l)));
    // nothing outside the span changed
    let changed = diff_files(&before.path, &backing);
    assert!(
        RangeSet::from_extents([(0, span)]).contains_set(&changed),
        "bytes changed outside the written span: {}",
        changed.describe(5)
    );
    // a read through the export equals the backing file
    let out = s.join("out.img");
    run_ok(
        tool("nbdcopy").arg(ex.uri()).arg(&out),
        Duration::from_secs(60),
    );
    assert!(files_equal(&out, &backing));
    assert_changes_recorded(&ex, &before, Some(&written));
    ex.stop();
}

#[test]
fn kill9_under_write_load_loses_nothing() {
    if server_kind() != ServerKind::Rewind {
        panic!("crash tests need `rewind export` (unset REWIND_TEST_SERVER)");
    }
    let s = Scratch::new("stress-kill9");
    let size = 64 * MIB;
    let backing = s.join("vol.img");
    create_random(&backing, size, 62);
    let before = ImageCopy::capture(&s, &backing);
    let opts = ExportOpts {
        // small ring: the crash happens after falling out of data mode
        ring_size: Some(4 * MIB),
        ..ExportOpts::restartable(&s)
    };
    let ex = Export::start(&s, &backing, opts.clone());
    let mut child = fio_write_load(&ex.uri(), "--bsrange=1k-64k", 32, 30)
        .spawn()
        .expect("spawn fio");
    std::thread::sleep(Duration::from_millis(2500));
    ex.kill9();
    let _ = child.wait();
    let changed = diff_files(&before.path, &backing);
    assert!(
        changed.total_len() > MIB,
        "load did not write: {}",
        changed.describe(3)
    );
    // restart: everything that reached the backing must be pending
    let ex = Export::start(&s, &backing, opts);
    let log = ex.dump().expect("dump");
    let lost = changed.subtract(&log.covered());
    assert!(
        lost.is_empty(),
        "after kill -9 and restart, changed bytes are not in the change log: {}\n{}",
        lost.describe(10),
        log.summary()
    );
    ex.stop();
}

#[test]
fn client_killed_mid_io_leaves_server_and_log_sound() {
    let s = Scratch::new("stress-client-kill");
    let size = 64 * MIB;
    let backing = s.join("vol.img");
    create_random(&backing, size, 63);
    let before = ImageCopy::capture(&s, &backing);
    let mut ex = Export::start(&s, &backing, ExportOpts::default());
    for round in 0..3 {
        let mut child = fio_write_load(&ex.uri(), "--bsrange=1k-256k", 32, 30)
            .spawn()
            .expect("spawn fio");
        std::thread::sleep(Duration::from_millis(700 + 300 * round));
        let _ = child.kill(); // SIGKILL: connections vanish with requests in flight
        let _ = child.wait();
        ex.assert_alive();
    }
    // the server still serves, and everything that changed is in the log
    run_ok(
        tool("qemu-io").args([
            "-f",
            "raw",
            &ex.uri(),
            "-c",
            "write -P 0x44 0 64k",
            "-c",
            "read -P 0x44 0 64k",
        ]),
        Duration::from_secs(60),
    );
    assert_changes_recorded(&ex, &before, None);
    ex.stop();
}

const MANY: &str = r#"
import sys, threading
import nbd
uri, n = sys.argv[1], int(sys.argv[2])
hs = []
for i in range(n):
    h = nbd.NBD()
    h.connect_uri(uri)
    hs.append(h)
errors = []
def worker(i):
    try:
        h = hs[i]
        h.pwrite(bytes([i + 1]) * 4096, i * 65536 + 512)
        assert h.pread(4096, i * 65536 + 512) == bytes([i + 1]) * 4096
        h.flush()
    except Exception as e:
        errors.append(repr(e))
ts = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
for t in ts: t.start()
for t in ts: t.join()
for h in hs:
    h.shutdown()
if errors:
    raise SystemExit("errors: %s" % errors[:5])
print("ok")
"#;

#[test]
fn sixty_four_simultaneous_connections() {
    let s = Scratch::new("stress-64conn");
    let backing = s.join("vol.img");
    create_random(&backing, 8 * MIB, 64);
    let before = ImageCopy::capture(&s, &backing);
    let mut m = Model::from_copy(&before);
    let ex = Export::start(&s, &backing, ExportOpts::default());
    run_python(MANY, &[&ex.uri(), "64"], Duration::from_secs(120));
    for i in 0..64u64 {
        m.fill(i * 65536 + 512, 4096, (i + 1) as u8);
    }
    m.assert_file_matches(&backing);
    assert_changes_recorded(&ex, &before, Some(&m.written));
    ex.stop();
}

#[test]
fn sigterm_under_write_load_then_restart_loses_nothing() {
    // the clean path: a clean shutdown persists the bitmap and the next
    // start trusts it (no activity-log replay), so every write that reached
    // the backing before the exit must be in what was persisted
    if server_kind() != ServerKind::Rewind {
        panic!("restart tests need `rewind export` (unset REWIND_TEST_SERVER)");
    }
    let s = Scratch::new("stress-term");
    let size = 64 * MIB;
    let backing = s.join("vol.img");
    create_random(&backing, size, 65);
    let before = ImageCopy::capture(&s, &backing);
    let dirs = ExportOpts::restartable(&s);
    for ring in [64 * MIB, 2 * MIB] {
        let opts = ExportOpts {
            ring_size: Some(ring),
            ..dirs.clone()
        };
        let ex = Export::start(&s, &backing, opts.clone());
        let mut child = fio_write_load(&ex.uri(), "--bsrange=512-128k", 32, 30)
            .spawn()
            .expect("spawn fio");
        std::thread::sleep(Duration::from_millis(1500));
        ex.stop(); // SIGTERM with 32 requests in flight: must exit 0
        let _ = child.kill();
        let _ = child.wait();
        let changed = diff_files(&before.path, &backing);
        let ex = Export::start(&s, &backing, opts);
        let log = ex.dump().expect("dump");
        let lost = changed.subtract(&log.covered());
        assert!(
            lost.is_empty(),
            "ring {ring}: after SIGTERM under load and restart, changed bytes are not in the change log: {}\n{}",
            lost.describe(10),
            log.summary()
        );
        ex.stop();
    }
}
