//! Hot insertion of the NBD filter under a live, mounted dm device, and the dm-era catch-up
//! after the filter was down: against a real kernel, ignored on the host, run inside the test
//! VM by `scripts/kernel-vm/run-tests`.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent_core::{ChangeLog, ChangeLogConfig, ChangeLogView, ChangeSink};
use filter_dm::insert::{self, InsertError};
use filter_dm::{DevNum, DmControl, DmError, Era, EraError, LoopDevice, Target};
use filter_nbd::attach::{self, Method};
use filter_nbd::{AttachOptions, Backing, Export, Server, ServerOptions};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn devnum(path: &Path) -> DevNum {
    DevNum::from_rdev(std::fs::metadata(path).unwrap().rdev())
}

/// Removes dm devices and detaches on drop, so a failed assertion does not leak them.
struct Cleanup<'a> {
    dm: &'a DmControl,
    names: Vec<String>,
    mount: Option<PathBuf>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Some(m) = &self.mount {
            let _ = Command::new("umount").arg(m).status();
        }
        for n in &self.names {
            let _ = self.dm.remove(n);
        }
    }
}

/// A filter serving `backing` with a fresh change log, attached to `/dev/nbd<index>`.
struct Filter {
    server: Server,
    log: Arc<ChangeLog>,
    attached: Option<filter_nbd::Attached>,
}

impl Filter {
    fn start(backing: &Path, dir: &Path, volume: &str, index: u32, block_size: u32) -> Filter {
        let b = Backing::open(backing, false).unwrap();
        let mut cfg = ChangeLogConfig::new(volume, b_size(&b));
        cfg.shm_dir = dir.join("shm");
        cfg.state_dir = dir.join("state");
        cfg.block_size = BLOCK as u32;
        cfg.ring_bytes = 32 * MIB;
        let log = Arc::new(ChangeLog::open_or_create(cfg).unwrap());
        let export =
            Export::new(volume, Arc::new(b)).with_sink(Some(log.clone() as Arc<dyn ChangeSink>));
        let server = Server::new(vec![export], ServerOptions::default()).unwrap();
        let opts = AttachOptions {
            block_size,
            method: Method::Netlink,
            timeout: Duration::from_secs(20),
            dead_conn_timeout: Duration::from_secs(30),
            ..Default::default()
        };
        let dev = PathBuf::from(format!("/dev/nbd{index}"));
        let attached = Some(attach::attach(&server, 0, &dev, &opts).unwrap());
        Filter {
            server,
            log,
            attached,
        }
    }
    fn logged_blocks(&self) -> BTreeSet<u64> {
        blocks_of(
            &ChangeLogView::open(self.log.path())
                .unwrap()
                .uncommitted_ranges(),
        )
    }
    fn stop(mut self) {
        if let Some(a) = self.attached.take() {
            a.detach().unwrap();
        }
        drop(self.server);
        self.log.close().unwrap();
    }
}

fn b_size(b: &Backing) -> u64 {
    use filter_nbd::BlockSource;
    b.size()
}

fn blocks_of(ranges: &[(u64, u64)]) -> BTreeSet<u64> {
    ranges
        .iter()
        .flat_map(|&(off, len)| off / BLOCK..(off + len).div_ceil(BLOCK))
        .collect()
}

fn changed_blocks(a: &[u8], b: &[u8]) -> BTreeSet<u64> {
    a.chunks(BLOCK as usize)
        .zip(b.chunks(BLOCK as usize))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i as u64)
        .collect()
}

fn file_data(n: u64) -> Vec<u8> {
    let len = 16 * 1024 + (n % 7) as usize * 4096;
    (0..len)
        .map(|j| (j as u64).wrapping_mul(2654435761).wrapping_add(n * 97) as u8)
        .collect()
}

/// Writes files `w<n>` (content derived from n) with fsync in a loop; holds `gate` while
/// writing one file so the test can pause it. Returns the files whose fsync returned.
fn writer(dir: PathBuf, gate: Arc<Mutex<()>>, stop: Arc<AtomicBool>) -> Vec<u64> {
    let mut acked = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        {
            let _g = gate.lock().unwrap();
            let p = dir.join(format!("w{}", n % 200));
            let mut f = File::create(&p).unwrap();
            f.write_all(&file_data(n)).unwrap();
            f.sync_all().unwrap();
            acked.push(n);
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    acked
}

fn fio(dir: &Path, secs: u32) -> Child {
    Command::new("fio")
        .args([
            "--name=fv",
            &format!("--filename={}/fio.dat", dir.display()),
            "--size=4M",
            "--bs=4k",
            "--rw=randwrite",
            "--ioengine=psync",
            "--fsync=8",
            "--verify=crc32c",
            "--verify_backlog=16",
            "--verify_fatal=1",
            "--time_based",
            &format!("--runtime={secs}"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn hot_insert_and_remove_under_a_mounted_ext4_with_writers() {
    let dm = DmControl::open().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    File::create(&img).unwrap().set_len(64 * MIB).unwrap();
    let lo = LoopDevice::attach(&img).unwrap();
    let live = "rw-live";
    let sectors = 64 * MIB / 512;
    let mut cleanup = Cleanup {
        dm: &dm,
        names: vec![live.into(), format!("{live}{}", insert::ORIGIN_SUFFIX)],
        mount: None,
    };
    dm.create_with_table(live, None, &[Target::linear(0, sectors, lo.dev(), 0)])
        .unwrap();
    let node = dm.node_path(live);
    sh(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
            node.to_str().unwrap(),
        ],
    );
    let mnt = PathBuf::from("/tmp/insert-mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    sh("mount", &[node.to_str().unwrap(), mnt.to_str().unwrap()]);
    cleanup.mount = Some(mnt.clone());

    let gate = Arc::new(Mutex::new(()));
    let stop = Arc::new(AtomicBool::new(false));
    let w = {
        let (d, g, s) = (mnt.clone(), gate.clone(), stop.clone());
        std::thread::spawn(move || writer(d, g, s))
    };
    let fio_child = fio(&mnt, 10);
    std::thread::sleep(Duration::from_millis(1500));

    // The image of the underlying device is read while the live device is suspended at
    // insertion and at removal: exactly the writes made while inserted separate the two.
    let mut before = Vec::new();
    let prep = insert::prepare(&dm, live).unwrap();
    let bs = prep.logical_block_size().unwrap();
    let filter = Filter::start(&prep.origin_path(), dir.path(), "live", 4, bs);
    assert!(
        filter.logged_blocks().is_empty(),
        "writes before insertion reached the log"
    );
    let ins = prep
        .insert_with(devnum(Path::new("/dev/nbd4")), || {
            before = std::fs::read(&img).unwrap()
        })
        .unwrap();
    assert_eq!(
        dm.table(live).unwrap(),
        vec![Target::linear(
            0,
            sectors,
            devnum(Path::new("/dev/nbd4")),
            0
        )]
    );
    // Both writers run through the filter.
    std::thread::sleep(Duration::from_secs(3));
    let mut after = Vec::new();
    let removed = match ins.remove_with(|| after = std::fs::read(&img).unwrap()) {
        Ok(r) => r,
        Err(b) => panic!("removal failed: {}", b.1),
    };
    assert_eq!(
        dm.table(live).unwrap(),
        vec![Target::linear(0, sectors, lo.dev(), 0)]
    );
    let logged = filter.logged_blocks();
    // Writes after the removal must not reach the log.
    std::thread::sleep(Duration::from_secs(1));
    sh("sync", &[]);
    assert_eq!(
        filter.logged_blocks(),
        logged,
        "writes after removal reached the log"
    );
    filter.stop();
    removed.finish().unwrap();

    // A second cycle without image reads measures the I/O pause (writers still running).
    std::fs::create_dir_all(dir.path().join("2")).unwrap();
    let prep = insert::prepare(&dm, live).unwrap();
    let filter = Filter::start(&prep.origin_path(), &dir.path().join("2"), "live2", 4, bs);
    let ins = prep.insert(devnum(Path::new("/dev/nbd4"))).unwrap();
    let pause_in = ins.pause;
    std::thread::sleep(Duration::from_secs(1));
    let removed = ins.remove().map_err(|b| b.1).unwrap();
    let pause_out = removed.pause;
    filter.stop();
    removed.finish().unwrap();

    let fio_out = fio_child.wait_with_output().unwrap();
    let fio_text = String::from_utf8_lossy(&fio_out.stdout).into_owned()
        + &String::from_utf8_lossy(&fio_out.stderr);
    stop.store(true, Ordering::SeqCst);
    let acked = w.join().unwrap();

    let changed = changed_blocks(&before, &after);
    let missing: Vec<_> = changed.difference(&logged).take(10).collect();
    println!(
        "INSERT pause {:.1} ms, REMOVE pause {:.1} ms (under fio + fsync writer); {} blocks changed while inserted, {} logged; {} files written",
        pause_in.as_secs_f64() * 1e3,
        pause_out.as_secs_f64() * 1e3,
        changed.len(),
        logged.len(),
        acked.len()
    );
    assert!(!changed.is_empty());
    assert!(
        missing.is_empty(),
        "changed while inserted but not logged: {missing:?}"
    );
    let errs = fio_text
        .lines()
        .filter(|l| l.contains("verify") && (l.contains("bad") || l.contains("fail")))
        .count();
    println!(
        "fio: exit {:?}, {} verify error lines; {}",
        fio_out.status.code(),
        errs,
        fio_text
            .lines()
            .find(|l| l.contains("WRITE:"))
            .unwrap_or("")
            .trim()
    );
    assert!(fio_out.status.success(), "fio failed: {fio_text}");
    assert_eq!(errs, 0, "{fio_text}");

    // Remount and verify the last version of every file whose fsync returned.
    sh("umount", &[mnt.to_str().unwrap()]);
    sh("mount", &[node.to_str().unwrap(), mnt.to_str().unwrap()]);
    let mut last = std::collections::HashMap::new();
    for n in &acked {
        last.insert(n % 200, *n);
    }
    for (slot, n) in &last {
        let got = std::fs::read(mnt.join(format!("w{slot}"))).unwrap();
        assert!(got == file_data(*n), "file w{slot} (version {n}) corrupt");
    }
    println!("verified {} files", last.len());
    drop(cleanup);
    lo.detach().unwrap();
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn insertion_bad_input_leaves_nothing_changed() {
    let dm = DmControl::open().unwrap();
    // A device that does not exist.
    let e = insert::prepare(&dm, "rw-no-such-device").unwrap_err();
    println!("no such device: {e}");
    assert!(
        matches!(e, InsertError::Dm(DmError::NoSuchDevice { .. })),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    File::create(&img).unwrap().set_len(16 * MIB).unwrap();
    let lo = LoopDevice::attach(&img).unwrap();
    let live = "rw-bad";
    let origin = format!("{live}{}", insert::ORIGIN_SUFFIX);
    let cleanup = Cleanup {
        dm: &dm,
        names: vec![live.into(), origin.clone()],
        mount: None,
    };
    let table = vec![Target::linear(0, 16 * MIB / 512, lo.dev(), 0)];
    dm.create_with_table(live, None, &table).unwrap();

    // The origin name is in use by another device: refused, nothing changed.
    dm.create_with_table(&origin, None, &table).unwrap();
    let e = insert::prepare(&dm, live).unwrap_err();
    println!("origin in use: {e}");
    assert!(
        matches!(e, InsertError::Dm(DmError::NameInUse { .. })),
        "{e}"
    );
    assert_eq!(dm.table(live).unwrap(), table);
    dm.remove(&origin).unwrap();

    // A filter device that is not attached (size 0): refused, table and origin restored.
    let prep = insert::prepare(&dm, live).unwrap();
    let e = prep.insert(devnum(Path::new("/dev/nbd5"))).unwrap_err();
    println!("filter not attached: {e}");
    assert!(matches!(e, InsertError::SizeMismatch { .. }), "{e}");
    assert_eq!(dm.table(live).unwrap(), table);
    assert!(!dm.info(live).unwrap().suspended);
    assert!(dm.info(&origin).is_err(), "origin left behind");

    // A live device in use (open) cannot be removed: a clear Busy error, table unchanged.
    let f = File::open(dm.node_path(live)).unwrap();
    let e = dm.remove(live).unwrap_err();
    println!("in use: {e}");
    assert!(matches!(e, DmError::Busy { .. }), "{e}");
    drop(f);
    assert_eq!(dm.table(live).unwrap(), table);

    // Already inserted: refused.
    let prep = insert::prepare(&dm, live).unwrap();
    let filter = Filter::start(&prep.origin_path(), dir.path(), "bad", 5, 512);
    let ins = prep.insert(devnum(Path::new("/dev/nbd5"))).unwrap();
    let e = insert::prepare(&dm, live).unwrap_err();
    println!("already inserted: {e}");
    assert!(matches!(e, InsertError::AlreadyInserted { .. }), "{e}");
    let removed = ins.remove().map_err(|b| b.1).unwrap();
    assert_eq!(dm.table(live).unwrap(), table);
    filter.stop();
    removed.finish().unwrap();
    drop(cleanup);
    lo.detach().unwrap();
}

/// Writes one 4 KiB block `tag` at each of `blocks` with O_DIRECT through `path`.
fn write_blocks(path: &Path, blocks: &[u64], tag: u8) {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc_o_direct())
        .open(path)
        .unwrap();
    let mut buf = AlignedBlock::new();
    for &b in blocks {
        buf.fill(tag ^ b as u8);
        f.write_all_at(buf.as_slice(), b * BLOCK).unwrap();
    }
    f.sync_all().unwrap();
}

fn libc_o_direct() -> i32 {
    0o40000
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn dm_era_catches_up_writes_made_while_the_filter_was_down() {
    let dm = DmControl::open().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.img");
    let meta = dir.path().join("meta.img");
    File::create(&data).unwrap().set_len(32 * MIB).unwrap();
    File::create(&meta).unwrap().set_len(4 * MIB).unwrap();
    let lo_data = LoopDevice::attach(&data).unwrap();
    let lo_meta = LoopDevice::attach(&meta).unwrap();
    let name = "rw-era";
    let _cleanup = Cleanup {
        dm: &dm,
        names: vec![name.into()],
        mount: None,
    };
    let era = Era::create(&dm, name, lo_meta.dev(), lo_data.dev(), 8).unwrap();
    let era_path = dm.node_path(name);

    // Filter up: writes through /dev/nbd6 are logged by the filter.
    let filter = Filter::start(&era_path, dir.path(), "eravol", 6, 4096);
    let up: Vec<u64> = vec![1, 2, 3, 100, 2000];
    write_blocks(Path::new("/dev/nbd6"), &up, 0x11);
    // Before going down, the agent checkpoints: writes from now on are in era `since`.
    let since = era.checkpoint().unwrap();
    let logged_up = filter.logged_blocks();
    filter.stop();

    // Filter down: writes straight to the era device, bypassing the filter (ground truth).
    let down: Vec<u64> = vec![5, 6, 7, 8, 1000, 4096, 8000, 8191];
    write_blocks(&era_path, &down, 0x22);

    // Bad input: a metadata snapshot already held is refused clearly, nothing changed.
    era.take_metadata_snap().unwrap();
    let e = era.changed_since(since).unwrap_err();
    println!("snapshot held: {e}");
    assert!(matches!(e, EraError::SnapshotAlreadyHeld { .. }), "{e}");
    era.drop_metadata_snap().unwrap();

    // Filter restarts: the era metadata says what changed while it was down; merge that into
    // the change log (dirty, no data: begin + abort) before serving again.
    let (ranges, next) = era.changed_since(since).unwrap();
    let found = blocks_of(&ranges);
    println!(
        "era: since era {since}: {} blocks changed (next era {next}): {ranges:?}",
        found.len()
    );
    assert_eq!(found, down.iter().copied().collect::<BTreeSet<_>>());
    let filter = Filter::start(&era_path, dir.path(), "eravol", 6, 4096);
    for &(off, len) in &ranges {
        let t = filter.log.begin(off, len);
        filter.log.abort(t);
    }
    let logged = filter.logged_blocks();
    let truth: BTreeSet<u64> = up.iter().chain(&down).copied().collect();
    assert!(
        logged_up.iter().all(|b| logged.contains(b)),
        "log lost the writes made while up"
    );
    assert_eq!(logged, truth, "log after catch-up vs ground truth");
    filter.stop();
    era.remove().unwrap();
    lo_data.detach().unwrap();
    lo_meta.detach().unwrap();
}

/// A page-aligned 4 KiB buffer for O_DIRECT.
struct AlignedBlock {
    ptr: *mut u8,
}

impl AlignedBlock {
    fn layout() -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(BLOCK as usize, 4096).unwrap()
    }
    fn new() -> AlignedBlock {
        // SAFETY: non-zero size layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(Self::layout()) };
        assert!(!ptr.is_null());
        AlignedBlock { ptr }
    }
    fn fill(&mut self, v: u8) {
        // SAFETY: ptr is valid for BLOCK bytes.
        unsafe { std::ptr::write_bytes(self.ptr, v, BLOCK as usize) };
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for BLOCK initialised bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, BLOCK as usize) }
    }
}

impl Drop for AlignedBlock {
    fn drop(&mut self) {
        // SAFETY: allocated in new with this layout.
        unsafe { std::alloc::dealloc(self.ptr, Self::layout()) };
    }
}
