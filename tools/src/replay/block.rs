//! Self-verifying 4 KiB blocks (format v1, documented in
//! `vendor-docs/trace-formats.md`).
//!
//! Layout (little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `RWRPLY01` |
//! | 8..16 | byte offset the block was written to |
//! | 16..24 | sequence number of the write (trace position, 1-based) |
//! | 24..28 | writer id |
//! | 28..32 | run id (random per replay run) |
//! | 32..48 | first 16 bytes of blake3 over bytes 0..32 and 48..4096 |
//! | 48..4096 | pseudo-random payload derived from (run, offset, seq) |
//!
//! A block is therefore self-describing: reading it back tells where it was
//! meant to be, which write produced it and whether it is intact, so a
//! misplaced, stale, torn or foreign block is named without a reference copy.

/// Size of a self-verifying block.
pub const BLOCK: u64 = 4096;
const MAGIC: &[u8; 8] = b"RWRPLY01";

/// The identity of a block's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Stamp {
    /// Byte offset the block belongs to.
    pub offset: u64,
    /// Sequence number of the write (trace position).
    pub seq: u64,
    /// Writer id.
    pub writer: u32,
    /// Replay run id.
    pub run: u32,
}

fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn checksum(b: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(&b[0..32]);
    h.update(&b[48..BLOCK as usize]);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

/// Writes the block for `s` into `out` (exactly [`BLOCK`] bytes).
pub fn encode(s: &Stamp, out: &mut [u8]) {
    debug_assert_eq!(out.len(), BLOCK as usize);
    out[0..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&s.offset.to_le_bytes());
    out[16..24].copy_from_slice(&s.seq.to_le_bytes());
    out[24..28].copy_from_slice(&s.writer.to_le_bytes());
    out[28..32].copy_from_slice(&s.run.to_le_bytes());
    fill(
        &mut out[48..],
        s.offset ^ s.seq.rotate_left(32) ^ u64::from(s.run).rotate_left(16),
    );
    let c = checksum(out);
    out[32..48].copy_from_slice(&c);
}

/// What a block read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// All zeroes.
    Zero,
    /// An intact replay block.
    Block(Stamp),
    /// Has the magic but the checksum does not match (torn or corrupted).
    Torn,
    /// Neither zero nor a replay block (content from before the replay).
    Foreign,
}

/// Decodes a block read back (any length other than [`BLOCK`] is foreign).
pub fn decode(b: &[u8]) -> Found {
    if b.len() != BLOCK as usize {
        return Found::Foreign;
    }
    if b.iter().all(|&x| x == 0) {
        return Found::Zero;
    }
    if &b[0..8] != MAGIC {
        return Found::Foreign;
    }
    if checksum(b)[..] != b[32..48] {
        return Found::Torn;
    }
    let u64at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    let u32at = |i: usize| {
        let mut a = [0u8; 4];
        a.copy_from_slice(&b[i..i + 4]);
        u32::from_le_bytes(a)
    };
    Found::Block(Stamp {
        offset: u64at(8),
        seq: u64at(16),
        writer: u32at(24),
        run: u32at(28),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let s = Stamp {
            offset: 8192,
            seq: 42,
            writer: 3,
            run: 7,
        };
        let mut b = vec![0u8; BLOCK as usize];
        encode(&s, &mut b);
        assert_eq!(decode(&b), Found::Block(s));
        let mut torn = b.clone();
        torn[2048..].fill(0);
        assert_eq!(decode(&torn), Found::Torn);
        let mut flip = b.clone();
        flip[4000] ^= 1;
        assert_eq!(decode(&flip), Found::Torn);
        assert_eq!(decode(&vec![0u8; 4096]), Found::Zero);
        assert_eq!(decode(&vec![1u8; 4096]), Found::Foreign);
        assert_eq!(decode(&b[..100]), Found::Foreign);
        let mut other = vec![0u8; BLOCK as usize];
        encode(&Stamp { seq: 43, ..s }, &mut other);
        assert_ne!(b[48..], other[48..], "payload depends on the sequence");
    }
}
