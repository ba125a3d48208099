//! Bad input to the recovery commands: damaged journal files, a missing
//! catalogue row, points outside the window or in the future, unknown
//! bookmarks, malformed times — each a clear error and a non-zero exit, and
//! never wrong bytes served.

use rewind_tests::recovery::*;
use rewind_tests::replication::*;
use rewind_tests::*;
use std::path::Path;
use std::time::Duration;

const SIZE: u64 = 16 * MIB;

fn fails_with(args: &[&str], needle: &str) {
    let o = rewind(args);
    let t = text(&o);
    assert!(!o.status.success(), "rewind {args:?} succeeded: {t}");
    assert!(
        t.to_lowercase().contains(&needle.to_lowercase()),
        "rewind {args:?}: expected {needle:?} in: {t}"
    );
}

/// Offset of a byte in the last stored undo payload of a segment (the newest
/// record, which every earlier point needs), walking the records as
/// docs/journal-format.md lays them out.
fn last_payload(seg: &[u8]) -> Option<usize> {
    let mut found = None;
    let rd = |o: usize, n: usize| {
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(&seg[o..o + n]);
        u64::from_le_bytes(a) as usize
    };
    let mut pos = 96;
    while pos + 64 <= seg.len() {
        let body = rd(pos + 8, 8);
        let n = rd(pos + 48, 4);
        if &seg[pos..pos + 4] == b"UNDO" {
            let mut p = pos + 64 + n * 64;
            for i in 0..n {
                let stored = rd(pos + 64 + i * 64 + 24, 8);
                if stored > 8 {
                    found = Some(p + 3);
                }
                p += stored;
            }
        }
        pos += 64 + body + 32;
    }
    found
}

fn cmd<'a>(out: &'a str, base: &[&'a str], p: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["snapshot", "materialize", "--out", out];
    a.extend_from_slice(base);
    a.extend_from_slice(p);
    a
}

fn sv(v: &[String]) -> Vec<&str> {
    v.iter().map(|x| x.as_str()).collect()
}

fn segment(jdir: &Path) -> std::path::PathBuf {
    let mut v: Vec<_> = std::fs::read_dir(jdir.join("journal"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    v.sort();
    v.remove(0)
}

#[test]
fn recovery_bad_input_clear_errors_nothing_wrong_served() {
    let s = Scratch::new("rec-bad");
    let src = s.join("vol.img");
    create_random(&src, SIZE, 4);
    let st = Setup::start(&s, &src, "off");
    st.converge(Duration::from_secs(60), "initial sync");
    let mut expect = Vec::new();
    for k in 0..3u64 {
        random_writes(&st.export.uri(), SIZE, 20, 400 + k);
        let name = format!("b{k}");
        create_bookmark(&st.export, &name, None);
        expect.push((name, blake3_file(&src)));
    }
    random_writes(&st.export.uri(), SIZE, 20, 499);
    st.converge(Duration::from_secs(60), "workload");
    let sd = st.target.state_dir.to_str().unwrap().to_string();
    let sock = format!("unix:{}", s.join("bad.sock").display());

    // Points that do not exist, through the running target.
    let base = ["--volume", "vol0", "--state-dir", &sd];
    let out = s.join("o.raw");
    let outs = out.to_str().unwrap().to_string();
    let mat = |p: &[&'static str]| cmd(&outs, &base, p);
    fails_with(&mat(&["--bookmark", "no-such"]), "unknown bookmark");
    fails_with(&mat(&["--at", "1000"]), "before the retention window");
    let future = at_arg(now_ns() + 3_600_000_000_000);
    fails_with(&cmd(&outs, &base, &["--at", &future]), "future");
    fails_with(&mat(&["--at", "yesterday"]), "RFC 3339");
    fails_with(&mat(&["--at", "2026-11-22T04:50:00+01:00"]), "UTC");
    fails_with(&mat(&[]), "exactly one of");
    fails_with(&mat(&["--latest", "--bookmark", "b0"]), "exactly one of");
    let mut a = vec![
        "snapshot",
        "create",
        "--listen",
        &sock,
        "--bookmark",
        "nope",
    ];
    a.extend_from_slice(&base);
    fails_with(&a, "unknown bookmark");
    fails_with(
        &["recover", "list", "--volume", "nope", "--state-dir", &sd],
        "never replicated here",
    );
    assert!(!out.exists(), "a refused materialize left an output file");

    // Damage with the target stopped: the commands open the journal themselves.
    let Setup {
        mut target,
        mut repl,
        ..
    } = st;
    repl.daemon.stop();
    target.daemon.stop();
    let jdir = target.dir.join("vol0").join("journal");
    let td = target.dir.to_str().unwrap().to_string();
    let off = ["--volume", "vol0", "--target-dir", &td, "--state-dir", &sd];
    let offm = |p: &[&str]| {
        cmd(&outs, &off, p)
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
    };
    // A missing catalogue row: derived data, rebuilt; the bookmark is exact.
    let db = jdir.join("catalogue.sqlite");
    let o = run(
        tool("sqlite3")
            .arg(&db)
            .arg("DELETE FROM bookmarks; DELETE FROM segments;"),
        Duration::from_secs(30),
    );
    assert!(o.status.success(), "sqlite3: {}", text(&o));
    let o = rewind(&sv(&offm(&["--bookmark", "b1"])));
    assert!(
        o.status.success(),
        "after a missing catalogue row: {}",
        text(&o)
    );
    assert_eq!(blake3_file(&out), expect[1].1);

    // Corrupt undo payload bytes: reads of older points fail, never wrong data.
    let seg = segment(&jdir);
    let orig = std::fs::read(&seg).unwrap();
    let at = last_payload(&orig).expect("a stored undo payload");
    let mut bad = orig.clone();
    bad[at] ^= 0x5a;
    std::fs::write(&seg, &bad).unwrap();
    fails_with(&sv(&offm(&["--bookmark", "b0"])), "corrupt");
    let snap = Snapshot::start(
        &s,
        "vol0",
        &["--bookmark", "b0", "--target-dir", &td, "--state-dir", &sd],
    );
    let img = s.join("c.raw");
    let o = run(
        tool("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw", &snap.uri])
            .arg(&img),
        Duration::from_secs(60),
    );
    assert!(
        !o.status.success(),
        "a corrupt point was served: {}",
        text(&o)
    );
    drop(snap);
    // The latest point needs no undo data: still served exactly.
    let o = rewind(&sv(&offm(&["--latest"])));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(blake3_file(&out), blake3_file(&src));

    // A damaged record header: the journal refuses to open, with the file named.
    let mut bad = orig.clone();
    bad[96 + 20] ^= 0xff;
    std::fs::write(&seg, &bad).unwrap();
    fails_with(
        &[
            "recover",
            "list",
            "--volume",
            "vol0",
            "--target-dir",
            &td,
            "--state-dir",
            &sd,
        ],
        "corrupt",
    );

    // A truncated segment: whatever the journal still offers is exact.
    std::fs::write(&seg, &orig[..orig.len() / 2]).unwrap();
    for (name, h) in &expect {
        let o = rewind(&sv(&offm(&["--bookmark", name])));
        if o.status.success() {
            assert_eq!(
                &blake3_file(&out),
                h,
                "bookmark {name} after truncation: wrong bytes"
            );
        } else {
            assert!(
                text(&o).contains("journal damaged"),
                "bookmark {name}: {}",
                text(&o)
            );
        }
    }
}
