//! The change log beyond a single client run: survival of unconsumed changes
//! across a clean restart and across kill -9 (bytes lost = 0), ring overflow
//! into metadata/bitmap mode without losing coverage, a coarser tracking
//! block, and `--no-tracking`.

use rewind_tests::*;
use std::time::Duration;

const SIZE: u64 = 32 * MIB;
const T: Duration = Duration::from_secs(120);

fn qemu_io_writes(uri: &str, m: &mut Model, writes: &[(u64, u64, u8)]) {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw", uri]);
    for &(o, l, b) in writes {
        c.arg("-c").arg(format!("write -P {b:#04x} {o} {l}"));
        m.fill(o, l, b);
    }
    run_ok(&mut c, T);
}

const WRITES_A: &[(u64, u64, u8)] = &[
    (0, 4096, 1),
    (MIB + 1537, 1024, 2),
    (5 * MIB, 3 * MIB, 3),
    (SIZE - 4096, 4096, 4),
];
const WRITES_B: &[(u64, u64, u8)] = &[(12 * MIB + 100, 5000, 5), (20 * MIB, 64 * KIB, 6)];

fn restart_case(tag: &str, crash: bool) {
    if server_kind() != ServerKind::Rewind {
        panic!("change-log tests need `rewind export` (unset REWIND_TEST_SERVER)");
    }
    let s = Scratch::new(tag);
    let backing = s.join("vol.img");
    create_random(&backing, SIZE, 31);
    let before = ImageCopy::capture(&s, &backing);
    let mut m = Model::from_copy(&before);
    let opts = ExportOpts::restartable(&s);
    let ex = Export::start(&s, &backing, opts.clone());
    qemu_io_writes(&ex.uri(), &mut m, WRITES_A);
    assert_changes_recorded(&ex, &before, Some(&m.written));
    if crash {
        ex.kill9();
    } else {
        ex.stop();
    }
    // nothing consumed the log: after the restart every change made before
    // it must still be pending (ring records or dirty bits)
    let ex = Export::start(&s, &backing, opts);
    let log = ex.dump().expect("dump");
    let lost = m.written.subtract(&log.covered());
    assert!(
        lost.is_empty(),
        "changes lost across {}: {}\n{}",
        if crash {
            "kill -9 + restart"
        } else {
            "clean restart"
        },
        lost.describe(10),
        log.summary()
    );
    // and new writes after the restart are tracked as well
    qemu_io_writes(&ex.uri(), &mut m, WRITES_B);
    m.assert_file_matches(&backing);
    let log = assert_changes_recorded(&ex, &before, None).expect("dump");
    let lost = m.written.subtract(&log.covered());
    assert!(
        lost.is_empty(),
        "changes lost: {}\n{}",
        lost.describe(10),
        log.summary()
    );
    if !crash {
        // after a clean shutdown nothing beyond the written blocks may be dirty
        let extra = log.covered().subtract(&m.written.round_out(log.block_size));
        assert!(
            extra.is_empty(),
            "clean restart marked unwritten blocks dirty: {}",
            extra.describe(10)
        );
    }
    ex.stop();
}

#[test]
fn clean_restart_keeps_unconsumed_changes() {
    restart_case("cl-restart", false);
}

#[test]
fn kill9_restart_keeps_unconsumed_changes() {
    restart_case("cl-kill9", true);
}

#[test]
fn ring_overflow_falls_back_and_still_covers() {
    let s = Scratch::new("cl-overflow");
    let backing = s.join("vol.img");
    create_random(&backing, 64 * MIB, 32);
    let before = ImageCopy::capture(&s, &backing);
    let ex = Export::start(
        &s,
        &backing,
        ExportOpts {
            ring_size: Some(MIB),
            ..Default::default()
        },
    );
    // 64 MiB of 4 KiB random writes into a 1 MiB ring
    run_ok(
        tool("fio")
            .args([
                "--name=ovf",
                "--ioengine=nbd",
                &format!("--uri={}", ex.uri()),
            ])
            .args(["--rw=randwrite", "--bs=4k", "--size=64m", "--iodepth=16"]),
        Duration::from_secs(240),
    );
    if let Some(log) =
        assert_changes_recorded(&ex, &before, Some(&RangeSet::from_extents([(0, 64 * MIB)])))
    {
        assert_ne!(
            log.capture_mode,
            "data",
            "a 1 MiB ring cannot hold 64 MiB of data: {}",
            log.summary()
        );
        assert!(log.writes >= 16384, "writes counter: {}", log.summary());
        assert_eq!(log.bytes_written, 64 * MIB, "{}", log.summary());
    }
    ex.stop();
}

#[test]
fn coarse_tracking_block_rounds_dirty_ranges() {
    let s = Scratch::new("cl-bs");
    let backing = s.join("vol.img");
    create_random(&backing, SIZE, 33);
    let before = ImageCopy::capture(&s, &backing);
    let mut m = Model::from_copy(&before);
    let ex = Export::start(
        &s,
        &backing,
        ExportOpts {
            block_size: Some(64 * KIB),
            ..Default::default()
        },
    );
    qemu_io_writes(&ex.uri(), &mut m, WRITES_A);
    m.assert_file_matches(&backing);
    if let Some(log) = assert_changes_recorded(&ex, &before, Some(&m.written)) {
        assert_eq!(log.block_size, 64 * KIB, "{}", log.summary());
        for &(a, b) in log.dirty.ranges() {
            assert!(
                a % (64 * KIB) == 0 && (b % (64 * KIB) == 0 || b == SIZE),
                "dirty range [{a:#x}..{b:#x}) not on 64 KiB blocks"
            );
        }
    }
    ex.stop();
}

#[test]
fn no_tracking_serves_io_and_records_nothing() {
    let s = Scratch::new("cl-notrack");
    let backing = s.join("vol.img");
    create_random(&backing, SIZE, 34);
    let before = ImageCopy::capture(&s, &backing);
    let mut m = Model::from_copy(&before);
    let ex = Export::start(
        &s,
        &backing,
        ExportOpts {
            no_tracking: true,
            ..Default::default()
        },
    );
    qemu_io_writes(&ex.uri(), &mut m, WRITES_A);
    m.assert_file_matches(&backing);
    // either no change log at all, or an empty one
    assert_nothing_recorded_beyond_backing(&ex);
    ex.stop();
}

/// --no-tracking: the backing changes but no change log may record it.
fn assert_nothing_recorded_beyond_backing(ex: &Export) {
    if ex.kind != ServerKind::Rewind {
        return;
    }
    let clog = ex.shm_dir.join(format!("{}.clog", ex.volume));
    if clog.exists() {
        let log = ex.dump().expect("dump");
        assert!(
            log.covered().is_empty(),
            "--no-tracking recorded: {}",
            log.summary()
        );
    }
}
