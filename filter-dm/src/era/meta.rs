//! Reader of the dm-era on-disk metadata (format: `vendor-docs/dm-era.md`).
//!
//! Everything read is checked before use: every block's location field and checksum, node
//! headers against the block size, keys in order, block numbers inside the device, array
//! lengths against the superblock. A corrupt or truncated image gives a [`MetaError`] naming
//! the block; the reader never panics and never loops (each btree node is visited at most
//! once per walk).

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};

/// The metadata block size dm-era uses (`DM_ERA_METADATA_BLOCK_SIZE`).
pub const META_BLOCK_SIZE: usize = 4096;
/// `SUPERBLOCK_MAGIC` of dm-era.
pub const SUPERBLOCK_MAGIC: u64 = 2_126_579_579;
const SUPERBLOCK_CSUM_XOR: u32 = 146_538_381;
const BTREE_CSUM_XOR: u32 = 121_107;
const ARRAY_CSUM_XOR: u32 = 595_846_735;
/// The only on-disk version dm-era writes and accepts.
pub const ERA_VERSION: u32 = 1;

const NODE_HEADER_SIZE: usize = 32;
const ARRAY_HEADER_SIZE: usize = 24;
const INTERNAL_NODE: u32 = 1;
const LEAF_NODE: u32 = 2;
/// Deeper than any btree that fits in 2^64 blocks of 4 KiB.
const MAX_DEPTH: usize = 16;
/// The kernel limits the number of origin blocks to 2^31 - 1 (`valid_nr_blocks`).
const MAX_NR_BLOCKS: u32 = (1 << 31) - 1;

/// Why the metadata could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("reading metadata block {block}: {source}")]
    Io { block: u64, source: io::Error },

    #[error("the metadata image has {len} bytes: too small for a dm-era superblock ({META_BLOCK_SIZE} bytes)")]
    TooSmall { len: u64 },

    #[error("{what} at metadata block {block} is outside the metadata device ({nr_blocks} blocks of {META_BLOCK_SIZE} bytes): truncated or corrupt metadata")]
    OutOfRange {
        what: &'static str,
        block: u64,
        nr_blocks: u64,
    },

    #[error("corrupt dm-era metadata: {what} at block {block}: {reason}")]
    Corrupt {
        what: &'static str,
        block: u64,
        reason: String,
    },

    #[error("the dm-era metadata holds no metadata snapshot (send take_metadata_snap first)")]
    NoSnapshot,
}

/// A callback over `(key or first index, values)`.
type Visit<'a, T> = dyn FnMut(u64, &[T]) -> Result<(), MetaError> + 'a;

fn corrupt(what: &'static str, block: u64, reason: impl Into<String>) -> MetaError {
    MetaError::Corrupt {
        what,
        block,
        reason: reason.into(),
    }
}

/// Something holding metadata blocks: an in-memory image, a file copy or the device itself.
pub trait MetadataSource {
    /// Size in bytes.
    fn len_bytes(&self) -> io::Result<u64>;
    /// Reads `buf.len()` bytes at byte offset `off` (never past `len_bytes`).
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl MetadataSource for [u8] {
    fn len_bytes(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let src = usize::try_from(off)
            .ok()
            .and_then(|o| self.get(o..o.checked_add(buf.len())?))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl MetadataSource for Vec<u8> {
    fn len_bytes(&self) -> io::Result<u64> {
        self.as_slice().len_bytes()
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.as_slice().read_at(off, buf)
    }
}

impl MetadataSource for File {
    fn len_bytes(&self) -> io::Result<u64> {
        let m = self.metadata()?;
        if m.file_type().is_block_device() {
            crate::block::size_bytes(self)
        } else {
            Ok(m.len())
        }
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.read_exact_at(buf, off)
    }
}

/// `struct writeset_disk`: the root of one era's bitset of written blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WritesetRoot {
    pub nr_bits: u32,
    /// Root of the bitset's array btree; 0 = none.
    pub root: u64,
}

/// A dm-era superblock (`struct superblock_disk`), the live one at block 0 or a metadata
/// snapshot's copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Where it was read from.
    pub location: u64,
    pub flags: u32,
    pub uuid: [u8; 16],
    pub version: u32,
    /// Size of a tracked (origin) block, in 512-byte sectors.
    pub data_block_size: u32,
    /// Metadata block size in sectors (always 8).
    pub metadata_block_size: u32,
    /// Number of tracked origin blocks.
    pub nr_blocks: u32,
    pub current_era: u32,
    pub current_writeset: WritesetRoot,
    pub writeset_tree_root: u64,
    pub era_array_root: u64,
    /// Location of the metadata snapshot's superblock; 0 = no snapshot.
    pub metadata_snap: u64,
}

impl Superblock {
    /// Size of a tracked block in bytes.
    pub fn data_block_bytes(&self) -> u64 {
        u64::from(self.data_block_size) * 512
    }
}

/// One archived writeset: the blocks written during `era`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writeset {
    pub era: u32,
    pub nr_bits: u32,
    /// Bit `b` (word `b / 64`, bit `b % 64`) set = block `b` was written in `era`.
    pub bits: Vec<u64>,
}

impl Writeset {
    pub fn is_set(&self, block: u32) -> bool {
        block < self.nr_bits
            && self
                .bits
                .get(block as usize / 64)
                .is_some_and(|w| w >> (block % 64) & 1 == 1)
    }

    /// The set blocks, in order.
    pub fn blocks(&self) -> Vec<u32> {
        (0..self.nr_bits).filter(|&b| self.is_set(b)).collect()
    }
}

/// The CRC32C (Castagnoli) table, reflected polynomial 0x82F63B78.
const CRC32C_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// The kernel's `crc32c(seed, data, len)`: no final inversion.
fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    data.iter().fold(seed, |c, &b| {
        CRC32C_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// `dm_bm_checksum(data, len, xor)` = `crc32c(~0, data, len) ^ xor`.
pub fn dm_checksum(data: &[u8], xor: u32) -> u32 {
    crc32c_raw(!0, data) ^ xor
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Checks the checksum (first 4 bytes, over the rest of the block) and the location field.
fn check_block(
    what: &'static str,
    block: u64,
    data: &[u8],
    xor: u32,
    blocknr_off: usize,
) -> Result<(), MetaError> {
    let found = le64(data, blocknr_off);
    if found != block {
        return Err(corrupt(
            what,
            block,
            format!("it says it belongs at block {found} (misplaced or not a {what})"),
        ));
    }
    let stored = le32(data, 0);
    let computed = dm_checksum(&data[4..], xor);
    if stored != computed {
        return Err(corrupt(
            what,
            block,
            format!("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"),
        ));
    }
    Ok(())
}

/// The dm-era metadata of one device or image.
pub struct EraMetadata<S: ?Sized> {
    nr_meta_blocks: u64,
    superblock: Superblock,
    src: Box<S>,
}

impl<S: MetadataSource + ?Sized> std::fmt::Debug for EraMetadata<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EraMetadata")
            .field("nr_meta_blocks", &self.nr_meta_blocks)
            .field("superblock", &self.superblock)
            .finish_non_exhaustive()
    }
}

impl EraMetadata<[u8]> {
    /// Parses an in-memory image.
    pub fn from_bytes(image: &[u8]) -> Result<Self, MetaError> {
        EraMetadata::open(Box::from(image))
    }
}

impl<S: MetadataSource + ?Sized> EraMetadata<S> {
    /// Reads and checks the superblock at block 0.
    pub fn open(src: Box<S>) -> Result<Self, MetaError> {
        let len = src
            .len_bytes()
            .map_err(|source| MetaError::Io { block: 0, source })?;
        if len < META_BLOCK_SIZE as u64 {
            return Err(MetaError::TooSmall { len });
        }
        let mut m = EraMetadata {
            nr_meta_blocks: len / META_BLOCK_SIZE as u64,
            superblock: Superblock {
                location: 0,
                flags: 0,
                uuid: [0; 16],
                version: 0,
                data_block_size: 0,
                metadata_block_size: 0,
                nr_blocks: 0,
                current_era: 0,
                current_writeset: WritesetRoot {
                    nr_bits: 0,
                    root: 0,
                },
                writeset_tree_root: 0,
                era_array_root: 0,
                metadata_snap: 0,
            },
            src,
        };
        m.superblock = m.read_superblock(0, "superblock")?;
        Ok(m)
    }

    /// Gives the source back.
    pub fn into_source(self) -> Box<S> {
        self.src
    }

    /// The live superblock (block 0).
    pub fn superblock(&self) -> &Superblock {
        &self.superblock
    }

    /// Number of 4 KiB blocks in the image.
    pub fn nr_meta_blocks(&self) -> u64 {
        self.nr_meta_blocks
    }

    /// The metadata snapshot taken with `take_metadata_snap`: the consistent view to read
    /// while the era device is live.
    pub fn snapshot(&self) -> Result<EraView<'_, S>, MetaError> {
        let loc = self.superblock.metadata_snap;
        if loc == 0 {
            return Err(MetaError::NoSnapshot);
        }
        let sb = self.read_superblock(loc, "metadata snapshot superblock")?;
        Ok(EraView {
            md: self,
            sb,
            snapshot: true,
        })
    }

    /// The live roots of block 0. Consistent only when nothing changes the metadata while
    /// it is read: a file copy, or the device of an era target that is not loaded (after a
    /// clean removal or a crash: the state of the last commit). Unlike a snapshot view, this
    /// includes the current era's writeset.
    pub fn live(&self) -> EraView<'_, S> {
        EraView {
            md: self,
            sb: self.superblock.clone(),
            snapshot: false,
        }
    }

    fn read_block(&self, block: u64, what: &'static str) -> Result<Vec<u8>, MetaError> {
        if block >= self.nr_meta_blocks {
            return Err(MetaError::OutOfRange {
                what,
                block,
                nr_blocks: self.nr_meta_blocks,
            });
        }
        let mut buf = vec![0u8; META_BLOCK_SIZE];
        self.src
            .read_at(block * META_BLOCK_SIZE as u64, &mut buf)
            .map_err(|source| MetaError::Io { block, source })?;
        Ok(buf)
    }

    fn read_superblock(&self, block: u64, what: &'static str) -> Result<Superblock, MetaError> {
        let b = self.read_block(block, what)?;
        let magic = le64(&b, 32);
        if magic != SUPERBLOCK_MAGIC {
            return Err(corrupt(
                what,
                block,
                format!("bad magic {magic} (want {SUPERBLOCK_MAGIC}): not dm-era metadata"),
            ));
        }
        check_block(what, block, &b, SUPERBLOCK_CSUM_XOR, 8)?;
        let sb = Superblock {
            location: block,
            flags: le32(&b, 4),
            uuid: b[16..32].try_into().unwrap_or([0; 16]),
            version: le32(&b, 40),
            data_block_size: le32(&b, 172),
            metadata_block_size: le32(&b, 176),
            nr_blocks: le32(&b, 180),
            current_era: le32(&b, 184),
            current_writeset: WritesetRoot {
                nr_bits: le32(&b, 188),
                root: le64(&b, 192),
            },
            writeset_tree_root: le64(&b, 200),
            era_array_root: le64(&b, 208),
            metadata_snap: le64(&b, 216),
        };
        if sb.version != ERA_VERSION {
            return Err(corrupt(
                what,
                block,
                format!("unsupported version {} (want {ERA_VERSION})", sb.version),
            ));
        }
        if sb.metadata_block_size as usize * 512 != META_BLOCK_SIZE {
            return Err(corrupt(
                what,
                block,
                format!(
                    "metadata block size {} sectors (want {})",
                    sb.metadata_block_size,
                    META_BLOCK_SIZE / 512
                ),
            ));
        }
        if sb.data_block_size == 0 || sb.data_block_size & 7 != 0 {
            return Err(corrupt(
                what,
                block,
                format!(
                    "data block size {} sectors is not a positive multiple of 8",
                    sb.data_block_size
                ),
            ));
        }
        if sb.nr_blocks > MAX_NR_BLOCKS {
            return Err(corrupt(
                what,
                block,
                format!("{} origin blocks is more than dm-era allows", sb.nr_blocks),
            ));
        }
        Ok(sb)
    }

    /// In-order walk of a one-level btree whose leaves hold `value_size`-byte values.
    fn walk_btree(
        &self,
        what: &'static str,
        root: u64,
        value_size: usize,
        f: &mut Visit<'_, u8>,
    ) -> Result<(), MetaError> {
        let mut seen = HashSet::new();
        let mut last_key = None;
        self.walk_node(what, root, value_size, 0, &mut seen, &mut last_key, f)
    }

    #[allow(clippy::too_many_arguments)]
    fn walk_node(
        &self,
        what: &'static str,
        block: u64,
        value_size: usize,
        depth: usize,
        seen: &mut HashSet<u64>,
        last_key: &mut Option<u64>,
        f: &mut Visit<'_, u8>,
    ) -> Result<(), MetaError> {
        if depth > MAX_DEPTH {
            return Err(corrupt(what, block, "btree deeper than possible"));
        }
        if !seen.insert(block) {
            return Err(corrupt(
                what,
                block,
                "btree node reached twice (cycle or shared node)",
            ));
        }
        let b = self.read_block(block, what)?;
        check_block(what, block, &b, BTREE_CSUM_XOR, 8)?;
        let flags = le32(&b, 4);
        let nr_entries = le32(&b, 16) as usize;
        let max_entries = le32(&b, 20) as usize;
        let node_value_size = le32(&b, 24) as usize;
        let internal = match flags {
            INTERNAL_NODE => true,
            LEAF_NODE => false,
            _ => return Err(corrupt(what, block, format!("bad node flags {flags:#x}"))),
        };
        let want_vs = if internal { 8 } else { value_size };
        if node_value_size != want_vs {
            return Err(corrupt(
                what,
                block,
                format!("value size {node_value_size}, want {want_vs}"),
            ));
        }
        let fits = max_entries
            .checked_mul(8 + node_value_size)
            .and_then(|n| n.checked_add(NODE_HEADER_SIZE));
        if !matches!(fits, Some(n) if n <= META_BLOCK_SIZE) {
            return Err(corrupt(
                what,
                block,
                format!("max_entries {max_entries} does not fit in a block"),
            ));
        }
        if nr_entries > max_entries {
            return Err(corrupt(
                what,
                block,
                format!("nr_entries {nr_entries} > max_entries {max_entries}"),
            ));
        }
        if internal && nr_entries == 0 {
            return Err(corrupt(what, block, "empty internal node"));
        }
        let values = NODE_HEADER_SIZE + max_entries * 8;
        let mut prev: Option<u64> = None;
        for i in 0..nr_entries {
            let key = le64(&b, NODE_HEADER_SIZE + i * 8);
            if prev.is_some_and(|p| key <= p) {
                return Err(corrupt(what, block, "keys out of order"));
            }
            prev = Some(key);
            let v = &b[values + i * node_value_size..values + (i + 1) * node_value_size];
            if internal {
                if last_key.is_some_and(|l| key <= l) && i > 0 {
                    return Err(corrupt(what, block, "keys out of order across nodes"));
                }
                self.walk_node(what, le64(v, 0), value_size, depth + 1, seen, last_key, f)?;
            } else {
                if last_key.is_some_and(|l| key <= l) {
                    return Err(corrupt(what, block, "keys out of order across nodes"));
                }
                *last_key = Some(key);
                f(key, v)?;
            }
        }
        Ok(())
    }

    /// Walks a `dm_array` of `value_size`-byte values that must hold exactly `expected`
    /// entries; `f(first_index, values)` gets each array block's values in order.
    fn walk_array(
        &self,
        what: &'static str,
        root: u64,
        value_size: usize,
        expected: u64,
        f: &mut Visit<'_, u8>,
    ) -> Result<(), MetaError> {
        let per_block = ((META_BLOCK_SIZE - ARRAY_HEADER_SIZE) / value_size) as u64;
        let mut count: u64 = 0;
        let mut next_key: u64 = 0;
        let mut short_block: Option<u64> = None;
        self.walk_btree(what, root, 8, &mut |key, v| {
            let loc = le64(v, 0);
            if key != next_key {
                return Err(corrupt(
                    what,
                    loc,
                    format!("array block index {key}, want {next_key}"),
                ));
            }
            next_key += 1;
            if let Some(s) = short_block {
                return Err(corrupt(
                    what,
                    s,
                    "a partly filled array block is not the last one",
                ));
            }
            let b = self.read_block(loc, what)?;
            check_block(what, loc, &b, ARRAY_CSUM_XOR, 16)?;
            let max_entries = u64::from(le32(&b, 4));
            let nr_entries = u64::from(le32(&b, 8));
            let vs = le32(&b, 12) as usize;
            if vs != value_size || max_entries != per_block {
                return Err(corrupt(
                    what,
                    loc,
                    format!(
                        "array block of {max_entries} values of {vs} bytes, want {per_block} of {value_size}"
                    ),
                ));
            }
            if nr_entries > max_entries || nr_entries == 0 {
                return Err(corrupt(
                    what,
                    loc,
                    format!("array block holds {nr_entries} of {max_entries} entries"),
                ));
            }
            if nr_entries < max_entries {
                short_block = Some(loc);
            }
            if count + nr_entries > expected {
                return Err(corrupt(
                    what,
                    loc,
                    format!("the array has more than the {expected} entries expected"),
                ));
            }
            let end = ARRAY_HEADER_SIZE + nr_entries as usize * value_size;
            f(count, &b[ARRAY_HEADER_SIZE..end])?;
            count += nr_entries;
            Ok(())
        })?;
        if count != expected {
            return Err(corrupt(
                what,
                root,
                format!("the array has {count} entries, want {expected}"),
            ));
        }
        Ok(())
    }

    /// Reads a writeset's bitset (`nr_bits` bits in 64-bit words).
    fn read_bitset(&self, era: u32, ws: WritesetRoot) -> Result<Writeset, MetaError> {
        let words = u64::from(ws.nr_bits).div_ceil(64);
        // no allocation sized by an untrusted count: grow with what the blocks hold
        let mut bits = Vec::new();
        if ws.root == 0 {
            // The kernel's "no writeset" root (block 0 is the superblock, never a bitset):
            // an era whose writeset was never set up recorded no writes.
            return Ok(Writeset {
                era,
                nr_bits: ws.nr_bits,
                bits: Vec::new(),
            });
        }
        self.walk_array("writeset bitset", ws.root, 8, words, &mut |_, v| {
            bits.extend(v.chunks_exact(8).map(|c| le64(c, 0)));
            Ok(())
        })?;
        if let Some(last) = bits.last_mut() {
            let tail = ws.nr_bits % 64;
            if tail != 0 {
                *last &= (1u64 << tail) - 1;
            }
        }
        Ok(Writeset {
            era,
            nr_bits: ws.nr_bits,
            bits,
        })
    }
}

/// The metadata as of one superblock: a snapshot (consistent while the target is live) or
/// the live roots.
pub struct EraView<'a, S: ?Sized> {
    md: &'a EraMetadata<S>,
    sb: Superblock,
    snapshot: bool,
}

impl<S: MetadataSource + ?Sized> EraView<'_, S> {
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// The archived writesets (not yet digested into the era array), by era; for a live
    /// view also the current era's writeset, if it has one.
    pub fn writesets(&self) -> Result<Vec<Writeset>, MetaError> {
        let mut roots = Vec::new();
        self.md.walk_btree(
            "writeset tree",
            self.sb.writeset_tree_root,
            12,
            &mut |key, v| {
                let era = u32::try_from(key).map_err(|_| {
                    corrupt(
                        "writeset tree",
                        self.sb.writeset_tree_root,
                        format!("era {key} out of range"),
                    )
                })?;
                roots.push((
                    era,
                    WritesetRoot {
                        nr_bits: le32(v, 0),
                        root: le64(v, 4),
                    },
                ));
                Ok(())
            },
        )?;
        // The snapshot copies the current writeset's root without taking a reference on
        // it: the kernel may have reused those blocks since, so only a live view reads it.
        if !self.snapshot && self.sb.current_writeset.root != 0 {
            roots.push((self.sb.current_era, self.sb.current_writeset));
        }
        roots
            .into_iter()
            .map(|(era, ws)| self.md.read_bitset(era, ws))
            .collect()
    }

    /// Calls `f(first_block, eras)` for each era-array block: `eras[i]` is the era in which
    /// block `first_block + i` was last written, as digested so far (0 = not written since
    /// the metadata was formatted, or not yet digested: see [`writesets`](Self::writesets)).
    pub fn for_each_era(&self, f: &mut Visit<'_, u32>) -> Result<(), MetaError> {
        let mut eras = Vec::with_capacity((META_BLOCK_SIZE - ARRAY_HEADER_SIZE) / 4);
        self.md.walk_array(
            "era array",
            self.sb.era_array_root,
            4,
            u64::from(self.sb.nr_blocks),
            &mut |first, v| {
                eras.clear();
                eras.extend(v.chunks_exact(4).map(|c| le32(c, 0)));
                f(first, &eras)
            },
        )
    }

    /// The whole era array (4 bytes per origin block).
    pub fn era_array(&self) -> Result<Vec<u32>, MetaError> {
        let mut all = Vec::new();
        self.for_each_era(&mut |_, e| {
            all.extend_from_slice(e);
            Ok(())
        })?;
        Ok(all)
    }

    /// Bitmap (64 blocks a word) of the origin blocks written in an era `>= era`: the era
    /// array plus the writesets not yet digested into it (what `era_invalidate
    /// --written-since` computes). Era 0 is never a writing era (the kernel moves to era 1
    /// before the first I/O), so blocks with era 0 in the era array are never reported.
    pub fn changed_bitmap(&self, era: u32) -> Result<Vec<u64>, MetaError> {
        let nr = self.sb.nr_blocks;
        // Grown as the era array is read (not sized from the superblock's count up front,
        // which a forged superblock could make huge); the walk checks it holds `nr` entries.
        let mut map: Vec<u64> = Vec::new();
        let floor = era.max(1);
        self.for_each_era(&mut |first, eras| {
            let end = (first as usize + eras.len()).div_ceil(64);
            if map.len() < end {
                map.resize(end, 0);
            }
            for (i, &e) in eras.iter().enumerate() {
                if e >= floor {
                    let b = first as usize + i;
                    map[b / 64] |= 1 << (b % 64);
                }
            }
            Ok(())
        })?;
        map.resize((nr as usize).div_ceil(64), 0);
        for ws in self.writesets()? {
            if ws.era < era {
                continue;
            }
            // Like the kernel's digest: bits past the current size are ignored.
            let n = ws.nr_bits.min(nr) as usize;
            for (w, word) in ws.bits.iter().enumerate().take(n.div_ceil(64)) {
                let mut word = *word;
                if (w + 1) * 64 > n {
                    word &= (1u64 << (n % 64)) - 1;
                }
                if let Some(m) = map.get_mut(w) {
                    *m |= word;
                }
            }
        }
        Ok(map)
    }

    /// Origin blocks written in an era `>= era`, coalesced: `(first block, block count)`.
    pub fn changed_blocks_since(&self, era: u32) -> Result<Vec<(u64, u64)>, MetaError> {
        Ok(runs(
            &self.changed_bitmap(era)?,
            u64::from(self.sb.nr_blocks),
        ))
    }

    /// Byte ranges `(offset, length)` of the origin written in an era `>= era`, coalesced.
    /// Whole tracked blocks: the last range may reach past the end of an origin whose size
    /// is not a multiple of the block size (see [`clamp_ranges`]).
    pub fn changed_since(&self, era: u32) -> Result<Vec<(u64, u64)>, MetaError> {
        let bs = self.sb.data_block_bytes();
        Ok(self
            .changed_blocks_since(era)?
            .into_iter()
            .map(|(b, n)| (b * bs, n * bs))
            .collect())
    }
}

/// Runs of set bits among the first `nr` bits.
fn runs(map: &[u64], nr: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (w, &word) in map.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            let bit = u64::from(word.trailing_zeros());
            word &= word - 1;
            let b = w as u64 * 64 + bit;
            if b >= nr {
                break;
            }
            match out.last_mut() {
                Some((s, n)) if *s + *n == b => *n += 1,
                _ => out.push((b, 1)),
            }
        }
    }
    out
}

/// Cuts byte ranges at `len` (the origin's size), dropping those wholly past it.
pub fn clamp_ranges(ranges: Vec<(u64, u64)>, len: u64) -> Vec<(u64, u64)> {
    ranges
        .into_iter()
        .filter(|&(o, _)| o < len)
        .map(|(o, n)| (o, n.min(len - o)))
        .collect()
}

#[cfg(test)]
pub(crate) mod testimg;
#[cfg(test)]
mod tests;
