//! A writer of synthetic dm-era metadata images for the unit tests: the same layout the
//! kernel writes (superblock, btrees, arrays, checksums), with a small node capacity option
//! to get multi-level btrees out of small images.

use super::*;

#[derive(Debug, Clone)]
pub(crate) struct ImageSpec {
    pub data_block_size: u32,
    pub nr_blocks: u32,
    pub current_era: u32,
    /// Era array values, `nr_blocks` of them.
    pub eras: Vec<u32>,
    /// Archived writesets: era and the written blocks (`nr_bits` = `nr_blocks`).
    pub writesets: Vec<(u32, Vec<u32>)>,
    /// The live current writeset's blocks, if it has a root.
    pub current: Option<Vec<u32>>,
    /// Write the roots as a metadata snapshot (a second superblock) too.
    pub snapshot: bool,
    /// Btree leaf capacity (0 = what the kernel uses).
    pub max_entries: usize,
}

impl Default for ImageSpec {
    fn default() -> Self {
        ImageSpec {
            data_block_size: 8,
            nr_blocks: 0,
            current_era: 1,
            eras: Vec::new(),
            writesets: Vec::new(),
            current: None,
            snapshot: true,
            max_entries: 0,
        }
    }
}

struct Writer {
    blocks: Vec<Vec<u8>>,
    max_entries: usize,
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn seal(b: &mut [u8], xor: u32) {
    let c = dm_checksum(&b[4..], xor);
    put32(b, 0, c);
}

impl Writer {
    fn alloc(&mut self) -> u64 {
        self.blocks.push(vec![0; META_BLOCK_SIZE]);
        self.blocks.len() as u64 - 1
    }

    fn cap(&self, value_size: usize) -> usize {
        let kernel = (META_BLOCK_SIZE - NODE_HEADER_SIZE) / (8 + value_size) / 3 * 3;
        if self.max_entries == 0 {
            kernel
        } else {
            self.max_entries.min(kernel)
        }
    }

    fn node(&mut self, internal: bool, value_size: usize, entries: &[(u64, Vec<u8>)]) -> u64 {
        let max = self.cap(value_size);
        let loc = self.alloc();
        let b = &mut self.blocks[loc as usize];
        put32(b, 4, if internal { INTERNAL_NODE } else { LEAF_NODE });
        put64(b, 8, loc);
        put32(b, 16, entries.len() as u32);
        put32(b, 20, max as u32);
        put32(b, 24, value_size as u32);
        let values = NODE_HEADER_SIZE + max * 8;
        for (i, (k, v)) in entries.iter().enumerate() {
            put64(b, NODE_HEADER_SIZE + i * 8, *k);
            b[values + i * value_size..values + (i + 1) * value_size].copy_from_slice(v);
        }
        seal(b, BTREE_CSUM_XOR);
        loc
    }

    fn btree(&mut self, value_size: usize, entries: Vec<(u64, Vec<u8>)>) -> u64 {
        if entries.is_empty() {
            return self.node(false, value_size, &[]);
        }
        let cap = self.cap(value_size);
        let mut level: Vec<(u64, Vec<u8>)> = entries
            .chunks(cap)
            .map(|c| {
                (
                    c[0].0,
                    self.node(false, value_size, c).to_le_bytes().to_vec(),
                )
            })
            .collect();
        while level.len() > 1 {
            let icap = self.cap(8);
            level = level
                .chunks(icap)
                .map(|c| (c[0].0, self.node(true, 8, c).to_le_bytes().to_vec()))
                .collect();
        }
        u64::from_le_bytes(level[0].1.clone().try_into().unwrap())
    }

    fn array(&mut self, value_size: usize, values: &[Vec<u8>]) -> u64 {
        let per = (META_BLOCK_SIZE - ARRAY_HEADER_SIZE) / value_size;
        let mut entries = Vec::new();
        for (i, chunk) in values.chunks(per).enumerate() {
            let loc = self.alloc();
            let b = &mut self.blocks[loc as usize];
            put32(b, 4, per as u32);
            put32(b, 8, chunk.len() as u32);
            put32(b, 12, value_size as u32);
            put64(b, 16, loc);
            for (j, v) in chunk.iter().enumerate() {
                let o = ARRAY_HEADER_SIZE + j * value_size;
                b[o..o + value_size].copy_from_slice(v);
            }
            seal(b, ARRAY_CSUM_XOR);
            entries.push((i as u64, loc.to_le_bytes().to_vec()));
        }
        self.btree(8, entries)
    }

    fn bitset(&mut self, nr_bits: u32, set: &[u32]) -> u64 {
        let mut words = vec![0u64; (nr_bits as usize).div_ceil(64)];
        for &b in set {
            words[b as usize / 64] |= 1 << (b % 64);
        }
        let vals: Vec<Vec<u8>> = words.iter().map(|w| w.to_le_bytes().to_vec()).collect();
        self.array(8, &vals)
    }

    #[allow(clippy::too_many_arguments)]
    fn superblock(
        &mut self,
        loc: u64,
        spec: &ImageSpec,
        cur: WritesetRoot,
        wt: u64,
        ea: u64,
        snap: u64,
    ) {
        let b = &mut self.blocks[loc as usize];
        put64(b, 8, loc);
        put64(b, 32, SUPERBLOCK_MAGIC);
        put32(b, 40, ERA_VERSION);
        put32(b, 172, spec.data_block_size);
        put32(b, 176, 8);
        put32(b, 180, spec.nr_blocks);
        put32(b, 184, spec.current_era);
        put32(b, 188, cur.nr_bits);
        put64(b, 192, cur.root);
        put64(b, 200, wt);
        put64(b, 208, ea);
        put64(b, 216, snap);
        seal(b, SUPERBLOCK_CSUM_XOR);
    }
}

/// Builds the image.
pub(crate) fn build(spec: &ImageSpec) -> Vec<u8> {
    let mut w = Writer {
        blocks: Vec::new(),
        max_entries: spec.max_entries,
    };
    let sb = w.alloc();
    let eras: Vec<Vec<u8>> = spec.eras.iter().map(|e| e.to_le_bytes().to_vec()).collect();
    let ea = w.array(4, &eras);
    let mut wss = Vec::new();
    for (era, set) in &spec.writesets {
        let root = w.bitset(spec.nr_blocks, set);
        let mut v = spec.nr_blocks.to_le_bytes().to_vec();
        v.extend_from_slice(&root.to_le_bytes());
        wss.push((u64::from(*era), v));
    }
    let wt = w.btree(12, wss);
    let cur = match &spec.current {
        Some(set) => WritesetRoot {
            nr_bits: spec.nr_blocks,
            root: w.bitset(spec.nr_blocks, set),
        },
        None => WritesetRoot {
            nr_bits: 0,
            root: 0,
        },
    };
    let snap = if spec.snapshot {
        let s = w.alloc();
        w.superblock(s, spec, cur, wt, ea, 0);
        s
    } else {
        0
    };
    w.superblock(sb, spec, cur, wt, ea, snap);
    w.blocks.concat()
}
