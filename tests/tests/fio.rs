//! fio's nbd engine with crc32c verification at queue depth 1 and 32:
//! 4 KiB random writes over the whole 64 MiB export, then a verify pass.

use rewind_tests::*;
use serde_json::Value;
use std::time::Duration;

const SIZE: u64 = 64 * MIB;

fn fio_verify(tag: &str, iodepth: u32) {
    let s = Scratch::new(tag);
    let backing = s.join("vol.img");
    create_random(&backing, SIZE, 8);
    let before = ImageCopy::capture(&s, &backing);
    let mut ex = Export::start(&s, &backing, ExportOpts::default());
    let out = s.join("fio.json");
    let o = run(
        tool("fio")
            .arg(format!("--name={tag}"))
            .arg("--ioengine=nbd")
            .arg(format!("--uri={}", ex.uri()))
            .args(["--rw=randwrite", "--bs=4k", "--size=64m"])
            .arg(format!("--iodepth={iodepth}"))
            .args(["--verify=crc32c", "--verify_fatal=1", "--do_verify=1"])
            .args(["--output-format=json", "--runtime=120"])
            .arg(format!("--output={}", out.display())),
        Duration::from_secs(240),
    );
    let report = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        o.status.success(),
        "fio failed: {}\n{}\n{report}",
        o.status,
        text(&o)
    );
    let v: Value = serde_json::from_str(&report)
        .unwrap_or_else(|e| panic!("fio JSON: {e}\n{report}\n{}", text(&o)));
    let job = &v["jobs"][0];
    assert_eq!(job["error"], 0, "fio job error: {job}");
    // every block written once, then read back and verified
    assert_eq!(
        job["write"]["io_bytes"], SIZE,
        "write bytes: {}",
        job["write"]
    );
    assert_eq!(
        job["read"]["io_bytes"], SIZE,
        "verify read bytes: {}",
        job["read"]
    );
    ex.assert_alive();
    // fio's randwrite touches every 4 KiB block exactly once
    assert_changes_recorded(&ex, &before, Some(&RangeSet::from_extents([(0, SIZE)])));
    ex.stop();
}

#[test]
fn fio_randwrite_verify_qd1() {
    fio_verify("fio-qd1", 1);
}

#[test]
fn fio_randwrite_verify_qd32() {
    fio_verify("fio-qd32", 32);
}
