//! The oracle: a model of what the replay wrote, block by block, with the
//! history of every block so the expected content at any earlier point
//! (a bookmark, a sampled time) is known without re-reading anything.
//!
//! The model is updated in issue order. The replay engine never has two
//! overlapping write-like requests in flight, so for every block the issue
//! order is also the order the writes reached the volume.
//!
//! It also keeps an incremental content digest: the XOR of
//! `blake3(offset ‖ content)[..16]` over every block touched so far (a
//! trimmed block counts as zeroes), updated per write, so the expected
//! digest at a bookmark costs O(1).

use std::collections::HashMap;

use super::block::{self, Found, Stamp, BLOCK};

/// State of one block after a write-like operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Written with a self-verifying block by `writer`.
    Data {
        /// Writer id.
        writer: u32,
    },
    /// Zeroed (WRITE_ZEROES).
    Zero,
    /// Discarded: zeroes, or (if the server ignored the discard) the previous content.
    Trimmed,
}

#[derive(Debug, Clone, Copy)]
struct Version {
    seq: u64,
    state: State,
    hash: [u8; 16],
}

/// One mismatch between what was read and what should be there.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Mismatch {
    /// Byte offset of the block.
    pub offset: u64,
    /// What should be there (the write, with its trace line).
    pub expected: String,
    /// What was found.
    pub found: String,
}

/// Content digest (XOR of per-block hashes).
pub type Digest = [u8; 16];

/// Hex form of a digest.
pub fn hex(d: &Digest) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hash of one block's content at `offset` (the digest's unit).
pub fn block_hash(offset: u64, content: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(&offset.to_le_bytes());
    h.update(content);
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    out
}

fn xor(a: &mut Digest, b: &[u8; 16]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= y;
    }
}

/// The model of the volume as written by one replay run.
#[derive(Debug)]
pub struct Model {
    run: u32,
    blocks: HashMap<u64, Vec<Version>>,
    /// trace line of each sequence number (index seq-1)
    lines: Vec<u32>,
    digest: Digest,
    zero: Vec<u8>,
    scratch: Vec<u8>,
}

impl Model {
    /// An empty model for replay run `run`.
    pub fn new(run: u32) -> Model {
        Model {
            run,
            blocks: HashMap::new(),
            lines: Vec::new(),
            digest: [0; 16],
            zero: vec![0; BLOCK as usize],
            scratch: vec![0; BLOCK as usize],
        }
    }

    /// The run id stamped into blocks.
    pub fn run(&self) -> u32 {
        self.run
    }

    /// The stamp a write of sequence `seq` by `writer` puts at `offset`.
    pub fn stamp(&self, offset: u64, seq: u64, writer: u32) -> Stamp {
        Stamp {
            offset,
            seq,
            writer,
            run: self.run,
        }
    }

    /// Records that sequence number `seq` comes from trace line `line`
    /// (sequence numbers are 1-based and assigned in order).
    pub fn note_line(&mut self, seq: u64, line: usize) {
        let i = seq.saturating_sub(1) as usize;
        if self.lines.len() <= i {
            self.lines.resize(i + 1, 0);
        }
        self.lines[i] = line.min(u32::MAX as usize) as u32;
    }

    fn line(&self, seq: u64) -> u32 {
        self.lines
            .get(seq.saturating_sub(1) as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Applies a write-like operation `seq` over whole blocks `[first, first+n)`.
    pub fn apply(&mut self, seq: u64, first: u64, n: u64, state: State) {
        for b in first..first + n {
            let off = b * BLOCK;
            let hash = match state {
                State::Data { writer } => {
                    let s = self.stamp(off, seq, writer);
                    block::encode(&s, &mut self.scratch);
                    block_hash(off, &self.scratch)
                }
                State::Zero | State::Trimmed => block_hash(off, &self.zero),
            };
            let v = self.blocks.entry(b).or_default();
            if let Some(prev) = v.last() {
                xor(&mut self.digest, &prev.hash);
            }
            xor(&mut self.digest, &hash);
            v.push(Version { seq, state, hash });
        }
    }

    /// The current expected digest (over every block touched so far).
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// Blocks touched by writes with sequence ≤ `cutoff`, sorted.
    pub fn touched(&self, cutoff: u64) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, vs)| vs.first().is_some_and(|x| x.seq <= cutoff))
            .map(|(b, _)| *b)
            .collect();
        v.sort_unstable();
        v
    }

    /// Number of blocks touched so far.
    pub fn touched_count(&self) -> usize {
        self.blocks.len()
    }

    /// Expected digest at `cutoff`, computed from the history (for points
    /// that were not recorded as bookmarks).
    pub fn digest_at(&self, cutoff: u64) -> Digest {
        let mut d = [0u8; 16];
        for vs in self.blocks.values() {
            if let Some(v) = vs.iter().rev().find(|v| v.seq <= cutoff) {
                xor(&mut d, &v.hash);
            }
        }
        d
    }

    fn describe_expected(&self, b: u64, v: &Version) -> String {
        match v.state {
            State::Data { writer } => format!(
                "write seq {} (trace line {}, writer {writer}) at offset {}",
                v.seq,
                self.line(v.seq),
                b * BLOCK
            ),
            State::Zero => format!(
                "zeroes (write-zeroes seq {}, trace line {})",
                v.seq,
                self.line(v.seq)
            ),
            State::Trimmed => format!(
                "zeroes or the previous content (trim seq {}, trace line {})",
                v.seq,
                self.line(v.seq)
            ),
        }
    }

    fn describe_found(&self, f: &Found) -> String {
        match f {
            Found::Zero => "zeroes".into(),
            Found::Torn => "a torn or corrupted block (checksum mismatch)".into(),
            Found::Foreign => "foreign content (not written by this replay)".into(),
            Found::Block(s) if s.run != self.run => format!(
                "a block of another replay run ({:#x}, seq {})",
                s.run, s.seq
            ),
            Found::Block(s) => format!(
                "write seq {} (trace line {}, writer {}) meant for offset {}",
                s.seq,
                self.line(s.seq),
                s.writer,
                s.offset
            ),
        }
    }

    /// Checks block `b` read back as `content` against the state after
    /// sequence `cutoff`. Blocks untouched at `cutoff` always pass.
    pub fn check(&self, b: u64, cutoff: u64, content: &[u8]) -> Option<Mismatch> {
        self.check_window(b, cutoff, cutoff, content)
    }

    /// Like [`check`](Self::check) for a point known only to lie after
    /// sequence `lo` and at or before `hi`: any state of the block between
    /// the two passes.
    pub fn check_window(&self, b: u64, lo: u64, hi: u64, content: &[u8]) -> Option<Mismatch> {
        let vs = self.blocks.get(&b)?;
        let found = block::decode(content);
        let off = b * BLOCK;
        let top = vs.iter().rposition(|v| v.seq <= hi.max(lo))?;
        let base = vs.iter().rposition(|v| v.seq <= lo);
        // acceptable: versions in (lo, hi], the version at lo, and through trims the ones before it
        let accepts = |v: &Version| match (v.state, &found) {
            (State::Data { writer }, Found::Block(s)) => *s == self.stamp(off, v.seq, writer),
            (State::Zero | State::Trimmed, Found::Zero) => true,
            _ => false,
        };
        let lowest = base.unwrap_or(0);
        for v in &vs[lowest..=top] {
            if accepts(v) {
                return None;
            }
        }
        match base {
            // untouched at lo: the content from before the replay may still be there
            None if !matches!(found, Found::Block(s) if s.run == self.run) => return None,
            Some(mut i) => {
                while vs[i].state == State::Trimmed {
                    if i == 0 {
                        return None;
                    }
                    i -= 1;
                    if accepts(&vs[i]) {
                        return None;
                    }
                }
            }
            None => {}
        }
        let v = &vs[top];
        let mut found_s = self.describe_found(&found);
        if let Found::Block(s) = &found {
            if s.run == self.run {
                if s.offset != off {
                    found_s = format!("MISPLACED: {found_s}");
                } else if s.seq < v.seq {
                    found_s = format!("STALE: {found_s}");
                } else if s.seq > v.seq {
                    found_s = format!("TOO NEW (after this point): {found_s}");
                }
            }
        } else if matches!(found, Found::Torn) {
            found_s = format!("TORN: {found_s}");
        } else if matches!(found, Found::Zero) && matches!(v.state, State::Data { .. }) {
            found_s = format!("LOST: {found_s}");
        }
        let mut expected = self.describe_expected(b, v);
        if lo < hi {
            expected = format!("{expected} (or a state of the block after seq {lo})");
        }
        Some(Mismatch {
            offset: off,
            expected,
            found: found_s,
        })
    }

    /// The cutoffs `[from, to)` at which block `b` holds `content`: from the
    /// first version it matches to the next version after the last one it
    /// matches (`u64::MAX`: still current). None if it matches no state of
    /// the block at all (torn, misplaced, foreign over replayed data).
    /// Untouched blocks match everything.
    pub fn interval(&self, b: u64, content: &[u8]) -> Option<(u64, u64)> {
        let Some(vs) = self.blocks.get(&b) else {
            return Some((0, u64::MAX));
        };
        let found = block::decode(content);
        let off = b * BLOCK;
        let matches = |v: &Version| match (v.state, &found) {
            (State::Data { writer }, Found::Block(s)) => *s == self.stamp(off, v.seq, writer),
            (State::Zero | State::Trimmed, Found::Zero) => true,
            _ => false,
        };
        // before the first write: the content from before the replay (not a block of this run)
        let mut first: Option<u64> = match found {
            Found::Block(s) if s.run == self.run => None,
            _ => Some(0),
        };
        let mut last: Option<usize> = if first.is_some() {
            Some(usize::MAX)
        } else {
            None
        };
        for (i, v) in vs.iter().enumerate() {
            // a trim may leave the previous content in place: it extends that interval
            let ok = matches(v) || (v.state == State::Trimmed && last == Some(i.wrapping_sub(1)));
            if ok {
                first.get_or_insert(v.seq);
                last = Some(i);
            }
        }
        let first = first?;
        let end = match last {
            Some(usize::MAX) => vs.first().map_or(u64::MAX, |v| v.seq),
            Some(i) => vs.get(i + 1).map_or(u64::MAX, |v| v.seq),
            None => return None,
        };
        Some((first, end))
    }

    /// The newest sequence number of this run found in `content`, if any.
    pub fn seq_in(&self, content: &[u8]) -> Option<u64> {
        match block::decode(content) {
            Found::Block(s) if s.run == self.run => Some(s.seq),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blockbytes(m: &Model, off: u64, seq: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK as usize];
        block::encode(&m.stamp(off, seq, 1), &mut b);
        b
    }

    #[test]
    fn names_stale_misplaced_lost_and_torn() {
        let mut m = Model::new(9);
        for s in 1..=3 {
            m.note_line(s, s as usize * 10);
        }
        m.apply(1, 0, 2, State::Data { writer: 1 });
        m.apply(2, 1, 1, State::Data { writer: 1 });
        m.apply(3, 0, 1, State::Trimmed);
        // latest: block 0 trimmed (zero or seq 1), block 1 = seq 2
        assert!(m.check(0, 3, &[0u8; 4096]).is_none());
        assert!(m.check(0, 3, &blockbytes(&m, 0, 1)).is_none());
        assert!(m.check(1, 3, &blockbytes(&m, 4096, 2)).is_none());
        let stale = m.check(1, 3, &blockbytes(&m, 4096, 1)).unwrap();
        assert!(stale.found.starts_with("STALE"), "{stale:?}");
        assert!(stale.expected.contains("seq 2 (trace line 20"), "{stale:?}");
        // at cutoff 1 block 1 must hold seq 1; seq 2 there is too new
        let new = m.check(1, 1, &blockbytes(&m, 4096, 2)).unwrap();
        assert!(new.found.starts_with("TOO NEW"), "{new:?}");
        let mis = m.check(1, 3, &blockbytes(&m, 0, 2)).unwrap();
        assert!(mis.found.starts_with("MISPLACED"), "{mis:?}");
        let lost = m.check(1, 3, &[0u8; 4096]).unwrap();
        assert!(lost.found.starts_with("LOST"), "{lost:?}");
        let mut torn = blockbytes(&m, 4096, 2);
        torn[100] ^= 0xff;
        assert!(m.check(1, 3, &torn).unwrap().found.starts_with("TORN"));
        // untouched blocks pass; blocks touched only later pass at an earlier cutoff
        assert!(m.check(7, 3, &[1u8; 4096]).is_none());
        assert!(m.touched(0).is_empty());
        assert_eq!(m.touched(3), vec![0, 1]);
        // windows: block 1 may hold seq 1 or seq 2 between 1 and 2
        assert!(m.check_window(1, 1, 2, &blockbytes(&m, 4096, 1)).is_none());
        assert!(m.check_window(1, 1, 2, &blockbytes(&m, 4096, 2)).is_none());
        assert!(m.check_window(1, 2, 3, &blockbytes(&m, 4096, 1)).is_some());
        // untouched before the window: old content or the window's write
        assert!(m.check_window(1, 0, 1, &[7u8; 4096]).is_none());
        assert!(m.check_window(1, 0, 1, &blockbytes(&m, 4096, 2)).is_some());
        // intervals: block 0 = seq1 until the trim at 3 (which may keep it), then zero
        assert_eq!(m.interval(0, &blockbytes(&m, 0, 1)), Some((1, u64::MAX)));
        assert_eq!(
            m.interval(0, &[0u8; 4096]),
            Some((0, 1)).map(|_| (0, u64::MAX))
        );
        assert_eq!(m.interval(1, &blockbytes(&m, 4096, 1)), Some((1, 2)));
        assert_eq!(m.interval(1, &blockbytes(&m, 4096, 2)), Some((2, u64::MAX)));
        assert_eq!(m.interval(1, &[9u8; 4096]), Some((0, 1)));
        assert_eq!(m.interval(1, &blockbytes(&m, 0, 2)), None);
        assert_eq!(m.interval(5, &[9u8; 4096]), Some((0, u64::MAX)));
    }

    #[test]
    fn incremental_digest_matches_history() {
        let mut m = Model::new(1);
        m.apply(1, 0, 4, State::Data { writer: 1 });
        let d1 = m.digest();
        m.apply(2, 2, 4, State::Data { writer: 1 });
        m.apply(3, 1, 1, State::Zero);
        assert_eq!(m.digest_at(1), d1);
        assert_eq!(m.digest_at(3), m.digest());
        assert_ne!(d1, m.digest());
        // the digest equals the XOR of the expected blocks' hashes
        let mut d = [0u8; 16];
        for b in 0..6u64 {
            let content = match b {
                1 => vec![0u8; 4096],
                0 => blockbytes(&m, 0, 1),
                _ => blockbytes(&m, b * 4096, 2),
            };
            xor(&mut d, &block_hash(b * 4096, &content));
        }
        assert_eq!(d, m.digest());
    }
}
