//! fio's nbd engine with crc32c verification at queue depth 1 and 32:
//! 4 KiB random writes over the whole 64 MiB export, then a verify pass.

use rewind_tests::*;
use serde_json::Value;
use std::time::Duration;

const SIZE: u64 = 64 * MIB;

fn fio_verify(tag: &str, iodepth: u32, bs: &[&str]) {
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
            .args(["--rw=randwrite", "--size=64m"])
            .arg(format!("--iodepth={iodepth}"))
            .args([
                "--verify=crc32c",
                "--verify_fatal=1",
                "--do_verify=1",
                "--verify_state_save=0",
            ])
            .args(bs)
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
    // every block written once (mixed sizes: all but a tail smaller than
    // the largest request), then read back and verified
    let wrote = job["write"]["io_bytes"].as_u64().unwrap_or(0);
    let fixed = bs.iter().any(|a| a.starts_with("--bs="));
    if fixed {
        assert_eq!(wrote, SIZE, "write bytes: {}", job["write"]);
    } else {
        assert!(wrote > SIZE - 2 * MIB, "write bytes: {}", job["write"]);
    }
    assert_eq!(
        job["read"]["io_bytes"], wrote,
        "verify read bytes: {}",
        job["read"]
    );
    ex.assert_alive();
    // with a fixed block size fio's randwrite touches every block once
    let exp = RangeSet::from_extents([(0, SIZE)]);
    assert_changes_recorded(&ex, &before, if fixed { Some(&exp) } else { None });
    ex.stop();
}

#[test]
fn fio_randwrite_verify_qd1() {
    fio_verify("fio-qd1", 1, &["--bs=4k"]);
}

#[test]
fn fio_randwrite_verify_qd32() {
    fio_verify("fio-qd32", 32, &["--bs=4k"]);
}

/// Mixed request sizes from 512 B to 1 MiB (fio lays blocks out without
/// overlap and still writes every byte once), md5 verification.
#[test]
fn fio_randwrite_verify_mixed_sizes_qd8() {
    fio_verify(
        "fio-mixed",
        8,
        &["--bsrange=512-1m", "--bs_unaligned", "--verify=md5"],
    );
}
