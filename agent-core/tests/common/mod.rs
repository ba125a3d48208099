#![allow(dead_code)]
//! Helpers shared by the integration tests.

use std::path::Path;
use std::time::Duration;

use agent_core::{Batch, BatchKind, ChangeLogConfig, Consumer, RecordKind};

pub fn cfg(
    dir: &Path,
    name: &str,
    volume_size: u64,
    block_size: u32,
    ring_bytes: u64,
) -> ChangeLogConfig {
    let mut c = ChangeLogConfig::new(name, volume_size);
    c.shm_dir = dir.join("shm");
    c.state_dir = dir.join("state");
    c.block_size = block_size;
    c.ring_bytes = ring_bytes;
    c.persist_interval = Duration::from_secs(3600);
    c
}

/// Applies `b` to `replica`, reading Metadata / bitmap ranges from `source`
/// (at apply time, i.e. after the batch was taken).
pub fn apply(b: &Batch, source: &[u8], replica: &mut [u8]) {
    match b.kind() {
        BatchKind::Ring => {
            for r in b.records() {
                let (o, l) = (r.offset as usize, r.len as usize);
                match r.kind {
                    RecordKind::Data => replica[o..o + l].copy_from_slice(&r.data),
                    RecordKind::Metadata => replica[o..o + l].copy_from_slice(&source[o..o + l]),
                    RecordKind::Zero => replica[o..o + l].fill(0),
                    RecordKind::Tag => {}
                }
            }
        }
        BatchKind::Bitmap => {
            for &(o, l) in b.ranges() {
                let (o, l) = (o as usize, l as usize);
                replica[o..o + l].copy_from_slice(&source[o..o + l]);
            }
        }
    }
}

/// Drains everything (get / apply / commit until `get` returns None).
pub fn drain(c: &mut Consumer, source: &[u8], replica: &mut [u8], max_bytes: u64) -> usize {
    let mut n = 0;
    // A bitmap rescan happens at most every 500 ms when counters say 0; the
    // counters are exact in these tests, so one None means empty.
    while let Some(b) = c.get(max_bytes).expect("get") {
        apply(&b, source, replica);
        c.commit(b).expect("commit");
        n += 1;
    }
    n
}

/// Deterministic pseudo-random bytes.
pub fn fill(buf: &mut [u8], mut seed: u64) {
    for chunk in buf.chunks_mut(8) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let b = seed.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
}

/// A temporary directory, on tmpfs when available (the tests fsync a lot).
pub fn tmpdir() -> tempfile::TempDir {
    if std::path::Path::new("/dev/shm").is_dir() {
        if let Ok(d) = tempfile::tempdir_in("/dev/shm") {
            return d;
        }
    }
    tempfile::tempdir().expect("tempdir")
}
