//! nbdcopy to and from `rewind export` with 4 connections (multi-conn).

use rewind_tests::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(180);

#[test]
fn copy_in_and_out_four_connections() {
    let s = Scratch::new("nbdcopy");
    let src = s.join("src.img");
    create_random(&src, 64 * MIB, 42);
    write_at(&src, 20 * MIB, &vec![0u8; (10 * MIB) as usize]);
    let backing = s.join("vol.img");
    create_random(&backing, 64 * MIB, 43);
    let before = ImageCopy::capture(&s, &backing);
    let ex = Export::start(&s, &backing, ExportOpts::default());

    run_ok(
        tool("nbdcopy")
            .args(["--connections=4", "--flush"])
            .arg(&src)
            .arg(ex.uri()),
        T,
    );
    assert!(
        files_equal(&src, &backing),
        "backing differs from source after nbdcopy in"
    );
    let out = s.join("out.img");
    run_ok(
        tool("nbdcopy")
            .args(["--connections=4"])
            .arg(ex.uri())
            .arg(&out),
        T,
    );
    assert!(files_equal(&src, &out), "copy out differs from source");
    if let Some(log) = assert_changes_recorded(&ex, &before, None) {
        assert!(log.covered().total_len() >= 54 * MIB, "{}", log.summary());
    }
    ex.stop();
}
