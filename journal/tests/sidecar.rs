//! Index sidecars of sealed segments: an index loaded from sidecars equals one
//! built by scanning (across rotation, prune, compaction and rollback, for the
//! owning process and for directory views); corrupt, truncated and stale
//! sidecars are rejected and the segment scanned; a crash while sealing is safe.

use journal::*;
use std::path::{Path, PathBuf};

mod common;
use common::{chunk, model, small_opts as opts, VOL};

fn ident() -> VolumeIdentity {
    VolumeIdentity {
        name: "vol0".into(),
        uuid: *b"sidecar-test-vol",
        generation: 3,
        size: VOL,
        block_size: 4096,
    }
}

fn tdir(d: &Path) -> PathBuf {
    d.join("t")
}

fn create(d: &Path) -> TargetVolume {
    TargetVolume::create_with(&tdir(d), ident(), &d.join("replica.img"), opts()).expect("create")
}

fn open(d: &Path) -> TargetVolume {
    TargetVolume::open_with(&tdir(d), opts()).expect("open")
}

fn files(d: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(tdir(d).join("journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(ext))
        .collect();
    v.sort();
    v
}

fn apply(v: &mut TargetVolume, ks: std::ops::RangeInclusive<u64>) {
    for k in ks {
        v.spool(&chunk(k)).unwrap();
        v.apply_all().unwrap();
    }
}

/// Everything the loaded index determines: records (ids, seqs, times,
/// segments, extents), segment summaries, recovery points, and the bytes at
/// every available seq point.
type Sig = (
    Vec<UndoRecordInfo>,
    Vec<SegmentInfo>,
    RecoveryPoints,
    u64,
    Vec<(u64, Option<Vec<u8>>)>,
);

fn sig(v: &TargetVolume) -> Sig {
    // the scrub cross-checks every index entry (incl. hashes and payload
    // offsets) against a scan of the segments, then every payload
    v.verify_journal().expect("scrub");
    let pts = (0..=v.applied_seq())
        .map(|s| (s, v.read_at_point(Point::Seq(s), 0, VOL).ok()))
        .collect();
    (
        v.undo_records(),
        v.segments(),
        v.recovery_points().unwrap(),
        v.applied_seq(),
        pts,
    )
}

/// Open with sidecars, then without (all removed: scan), and check both give the
/// same index; the scan-open writes the sidecars again. Returns the signature.
fn same_with_and_without_sidecars(d: &Path) -> Sig {
    let v = open(d);
    let sealed = v.segments().len() as u64 - 1;
    let l = v.counters().index_load;
    assert!(sealed > 0, "no sealed segment");
    assert_eq!(l.sidecar_segments, sealed, "{l:?}");
    assert_eq!(l.scanned_segments, 1, "{l:?}");
    assert_eq!(l.rejected_sidecars, 0, "{l:?}");
    let a = sig(&v);
    drop(v);
    for p in files(d, ".idx") {
        std::fs::remove_file(p).unwrap();
    }
    let v = open(d);
    let l = v.counters().index_load;
    assert_eq!(l.sidecar_segments, 0, "{l:?}");
    assert_eq!(l.scanned_segments, sealed + 1, "{l:?}");
    let b = sig(&v);
    drop(v);
    assert!(a == b, "sidecar-loaded index differs from the scanned one");
    // healed: sidecars again for every sealed segment
    assert_eq!(files(d, ".idx").len() as u64, sealed);
    a
}

/// A directory view with sidecars equals one without, and the model.
fn dir_view_matches(d: &Path, seq: u64) {
    let read = |v: &SnapshotView| {
        let mut b = vec![0u8; VOL as usize];
        v.read_at(&mut b, 0).unwrap();
        b
    };
    let a = SnapshotView::open_dir(&tdir(d), &RecoveryPoint::Seq(seq)).unwrap();
    assert!(a.index_load().sidecar_segments > 0, "{:?}", a.index_load());
    assert_eq!(read(&a), model(seq));
    let saved: Vec<(PathBuf, Vec<u8>)> = files(d, ".idx")
        .into_iter()
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    for (p, _) in &saved {
        std::fs::remove_file(p).unwrap();
    }
    let b = SnapshotView::open_dir(&tdir(d), &RecoveryPoint::Seq(seq)).unwrap();
    assert_eq!(b.index_load().sidecar_segments, 0);
    assert_eq!(read(&b), model(seq));
    assert_eq!(a.point(), b.point());
    for (p, b) in saved {
        std::fs::write(p, b).unwrap();
    }
}

#[test]
fn sidecar_index_equals_scan_across_rotation_prune_compaction_rollback() {
    let d = tempfile::tempdir().unwrap();
    let mut v = create(d.path());
    apply(&mut v, 1..=60);
    assert!(v.segments().len() >= 4);
    drop(v);
    let s = same_with_and_without_sidecars(d.path());
    for (k, b) in &s.4 {
        assert!(b.as_ref() == Some(&model(*k)), "seq {k}");
    }
    dir_view_matches(d.path(), 30);

    // prune: sparse tiers compact sealed segments (rewritten in place, new
    // sidecars) and the time limit deletes the oldest ones
    let mut v = open(d.path());
    v.set_retention(Some(RetentionPolicy {
        keep_all_ns: Some(15_000),
        tiers: vec![SparseTier {
            until_age_ns: 50_000,
            every_ns: 5_000,
        }],
        ..RetentionPolicy::default()
    }));
    let rep = v.prune(1_000_000 + 60 * 1000).unwrap();
    assert!(rep.compacted_segments > 0, "{rep:?}");
    drop(v);
    same_with_and_without_sidecars(d.path());
    let mut v = open(d.path());
    v.set_retention(Some(RetentionPolicy {
        keep_all_ns: Some(25_000),
        ..RetentionPolicy::default()
    }));
    let rep = v.prune(1_000_000 + 60 * 1000).unwrap();
    assert!(rep.deleted_segments > 0, "{rep:?}");
    drop(v);
    let s = same_with_and_without_sidecars(d.path());
    let mut exact = 0;
    for (k, b) in &s.4 {
        if let Some(b) = b {
            assert!(*b == model(*k), "seq {k}");
            exact += 1;
        }
    }
    assert!(exact > 15);
    dir_view_matches(d.path(), 55);

    // more rotation, then a rollback into a sealed segment (truncated in place,
    // later ones deleted), then more rotation
    let mut v = open(d.path());
    v.set_retention(None);
    apply(&mut v, 61..=90);
    let segs_before = v.segments().len();
    let rb = v.rollback_to(&RecoveryPoint::Seq(70), false).unwrap();
    assert!(rb.undone_records == 20);
    assert!(v.segments().len() < segs_before);
    apply(&mut v, 71..=100);
    drop(v);
    let s = same_with_and_without_sidecars(d.path());
    assert_eq!(s.3, 100);
    assert!(s.4.last().unwrap().1.as_ref() == Some(&model(100)));
    for (k, b) in &s.4 {
        if let Some(b) = b {
            assert!(*b == model(*k), "seq {k}");
        }
    }
    dir_view_matches(d.path(), 80);
}

fn flip(p: &Path, at: u64) {
    let mut b = std::fs::read(p).unwrap();
    b[at as usize] ^= 0x40;
    std::fs::write(p, b).unwrap();
}

#[test]
fn corrupt_truncated_and_stale_sidecars_are_rejected_and_scanned() {
    let d = tempfile::tempdir().unwrap();
    let mut v = create(d.path());
    apply(&mut v, 1..=40);
    drop(v);
    let reference = same_with_and_without_sidecars(d.path());
    let idx = files(d.path(), ".idx");
    assert!(idx.len() >= 3);
    let len = std::fs::metadata(&idx[1]).unwrap().len();

    // each damage, on the sidecar of segment 1: (name, how)
    type Damage<'a> = (&'a str, Box<dyn Fn() + 'a>);
    let damages: Vec<Damage> = vec![
        ("flipped entry byte", Box::new(|| flip(&idx[1], 200))),
        ("flipped header byte", Box::new(|| flip(&idx[1], 50))),
        (
            "truncated",
            Box::new(|| {
                let b = std::fs::read(&idx[1]).unwrap();
                std::fs::write(&idx[1], &b[..b.len() / 2]).unwrap();
            }),
        ),
        ("empty", Box::new(|| std::fs::write(&idx[1], b"").unwrap())),
        (
            "another segment's sidecar",
            Box::new(|| {
                std::fs::copy(&idx[2], &idx[1]).unwrap();
            }),
        ),
    ];
    for (name, damage) in &damages {
        damage();
        // a directory view (read-only: no repair) scans the segment instead
        let view = SnapshotView::open_dir(&tdir(d.path()), &RecoveryPoint::Seq(10)).unwrap();
        assert_eq!(view.index_load().rejected_sidecars, 1, "{name}");
        let mut b = vec![0u8; VOL as usize];
        view.read_at(&mut b, 0).unwrap();
        assert!(b == model(10), "{name}: view differs");
        drop(view);
        let v = open(d.path());
        let l = v.counters().index_load;
        assert_eq!(l.rejected_sidecars, 1, "{name}: {l:?}");
        assert_eq!(l.scanned_segments, 2, "{name}: {l:?}");
        assert!(sig(&v) == reference, "{name}: index differs");
        drop(v);
        // open rewrote it
        assert_eq!(std::fs::metadata(&idx[1]).unwrap().len(), len, "{name}");
        let v = open(d.path());
        assert_eq!(v.counters().index_load.rejected_sidecars, 0, "{name}");
    }

    // stale: the sidecar of a segment from before a compaction rewrote the segment
    let olds: Vec<Vec<u8>> = idx.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let mut v = open(d.path());
    v.set_retention(Some(RetentionPolicy {
        keep_all_ns: Some(5_000),
        tiers: vec![SparseTier {
            until_age_ns: 1_000_000,
            every_ns: 20_000,
        }],
        ..RetentionPolicy::default()
    }));
    let rep = v.prune(1_000_000 + 40 * 1000).unwrap();
    assert!(rep.compacted_segments >= 1, "{rep:?}");
    assert_eq!(rep.deleted_segments, 0, "{rep:?}");
    let after = sig(&v);
    drop(v);
    let k = (0..idx.len())
        .find(|&k| std::fs::read(&idx[k]).unwrap() != olds[k])
        .expect("compaction rewrote a sidecar");
    std::fs::write(&idx[k], &olds[k]).unwrap();
    let v = open(d.path());
    assert_eq!(v.counters().index_load.rejected_sidecars, 1);
    assert!(sig(&v) == after, "stale sidecar served");
    drop(v);

    // a sidecar for the newest segment (it may grow) or for no segment is removed at open
    let segs = files(d.path(), ".seg");
    let newest = segs.last().unwrap().with_extension("idx");
    std::fs::copy(&idx[1], &newest).unwrap();
    std::fs::copy(&idx[1], newest.with_file_name("00000000000000ff.idx")).unwrap();
    let v = open(d.path());
    assert!(!newest.exists());
    assert_eq!(files(d.path(), ".idx").len(), segs.len() - 1);
    assert!(sig(&v) == after);
    drop(v);

    // the segment changed under an intact sidecar of the same length (its last
    // record differs): the sidecar is not trusted, and the scan finds the damage
    let slen = std::fs::metadata(&segs[1]).unwrap().len();
    flip(&segs[1], slen - 5);
    assert!(matches!(
        TargetVolume::open_with(&tdir(d.path()), opts()),
        Err(JournalError::Corrupt { .. })
    ));
    assert!(matches!(
        SnapshotView::open_dir(&tdir(d.path()), &RecoveryPoint::Seq(35)),
        Err(JournalError::Corrupt { .. })
    ));
    flip(&segs[1], slen - 5);
    let v = open(d.path());
    assert_eq!(v.counters().index_load.rejected_sidecars, 0);
    assert!(sig(&v) == after);
}

#[test]
fn crash_while_sealing_a_segment_is_safe() {
    for p in FaultPoint::SIDECAR {
        let d = tempfile::tempdir().unwrap();
        let mut v = create(d.path());
        v.set_fault(Some(FaultConfig {
            point: p,
            action: FaultAction::Error,
            skip: 1,
        }));
        let mut crashed = None;
        for k in 1..=60 {
            v.spool(&chunk(k)).unwrap();
            match v.apply_all() {
                Ok(_) => {}
                Err(JournalError::Injected(q)) => {
                    assert_eq!(q, p);
                    crashed = Some(k);
                    break;
                }
                Err(e) => panic!("{e}"),
            }
        }
        let k = crashed.expect("fault point reached");
        drop(v);
        if p == FaultPoint::SidecarAfterWrite {
            assert_eq!(files(d.path(), ".idx.tmp").len(), 1);
        }
        // the segment being sealed is still the newest one: scanned, its sidecar
        // (complete or not) removed; nothing acknowledged is lost
        let mut v = open(d.path());
        assert!(files(d.path(), ".idx.tmp").is_empty(), "{p:?}");
        let nseg = files(d.path(), ".seg").len();
        assert_eq!(files(d.path(), ".idx").len(), nseg - 1, "{p:?}");
        assert_eq!(v.durable_seq(), k);
        v.apply_all().unwrap();
        for s in 0..=k {
            assert!(v.read_at_point(Point::Seq(s), 0, VOL).unwrap() == model(s));
        }
        apply(&mut v, k + 1..=k + 30);
        drop(v);
        same_with_and_without_sidecars(d.path());
    }

    // sealed segments whose sidecar is missing (journal from before sidecars,
    // or lost): scanned, then written at open
    let d = tempfile::tempdir().unwrap();
    let mut v = create(d.path());
    apply(&mut v, 1..=30);
    drop(v);
    for p in files(d.path(), ".idx") {
        std::fs::remove_file(p).unwrap();
    }
    let view = SnapshotView::open_dir(&tdir(d.path()), &RecoveryPoint::Seq(5)).unwrap();
    assert_eq!(view.index_load().sidecar_segments, 0);
    assert_eq!(view.index_load().rejected_sidecars, 0);
    drop(view);
    let v = open(d.path());
    let l = v.counters().index_load;
    assert_eq!((l.sidecar_segments, l.rejected_sidecars), (0, 0));
    assert_eq!(l.scanned_segments, v.segments().len() as u64);
    drop(v);
    same_with_and_without_sidecars(d.path());
}
