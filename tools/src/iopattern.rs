//! I/O pattern of the writes arriving at the target (`cdpcli --iopattern`):
//! a histogram of write sizes (512 B … 4 MiB, and larger) split into random
//! and sequential, per volume, since the target daemon started.
//!
//! The target records every ordered chunk it spools (resync data, which is
//! not application I/O, is left out). Sizes are those of the extents as
//! shipped: the replicator coalesces adjacent writes, so a run of small
//! sequential writes can appear as one larger write. A write is sequential
//! when it starts where the previous one of the same volume ended. Reads
//! never reach the target and are not counted.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use replicator::target::StoreChunk;
use serde::{Deserialize, Serialize};

/// Upper bounds (inclusive) of the size buckets; a last bucket holds larger writes.
pub const BUCKETS: [u64; 14] = [
    512,
    1 << 10,
    2 << 10,
    4 << 10,
    8 << 10,
    16 << 10,
    32 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    512 << 10,
    1 << 20,
    2 << 20,
    4 << 20,
];

/// One size bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Writes up to this size (bytes); `None`: larger than the last bound.
    pub up_to: Option<u64>,
    /// Random writes.
    pub random: u64,
    /// Sequential writes.
    pub sequential: u64,
}

/// The write pattern of one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoPattern {
    /// Buckets, smallest first (`BUCKETS.len() + 1` of them).
    pub buckets: Vec<Bucket>,
    /// Writes counted.
    pub writes: u64,
    /// Bytes written.
    pub bytes: u64,
    /// End offset of the last write (for the sequential test).
    pub last_end: u64,
}

impl Default for IoPattern {
    fn default() -> Self {
        let mut buckets: Vec<Bucket> = BUCKETS
            .iter()
            .map(|&b| Bucket {
                up_to: Some(b),
                ..Bucket::default()
            })
            .collect();
        buckets.push(Bucket::default());
        IoPattern {
            buckets,
            writes: 0,
            bytes: 0,
            last_end: u64::MAX,
        }
    }
}

impl IoPattern {
    /// Counts one write.
    pub fn record(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let i = BUCKETS
            .iter()
            .position(|&b| len <= b)
            .unwrap_or(BUCKETS.len());
        if let Some(b) = self.buckets.get_mut(i) {
            if offset == self.last_end {
                b.sequential += 1;
            } else {
                b.random += 1;
            }
        }
        self.writes += 1;
        self.bytes += len;
        self.last_end = offset.saturating_add(len);
    }
}

fn board() -> &'static Mutex<HashMap<String, IoPattern>> {
    static B: OnceLock<Mutex<HashMap<String, IoPattern>>> = OnceLock::new();
    B.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Records the writes of spooled chunks of `volume` (ordered chunks only).
pub fn record_chunks(volume: &str, chunks: &[StoreChunk]) {
    let mut b = board().lock().unwrap_or_else(|e| e.into_inner());
    let p = b.entry(volume.to_owned()).or_default();
    for c in chunks.iter().filter(|c| c.is_ordered()) {
        for e in &c.extents {
            p.record(e.offset, e.data.len());
        }
    }
}

/// The pattern of `volume` so far in this process.
pub fn get(volume: &str) -> Option<IoPattern> {
    board()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(volume)
        .cloned()
}

/// `512 B`, `4 KiB`, `1 MiB` labels.
pub fn size_label(b: Option<u64>) -> String {
    match b {
        None => format!("> {}", size_label(BUCKETS.last().copied())),
        Some(v) if v >= 1 << 20 => format!("{} MiB", v >> 20),
        Some(v) if v >= 1 << 10 => format!("{} KiB", v >> 10),
        Some(v) => format!("{v} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_sequential() {
        let mut p = IoPattern::default();
        p.record(0, 4096);
        p.record(4096, 4096);
        p.record(1 << 20, 512);
        p.record(10 << 20, 5 << 20);
        p.record(0, 0);
        let b4k = &p.buckets[3];
        assert_eq!((b4k.up_to, b4k.random, b4k.sequential), (Some(4096), 1, 1));
        assert_eq!(p.buckets[0].random, 1);
        assert_eq!(p.buckets[BUCKETS.len()].random, 1);
        assert_eq!(p.writes, 4);
        assert_eq!(size_label(None), "> 4 MiB");
        assert_eq!(size_label(Some(512)), "512 B");
    }
}
