//! Target storage core tests: idempotency, ordering, crash at every fault point
//! (in-process and kill -9 / abort of a child process), corruption detection,
//! point-in-time reconstruction of every earlier state, resize and hashes.

#![allow(clippy::manual_is_multiple_of)] // keep the tests buildable on the workspace MSRV

use journal::*;
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{apply_model, chunk, model, small_opts, VOL};

fn ident(size: u64) -> VolumeIdentity {
    VolumeIdentity {
        name: "vol0".into(),
        uuid: *b"0123456789abcdef",
        generation: 7,
        size,
        block_size: 4096,
    }
}

fn create(dir: &Path, opts: TargetOptions) -> TargetVolume {
    let t = dir.join("t");
    TargetVolume::create_with(&t, ident(VOL), &dir.join("replica.img"), opts).expect("create")
}

fn reopen(dir: &Path, opts: TargetOptions) -> TargetVolume {
    TargetVolume::open_with(&dir.join("t"), opts).expect("reopen")
}

fn replica_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("replica.img")).expect("read replica")
}

/// Check the replica and every (or every `step`-th) earlier point against the model.
fn check_points(v: &TargetVolume, step: u64) {
    let applied = v.applied_seq();
    let mut img = vec![0u8; VOL as usize];
    for s in 0..=applied {
        if s > 0 {
            apply_model(&mut img, &chunk(s));
        }
        if s % step == 0 || s == applied {
            let got = v
                .read_at_point(Point::Seq(s), 0, VOL)
                .expect("read_at_point");
            assert!(got == img, "point seq {s} differs (applied {applied})");
            // a small unaligned window too
            let w = v.read_at_point(Point::Seq(s), 1000, 3000).expect("window");
            assert_eq!(w, img[1000..4000]);
        }
    }
    assert!(v.read_at_point(Point::Latest, 0, VOL).expect("latest") == img);
}

#[test]
fn identity_create_open_and_split_brain_guard() {
    let d = tempfile::tempdir().unwrap();
    let v = create(d.path(), small_opts());
    assert_eq!(v.identity(), &ident(VOL));
    drop(v);
    let t = d.path().join("t");
    assert!(matches!(
        TargetVolume::create(&t, ident(VOL), &d.path().join("replica.img")),
        Err(JournalError::AlreadyExists(_))
    ));
    let v = TargetVolume::open(&t).unwrap();
    assert!(matches!(
        TargetVolume::open(&t),
        Err(JournalError::Locked(_))
    ));
    drop(v);
    let mut other = ident(VOL);
    other.generation = 8;
    assert!(matches!(
        TargetVolume::open_checked(&t, &other, small_opts()),
        Err(JournalError::IdentityMismatch { .. })
    ));
    TargetVolume::open_checked(&t, &ident(VOL), small_opts()).unwrap();
    // explicit re-seed with the new generation
    let mut v = TargetVolume::open_with(&t, small_opts()).unwrap();
    v.spool(&chunk(1)).unwrap();
    v.apply_all().unwrap();
    drop(v);
    let v = TargetVolume::reseed(&t, other.clone(), small_opts()).unwrap();
    assert_eq!(v.identity().generation, 8);
    assert_eq!(v.durable_seq(), 0);
    assert!(v.undo_records().is_empty());
    drop(v);
    TargetVolume::open_checked(&t, &other, small_opts()).unwrap();
    // a damaged identity file is detected
    let p = t.join("identity");
    let mut b = std::fs::read(&p).unwrap();
    b[20] ^= 1;
    std::fs::write(&p, b).unwrap();
    assert!(matches!(
        TargetVolume::open(&t),
        Err(JournalError::Corrupt { .. })
    ));
}

#[test]
fn spool_is_idempotent_and_survives_restart() {
    let d = tempfile::tempdir().unwrap();
    let mut v = create(d.path(), small_opts());
    let c1 = chunk(1);
    assert!(matches!(
        v.spool(&c1).unwrap(),
        SpoolOutcome::Stored { durable_seq: 1, .. }
    ));
    assert_eq!(
        v.spool(&c1).unwrap(),
        SpoolOutcome::Duplicate { durable_seq: 1 }
    );
    // a batch with a duplicate inside, group committed
    let out = v.spool_many(&[chunk(2), chunk(2), chunk(3)]).unwrap();
    assert!(matches!(out[0], SpoolOutcome::Stored { .. }));
    assert_eq!(out[1], SpoolOutcome::Duplicate { durable_seq: 2 });
    assert!(matches!(
        out[2],
        SpoolOutcome::Stored { durable_seq: 3, .. }
    ));
    assert_eq!(v.counters().duplicate_chunks, 2);
    assert_eq!(v.pending_chunks(), 3);
    drop(v);
    // restart before apply: durable_seq survives, re-sent chunks are duplicates
    let mut v = reopen(d.path(), small_opts());
    assert_eq!(v.durable_seq(), 3);
    assert_eq!(v.applied_seq(), 0);
    assert_eq!(
        v.spool(&chunk(3)).unwrap(),
        SpoolOutcome::Duplicate { durable_seq: 3 }
    );
    v.apply_next().unwrap().unwrap();
    assert_eq!(v.applied_seq(), 1);
    drop(v);
    let mut v = reopen(d.path(), small_opts());
    assert_eq!(v.applied_seq(), 1);
    assert_eq!(v.pending_chunks(), 2);
    v.apply_all().unwrap();
    drop(v);
    let mut v = reopen(d.path(), small_opts());
    assert_eq!((v.durable_seq(), v.applied_seq()), (3, 3));
    assert_eq!(
        v.spool(&chunk(2)).unwrap(),
        SpoolOutcome::Duplicate { durable_seq: 3 }
    );
    assert_eq!(v.pending_chunks(), 0);
    assert_eq!(replica_bytes(d.path()), model(3));
    check_points(&v, 1);
}

#[test]
fn gaps_unordered_and_overlapping_redelivery() {
    let d = tempfile::tempdir().unwrap();
    let mut v = create(d.path(), small_opts());
    let mut img = vec![0u8; VOL as usize];
    let mut c = chunk(1);
    c.first_seq = 1;
    c.last_seq = 5;
    v.spool(&c).unwrap();
    apply_model(&mut img, &c);
    // gap: 6..9 consumed by bitmap mode
    let mut g = chunk(2);
    g.first_seq = 10;
    g.last_seq = 12;
    assert!(matches!(
        v.spool(&g).unwrap(),
        SpoolOutcome::Stored {
            durable_seq: 12,
            ..
        }
    ));
    apply_model(&mut img, &g);
    assert_eq!(v.counters().seq_gaps, 1);
    // unordered resync data is always stored
    let mut u = chunk(3);
    u.first_seq = 0;
    u.last_seq = 0;
    assert!(matches!(
        v.spool(&u).unwrap(),
        SpoolOutcome::Stored {
            durable_seq: 12,
            ..
        }
    ));
    assert!(matches!(v.spool(&u).unwrap(), SpoolOutcome::Stored { .. }));
    apply_model(&mut img, &u);
    // re-coalesced re-delivery overlapping durable_seq is stored
    let mut o = chunk(4);
    o.first_seq = 11;
    o.last_seq = 14;
    assert!(matches!(
        v.spool(&o).unwrap(),
        SpoolOutcome::Stored {
            durable_seq: 14,
            ..
        }
    ));
    apply_model(&mut img, &o);
    // invalid chunks are refused without side effects
    let mut bad = chunk(5);
    bad.first_seq = 20;
    bad.last_seq = 19;
    assert!(matches!(v.spool(&bad), Err(JournalError::InvalidChunk(_))));
    let mut oob = chunk(5);
    oob.first_seq = 15;
    oob.last_seq = 15;
    oob.extents[0].offset = VOL - 1;
    assert!(matches!(v.spool(&oob), Err(JournalError::InvalidChunk(_))));
    v.apply_all().unwrap();
    assert_eq!(v.applied_seq(), 14);
    assert_eq!(replica_bytes(d.path()), img);
    // points: seq 12 = after g (the unordered chunks came after it)
    let mut at12 = vec![0u8; VOL as usize];
    apply_model(&mut at12, &c);
    apply_model(&mut at12, &g);
    assert!(v.read_at_point(Point::Seq(12), 0, VOL).unwrap() == at12);
    assert!(v.read_at_point(Point::Seq(9), 0, VOL).unwrap() != at12);
    assert!(matches!(
        v.read_at_point(Point::Seq(15), 0, 10),
        Err(JournalError::PointNotAvailable(_))
    ));
    assert!(matches!(
        v.read_at_point(Point::Latest, VOL - 1, 2),
        Err(JournalError::OutOfRange { .. })
    ));
}

#[test]
fn ordering_overlaps_within_and_across_chunks() {
    let d = tempfile::tempdir().unwrap();
    let mut v = create(d.path(), small_opts());
    let mk = |k: u64, ext: Vec<(u64, u8, u64)>| ChunkIn {
        first_seq: k,
        last_seq: k,
        source_time_ns: k,
        horizon_seq: 0,
        extents: ext
            .into_iter()
            .map(|(o, b, l)| ChunkExtent {
                offset: o,
                data: if b == 0 {
                    ExtentData::Zero(l)
                } else {
                    ExtentData::Data(vec![b; l as usize].into())
                },
            })
            .collect(),
    };
    let cs = vec![
        mk(1, vec![(0, 1, 8192)]),
        mk(2, vec![(4096, 2, 8192), (100, 3, 100), (150, 4, 100)]), // self-overlap
        mk(3, vec![(0, 0, 1000)]),
        mk(4, vec![(500, 5, 10000)]),
        mk(5, vec![(0, 6, 65536)]),
    ];
    let mut states = vec![vec![0u8; VOL as usize]];
    for c in &cs {
        v.spool(c).unwrap();
        let mut s = states.last().unwrap().clone();
        apply_model(&mut s, c);
        states.push(s);
    }
    let a = v.apply_all().unwrap();
    assert_eq!(a.chunks, 5);
    assert_eq!(replica_bytes(d.path()), states[5]);
    for (s, st) in states.iter().enumerate() {
        assert!(
            &v.read_at_point(Point::Seq(s as u64), 0, VOL).unwrap() == st,
            "seq {s}"
        );
        if s == 0 {
            // the starting state is no point by time
            assert!(matches!(
                v.read_at_point(Point::Time(0), 0, VOL),
                Err(JournalError::BeforeWindow { .. })
            ));
            continue;
        }
        assert!(
            &v.read_at_point(Point::Time(s as u64), 0, VOL).unwrap() == st,
            "time {s}"
        );
    }
}

#[test]
fn spool_budget_flow_control() {
    let d = tempfile::tempdir().unwrap();
    let mut o = small_opts();
    o.spool_budget_bytes = 16 * 1024;
    let mut v = create(d.path(), o);
    let big = |k: u64| ChunkIn {
        first_seq: k,
        last_seq: k,
        source_time_ns: k,
        horizon_seq: 0,
        extents: vec![ChunkExtent {
            offset: 0,
            data: ExtentData::Data(vec![k as u8; 12 * 1024].into()),
        }],
    };
    v.spool(&big(1)).unwrap();
    assert_eq!(v.spool_bytes(), 12 * 1024);
    assert!(matches!(
        v.spool(&big(2)),
        Err(JournalError::SpoolFull { .. })
    ));
    // a duplicate is still acknowledged while full
    assert!(matches!(
        v.spool(&big(1)).unwrap(),
        SpoolOutcome::Duplicate { .. }
    ));
    v.apply_all().unwrap();
    assert_eq!(v.spool_bytes(), 0);
    v.spool(&big(2)).unwrap();
}

#[test]
fn resize_and_block_hashes() {
    let d = tempfile::tempdir().unwrap();
    let mut v = create(d.path(), small_opts());
    for k in 1..=10 {
        v.spool(&chunk(k)).unwrap();
    }
    // block_hashes applies everything first
    let h = v.block_hashes(0, VOL, 4096).unwrap();
    assert_eq!(v.pending_chunks(), 0);
    let img = model(10);
    assert_eq!(h.len(), 16);
    for (i, x) in h.iter().enumerate() {
        assert_eq!(x, blake3::hash(&img[i * 4096..(i + 1) * 4096]).as_bytes());
    }
    let h2 = v.block_hashes(1000, 5000, 4096).unwrap();
    assert_eq!(h2[1], *blake3::hash(&img[5096..6000]).as_bytes());
    assert!(v.resize(VOL / 2).is_err());
    v.resize(2 * VOL).unwrap();
    assert_eq!(v.identity().size, 2 * VOL);
    let far = ChunkIn {
        first_seq: 11,
        last_seq: 11,
        source_time_ns: 11,
        horizon_seq: 0,
        extents: vec![ChunkExtent {
            offset: VOL + 10,
            data: ExtentData::Data(vec![9; 100].into()),
        }],
    };
    v.spool(&far).unwrap();
    v.apply_all().unwrap();
    drop(v);
    let v = reopen(d.path(), small_opts());
    assert_eq!(v.identity().size, 2 * VOL);
    assert_eq!(
        std::fs::metadata(d.path().join("replica.img"))
            .unwrap()
            .len(),
        2 * VOL
    );
    assert_eq!(
        v.read_at_point(Point::Latest, VOL + 10, 100).unwrap(),
        vec![9; 100]
    );
    assert_eq!(
        v.read_at_point(Point::Seq(10), VOL, 200).unwrap(),
        vec![0; 200]
    );
}

fn seg_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("t/journal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

fn spool_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("t/spool"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "spl"))
        .collect();
    v.sort();
    v
}

fn flip(p: &Path, off: u64) {
    let mut b = std::fs::read(p).unwrap();
    b[off as usize] ^= 0x40;
    std::fs::write(p, b).unwrap();
}

#[test]
fn truncated_committed_records_are_not_taken_for_a_torn_tail() {
    // The last segment cut in the middle of committed records (not a crash's torn
    // tail): the spool was reclaimed after those commits became durable, so the
    // journal ends below the durable applied state. Old points would be served
    // without the lost undo records: the open must refuse, naming the damage.
    for pending in [0u64, 3] {
        let d = tempfile::tempdir().unwrap();
        let mut o = small_opts();
        o.undo_compression = UndoCompression::Off;
        let mut v = create(d.path(), o.clone());
        for k in 1..=40 {
            v.spool(&chunk(k)).unwrap();
            v.apply_all().unwrap();
        }
        // optionally some spooled, unapplied chunks after the committed ones
        for k in 41..=40 + pending {
            v.spool(&chunk(k)).unwrap();
        }
        drop(v);
        let last = seg_files(d.path()).last().unwrap().clone();
        let whole = std::fs::read(&last).unwrap();
        assert!(whole.len() > 96 + 200, "last segment holds records");
        // mid-way through the segment's records and (odd offset) mid-record
        let cut = 96 + (whole.len() - 96) / 2 + 13;
        std::fs::write(&last, &whole[..cut]).unwrap();
        let err = TargetVolume::open_with(&d.path().join("t"), o.clone())
            .err()
            .expect("a journal missing committed records must not open");
        let msg = err.to_string();
        assert!(
            matches!(err, JournalError::Corrupt { .. }),
            "clear corruption error, got {msg}"
        );
        let name = last.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            msg.contains("journal damaged")
                && msg.contains("lost in segment")
                && msg.contains(&name),
            "error names the damage and the segment: {msg}"
        );
        assert!(
            msg.contains("seq "),
            "error names the lost seq range: {msg}"
        );
        // Restoring the segment makes it whole again: every point as before.
        std::fs::write(&last, &whole).unwrap();
        let mut v = reopen(d.path(), o.clone());
        v.apply_all().unwrap();
        assert_eq!(v.applied_seq(), 40 + pending);
        check_points(&v, 5);
    }
}

#[test]
fn corrupt_journal_detected_and_torn_tail_truncated() {
    let d = tempfile::tempdir().unwrap();
    let mut o = small_opts();
    o.undo_compression = UndoCompression::Off;
    let mut v = create(d.path(), o.clone());
    for k in 1..=40 {
        v.spool(&chunk(k)).unwrap();
        v.apply_all().unwrap();
    }
    v.verify_journal().unwrap();
    drop(v);
    let segs = seg_files(d.path());
    assert!(segs.len() >= 3, "rotation happened: {}", segs.len());

    // torn tail: garbage appended to the last segment is truncated on open
    let last = segs.last().unwrap().clone();
    let len = std::fs::metadata(&last).unwrap().len();
    let mut b = std::fs::read(&last).unwrap();
    b.extend_from_slice(
        b"UNDO garbage of a torn append ...................................................",
    );
    std::fs::write(&last, &b).unwrap();
    let v = reopen(d.path(), o.clone());
    assert_eq!(v.counters().torn_tails, 1);
    assert_eq!(std::fs::metadata(&last).unwrap().len(), len);
    check_points(&v, 1);
    drop(v);

    // a flipped payload byte in an old segment: open works (headers ok), reads report it
    let first = segs[0].clone();
    let fb = std::fs::read(&first).unwrap();
    // payload of the first undo record: after file header (96) + record header (64) + table
    // find the first undo extent with a stored payload (early records hold zeroes only)
    let rd = |o: usize| u64::from_le_bytes(fb[o..o + 8].try_into().unwrap()) as usize;
    let mut pos = 96;
    let payload_off = 'find: loop {
        assert!(pos < fb.len(), "no stored payload in segment 0");
        let body = rd(pos + 8);
        let magic = &fb[pos..pos + 4];
        if magic == b"UNDO" {
            let n = u32::from_le_bytes(fb[pos + 48..pos + 52].try_into().unwrap()) as usize;
            let mut off = pos + 64 + n * 64;
            for i in 0..n {
                let stored = rd(pos + 64 + i * 64 + 24);
                if stored > 8 {
                    break 'find off;
                }
                off += stored;
            }
        }
        pos += 64 + body + 32;
    };
    flip(&first, payload_off as u64 + 3);
    let v = reopen(d.path(), o.clone());
    assert!(matches!(
        v.verify_journal(),
        Err(JournalError::Corrupt { .. })
    ));
    assert!(matches!(
        v.read_at_point(Point::Seq(0), 0, VOL),
        Err(JournalError::Corrupt { .. })
    ));
    drop(v);
    flip(&first, payload_off as u64 + 3);

    // a flipped header byte in a non-last segment: open loads the segment from
    // its index sidecar (a verified copy of headers and tables), so reads stay
    // exact and the scrub finds the damage; without the sidecar, open refuses
    flip(&first, 96 + 20);
    let v = reopen(d.path(), o.clone());
    assert!(v.counters().index_load.sidecar_segments > 0);
    check_points(&v, 1);
    assert!(matches!(
        v.verify_journal(),
        Err(JournalError::Corrupt { .. })
    ));
    drop(v);
    std::fs::remove_file(first.with_extension("idx")).unwrap();
    assert!(matches!(
        TargetVolume::open_with(&d.path().join("t"), o.clone()),
        Err(JournalError::Corrupt { .. })
    ));
    flip(&first, 96 + 20);

    // a flipped header byte in the last segment, followed by committed records: not a torn tail
    let lb = std::fs::read(&last).unwrap();
    assert!(lb.len() > 96 + 200);
    flip(&last, 96 + 20);
    assert!(matches!(
        TargetVolume::open_with(&d.path().join("t"), o.clone()),
        Err(JournalError::Corrupt { .. })
    ));
    flip(&last, 96 + 20);
    let v = reopen(d.path(), o);
    check_points(&v, 1);
}

#[test]
fn corrupt_spool_detected_and_torn_tail_truncated() {
    let d = tempfile::tempdir().unwrap();
    let mut o = small_opts();
    o.spool_file_size = 1 << 20;
    let mut v = create(d.path(), o.clone());
    for k in 1..=6 {
        v.spool(&chunk(k)).unwrap();
    }
    drop(v);
    let sp = spool_files(d.path());
    assert_eq!(sp.len(), 1);
    let f = sp[0].clone();
    let full = std::fs::read(&f).unwrap();
    // torn tail: last record cut short -> truncated, chunk 6 is not durable (never acknowledged)
    std::fs::write(&f, &full[..full.len() - 10]).unwrap();
    let mut v = reopen(d.path(), o.clone());
    assert_eq!(v.counters().torn_tails, 1);
    assert_eq!(v.durable_seq(), 5);
    v.spool(&chunk(6)).unwrap();
    drop(v);
    // corruption inside an acknowledged record followed by later groups: refused
    flip(&f, 96 + 64 + 30);
    assert!(matches!(
        TargetVolume::open_with(&d.path().join("t"), o.clone()),
        Err(JournalError::Corrupt { .. })
    ));
    flip(&f, 96 + 64 + 30);
    let mut v = reopen(d.path(), o);
    v.apply_all().unwrap();
    assert_eq!(replica_bytes(d.path()), model(6));
    check_points(&v, 1);
}

/// Drive chunks 1..=n through a volume with `fault` armed, restarting on every error
/// (drop + reopen), re-sending from durable_seq + 1 like a real source. Returns fired count.
fn run_with_restarts(dir: &Path, n: u64, fault: FaultConfig, opts: &TargetOptions) -> u32 {
    let mut fired = 0;
    let mut v = reopen(dir, opts.clone());
    v.set_fault(Some(fault));
    'outer: loop {
        let from = v.durable_seq() + 1;
        let mut k = from;
        while k <= n {
            // sometimes a group commit of 2, sometimes a re-send of the previous chunk
            let r = if k % 5 == 0 && k < n {
                v.spool_many_owned(vec![chunk(k - 1), chunk(k), chunk(k + 1)])
                    .map(|_| 2)
            } else {
                v.spool(&chunk(k)).map(|_| 1)
            };
            let step = match r {
                Ok(s) => s,
                Err(JournalError::Injected(_)) => {
                    fired += 1;
                    drop(v);
                    v = reopen(dir, opts.clone());
                    continue 'outer;
                }
                Err(e) => panic!("spool: {e}"),
            };
            k += step;
            if k % 3 == 0 {
                match v.apply_batch() {
                    Ok(_) => {}
                    Err(JournalError::Injected(_)) => {
                        fired += 1;
                        drop(v);
                        v = reopen(dir, opts.clone());
                        continue 'outer;
                    }
                    Err(e) => panic!("apply: {e}"),
                }
            }
        }
        match v.apply_all() {
            Ok(_) => break,
            Err(JournalError::Injected(_)) => {
                fired += 1;
                drop(v);
                v = reopen(dir, opts.clone());
            }
            Err(e) => panic!("apply_all: {e}"),
        }
    }
    assert_eq!(v.durable_seq(), n);
    assert_eq!(v.applied_seq(), n);
    fired
}

#[test]
fn crash_at_every_fault_point_in_process() {
    let opts = small_opts();
    for p in FaultPoint::ALL {
        let mut fired = 0;
        for skip in [0u32, 1, 4, 9] {
            let d = tempfile::tempdir().unwrap();
            drop(create(d.path(), opts.clone()));
            let n = 30;
            fired += run_with_restarts(
                d.path(),
                n,
                FaultConfig {
                    point: p,
                    action: FaultAction::Error,
                    skip,
                },
                &opts,
            );
            let v = reopen(d.path(), opts.clone());
            assert_eq!(replica_bytes(d.path()), model(n), "{p:?} skip {skip}");
            check_points(&v, 1);
            v.verify_journal().unwrap();
        }
        assert!(fired > 0, "fault point {p:?} was never reached");
    }
}

/// Direct apply (no spool copy): a crash at every apply step recovers to the
/// model, every acknowledged seq is durable, and every earlier point is exact.
#[test]
fn direct_apply_crash_at_every_fault_point() {
    let mut opts = small_opts();
    opts.direct_apply = true;
    for p in [
        FaultPoint::SegmentAfterCreate,
        FaultPoint::UndoAfterAppend,
        FaultPoint::UndoAfterSync,
        FaultPoint::ReplicaMidWrite,
        FaultPoint::ReplicaAfterWrite,
        FaultPoint::ReplicaAfterSync,
        FaultPoint::CommitAfterAppend,
    ] {
        let mut fired = 0;
        for skip in [0u32, 3] {
            let d = tempfile::tempdir().unwrap();
            drop(create(d.path(), opts.clone()));
            let n = 24;
            fired += run_with_restarts(
                d.path(),
                n,
                FaultConfig {
                    point: p,
                    action: FaultAction::Error,
                    skip,
                },
                &opts,
            );
            let v = reopen(d.path(), opts.clone());
            assert_eq!(replica_bytes(d.path()), model(n), "{p:?} skip {skip}");
            assert!(
                spool_files(d.path()).is_empty(),
                "direct apply wrote the spool"
            );
            check_points(&v, 1);
            v.verify_journal().unwrap();
            let c = v.counters();
            assert_eq!(c.spooled_bytes, 0);
        }
        assert!(fired > 0, "fault point {p:?} was never reached");
    }
}

// ---------------------------------------------------------------------------------------------
// kill -9 / abort of a child process, in a loop

const CHILD_ENV: &str = "JOURNAL_TEST_CHILD_DIR";

/// Child role: re-executed by `kill9_and_abort_loop`; does nothing in a normal run.
#[test]
fn child_role() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let opts = small_opts();
    // REWIND_JOURNAL_FAULT (if set by the parent) is read by open.
    let mut v = reopen(&dir, opts);
    let mut k = v.durable_seq() + 1;
    loop {
        let step = if k % 4 == 0 {
            v.spool_many(&[chunk(k - 1), chunk(k), chunk(k + 1)])
                .expect("spool_many");
            2
        } else {
            v.spool(&chunk(k)).expect("spool");
            1
        };
        k += step;
        println!("acked {}", k - 1);
        if k % 3 == 0 {
            v.apply_batch().expect("apply");
        }
    }
}

#[test]
fn kill9_and_abort_loop() {
    let d = tempfile::tempdir().unwrap();
    drop(create(d.path(), small_opts()));
    let exe = std::env::current_exe().unwrap();
    let mut rng = StdRng::seed_from_u64(42);
    let t0 = Instant::now();
    let iters = 40;
    let mut aborts = 0;
    let mut max_acked = 0u64;
    for i in 0..iters {
        let mut cmd = Command::new(&exe);
        cmd.args(["child_role", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, d.path())
            .env_remove(FaultConfig::ENV)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let use_abort = i % 2 == 0;
        if use_abort {
            let p = FaultPoint::ALL[(i / 2) % FaultPoint::ALL.len()];
            let skip = rng.gen_range(0..4);
            cmd.env(FaultConfig::ENV, format!("{}:abort:{skip}", p.name()));
        }
        let mut child = cmd.spawn().unwrap();
        if !use_abort {
            std::thread::sleep(Duration::from_millis(rng.gen_range(5..60)));
            // SIGKILL: no unwinding, no flush
            let _ = child.kill();
        } else {
            // bounded wait for the abort; kill if the point was not reached in time
            let start = Instant::now();
            loop {
                if child.try_wait().unwrap().is_some() {
                    aborts += 1;
                    break;
                }
                if start.elapsed() > Duration::from_millis(400) {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        for l in text.lines() {
            if let Some(x) = l.strip_prefix("acked ") {
                max_acked = max_acked.max(x.parse().unwrap());
            }
        }
        // parent: reopen (recovery), check what was acknowledged is durable and that the
        // applied prefix is consistent at a few points
        let v = reopen(d.path(), small_opts());
        assert!(
            v.durable_seq() >= max_acked,
            "acked {max_acked} lost (durable {})",
            v.durable_seq()
        );
        assert!(v.applied_seq() <= v.durable_seq());
        let applied = v.applied_seq();
        assert!(
            v.read_at_point(Point::Latest, 0, VOL).unwrap() == model(applied),
            "iteration {i}"
        );
        let s = rng.gen_range(0..=applied);
        assert!(
            v.read_at_point(Point::Seq(s), 0, VOL).unwrap() == model(s),
            "iteration {i} seq {s}"
        );
    }
    let mut v = reopen(d.path(), small_opts());
    v.apply_all().unwrap();
    let n = v.durable_seq();
    assert_eq!(v.applied_seq(), n);
    assert!(n > 50, "the children made progress: {n}");
    assert_eq!(replica_bytes(d.path()), model(n));
    check_points(&v, (n / 150).max(1));
    v.verify_journal().unwrap();
    assert!(aborts >= iters / 4, "aborts {aborts}");
    assert!(t0.elapsed() < Duration::from_secs(60));
    eprintln!(
        "kill loop: {iters} iterations, {aborts} aborts at fault points, {n} chunks, {:?}",
        t0.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// property: every earlier state of a random workload is reconstructed exactly

mod prop {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Write {
            off: u64,
            len: u64,
            kind: u8,
            seed: u8,
        },
        Flush,
        Apply,
        /// Reopen with this undo compression (0 off, 1 lz4, 2 zstd:3): a
        /// journal mixes encodings across restarts.
        Restart(u8),
    }

    fn compression(i: u8) -> UndoCompression {
        match i % 3 {
            0 => UndoCompression::Off,
            1 => UndoCompression::Lz4,
            _ => UndoCompression::Zstd(3),
        }
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u64..VOL, 1u64..20000, 0u8..4, any::<u8>()).prop_map(|(off, len, kind, seed)| {
                let len = len.min(VOL - off).max(1);
                Op::Write { off, len, kind, seed }
            }),
            2 => Just(Op::Flush),
            2 => Just(Op::Apply),
            1 => (0u8..3).prop_map(Op::Restart),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
        #[test]
        fn every_earlier_state_reconstructs(ops in proptest::collection::vec(op(), 1..60), comp in 0u8..3) {
            let d = tempfile::tempdir().unwrap();
            let mut o = small_opts();
            o.undo_compression = compression(comp);
            let mut v = create(d.path(), o.clone());
            let mut seq = 0u64;
            let mut cur: Vec<ChunkExtent> = Vec::new();
            let mut img = vec![0u8; VOL as usize];
            let mut states: Vec<(u64, Vec<u8>)> = vec![(0, img.clone())];
            for op in ops {
                match op {
                    Op::Write { off, len, kind, seed } => {
                        let data = match kind {
                            0 => ExtentData::Zero(len),
                            1 => ExtentData::Data(vec![seed; len as usize].into()),
                            _ => ExtentData::Data((0..len).map(|i| (i as u8).wrapping_mul(seed) ^ (i >> 8) as u8).collect()),
                        };
                        cur.push(ChunkExtent { offset: off, data });
                        if cur.len() >= 3 { flush(&mut v, &mut cur, &mut seq, &mut img, &mut states); }
                    }
                    Op::Flush => flush(&mut v, &mut cur, &mut seq, &mut img, &mut states),
                    Op::Apply => { v.apply_all().unwrap(); }
                    Op::Restart(c) => { drop(v); o.undo_compression = compression(c); v = reopen(d.path(), o.clone()); }
                }
            }
            flush(&mut v, &mut cur, &mut seq, &mut img, &mut states);
            v.apply_all().unwrap();
            prop_assert!(replica_bytes(d.path()) == img);
            for (s, st) in &states {
                let got = v.read_at_point(Point::Seq(*s), 0, VOL).unwrap();
                prop_assert!(&got == st, "seq {}", s);
                if *s == 0 {
                    // the starting state is no point by time
                    prop_assert!(v.read_at_point(Point::Time(0), 0, VOL).is_err());
                    continue;
                }
                let t = v.read_at_point(Point::Time(*s * 10), 0, VOL).unwrap();
                prop_assert!(&t == st, "time {}", s);
            }
        }
    }

    fn flush(
        v: &mut TargetVolume,
        cur: &mut Vec<ChunkExtent>,
        seq: &mut u64,
        img: &mut [u8],
        states: &mut Vec<(u64, Vec<u8>)>,
    ) {
        if cur.is_empty() {
            return;
        }
        // sequence numbers with gaps (bitmap-mode consumption)
        let first = *seq + 1 + (*seq % 3);
        let last = first + (cur.len() as u64 - 1);
        let c = ChunkIn {
            first_seq: first,
            last_seq: last,
            source_time_ns: last * 10,
            horizon_seq: 0,
            extents: std::mem::take(cur),
        };
        apply_model(img, &c);
        assert!(matches!(v.spool(&c).unwrap(), SpoolOutcome::Stored { .. }));
        assert!(matches!(
            v.spool(&c).unwrap(),
            SpoolOutcome::Duplicate { .. }
        ));
        *seq = last;
        states.push((last, img.to_vec()));
    }
}

#[test]
fn torn_group_commit_with_intact_later_records_is_truncated() {
    let d = tempfile::tempdir().unwrap();
    let mut o = small_opts();
    o.spool_file_size = 1 << 20;
    let mut v = create(d.path(), o.clone());
    v.spool(&chunk(1)).unwrap();
    let before = std::fs::metadata(&spool_files(d.path())[0]).unwrap().len();
    // one group of three records (one write + one fdatasync)
    v.spool_many(&[chunk(2), chunk(3), chunk(4)]).unwrap();
    drop(v);
    // damage the first record of the group: the later two are intact but belong to the
    // same (unsynced at crash time) group, so this is a torn tail, not corruption
    let f = spool_files(d.path())[0].clone();
    flip(&f, before + 70);
    let mut v = reopen(d.path(), o);
    assert_eq!(v.counters().torn_tails, 1);
    assert_eq!(v.durable_seq(), 1);
    for k in 2..=4 {
        v.spool(&chunk(k)).unwrap();
    }
    v.apply_all().unwrap();
    assert_eq!(replica_bytes(d.path()), model(4));
    check_points(&v, 1);
}

#[test]
fn torn_undo_payload_in_uncommitted_tail_is_truncated() {
    let d = tempfile::tempdir().unwrap();
    let mut o = small_opts();
    o.undo_compression = UndoCompression::Off;
    o.segment_size = 1 << 20;
    let mut v = create(d.path(), o.clone());
    for k in 1..=5 {
        v.spool(&chunk(k)).unwrap();
    }
    v.apply_all().unwrap();
    v.spool(&chunk(6)).unwrap();
    v.set_fault(Some(FaultConfig {
        point: FaultPoint::UndoAfterAppend,
        action: FaultAction::Error,
        skip: 0,
    }));
    assert!(matches!(v.apply_next(), Err(JournalError::Injected(_))));
    assert!(matches!(v.apply_next(), Err(JournalError::Poisoned)));
    drop(v);
    // the last record's payload did not reach the disk: header/table intact, bytes wrong
    let seg = seg_files(d.path()).pop().unwrap();
    let mut b = std::fs::read(&seg).unwrap();
    let n = b.len();
    for x in &mut b[n - 40..n - 33] {
        *x ^= 0x5a;
    }
    std::fs::write(&seg, &b).unwrap();
    let mut v = reopen(d.path(), o);
    assert_eq!(v.counters().torn_tails, 1, "{:?}", v.counters());
    assert_eq!(v.counters().recovered_chunks, 0);
    assert_eq!(v.applied_seq(), 5);
    v.apply_all().unwrap();
    assert_eq!(replica_bytes(d.path()), model(6));
    check_points(&v, 1);
}

#[test]
fn catalogue_indexes_segments_and_is_rebuilt() {
    let d = tempfile::tempdir().unwrap();
    let mut v = create(d.path(), small_opts());
    for k in 1..=40 {
        v.spool(&chunk(k)).unwrap();
        v.apply_all().unwrap();
    }
    let segs = v.segments();
    assert!(segs.len() >= 3);
    assert!(segs[..segs.len() - 1].iter().all(|s| s.sealed));
    assert_eq!(segs.iter().map(|s| s.undo_records).sum::<u64>(), 40);
    // records are in order across segments
    for w in segs.windows(2) {
        assert!(w[0].last_seq < w[1].first_seq || w[1].undo_records == 0);
    }
    let t = segs[1].last_time_ns;
    let before = v.catalogue_sealed_before(t).unwrap();
    assert_eq!(before, vec![segs[0].index, segs[1].index]);
    drop(v);
    // a destroyed catalogue is recreated from the segments
    std::fs::write(
        d.path().join("t/catalogue.sqlite"),
        b"not a database, just garbage bytes",
    )
    .unwrap();
    let _ = std::fs::remove_file(d.path().join("t/catalogue.sqlite-wal"));
    let _ = std::fs::remove_file(d.path().join("t/catalogue.sqlite-shm"));
    let v = reopen(d.path(), small_opts());
    assert_eq!(v.catalogue_sealed_before(t).unwrap(), before);
    assert_eq!(v.segments(), segs);
}

#[test]
fn starting_state_is_not_a_point_by_time() {
    // The replica before the first applied chunk (e.g. empty before the initial
    // sync) is not offered by time, and the window starts at the first chunk.
    let d = tempfile::tempdir().unwrap();
    let mut v = create(d.path(), small_opts());
    for k in 1..=5 {
        v.spool(&chunk(k)).unwrap();
        v.apply_all().unwrap();
    }
    let first = chunk(1).source_time_ns;
    let last = chunk(5).source_time_ns;
    for t in [0, first - 1] {
        match v.resolve(&RecoveryPoint::Time(t)) {
            Err(JournalError::BeforeWindow { oldest_time_ns, .. }) => {
                assert_eq!(oldest_time_ns, first, "time {t}")
            }
            other => panic!("time {t} before the first chunk: {other:?}"),
        }
    }
    let p = v.resolve(&RecoveryPoint::Time(first)).unwrap();
    assert_eq!((p.seq, p.source_time_ns), (1, first));
    let rp = v.recovery_points().unwrap();
    assert_eq!(rp.oldest_time_ns, first);
    assert_eq!(rp.consistent_ranges.first().map(|r| r.0), Some(first));
    let st = v.retention_status().unwrap();
    assert_eq!(st.oldest_time_ns, first);
    assert_eq!(st.available_window_ns, last - first);
    // survives a reopen
    drop(v);
    let v = reopen(d.path(), small_opts());
    assert_eq!(v.recovery_points().unwrap().oldest_time_ns, first);
    assert!(matches!(
        v.resolve(&RecoveryPoint::Time(first - 1)),
        Err(JournalError::BeforeWindow { .. })
    ));
}

/// Data read back from the source (metadata mode, bitmap sweeps, resync) may
/// show changes above its chunk's sequence numbers (`horizon_seq`): the states
/// after it are refused as inconsistent until every change up to the horizon
/// is applied, in process, from another process (directory view), after a
/// restart with the horizon only in the spool, and after one with it only in
/// commit records (spool reclaimed). Without the horizon these points were
/// offered as exact and could show one block newer than another.
#[test]
fn points_below_the_consistency_horizon_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let tdir = d.path().join("t");
    let seqs = |v: &TargetVolume| -> Vec<(u64, bool)> {
        (1..=v.applied_seq())
            .map(|s| match v.resolve(&RecoveryPoint::Seq(s)) {
                Ok(p) => (s, p.consistent),
                Err(JournalError::Inconsistent(_)) => (s, false),
                Err(e) => panic!("seq {s}: {e}"),
            })
            .collect()
    };
    let consistent = |v: &TargetVolume, s: u64| seqs(v).contains(&(s, true));
    let mut v = create(d.path(), small_opts());
    for k in 1..=3 {
        v.spool(&chunk(k)).unwrap();
    }
    // seq 4 carries data read back after the producer had handed out seq 7
    let mut c4 = chunk(4);
    c4.horizon_seq = 7;
    v.spool(&c4).unwrap();
    v.spool(&chunk(5)).unwrap();
    drop(v); // restart: the horizon is known from the spool record only
    let mut v = reopen(d.path(), small_opts());
    v.spool(&chunk(6)).unwrap();
    v.apply_all().unwrap();
    drop(v); // restart: spool reclaimed, the horizon is in the commit record
    let mut v = reopen(d.path(), small_opts());
    v.spool(&chunk(7)).unwrap();
    v.spool(&chunk(8)).unwrap();
    // an unordered (bitmap sweep) chunk with horizon 10, then 9..11
    let mut sweep = chunk(100);
    sweep.first_seq = 0;
    sweep.last_seq = 0;
    sweep.horizon_seq = 10;
    v.spool(&sweep).unwrap();
    for k in 9..=11 {
        v.spool(&chunk(k)).unwrap();
    }
    v.apply_all().unwrap();
    for (s, want) in [
        (3, true),
        (4, false),
        (5, false),
        (6, false),
        (7, true),
        (8, true),
        (9, false),
        (10, true),
        (11, true),
    ] {
        assert_eq!(consistent(&v, s), want, "seq {s}: {:?}", seqs(&v));
    }
    // times: chunk k has source time 1_000_000 + 1000 k
    let t = |k: u64| 1_000_000 + k * 1000;
    assert!(matches!(
        v.resolve(&RecoveryPoint::Time(t(5) + 1)),
        Err(JournalError::Inconsistent(_))
    ));
    assert_eq!(v.resolve(&RecoveryPoint::Time(t(7))).unwrap().seq, 7);
    let ranges = v.recovery_points().unwrap().consistent_ranges;
    assert!(
        ranges.iter().all(|&(a, b)| b < t(4) || a >= t(7)),
        "{ranges:?}"
    );
    // a directory view (another process) sees the same
    assert!(matches!(
        SnapshotView::open_dir(&tdir, &RecoveryPoint::Time(t(6))),
        Err(JournalError::Inconsistent(_))
    ));
    let view = SnapshotView::open_dir(&tdir, &RecoveryPoint::Time(t(7))).unwrap();
    let mut got = vec![0u8; VOL as usize];
    view.read_at(&mut got, 0).unwrap();
    let mut want = vec![0u8; VOL as usize];
    for k in 1..=7 {
        apply_model(&mut want, &chunk(k));
    }
    assert!(got == want, "the view at seq 7 is exact");
}

/// An apply step taken out of the volume (`apply_begin`) runs on another
/// thread while the owner keeps spooling; meanwhile apply, prune, rollback
/// and resize are refused as `Busy` (without poisoning the handle), and
/// after `apply_finish` every point and the replica match the model, also
/// after a reopen.
#[test]
fn apply_job_runs_while_spooling_goes_on() {
    let d = tempfile::tempdir().unwrap();
    let opts = small_opts();
    let mut v = create(d.path(), opts.clone());
    for k in 1..=6 {
        v.spool(&chunk(k)).unwrap();
    }
    let mut steps = 0;
    let mut k = 7;
    while let Some(mut job) = v.apply_begin().unwrap() {
        steps += 1;
        assert!(v.apply_busy());
        assert!(job.chunks() >= 1);
        let pending_before = v.pending_chunks();
        let t = std::thread::spawn(move || {
            let r = job.prepare();
            (job, r)
        });
        // spooling goes on while the job reads the old data
        if k <= 12 {
            v.spool(&chunk(k)).unwrap();
            assert_eq!(v.durable_seq(), k);
            assert_eq!(v.pending_chunks(), pending_before + 1);
            k += 1;
        }
        assert!(matches!(v.apply_batch(), Err(JournalError::Busy(_))));
        assert!(matches!(v.apply_begin(), Err(JournalError::Busy(_))));
        assert!(matches!(v.prune(u64::MAX), Err(JournalError::Busy(_))));
        assert!(matches!(v.resize(2 * VOL), Err(JournalError::Busy(_))));
        assert!(matches!(
            v.rollback_to(&RecoveryPoint::Seq(0), false),
            Err(JournalError::Busy(_))
        ));
        let (mut job, r) = t.join().unwrap();
        r.unwrap();
        v.apply_place(&mut job).unwrap();
        let t = std::thread::spawn(move || {
            let r = job.run();
            (job, r)
        });
        let (job, r) = t.join().unwrap();
        let a = v.apply_finish(job, r).unwrap();
        assert!(a.chunks >= 1);
        assert!(!v.apply_busy());
    }
    assert!(steps >= 3, "only {steps} steps");
    assert_eq!(k, 13);
    assert_eq!(v.applied_seq(), 12);
    assert_eq!(v.pending_chunks(), 0);
    assert_eq!(v.spool_bytes(), 0);
    assert_eq!(replica_bytes(d.path()), model(12));
    check_points(&v, 1);
    drop(v);
    let v = reopen(d.path(), opts);
    assert_eq!(v.applied_seq(), 12);
    assert_eq!(replica_bytes(d.path()), model(12));
    check_points(&v, 1);
}

/// Zero extents (trims, write-zeroes) deallocate the replica's blocks where
/// the file system can punch holes (ext4 here) instead of writing zeros, and
/// every earlier point still reads the old data from the undo journal.
#[test]
fn zero_extents_punch_holes_in_the_replica_and_points_keep_the_old_data() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let replica = dir.path().join("replica.img");
    let mib = 1u64 << 20;
    let mut v =
        TargetVolume::create(&dir.path().join("t"), ident(8 * mib), &replica).expect("create");
    let mut data = vec![0u8; 4 * mib as usize];
    StdRng::seed_from_u64(42).fill(&mut data[..]);
    let one = |seq: u64, data: ExtentData| ChunkIn {
        first_seq: seq,
        last_seq: seq,
        source_time_ns: 1_700_000_000_000_000_000 + seq,
        horizon_seq: 0,
        extents: vec![ChunkExtent { offset: mib, data }],
    };
    v.spool(&one(1, ExtentData::Data(data.clone().into())))
        .expect("spool data");
    v.apply_all().expect("apply data");
    let allocated = |p: &Path| std::fs::metadata(p).expect("stat replica").blocks() * 512;
    let before = allocated(&replica);
    assert!(before >= 4 * mib, "the data is allocated: {before}");
    v.spool(&one(2, ExtentData::Zero(4 * mib)))
        .expect("spool zeros");
    v.apply_all().expect("apply zeros");
    let after = allocated(&replica);
    assert!(
        after + 4 * mib <= before,
        "the zero extent freed nothing: {before} -> {after} allocated bytes"
    );
    assert_eq!(v.counters().replica_punched_bytes, 4 * mib);
    let mut buf = vec![0xEEu8; 4 * mib as usize];
    v.snapshot(&RecoveryPoint::Latest)
        .expect("latest")
        .read_at(&mut buf, mib)
        .expect("read latest");
    assert!(buf.iter().all(|b| *b == 0), "the replica reads zeros");
    v.snapshot(&RecoveryPoint::Seq(1))
        .expect("point 1")
        .read_at(&mut buf, mib)
        .expect("read point 1");
    assert!(buf == data, "point 1 reads the data before the zeros");
    drop(v);
    // Re-opened (and re-applied, if it had to be): the same.
    let v = TargetVolume::open(&dir.path().join("t")).expect("open");
    v.snapshot(&RecoveryPoint::Seq(1))
        .expect("point 1")
        .read_at(&mut buf, mib)
        .expect("read point 1");
    assert!(buf == data);
}

/// Undo compression settings: the default is lz4; each setting stores the
/// old data of overwritten text-like blocks in its own way (zstd smaller than
/// lz4, off raw) and reads it back exactly as a point in time.
#[test]
fn undo_compression_default_is_lz4_and_every_setting_reads_back() {
    let mut rng = StdRng::seed_from_u64(42);
    let words = [
        "replica", "journal", "chunk", "spool", "undo", "point", "the", "of", "a",
    ];
    let mut text = Vec::with_capacity(VOL as usize);
    while text.len() < VOL as usize {
        text.extend_from_slice(words[rng.gen_range(0..words.len())].as_bytes());
        text.push(if rng.gen_range(0..8) == 0 {
            b'\n'
        } else {
            b' '
        });
    }
    text.truncate(VOL as usize);
    let whole = |k: u64, data: Vec<u8>| ChunkIn {
        first_seq: k,
        last_seq: k,
        source_time_ns: 1_000_000 + k * 1000,
        horizon_seq: 0,
        extents: vec![ChunkExtent {
            offset: 0,
            data: ExtentData::Data(data.into()),
        }],
    };
    let mut stored = Vec::new();
    let default = TargetOptions::default().undo_compression;
    for c in [
        default,
        UndoCompression::Lz4,
        UndoCompression::Zstd(1),
        UndoCompression::Off,
    ] {
        let d = tempfile::tempdir().unwrap();
        let mut o = small_opts();
        o.undo_compression = c;
        let mut v = create(d.path(), o);
        v.spool(&whole(1, text.clone())).unwrap();
        v.spool(&whole(2, vec![7u8; VOL as usize])).unwrap();
        v.apply_all().unwrap();
        let k = v.counters();
        // the zeros under the first chunk (stored as nothing), then the text
        assert_eq!(k.undo_raw_bytes, 2 * VOL, "{c}");
        assert_eq!(v.read_at_point(Point::Seq(1), 0, VOL).unwrap(), text, "{c}");
        assert_eq!(
            v.read_at_point(Point::Seq(0), 0, VOL).unwrap(),
            vec![0u8; VOL as usize]
        );
        v.verify_journal().unwrap();
        eprintln!(
            "{c}: {} old bytes stored as {}",
            k.undo_raw_bytes, k.undo_stored_bytes
        );
        stored.push(k.undo_stored_bytes);
    }
    assert_eq!(default, UndoCompression::Lz4);
    assert_eq!(stored[0], stored[1], "default stores like lz4");
    assert!(stored[1] < VOL * 3 / 4, "lz4 compresses text: {stored:?}");
    assert!(
        stored[2] < stored[1],
        "zstd stores less than lz4 on text: {stored:?}"
    );
    assert_eq!(stored[3], VOL, "off stores raw: {stored:?}");
}

/// Direct apply goes through the spool instead when the file system lacks
/// the space its apply needs (the spool's free-space rule then applies), and
/// reports what it applied itself through `take_direct_applied`.
#[test]
fn direct_apply_spools_when_space_is_short_and_reports_what_it_applied() {
    let d = tempfile::tempdir().unwrap();
    let mut o = small_opts();
    o.direct_apply = true;
    let mut v = create(d.path(), o.clone());
    v.spool_many(&[chunk(1)]).unwrap();
    let k = v.counters();
    assert_eq!(k.spooled_bytes, 0, "applied directly, not spooled");
    assert_eq!(v.applied_seq(), 1);
    let a = v
        .take_direct_applied()
        .expect("the direct apply is reported");
    assert_eq!((a.chunks, a.applied_seq), (1, 1));
    assert_eq!(a.bytes, k.applied_bytes);
    assert!(v.take_direct_applied().is_none(), "reported once");
    drop(v);

    // No file system has this much free: the spool path takes the chunk.
    o.min_free_bytes = u64::MAX / 4;
    let mut v = reopen(d.path(), o);
    v.spool_many(&[chunk(2)]).unwrap();
    assert!(v.counters().spooled_bytes > 0, "spooled for want of space");
    assert!(v.take_direct_applied().is_none());
    assert_eq!(v.applied_seq(), 1, "not applied yet");
    v.apply_all().unwrap();
    assert_eq!(v.applied_seq(), 2);
    assert_eq!(replica_bytes(d.path()), model(2));
}

/// With a backlog of incoming data reported, direct apply spools instead (the
/// spool absorbs the burst); once the backlog is gone and the spool applied,
/// chunks are applied in place again.
#[test]
fn direct_apply_spools_while_input_is_backlogged() {
    let d = tempfile::tempdir().unwrap();
    let mut o = small_opts();
    o.direct_apply = true;
    let mut v = create(d.path(), o);
    v.set_incoming_backlog(true);
    v.spool_many(&[chunk(1)]).unwrap();
    v.spool_many(&[chunk(2)]).unwrap();
    assert!(v.counters().spooled_bytes > 0, "spooled during the backlog");
    assert!(v.take_direct_applied().is_none());
    assert_eq!(v.applied_seq(), 0, "nothing applied in place");
    v.set_incoming_backlog(false);
    // Still pending: spooled behind the earlier chunks, not applied ahead of them.
    v.spool_many(&[chunk(3)]).unwrap();
    assert!(v.take_direct_applied().is_none());
    v.apply_all().unwrap();
    assert_eq!(v.applied_seq(), 3);
    let spooled = v.counters().spooled_bytes;
    v.spool_many(&[chunk(4)]).unwrap();
    assert_eq!(
        v.counters().spooled_bytes,
        spooled,
        "applied in place again"
    );
    assert_eq!(v.take_direct_applied().map(|a| a.applied_seq), Some(4));
    assert_eq!(replica_bytes(d.path()), model(4));
}
