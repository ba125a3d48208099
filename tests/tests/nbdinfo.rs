//! nbdinfo against `rewind export`: export listing, flags, meta context and
//! the base:allocation map.

use rewind_tests::*;
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn json(ex: &Export) -> Value {
    let o = run_ok(tool("nbdinfo").arg("--json").arg(ex.uri()), T);
    let v: Value = serde_json::from_slice(&o.stdout).expect("nbdinfo --json");
    v["exports"][0].clone()
}

#[test]
fn list_shows_export_names() {
    let s = Scratch::new("info-list");
    let b1 = s.join("stemvol.img");
    create_sparse(&b1, 8 * MIB);
    let b2 = s.join("other.img");
    create_sparse(&b2, 8 * MIB);
    let before = ImageCopy::capture(&s, &b1);
    // default export name = the backing file's stem
    let ex1 = Export::start(&s, &b1, ExportOpts::default());
    let ex2 = Export::start(
        &s,
        &b2,
        ExportOpts {
            export_name: Some("volA".into()),
            ..Default::default()
        },
    );
    for (ex, name) in [(&ex1, "stemvol"), (&ex2, "volA")] {
        let uri = format!("nbd+unix:///?socket={}", ex.socket.display());
        let o = run_ok(tool("nbdinfo").arg("--list").arg(&uri), T);
        let t = String::from_utf8_lossy(&o.stdout);
        assert!(
            t.contains(&format!("export=\"{name}\"")),
            "{name} not listed:\n{}",
            text(&o)
        );
        assert!(t.contains("export-size: 8388608"), "{}", text(&o));
        // and the export is reachable under that name
        assert_eq!(json(ex)["export-name"], name);
    }
    // the wrong name is refused
    let bad = format!("nbd+unix:///no-such-export?socket={}", ex2.socket.display());
    run_fails(tool("nbdinfo").arg(&bad), T);
    assert_nothing_recorded(&ex1, &before);
    ex1.stop();
    ex2.stop();
}

#[test]
fn json_flags_read_write_and_read_only() {
    let s = Scratch::new("info-json");
    let b = s.join("vol.img");
    create_random(&b, 16 * MIB, 1);
    let before = ImageCopy::capture(&s, &b);
    let ex = Export::start(&s, &b, ExportOpts::default());
    let e = json(&ex);
    assert_eq!(e["export-size"], 16 * MIB, "{e}");
    for flag in [
        "can_multi_conn",
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
    ] {
        assert_eq!(e[flag], true, "{flag}: {e}");
    }
    assert_eq!(e["is_read_only"], false, "{e}");
    assert!(
        e["contexts"]
            .as_array()
            .is_some_and(|c| c.iter().any(|x| x == "base:allocation")),
        "base:allocation not offered: {e}"
    );
    let max = e["block_size_maximum"].as_u64().unwrap_or(0);
    assert!(max >= MIB, "block_size_maximum {max}: {e}");
    assert_nothing_recorded(&ex, &before);
    ex.stop();

    let ro = Export::start(
        &s,
        &b,
        ExportOpts {
            read_only: true,
            ..Default::default()
        },
    );
    let e = json(&ro);
    assert_eq!(e["is_read_only"], true, "{e}");
    assert_eq!(e["export-size"], 16 * MIB, "{e}");
    assert_eq!(e["can_multi_conn"], true, "{e}");
    ro.stop();
}

#[test]
fn map_base_allocation() {
    let s = Scratch::new("info-map");
    let size = 32 * MIB;
    let data = RangeSet::from_extents([(0, 64 * KIB), (4 * MIB, MIB), (31 * MIB, MIB)]);
    let holes = RangeSet::from_extents([(0, size)]).subtract(&data.round_out(MIB));
    let b = s.join("sparse.img");
    create_sparse_with_data(&b, size, &data, 11);
    let before = ImageCopy::capture(&s, &b);
    let ex = Export::start(&s, &b, ExportOpts::default());
    let o = run_ok(tool("nbdinfo").arg("--map").arg(ex.uri()), T);
    // lines: "offset length type description"; type bit 0 = hole, bit 1 = zero
    let mut ext = Vec::new();
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert!(f.len() >= 3, "unexpected map line {l:?}\n{}", text(&o));
        let (off, len, ty): (u64, u64, u64) = (
            f[0].parse().unwrap(),
            f[1].parse().unwrap(),
            f[2].parse().unwrap(),
        );
        if ty & 1 == 1 {
            assert_eq!(ty & 2, 2, "hole not reported as zero: {l}");
        }
        ext.push((off, len, ty & 1 == 0));
    }
    assert_allocation(&ext, size, &data, &holes);
    assert_nothing_recorded(&ex, &before);
    ex.stop();
}
