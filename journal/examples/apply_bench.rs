//! Spool + apply throughput on this machine.
//!
//! `cargo run --release -p journal --example apply_bench -- [dir] [MiB] [off|lz4|zstd:LEVEL|LEVEL] [chunk-KiB] [compressible 0..100]`
//!
//! Pre-fills the replica with random data (so undo data is real, not zero), then
//! spools `MiB` of chunks of random 4 KiB–64 KiB writes and applies them, printing
//! MB/s and CPU cycles per byte (from getrusage and the nominal CPU clock).

use journal::*;
use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};
use std::path::PathBuf;
use std::time::Instant;

fn cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage struct.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

fn cpu_hz() -> f64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(2000.0)
        * 1e6
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let dir = PathBuf::from(
        a.get(1)
            .cloned()
            .unwrap_or_else(|| "/tmp/journal-bench".into()),
    );
    let mib: u64 = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(256);
    let undo_compression: UndoCompression = match a.get(3).map(String::as_str) {
        Some(s) if s.parse::<i32>().is_ok() => format!("zstd:{s}").parse().expect("zstd level"),
        Some(s) => s.parse().expect("off, lz4, zstd:LEVEL or a zstd level"),
        None => UndoCompression::Lz4,
    };
    let chunk_kib: u64 = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let compressible: u32 = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(50);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let size: u64 = 1 << 30;
    let mut rng = StdRng::seed_from_u64(1);
    // pre-fill the replica with random bytes
    {
        let mut f = std::fs::File::create(dir.join("replica.img")).expect("replica");
        let mut buf = vec![0u8; 4 << 20];
        use std::io::Write;
        for _ in 0..(size / buf.len() as u64) {
            rng.fill_bytes(&mut buf);
            f.write_all(&buf).expect("fill");
        }
        f.sync_all().expect("sync");
    }
    let opts = TargetOptions {
        undo_compression,
        ..TargetOptions::default()
    };
    let mut v = TargetVolume::create_with(
        &dir.join("t"),
        VolumeIdentity {
            name: "bench".into(),
            uuid: [7; 16],
            generation: 1,
            size,
            block_size: 4096,
        },
        &dir.join("replica.img"),
        opts,
    )
    .expect("create");
    // build chunks
    let total = mib << 20;
    let mut chunks = Vec::new();
    let mut made = 0u64;
    let mut seq = 0;
    while made < total {
        let mut extents = Vec::new();
        let mut cb = 0;
        while cb < chunk_kib * 1024 {
            let len = rng.gen_range(1..=16u64) * 4096;
            let off = rng.gen_range(0..(size - len) / 4096) * 4096;
            let mut d = vec![0u8; len as usize];
            if rng.gen_range(0..100) < compressible {
                // text-like, compressible
                for (i, b) in d.iter_mut().enumerate() {
                    *b = b"the quick brown fox jumps over the lazy dog "[i % 44];
                }
            } else {
                rng.fill_bytes(&mut d);
            }
            extents.push(ChunkExtent {
                offset: off,
                data: ExtentData::Data(d.into()),
            });
            cb += len;
        }
        seq += 1;
        made += cb;
        chunks.push(ChunkIn {
            first_seq: seq,
            last_seq: seq,
            source_time_ns: seq,
            horizon_seq: 0,
            extents,
        });
    }
    let mut groups: Vec<Vec<ChunkIn>> = Vec::new();
    let mut it = chunks.into_iter().peekable();
    while it.peek().is_some() {
        groups.push(it.by_ref().take(8).collect());
    }
    let c0 = cpu_secs();
    let t0 = Instant::now();
    for g in groups {
        v.spool_many_owned(g).expect("spool");
    }
    let spool_s = t0.elapsed().as_secs_f64();
    let spool_cpu = cpu_secs() - c0;
    let c1 = cpu_secs();
    let t1 = Instant::now();
    let applied = v.apply_all().expect("apply");
    let apply_s = t1.elapsed().as_secs_f64();
    let apply_cpu = cpu_secs() - c1;
    let c = v.counters();
    let mb = made as f64 / 1e6;
    let hz = cpu_hz();
    println!(
        "data {:.0} MB in {} chunks of ~{} KiB ({}% compressible extents), undo compression {}",
        mb, applied.chunks, chunk_kib, compressible, undo_compression
    );
    println!(
        "spool: {:.0} MB/s wall, {:.1} CPU cycles/byte",
        mb / spool_s,
        spool_cpu * hz / made as f64
    );
    println!(
        "apply: {:.0} MB/s wall, {:.1} CPU cycles/byte",
        mb / apply_s,
        apply_cpu * hz / made as f64
    );
    println!(
        "target total: {:.1} CPU cycles per replicated byte; replica reads {} ({} B), writes {} ({} B), journal {} B (undo raw {} -> stored {}), fsyncs {}",
        (spool_cpu + apply_cpu) * hz / made as f64,
        c.replica_reads,
        c.replica_read_bytes,
        c.replica_writes,
        c.replica_write_bytes,
        c.journal_write_bytes,
        c.undo_raw_bytes,
        c.undo_stored_bytes,
        c.fsyncs
    );
    drop(v);
    let _ = std::fs::remove_dir_all(&dir);
}
