//! Kernel attach against a real kernel: ignored on the host (no nbd there), run inside the
//! test VM by `scripts/kernel-vm/run-tests`.
//!
//! The filter is used in-process here (the `rewind export --attach` process, killed and
//! restarted, is tested in tools/tests/kernel_export.rs).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use agent_core::{ChangeLog, ChangeLogConfig, ChangeLogView, ChangeSink};
use filter_nbd::attach::{self, AttachMode, Method};
use filter_nbd::{AttachError, AttachOptions, Backing, Export, Server, ServerOptions};

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;

fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A backing file, its change log and a server exporting it.
struct Vol {
    dir: tempfile::TempDir,
    backing: PathBuf,
    cfg: ChangeLogConfig,
}

impl Vol {
    fn new(size: u64) -> Vol {
        let dir = tempfile::tempdir().unwrap();
        let backing = dir.path().join("vol.img");
        File::create(&backing).unwrap().set_len(size).unwrap();
        let mut cfg = ChangeLogConfig::new("kvol", size);
        cfg.shm_dir = dir.path().join("shm");
        cfg.state_dir = dir.path().join("state");
        cfg.block_size = BLOCK as u32;
        cfg.ring_bytes = 64 * MIB;
        Vol { dir, backing, cfg }
    }

    fn serve(&self) -> (Server, Arc<ChangeLog>) {
        let log = Arc::new(ChangeLog::open_or_create(self.cfg.clone()).unwrap());
        let backing = Backing::open(&self.backing, false).unwrap();
        let export = Export::new("kvol", Arc::new(backing))
            .with_sink(Some(log.clone() as Arc<dyn ChangeSink>));
        (
            Server::new(vec![export], ServerOptions::default()).unwrap(),
            log,
        )
    }

    fn image(&self) -> Vec<u8> {
        std::fs::read(&self.backing).unwrap()
    }
}

/// 4 KiB blocks that are not all zero.
fn nonzero_blocks(img: &[u8]) -> BTreeSet<u64> {
    img.chunks(BLOCK as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&b| b != 0))
        .map(|(i, _)| i as u64)
        .collect()
}

fn blocks_of(ranges: &[(u64, u64)]) -> BTreeSet<u64> {
    ranges
        .iter()
        .flat_map(|&(off, len)| off / BLOCK..(off + len).div_ceil(BLOCK))
        .collect()
}

fn opts(method: Method) -> AttachOptions {
    AttachOptions {
        method,
        timeout: Duration::from_secs(10),
        dead_conn_timeout: Duration::from_secs(60),
        ..AttachOptions::default()
    }
}

fn mnt() -> PathBuf {
    let p = Path::new("/tmp/kernel-attach-mnt");
    std::fs::create_dir_all(p).unwrap();
    p.to_path_buf()
}

fn write_files(dir: &Path, n: usize, tag: u8) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for i in 0..n {
        let p = dir.join(format!("f{i}"));
        let data: Vec<u8> = (0..(64 * 1024 + i * 4096))
            .map(|j| (j as u8).wrapping_mul(31).wrapping_add(tag ^ i as u8))
            .collect();
        let mut f = File::create(&p).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        out.push((p, data));
    }
    out
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn ext4_on_attached_nbd_survives_reattach_and_the_log_accounts_for_every_write() {
    let vol = Vol::new(64 * MIB);
    let dev = Path::new("/dev/nbd0");
    let mnt = mnt();
    let (server, log) = vol.serve();
    let a = attach::attach(&server, 0, dev, &opts(Method::Auto)).unwrap();
    println!("attached {} as {:?}", dev.display(), a.mode());
    assert_eq!(a.mode(), AttachMode::NetlinkConnect);
    assert!(attach::io_flusher_is_set(), "PR_SET_IO_FLUSHER not set");
    let info = attach::kernel_device_info(0).unwrap();
    assert_eq!(info.size, 64 * MIB);
    sh(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
            "/dev/nbd0",
        ],
    );
    sh("mount", &["-t", "ext4", "/dev/nbd0", mnt.to_str().unwrap()]);
    let files = write_files(&mnt, 8, 1);
    sh("umount", &[mnt.to_str().unwrap()]);
    a.detach().unwrap();
    assert!(!attach::is_configured(0));
    drop(server);
    log.close().unwrap();
    drop(log);

    // Reattach with a fresh server (the log reopened), verify.
    let (server, log) = vol.serve();
    let a = attach::attach(&server, 0, dev, &opts(Method::Auto)).unwrap();
    sh("mount", &["-t", "ext4", "/dev/nbd0", mnt.to_str().unwrap()]);
    for (p, data) in &files {
        assert_eq!(&std::fs::read(p).unwrap(), data, "{}", p.display());
    }
    sh("umount", &[mnt.to_str().unwrap()]);
    a.detach().unwrap();
    drop(server);
    log.close().unwrap();
    let path = log.path().to_path_buf();
    drop(log);

    // Every block that is not zero any more was written through the filter: the change log
    // (nothing has consumed it) must cover it.
    let changed = nonzero_blocks(&vol.image());
    let view = ChangeLogView::open(&path).unwrap();
    let logged = blocks_of(&view.uncommitted_ranges());
    let missing: Vec<_> = changed.difference(&logged).take(10).collect();
    println!(
        "ext4: {} blocks changed, {} blocks in the change log",
        changed.len(),
        logged.len()
    );
    assert!(!changed.is_empty());
    assert!(
        missing.is_empty(),
        "changed blocks missing from the log: {missing:?}"
    );
    drop(vol.dir);
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn ioctl_fallback_attaches_and_detaches() {
    let vol = Vol::new(16 * MIB);
    let (server, log) = vol.serve();
    let a = attach::attach(&server, 0, Path::new("/dev/nbd1"), &opts(Method::Ioctl)).unwrap();
    assert_eq!(a.mode(), AttachMode::Ioctl);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open("/dev/nbd1")
        .unwrap();
    let buf = AlignedBuf::new(64 * 1024, 0x5a);
    f.write_all_at(buf.as_slice(), 3 * MIB).unwrap();
    f.sync_all().unwrap();
    drop(f);
    a.detach().unwrap();
    let img = vol.image();
    assert!(img[3 * MIB as usize..3 * MIB as usize + 65536]
        .iter()
        .all(|&b| b == 0x5a));
    assert_eq!(
        blocks_of(&log.stats_ranges()),
        (3 * MIB / BLOCK..3 * MIB / BLOCK + 16).collect()
    );
    drop(server);
    log.close().unwrap();
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn abandoned_connection_is_taken_over_by_a_new_server_without_losing_writes() {
    let vol = Vol::new(16 * MIB);
    let dev = Path::new("/dev/nbd2");
    let (server, log) = vol.serve();
    let a = attach::attach(&server, 0, dev, &opts(Method::Netlink)).unwrap();
    // A writer that keeps writing (O_DIRECT + fdatasync) across the gap.
    let writer = std::thread::spawn(|| {
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open("/dev/nbd2")
            .unwrap();
        let mut acked = Vec::new();
        for i in 0..60u64 {
            let buf = AlignedBuf::new(BLOCK as usize, i as u8 + 1);
            if f.write_all_at(buf.as_slice(), i * BLOCK).is_ok() && f.sync_data().is_ok() {
                acked.push(i);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        acked
    });
    std::thread::sleep(Duration::from_millis(300));
    a.abandon(); // the agent goes away without disconnecting
    drop(server);
    log.close().unwrap();
    drop(log);
    std::thread::sleep(Duration::from_millis(500));
    assert!(attach::is_configured(2), "the kernel kept the device");
    let (server, log) = vol.serve();
    let a = attach::attach(&server, 0, dev, &opts(Method::Netlink)).unwrap();
    assert_eq!(a.mode(), AttachMode::NetlinkReconfigure);
    let acked = writer.join().unwrap();
    a.detach().unwrap();
    let img = vol.image();
    for i in &acked {
        let b = &img[(*i * BLOCK) as usize..((*i + 1) * BLOCK) as usize];
        assert!(
            b.iter().all(|&x| x == *i as u8 + 1),
            "acknowledged block {i} lost"
        );
    }
    println!(
        "reconnect: {} of 60 writes acknowledged, all present",
        acked.len()
    );
    assert_eq!(
        acked.len(),
        60,
        "writes must wait for the new server, not fail"
    );
    drop(server);
    log.close().unwrap();
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn bad_input_is_refused_clearly() {
    let vol = Vol::new(16 * MIB);
    let (server, log) = vol.serve();
    // A device that does not exist.
    let e = attach::attach(&server, 0, Path::new("/dev/nbd99"), &opts(Method::Auto)).unwrap_err();
    println!("nonexistent: {e}");
    assert!(matches!(e, AttachError::BadDevice { .. }), "{e}");
    // Not an NBD device.
    let e = attach::attach(&server, 0, Path::new("/dev/loop0"), &opts(Method::Auto)).unwrap_err();
    println!("not nbd: {e}");
    assert!(matches!(e, AttachError::BadDevice { .. }), "{e}");
    // A device served by a live server.
    let a = attach::attach(&server, 0, Path::new("/dev/nbd3"), &opts(Method::Auto)).unwrap();
    let (server2, _log2) = (server.clone(), ());
    let e = attach::attach(&server2, 0, Path::new("/dev/nbd3"), &opts(Method::Auto)).unwrap_err();
    println!("in use: {e}");
    assert!(matches!(e, AttachError::InUse { .. }), "{e}");
    // ... and it still works.
    let f = File::open("/dev/nbd3").unwrap();
    let mut b = [0u8; 512];
    f.read_exact_at(&mut b, 0).unwrap();
    drop(f);
    a.detach().unwrap();
    drop(server);
    log.close().unwrap();
}

/// A page-aligned buffer for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize, fill: u8) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: non-zero size layout.
        let ptr = unsafe { std::alloc::alloc(layout) };
        assert!(!ptr.is_null());
        // SAFETY: ptr is valid for len bytes.
        unsafe { std::ptr::write_bytes(ptr, fill, len) };
        AlignedBuf { ptr, len }
    }
    fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len, 4096).unwrap();
        // SAFETY: allocated in new with this layout.
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

// SAFETY: the buffer is owned and only read through &self.
unsafe impl Send for AlignedBuf {}

trait StatsRanges {
    fn stats_ranges(&self) -> Vec<(u64, u64)>;
}

impl StatsRanges for ChangeLog {
    fn stats_ranges(&self) -> Vec<(u64, u64)> {
        ChangeLogView::open(self.path())
            .unwrap()
            .uncommitted_ranges()
    }
}
