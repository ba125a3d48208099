//! Journal benchmark, every figure measured against a peer in the same run
//! (driven by `scripts/bench-journal`, which adds `cp`/`dd` peers).
//!
//! `cargo run --release -p journal --example journal_bench -- DIR [MiB] [records]`
//!
//! 1. I/O per changed byte and apply throughput, spool mode and direct mode,
//!    vs a raw writer doing the same random writes with the same fdatasync
//!    cadence on the same filesystem.
//! 2. vsnap creation time with a journal of `records` undo records (default
//!    1,000,000): in-process (`TargetVolume::snapshot`) and from the directory
//!    (`SnapshotView::open_dir`), plus the open time of the volume; both
//!    again with the index sidecars moved aside (the scan they replace).
//! 3. vsnap sequential read throughput vs a sequential read of the replica.
//! 4. materialize throughput (the script times `cp`/`dd` of the replica).
//!
//! `MiB` = 0 runs only part 2; `JOURNAL_BENCH_KEEP=1` keeps the part-2 journal
//! under `DIR/many` and reuses it in the next run (no rebuild). The journal is
//! laid out as `rewind target --dir DIR/many/vols` expects it (volume
//! `bench2`: `vols/bench2/journal` and `vols/bench2/replica.img`), so the
//! script can time the operator's `rewind snapshot create` on the same
//! journal (`tools/examples/snapshot_cli_bench.rs`).
//!
//! Output: `key value` lines (parsed by the script).

use journal::*;
use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn ident(size: u64, n: u8) -> VolumeIdentity {
    VolumeIdentity {
        name: format!("bench{n}"),
        uuid: [n; 16],
        generation: 1,
        size,
        block_size: 4096,
    }
}

fn fill_random(p: &Path, size: u64, rng: &mut StdRng) {
    let f = File::create(p).expect("create");
    let mut buf = vec![0u8; 4 << 20];
    let mut o = 0;
    while o < size {
        rng.fill_bytes(&mut buf);
        let n = (size - o).min(buf.len() as u64) as usize;
        f.write_all_at(&buf[..n], o).expect("write");
        o += n as u64;
    }
    f.sync_all().expect("sync");
}

/// Random 4–64 KiB writes (half compressible) grouped in 1 MiB chunks.
fn workload(size: u64, mib: u64, seed: u64) -> Vec<ChunkIn> {
    let mut r = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut total = 0u64;
    let mut seq = 0u64;
    while total < mib << 20 {
        let mut extents = Vec::new();
        let mut cb = 0u64;
        while cb < 1 << 20 {
            let len = r.gen_range(1..=16u64) * 4096;
            let off = r.gen_range(0..(size - len) / 4096) * 4096;
            let mut d = vec![0u8; len as usize];
            if r.gen_bool(0.5) {
                r.fill_bytes(&mut d);
            } else {
                d.iter_mut()
                    .enumerate()
                    .for_each(|(i, b)| *b = (i / 64) as u8);
            }
            cb += len;
            extents.push(ChunkExtent {
                offset: off,
                data: ExtentData::Data(d.into()),
            });
        }
        seq += 1;
        total += cb;
        out.push(ChunkIn {
            first_seq: seq,
            last_seq: seq,
            source_time_ns: seq * 1000,
            horizon_seq: 0,
            extents,
        });
    }
    out
}

fn mbs(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

fn apply_run(dir: &Path, size: u64, chunks: &[ChunkIn], direct: bool, tag: &str) {
    let d = dir.join(tag);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    let mut rng = StdRng::seed_from_u64(9);
    fill_random(&d.join("replica.img"), size, &mut rng);
    let opts = TargetOptions {
        direct_apply: direct,
        ..TargetOptions::default()
    };
    let mut v =
        TargetVolume::create_with(&d.join("t"), ident(size, 1), &d.join("replica.img"), opts)
            .expect("create");
    let t0 = Instant::now();
    for g in chunks.chunks(8) {
        v.spool_many_owned(g.to_vec()).expect("spool");
        if !direct {
            // keep apply up with receipt, like the daemon's apply task
            v.apply_all().expect("apply");
        }
    }
    v.apply_all().expect("apply");
    let secs = t0.elapsed().as_secs_f64();
    let c = v.counters();
    let changed = c.applied_bytes as f64;
    println!("{tag}.changed_bytes {}", c.applied_bytes);
    println!("{tag}.secs {secs:.3}");
    println!("{tag}.mbs {:.1}", mbs(c.applied_bytes, secs));
    println!(
        "{tag}.replica_read_per_byte {:.3}",
        c.replica_read_bytes as f64 / changed
    );
    println!(
        "{tag}.replica_write_per_byte {:.3}",
        c.replica_write_bytes as f64 / changed
    );
    println!(
        "{tag}.journal_write_per_byte {:.3}",
        c.journal_write_bytes as f64 / changed
    );
    println!(
        "{tag}.spool_write_per_byte {:.3}",
        c.spooled_bytes as f64 / changed
    );
    println!(
        "{tag}.undo_stored_per_byte {:.3}",
        c.undo_stored_bytes as f64 / changed
    );
    println!("{tag}.fsyncs {}", c.fsyncs);
    drop(v);
    let _ = std::fs::remove_dir_all(&d);
}

/// The raw peer: the same writes to a file on the same filesystem, one
/// fdatasync per 8 chunks (what the journal does per spool call + batch).
fn raw_run(dir: &Path, size: u64, chunks: &[ChunkIn]) {
    let p = dir.join("raw.img");
    let mut rng = StdRng::seed_from_u64(9);
    fill_random(&p, size, &mut rng);
    let f = OpenOptions::new().write(true).open(&p).expect("open");
    let t0 = Instant::now();
    let mut bytes = 0u64;
    for g in chunks.chunks(8) {
        for c in g {
            for e in &c.extents {
                if let ExtentData::Data(d) = &e.data {
                    f.write_all_at(d, e.offset).expect("write");
                    bytes += d.len() as u64;
                }
            }
        }
        f.sync_data().expect("sync");
    }
    let secs = t0.elapsed().as_secs_f64();
    println!("raw.secs {secs:.3}");
    println!("raw.mbs {:.1}", mbs(bytes, secs));
    let _ = std::fs::remove_file(&p);
}

/// A journal of `records` undo records (one 512-byte write each, 64 MiB volume),
/// then: open time, vsnap creation in-process and from the directory.
fn vsnap_creation(dir: &Path, records: u64) {
    let d = dir.join("many");
    let size = 64u64 << 20;
    let opts = TargetOptions {
        undo_compression: UndoCompression::Off,
        ..TargetOptions::default()
    };
    // JOURNAL_BENCH_KEEP=1: keep the journal and reuse it in the next run
    // (iterating on open times without rebuilding 10^6 records).
    let keep = std::env::var_os("JOURNAL_BENCH_KEEP").is_some();
    let jdir = many_journal(&d);
    if !(keep && jdir.join("identity").exists()) {
        build_many(&d, size, records, &opts);
    }
    let t = Instant::now();
    let v = TargetVolume::open_with(&jdir, opts.clone()).expect("open");
    println!("many.open_ms {:.1}", t.elapsed().as_secs_f64() * 1e3);
    let records = v.counters().journal_records;
    let mut worst = 0f64;
    for s in [1, records / 2, records - 1] {
        let t = Instant::now();
        let view = v.snapshot(&RecoveryPoint::Seq(s)).expect("snapshot");
        worst = worst.max(t.elapsed().as_secs_f64() * 1e3);
        let mut b = [0u8; 4096];
        view.read_at(&mut b, 0).expect("read");
    }
    println!("many.vsnap_create_ms {worst:.3}");
    let t = Instant::now();
    let view = SnapshotView::open_dir(&jdir, &RecoveryPoint::Seq(records / 2)).expect("open_dir");
    println!(
        "many.vsnap_open_dir_ms {:.1}",
        t.elapsed().as_secs_f64() * 1e3
    );
    let l = view.index_load();
    println!("many.sealed_segments {}", v.counters().journal_segments - 1);
    println!("many.sidecar_segments {}", l.sidecar_segments);
    println!("many.scanned_segments {}", l.scanned_segments);
    // random 4 KiB reads through the view with a big journal
    let t = Instant::now();
    let mut b = [0u8; 4096];
    let n = 2000;
    for i in 0..n {
        let off = (i * 7919 % (size / 4096)) * 4096;
        view.read_at(&mut b, off).expect("read");
    }
    println!(
        "many.view_4k_read_us {:.1}",
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    drop(view);
    drop(v);
    // The peer in the same run: the same journal without index sidecars (the
    // scan every segment needed before them). Open writes them back.
    let jd = jdir.join("journal");
    let mut moved = Vec::new();
    for e in std::fs::read_dir(&jd).expect("readdir") {
        let p = e.expect("entry").path();
        if p.extension().is_some_and(|x| x == "idx") {
            let q = p.with_extension("idx.aside");
            std::fs::rename(&p, &q).expect("move sidecar");
            moved.push(q);
        }
    }
    let t = Instant::now();
    let view = SnapshotView::open_dir(&jdir, &RecoveryPoint::Seq(records / 2)).expect("open_dir");
    println!(
        "many.vsnap_open_dir_scan_ms {:.1}",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(view.index_load().sidecar_segments, 0);
    drop(view);
    let t = Instant::now();
    let v = TargetVolume::open_with(&jdir, opts).expect("open");
    println!("many.open_scan_ms {:.1}", t.elapsed().as_secs_f64() * 1e3);
    drop(v);
    for q in moved {
        let _ = std::fs::remove_file(q);
    }
    if !keep {
        let _ = std::fs::remove_dir_all(&d);
    }
}

/// Name of the part-2 volume (its directory under `DIR/many/vols`).
const MANY_VOLUME: &str = "bench2";

/// Journal directory of the part-2 volume: `rewind target --dir d/vols`
/// finds it there (`<dir>/<volume>/journal`, replica `<dir>/<volume>/replica.img`).
fn many_journal(d: &Path) -> PathBuf {
    d.join("vols").join(MANY_VOLUME).join("journal")
}

/// Build a journal of `records` one-extent (512-byte) undo records in `d`.
fn build_many(d: &Path, size: u64, records: u64, opts: &TargetOptions) {
    let _ = std::fs::remove_dir_all(d);
    let jdir = many_journal(d);
    let vdir = jdir.parent().expect("volume dir");
    std::fs::create_dir_all(vdir).expect("mkdir");
    let mut id = ident(size, 2);
    id.name = MANY_VOLUME.to_string();
    let mut v = TargetVolume::create_with(&jdir, id, &vdir.join("replica.img"), opts.clone())
        .expect("create");
    let mut r = StdRng::seed_from_u64(5);
    let t0 = Instant::now();
    let mut batch = Vec::with_capacity(1024);
    for k in 1..=records {
        let off = r.gen_range(0..size / 512) * 512;
        batch.push(ChunkIn {
            first_seq: k,
            last_seq: k,
            source_time_ns: k * 1000,
            horizon_seq: 0,
            extents: vec![ChunkExtent {
                offset: off,
                data: ExtentData::Data(vec![(k % 251) as u8 + 1; 512].into()),
            }],
        });
        if batch.len() == 1024 {
            v.spool_many_owned(std::mem::take(&mut batch))
                .expect("spool");
            v.apply_all().expect("apply");
        }
    }
    v.spool_many_owned(batch).expect("spool");
    v.apply_all().expect("apply");
    println!("many.records {}", v.counters().journal_records);
    println!("many.build_secs {:.1}", t0.elapsed().as_secs_f64());
}

/// vsnap sequential read vs replica read, and materialize throughput.
fn read_and_materialize(dir: &Path, size: u64, chunks: &[ChunkIn]) {
    let d = dir.join("read");
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("mkdir");
    let mut rng = StdRng::seed_from_u64(9);
    fill_random(&d.join("replica.img"), size, &mut rng);
    let mut v = TargetVolume::create_with(
        &d.join("t"),
        ident(size, 3),
        &d.join("replica.img"),
        TargetOptions::default(),
    )
    .expect("create");
    for g in chunks.chunks(8) {
        v.spool_many_owned(g.to_vec()).expect("spool");
    }
    v.apply_all().expect("apply");
    let mid = chunks.len() as u64 / 2;
    let view = v.snapshot(&RecoveryPoint::Seq(mid)).expect("view");
    let mut buf = vec![0u8; 1 << 20];
    let replica = File::open(d.join("replica.img")).expect("open");
    // warm both paths once (page cache), then time
    let seq_replica = |buf: &mut [u8]| {
        let t = Instant::now();
        let mut o = 0;
        while o < size {
            replica.read_exact_at(buf, o).expect("read");
            o += buf.len() as u64;
        }
        t.elapsed().as_secs_f64()
    };
    let seq_view = |buf: &mut [u8]| {
        let t = Instant::now();
        let mut o = 0;
        while o < size {
            view.read_at(buf, o).expect("read");
            o += buf.len() as u64;
        }
        t.elapsed().as_secs_f64()
    };
    seq_replica(&mut buf);
    seq_view(&mut buf);
    let tr = seq_replica(&mut buf);
    let tv = seq_view(&mut buf);
    println!("read.undo_records_overlaid {}", chunks.len() as u64 - mid);
    println!("read.replica_mbs {:.1}", mbs(size, tr));
    println!("read.vsnap_mbs {:.1}", mbs(size, tv));
    let out = d.join("materialized.img");
    let t = Instant::now();
    let st = view.materialize(&out, |_, _| {}).expect("materialize");
    let secs = t.elapsed().as_secs_f64();
    println!("mat.mbs {:.1}", mbs(st.bytes, secs));
    println!("mat.secs {secs:.3}");
    println!("mat.path {}", out.display());
    println!("mat.replica {}", d.join("replica.img").display());
    // left for the script's cp/dd peers; it deletes DIR at the end
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        a.get(1)
            .cloned()
            .unwrap_or_else(|| "/tmp/journal-bench".into()),
    );
    let mib: u64 = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    let records: u64 = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let size = 1u64 << 30;
    // MiB = 0: only the vsnap-creation / open figures (section 2)
    if mib > 0 {
        let chunks = workload(size, mib, 1);
        raw_run(&dir, size, &chunks);
        apply_run(&dir, size, &chunks, false, "spool");
        apply_run(&dir, size, &chunks, true, "direct");
        read_and_materialize(&dir, size, &chunks);
    }
    if records > 0 {
        vsnap_creation(&dir, records);
    }
}
