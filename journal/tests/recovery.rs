//! Recovery API tests: bookmarks (durable, idempotent, rebuilt into the
//! catalogue), recovery-point resolution and its errors, snapshot views (also
//! while apply keeps running in another thread), materialization, group bookmarks.

#![allow(clippy::manual_is_multiple_of)] // keep the tests buildable on the workspace MSRV

use journal::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

const VOL: u64 = 256 * 1024;

fn ident(size: u64, uuid: [u8; 16]) -> VolumeIdentity {
    VolumeIdentity {
        name: "vol".into(),
        uuid,
        generation: 1,
        size,
        block_size: 4096,
    }
}

fn opts() -> TargetOptions {
    TargetOptions {
        spool_file_size: 64 * 1024,
        segment_size: 64 * 1024,
        apply_batch_chunks: 3,
        cache_bytes: 32 * 1024,
        ..TargetOptions::default()
    }
}

fn create(dir: &Path, uuid: [u8; 16]) -> TargetVolume {
    TargetVolume::create_with(
        &dir.join("t"),
        ident(VOL, uuid),
        &dir.join("replica.img"),
        opts(),
    )
    .expect("create")
}

/// Random chunk `k` (seq k, time 1000·k): 1–3 extents, data / zero / compressible.
fn chunk(r: &mut StdRng, k: u64) -> ChunkIn {
    let n = r.gen_range(1..=3);
    let extents = (0..n)
        .map(|_| {
            let len = r.gen_range(1..=24u64) * 512;
            let offset = r.gen_range(0..(VOL - len) / 512) * 512;
            let data = match r.gen_range(0..5) {
                0 => ExtentData::Zero(len),
                1 => ExtentData::Data(vec![(k % 250) as u8 + 1; len as usize].into()),
                _ => ExtentData::Data((0..len).map(|_| r.gen()).collect()),
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

fn view_bytes(v: &SnapshotView) -> Vec<u8> {
    let mut b = vec![0u8; v.size() as usize];
    // odd-sized reads to cross extent and piece boundaries
    let mut o = 0usize;
    let mut step = 7777usize;
    while o < b.len() {
        let n = step.min(b.len() - o);
        v.read_at(&mut b[o..o + n], o as u64).expect("view read");
        o += n;
        step = step * 3 % 100_000 + 1;
    }
    b
}

fn bm(name: &str, kind: BookmarkKind, seq: u64, n: u8) -> Bookmark {
    Bookmark {
        name: name.into(),
        kind,
        uuid: [n; 16],
        seq,
        source_time_ns: 1000 * seq - 500,
    }
}

/// Workload: 60 chunks, a bookmark after every 5th, applies in between; every
/// bookmark and every 7th time point read back exactly through a view and
/// through materialization; bookmarks survive a restart and a lost catalogue.
#[test]
fn bookmarks_and_time_points_recover_exactly() {
    let d = tempfile::tempdir().unwrap();
    let mut v = create(d.path(), *b"uuid-recovery-01");
    let mut r = StdRng::seed_from_u64(42);
    let mut img = vec![0u8; VOL as usize];
    let mut at_time: BTreeMap<u64, [u8; 32]> = BTreeMap::new();
    let mut at_bookmark: Vec<(String, [u8; 32])> = Vec::new();
    // The starting state (time 0, before the first chunk) is no point by time.
    for k in 1..=60u64 {
        let c = chunk(&mut r, k);
        apply_model(&mut img, &c);
        v.spool(&c).unwrap();
        at_time.insert(1000 * k, h(&img));
        if k % 5 == 0 {
            let name = format!("bm{k}");
            let kind = if k % 10 == 0 {
                BookmarkKind::App
            } else {
                BookmarkKind::Fs
            };
            assert_eq!(
                v.record_bookmark(bm(&name, kind, k + 1, k as u8)).unwrap(),
                BookmarkOutcome::Recorded
            );
            // idempotent by uuid and by (name, seq)
            assert_eq!(
                v.record_bookmark(bm(&name, kind, k + 1, k as u8)).unwrap(),
                BookmarkOutcome::Duplicate
            );
            let mut other_uuid = bm(&name, kind, k + 1, 200);
            other_uuid.uuid[0] = 201;
            assert_eq!(
                v.record_bookmark(other_uuid).unwrap(),
                BookmarkOutcome::Duplicate
            );
            at_bookmark.push((name.clone(), h(&img)));
            // before apply: recorded but not yet recoverable
            if k % 15 == 0 {
                assert!(matches!(
                    v.resolve(&RecoveryPoint::Bookmark(name)),
                    Err(JournalError::PointNotAvailable(_))
                ));
            }
        }
        if r.gen_range(0..4) == 0 {
            v.apply_all().unwrap();
        }
    }
    v.apply_all().unwrap();
    let check = |v: &TargetVolume| {
        for (name, want) in &at_bookmark {
            let s = v.snapshot(&RecoveryPoint::Bookmark(name.clone())).unwrap();
            assert_eq!(s.point().bookmark.as_ref().unwrap().name, *name);
            assert!(s.point().consistent);
            assert!(h(&view_bytes(&s)) == *want, "bookmark {name}");
        }
        for (t, want) in at_time.iter().step_by(7) {
            let s = v.snapshot(&RecoveryPoint::Time(*t + 999)).unwrap();
            assert!(h(&view_bytes(&s)) == *want, "time {t}");
        }
    };
    check(&v);
    // materialize every 3rd bookmark and compare with the expected hash and with the view
    for (i, (name, want)) in at_bookmark.iter().enumerate().step_by(3) {
        let s = v.snapshot(&RecoveryPoint::Bookmark(name.clone())).unwrap();
        let out = d.path().join(format!("mat{i}.img"));
        let mut calls = 0;
        let st = s
            .materialize(&out, |done, total| {
                assert!(done <= total);
                calls += 1;
            })
            .unwrap();
        assert!(calls >= 1);
        assert_eq!(st.bytes, VOL);
        assert_eq!(st.written_bytes + st.sparse_bytes, VOL);
        let got = std::fs::read(&out).unwrap();
        assert!(h(&got) == *want, "materialized bookmark {name}");
        assert!(matches!(
            s.materialize(&d.path().join("replica.img"), |_, _| {}),
            Err(JournalError::Invalid(_))
        ));
    }
    // listing
    let list = v.bookmarks().unwrap();
    assert_eq!(list.len(), at_bookmark.len());
    assert!(list.iter().all(|b| b.applied && b.available));
    let rp = v.recovery_points().unwrap();
    assert_eq!(rp.latest.seq, 60);
    assert_eq!(rp.latest.source_time_ns, 60_000);
    assert_eq!(rp.consistent_ranges, vec![(1000, 60_000)]);
    assert_eq!(rp.oldest_time_ns, 1000);
    assert!(matches!(
        v.resolve(&RecoveryPoint::Time(999)),
        Err(JournalError::BeforeWindow {
            oldest_time_ns: 1000,
            ..
        })
    ));
    // bookmark at or before a time, by kind
    let p = v
        .resolve(&RecoveryPoint::BookmarkAtOrBefore {
            time_ns: 34_000,
            kind: Some(BookmarkKind::App),
        })
        .unwrap();
    assert_eq!(p.bookmark.unwrap().name, "bm30");
    let p = v
        .resolve(&RecoveryPoint::BookmarkAtOrBefore {
            time_ns: 36_000,
            kind: None,
        })
        .unwrap();
    assert_eq!(p.bookmark.unwrap().name, "bm35");
    // restart, then lose the catalogue: bookmarks come back from the log
    drop(v);
    let t = d.path().join("t");
    let v = TargetVolume::open_with(&t, opts()).unwrap();
    check(&v);
    drop(v);
    for s in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(t.join(format!("catalogue.sqlite{s}")));
    }
    let v = TargetVolume::open_with(&t, opts()).unwrap();
    assert_eq!(v.bookmarks().unwrap().len(), at_bookmark.len());
    check(&v);
    drop(v);
    let db = rusqlite::Connection::open(t.join("catalogue.sqlite")).unwrap();
    let n: i64 = db
        .query_row("SELECT count(*) FROM bookmarks", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n as usize, at_bookmark.len());
}

#[test]
fn point_errors_are_clear() {
    let d = tempfile::tempdir().unwrap();
    let mut v = create(d.path(), *b"uuid-recovery-02");
    let mut r = StdRng::seed_from_u64(7);
    for k in 1..=4 {
        v.spool(&chunk(&mut r, k)).unwrap();
    }
    v.apply_all().unwrap();
    // unordered (resync) data, then ordered again
    let mut u = chunk(&mut r, 5);
    u.first_seq = 0;
    u.last_seq = 0;
    u.source_time_ns = 5000;
    v.spool(&u).unwrap();
    v.spool(&chunk(&mut r, 6)).unwrap();
    v.apply_all().unwrap();
    v.spool(&chunk(&mut r, 7)).unwrap(); // spooled, not applied
    assert!(matches!(
        v.resolve(&RecoveryPoint::Bookmark("nope".into())),
        Err(JournalError::UnknownBookmark(_))
    ));
    assert!(matches!(
        v.resolve(&RecoveryPoint::Time(5500)),
        Err(JournalError::Inconsistent(_))
    ));
    assert!(matches!(
        v.resolve(&RecoveryPoint::Time(7500)),
        Err(JournalError::PointNotAvailable(_))
    ));
    assert!(matches!(
        v.resolve(&RecoveryPoint::Seq(7)),
        Err(JournalError::PointNotAvailable(_))
    ));
    v.apply_all().unwrap();
    assert!(matches!(
        v.resolve(&RecoveryPoint::Time(9_000_000)),
        Err(JournalError::InFuture { .. })
    ));
    assert!(v.resolve(&RecoveryPoint::Time(6000)).unwrap().consistent);
    assert!(v.resolve(&RecoveryPoint::Time(4999)).unwrap().consistent);
    assert_eq!(
        v.recovery_points().unwrap().consistent_ranges,
        vec![(1000, 4999), (6000, 7000)]
    );
    let s = v.snapshot(&RecoveryPoint::Latest).unwrap();
    let mut b = [0u8; 2];
    assert!(matches!(
        s.read_at(&mut b, VOL - 1),
        Err(JournalError::OutOfRange { .. })
    ));
}

/// Views opened at several points keep returning exactly their point's bytes
/// while another thread spools and applies more chunks to the same replica.
#[test]
fn views_stay_exact_while_apply_continues() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<SnapshotView>();
    let d = tempfile::tempdir().unwrap();
    let v = create(d.path(), *b"uuid-recovery-03");
    let v = Arc::new(Mutex::new(v));
    let mut r = StdRng::seed_from_u64(3);
    let mut img = vec![0u8; VOL as usize];
    let mut chunks = Vec::new();
    for k in 1..=200u64 {
        chunks.push(chunk(&mut r, k));
    }
    let mut views = Vec::new();
    {
        let mut g = v.lock().unwrap();
        for k in 1..=40u64 {
            let c = &chunks[k as usize - 1];
            apply_model(&mut img, c);
            g.spool(c).unwrap();
            if k % 10 == 0 {
                g.apply_all().unwrap();
                let s = g.snapshot(&RecoveryPoint::Seq(k)).unwrap();
                views.push((Arc::new(s), h(&img)));
            }
        }
    }
    let writer = {
        let v = v.clone();
        let chunks = chunks[40..].to_vec();
        std::thread::spawn(move || {
            for c in chunks {
                let mut g = v.lock().unwrap();
                g.spool(&c).unwrap();
                g.apply_next().unwrap();
            }
        })
    };
    let readers: Vec<_> = views
        .iter()
        .map(|(s, want)| {
            let s = s.clone();
            let want = *want;
            std::thread::spawn(move || {
                for _ in 0..15 {
                    assert!(h(&view_bytes(&s)) == want, "view at {:?}", s.point());
                }
            })
        })
        .collect();
    writer.join().unwrap();
    for t in readers {
        t.join().unwrap();
    }
    for (s, want) in &views {
        assert!(h(&view_bytes(s)) == *want);
    }
}

#[test]
fn latest_common_bookmark_of_a_group() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let mut a = create(d1.path(), *b"uuid-group-vol-a");
    let mut b = create(d2.path(), *b"uuid-group-vol-b");
    let mut r = StdRng::seed_from_u64(9);
    for k in 1..=9u64 {
        a.spool(&chunk(&mut r, k)).unwrap();
        b.spool(&chunk(&mut r, k)).unwrap();
        if k % 3 == 0 {
            let g = bm(&format!("group{k}"), BookmarkKind::App, k + 1, k as u8);
            a.record_bookmark(g.clone()).unwrap();
            if k != 9 {
                b.record_bookmark(g).unwrap();
            }
        }
    }
    a.apply_all().unwrap();
    b.apply_all().unwrap();
    let c = latest_common_bookmark(&[&a, &b]).unwrap().unwrap();
    assert_eq!(c.name, "group6");
    assert_eq!(
        latest_common_bookmark(&[&a]).unwrap().unwrap().name,
        "group9"
    );
}

/// Build a volume with 30 applied chunks and bookmarks after 10 and 20; returns
/// (volume, expected image at bm10, expected image at bm20, chunks).
fn rollback_fixture(dir: &Path, seed: u64) -> (TargetVolume, Vec<u8>, Vec<u8>, Vec<ChunkIn>) {
    let mut v = create(dir, *b"uuid-rollback-01");
    let mut r = StdRng::seed_from_u64(seed);
    let mut img = vec![0u8; VOL as usize];
    let (mut at10, mut at20) = (Vec::new(), Vec::new());
    let mut cs = Vec::new();
    for k in 1..=30u64 {
        let c = chunk(&mut r, k);
        apply_model(&mut img, &c);
        v.spool(&c).unwrap();
        cs.push(c);
        if k == 10 || k == 20 {
            v.record_bookmark(bm(&format!("bm{k}"), BookmarkKind::App, k + 1, k as u8))
                .unwrap();
            if k == 10 {
                at10 = img.clone();
            } else {
                at20 = img.clone();
            }
        }
        if k % 4 == 0 {
            v.apply_all().unwrap();
        }
    }
    v.apply_all().unwrap();
    (v, at10, at20, cs)
}

#[test]
fn rollback_brings_the_replica_to_the_point_and_replication_resumes() {
    let d = tempfile::tempdir().unwrap();
    let (mut v, at10, at20, cs) = rollback_fixture(d.path(), 11);
    // refused while a view is open, and while chunks are unapplied
    let s = v.snapshot(&RecoveryPoint::Latest).unwrap();
    assert!(matches!(
        v.rollback_to(&RecoveryPoint::Bookmark("bm20".into()), false),
        Err(JournalError::Busy(_))
    ));
    drop(s);
    let mut r = StdRng::seed_from_u64(99);
    v.spool(&chunk(&mut r, 31)).unwrap();
    assert!(matches!(
        v.rollback_to(&RecoveryPoint::Bookmark("bm20".into()), false),
        Err(JournalError::Busy(_))
    ));
    let rep = v
        .rollback_to(&RecoveryPoint::Bookmark("bm20".into()), true)
        .unwrap();
    assert_eq!(rep.point.seq, 20);
    assert_eq!(rep.discarded_chunks, 1);
    assert_eq!(rep.undone_records, 10);
    assert_eq!(rep.dropped_bookmarks, 0);
    assert!(std::fs::read(d.path().join("replica.img")).unwrap() == at20);
    assert_eq!(v.durable_seq(), 20);
    assert_eq!(v.applied_seq(), 20);
    assert_eq!(v.pending_chunks(), 0);
    // earlier points still exact
    let s = v.snapshot(&RecoveryPoint::Bookmark("bm10".into())).unwrap();
    assert!(view_bytes(&s) == at10);
    drop(s);
    // replication resumes from seq 21 with the same chunks: the replica converges
    for c in &cs[20..] {
        v.spool(c).unwrap();
    }
    v.apply_all().unwrap();
    let mut img = at20.clone();
    for c in &cs[20..] {
        apply_model(&mut img, c);
    }
    assert!(std::fs::read(d.path().join("replica.img")).unwrap() == img);
    // roll back further, across a bookmark: bm20 is dropped
    let rep = v
        .rollback_to(&RecoveryPoint::Bookmark("bm10".into()), false)
        .unwrap();
    assert_eq!(rep.dropped_bookmarks, 1);
    assert!(std::fs::read(d.path().join("replica.img")).unwrap() == at10);
    assert!(matches!(
        v.resolve(&RecoveryPoint::Bookmark("bm20".into())),
        Err(JournalError::UnknownBookmark(_))
    ));
    drop(v);
    let v = TargetVolume::open_with(&d.path().join("t"), opts()).unwrap();
    assert_eq!(v.durable_seq(), 10);
    assert_eq!(v.bookmarks().unwrap().len(), 1);
    assert!(std::fs::read(d.path().join("replica.img")).unwrap() == at10);
}

/// A crash at every step of a rollback: reopening finishes it exactly.
#[test]
fn rollback_crash_at_every_step_finishes_on_open() {
    for p in FaultPoint::ROLLBACK {
        let d = tempfile::tempdir().unwrap();
        let (mut v, at10, _, _) = rollback_fixture(d.path(), 12);
        v.set_fault(Some(FaultConfig {
            point: p,
            action: FaultAction::Error,
            skip: 0,
        }));
        let e = v.rollback_to(&RecoveryPoint::Bookmark("bm10".into()), false);
        assert!(
            matches!(e, Err(JournalError::Injected(q)) if q == p),
            "{p:?}: {e:?}"
        );
        assert!(matches!(v.apply_all(), Err(JournalError::Poisoned)));
        drop(v);
        let v = TargetVolume::open_with(&d.path().join("t"), opts()).unwrap();
        assert!(
            std::fs::read(d.path().join("replica.img")).unwrap() == at10,
            "{p:?}"
        );
        assert_eq!(v.durable_seq(), 10, "{p:?}");
        assert_eq!(v.applied_seq(), 10, "{p:?}");
        assert!(!d.path().join("t/rollback").exists(), "{p:?}");
        assert_eq!(v.bookmarks().unwrap().len(), 1, "{p:?}");
        let s = v.snapshot(&RecoveryPoint::Bookmark("bm10".into())).unwrap();
        assert!(view_bytes(&s) == at10, "{p:?}");
        let s = v.snapshot(&RecoveryPoint::Seq(3)).unwrap();
        assert_eq!(s.point().seq, 3);
        v.verify_journal().unwrap();
    }
}

/// Views opened from the directory (as another process would, without the
/// lock) stay exact while the owner keeps spooling, applying and pruning, and
/// they block a rollback while open.
#[test]
fn directory_views_stay_exact_while_the_owner_applies_and_prunes() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t");
    let mut v = create(d.path(), *b"uuid-recovery-04");
    let mut r = StdRng::seed_from_u64(4);
    let mut img = vec![0u8; VOL as usize];
    let mut chunks = Vec::new();
    for k in 1..=240u64 {
        chunks.push(chunk(&mut r, k));
    }
    let mut at = BTreeMap::new();
    for (i, c) in chunks[..60].iter().enumerate() {
        apply_model(&mut img, c);
        v.spool(c).unwrap();
        at.insert(i as u64 + 1, h(&img));
    }
    v.apply_all().unwrap();
    let views: Vec<_> = [20u64, 40, 60]
        .iter()
        .map(|s| {
            (
                Arc::new(SnapshotView::open_dir(&t, &RecoveryPoint::Seq(*s)).unwrap()),
                at[s],
            )
        })
        .collect();
    assert!(matches!(
        SnapshotView::open_dir(&t, &RecoveryPoint::Seq(61)),
        Err(JournalError::PointNotAvailable(_))
    ));
    let writer = std::thread::spawn(move || {
        v.set_retention(Some(RetentionPolicy {
            keep_all_ns: Some(30_000),
            ..RetentionPolicy::default()
        }));
        for (i, c) in chunks[60..].iter().enumerate() {
            v.spool(c).unwrap();
            v.apply_next().unwrap();
            if i % 40 == 39 {
                v.prune(c.source_time_ns).unwrap();
            }
        }
        v
    });
    let readers: Vec<_> = views
        .iter()
        .map(|(s, want)| {
            let s = s.clone();
            let want = *want;
            std::thread::spawn(move || {
                for _ in 0..6 {
                    assert!(h(&view_bytes(&s)) == want, "dir view at {:?}", s.point());
                }
            })
        })
        .collect();
    let mut v = writer.join().unwrap();
    for th in readers {
        th.join().unwrap();
    }
    // the views' pin files kept the owner's prune from removing their points
    assert!(v.resolve(&RecoveryPoint::Seq(20)).is_ok());
    for (s, want) in &views {
        let got = view_bytes(s);
        if h(&got) != *want {
            let again = view_bytes(s);
            let fresh = SnapshotView::open_dir(&t, &RecoveryPoint::Seq(s.point().seq));
            panic!(
                "view {:?} wrong; again equal: {}; fresh: {:?}",
                s.point(),
                h(&again) == *want,
                fresh.map(|f| h(&view_bytes(&f)) == *want)
            );
        }
    }
    assert!(matches!(
        v.rollback_to(&RecoveryPoint::Seq(230), false),
        Err(JournalError::Busy(_))
    ));
    drop(views);
    assert!(v.prune(240_000).unwrap().deleted_segments > 0);
    assert!(matches!(
        v.resolve(&RecoveryPoint::Seq(20)),
        Err(JournalError::BeforeWindow { .. })
    ));
    v.rollback_to(&RecoveryPoint::Seq(230), false).unwrap();
    assert_eq!(v.applied_seq(), 230);
}

/// Damaged undo data is an error through every read path, never wrong bytes;
/// a missing catalogue row is rebuilt at open.
#[test]
fn corrupt_undo_data_and_missing_catalogue_rows() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t");
    let mut v = create(d.path(), *b"uuid-recovery-05");
    let mut r = StdRng::seed_from_u64(5);
    for k in 1..=20u64 {
        v.spool(&chunk(&mut r, k)).unwrap();
        if k == 10 {
            v.record_bookmark(bm("ten", BookmarkKind::User, 11, 10))
                .unwrap();
        }
    }
    v.apply_all().unwrap();
    // flip one byte of a stored (non-zero) undo payload of the newest record
    let rec = v.undo_records().pop().unwrap();
    drop(v);
    let seg = t.join(format!("journal/{:016x}.seg", rec.segment));
    let bytes = std::fs::read(&seg).unwrap();
    // walk the records (docs/journal-format.md) to the last UNDO record with stored payload
    let rd = |o: usize, n: usize| {
        let mut a = [0u8; 8];
        a[..n].copy_from_slice(&bytes[o..o + n]);
        u64::from_le_bytes(a)
    };
    let mut pos = 96usize;
    let mut flip_at = 0usize;
    while pos + 64 <= bytes.len() {
        let body = rd(pos + 8, 8) as usize;
        let n = rd(pos + 48, 4) as usize;
        if &bytes[pos..pos + 4] == b"UNDO" {
            let mut p = pos + 64 + n * 64;
            for i in 0..n {
                let stored = rd(pos + 64 + i * 64 + 24, 8) as usize;
                if stored > 0 {
                    flip_at = p;
                    break;
                }
                p += stored;
            }
        }
        pos += 64 + body + 32;
    }
    assert!(flip_at > 0);
    let mut b = bytes.clone();
    b[flip_at] ^= 0x55;
    std::fs::write(&seg, &b).unwrap();
    let v = TargetVolume::open_with(&t, opts()).unwrap();
    let s = v.snapshot(&RecoveryPoint::Seq(1)).unwrap();
    let mut buf = vec![0u8; VOL as usize];
    let e = s.read_at(&mut buf, 0);
    assert!(matches!(e, Err(JournalError::Corrupt { .. })), "{e:?}");
    let out = d.path().join("m.img");
    assert!(matches!(
        s.materialize(&out, |_, _| {}),
        Err(JournalError::Corrupt { .. })
    ));
    let ds = SnapshotView::open_dir(&t, &RecoveryPoint::Seq(1)).unwrap();
    assert!(matches!(
        ds.read_at(&mut buf, 0),
        Err(JournalError::Corrupt { .. })
    ));
    assert!(v.verify_journal().is_err());
    // the newest state does not need the damaged record
    let s = v.snapshot(&RecoveryPoint::Latest).unwrap();
    s.read_at(&mut buf, 0).unwrap();
    drop((s, ds, v));
    std::fs::write(&seg, &bytes).unwrap();
    // catalogue rows deleted behind our back come back at open
    let db = rusqlite::Connection::open(t.join("catalogue.sqlite")).unwrap();
    db.execute("DELETE FROM bookmarks", []).unwrap();
    db.execute("DELETE FROM segments WHERE idx = 0", [])
        .unwrap();
    drop(db);
    let v = TargetVolume::open_with(&t, opts()).unwrap();
    drop(v);
    let db = rusqlite::Connection::open(t.join("catalogue.sqlite")).unwrap();
    let n: i64 = db
        .query_row("SELECT count(*) FROM bookmarks", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
    let n: i64 = db
        .query_row("SELECT count(*) FROM segments WHERE idx = 0", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(n, 1);
}

/// A directory view's index refresh read a segment up to the length it had
/// just seen; if the owner then appended more records to that segment,
/// sealed it and created the next one before the view looked for the next
/// one, the view moved on without those records and served their new bytes
/// as old ones (found as a rare mismatch of
/// `directory_views_stay_exact_while_the_owner_applies_and_prunes` under
/// load). Here the owner's append-seal-rotate runs exactly in that window.
#[test]
fn directory_view_refresh_reads_a_segment_to_its_sealed_end() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("t");
    let mut v = TargetVolume::create_with(
        &t,
        ident(VOL, *b"uuid-recovery-rt"),
        &d.path().join("replica.img"),
        TargetOptions {
            segment_size: 128 * 1024,
            ..opts()
        },
    )
    .expect("create");
    let mut r = StdRng::seed_from_u64(17);
    let random = |r: &mut StdRng, n: usize| -> Vec<u8> { (0..n).map(|_| r.gen()).collect() };
    let one = |k: u64, offset: u64, data: Vec<u8>| ChunkIn {
        first_seq: k,
        last_seq: k,
        source_time_ns: 1000 * k,
        horizon_seq: 0,
        extents: vec![ChunkExtent {
            offset,
            data: ExtentData::Data(data.into()),
        }],
    };
    // Point 1: random data everywhere (undo records of later writes are raw).
    let img = random(&mut r, VOL as usize);
    v.spool(&one(1, 0, img.clone())).unwrap();
    v.apply_all().unwrap();
    let want = h(&img);
    let view = SnapshotView::open_dir(&t, &RecoveryPoint::Seq(1)).unwrap();
    let mut b = vec![0u8; VOL as usize];
    view.read_at(&mut b, 0).unwrap();
    assert!(h(&b) == want);
    // News for the view (chunk 2 in the current segment), then, inside the
    // view's next refresh: chunk 3 (small: appended to the same segment) and
    // chunk 4 (larger than what is left: the segment is sealed, the next one
    // created).
    v.spool(&one(2, 0, random(&mut r, 4096))).unwrap();
    v.apply_all().unwrap();
    let v = Arc::new(Mutex::new(v));
    let (c3, c4) = (
        one(3, 8192, random(&mut r, 4096)),
        one(4, 65536, random(&mut r, 120 * 1024)),
    );
    let segments = |t: &Path| std::fs::read_dir(t.join("journal")).unwrap().count();
    let before = segments(&t);
    {
        let v = v.clone();
        journal::fault::set_view_refresh_hook(Some(Box::new(move || {
            let mut v = v.lock().unwrap();
            for c in [&c3, &c4] {
                v.spool(c).unwrap();
                v.apply_all().unwrap();
            }
        })));
    }
    view.read_at(&mut b, 0).unwrap();
    journal::fault::set_view_refresh_hook(None);
    assert!(segments(&t) > before, "chunk 4 did not open a new segment");
    view.read_at(&mut b, 0).unwrap();
    let first_bad = b.iter().zip(&img).position(|(x, y)| x != y);
    assert!(
        first_bad.is_none(),
        "the view at point 1 differs from point 1 at byte {first_bad:?} (chunk 3 wrote 8192..12288)"
    );
}
