//! qemu-io against `rewind export`: pattern writes with and without FUA,
//! aligned, unaligned and large; zero and discard; reads verified with `-P`;
//! backing file verified against a content model; exact change-log accounting.
//!
//! FUA: qemu-io's default cache mode (writethrough) sets FUA on every write;
//! `-t writeback` and `-t none` send plain writes (plus an explicit FLUSH),
//! and `write -f` asks for FUA per request. (Checked against nbdkit's log
//! filter in `fua_flags_are_what_we_think` below.)

use rewind_tests::*;
use std::time::Duration;

const SIZE: u64 = 32 * MIB;

fn qemu_io(uri: &str, opts: &[&str], cmds: &[String]) -> String {
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]).args(opts).arg(uri);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    let o = run_ok(&mut c, Duration::from_secs(120));
    let t = text(&o);
    for bad in ["failed", "error", "Error"] {
        assert!(!t.contains(bad), "qemu-io reported `{bad}`:\n{t}");
    }
    t
}

/// `read -P` commands that check every written byte against the model.
fn read_back_cmds(m: &Model) -> Vec<String> {
    let cmds: Vec<String> = m
        .runs()
        .into_iter()
        .map(|(o, l, b)| format!("read -P {b:#04x} {o} {l}"))
        .collect();
    assert!(!cmds.is_empty());
    cmds
}

/// The shared write pattern: aligned, unaligned at odd offsets, a range
/// straddling a block boundary, the last KiB, and 8 MiB at once.
fn pattern(seed: u8) -> Vec<(u64, u64, u8)> {
    vec![
        (0, 64 * KIB, seed),
        (MIB, 4 * KIB, seed + 1),
        (2 * MIB + 1537, KIB, seed + 2),
        (3 * MIB + 4095, 2, seed + 3),
        (5 * MIB - 511, KIB + 7, seed + 4),
        (8 * MIB, 8 * MIB, seed + 5),
        (8 * MIB + 4096 + 13, KIB, seed + 6), // overlaps the 8 MiB write
        (SIZE - KIB, KIB, seed + 7),
    ]
}

fn setup(tag: &str) -> (Scratch, Export, ImageCopy, Model) {
    let s = Scratch::new(tag);
    let backing = s.join("vol.img");
    create_random(&backing, SIZE, 0x1234);
    let before = ImageCopy::capture(&s, &backing);
    let ex = Export::start(&s, &backing, ExportOpts::default());
    let m = Model::from_copy(&before);
    (s, ex, before, m)
}

fn finish(ex: Export, before: &ImageCopy, m: &Model) {
    // a fresh connection reads everything back with pattern checks
    qemu_io(&ex.uri(), &[], &read_back_cmds(m));
    m.assert_file_matches(&ex.backing);
    assert_changes_recorded(&ex, before, Some(&m.written));
    ex.stop();
}

#[test]
fn fua_writes_default_cache() {
    let (_s, ex, before, mut m) = setup("qio-fua");
    let mut cmds = Vec::new();
    for (off, len, b) in pattern(0x10) {
        cmds.push(format!("write -P {b:#04x} {off} {len}"));
        m.fill(off, len, b);
    }
    // verify in the same session too
    cmds.extend(read_back_cmds(&m));
    qemu_io(&ex.uri(), &[], &cmds);
    finish(ex, &before, &m);
}

#[test]
fn writeback_writes_flush_zero_discard() {
    let (_s, ex, before, mut m) = setup("qio-wb");
    let mut cmds = Vec::new();
    for (off, len, b) in pattern(0x40) {
        cmds.push(format!("write -P {b:#04x} {off} {len}"));
        m.fill(off, len, b);
    }
    cmds.push("flush".into());
    // explicit FUA per request under writeback
    cmds.push(format!("write -f -P 0x5a {} {}", 6 * MIB + 3, 3 * KIB));
    m.fill(6 * MIB + 3, 3 * KIB, 0x5a);
    // WRITE_ZEROES without and with MAY_TRIM, and a TRIM
    cmds.push(format!("write -z {} {}", 20 * MIB, MIB));
    m.fill(20 * MIB, MIB, 0);
    cmds.push(format!("write -z -u {} {}", 22 * MIB, MIB));
    m.fill(22 * MIB, MIB, 0);
    cmds.push(format!("discard {} {}", 24 * MIB, MIB));
    m.trim(24 * MIB, MIB);
    cmds.push("flush".into());
    qemu_io(&ex.uri(), &["-t", "writeback", "-d", "unmap"], &cmds);
    finish(ex, &before, &m);
}

#[test]
fn cache_none_many_small_overlapping_unaligned_writes() {
    let (_s, ex, before, mut m) = setup("qio-small");
    let mut cmds = Vec::new();
    let mut x: u64 = 0x9e37_79b9;
    for i in 0..300u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // clustered in 2 MiB so writes overlap; odd offsets, 1..4 KiB
        let off = (x % (2 * MIB)) | 1;
        let len = KIB * (1 + (x >> 40) % 4) + (i % 3);
        let b = (i % 251) as u8 + 1;
        cmds.push(format!("write -P {b:#04x} {off} {len}"));
        m.fill(off, len, b);
    }
    cmds.push("flush".into());
    qemu_io(&ex.uri(), &["-t", "none"], &cmds);
    finish(ex, &before, &m);
}

#[test]
fn fua_flags_are_what_we_think() {
    // Not a test of our server: proves the FUA/no-FUA split above is real,
    // by running the same qemu-io modes against nbdkit's log filter.
    let s = Scratch::new("qio-fua-check");
    let img = s.join("d.img");
    create_sparse(&img, 4 * MIB);
    let sock = s.join("k.sock");
    let logf = s.join("nbdkit.log");
    let mut nbdkit = tool("nbdkit");
    nbdkit
        .args(["--exit-with-parent", "-f", "-U"])
        .arg(&sock)
        .args(["--filter=log", "file"])
        .arg(&img)
        .arg(format!("logfile={}", logf.display()));
    let mut child = nbdkit
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn nbdkit");
    let t0 = std::time::Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "nbdkit not ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    qemu_io(&uri, &[], &["write -P 1 0 4k".into()]);
    qemu_io(
        &uri,
        &["-t", "writeback"],
        &["write -P 2 0x10000 4k".into()],
    );
    qemu_io(&uri, &["-t", "none"], &["write -P 3 0x20000 4k".into()]);
    qemu_io(
        &uri,
        &["-t", "writeback"],
        &["write -f -P 4 0x30000 4k".into()],
    );
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&logf).expect("nbdkit log");
    let fua_of = |off: &str| -> String {
        log.lines()
            .find(|l| l.contains("Write id=") && l.contains(&format!("offset={off} ")))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("fua=")))
            .unwrap_or_else(|| panic!("no write at {off} in nbdkit log:\n{log}"))
            .to_string()
    };
    assert_eq!(fua_of("0x0"), "fua=1", "default cache mode");
    assert_eq!(fua_of("0x10000"), "fua=0", "-t writeback");
    assert_eq!(fua_of("0x20000"), "fua=0", "-t none");
    assert_eq!(fua_of("0x30000"), "fua=1", "write -f");
}
