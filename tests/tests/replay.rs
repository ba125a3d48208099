//! `rewind replay` end to end: each committed real-software trace replayed
//! through the filter with replication on (export → replicator → TLS →
//! target), then `--verify`: source, replica (after drain, and byte for byte
//! against the source) and every bookmark/time point through snapshot views
//! of the target's journal — zero mismatches. And the oracle catches faults
//! planted in the replica and in a snapshot, naming each.

use rewind_tests::recovery::Snapshot;
use rewind_tests::replay::*;
use rewind_tests::replication::*;
use rewind_tests::*;
use std::path::Path;
use std::time::Duration;

const SIZE: u64 = 160 * MIB;
const T: Duration = Duration::from_secs(300);

fn setup(s: &Scratch) -> Setup {
    let backing = s.join("vol.img");
    create_sparse(&backing, SIZE);
    let st = Setup::start(s, &backing, "zstd:1");
    st.converge(Duration::from_secs(60), "initial sync");
    st
}

#[test]
fn replay_committed_traces_replicated_then_verified() {
    let s = Scratch::new("replay-traces");
    let st = setup(&s);
    let replica = st.target.replica("vol0");
    let vdir = st.target.dir.join("vol0").join("journal");
    let shm = format!("--shm-dir={}", st.export.shm_dir.display());
    for tr in committed_traces() {
        let name = tr.file_name().unwrap().to_string_lossy().into_owned();
        // about three bookmarks per trace (each is verified over the whole volume)
        let every = match name.as_str() {
            n if n.starts_with("cbuild") => "200",
            n if n.starts_with("fio") => "1000",
            _ => "2500",
        };
        let (o, v) = replay(
            &[
                "--volume",
                "vol0",
                "--bookmark-arg",
                &shm,
                "--trace",
                &tr.to_string_lossy(),
                "--uri",
                &st.export.uri(),
                "--bookmark-every",
                every,
                "--time-points",
                "2",
                "--verify",
                "--replica",
                &replica.to_string_lossy(),
                "--journal-dir",
                &vdir.to_string_lossy(),
            ],
            T,
        );
        let v = v.unwrap_or_else(|| panic!("{name}: no JSON report\n{}", text(&o)));
        let ver = &v["verify"];
        // Everything is exact: source, replica, every bookmark and every time point
        // the journal serves (a time the journal refuses as not write-order
        // consistent is counted apart; see the metadata-mode test below).
        assert_eq!(
            v["mismatches"].as_u64(),
            Some(0),
            "{name}: mismatches\n{}\n{}",
            serde_json::to_string_pretty(ver).unwrap_or_default(),
            text(&o)
        );
        assert_eq!(v["read_mismatches"].as_array().map(Vec::len), Some(0));
        assert_eq!(ver["source"]["mismatches"], 0);
        assert_eq!(ver["replica"]["mismatches"], 0);
        let checked = ver["source"]["blocks_checked"].as_u64().unwrap();
        assert!(checked > 100, "{name}: only {checked} blocks checked");
        assert_eq!(ver["source"]["digest_match"], true, "{name}: {ver}");
        assert_eq!(ver["replica"]["blocks_checked"].as_u64(), Some(checked));
        assert_eq!(ver["replica"]["compare_with_source"]["differing_blocks"], 0);
        assert_eq!(
            ver["replica"]["compare_with_source"]["blocks_compared"].as_u64(),
            Some(SIZE / 4096)
        );
        let points = ver["points"].as_array().expect("points");
        for p in points.iter().filter(|p| p["kind"] == "bookmark") {
            assert_eq!(p["mismatches"], 0, "{name}: {p}");
        }
        // every bookmark inserted through the agent recovers exactly (cutoff = its position)
        let bookmarks: Vec<_> = points.iter().filter(|p| p["kind"] == "bookmark").collect();
        let nbm = v["points"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["bookmarked"] == true)
            .count();
        assert!(nbm >= 1, "{name}: no bookmark inserted: {}", v["points"]);
        assert_eq!(bookmarks.len(), nbm, "{name}: {points:?}");
        for b in &bookmarks {
            assert_eq!(b["cutoff_from"], b["cutoff_to"], "{name}: {b}");
            assert_eq!(b["digest_match"], true, "{name}: {b}");
            assert!(b["blocks_checked"].as_u64().unwrap() > 0, "{name}: {b}");
        }
        // and time points (at the bookmarks' times and sampled) are consistent states
        let times = points
            .iter()
            .filter(|p| p["kind"] == "time" && p["blocks_checked"].as_u64().is_some_and(|n| n > 0))
            .count();
        assert!(
            times >= 2,
            "{name}: fewer than 2 time points verified: {points:?}"
        );
        // the trace's reads were replayed and checked inline too
        assert!(
            v["stats"]["read_blocks_checked"].as_u64().unwrap() > 0,
            "{name}"
        );
        assert!(v["stats"]["flushes"].as_u64().unwrap() > 0, "{name}");
        eprintln!(
            "{name}: {} ops, {} blocks checked, {} bookmarks + {} time points, replay {:.2}s, verify {:.2}s",
            v["stats"]["ops"],
            checked,
            bookmarks.len(),
            times,
            v["stats"]["seconds"].as_f64().unwrap(),
            v["verify_seconds"].as_f64().unwrap()
        );
        // the last bookmark once more, served over NBD by `rewind snapshot create`
        let bm = v["points"]
            .as_array()
            .unwrap()
            .iter()
            .rfind(|p| p["bookmarked"] == true)
            .unwrap()
            .clone();
        let sd = st.target.state_dir.to_string_lossy().into_owned();
        let snap = Snapshot::start(
            &s,
            "vol0",
            &[
                "--bookmark",
                bm["name"].as_str().unwrap(),
                "--state-dir",
                &sd,
            ],
        );
        let point = format!("{}={}", bm["seq"], snap.uri);
        let run_id = v["run_id"].to_string();
        let (o, pv) = replay(
            &[
                "--trace",
                &tr.to_string_lossy(),
                "--uri",
                &st.export.uri(),
                "--run-id",
                &run_id,
                "--verify-only",
                "--verify",
                "--point",
                &point,
            ],
            T,
        );
        let pv = assert_clean(&o, &pv, &format!("{name}: vsnap of {}", bm["name"]));
        assert_eq!(
            pv["verify"]["points"][0]["digest_match"], true,
            "{}",
            pv["verify"]
        );
        snap.stop();
    }
}

fn copy(src: &Path, dst: &Path) {
    std::fs::copy(src, dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
}

/// First block (offset) where `a` and `b` differ and `pick(a_block, b_block)` holds.
fn find_block(a: &Path, b: &Path, pick: impl Fn(&[u8], &[u8]) -> bool) -> Option<u64> {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    x.chunks(4096)
        .zip(y.chunks(4096))
        .position(|(p, q)| p != q && pick(p, q))
        .map(|i| i as u64 * 4096)
}

fn is_replay_block(b: &[u8]) -> bool {
    b.starts_with(b"RWRPLY01")
}

/// Finds `key` anywhere in a JSON value (first match, depth first).
fn find_key<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => m
            .get(key)
            .or_else(|| m.values().find_map(|x| find_key(x, key))),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

/// Time points while the change log overflows into metadata and bitmap mode (a
/// 1 MiB ring): the replicator then ships data read back from the volume, which
/// may already show later writes. Such stretches must be refused by the journal
/// as not write-order consistent (wire `horizon_seq`, journal
/// `FLAG_INCONSISTENT`), never served: before the horizon existed, these time
/// points showed STALE blocks (a view newer in one block than in another).
/// Every point the journal does serve must be exact, and some must be served.
#[test]
fn replay_time_points_in_metadata_mode_are_exact_or_refused() {
    let s = Scratch::new("replay-smallring");
    let backing = s.join("vol.img");
    create_sparse(&backing, SIZE);
    let st = Setup::start_full(
        &s,
        &backing,
        "zstd:1",
        |e| e.ring_size = Some(1 << 20),
        |_| {},
        |_| {},
    );
    st.converge(Duration::from_secs(60), "initial sync");
    let replica = st.target.replica("vol0");
    let vdir = st.target.dir.join("vol0").join("journal");
    let (mut served, mut refused) = (0u64, 0u64);
    for tr in committed_traces() {
        let name = tr.file_name().unwrap().to_string_lossy().into_owned();
        let (o, v) = replay(
            &[
                "--trace",
                &tr.to_string_lossy(),
                "--uri",
                &st.export.uri(),
                "--time-points",
                "8",
                "--verify",
                "--replica",
                &replica.to_string_lossy(),
                "--journal-dir",
                &vdir.to_string_lossy(),
            ],
            T,
        );
        let v = assert_clean(&o, &v, &name);
        for p in v["verify"]["points"].as_array().expect("points") {
            if p["refused_inconsistent"].is_string() {
                refused += 1;
            } else if p["blocks_checked"].as_u64().unwrap_or(0) > 0 {
                assert_eq!(p["mismatches"], 0, "{name}: {p}");
                served += 1;
            }
        }
    }
    let ps = run_ok(
        std::process::Command::new(rewind_bin("drvutil"))
            .arg("--shm-dir")
            .arg(&st.export.shm_dir)
            .args(["--ps", "vol0", "--json"]),
        T,
    );
    let ps: serde_json::Value =
        serde_json::from_slice(&ps.stdout).expect("drvutil --ps --json prints JSON");
    let to_meta = find_key(&ps, "data_to_metadata").and_then(|x| x.as_u64());
    assert!(
        to_meta.is_some_and(|n| n > 0),
        "the ring never overflowed into metadata mode: the test shows nothing ({ps})"
    );
    eprintln!("time points served exactly: {served}, refused as inconsistent: {refused}");
    assert!(served > 0, "no time point was served (refused: {refused})");
}

#[test]
fn replay_oracle_names_planted_faults() {
    let s = Scratch::new("replay-faults");
    let st = setup(&s);
    let replica = st.target.replica("vol0");
    let tr = committed_traces()
        .into_iter()
        .find(|p| p.to_string_lossy().contains("fio-mixed"))
        .expect("fio trace");
    let tr = tr.to_string_lossy().into_owned();
    let uri = st.export.uri();
    let run_id = "4242";
    // replay with two pauses: copies of the drained replica at 1/3 and 2/3
    let mut r = SyncedReplay::start(&[
        "--trace",
        &tr,
        "--uri",
        &uri,
        "--run-id",
        run_id,
        "--sync-at",
        "1000",
        "--sync-at",
        "2000",
        "--time-points",
        "0",
    ]);
    let mut snaps = Vec::new();
    for i in 0..2 {
        let pos = r.wait_sync();
        wait_drained(&st.repl, &st.target, Duration::from_secs(60));
        let p = s.join(&format!("at{i}.img"));
        copy(&replica, &p);
        snaps.push((pos, p));
        r.resume();
    }
    let (ok, rep) = r.finish(T);
    assert!(ok, "replay failed: {rep}");
    wait_drained(&st.repl, &st.target, Duration::from_secs(60));

    let verify_only = |extra: &[&str]| {
        let mut a = vec![
            "--trace",
            tr.as_str(),
            "--uri",
            uri.as_str(),
            "--run-id",
            run_id,
            "--verify-only",
            "--verify",
        ];
        a.extend_from_slice(extra);
        replay(&a, T)
    };
    // the unmodified replica and the pause-time copies pass: the harness is not blind by accident
    let (o, v) = verify_only(&["--replica", &replica.to_string_lossy()]);
    assert_clean(&o, &v, "clean replica");
    let (p1, at1) = &snaps[1];
    let (_, at0) = &snaps[0];
    let point = format!("{p1}={}", at1.display());
    let (o, v) = verify_only(&["--point", &point]);
    assert_clean(&o, &v, "clean point copy");

    // 1. a corrupted block in the replica: TORN, at its offset
    let bad = s.join("corrupt.img");
    copy(&replica, &bad);
    let off = find_block(&replica, at0, |p, _| is_replay_block(p)).expect("a replayed block");
    write_at(&bad, off + 1000, &[0x5a; 16]);
    let (o, v) = verify_only(&["--replica", &bad.to_string_lossy(), "--drain-timeout", "0s"]);
    let v = v.unwrap_or_else(|| panic!("{}", text(&o)));
    assert!(!o.status.success());
    let m = mismatch_text(&v["verify"]["replica"]);
    assert!(m.contains(&format!("at {off}: \"TORN")), "{m}");
    assert_eq!(
        v["verify"]["replica"]["compare_with_source"]["differing_blocks"],
        1
    );

    // 2. one chunk dropped: blocks first written after the 2nd pause read as they were (zero): LOST
    let dropped = s.join("dropped.img");
    copy(&replica, &dropped);
    let off = find_block(&replica, at1, |p, q| {
        is_replay_block(p) && q.iter().all(|&b| b == 0)
    })
    .expect("a block first written after the 2nd pause");
    let old = read_at(at1, off, 4096);
    write_at(&dropped, off, &old);
    let (o, v) = verify_only(&[
        "--replica",
        &dropped.to_string_lossy(),
        "--drain-timeout",
        "0s",
    ]);
    let v = v.unwrap_or_else(|| panic!("{}", text(&o)));
    assert!(!o.status.success());
    let m = mismatch_text(&v["verify"]["replica"]);
    assert!(
        m.contains(&format!("at {off}: \"LOST: zeroes\"; expected \"write seq")),
        "{m}"
    );

    // 3. two overlapping writes applied in the wrong order: the older write of a block
    //    ends up on top: STALE, naming the write that should be there
    let reordered = s.join("reordered.img");
    copy(&replica, &reordered);
    let off = find_block(&replica, at1, |p, q| {
        is_replay_block(p) && is_replay_block(q)
    })
    .expect("a block overwritten after the 2nd pause");
    write_at(&reordered, off, &read_at(at1, off, 4096));
    let (o, v) = verify_only(&[
        "--replica",
        &reordered.to_string_lossy(),
        "--drain-timeout",
        "0s",
    ]);
    let v = v.unwrap_or_else(|| panic!("{}", text(&o)));
    assert!(!o.status.success());
    let m = mismatch_text(&v["verify"]["replica"]);
    assert!(m.contains(&format!("at {off}: \"STALE: write seq")), "{m}");
    assert!(m.contains("expected \"write seq"), "{m}");

    // 4. a snapshot serving a stale block: the 2/3 point, served over NBD by a
    //    read-only export of a copy holding one block as it was at 1/3
    let snap = s.join("stale-snap.img");
    copy(at1, &snap);
    let off = find_block(at1, at0, |p, q| is_replay_block(p) && is_replay_block(q))
        .expect("a block overwritten between the pauses");
    write_at(&snap, off, &read_at(at0, off, 4096));
    let ro = Export::start(
        &s,
        &snap,
        ExportOpts {
            read_only: true,
            export_name: Some("snap".into()),
            ..Default::default()
        },
    );
    let point = format!("{p1}={}", ro.uri());
    let (o, v) = verify_only(&["--point", &point]);
    let v = v.unwrap_or_else(|| panic!("{}", text(&o)));
    assert!(!o.status.success());
    let p = &v["verify"]["points"][0];
    assert_eq!(p["mismatches"], 1, "{p}");
    let m = mismatch_text(p);
    assert!(m.contains(&format!("at {off}: \"STALE: write seq")), "{m}");
    // and a block from after the point: TOO NEW
    let newer = s.join("newer-snap.img");
    copy(at0, &newer);
    let (p0, _) = &snaps[0];
    let off = find_block(at1, at0, |p, q| is_replay_block(p) && is_replay_block(q)).unwrap();
    write_at(&newer, off, &read_at(at1, off, 4096));
    let point = format!("{p0}={}", newer.display());
    let (o, v) = verify_only(&["--point", &point]);
    let v = v.unwrap_or_else(|| panic!("{}", text(&o)));
    assert!(!o.status.success());
    let m = mismatch_text(&v["verify"]["points"][0]);
    assert!(m.contains(&format!("at {off}: \"TOO NEW")), "{m}");
    ro.stop();
}

#[test]
fn replay_refuses_malformed_traces_with_line_numbers() {
    let s = Scratch::new("replay-bad");
    let t = s.join("bad.csv");
    std::fs::write(&t, "3,W,4096,4096,1000\n3,W,8192,4096,1001\n3,Q,0,1,1002\n").unwrap();
    let (o, _) = replay(
        &[
            "--trace",
            &t.to_string_lossy(),
            "--uri",
            "nbd+unix:///x?socket=/nonexistent",
        ],
        T,
    );
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("line 3") && e.contains("opcode"), "{e}");
    // skipped by flag: then it gets as far as connecting
    let (o, _) = replay(
        &[
            "--trace",
            &t.to_string_lossy(),
            "--uri",
            "nbd+unix:///x?socket=/nonexistent",
            "--skip-malformed",
        ],
        T,
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("skipped line 3") && e.contains("connecting to"),
        "{e}"
    );
}

/// `(kind, first block, blocks)` of every request in a fio v3 iolog, widened to 4 KiB blocks.
fn iolog_blocks(path: &Path) -> Vec<(String, u64, u64)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut v: Vec<(String, u64, u64)> = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.get(2).copied() {
                Some(k @ ("read" | "write" | "trim")) => {
                    let (o, n): (u64, u64) = (w[3].parse().unwrap(), w[4].parse().unwrap());
                    Some((k.to_string(), o / 4096, (o + n).div_ceil(4096) - o / 4096))
                }
                Some("sync") => Some(("sync".to_string(), 0, 0)),
                _ => None,
            }
        })
        .collect();
    v.sort();
    v
}

fn only(v: &[(String, u64, u64)], kind: &str) -> Vec<(u64, u64)> {
    v.iter()
        .filter(|x| x.0 == kind)
        .map(|x| (x.1, x.2))
        .collect()
}

/// Multiset inclusion of sorted vectors.
fn included(small: &[(u64, u64)], big: &[(u64, u64)]) -> bool {
    let mut j = 0;
    for x in small {
        while j < big.len() && big[j] < *x {
            j += 1;
        }
        if j == big.len() || big[j] != *x {
            return false;
        }
        j += 1;
    }
    true
}

#[test]
fn replay_and_fio_read_iolog_send_the_same_block_ranges() {
    let s = Scratch::new("replay-fio");
    let tr = committed_traces()
        .into_iter()
        .find(|p| p.to_string_lossy().contains("cbuild"))
        .expect("cbuild trace");
    let plain = s.join("trace.iolog");
    let o = run_ok(tool("zstd").arg("-dcf").arg(&tr).arg("-o").arg(&plain), T);
    let _ = o;
    let mut caps = Vec::new();
    for who in ["fio", "rewind"] {
        let backing = s.join(&format!("{who}.img"));
        create_sparse(&backing, SIZE);
        let cap = s.join(&format!("{who}.cap"));
        let ex = Export::start(
            &s,
            &backing,
            ExportOpts {
                export_name: Some("vol".into()),
                trace_out: Some(cap.clone()),
                ..Default::default()
            },
        );
        if who == "fio" {
            run_ok(
                tool("fio")
                    .args([
                        "--name=replay",
                        "--ioengine=nbd",
                        "--iodepth=16",
                        "--replay_no_stall=1",
                    ])
                    .arg(format!("--uri={}", ex.uri()))
                    .arg(format!("--read_iolog={}", plain.display())),
                T,
            );
        } else {
            let (o, v) = replay(
                &["--trace", &plain.to_string_lossy(), "--uri", &ex.uri()],
                T,
            );
            assert_clean(&o, &v, "rewind replay");
        }
        ex.stop();
        caps.push(iolog_blocks(&cap));
    }
    let original = iolog_blocks(&plain);
    let (fio, ours) = (&caps[0], &caps[1]);
    // writes: the same block ranges, request for request
    assert_eq!(only(fio, "write"), only(&original, "write"));
    assert_eq!(only(ours, "write"), only(&original, "write"));
    // flushes: the same count
    assert_eq!(only(fio, "sync").len(), only(&original, "sync").len());
    assert!(only(ours, "sync").len() >= only(&original, "sync").len());
    // reads: ours replays every read; fio (3.33) leaves a few out
    assert_eq!(only(ours, "read"), only(&original, "read"));
    assert!(included(&only(fio, "read"), &only(ours, "read")));
    // trims: fio's nbd engine sends none; ours replays them all
    assert_eq!(only(ours, "trim"), only(&original, "trim"));
    assert!(!only(&original, "trim").is_empty());
}
