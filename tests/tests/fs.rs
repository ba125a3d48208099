//! A real filesystem through nbdfuse + loop on `rewind export`, via
//! scripts/fs-over-nbd (mkfs, write with fsync, remount, checksums, fsck),
//! then change-log accounting over everything the filesystem wrote.
//! Loop devices and FUSE are shared: these tests hold a machine-wide lock.

use rewind_tests::*;
use std::time::Duration;

fn fs_over_nbd(tag: &str, fs: &str, size: u64, dio: &str) {
    let _lock = fs_lock();
    let s = Scratch::new(tag);
    let backing = s.join("fsvol.img");
    create_sparse(&backing, size);
    let before = ImageCopy::capture(&s, &backing);
    let ex = Export::start(&s, &backing, ExportOpts::default());
    let o = run(
        std::process::Command::new(script("fs-over-nbd")).args([&ex.uri(), fs, "--dio", dio]),
        Duration::from_secs(900),
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains(&format!("PASS ({fs})")),
        "fs-over-nbd {fs} failed: {}\n{}\n{}",
        o.status,
        text(&o),
        ex.log_text()
    );
    let changed = diff_files(&before.path, &backing);
    assert!(
        changed.total_len() > 40 * MIB,
        "filesystem data did not reach the backing file: {}",
        changed.describe(5)
    );
    assert_changes_recorded(&ex, &before, None);
    ex.stop();
}

#[test]
fn fs_ext4_over_nbdfuse_loop() {
    fs_over_nbd("fs-ext4", "ext4", 256 * MIB, "on");
}

/// Loop device without direct I/O: the page cache batches writes, so the
/// export sees fewer, larger requests.
#[test]
fn fs_ext4_over_nbdfuse_loop_buffered() {
    fs_over_nbd("fs-ext4-buf", "ext4", 256 * MIB, "off");
}

#[test]
fn fs_xfs_over_nbdfuse_loop() {
    fs_over_nbd("fs-xfs", "xfs", 320 * MIB, "on");
}
