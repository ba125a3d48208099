//! Safe, typed access to a mapped change-log region: header fields, the two
//! bitmaps, the in-flight extent counters and the ring bytes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::*};

use crate::error::{ChangeLogError, Result};
use crate::layout::*;
use crate::shm::Region;

pub(crate) struct Shared {
    region: Region,
    pub(crate) hdr: Header,
    pub(crate) path: PathBuf,
}

impl Shared {
    fn from_file(file: &File, path: &Path, rw: bool) -> Result<Shared> {
        let meta = file
            .metadata()
            .map_err(|e| ChangeLogError::io("stat", path, e))?;
        let bad = |reason: String| ChangeLogError::BadRegion {
            path: path.to_path_buf(),
            reason,
        };
        if meta.len() < HEADER_SIZE as u64 {
            return Err(bad(format!("file is only {} bytes", meta.len())));
        }
        let region = if rw {
            Region::map_rw(file)
        } else {
            Region::map_ro(file)
        }
        .map_err(|e| ChangeLogError::io("mmap", path, e))?;
        let mut h = [0u8; STATIC_LEN + 4];
        region.read_bytes(0, &mut h);
        let hdr = decode_header(&h, region.len() as u64).map_err(bad)?;
        Ok(Shared {
            region,
            hdr,
            path: path.to_path_buf(),
        })
    }

    pub(crate) fn open(path: &Path, rw: bool) -> Result<Shared> {
        let file = OpenOptions::new()
            .read(true)
            .write(rw)
            .open(path)
            .map_err(|e| ChangeLogError::io("open", path, e))?;
        Self::from_file(&file, path, rw)
    }

    /// Creates a fresh, zeroed region at `path` (via a temporary file and a
    /// rename, so no other process ever sees a half-initialised header).
    /// `init` runs on the new mapping before it is published.
    pub(crate) fn create(
        path: &Path,
        layout: &Layout,
        uuid: [u8; 16],
        generation: u64,
        created_ns: u64,
        init: impl FnOnce(&Shared),
    ) -> Result<Shared> {
        let tmp = path.with_extension(format!("clog.tmp.{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| ChangeLogError::io("create", &tmp, e))?;
        let h = layout.encode_header(uuid, generation, created_ns);
        file.write_all(&h)
            .map_err(|e| ChangeLogError::io("write", &tmp, e))?;
        file.set_len(layout.region_len)
            .map_err(|e| ChangeLogError::io("truncate", &tmp, e))?;
        let shared = Self::from_file(&file, &tmp, true)?;
        init(&shared);
        std::fs::rename(&tmp, path).map_err(|e| ChangeLogError::io("rename", path, e))?;
        Ok(Shared {
            path: path.to_path_buf(),
            ..shared
        })
    }

    pub(crate) fn layout(&self) -> &Layout {
        &self.hdr.layout
    }

    pub(crate) fn field(&self, off: usize) -> &AtomicU64 {
        self.region.atomic_u64(off)
    }

    pub(crate) fn stat(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < stat::SLOTS);
        self.region.atomic_u64(OFF_STATS + 8 * i)
    }

    pub(crate) fn bump(&self, i: usize, v: u64) {
        self.stat(i).fetch_add(v, Relaxed);
    }

    pub(crate) fn active(&self, w: u64) -> &AtomicU64 {
        assert!(w < self.hdr.layout.bitmap_words);
        self.region
            .atomic_u64((self.hdr.layout.active_off + 8 * w) as usize)
    }

    pub(crate) fn pending(&self, w: u64) -> &AtomicU64 {
        assert!(w < self.hdr.layout.bitmap_words);
        self.region
            .atomic_u64((self.hdr.layout.pending_off + 8 * w) as usize)
    }

    pub(crate) fn inflight(&self, e: u64) -> &AtomicU64 {
        assert!(e < self.hdr.layout.extent_count);
        self.region
            .atomic_u64((self.hdr.layout.inflight_off + 8 * e) as usize)
    }

    pub(crate) fn head(&self) -> &AtomicU64 {
        self.field(OFF_HEAD)
    }
    pub(crate) fn tail(&self) -> &AtomicU64 {
        self.field(OFF_TAIL)
    }

    /// Copies ring bytes starting at ring offset `at` (0..capacity); the range
    /// must not cross the end of the ring (callers check).
    pub(crate) fn ring_read(&self, at: u64, dst: &mut [u8]) {
        let l = &self.hdr.layout;
        assert!(at + dst.len() as u64 <= l.ring_capacity);
        self.region.read_bytes((l.ring_off + at) as usize, dst);
    }

    /// [`Shared::ring_read`] into `v` (its contents replaced, its allocation reused).
    pub(crate) fn ring_read_into(&self, at: u64, len: usize, v: &mut Vec<u8>) {
        let l = &self.hdr.layout;
        assert!(at + len as u64 <= l.ring_capacity);
        self.region.read_into((l.ring_off + at) as usize, len, v)
    }

    pub(crate) fn ring_write(&self, at: u64, src: &[u8]) {
        let l = &self.hdr.layout;
        assert!(at + src.len() as u64 <= l.ring_capacity);
        self.region.write_bytes((l.ring_off + at) as usize, src);
    }

    // ---------------------------------------------------------------- bitmaps

    /// Block range `[first, last]` covered by bytes `[offset, offset+len)`,
    /// clamped to the volume. `None` if empty.
    pub(crate) fn block_span(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let l = &self.hdr.layout;
        let end = offset.saturating_add(len).min(l.volume_size);
        if len == 0 || offset >= end {
            return None;
        }
        Some((offset >> l.block_shift, (end - 1) >> l.block_shift))
    }

    /// Sets the `active` bits of every block touched by `[offset, offset+len)`
    /// (fetch_or) and adds the newly set bits to the active counter.
    pub(crate) fn mark_active(&self, offset: u64, len: u64) {
        if let Some((a, b)) = self.block_span(offset, len) {
            self.mark_blocks(a, b);
        }
    }

    /// Sets the `active` bits of blocks `a..=b`.
    pub(crate) fn mark_blocks(&self, a: u64, b: u64) {
        let mut newly = 0u64;
        for_each_word(a, b, |w, mask| {
            let old = self.active(w).fetch_or(mask, SeqCst);
            newly += (mask & !old).count_ones() as u64;
        });
        if newly > 0 {
            self.field(OFF_ACTIVE_COUNT).fetch_add(newly, SeqCst);
        }
    }

    /// Marks every block of extent `e` active.
    pub(crate) fn mark_extent(&self, e: u64) {
        let l = &self.hdr.layout;
        let start = e << l.extent_shift;
        self.mark_active(start, 1u64 << l.extent_shift);
    }

    /// Subtracts from a counter without wrapping below zero (counters are
    /// hints and may have drifted if a process died between a bitmap update
    /// and the counter update).
    pub(crate) fn sat_sub(&self, off: usize, v: u64) {
        if v > 0 {
            let _ = self
                .field(off)
                .fetch_update(SeqCst, SeqCst, |c| Some(c.saturating_sub(v)));
        }
    }

    /// Moves bits `mask` of word `w` from `active` to `pending`: pending first,
    /// then active, so a bit is always in at least one of them.
    pub(crate) fn take_bits(&self, w: u64, mask: u64) {
        let oldp = self.pending(w).fetch_or(mask, SeqCst);
        let newp = (mask & !oldp).count_ones() as u64;
        if newp > 0 {
            self.field(OFF_PENDING_COUNT).fetch_add(newp, SeqCst);
        }
        let olda = self.active(w).fetch_and(!mask, SeqCst);
        self.sat_sub(OFF_ACTIVE_COUNT, (mask & olda).count_ones() as u64);
    }

    /// Clears bits `mask` of word `w` from `pending` (the target acknowledged them).
    pub(crate) fn clear_pending(&self, w: u64, mask: u64) -> u64 {
        let old = self.pending(w).fetch_and(!mask, SeqCst);
        let n = (mask & old).count_ones() as u64;
        self.sat_sub(OFF_PENDING_COUNT, n);
        n
    }

    /// ORs every `pending` bit back into `active` (consumer re-attach): active
    /// first, then pending, so a crash in between loses nothing.
    pub(crate) fn restore_pending(&self) -> u64 {
        let mut moved = 0;
        for w in 0..self.hdr.layout.bitmap_words {
            let v = self.pending(w).load(SeqCst);
            if v == 0 {
                continue;
            }
            let olda = self.active(w).fetch_or(v, SeqCst);
            let n = (v & !olda).count_ones() as u64;
            if n > 0 {
                self.field(OFF_ACTIVE_COUNT).fetch_add(n, SeqCst);
            }
            let oldp = self.pending(w).fetch_and(!v, SeqCst);
            self.sat_sub(OFF_PENDING_COUNT, (v & oldp).count_ones() as u64);
            moved += v.count_ones() as u64;
        }
        moved
    }

    /// Exact popcounts of (active, pending) by scanning.
    pub(crate) fn count_bits(&self) -> (u64, u64) {
        let (mut a, mut p) = (0u64, 0u64);
        for w in 0..self.hdr.layout.bitmap_words {
            a += self.active(w).load(Relaxed).count_ones() as u64;
            p += self.pending(w).load(Relaxed).count_ones() as u64;
        }
        (a, p)
    }

    /// Byte range of blocks `a..=b`, clamped to the volume size.
    pub(crate) fn blocks_to_bytes(&self, a: u64, b: u64) -> (u64, u64) {
        let l = &self.hdr.layout;
        let start = (a << l.block_shift).min(l.volume_size);
        let end = ((b + 1) << l.block_shift).min(l.volume_size);
        // Bits beyond the volume end (only possible if another process wrote
        // them) yield an empty range rather than an underflow.
        (start, end.saturating_sub(start))
    }

    /// Coalesced byte ranges of the blocks set in `word(w)` for all words.
    pub(crate) fn ranges_of(&self, mut word: impl FnMut(u64) -> u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for w in 0..self.hdr.layout.bitmap_words {
            let mut v = word(w);
            while v != 0 {
                let bit = v.trailing_zeros() as u64;
                let run = (v >> bit).trailing_ones() as u64;
                let a = w * 64 + bit;
                let (start, len) = self.blocks_to_bytes(a, a + run - 1);
                push_range(&mut out, start, len);
                v &= if bit + run >= 64 {
                    0
                } else {
                    !0u64 << (bit + run)
                };
            }
        }
        out
    }
}

/// Appends `[start, start+len)` to a sorted range list, merging with the last
/// range when adjacent or overlapping.
pub(crate) fn push_range(out: &mut Vec<(u64, u64)>, start: u64, len: u64) {
    if len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.0 + last.1 >= start && start >= last.0 {
            last.1 = last.1.max(start + len - last.0);
            return;
        }
    }
    out.push((start, len));
}

/// Calls `f(word, mask)` for every bitmap word touched by blocks `a..=b`.
pub(crate) fn for_each_word(a: u64, b: u64, mut f: impl FnMut(u64, u64)) {
    let (wa, wb) = (a / 64, b / 64);
    for w in wa..=wb {
        let lo = if w == wa { a % 64 } else { 0 };
        let hi = if w == wb { b % 64 } else { 63 };
        let mask = if hi - lo == 63 {
            !0u64
        } else {
            ((1u64 << (hi - lo + 1)) - 1) << lo
        };
        f(w, mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn word_masks() {
        let mut v = Vec::new();
        for_each_word(3, 3, |w, m| v.push((w, m)));
        assert_eq!(v, vec![(0, 1 << 3)]);
        v.clear();
        for_each_word(60, 130, |w, m| v.push((w, m)));
        assert_eq!(v, vec![(0, 0xF000_0000_0000_0000), (1, !0), (2, 0b111)]);
        v.clear();
        for_each_word(0, 63, |w, m| v.push((w, m)));
        assert_eq!(v, vec![(0, !0)]);
    }
    #[test]
    fn ranges_merge() {
        let mut r = Vec::new();
        push_range(&mut r, 0, 10);
        push_range(&mut r, 10, 5);
        push_range(&mut r, 20, 5);
        push_range(&mut r, 22, 1);
        assert_eq!(r, vec![(0, 15), (20, 5)]);
    }
}
