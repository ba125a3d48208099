//! The one module of the crate that contains `unsafe` code: mapping the
//! shared-memory file and turning offsets inside the mapping into atomics and
//! byte copies. Everything else in the crate goes through the safe API below.
//!
//! Every accessor bounds- and alignment-checks its offset against the length of
//! the mapping (an `assert!`: the offsets passed here are computed by this crate
//! from a validated [`crate::layout::Layout`], never taken raw from the mapped
//! bytes, so a failing assert is a bug of this crate, not bad input).

use std::fs::File;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use memmap2::{Mmap, MmapMut};

/// Keeps the mapping alive; never dereferenced as a slice.
enum Backing {
    Rw(#[allow(dead_code)] MmapMut),
    Ro(#[allow(dead_code)] Mmap),
}

/// A shared (MAP_SHARED) mapping of a change-log file.
pub(crate) struct Region {
    _backing: Backing,
    base: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: `Region` owns the mapping (kept alive by `_backing`) and only hands out
// `&AtomicU64` (which is Sync) and copies through raw pointers; the raw `base`
// pointer is the start of that mapping and valid for `len` bytes for the whole
// lifetime of the value, whichever thread uses it.
unsafe impl Send for Region {}
// SAFETY: see `Send` above; all shared mutation goes through atomics or through
// byte copies whose exclusivity is guaranteed by the ring protocol.
unsafe impl Sync for Region {}

impl Region {
    /// Maps `file` read-write and shared. The file must already have its final
    /// length (the layout never grows). The mapping is prefaulted
    /// (`MAP_POPULATE`): the region's pages are allocated and mapped now, not
    /// by page faults on the write path during the ring's first pass (the
    /// region size is the configured memory budget anyway).
    pub(crate) fn map_rw(file: &File) -> std::io::Result<Region> {
        // SAFETY: memmap2 requires that the file is not truncated while mapped
        // (that would SIGBUS on access). The change-log file is created by this
        // crate with its final length, lives in a 0700 directory with mode 0600,
        // and no code of this project truncates it while it is in use.
        let mut map = unsafe { memmap2::MmapOptions::new().populate().map_mut(file)? };
        let len = map.len();
        let base =
            NonNull::new(map.as_mut_ptr()).ok_or_else(|| std::io::Error::other("null mapping"))?;
        Ok(Region {
            _backing: Backing::Rw(map),
            base,
            len,
            writable: true,
        })
    }

    /// Maps `file` read-only and shared (for observers such as `drvutil`).
    pub(crate) fn map_ro(file: &File) -> std::io::Result<Region> {
        // SAFETY: as for `map_rw`; additionally the mapping is PROT_READ, so this
        // process never writes through it (writes are refused by `assert_writable`).
        let map = unsafe { memmap2::MmapOptions::new().map(file)? };
        let len = map.len();
        let base = NonNull::new(map.as_ptr() as *mut u8)
            .ok_or_else(|| std::io::Error::other("null mapping"))?;
        Ok(Region {
            _backing: Backing::Ro(map),
            base,
            len,
            writable: false,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn check(&self, off: usize, n: usize) {
        assert!(
            off.checked_add(n).is_some_and(|end| end <= self.len),
            "shm access out of bounds: {off}+{n} > {}",
            self.len
        );
    }

    fn assert_writable(&self) {
        assert!(
            self.writable,
            "write through a read-only change-log mapping"
        );
    }

    /// The 8-byte aligned `u64` at byte offset `off`, as an atomic.
    ///
    /// On a read-only mapping only loads may be performed (the crate's view code
    /// never stores).
    pub(crate) fn atomic_u64(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8);
        assert!(off % 8 == 0, "unaligned atomic at {off}");
        // SAFETY: `off..off+8` is inside the mapping (checked above) and 8-byte
        // aligned (the mapping itself is page aligned). AtomicU64 has the size and
        // alignment of u64 and any bit pattern is valid. The mapping lives as long
        // as `self`, which bounds the returned lifetime. Concurrent access from
        // other processes is through atomic instructions on the same address,
        // which is exactly what AtomicU64 is for.
        unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(off).cast::<u64>()) }
    }

    /// Copies `dst.len()` bytes from offset `off` of the mapping into `dst`.
    pub(crate) fn read_bytes(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len());
        // SAFETY: source range checked to lie inside the mapping; `dst` is a
        // distinct local buffer so the ranges cannot overlap. The bytes may be
        // written concurrently by a misbehaving peer; they are plain bytes (every
        // pattern valid) and all consumers of copied bytes validate them.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.as_ptr().add(off), dst.as_mut_ptr(), dst.len())
        }
    }

    /// Replaces the contents of `v` with the `len` bytes at offset `off` of
    /// the mapping, reusing its allocation when it is large enough and
    /// without zero-filling it first (as `read_bytes` into `vec![0; len]`
    /// would): a record payload is read once per byte shipped.
    pub(crate) fn read_into(&self, off: usize, len: usize, v: &mut Vec<u8>) {
        self.check(off, len);
        v.clear();
        v.reserve(len);
        // SAFETY: source range checked to lie inside the mapping; the
        // destination is the vector's spare capacity (at least `len` bytes
        // after `reserve`, distinct from the mapping). After the copy the
        // first `len` bytes are initialised, so `set_len(len)` exposes only
        // written bytes. Concurrent writes by a peer only change which plain
        // bytes are copied.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.as_ptr().add(off), v.as_mut_ptr(), len);
            v.set_len(len);
        }
    }

    /// Copies `src` into the mapping at offset `off`.
    pub(crate) fn write_bytes(&self, off: usize, src: &[u8]) {
        self.assert_writable();
        self.check(off, src.len());
        // SAFETY: destination range checked to lie inside a writable shared
        // mapping; `src` is process-local memory, so no overlap. The ring
        // protocol gives the producer exclusive ownership of the free ring space
        // it writes into (and header bytes are only written before the file is
        // published by rename).
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.as_ptr().add(off), src.len())
        }
    }
}
