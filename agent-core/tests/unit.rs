//! Unit-level tests of the change log through its public API.

mod common;

use agent_core::*;
use common::*;

const MIB: u64 = 1 << 20;

/// A writer that keeps a simulated source volume in step with the change log.
struct Vol {
    log: ChangeLog,
    src: Vec<u8>,
}

impl Vol {
    fn write(&mut self, off: u64, len: usize, seed: u64) {
        let t = self.log.begin(off, len as u64);
        fill(&mut self.src[off as usize..off as usize + len], seed);
        let d = self.src[off as usize..off as usize + len].to_vec();
        self.log.complete_write(t, &d);
    }
    fn zero(&mut self, off: u64, len: usize) {
        let t = self.log.begin(off, len as u64);
        self.src[off as usize..off as usize + len].fill(0);
        self.log.complete_zero(t);
    }
}

fn vol(dir: &std::path::Path, size: u64, block: u32, ring: u64) -> Vol {
    let log = ChangeLog::open_or_create(cfg(dir, "v", size, block, ring)).unwrap();
    Vol {
        log,
        src: vec![0; size as usize],
    }
}

#[test]
fn bitmap_set_clear_coalesce_at_several_block_sizes() {
    for block in [4096u32, 16384, 65536, 1 << 20] {
        let d = tmpdir();
        let size = 8 * MIB + 1000; // last block partial
        let mut v = vol(d.path(), size, block, 64 * 1024);
        v.log.set_filtering(false);
        v.write(0, 10, 1); // block 0
        v.write(block as u64, 1, 2); // block 1 (adjacent -> coalesced)
        v.write(5 * block as u64 + 7, 2 * block as usize, 3); // blocks 5..=7
        v.write(size - 10, 10, 4); // last (partial) block
        let view = ChangeLogView::open(v.log.path()).unwrap();
        let b = block as u64;
        let last_block_start = (size - 1) / b * b;
        let mut want = vec![(0, 2 * b), (5 * b, 3 * b)];
        if last_block_start == 8 * b {
            want[1].1 += 0;
            want.push((last_block_start, size - last_block_start));
        } else {
            want.push((last_block_start, size - last_block_start));
        }
        // merge if adjacent (1 MiB blocks: blocks 5..7 and last block 8 touch)
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, l) in want {
            match merged.last_mut() {
                Some(m) if m.0 + m.1 == s => m.1 += l,
                _ => merged.push((s, l)),
            }
        }
        assert_eq!(view.dirty_ranges(), merged, "block size {block}");
        let st = view.stats();
        let nblocks: u64 = merged
            .iter()
            .map(|(s, l)| (s + l).div_ceil(b) - s / b)
            .sum();
        assert_eq!(st.dirty_blocks_active, nblocks);
        assert_eq!(st.mode, CaptureMode::Bitmap);
        assert_eq!(st.transitions.filtering_stops, 1);

        let mut c = Consumer::attach(v.log.path()).unwrap();
        let batch = c.get(u64::MAX).unwrap().unwrap();
        assert_eq!(batch.kind(), BatchKind::Bitmap);
        assert_eq!(batch.ranges(), &merged[..]);
        let st = view.stats();
        assert_eq!(
            (st.dirty_blocks_active, st.dirty_blocks_pending),
            (0, nblocks)
        );
        assert_eq!(
            view.dirty_ranges(),
            merged,
            "pending bits still count as dirty"
        );
        let mut rep = vec![0u8; size as usize];
        apply(&batch, &v.src, &mut rep);
        c.commit(batch).unwrap();
        assert!(view.dirty_ranges().is_empty());
        assert_eq!(view.stats().dirty_blocks_pending, 0);
        assert!(rep == v.src, "replica differs");
        // back to data mode once filtering is on and the bitmap is empty
        v.log.set_filtering(true);
        v.write(0, 512, 9);
        assert_eq!(v.log.mode(), CaptureMode::Data);
        assert_eq!(view.stats().transitions.bitmap_to_data, 1);
    }
}

#[test]
fn bitmap_batches_respect_max_bytes() {
    let d = tmpdir();
    let mut v = vol(d.path(), 4 * MIB, 4096, 64 * 1024);
    v.log.set_filtering(false);
    v.write(0, 4 * MIB as usize, 1);
    let mut c = Consumer::attach(v.log.path()).unwrap();
    let mut rep = vec![0u8; 4 * MIB as usize];
    let mut n = 0;
    while let Some(b) = c.get(100 * 4096).unwrap() {
        let total: u64 = b.ranges().iter().map(|r| r.1).sum();
        assert!(total <= 100 * 4096 && total > 0);
        apply(&b, &v.src, &mut rep);
        c.commit(b).unwrap();
        n += 1;
    }
    assert_eq!(n, 1024usize.div_ceil(100));
    assert!(rep == v.src, "replica differs");
}

#[test]
fn ring_wrap_around_and_record_contents() {
    let d = tmpdir();
    let mut v = vol(d.path(), MIB, 4096, 16 * 1024);
    let mut c = Consumer::attach(v.log.path()).unwrap();
    let mut rep = vec![0u8; MIB as usize];
    let mut last_seq = 0;
    for i in 0..200u64 {
        // 3000-byte records: 3048 -> pads at the end of the 16 KiB ring
        let off = (i * 7919) % (MIB - 3000);
        v.write(off, 3000, i + 1);
        if i % 3 == 2 {
            while let Some(b) = c.get(u64::MAX).unwrap() {
                for r in b.records() {
                    assert_eq!(r.kind, RecordKind::Data);
                    assert!(r.seq > last_seq);
                    last_seq = r.seq;
                    assert_eq!(r.data.len(), 3000);
                }
                apply(&b, &v.src, &mut rep);
                c.commit(b).unwrap();
            }
        }
    }
    drain(&mut c, &v.src, &mut rep, u64::MAX);
    assert!(rep == v.src, "replica differs");
    let st = v.log.stats();
    assert_eq!(st.data_records, 200);
    assert_eq!(st.mode, CaptureMode::Data);
    assert!(st.ring_head > 10 * 16 * 1024, "wrapped many times");
    assert_eq!(st.ring_used_bytes, 0);
    assert_eq!(st.records_committed, 200);
}

#[test]
fn every_mode_transition_with_counters() {
    let d = tmpdir();
    // 8 KiB ring: max payload 2 KiB; two 2 KiB data records fit, then metadata.
    let mut v = vol(d.path(), MIB, 4096, 8192);
    let view = ChangeLogView::open(v.log.path()).unwrap();
    v.write(0, 2048, 1);
    v.write(4096, 2048, 2);
    v.write(8192, 2048, 3);
    assert_eq!(v.log.mode(), CaptureMode::Data);
    v.write(12288, 2048, 4); // 4 x 2096 > 8192 -> metadata
    assert_eq!(v.log.mode(), CaptureMode::Metadata);
    v.write(16384, 8192, 5); // metadata record (48 bytes)
    let st = view.stats();
    assert_eq!(st.transitions.data_to_metadata, 1);
    assert_eq!(st.metadata_records, 2);
    // fill the ring with metadata until bitmap mode
    let mut i = 0;
    while v.log.mode() != CaptureMode::Bitmap {
        v.write(32768 + i * 4096, 100, 10 + i);
        i += 1;
        assert!(i < 1000);
    }
    let st = view.stats();
    assert_eq!(st.transitions.metadata_to_bitmap, 1);
    assert!(
        st.bitmap_mode_since_ns.is_some(),
        "bitmap-mode alert timestamp"
    );
    assert_eq!(st.dirty_blocks_active, 1);
    v.write(900 * 1024, 4096, 99); // another bitmap write
    assert_eq!(view.stats().bitmap_writes, 2);
    // every written range is in the ring or in the bitmap
    let covered = view.uncommitted_ranges();
    for (o, l) in [
        (0u64, 2048u64),
        (4096, 2048),
        (8192, 2048),
        (12288, 2048),
        (16384, 8192),
        (900 * 1024, 4096),
    ] {
        assert!(
            covered.iter().any(|&(s, n)| s <= o && o + l <= s + n),
            "{o}+{l} not covered by {covered:?}"
        );
    }
    // drain: ring first, then bitmap
    let mut c = Consumer::attach(v.log.path()).unwrap();
    let mut rep = vec![0u8; MIB as usize];
    let mut kinds = Vec::new();
    while let Some(b) = c.get(u64::MAX).unwrap() {
        kinds.push(b.kind());
        apply(&b, &v.src, &mut rep);
        c.commit(b).unwrap();
    }
    assert_eq!(kinds.last(), Some(&BatchKind::Bitmap));
    assert!(kinds[..kinds.len() - 1]
        .iter()
        .all(|k| *k == BatchKind::Ring));
    assert!(rep == v.src, "replica differs");
    // still bitmap until the next write sees active == pending == 0
    assert_eq!(v.log.mode(), CaptureMode::Bitmap);
    v.write(0, 1024, 100);
    assert_eq!(v.log.mode(), CaptureMode::Data);
    let st = view.stats();
    assert_eq!(st.transitions.bitmap_to_data, 1);
    assert_eq!(st.bitmap_mode_since_ns, None);
    // data -> metadata -> data via the 50 % low watermark
    v.write(4096, 2048, 101);
    v.write(8192, 2048, 102);
    v.write(12288, 2048, 103);
    v.write(16384, 2048, 106); // ring: 4 x 2096 > 8192 -> metadata
    assert_eq!(v.log.mode(), CaptureMode::Metadata);
    drain(&mut c, &v.src, &mut rep, u64::MAX);
    v.write(16384, 2048, 104);
    assert_eq!(v.log.mode(), CaptureMode::Data);
    let st = view.stats();
    assert_eq!(st.transitions.metadata_to_data, 1);
    assert_eq!(st.transitions.data_to_metadata, 2);
    // a write bigger than a quarter of the ring is metadata without a mode change
    v.write(65536, 4096, 105);
    assert_eq!(v.log.mode(), CaptureMode::Data);
    assert_eq!(view.stats().oversize_metadata_records, 1);
    drain(&mut c, &v.src, &mut rep, u64::MAX);
    assert!(rep == v.src, "replica differs");
    assert_eq!(
        view.stats().write_size_histogram[HIST_LABELS.iter().position(|l| *l == "4K").unwrap()],
        2
    );
}

#[test]
fn zero_records_and_statistics() {
    let d = tmpdir();
    let mut v = vol(d.path(), 4 * MIB, 4096, 64 * 1024);
    v.write(0, 65536, 1);
    v.zero(4096, 192 * 1024); // bigger than the ring: still a zero record
    v.log.note_read(512);
    v.log.note_read(5 << 20);
    let view = ChangeLogView::open(v.log.path()).unwrap();
    let recs: Vec<_> = view.records().collect();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[1].kind, RecordKind::Zero);
    assert_eq!((recs[1].offset, recs[1].len), (4096, 192 * 1024));
    let mut c = Consumer::attach(v.log.path()).unwrap();
    let mut rep = v.src.clone();
    rep[..4096 + 192 * 1024].fill(0xAA);
    drain(&mut c, &v.src, &mut rep, u64::MAX);
    assert!(rep == v.src, "replica differs");
    let st = view.stats();
    assert_eq!(
        (st.zero_ops, st.zero_records, st.zero_bytes),
        (1, 1, 192 * 1024)
    );
    assert_eq!((st.reads, st.read_bytes), (2, 512 + (5 << 20)));
    assert_eq!(st.read_size_histogram[0], 1);
    assert_eq!(st.read_size_histogram[14], 1);
    assert_eq!(
        st.write_size_histogram[HIST_LABELS.iter().position(|l| *l == "64K").unwrap()],
        1
    );
    let json = serde_json::to_string(&st).unwrap();
    assert!(json.contains("\"mode\":\"Data\"") && json.contains("write_size_histogram"));
}

#[test]
fn tags_in_stream_order_and_refusals() {
    let d = tmpdir();
    let mut v = vol(d.path(), MIB, 4096, 8192);
    v.write(0, 1000, 1);
    let seq = v
        .log
        .insert_tag("before-upgrade", TagType::App, [9; 16])
        .unwrap();
    v.write(4096, 1000, 2);
    let mut c = Consumer::attach(v.log.path()).unwrap();
    let b = c.get(u64::MAX).unwrap().unwrap();
    let kinds: Vec<_> = b.records().iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        vec![RecordKind::Data, RecordKind::Tag, RecordKind::Data]
    );
    let t = b.records()[1].tag.clone().unwrap();
    assert_eq!(
        (t.name.as_str(), t.tag_type, t.uuid),
        ("before-upgrade", TagType::App, [9; 16])
    );
    assert_eq!(b.records()[1].seq, seq);
    c.commit(b).unwrap();
    // ring full -> tag refused
    v.write(0, 2000, 3);
    v.write(0, 2000, 4);
    v.write(0, 2000, 5);
    assert_eq!(v.log.mode(), CaptureMode::Data);
    assert!(matches!(
        v.log
            .insert_tag("x".repeat(2100).as_str(), TagType::User, [0; 16]),
        Err(ChangeLogError::TagRefused(_))
    ));
    // metadata mode -> refused
    v.write(0, 2000, 6);
    assert_eq!(v.log.mode(), CaptureMode::Metadata);
    assert!(matches!(
        v.log.insert_tag("m", TagType::Fs, [0; 16]),
        Err(ChangeLogError::TagRefused(_))
    ));
    // bitmap mode -> refused
    v.log.set_filtering(false);
    assert!(matches!(
        v.log.insert_tag("b", TagType::User, [0; 16]),
        Err(ChangeLogError::TagRefused(_))
    ));
    let st = v.log.stats();
    assert_eq!((st.tags_inserted, st.tags_refused), (1, 3));
}

#[test]
fn persistence_round_trip_and_reboot() {
    let d = tmpdir();
    let size = 256 * MIB;
    let c0 = {
        let mut c = cfg(d.path(), "vol1", size, 4096, 16 * 1024);
        c.extent_shift = 24; // 16 MiB extents
        c
    };
    let log = ChangeLog::open_or_create(c0.clone()).unwrap();
    let id = log.identity().clone();
    let data = vec![7u8; 4096];
    // a data record (unconsumed ring) and bitmap bits
    let t = log.begin(10 * MIB, 4096);
    log.complete_write(t, &data);
    log.set_filtering(false);
    let t = log.begin(100 * MIB, 4096);
    log.complete_write(t, &data);
    log.set_filtering(true);
    log.close().unwrap();
    drop(log);
    let region = c0.region_path();
    std::fs::remove_file(&region).unwrap(); // host reboot: /dev/shm is gone
    let (log, rep) = ChangeLog::open_with_report(c0.clone()).unwrap();
    assert!(
        rep.created_region && !rep.full_resync && !rep.created_identity,
        "{rep:?}"
    );
    assert_eq!(log.identity(), &id, "identity reused");
    assert_eq!(log.mode(), CaptureMode::Bitmap);
    let view = ChangeLogView::open(&region).unwrap();
    assert_eq!(
        view.dirty_ranges(),
        vec![(10 * MIB, 4096), (100 * MIB, 4096)],
        "clean shutdown: exact blocks, no hot extents"
    );
    assert!(view.stats().next_seq > 1 << 32);

    // Unclean: writes after the last persist are covered by hot extents.
    let t = log.begin(200 * MIB + 5, 100);
    log.complete_write(t, &data[..100]);
    let t = log.begin(50 * MIB, 100); // in flight at the crash
    let _ = t; // never completed: the "process" dies with the write in flight
    log.simulate_crash();
    std::fs::remove_file(&region).unwrap();
    let (log, rep) = ChangeLog::open_with_report(c0.clone()).unwrap();
    assert!(!rep.full_resync);
    let view = ChangeLogView::open(&region).unwrap();
    let ranges = view.dirty_ranges();
    for (o, l) in [
        (10 * MIB, 4096),
        (100 * MIB, 4096),
        (200 * MIB + 5, 100),
        (50 * MIB, 100),
    ] {
        assert!(
            ranges.iter().any(|&(s, n)| s <= o && o + l <= s + n),
            "{o} not in {ranges:?}"
        );
    }
    // hot extents are whole 16 MiB extents, not the whole volume
    let total: u64 = ranges.iter().map(|r| r.1).sum();
    assert!(total <= 4 * 16 * MIB, "{ranges:?}");
    drop(log);

    // State lost but identity present -> everything dirty (full resync), flagged.
    std::fs::remove_file(&region).unwrap();
    std::fs::remove_file(c0.state_dir.join("vol1.bitmap")).unwrap();
    let (_log, rep) = ChangeLog::open_with_report(c0.clone()).unwrap();
    assert!(rep.full_resync);
    let view = ChangeLogView::open(&region).unwrap();
    assert_eq!(view.dirty_ranges(), vec![(0, size)]);
}

#[test]
fn producer_crash_recovery_marks_inflight_extents() {
    let d = tmpdir();
    let mut c0 = cfg(d.path(), "v", 64 * MIB, 4096, 64 * 1024);
    c0.extent_shift = 20; // 1 MiB extents
    let log = ChangeLog::open_or_create(c0.clone()).unwrap();
    let t1 = log.begin(3 * MIB + 10, 10);
    let t2 = log.begin(5 * MIB - 1, 2); // spans extents 4 and 5
    let done = log.begin(7 * MIB, 4096);
    log.complete_write(done, &[1u8; 4096]);
    let _ = (t1, t2); // never completed: the "process" dies with the write in flight
    log.simulate_crash();
    let (log, rep) = ChangeLog::open_with_report(c0.clone()).unwrap();
    assert!(rep.previous_producer_crashed);
    assert_eq!(rep.inflight_extents_marked, 3);
    let view = ChangeLogView::open(log.path()).unwrap();
    assert_eq!(
        view.dirty_ranges(),
        vec![(3 * MIB, MIB), (4 * MIB, 2 * MIB)].into_iter().fold(
            Vec::new(),
            |mut v: Vec<(u64, u64)>, r| {
                match v.last_mut() {
                    Some(l) if l.0 + l.1 == r.0 => l.1 += r.1,
                    _ => v.push(r),
                }
                v
            }
        )
    );
    assert_eq!(
        view.records().count(),
        1,
        "the completed write survives in the ring"
    );
    assert_eq!(view.stats().recoveries, 1);
    log.close().unwrap();
    drop(log);
    let (_log, rep) = ChangeLog::open_with_report(c0).unwrap();
    assert!(!rep.previous_producer_crashed && rep.inflight_extents_marked == 0);
}

#[test]
fn consumer_crash_redelivers() {
    let d = tmpdir();
    let mut v = vol(d.path(), MIB, 4096, 64 * 1024);
    v.write(0, 4096, 1);
    v.write(8192, 4096, 2);
    let mut c = Consumer::attach(v.log.path()).unwrap();
    let b1 = c.get(1).unwrap().unwrap();
    let b2 = c.get(1).unwrap().unwrap();
    assert_eq!(b1.records().len() + b2.records().len(), 2);
    assert!(matches!(
        c.commit(b2),
        Err(ChangeLogError::CommitOrder { .. })
    ));
    c.commit(b1).unwrap();
    drop(c); // crash with b2 outstanding
    v.log.set_filtering(false);
    v.write(65536, 100, 3);
    let mut c = Consumer::attach(v.log.path()).unwrap();
    let b = c.get(u64::MAX).unwrap().unwrap();
    assert_eq!(b.records().len(), 1);
    assert_eq!(
        b.records()[0].offset,
        8192,
        "uncommitted record re-delivered"
    );
    c.commit(b).unwrap();
    let bb = c.get(u64::MAX).unwrap().unwrap();
    assert_eq!(bb.ranges(), &[(65536, 4096)]);
    drop(c); // crash with the bitmap batch outstanding: bits back to active
    let view = ChangeLogView::open(v.log.path()).unwrap();
    assert_eq!(view.dirty_ranges(), vec![(65536, 4096)]);
    let mut c = Consumer::attach(v.log.path()).unwrap();
    assert_eq!(view.stats().dirty_blocks_active, 1);
    let bb2 = c.get(u64::MAX).unwrap().unwrap();
    assert_eq!(bb2.ranges(), &[(65536, 4096)]);
    // a batch of an earlier consumer handle is refused
    assert!(c.commit(bb).is_err());
    c.commit(bb2).unwrap();
    assert!(view.dirty_ranges().is_empty());
}

#[test]
fn exclusive_roles() {
    let d = tmpdir();
    let c0 = cfg(d.path(), "v", MIB, 4096, 8192);
    let log = ChangeLog::open_or_create(c0.clone()).unwrap();
    assert!(matches!(
        ChangeLog::open_or_create(c0.clone()),
        Err(ChangeLogError::Busy {
            role: "producer",
            ..
        })
    ));
    let c = Consumer::attach(log.path()).unwrap();
    assert!(matches!(
        Consumer::attach(log.path()),
        Err(ChangeLogError::Busy {
            role: "consumer",
            ..
        })
    ));
    drop(c);
    Consumer::attach(log.path()).unwrap();
}

#[test]
fn corrupt_or_mismatched_regions_are_errors() {
    let d = tmpdir();
    let c0 = cfg(d.path(), "v", MIB, 4096, 8192);
    let path = c0.region_path();
    drop(ChangeLog::open_or_create(c0.clone()).unwrap());
    let good = std::fs::read(&path).unwrap();
    // mismatched configuration
    let mut other = c0.clone();
    other.volume_size = 2 * MIB;
    assert!(matches!(
        ChangeLog::open_or_create(other),
        Err(ChangeLogError::Mismatch { .. })
    ));
    let mut other = c0.clone();
    other.block_size = 8192;
    assert!(matches!(
        ChangeLog::open_or_create(other),
        Err(ChangeLogError::Mismatch { .. })
    ));
    let mut other = c0.clone();
    other.block_size = 3000;
    assert!(matches!(
        ChangeLog::open_or_create(other),
        Err(ChangeLogError::InvalidConfig(_))
    ));
    // bad magic, version, checksum, truncated file
    for (off, what) in [(0usize, "magic"), (8, "version"), (33, "checksum")] {
        let mut b = good.clone();
        b[off] ^= 0x55;
        std::fs::write(&path, &b).unwrap();
        let e = ChangeLogView::open(&path)
            .err()
            .unwrap_or_else(|| panic!("{what} accepted"));
        assert!(matches!(e, ChangeLogError::BadRegion { .. }), "{e}");
        assert!(Consumer::attach(&path).is_err());
        assert!(ChangeLog::open_or_create(c0.clone()).is_err());
    }
    std::fs::write(&path, &good[..good.len() - 4096]).unwrap();
    assert!(matches!(
        ChangeLogView::open(&path),
        Err(ChangeLogError::BadRegion { .. })
    ));
    std::fs::write(&path, &good[..100]).unwrap();
    assert!(matches!(
        ChangeLogView::open(&path),
        Err(ChangeLogError::BadRegion { .. })
    ));
    std::fs::write(&path, b"").unwrap();
    assert!(ChangeLogView::open(&path).is_err());
}

#[test]
fn corrupt_ring_record_is_detected_and_recovered() {
    let d = tmpdir();
    let c0 = cfg(d.path(), "v", MIB, 4096, 8192);
    let path = c0.region_path();
    let log = ChangeLog::open_or_create(c0.clone()).unwrap();
    for i in 0..3u64 {
        let t = log.begin(i * 65536, 512);
        log.complete_write(t, &[i as u8; 512]);
    }
    log.simulate_crash();
    // flip a byte in the second record's header (ring starts after header,
    // bitmaps and counters; find it from the file length)
    let mut b = std::fs::read(&path).unwrap();
    let ring_off = b.len() - 8192;
    let second = ring_off + 48 + 512 + 24; // offset field of record 2
    b[second] ^= 1;
    std::fs::write(&path, &b).unwrap();
    let mut c = Consumer::attach(&path).unwrap();
    let first = c.get(1).unwrap().unwrap();
    assert_eq!(first.records().len(), 1);
    assert!(matches!(
        c.get(u64::MAX),
        Err(ChangeLogError::CorruptRecord { .. })
    ));
    drop(c);
    let (log, rep) = ChangeLog::open_with_report(c0).unwrap();
    assert_eq!(rep.ring_truncated_at, Some(48 + 512));
    let view = ChangeLogView::open(&path).unwrap();
    assert_eq!(view.records().count(), 1);
    // records 2 and 3 fall in extent 0 (hot): the whole extent is dirty
    assert_eq!(view.dirty_ranges(), vec![(0, MIB)]);
    assert_eq!(log.mode(), CaptureMode::Bitmap);
}

#[test]
fn close_then_reopen() {
    let d = tmpdir();
    let c0 = cfg(d.path(), "v", MIB, 4096, 8192);
    let log = ChangeLog::open_or_create(c0.clone()).unwrap();
    log.close().unwrap();
    drop(log); // close() keeps the role until the handle is dropped
    let log = ChangeLog::open_or_create(c0.clone()).unwrap();
    drop(log);
    std::fs::remove_file(c0.region_path()).unwrap();
    let log = ChangeLog::open_or_create(c0.clone()).unwrap();
    log.close().unwrap();
    log.close().unwrap(); // idempotent
    drop(log);
    std::fs::remove_file(c0.region_path()).unwrap();
    ChangeLog::open_or_create(c0).unwrap();
}

#[test]
fn crash_before_first_persist_is_not_lost_state_but_missing_al_is() {
    let d = tmpdir();
    let c0 = cfg(d.path(), "v", MIB, 4096, 8192);
    drop(ChangeLog::open_or_create(c0.clone()).unwrap());
    // region lost right after creation: state files exist, nothing dirty
    std::fs::remove_file(c0.region_path()).unwrap();
    let (log, rep) = ChangeLog::open_with_report(c0.clone()).unwrap();
    assert!(!rep.full_resync && rep.blocks_from_state == 0, "{rep:?}");
    drop(log);
    // activity log deleted: the hot set is unknown -> everything dirty
    std::fs::remove_file(c0.region_path()).unwrap();
    std::fs::remove_file(c0.state_dir.join("v.al")).unwrap();
    let (_log, rep) = ChangeLog::open_with_report(c0.clone()).unwrap();
    assert!(rep.full_resync, "{rep:?}");
}

#[test]
fn foreign_bits_beyond_the_volume_end_are_harmless() {
    use std::os::unix::fs::FileExt;
    let d = tmpdir();
    let size = MIB + 1000; // 257 blocks: word 4 has one valid bit
    let log = ChangeLog::open_or_create(cfg(d.path(), "v", size, 4096, 8192)).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(log.path())
        .unwrap();
    f.write_all_at(&u64::MAX.to_le_bytes(), 4096 + 4 * 8)
        .unwrap(); // active word 4, all bits
    let view = ChangeLogView::open(log.path()).unwrap();
    assert_eq!(view.dirty_ranges(), vec![(MIB, 1000)]);
    let mut c = Consumer::attach(log.path()).unwrap();
    let b = c.get(u64::MAX).unwrap().unwrap();
    assert_eq!(b.ranges(), &[(MIB, 1000)]);
    c.commit(b).unwrap();
    assert!(view.dirty_ranges().is_empty());
    log.persist().unwrap();
}

/// Under a sustained overload (the writer always outpaces the ring), the log
/// leaves bitmap mode after each completed consumer sweep although bits are
/// still set, so writes go back to the ring while the load continues; no
/// change is lost, and the RPO bounds handed out with bitmap batches never
/// claim a change is younger than it is.
#[test]
fn sustained_overload_returns_to_data_mode_per_sweep() {
    let d = tmpdir();
    let size = 4 * MIB;
    let mut v = vol(d.path(), size, 4096, 64 * 1024);
    let view = ChangeLogView::open(v.log.path()).unwrap();
    let mut c = Consumer::attach(v.log.path()).unwrap();
    let mut rep = vec![0u8; size as usize];
    let blocks = (size / 4096) as usize;
    // per block: capture time of the oldest write that went to the bitmap
    // and has not been taken yet
    let mut bit_since: Vec<Option<u64>> = vec![None; blocks];
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    };
    let mut seed = 7u64;
    let mut data_after_bitmap_with_bits = 0;
    let mut seen_bitmap = false;
    for tick in 0..1000u64 {
        // 40 writes of 4 KiB per tick
        for i in 0..40u64 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let b = (seed >> 33) % blocks as u64;
            let before = view.stats().bitmap_writes;
            let t = now();
            v.write(b * 4096, 4096, tick * 100 + i);
            let st = view.stats();
            if st.bitmap_writes > before && bit_since[b as usize].is_none() {
                bit_since[b as usize] = Some(t);
            }
            if st.mode == CaptureMode::Bitmap {
                seen_bitmap = true;
            } else if seen_bitmap && st.dirty_blocks_active + st.dirty_blocks_pending > 0 {
                // a write went to the ring while bitmap bits were outstanding
                data_after_bitmap_with_bits += 1;
            }
        }
        if let Some(bound) = c.dirty_since_bound_ns() {
            for s in bit_since.iter().flatten() {
                assert!(
                    *s >= bound,
                    "bitmap bound {bound} younger than a set bit ({s})"
                );
            }
        }
        // the consumer takes one record or one block per `get`, 20 per tick:
        // half the write rate, whatever the mode
        for _ in 0..20 {
            let Some(b) = c.get(48).unwrap() else { break };
            if b.kind() == BatchKind::Bitmap {
                for &(o, l) in b.ranges() {
                    for blk in o / 4096..(o + l).div_ceil(4096) {
                        if let (Some(bound), Some(s)) =
                            (b.oldest_change_bound_ns(), bit_since[blk as usize])
                        {
                            assert!(
                                s >= bound,
                                "batch bound {bound} younger than its change {s}"
                            );
                        }
                        bit_since[blk as usize] = None;
                    }
                }
            }
            apply(&b, &v.src, &mut rep);
            c.commit(b).unwrap();
        }
    }
    let t = view.stats().transitions;
    assert!(
        t.bitmap_sweep_exits >= 3 && t.data_to_metadata + t.data_to_bitmap >= 3,
        "the log did not cycle back to data mode under load: {t:?}"
    );
    assert!(data_after_bitmap_with_bits > 0, "{t:?}");
    assert!(view.stats().bitmap_sweeps >= 3);
    drain(&mut c, &v.src, &mut rep, u64::MAX);
    assert!(rep == v.src, "replica differs");
    assert!(view.dirty_ranges().is_empty());
}

/// `ChangeLogView::first_record` is the record `records()` yields first (the
/// oldest not committed), from one header read: it moves on as batches are
/// committed, not when they are only taken, and is `None` once drained.
#[test]
fn first_record_is_the_oldest_uncommitted_one() {
    let d = tmpdir();
    let mut v = vol(d.path(), 4 * MIB, 4096, 1 << 20);
    let view = ChangeLogView::open(v.log.path()).unwrap();
    assert!(view.first_record().is_none(), "empty ring");
    for i in 0..8u64 {
        v.write(i * 8192, 4096, i + 1);
    }
    let mut c = Consumer::attach(v.log.path()).unwrap();
    let mut committed = 0;
    loop {
        let all: Vec<_> = view.records().collect();
        let first = view.first_record();
        assert_eq!(first.as_ref().map(|r| r.pos), all.first().map(|r| r.pos));
        assert_eq!(first.as_ref().map(|r| r.seq), all.first().map(|r| r.seq));
        assert_eq!(
            first.as_ref().map(|r| r.timestamp_ns),
            all.first().map(|r| r.timestamp_ns)
        );
        // Two records per batch: taking one does not move the first record.
        let Some(b) = c.get(2 * 4096).unwrap() else {
            break;
        };
        assert_eq!(view.first_record().map(|r| r.pos), first.map(|r| r.pos));
        committed += b.records().len();
        c.commit(b).unwrap();
    }
    assert_eq!(committed, 8);
    assert!(view.first_record().is_none(), "drained");
}

/// Buffers handed back with `recycle` carry the next data records' payloads
/// (same allocations, contents replaced exactly, shorter or longer than
/// before); zero records and tags never take one.
#[test]
fn recycled_buffers_carry_the_next_payloads() {
    let d = tmpdir();
    let mut v = vol(d.path(), 4 * MIB, 4096, 1 << 20);
    let mut c = Consumer::attach(v.log.path()).unwrap();
    for i in 0..4u64 {
        v.write(i * 65536, 8192, i + 1);
    }
    let mut b = c.get(1 << 20).unwrap().expect("batch");
    assert_eq!(b.records().len(), 4);
    let mut spent: Vec<Vec<u8>> = b
        .records_mut()
        .iter_mut()
        .map(|r| std::mem::take(&mut r.data))
        .collect();
    c.commit(b).unwrap();
    for s in &mut spent {
        s.fill(0xEE); // stale contents must never show through
    }
    let ptrs: Vec<*const u8> = spent.iter().map(|s| s.as_ptr()).collect();
    c.recycle(spent);

    v.zero(0, 4096);
    v.write(100 * 4096, 4096, 50); // shorter than the recycled buffers
    v.write(200 * 4096, 12288, 51); // longer: the allocation grows
    v.log.insert_tag("t", TagType::User, [1; 16]).unwrap();
    v.write(300 * 4096, 4096, 52);
    let b = c.get(1 << 20).unwrap().expect("batch");
    let recs = b.records();
    assert_eq!(recs.len(), 5);
    let mut reused = 0;
    for r in recs {
        match r.kind {
            RecordKind::Data => {
                let want = &v.src[r.offset as usize..(r.offset + r.len) as usize];
                assert_eq!(r.data.len() as u64, r.len);
                assert!(r.data == want, "payload at {} differs", r.offset);
                reused += usize::from(ptrs.contains(&r.data.as_ptr()));
            }
            _ => assert!(r.data.is_empty(), "{:?} carries no payload", r.kind),
        }
    }
    assert!(
        reused >= 2,
        "recycled allocations reused: {reused} of 3 data records"
    );
    c.commit(b).unwrap();
}
