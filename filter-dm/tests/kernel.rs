//! Device-mapper tests against a real kernel. The development machines have no
//! device-mapper, so these are ignored on the host and run inside the test VM by
//! `scripts/kernel-vm/run-tests` (which passes `--include-ignored`).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use filter_dm::{block, DevNum, DmControl, DmError, LoopDevice, Target};

const MIB: u64 = 1024 * 1024;

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
    /// Reads `len` bytes at byte offset `off` of the loop device, bypassing cached pages.
    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        read_dev(self.lo.path(), off, len)
    }
    fn write(&self, off: u64, data: &[u8]) {
        write_dev(self.lo.path(), off, data)
    }
}

fn read_dev(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).unwrap();
    block::flush_buffers(&f).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off).unwrap();
    buf
}

fn write_dev(path: &Path, off: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, off).unwrap();
    f.sync_all().unwrap();
    block::flush_buffers(&f).unwrap();
}

/// Removes the dm device on drop, so that a failed assertion does not leak it into the next
/// test.
struct Dm<'a> {
    dm: &'a DmControl,
    name: &'static str,
}

impl Drop for Dm<'_> {
    fn drop(&mut self) {
        let _ = self.dm.resume(self.name);
        let _ = self.dm.remove(self.name);
    }
}

fn pattern(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| tag ^ (i as u8).wrapping_mul(31)).collect()
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn version_is_4() {
    let dm = DmControl::open().unwrap();
    let (major, minor, patch) = dm.version().unwrap();
    println!("device-mapper ioctl interface {major}.{minor}.{patch}");
    assert_eq!(major, 4);
    assert!(minor >= 27, "minor {minor}");
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn linear_write_lands_on_the_underlying_device() {
    let disk = Scratch::new(8 * MIB);
    let dm = DmControl::open().unwrap();
    let name = "rw-linear";
    let info = dm
        .create_with_table(
            name,
            Some("rewind-test-linear"),
            &[Target::linear(0, 4096, disk.dev(), 2048)],
        )
        .unwrap();
    let _g = Dm { dm: &dm, name };
    assert!(info.active_table && !info.suspended);
    let node = dm.node_path(name);
    let dev = block::dev_num(&File::open(&node).unwrap()).unwrap();
    assert_eq!(dev, info.dev);
    assert_eq!(
        block::size_bytes(&File::open(&node).unwrap()).unwrap(),
        4096 * 512
    );

    let data = pattern(0x5a, 64 * 1024);
    write_dev(&node, 8192, &data);
    assert_eq!(disk.read(2048 * 512 + 8192, data.len()), data);
    // and the other way round: written below, read through the mapping
    let below = pattern(0xc3, 4096);
    disk.write(2048 * 512, &below);
    assert_eq!(read_dev(&node, 0, 4096), below);
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn multi_target_table_round_trips() {
    let disk = Scratch::new(8 * MIB);
    let dm = DmControl::open().unwrap();
    let name = "rw-multi";
    let table = vec![
        Target::linear(0, 1024, disk.dev(), 8192),
        Target::new(1024, 1024, "zero", ""),
        Target::linear(2048, 1000, disk.dev(), 0),
        Target::new(3048, 8, "error", ""),
    ];
    dm.create_with_table(name, None, &table).unwrap();
    let _g = Dm { dm: &dm, name };
    assert_eq!(dm.table(name).unwrap(), table);
    let st = dm.status(name).unwrap();
    assert_eq!(st.len(), 4);
    assert_eq!(
        st.iter()
            .map(|t| t.target_type.as_str())
            .collect::<Vec<_>>(),
        ["linear", "zero", "linear", "error"]
    );
    let info = dm.info(name).unwrap();
    assert_eq!(info.target_count, 4);

    let data = pattern(0x11, 4096);
    write_dev(&dm.node_path(name), 2048 * 512, &data);
    assert_eq!(disk.read(0, 4096), data);
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn suspend_load_resume_switches_the_mapping() {
    let disk = Scratch::new(8 * MIB);
    let dm = DmControl::open().unwrap();
    let name = "rw-switch";
    let a = [Target::linear(0, 2048, disk.dev(), 0)];
    let b = [Target::linear(0, 2048, disk.dev(), 4096)];
    dm.create_with_table(name, None, &a).unwrap();
    let _g = Dm { dm: &dm, name };
    let node = dm.node_path(name);
    let pa = pattern(0xaa, 4096);
    write_dev(&node, 0, &pa);
    assert_eq!(disk.read(0, 4096), pa);

    // by hand: load into the inactive slot, suspend, resume
    dm.load_table(name, &b).unwrap();
    let i = dm.info(name).unwrap();
    assert!(i.inactive_table && i.active_table && !i.suspended, "{i:?}");
    assert_eq!(
        dm.table(name).unwrap(),
        a,
        "a loaded table is not live before resume"
    );
    dm.suspend(name).unwrap();
    assert!(dm.info(name).unwrap().suspended);
    dm.resume(name).unwrap();
    let i = dm.info(name).unwrap();
    assert!(!i.suspended && !i.inactive_table, "{i:?}");
    assert_eq!(dm.table(name).unwrap(), b);
    let pb = pattern(0xbb, 4096);
    write_dev(&node, 0, &pb);
    assert_eq!(disk.read(4096 * 512, 4096), pb);
    assert_eq!(
        disk.read(0, 4096),
        pa,
        "the old mapping's data is untouched"
    );

    // and with the all-or-nothing helper, back to A
    dm.reload_preserving(name, &a).unwrap();
    assert_eq!(dm.table(name).unwrap(), a);
    assert!(!dm.info(name).unwrap().suspended);
    assert_eq!(read_dev(&node, 0, 4096), pa);
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn reload_keeps_an_open_device_working() {
    // hot insertion shape: the device stays open by a user across the swap
    let disk = Scratch::new(8 * MIB);
    let dm = DmControl::open().unwrap();
    let name = "rw-open-reload";
    dm.create_with_table(name, None, &[Target::linear(0, 2048, disk.dev(), 0)])
        .unwrap();
    let _g = Dm { dm: &dm, name };
    let user = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dm.node_path(name))
        .unwrap();
    assert_eq!(dm.info(name).unwrap().open_count, 1);
    dm.reload_preserving(name, &[Target::linear(0, 2048, disk.dev(), 8192)])
        .unwrap();
    let data = pattern(0x77, 4096);
    user.write_all_at(&data, 4096).unwrap();
    user.sync_all().unwrap();
    assert_eq!(disk.read(8192 * 512 + 4096, 4096), data);
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn list_info_and_remove() {
    let disk = Scratch::new(4 * MIB);
    let dm = DmControl::open().unwrap();
    let name = "rw-list";
    let info = dm
        .create_with_table(
            name,
            Some("rewind-test-list"),
            &[Target::linear(0, 100, disk.dev(), 0)],
        )
        .unwrap();
    let mut guard = Some(Dm { dm: &dm, name });
    assert_eq!(info.name, name);
    assert_eq!(info.uuid, "rewind-test-list");
    assert_eq!(info.open_count, 0);
    assert!(!info.read_only);
    let list = dm.list().unwrap();
    assert!(list.contains(&(name.to_string(), info.dev)), "{list:?}");
    assert_eq!(
        std::fs::read_to_string(format!("/sys/dev/block/{}/dm/name", info.dev))
            .unwrap()
            .trim(),
        name
    );
    // the linear target's status line is empty, its table line names the device
    assert_eq!(
        dm.status(name).unwrap(),
        [Target::new(0, 100, "linear", "")]
    );
    assert_eq!(
        dm.table(name).unwrap()[0].params,
        format!("{} 0", disk.dev())
    );

    dm.remove(name).unwrap();
    std::mem::forget(guard.take());
    assert!(!dm.node_path(name).exists(), "node removed with the device");
    assert!(matches!(dm.info(name), Err(DmError::NoSuchDevice { .. })));
    assert!(!dm.list().unwrap().iter().any(|(n, _)| n == name));
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn errors_name_the_device_and_change_nothing() {
    let disk = Scratch::new(4 * MIB);
    let dm = DmControl::open().unwrap();

    // no such device
    for r in [
        dm.info("rw-absent").map(|_| ()),
        dm.suspend("rw-absent"),
        dm.resume("rw-absent"),
        dm.remove("rw-absent"),
        dm.table("rw-absent").map(|_| ()),
        dm.load_table("rw-absent", &[Target::new(0, 8, "zero", "")]),
    ] {
        let e = r.unwrap_err();
        assert!(matches!(e, DmError::NoSuchDevice { .. }), "{e}");
        assert!(e.to_string().contains("rw-absent"), "{e}");
    }

    let name = "rw-errors";
    let good = [Target::linear(0, 2048, disk.dev(), 0)];
    dm.create_with_table(name, None, &good).unwrap();
    let _g = Dm { dm: &dm, name };

    // duplicate name
    let e = dm.create(name, None).unwrap_err();
    assert!(matches!(e, DmError::NameInUse { .. }), "{e}");
    println!("duplicate: {e}");

    // invalid tables: unknown target type, a device that does not exist, past the device end
    for bad in [
        vec![Target::new(0, 2048, "no-such-target", "")],
        vec![Target::new(0, 2048, "linear", "garbage")],
        vec![Target::new(0, 2048, "linear", "/dev/rw-no-such-disk 0")],
        // overlapping targets
        vec![
            Target::linear(0, 2048, disk.dev(), 0),
            Target::linear(100, 8, disk.dev(), 0),
        ],
        // past the end of the 4 MiB disk
        vec![Target::linear(0, 2048, disk.dev(), 8192 - 1024)],
    ] {
        let e = dm.reload_preserving(name, &bad).unwrap_err();
        assert!(matches!(e, DmError::InvalidTable { .. }), "{e}");
        println!("invalid table: {e}");
        let i = dm.info(name).unwrap();
        assert!(!i.suspended && !i.inactive_table, "{i:?}");
        assert_eq!(dm.table(name).unwrap(), good);
    }
    // and I/O still goes to the old mapping
    let data = pattern(0x42, 4096);
    write_dev(&dm.node_path(name), 0, &data);
    assert_eq!(disk.read(0, 4096), data);

    // remove of an open device: EBUSY, nothing changed
    let user = File::open(dm.node_path(name)).unwrap();
    let e = dm.remove(name).unwrap_err();
    assert!(matches!(e, DmError::Busy { .. }), "{e}");
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY));
    println!("busy: {e}");
    assert_eq!(dm.table(name).unwrap(), good);
    assert!(dm.node_path(name).exists());
    drop(user);

    // names the kernel would refuse never reach it
    let long = "x".repeat(128);
    for bad in [long.as_str(), "", "a/b", ".."] {
        let e = dm.create(bad, None).unwrap_err();
        assert!(matches!(e, DmError::InvalidArgument { .. }), "{e}");
    }
    assert!(dm.create(&"y".repeat(127), None).is_ok());
    dm.remove(&"y".repeat(127)).unwrap();
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn target_messages_reach_dm_era() {
    // DM_TARGET_MSG on a dm-era device: "checkpoint" starts a new era
    let disk = Scratch::new(16 * MIB);
    let dm = DmControl::open().unwrap();
    dm.create_with_table(
        "rw-era-meta",
        None,
        &[Target::linear(0, 8192, disk.dev(), 0)],
    )
    .unwrap();
    let _m = Dm {
        dm: &dm,
        name: "rw-era-meta",
    };
    dm.create_with_table(
        "rw-era-orig",
        None,
        &[Target::linear(0, 16384, disk.dev(), 8192)],
    )
    .unwrap();
    let _o = Dm {
        dm: &dm,
        name: "rw-era-orig",
    };
    let meta = dm.info("rw-era-meta").unwrap().dev;
    let orig = dm.info("rw-era-orig").unwrap().dev;
    let era = [Target::new(0, 16384, "era", format!("{meta} {orig} 128"))];
    dm.create_with_table("rw-era", None, &era).unwrap();
    let _e = Dm {
        dm: &dm,
        name: "rw-era",
    };
    let current_era = || -> u64 {
        let st = dm.status("rw-era").unwrap();
        println!("era status: {}", st[0]);
        st[0]
            .params
            .split_whitespace()
            .nth(2)
            .unwrap()
            .parse()
            .unwrap()
    };
    let before = current_era();
    assert_eq!(dm.message("rw-era", 0, "checkpoint").unwrap(), None);
    assert_eq!(current_era(), before + 1);
    let e = dm.message("rw-era", 0, "no-such-message").unwrap_err();
    println!("bad message: {e}");
    assert!(e.to_string().contains("rw-era"), "{e}");
}

fn run(cmd: &str, args: &[&str]) {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn a_layer_is_inserted_and_removed_under_a_mounted_filesystem() {
    // The shape of hot insertion: a mounted ext4 on "rw-top" (linear onto the disk) gets a
    // layer "rw-mid" slipped in between (top -> mid -> disk) and taken out again, with files
    // written at every stage; the filesystem stays mounted throughout and checks clean.
    const SECTORS: u64 = 64 * 2048; // 64 MiB
    let disk = Scratch::new(64 * MIB);
    let dm = DmControl::open().unwrap();
    let direct = [Target::linear(0, SECTORS, disk.dev(), 0)];
    let top = dm.create_with_table("rw-top", None, &direct).unwrap();
    let _t = Dm {
        dm: &dm,
        name: "rw-top",
    };
    let node = dm.node_path("rw-top");
    let node = node.to_str().unwrap();
    run("mkfs.ext4", &["-q", "-F", node]);
    let mnt = tempfile::tempdir().unwrap();
    let mnt_s = mnt.path().to_str().unwrap();
    run("mount", &["-t", "ext4", node, mnt_s]);
    let write = |name: &str, tag: u8| {
        std::fs::write(mnt.path().join(name), pattern(tag, 256 * 1024)).unwrap();
        File::open(mnt.path().join(name))
            .unwrap()
            .sync_all()
            .unwrap();
    };
    write("before", 1);

    // insert: the mid layer maps the same sectors, the top now goes through it
    let mid = dm.create_with_table("rw-mid", None, &direct).unwrap();
    let _m = Dm {
        dm: &dm,
        name: "rw-mid",
    };
    dm.reload_preserving("rw-top", &[Target::linear(0, SECTORS, mid.dev, 0)])
        .unwrap();
    assert_eq!(
        dm.info("rw-mid").unwrap().open_count,
        1,
        "the top device holds the layer"
    );
    assert!(!dm.info("rw-top").unwrap().suspended);
    write("during", 2);
    let e = dm.remove("rw-mid").unwrap_err();
    assert!(matches!(e, DmError::Busy { .. }), "{e}");

    // remove the layer again
    dm.reload_preserving("rw-top", &direct).unwrap();
    assert_eq!(dm.info("rw-mid").unwrap().open_count, 0);
    dm.remove("rw-mid").unwrap();
    write("after", 3);

    run("umount", &[mnt_s]);
    run("fsck.ext4", &["-n", "-f", node]);
    assert_eq!(dm.info("rw-top").unwrap().dev, top.dev);
    run("mount", &["-t", "ext4", "-o", "ro", node, mnt_s]);
    for (name, tag) in [("before", 1), ("during", 2), ("after", 3)] {
        assert_eq!(
            std::fs::read(mnt.path().join(name)).unwrap(),
            pattern(tag, 256 * 1024),
            "{name}"
        );
    }
    run("umount", &[mnt_s]);
}
