//! dm-era against a real kernel: ignored on the host (no device-mapper there), run inside the
//! test VM by `scripts/kernel-vm/run-tests`.
//!
//! Ground truth: the blocks each test writes through the era device are known, so what the
//! metadata parser reports back must be exactly those blocks.
//!
//! `era_fixture_image` also prints the metadata image it produced as `ERA-FIXTURE` lines
//! (shown with `REWIND_VM_TEST_ARGS="--nocapture era_fixture_image"`): that is where
//! `tests/fixtures/era-meta.sparse` came from.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use filter_dm::era::{EraMetadata, MetadataSource};
use filter_dm::{block, DevNum, DmControl, DmError, Era, EraError, LoopDevice};

const MIB: u64 = 1024 * 1024;
const BLOCK: u64 = 4096;

/// A loop device over a sparse file in a temporary directory.
struct Scratch {
    lo: LoopDevice,
    _dir: tempfile::TempDir,
}

impl Scratch {
    fn new(size: u64) -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        File::create(&path).unwrap().set_len(size).unwrap();
        let lo = LoopDevice::attach(&path).unwrap();
        Scratch { lo, _dir: dir }
    }
    fn dev(&self) -> DevNum {
        self.lo.dev()
    }
    fn image(&self) -> Vec<u8> {
        let f = File::open(self.lo.path()).unwrap();
        block::flush_buffers(&f).unwrap();
        let mut buf = vec![0u8; block::size_bytes(&f).unwrap() as usize];
        f.read_exact_at(&mut buf, 0).unwrap();
        buf
    }
}

/// Removes the dm device on drop, so that a failed assertion does not leak it.
struct Guard<'a> {
    dm: &'a DmControl,
    name: &'static str,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let _ = self.dm.remove(self.name);
    }
}

/// Writes one 4 KiB block (`tag` pattern) at each of `blocks` through the era device.
fn write_blocks(dm: &DmControl, name: &str, blocks: &[u64], tag: u8) {
    let f = OpenOptions::new()
        .write(true)
        .open(dm.node_path(name))
        .unwrap();
    for &b in blocks {
        let data: Vec<u8> = (0..BLOCK as usize)
            .map(|i| tag ^ (i as u8) ^ (b as u8))
            .collect();
        f.write_all_at(&data, b * BLOCK).unwrap();
    }
    f.sync_all().unwrap();
}

/// Coalesced byte ranges of a set of 4 KiB blocks.
fn ranges(blocks: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some((o, n)) if *o + *n == b * BLOCK => *n += BLOCK,
            _ => out.push((b * BLOCK, BLOCK)),
        }
    }
    out
}

fn set(v: &[u64]) -> BTreeSet<u64> {
    v.iter().copied().collect()
}

// 16384 tracked blocks: an era array of 17 array blocks, one bitset block per writeset.
const FIRST: &[u64] = &[0, 1, 2, 100, 1017, 1018, 1019, 5000, 16383];
const SECOND: &[u64] = &[1, 3, 4, 5, 700, 1018, 9000, 9001, 9002, 16382];

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn changed_since_matches_the_blocks_written() {
    let origin = Scratch::new(64 * MIB);
    let meta = Scratch::new(4 * MIB);
    let dm = DmControl::open().unwrap();
    let name = "rw-era-cdp";
    let era = Era::create(&dm, name, meta.dev(), origin.dev(), 8).unwrap();
    let _g = Guard { dm: &dm, name };
    let st = era.status().unwrap();
    println!("fresh: {st:?}");
    assert_eq!(st.metadata_block_sectors, 8);
    assert_eq!(st.held_metadata_root, None);
    assert!(st.used_metadata_blocks > 0 && st.used_metadata_blocks <= st.total_metadata_blocks);
    assert_eq!(st.total_metadata_blocks, 4 * MIB / BLOCK);
    let first_era = st.current_era;

    write_blocks(&dm, name, FIRST, 0x11);
    let second_era = era.checkpoint().unwrap();
    assert_eq!(second_era, first_era + 1);
    write_blocks(&dm, name, SECOND, 0x22);

    let root = era.take_metadata_snap().unwrap();
    let st = era.status().unwrap();
    assert_eq!(st.held_metadata_root, Some(root));
    assert_eq!(
        st.current_era,
        second_era + 1,
        "the snapshot starts a new era"
    );

    let md = era.read_metadata().unwrap();
    let live = md.superblock().clone();
    println!("live superblock: {live:?}");
    assert_eq!(live.metadata_snap, root);
    assert_eq!(live.nr_blocks, 16384);
    assert_eq!(live.data_block_size, 8);
    let snap = md.snapshot().unwrap();
    println!("snapshot superblock: {:?}", snap.superblock());
    assert_eq!(snap.superblock().current_era, second_era + 1);
    for ws in snap.writesets().unwrap() {
        println!(
            "writeset era {} nr_bits {}: {:?}",
            ws.era,
            ws.nr_bits,
            ws.blocks()
        );
    }
    let eras = snap.era_array().unwrap();
    assert_eq!(eras.len(), 16384);
    let digested: Vec<(usize, u32)> = eras
        .iter()
        .enumerate()
        .filter(|(_, &e)| e != 0)
        .map(|(b, &e)| (b, e))
        .collect();
    println!("era array (non-zero): {digested:?}");

    let (a, b) = (set(FIRST), set(SECOND));
    let both: BTreeSet<u64> = a.union(&b).copied().collect();
    assert_eq!(snap.changed_since(second_era).unwrap(), ranges(&b));
    assert_eq!(snap.changed_since(first_era).unwrap(), ranges(&both));
    assert_eq!(snap.changed_since(0).unwrap(), ranges(&both));
    assert_eq!(snap.changed_since(second_era + 1).unwrap(), vec![]);
    println!(
        "changed_since({second_era}) = {:?}",
        snap.changed_since(second_era).unwrap()
    );

    // a second snapshot is refused and changes nothing
    let e = era.take_metadata_snap().unwrap_err();
    println!("second snapshot: {e}");
    assert!(
        matches!(e, EraError::SnapshotAlreadyHeld { root: r, .. } if r == root),
        "{e}"
    );
    assert!(e.to_string().contains(name), "{e}");
    // (the used block count moves on its own: the kernel digests writesets in the background)
    let unchanged = |s: filter_dm::EraStatus| (s.current_era, s.held_metadata_root);
    assert_eq!(unchanged(era.status().unwrap()), unchanged(st));
    // the kernel refuses it too (the raw message, past our check), still changing nothing
    let e = dm.message(name, 0, "take_metadata_snap").unwrap_err();
    println!("raw second take_metadata_snap: {e}");
    assert_eq!(unchanged(era.status().unwrap()), unchanged(st));

    era.drop_metadata_snap().unwrap();
    assert_eq!(era.status().unwrap().held_metadata_root, None);
    assert!(matches!(
        era.drop_metadata_snap(),
        Err(EraError::NoSnapshotHeld { .. })
    ));

    // the one-call form: snapshot, read, drop; later writes land in the era it returns
    let (r, next) = era.changed_since(second_era).unwrap();
    assert_eq!(r, ranges(&b));
    assert_eq!(era.status().unwrap().held_metadata_root, None);
    assert_eq!(next, era.status().unwrap().current_era);
    write_blocks(&dm, name, &[42, 43], 0x33);
    let (r, _) = era.changed_since(next).unwrap();
    assert_eq!(r, ranges(&set(&[42, 43])));
    let (r, _) = era.changed_since(second_era).unwrap();
    assert_eq!(r, ranges(&b.union(&set(&[42, 43])).copied().collect()));

    // reopened by name
    let again = Era::open(&dm, name).unwrap();
    assert_eq!(again.metadata_dev(), meta.dev());
    assert_eq!(again.origin_dev(), origin.dev());
    assert_eq!(again.block_sectors(), 8);
    assert_eq!(again.len_bytes(), 64 * MIB);

    era.remove().unwrap();
    std::mem::forget(_g);
    assert!(matches!(dm.info(name), Err(DmError::NoSuchDevice { .. })));

    // After the removal the metadata holds the last era's writes in its live roots: what
    // the agent reads after a restart when the era target is not loaded.
    let img = meta.image();
    let md = EraMetadata::from_bytes(&img).unwrap();
    println!("after removal: {:?}", md.superblock());
    assert_eq!(md.superblock().metadata_snap, 0);
    let live = md.live();
    assert_eq!(
        live.changed_since(second_era).unwrap(),
        ranges(&b.union(&set(&[42, 43])).copied().collect())
    );
    assert_eq!(
        live.changed_since(0).unwrap(),
        ranges(&both.union(&set(&[42, 43])).copied().collect())
    );
    let last_era = md.superblock().current_era;

    // Loaded again over the same metadata (a reboot): the history is kept, the era moves on.
    let era = Era::create(&dm, name, meta.dev(), origin.dev(), 8).unwrap();
    let _g = Guard { dm: &dm, name };
    let resumed = era.status().unwrap().current_era;
    assert!(resumed > last_era, "{resumed} > {last_era}");
    write_blocks(&dm, name, &[7], 0x44);
    let (r, _) = era.changed_since(second_era).unwrap();
    assert_eq!(r, ranges(&b.union(&set(&[7, 42, 43])).copied().collect()));
    let (r, _) = era.changed_since(resumed).unwrap();
    assert_eq!(r, ranges(&set(&[7])));
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn errors_are_clear_and_leave_nothing_behind() {
    let origin = Scratch::new(8 * MIB); // 2048 blocks of 4 KiB
    let dm = DmControl::open().unwrap();
    let name = "rw-era-err";
    let absent = |dm: &DmControl| {
        assert!(matches!(dm.info(name), Err(DmError::NoSuchDevice { .. })));
        assert!(!dm.list().unwrap().iter().any(|(n, _)| n == name));
        assert!(!dm.node_path(name).exists());
    };

    // Too-small metadata devices: refused at table load (1 block: EINVAL, not even the
    // space map fits) or at resume (12 blocks: ENOSPC growing the era array). 16 is enough.
    for blocks in [1u64, 12] {
        let meta = Scratch::new(blocks * BLOCK);
        let e = Era::create(&dm, name, meta.dev(), origin.dev(), 8).unwrap_err();
        println!("{blocks} metadata blocks: {e}");
        assert!(
            matches!(&e, EraError::MetadataTooSmall { dev, bytes, .. }
                if *dev == meta.dev() && *bytes == blocks * BLOCK),
            "{e}"
        );
        let msg = e.to_string();
        assert!(msg.contains(&meta.dev().to_string()), "{msg}");
        assert!(msg.contains(&format!("{} bytes", blocks * BLOCK)), "{msg}");
        absent(&dm);
    }
    let meta = Scratch::new(16 * BLOCK);
    let era = Era::create(&dm, name, meta.dev(), origin.dev(), 8).unwrap();
    assert_eq!(era.status().unwrap().total_metadata_blocks, 16);
    era.remove().unwrap();
    absent(&dm);

    // devices that do not exist
    let nodev = DevNum::new(7, 1_000_000);
    for e in [
        Era::create(&dm, name, nodev, origin.dev(), 8).unwrap_err(),
        Era::create(&dm, name, meta.dev(), nodev, 8).unwrap_err(),
    ] {
        println!("no such device: {e}");
        assert!(
            matches!(e, EraError::NoSuchBlockDevice { dev, .. } if dev == nodev),
            "{e}"
        );
        absent(&dm);
    }
    let e = Era::open(&dm, "rw-era-absent").unwrap_err();
    println!("no such dm device: {e}");
    assert!(
        matches!(&e, EraError::Dm(DmError::NoSuchDevice { device, .. }) if device == "rw-era-absent"),
        "{e}"
    );
    // a bad block size never reaches the kernel
    let e = Era::create(&dm, name, meta.dev(), origin.dev(), 12).unwrap_err();
    assert!(matches!(e, EraError::BadBlockSize { sectors: 12 }), "{e}");
    absent(&dm);

    // operations on a device that went away
    let era = Era::create(&dm, name, meta.dev(), origin.dev(), 8).unwrap();
    dm.remove(name).unwrap();
    for e in [
        era.checkpoint().map(|_| ()).unwrap_err(),
        era.take_metadata_snap().map(|_| ()).unwrap_err(),
        era.status().map(|_| ()).unwrap_err(),
    ] {
        assert!(
            matches!(e, EraError::Dm(DmError::NoSuchDevice { .. })),
            "{e}"
        );
        assert!(e.to_string().contains(name), "{e}");
    }
    absent(&dm);

    // a device that is not an era device
    dm.create_with_table(name, None, &[filter_dm::Target::new(0, 8, "zero", "")])
        .unwrap();
    let _g = Guard { dm: &dm, name };
    let e = Era::open(&dm, name).unwrap_err();
    assert!(matches!(e, EraError::NotEra { .. }), "{e}");
}

// The fixture: 2048 blocks of 4 KiB, three eras of writes, then a metadata snapshot.
const FIX_ERAS: [&[u64]; 3] = [
    &[0, 1, 2, 3, 1017, 1018, 2047],
    &[2, 10, 11, 1500],
    &[3, 4, 1018, 2000, 2046],
];

/// An image that records which 4 KiB blocks were read.
struct Recorder {
    img: Vec<u8>,
    read: std::cell::RefCell<BTreeSet<u64>>,
}

impl MetadataSource for Recorder {
    fn len_bytes(&self) -> std::io::Result<u64> {
        Ok(self.img.len() as u64)
    }
    fn read_at(&self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let mut r = self.read.borrow_mut();
        for b in off / BLOCK..(off + buf.len() as u64).div_ceil(BLOCK) {
            r.insert(b);
        }
        self.img.read_at(off, buf)
    }
}

/// The sparse form of a metadata image: `RWSPARS1`, the image length (u64 LE), then each
/// non-zero 4 KiB block as its index (u64 LE) and its bytes.
fn sparse(img: &[u8]) -> Vec<u8> {
    let mut out = b"RWSPARS1".to_vec();
    out.extend_from_slice(&(img.len() as u64).to_le_bytes());
    for (i, b) in img.chunks(BLOCK as usize).enumerate() {
        if b.iter().any(|&x| x != 0) {
            out.extend_from_slice(&(i as u64).to_le_bytes());
            out.extend_from_slice(b);
        }
    }
    out
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn era_fixture_image() {
    let origin = Scratch::new(8 * MIB);
    let meta = Scratch::new(32 * BLOCK);
    let dm = DmControl::open().unwrap();
    let name = "rw-era-fixture";
    let era = Era::create(&dm, name, meta.dev(), origin.dev(), 8).unwrap();
    let _g = Guard { dm: &dm, name };
    let mut eras = Vec::new();
    for (i, blocks) in FIX_ERAS.iter().enumerate() {
        if i > 0 {
            era.checkpoint().unwrap();
        }
        eras.push(era.status().unwrap().current_era);
        write_blocks(&dm, name, blocks, i as u8);
    }
    era.take_metadata_snap().unwrap();
    let img = meta.image();
    era.drop_metadata_snap().unwrap();

    // Keep only the blocks the parser reads (both views): the rest is the space map and
    // free blocks, zeroed so that the fixture stays small.
    let rec = Recorder {
        img,
        read: Default::default(),
    };
    let md = EraMetadata::open(Box::new(rec)).unwrap();
    let truth = |i: usize| -> Vec<(u64, u64)> {
        let mut t = BTreeSet::new();
        for blocks in &FIX_ERAS[i..] {
            t.extend(blocks.iter().copied());
        }
        ranges(&t)
    };
    for view in [md.snapshot().unwrap(), md.live()] {
        for (i, &e) in eras.iter().enumerate() {
            assert_eq!(view.changed_since(e).unwrap(), truth(i), "since era {e}");
        }
        view.writesets().unwrap();
        view.era_array().unwrap();
    }
    let src = md.into_source();
    let mut img = src.img.clone();
    for (i, b) in img.chunks_mut(BLOCK as usize).enumerate() {
        if !src.read.borrow().contains(&(i as u64)) {
            b.fill(0);
        }
    }
    let md = EraMetadata::from_bytes(&img).unwrap();
    for view in [md.snapshot().unwrap(), md.live()] {
        for (i, &e) in eras.iter().enumerate() {
            assert_eq!(
                view.changed_since(e).unwrap(),
                truth(i),
                "trimmed, since era {e}"
            );
        }
    }
    let s = sparse(&img);
    println!(
        "ERA-FIXTURE-TRUTH eras={eras:?} blocks={FIX_ERAS:?} image={} sparse={}",
        img.len(),
        s.len()
    );
    for chunk in s.chunks(64) {
        let hex: String = chunk.iter().map(|b| format!("{b:02x}")).collect();
        println!("ERA-FIXTURE {hex}");
    }
}
