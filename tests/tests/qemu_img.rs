//! qemu-img against `rewind export`: whole-image convert in and out (with a
//! WRITE_ZEROES far beyond the advertised maximum), compare, and the
//! allocation map over BLOCK_STATUS on a sparse backing file.

use rewind_tests::*;
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(180);

#[test]
fn convert_in_and_out_and_compare() {
    let s = Scratch::new("qimg-conv");
    // source: 64 MiB random with a 40 MiB zero hole (qemu-img writes the
    // hole with one WRITE_ZEROES of 40 MiB > the 32 MiB maximum)
    let src = s.join("src.img");
    create_random(&src, 64 * MIB, 99);
    write_at(&src, 16 * MIB, &vec![0u8; (40 * MIB) as usize]);
    let backing = s.join("vol.img");
    create_random(&backing, 64 * MIB, 5);
    let before = ImageCopy::capture(&s, &backing);
    let ex = Export::start(&s, &backing, ExportOpts::default());

    run_ok(
        tool("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(ex.uri()),
        T,
    );
    run_ok(
        tool("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&src)
            .arg(ex.uri()),
        T,
    );
    let out = s.join("out.img");
    run_ok(
        tool("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(ex.uri())
            .arg(&out),
        T,
    );
    assert!(
        files_equal(&src, &out),
        "image read back differs from source"
    );
    assert!(
        files_equal(&src, &backing),
        "backing file differs from source"
    );
    // and qemu-img compare export vs backing file
    run_ok(
        tool("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(ex.uri())
            .arg(&backing),
        T,
    );
    // every byte that changed must be in the change log; the whole image
    // was rewritten (data or zeroes) by convert
    let log = assert_changes_recorded(&ex, &before, None);
    if let Some(log) = log {
        let changed = diff_files(&before.path, &backing);
        assert!(changed.total_len() > 60 * MIB, "{}", changed.describe(5));
        assert!(
            log.covered()
                .contains_set(&RangeSet::from_extents([(16 * MIB, 40 * MIB)])),
            "the 40 MiB zeroed range is not in the change log: {}",
            log.summary()
        );
    }
    ex.stop();
}

fn sparse_layout() -> (u64, RangeSet, RangeSet) {
    let size = 64 * MIB;
    let data = RangeSet::from_extents([
        (0, MIB),
        (8 * MIB, 64 * KIB),
        (20 * MIB + 4 * KIB, 12 * KIB),
        (63 * MIB, MIB),
    ]);
    // holes well away from data (filesystems allocate in blocks; leave 64 KiB)
    let holes = RangeSet::from_extents([(0, size)]).subtract(&data.round_out(MIB));
    (size, data, holes)
}

#[test]
fn map_shows_holes_and_data() {
    let s = Scratch::new("qimg-map");
    let (size, data, holes) = sparse_layout();
    let backing = s.join("sparse.img");
    create_sparse_with_data(&backing, size, &data, 3);
    let before = ImageCopy::capture(&s, &backing);
    let ex = Export::start(&s, &backing, ExportOpts::default());
    let o = run_ok(
        tool("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(ex.uri()),
        T,
    );
    let v: Value = serde_json::from_slice(&o.stdout).expect("qemu-img map JSON");
    let ext: Vec<(u64, u64, bool)> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_allocation(&ext, size, &data, &holes);
    // holes must read as zero
    for e in v.as_array().unwrap() {
        if !e["data"].as_bool().unwrap() {
            assert!(e["zero"].as_bool().unwrap(), "hole not marked zero: {e}");
        }
    }
    assert_nothing_recorded(&ex, &before);
    ex.stop();
}
