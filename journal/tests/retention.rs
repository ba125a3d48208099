//! Retention tests: time, space, both, sparse tiers (compaction), bookmark
//! keeps and live views as promised points, crash at every prune step.

#![allow(clippy::manual_is_multiple_of)] // keep the tests buildable on the workspace MSRV

use journal::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::BTreeMap;

const VOL: u64 = 256 * 1024;
const HOT: u64 = 64 * 1024; // most writes hit the first 64 KiB: compaction has something to merge

fn opts() -> TargetOptions {
    TargetOptions {
        spool_file_size: 64 * 1024,
        segment_size: 48 * 1024,
        apply_batch_chunks: 2,
        cache_bytes: 32 * 1024,
        ..TargetOptions::default()
    }
}

fn chunk(r: &mut StdRng, k: u64) -> ChunkIn {
    let n = r.gen_range(1..=2);
    let extents = (0..n)
        .map(|_| {
            let len = r.gen_range(1..=8u64) * 512;
            let span = if r.gen_range(0..4) == 0 { VOL } else { HOT };
            let offset = r.gen_range(0..(span - len) / 512) * 512;
            let data = if r.gen_range(0..6) == 0 {
                ExtentData::Zero(len)
            } else {
                ExtentData::Data((0..len).map(|_| r.gen()).collect())
            };
            ChunkExtent { offset, data }
        })
        .collect();
    ChunkIn {
        first_seq: k,
        last_seq: k,
        source_time_ns: 1000 * k,
        horizon_seq: 0,
        extents,
    }
}

fn apply_model(img: &mut [u8], c: &ChunkIn) {
    for e in &c.extents {
        let o = e.offset as usize;
        match &e.data {
            ExtentData::Data(d) => img[o..o + d.len()].copy_from_slice(d),
            ExtentData::Zero(n) => img[o..o + *n as usize].fill(0),
        }
    }
}

fn h(b: &[u8]) -> [u8; 32] {
    *blake3::hash(b).as_bytes()
}

struct Fixture {
    dir: tempfile::TempDir,
    v: TargetVolume,
    /// seq → hash of the volume after chunk seq
    at: BTreeMap<u64, [u8; 32]>,
}

/// `n` chunks (time 1000·k), bookmarks after every 10th (App when k % 20 == 0, else Fs).
fn fixture(n: u64, seed: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut v = TargetVolume::create_with(
        &dir.path().join("t"),
        VolumeIdentity {
            name: "ret".into(),
            uuid: *b"uuid-retention-1",
            generation: 1,
            size: VOL,
            block_size: 4096,
        },
        &dir.path().join("replica.img"),
        opts(),
    )
    .unwrap();
    let mut r = StdRng::seed_from_u64(seed);
    let mut img = vec![0u8; VOL as usize];
    let mut at = BTreeMap::new();
    at.insert(0, h(&img));
    for k in 1..=n {
        let c = chunk(&mut r, k);
        apply_model(&mut img, &c);
        v.spool(&c).unwrap();
        at.insert(k, h(&img));
        if k % 10 == 0 {
            let kind = if k % 20 == 0 {
                BookmarkKind::App
            } else {
                BookmarkKind::Fs
            };
            v.record_bookmark(Bookmark {
                name: format!("b{k}"),
                kind,
                uuid: [k as u8; 16],
                seq: k + 1,
                source_time_ns: 1000 * k + 1,
            })
            .unwrap();
        }
        if k % 3 == 0 {
            v.apply_all().unwrap();
        }
    }
    v.apply_all().unwrap();
    Fixture { dir, v, at }
}

fn read_all(v: &TargetVolume, rp: RecoveryPoint) -> Result<[u8; 32]> {
    let s = v.snapshot(&rp)?;
    let mut b = vec![0u8; VOL as usize];
    s.read_at(&mut b, 0)?;
    Ok(h(&b))
}

/// Every seq point from `from` on is exact.
fn check_from(v: &TargetVolume, at: &BTreeMap<u64, [u8; 32]>, from: u64) {
    for (s, want) in at.range(from..) {
        assert_eq!(
            read_all(v, RecoveryPoint::Seq(*s)).unwrap(),
            *want,
            "seq {s}"
        );
    }
}

/// Drop and reopen the volume (keeping the policy).
fn reopen(f: &mut Fixture) {
    let policy = f.v.retention_status().unwrap().policy;
    let p = f.dir.path().join("t");
    // Swap in a handle on a scratch volume so the old one is dropped (lock released) first.
    let scratch = f.dir.path().join("scratch");
    let tmp = TargetVolume::open_with(&scratch, opts()).unwrap_or_else(|_| {
        TargetVolume::create_with(
            &scratch,
            VolumeIdentity {
                name: "scratch".into(),
                uuid: [9; 16],
                generation: 1,
                size: 4096,
                block_size: 4096,
            },
            &f.dir.path().join("scratch.img"),
            opts(),
        )
        .unwrap()
    });
    drop(std::mem::replace(&mut f.v, tmp));
    f.v = TargetVolume::open_with(&p, opts()).unwrap();
    f.v.set_retention(policy);
}

#[test]
fn time_based_prune_keeps_the_window_exact() {
    let mut f = fixture(120, 1);
    let segs_before = f.v.segments().len();
    f.v.set_retention(Some(RetentionPolicy {
        keep_all_ns: Some(50_000),
        ..RetentionPolicy::default()
    }));
    let rep = f.v.prune(120_000).unwrap();
    assert!(rep.deleted_segments > 0, "{rep:?}");
    assert!(rep.journal_bytes_after < rep.journal_bytes_before);
    assert!(rep.alert.is_none());
    assert_eq!(rep.oldest_seq, 70);
    assert!(f.v.segments().len() < segs_before);
    check_from(&f.v, &f.at, 70);
    for v in [0, 1] {
        if v == 1 {
            reopen(&mut f);
            check_from(&f.v, &f.at, 70);
        }
        assert!(matches!(
            f.v.resolve(&RecoveryPoint::Time(69_000)),
            Err(JournalError::BeforeWindow { .. })
        ));
        assert!(matches!(
            f.v.resolve(&RecoveryPoint::Seq(60)),
            Err(JournalError::BeforeWindow { .. })
        ));
        assert!(matches!(
            f.v.resolve(&RecoveryPoint::Bookmark("b60".into())),
            Err(JournalError::UnknownBookmark(_))
        ));
        assert!(read_all(&f.v, RecoveryPoint::Bookmark("b70".into())).is_ok());
        let st = f.v.retention_status().unwrap();
        assert_eq!(st.available_window_ns, 50_000);
        assert!(!st.alert);
    }
}

#[test]
fn space_limit_wins_with_an_alert_and_views_pin() {
    let mut f = fixture(120, 2);
    let total: u64 = f.v.segments().iter().map(|s| s.bytes).sum();
    let limit = total / 3;
    // a live view at seq 30 pins everything after it
    let view = f.v.snapshot(&RecoveryPoint::Seq(30)).unwrap();
    f.v.set_retention(Some(RetentionPolicy {
        keep_all_ns: Some(100_000),
        max_bytes: Some(limit),
        ..RetentionPolicy::default()
    }));
    let rep = f.v.prune(120_000).unwrap();
    assert!(
        rep.alert.as_deref().unwrap_or("").contains("view"),
        "{rep:?}"
    );
    assert!(rep.oldest_seq <= 30);
    let mut b = vec![0u8; VOL as usize];
    view.read_at(&mut b, 0).unwrap();
    assert_eq!(h(&b), f.at[&30]);
    drop(view);
    let rep = f.v.prune(120_000).unwrap();
    assert!(rep.journal_bytes_after <= limit, "{rep:?}");
    // the space limit cut into the 100 µs promise: alert
    assert!(
        rep.alert
            .as_deref()
            .unwrap_or("")
            .contains("below the policy"),
        "{rep:?}"
    );
    let st = f.v.retention_status().unwrap();
    assert!(st.alert);
    assert!(st.journal_bytes <= limit);
    check_from(&f.v, &f.at, rep.oldest_seq);
    let sum = f.v.summary().unwrap();
    assert!(sum.retention.alert);
    assert_eq!(sum.recovery_time_range.1, 120_000);
    // a space-only policy prunes by space without an alert
    f.v.set_retention(Some(RetentionPolicy {
        max_bytes: Some(limit / 2),
        ..RetentionPolicy::default()
    }));
    let rep = f.v.prune(120_000).unwrap();
    assert!(rep.alert.is_none(), "{rep:?}");
    assert!(
        rep.deleted_segments > 0 && rep.journal_bytes_after <= limit / 2,
        "{rep:?}"
    );
    check_from(&f.v, &f.at, rep.oldest_seq);
}

#[test]
fn sparse_tiers_compact_and_keep_promised_points() {
    let mut f = fixture(160, 3);
    // all points for the last 30 µs; one per 10 µs up to 100 µs; App bookmarks 130 µs.
    let policy = RetentionPolicy {
        keep_all_ns: Some(30_000),
        tiers: vec![SparseTier {
            until_age_ns: 100_000,
            every_ns: 10_000,
        }],
        bookmarks: vec![(BookmarkKind::App, 130_000)],
        max_bytes: None,
    };
    f.v.set_retention(Some(policy));
    let before: u64 = f.v.segments().iter().map(|s| s.bytes).sum();
    let rep = f.v.prune(160_000).unwrap();
    assert!(rep.compacted_segments > 0, "{rep:?}");
    assert!(rep.merged_records > 0);
    assert!(rep.journal_bytes_after < before, "{rep:?}");
    let at = f.at.clone();
    let check = |v: &TargetVolume| {
        // full region
        check_from(v, &at, 130);
        // sparse region: one point per 10 µs bucket = the last chunk of each bucket (k ≡ 9 mod 10)
        for k in (69..130).step_by(10) {
            assert_eq!(
                read_all(v, RecoveryPoint::Seq(k)).unwrap(),
                at[&k],
                "kept seq {k}"
            );
            assert_eq!(
                read_all(v, RecoveryPoint::Time(1000 * k)).unwrap(),
                at[&k],
                "kept time {k}"
            );
        }
        // App bookmarks are promised even in the sparse region and beyond the tiers
        for k in [40u64, 60, 80, 100, 120] {
            assert_eq!(
                read_all(v, RecoveryPoint::Bookmark(format!("b{k}"))).unwrap(),
                at[&k],
                "bookmark b{k}"
            );
        }
        // a point between kept ones (in a compacted segment) is refused, never wrong
        let mut refused = 0;
        for k in 70..125u64 {
            match read_all(v, RecoveryPoint::Seq(k)) {
                Ok(x) => assert_eq!(x, at[&k], "seq {k}"),
                Err(JournalError::Inconsistent(_)) => refused += 1,
                Err(e) => panic!("seq {k}: {e}"),
            }
        }
        assert!(refused > 0);
        for k in 70..125u64 {
            match read_all(v, RecoveryPoint::Time(1000 * k + 500)) {
                Ok(x) => assert_eq!(x, at[&k], "time {k}.5"),
                Err(JournalError::Inconsistent(_)) => {}
                Err(e) => panic!("time {k}.5: {e}"),
            }
        }
    };
    check(&f.v);
    // the oldest point is the oldest promised bookmark (b40); b20 (age 140 µs) is gone
    assert!(matches!(
        f.v.resolve(&RecoveryPoint::Seq(39)),
        Err(JournalError::BeforeWindow { .. })
    ));
    assert!(matches!(
        f.v.resolve(&RecoveryPoint::Bookmark("b20".into())),
        Err(JournalError::UnknownBookmark(_))
    ));
    reopen(&mut f);
    check(&f.v);
    // pruning again is stable (nothing more to merge at the same time)
    let rep2 = f.v.prune(160_000).unwrap();
    assert_eq!(rep2.merged_records, 0, "{rep2:?}");
    check(&f.v);
    f.v.verify_journal().unwrap();
}

/// A crash at every prune/compaction step: the reopened volume keeps every
/// promised point exact and finishes or discards the interrupted step.
#[test]
fn prune_crash_at_every_step_loses_no_promised_point() {
    for p in FaultPoint::RETENTION {
        let mut f = fixture(120, 4);
        let policy = RetentionPolicy {
            keep_all_ns: Some(30_000),
            tiers: vec![SparseTier {
                until_age_ns: 70_000,
                every_ns: 10_000,
            }],
            ..RetentionPolicy::default()
        };
        f.v.set_retention(Some(policy.clone()));
        f.v.set_fault(Some(FaultConfig {
            point: p,
            action: FaultAction::Error,
            skip: 0,
        }));
        let e = f.v.prune(120_000);
        assert!(
            matches!(e, Err(JournalError::Injected(q)) if q == p),
            "{p:?}: {e:?}"
        );
        reopen(&mut f);
        let at = f.at.clone();
        let promised = |v: &TargetVolume| {
            check_from(v, &at, 90);
            for k in (59..90).step_by(10) {
                assert_eq!(
                    read_all(v, RecoveryPoint::Seq(k)).unwrap(),
                    at[&k],
                    "{p:?} seq {k}"
                );
            }
        };
        promised(&f.v);
        f.v.verify_journal().unwrap();
        f.v.prune(120_000).unwrap();
        promised(&f.v);
        reopen(&mut f);
        promised(&f.v);
    }
}
