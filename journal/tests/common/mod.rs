//! Deterministic chunks and their byte model, shared by the journal's
//! integration tests (`target.rs`, `sidecar.rs`).

#![allow(dead_code)] // each test binary uses its own subset

use journal::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Volume size of the small test volumes.
pub const VOL: u64 = 64 * 1024;

/// Small spool files and segments, so rotation and reclaim happen often.
pub fn small_opts() -> TargetOptions {
    TargetOptions {
        spool_budget_bytes: 1 << 30,
        min_free_bytes: 16 << 20,
        spool_file_size: 16 * 1024,
        segment_size: 32 * 1024,
        undo_compression: UndoCompression::Lz4,
        apply_batch_chunks: 4,
        apply_batch_bytes: 64 * 1024,
        cache_bytes: 8 * 1024,
        direct_apply: false,
    }
}

/// Deterministic chunk for sequence number `k` (ordered, one seq per chunk):
/// 1–4 extents of zeroes, compressible or random data.
pub fn chunk(k: u64) -> ChunkIn {
    let mut r = StdRng::seed_from_u64(k * 7919 + 1);
    let n = r.gen_range(1..=4);
    let mut extents = Vec::new();
    for _ in 0..n {
        let len = r.gen_range(1..=16u64) * 512;
        let off = r.gen_range(0..(VOL - len) / 512) * 512;
        let data = match r.gen_range(0..4) {
            0 => ExtentData::Zero(len),
            1 => ExtentData::Data(vec![(k % 251) as u8; len as usize].into()),
            _ => ExtentData::Data((0..len).map(|_| r.gen()).collect()),
        };
        extents.push(ChunkExtent { offset: off, data });
    }
    ChunkIn {
        first_seq: k,
        last_seq: k,
        source_time_ns: 1_000_000 + k * 1000,
        horizon_seq: 0,
        extents,
    }
}

/// Apply `c` to the byte image `img`.
pub fn apply_model(img: &mut [u8], c: &ChunkIn) {
    for e in &c.extents {
        let o = e.offset as usize;
        match &e.data {
            ExtentData::Data(d) => img[o..o + d.len()].copy_from_slice(d),
            ExtentData::Zero(n) => img[o..o + *n as usize].fill(0),
        }
    }
}

/// Model state after chunks 1..=s on a zeroed volume.
pub fn model(s: u64) -> Vec<u8> {
    let mut img = vec![0u8; VOL as usize];
    for k in 1..=s {
        apply_model(&mut img, &chunk(k));
    }
    img
}
