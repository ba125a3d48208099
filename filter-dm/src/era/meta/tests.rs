use std::collections::BTreeSet;

use proptest::prelude::*;

use super::testimg::{build, ImageSpec};
use super::*;

#[test]
fn checksum_is_the_kernels_crc32c() {
    // The standard CRC-32C check value: crc32c("123456789") = 0xe3069283 (with the final
    // inversion the kernel's raw crc32c leaves out).
    assert_eq!(crc32c_raw(!0, b"123456789") ^ !0, 0xe306_9283);
    assert_eq!(dm_checksum(b"123456789", 0), !0xe306_9283);
}

// ---- the image the kernel wrote (tests/kernel_era.rs era_fixture_image) ----

const FIXTURE: &[u8] = include_bytes!("../../../tests/fixtures/era-meta.sparse");
/// Eras 1, 2, 3 and the 4 KiB blocks written in each (`era-meta.truth`).
const FIX_ERAS: [&[u64]; 3] = [
    &[0, 1, 2, 3, 1017, 1018, 2047],
    &[2, 10, 11, 1500],
    &[3, 4, 1018, 2000, 2046],
];

fn unsparse(s: &[u8]) -> Vec<u8> {
    assert_eq!(&s[..8], b"RWSPARS1");
    let len = le64(s, 8) as usize;
    let mut img = vec![0u8; len];
    let mut rest = &s[16..];
    while !rest.is_empty() {
        let b = le64(rest, 0) as usize;
        img[b * META_BLOCK_SIZE..(b + 1) * META_BLOCK_SIZE]
            .copy_from_slice(&rest[8..8 + META_BLOCK_SIZE]);
        rest = &rest[8 + META_BLOCK_SIZE..];
    }
    img
}

fn fixture() -> Vec<u8> {
    unsparse(FIXTURE)
}

/// Coalesced byte ranges of the 4 KiB blocks written in eras `>= era`.
fn fixture_truth(era: u32) -> Vec<(u64, u64)> {
    let blocks: BTreeSet<u64> = FIX_ERAS
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u32 + 1 >= era)
        .flat_map(|(_, b)| b.iter().copied())
        .collect();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in blocks {
        match out.last_mut() {
            Some((o, n)) if *o + *n == b * 4096 => *n += 4096,
            _ => out.push((b * 4096, 4096)),
        }
    }
    out
}

#[test]
fn kernel_image_superblocks() {
    let img = fixture();
    let md = EraMetadata::from_bytes(&img).unwrap();
    let sb = md.superblock();
    assert_eq!(md.nr_meta_blocks(), 32);
    assert_eq!(sb.location, 0);
    assert_eq!(sb.version, 1);
    assert_eq!(sb.data_block_size, 8);
    assert_eq!(sb.metadata_block_size, 8);
    assert_eq!(sb.nr_blocks, 2048);
    assert_eq!(sb.current_era, 4, "the snapshot started era 4");
    assert_ne!(sb.metadata_snap, 0);
    let snap = md.snapshot().unwrap();
    let ss = snap.superblock();
    assert_eq!(ss.location, sb.metadata_snap);
    assert_eq!(ss.metadata_snap, 0);
    assert_eq!(ss.nr_blocks, 2048);
    assert_eq!(ss.current_era, 4);
}

#[test]
fn kernel_image_changed_since_is_the_ground_truth() {
    let img = fixture();
    let md = EraMetadata::from_bytes(&img).unwrap();
    for view in [md.snapshot().unwrap(), md.live()] {
        for era in 0..=5 {
            assert_eq!(
                view.changed_since(era).unwrap(),
                fixture_truth(era),
                "era {era}"
            );
        }
        // whatever is digested already is in the era array, the rest in writesets: together
        // every block's latest era
        let eras = view.era_array().unwrap();
        assert_eq!(eras.len(), 2048);
        let mut latest = eras.clone();
        for ws in view.writesets().unwrap() {
            assert!((1..=4).contains(&ws.era), "{}", ws.era);
            assert_eq!(ws.nr_bits, 2048);
            for b in ws.blocks() {
                latest[b as usize] = latest[b as usize].max(ws.era);
            }
        }
        for (i, blocks) in FIX_ERAS.iter().enumerate() {
            for &b in *blocks {
                assert!(latest[b as usize] > i as u32, "block {b}");
            }
        }
        assert_eq!(latest.iter().filter(|&&e| e != 0).count(), 13);
    }
}

#[test]
fn kernel_image_read_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta.img");
    std::fs::write(&path, fixture()).unwrap();
    let md = EraMetadata::open(Box::new(File::open(&path).unwrap())).unwrap();
    assert_eq!(
        md.snapshot().unwrap().changed_since(2).unwrap(),
        fixture_truth(2)
    );
}

/// Every answer from a damaged image is an error or the right answer.
fn right_or_error(img: &[u8], era: u32) -> Result<(), MetaError> {
    let md = EraMetadata::from_bytes(img)?;
    let got = md.snapshot()?.changed_since(era)?;
    assert_eq!(
        got,
        fixture_truth(era),
        "a damaged image gave a wrong answer"
    );
    Ok(())
}

#[test]
fn kernel_image_bit_flips_are_caught() {
    let img = fixture();
    let mut errors = 0;
    let nonzero: Vec<usize> = (0..img.len() / META_BLOCK_SIZE)
        .filter(|b| img[b * 4096..(b + 1) * 4096].iter().any(|&x| x != 0))
        .collect();
    for &b in &nonzero {
        for off in (0..META_BLOCK_SIZE).step_by(61).chain([0, 4, 8, 16, 4095]) {
            let mut bad = img.clone();
            bad[b * META_BLOCK_SIZE + off] ^= 0x10;
            if right_or_error(&bad, 2).is_err() {
                errors += 1;
            }
        }
    }
    assert!(errors > 100, "{errors}");
    // a flip in the snapshot superblock, any byte: always caught
    let snap = EraMetadata::from_bytes(&img)
        .unwrap()
        .superblock()
        .metadata_snap as usize;
    for off in 0..META_BLOCK_SIZE {
        let mut bad = img.clone();
        bad[snap * META_BLOCK_SIZE + off] ^= 1;
        let e = right_or_error(&bad, 1).unwrap_err();
        assert!(e.to_string().contains("snapshot superblock"), "{e}");
    }
}

#[test]
fn kernel_image_truncated_is_an_error() {
    let img = fixture();
    // the last block the snapshot's trees use
    struct Rec(Vec<u8>, std::cell::Cell<u64>);
    impl MetadataSource for Rec {
        fn len_bytes(&self) -> io::Result<u64> {
            self.0.len_bytes()
        }
        fn read_at(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
            self.1.set(self.1.get().max(off / 4096));
            self.0.read_at(off, buf)
        }
    }
    let md = EraMetadata::open(Box::new(Rec(img.clone(), Default::default()))).unwrap();
    md.snapshot().unwrap().changed_since(1).unwrap();
    let used = md.into_source().1.get() as usize;
    for len in (0..img.len()).step_by(512) {
        // right_or_error panics on a wrong answer
        let r = right_or_error(&img[..len], 1);
        if len < (used + 1) * META_BLOCK_SIZE {
            assert!(r.is_err(), "truncated to {len} bytes");
        }
    }
    let e = right_or_error(&img[..4095], 1).unwrap_err();
    assert!(matches!(e, MetaError::TooSmall { len: 4095 }), "{e}");
    // cut inside the trees
    let e = right_or_error(&img[..8 * 4096], 1).unwrap_err();
    println!("{e}");
    assert!(
        matches!(e, MetaError::OutOfRange { nr_blocks: 8, .. }),
        "{e}"
    );
}

#[test]
fn kernel_image_zeroed_blocks_are_errors() {
    let img = fixture();
    for b in 0..img.len() / META_BLOCK_SIZE {
        let mut bad = img.clone();
        bad[b * META_BLOCK_SIZE..(b + 1) * META_BLOCK_SIZE].fill(0);
        let _ = right_or_error(&bad, 1);
    }
    let mut bad = img.clone();
    bad[..META_BLOCK_SIZE].fill(0);
    let e = EraMetadata::from_bytes(&bad).unwrap_err();
    assert!(e.to_string().contains("bad magic"), "{e}");
}

/// Which checksum xor validates this block, if any.
fn block_kind(b: &[u8]) -> Option<u32> {
    [SUPERBLOCK_CSUM_XOR, BTREE_CSUM_XOR, ARRAY_CSUM_XOR]
        .into_iter()
        .find(|&x| dm_checksum(&b[4..], x) == le32(b, 0))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Mutations with the checksum fixed up again (as a bug writing consistent garbage, or
    /// a forger, would): the structural checks must hold without a panic or a hang.
    #[test]
    fn kernel_image_forged_mutations_never_panic(
        muts in prop::collection::vec((0usize..32, 0usize..4096, any::<u8>(), 0u8..4), 1..6),
        era in 0u32..6,
    ) {
        let mut img = fixture();
        for (b, off, v, how) in muts {
            let blk = &mut img[b * 4096..(b + 1) * 4096];
            let kind = block_kind(blk);
            let off = match how {
                // the header fields of nodes and array blocks
                0 => 4 + off % 28,
                // a key or value of a node
                1 => 32 + off % 512,
                _ => off,
            };
            blk[off] = v;
            if let Some(x) = kind {
                let c = dm_checksum(&blk[4..], x);
                blk[..4].copy_from_slice(&c.to_le_bytes());
            }
        }
        if let Ok(md) = EraMetadata::from_bytes(&img) {
            for v in [md.snapshot(), Ok(md.live())].into_iter().flatten() {
                if let Ok(r) = v.changed_since(era) {
                    let end = u64::from(v.superblock().nr_blocks) * v.superblock().data_block_bytes();
                    prop_assert!(r.iter().all(|&(o, n)| n > 0 && o + n <= end));
                }
                let _ = v.writesets();
                let _ = v.era_array();
            }
        }
    }

    /// Raw mutations (checksums not fixed): an error or the right answer.
    #[test]
    fn kernel_image_raw_mutations_are_caught(
        muts in prop::collection::vec((0usize..32 * 4096, any::<u8>()), 1..4),
        era in 0u32..6,
    ) {
        let mut img = fixture();
        for (off, v) in muts {
            img[off] = v;
        }
        let _ = right_or_error(&img, era);
    }
}

// ---- synthetic images: deeper trees and more eras than the kernel fixture ----

/// The blocks a model of the metadata says were written in eras >= `era`.
fn model(spec: &ImageSpec, era: u32, live: bool) -> Vec<(u64, u64)> {
    let mut set = BTreeSet::new();
    for (b, &e) in spec.eras.iter().enumerate() {
        if e >= era.max(1) {
            set.insert(b as u64);
        }
    }
    for (e, blocks) in &spec.writesets {
        if *e >= era {
            set.extend(blocks.iter().map(|&b| u64::from(b)));
        }
    }
    if live && spec.current_era >= era {
        if let Some(c) = &spec.current {
            set.extend(c.iter().map(|&b| u64::from(b)));
        }
    }
    let bs = u64::from(spec.data_block_size) * 512;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in set {
        match out.last_mut() {
            Some((o, n)) if *o + *n == b * bs => *n += bs,
            _ => out.push((b * bs, bs)),
        }
    }
    out
}

fn spec_strategy() -> impl Strategy<Value = ImageSpec> {
    (1u32..5000, 1u32..4, 0usize..2).prop_flat_map(|(nr, bs, small)| {
        let block = prop::collection::vec(0..nr, 0..40);
        (
            prop::collection::vec(0u32..8, nr as usize),
            prop::collection::vec((1u32..12, block.clone()), 0..5),
            prop::option::of(block),
        )
            .prop_map(move |(eras, writesets, current)| {
                let mut seen = BTreeSet::new();
                let writesets = writesets
                    .into_iter()
                    .filter(|(e, _)| seen.insert(*e))
                    .collect::<Vec<_>>();
                let mut writesets = writesets;
                writesets.sort_by_key(|w| w.0);
                ImageSpec {
                    data_block_size: bs * 8,
                    nr_blocks: nr,
                    current_era: 12,
                    eras,
                    writesets,
                    current,
                    snapshot: true,
                    max_entries: if small == 1 { 3 } else { 0 },
                }
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn synthetic_images_match_the_model(spec in spec_strategy(), era in 0u32..14) {
        let img = build(&spec);
        let md = EraMetadata::from_bytes(&img).unwrap();
        let snap = md.snapshot().unwrap();
        prop_assert_eq!(snap.era_array().unwrap(), spec.eras.clone());
        prop_assert_eq!(snap.changed_since(era).unwrap(), model(&spec, era, false));
        prop_assert_eq!(md.live().changed_since(era).unwrap(), model(&spec, era, true));
        let ws = snap.writesets().unwrap();
        prop_assert_eq!(ws.len(), spec.writesets.len());
        for (w, (e, blocks)) in ws.iter().zip(&spec.writesets) {
            prop_assert_eq!(w.era, *e);
            let want: BTreeSet<u32> = blocks.iter().copied().collect();
            prop_assert_eq!(w.blocks(), want.into_iter().collect::<Vec<_>>());
        }
    }
}

#[test]
fn deep_btrees_are_walked_in_order() {
    // 3 entries a node: 20000 blocks = 20 array blocks = a 3-level btree
    let nr = 20_000u32;
    let spec = ImageSpec {
        nr_blocks: nr,
        eras: (0..nr).map(|b| b % 7).collect(),
        writesets: (1..=10).map(|e| (e, vec![e * 100, nr - 1])).collect(),
        max_entries: 3,
        ..ImageSpec::default()
    };
    let img = build(&spec);
    let md = EraMetadata::from_bytes(&img).unwrap();
    let snap = md.snapshot().unwrap();
    assert_eq!(snap.era_array().unwrap(), spec.eras);
    assert_eq!(snap.writesets().unwrap().len(), 10);
    for era in [0, 1, 5, 7, 11] {
        assert_eq!(snap.changed_since(era).unwrap(), model(&spec, era, false));
    }
}

#[test]
fn no_snapshot_and_empty_metadata() {
    let spec = ImageSpec {
        nr_blocks: 10,
        eras: vec![0; 10],
        snapshot: false,
        ..ImageSpec::default()
    };
    let img = build(&spec);
    let md = EraMetadata::from_bytes(&img).unwrap();
    assert!(matches!(md.snapshot(), Err(MetaError::NoSnapshot)));
    assert_eq!(md.live().changed_since(0).unwrap(), vec![]);
    assert_eq!(md.live().writesets().unwrap(), vec![]);
}

/// Rewrites one field of block `b` and reseals it with `xor`.
fn patch(img: &mut [u8], b: usize, off: usize, bytes: &[u8], xor: u32) {
    let blk = &mut img[b * 4096..(b + 1) * 4096];
    blk[off..off + bytes.len()].copy_from_slice(bytes);
    let c = dm_checksum(&blk[4..], xor);
    blk[..4].copy_from_slice(&c.to_le_bytes());
}

#[test]
fn structural_corruption_is_named() {
    // 5 era-array blocks, 3 entries a node: an internal root over two leaves
    let nr = 5000u32;
    let spec = ImageSpec {
        nr_blocks: nr,
        eras: vec![1; nr as usize],
        writesets: vec![(2, vec![5])],
        max_entries: 3,
        ..ImageSpec::default()
    };
    let img = build(&spec);
    let md = EraMetadata::from_bytes(&img).unwrap();
    let ss = md.snapshot().unwrap().superblock().clone();
    let snap_loc = ss.location as usize;
    let array_root = ss.era_array_root as usize;
    let err = |img: &[u8]| -> String {
        let md = EraMetadata::from_bytes(img).unwrap();
        let e = md.snapshot().and_then(|s| s.changed_since(1)).unwrap_err();
        e.to_string()
    };
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Damage)> = vec![
        (
            "outside the metadata device",
            Box::new(move |i| patch(i, snap_loc, 208, &999u64.to_le_bytes(), SUPERBLOCK_CSUM_XOR)),
        ),
        (
            // a valid node copied to another block
            "belongs at block",
            Box::new(move |i| {
                let n = (i.len() / 4096) as u64;
                let copy = i[array_root * 4096..(array_root + 1) * 4096].to_vec();
                i.extend_from_slice(&copy);
                patch(i, snap_loc, 208, &n.to_le_bytes(), SUPERBLOCK_CSUM_XOR)
            }),
        ),
        (
            // the root internal node's first child is the node itself
            "reached twice",
            Box::new(move |i| {
                let max = le32(&i[array_root * 4096..], 20) as usize;
                patch(
                    i,
                    array_root,
                    32 + max * 8,
                    &(array_root as u64).to_le_bytes(),
                    BTREE_CSUM_XOR,
                )
            }),
        ),
        (
            "bad node flags",
            Box::new(move |i| patch(i, array_root, 4, &3u32.to_le_bytes(), BTREE_CSUM_XOR)),
        ),
        (
            "does not fit in a block",
            Box::new(move |i| patch(i, array_root, 20, &4000u32.to_le_bytes(), BTREE_CSUM_XOR)),
        ),
        (
            "nr_entries",
            Box::new(move |i| patch(i, array_root, 16, &200u32.to_le_bytes(), BTREE_CSUM_XOR)),
        ),
        (
            "out of order",
            Box::new(move |i| patch(i, array_root, 32, &u64::MAX.to_le_bytes(), BTREE_CSUM_XOR)),
        ),
        (
            "entries, want 5001",
            Box::new(move |i| {
                patch(
                    i,
                    snap_loc,
                    180,
                    &5001u32.to_le_bytes(),
                    SUPERBLOCK_CSUM_XOR,
                )
            }),
        ),
        (
            "checksum mismatch",
            Box::new(move |i| i[array_root * 4096 + 100] ^= 1),
        ),
    ];
    for (want, f) in cases {
        let mut bad = img.clone();
        f(&mut bad);
        let e = err(&bad);
        println!("{want}: {e}");
        assert!(e.contains(want), "want {want:?} in: {e}");
    }
}

#[test]
fn runs_and_clamping() {
    assert_eq!(runs(&[0b1011_0001], 8), vec![(0, 1), (4, 2), (7, 1)]);
    assert_eq!(runs(&[u64::MAX, 1], 65), vec![(0, 65)]);
    assert_eq!(runs(&[u64::MAX, u64::MAX], 70), vec![(0, 70)]);
    assert_eq!(
        clamp_ranges(vec![(0, 4096), (8192, 4096), (16384, 4096)], 10000),
        vec![(0, 4096), (8192, 1808)]
    );
}

#[test]
fn a_forged_huge_block_count_is_an_error_not_an_allocation() {
    let spec = ImageSpec {
        nr_blocks: 100,
        eras: vec![1; 100],
        ..ImageSpec::default()
    };
    let mut img = build(&spec);
    let snap = EraMetadata::from_bytes(&img)
        .unwrap()
        .superblock()
        .metadata_snap as usize;
    patch(
        &mut img,
        snap,
        180,
        &MAX_NR_BLOCKS.to_le_bytes(),
        SUPERBLOCK_CSUM_XOR,
    );
    let md = EraMetadata::from_bytes(&img).unwrap();
    let v = md.snapshot().unwrap();
    let e = v.changed_since(1).unwrap_err();
    assert!(e.to_string().contains("want 2147483647"), "{e}");
    assert!(v.era_array().is_err());
}

#[test]
fn a_writeset_without_a_bitset_recorded_nothing() {
    let spec = ImageSpec {
        nr_blocks: 100,
        eras: vec![0; 100],
        writesets: vec![(3, vec![7])],
        ..ImageSpec::default()
    };
    let mut img = build(&spec);
    let md = EraMetadata::from_bytes(&img).unwrap();
    let wt = md.snapshot().unwrap().superblock().writeset_tree_root as usize;
    assert_eq!(
        md.snapshot().unwrap().changed_since(3).unwrap(),
        vec![(7 * 4096, 4096)]
    );
    // the leaf's first value: nr_bits u32, then the root u64
    let max = le32(&img[wt * 4096..], 20) as usize;
    patch(
        &mut img,
        wt,
        32 + max * 8 + 4,
        &0u64.to_le_bytes(),
        BTREE_CSUM_XOR,
    );
    let md = EraMetadata::from_bytes(&img).unwrap();
    let v = md.snapshot().unwrap();
    assert_eq!(v.writesets().unwrap()[0].blocks(), Vec::<u32>::new());
    assert_eq!(v.changed_since(0).unwrap(), vec![]);
}
