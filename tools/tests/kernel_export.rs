//! `rewind export --attach /dev/nbdN` as a process against a real kernel: ignored on the host
//! (no nbd there), run inside the test VM by `scripts/kernel-vm/run-tests`.
//!
//! * ext4 on the attached device; the agent is SIGKILLed and restarted while the filesystem
//!   is idle and while a writer is fsyncing files: no acknowledged write is lost, and the
//!   change log (which survived the crashes) covers every block that changed.
//! * The benchmark of docs/BENCHMARKS.md ("Benchmark: kernel paths"): write throughput on
//!   /dev/nbdN via rewind vs via `qemu-nbd -c` on the same backing file.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_core::ChangeLogView;

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

fn configured(index: u32) -> bool {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/size"))
        .map(|s| s.trim() != "0")
        .unwrap_or(false)
}

struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    /// Starts `rewind export --attach` and waits until it says the device is attached.
    fn start(dir: &Path, backing: &Path, dev: &str, run: u32) -> Agent {
        let log = dir.join(format!("agent-{run}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_rewind"))
            .args(["export", "--backing"])
            .arg(backing)
            .args(["--volume", "kx", "--shm-dir"])
            .arg(dir.join("shm"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args([
                "--attach",
                dev,
                "--nbd-timeout",
                "5",
                "--dead-conn-timeout",
                "60",
            ])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let a = Agent { child, log };
        let t0 = Instant::now();
        while !a.text().contains("kernel device attached") {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "agent did not attach: {}",
                a.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        a
    }
    fn text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }
    fn terminate(mut self) -> String {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let st = self.child.wait().unwrap();
        let text = self.text();
        assert!(st.success(), "agent exited with {st}: {text}");
        text
    }
}

fn file_data(n: u64) -> Vec<u8> {
    let len = 8 * 1024 + (n % 5) as usize * 4096;
    (0..len)
        .map(|j| (j as u64).wrapping_mul(0x9e37_79b9).wrapping_add(n * 131) as u8)
        .collect()
}

/// Writes `w<n % 100>` with fsync in a loop; returns (n, time) of every write whose fsync
/// returned, and counts the failures.
fn writer(dir: PathBuf, stop: Arc<AtomicBool>) -> (Vec<u64>, u64) {
    let (mut acked, mut failed) = (Vec::new(), 0);
    let mut n = 0;
    while !stop.load(Ordering::SeqCst) {
        let r = (|| -> std::io::Result<()> {
            let mut f = File::create(dir.join(format!("w{}", n % 100)))?;
            f.write_all(&file_data(n))?;
            f.sync_all()
        })();
        match r {
            Ok(()) => acked.push(n),
            Err(_) => failed += 1,
        }
        n += 1;
        std::thread::sleep(Duration::from_millis(2));
    }
    (acked, failed)
}

fn verify(mnt: &Path, acked: &[u64]) -> usize {
    let mut last = HashMap::new();
    for n in acked {
        last.insert(n % 100, *n);
    }
    for (slot, n) in &last {
        let got = std::fs::read(mnt.join(format!("w{slot}"))).unwrap();
        assert!(
            got == file_data(*n),
            "acknowledged write w{slot} (version {n}) lost"
        );
    }
    last.len()
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn agent_killed_and_restarted_under_a_mounted_ext4_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("vol.img");
    File::create(&backing).unwrap().set_len(64 * MIB).unwrap();
    let dev = "/dev/nbd7";
    let mnt = PathBuf::from("/tmp/export-mnt");
    std::fs::create_dir_all(&mnt).unwrap();

    let agent = Agent::start(dir.path(), &backing, dev, 0);
    assert!(configured(7));
    assert_eq!(kernel_nbd(7)["pid_alive"], serde_json::json!(true));
    sh(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
            dev,
        ],
    );
    sh("mount", &[dev, mnt.to_str().unwrap()]);

    // 1. Killed while the filesystem is idle.
    let stop = Arc::new(AtomicBool::new(false));
    let (mut acked, _) = {
        let s = Arc::new(AtomicBool::new(false));
        let m = mnt.clone();
        let t = std::thread::spawn({
            let s = s.clone();
            move || writer(m, s)
        });
        std::thread::sleep(Duration::from_millis(500));
        s.store(true, Ordering::SeqCst);
        t.join().unwrap()
    };
    agent.kill();
    assert!(
        configured(7),
        "the kernel must keep the device when the agent dies"
    );
    let shown = kernel_nbd(7);
    println!("drvutil --kernel while the agent is dead: {shown}");
    assert_eq!(shown["pid_alive"], serde_json::json!(false));
    let agent = Agent::start(dir.path(), &backing, dev, 1);
    assert!(
        agent.text().contains("NetlinkReconfigure"),
        "{}",
        agent.text()
    );
    let n_idle = verify(&mnt, &acked);

    // 2. Killed while a writer is fsyncing files.
    let t = {
        let (m, s) = (mnt.clone(), stop.clone());
        std::thread::spawn(move || writer(m, s))
    };
    std::thread::sleep(Duration::from_millis(700));
    let t_kill = Instant::now();
    agent.kill();
    std::thread::sleep(Duration::from_millis(500));
    let agent = Agent::start(dir.path(), &backing, dev, 2);
    let gap = t_kill.elapsed();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    let (acked2, failed) = t.join().unwrap();
    let stall = t_kill.elapsed();
    acked.extend(acked2.iter().copied());
    assert_eq!(
        failed, 0,
        "writes failed during the restart instead of waiting"
    );

    // 3. SIGTERM while mounted (e.g. an upgrade): the device is left attached, the next agent
    // takes it over, and the filesystem keeps working.
    let text = agent.terminate();
    assert!(text.contains("left attached"), "{text}");
    assert!(
        configured(7),
        "an in-use device must not be disconnected by SIGTERM"
    );
    let agent = Agent::start(dir.path(), &backing, dev, 3);
    assert!(
        agent.text().contains("NetlinkReconfigure"),
        "{}",
        agent.text()
    );
    let (acked3, failed3) = {
        let s = Arc::new(AtomicBool::new(false));
        let m = mnt.clone();
        let t = std::thread::spawn({
            let s = s.clone();
            move || writer(m, s)
        });
        std::thread::sleep(Duration::from_millis(500));
        s.store(true, Ordering::SeqCst);
        t.join().unwrap()
    };
    assert_eq!(failed3, 0);
    assert!(!acked3.is_empty());
    // the writer restarts at n = 0: its files supersede the older versions of those slots
    let superseded: BTreeSet<u64> = acked3.iter().map(|n| n % 100).collect();
    acked.retain(|n| !superseded.contains(&(n % 100)));
    acked.extend(acked3);

    // Unmount (the filesystem flushes through the restarted agent), then check from a fresh
    // mount that every acknowledged write is there.
    sh("umount", &[mnt.to_str().unwrap()]);
    sh("mount", &[dev, mnt.to_str().unwrap()]);
    let n_busy = verify(&mnt, &acked);
    sh("umount", &[mnt.to_str().unwrap()]);

    // 4. SIGTERM once unmounted: flush, disconnect, log closed cleanly.
    let text = agent.terminate();
    assert!(text.contains("NBD device detached"), "{text}");
    assert!(!configured(7), "device still configured after SIGTERM");

    // The change log survived two crashes and covers every block that changed.
    let img = std::fs::read(&backing).unwrap();
    let changed: BTreeSet<u64> = img
        .chunks(BLOCK as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&b| b != 0))
        .map(|(i, _)| i as u64)
        .collect();
    let view = ChangeLogView::open(dir.path().join("shm/kx.clog")).unwrap();
    let logged: BTreeSet<u64> = view
        .uncommitted_ranges()
        .iter()
        .flat_map(|&(o, l)| o / BLOCK..(o + l).div_ceil(BLOCK))
        .collect();
    let missing: Vec<_> = changed.difference(&logged).take(10).collect();
    println!(
        "KILL: idle: {n_idle} files verified; busy: {} writes acked across the kill ({} files verified), restart gap {:.2}s, writer ran {:.2}s; {} blocks changed, {} logged",
        acked2.len(),
        n_busy,
        gap.as_secs_f64(),
        stall.as_secs_f64(),
        changed.len(),
        logged.len()
    );
    assert!(
        missing.is_empty(),
        "changed blocks missing from the log: {missing:?}"
    );
}

fn drvutil_kernel() -> serde_json::Value {
    let args = tools::drvutil::DrvutilArgs {
        ps: None,
        pas: false,
        dump: None,
        kernel: true,
        json: true,
        shm_dir: "/nonexistent".into(),
        state_dir: "/nonexistent".into(),
        stop_filtering: None,
        start_filtering: None,
        admin_socket: None,
    };
    serde_json::from_str(&tools::drvutil::run(&args).unwrap()).unwrap()
}

/// `drvutil --kernel`'s entry for /dev/nbd<index>.
fn kernel_nbd(index: u32) -> serde_json::Value {
    let v = drvutil_kernel();
    let dev = format!("/dev/nbd{index}");
    v["nbd"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == dev.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{dev} not in drvutil --kernel: {v}"))
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn drvutil_kernel_shows_the_device_the_dm_table_and_the_insertion() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("k.img");
    File::create(&backing).unwrap().set_len(16 * MIB).unwrap();
    let agent = Agent::start(dir.path(), &backing, "/dev/nbd3", 0);
    let dm = filter_dm::DmControl::open().unwrap();
    let nbd = {
        use std::os::unix::fs::MetadataExt;
        filter_dm::DevNum::from_rdev(std::fs::metadata("/dev/nbd3").unwrap().rdev())
    };
    dm.create_with_table(
        "rw-kinfo",
        None,
        &[filter_dm::Target::linear(0, 16 * MIB / 512, nbd, 0)],
    )
    .unwrap();
    let v = drvutil_kernel();
    let text = tools::kernel_info::render_text(&tools::kernel_info::collect());
    let _ = dm.remove("rw-kinfo");
    agent.terminate();
    println!("{text}");
    let d = v["dm"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "rw-kinfo")
        .cloned()
        .unwrap();
    assert_eq!(d["inserted_via"], "/dev/nbd3");
    assert_eq!(d["table"][0], format!("0 32768 linear {nbd} 0"));
    assert!(text.contains("filter inserted via /dev/nbd3"), "{text}");
}

/// fio's write bandwidth in KiB/s (json output).
fn fio_bw(dev: &str, rw: &str, bs: &str, size: &str) -> f64 {
    let out = sh(
        "fio",
        &[
            "--name=b",
            &format!("--filename={dev}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--size={size}"),
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=16",
            "--end_fsync=1",
            "--randrepeat=1",
            "--output-format=json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    v["jobs"][0]["write"]["bw"].as_f64().unwrap()
}

#[test]
#[ignore = "needs the kernel VM: scripts/kernel-vm/run-tests"]
fn bench_rewind_attach_vs_qemu_nbd() {
    if Command::new("qemu-nbd").arg("--version").output().is_err() {
        println!("BENCH skipped: qemu-nbd does not run here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("bench.img");
    File::create(&backing).unwrap().set_len(64 * MIB).unwrap();
    let mut rows = Vec::new();
    for (rw, bs, size) in [("write", "1M", "48M"), ("randwrite", "4k", "8M")] {
        // rewind (change tracking on)
        let agent = Agent::start(dir.path(), &backing, "/dev/nbd6", 10);
        let rewind = fio_bw("/dev/nbd6", rw, bs, size);
        agent.terminate();
        // qemu-nbd -c on the same file (kernel ioctl client, same device driver)
        sh(
            "qemu-nbd",
            &[
                "-c",
                "/dev/nbd5",
                "-f",
                "raw",
                "--cache=writeback",
                backing.to_str().unwrap(),
            ],
        );
        let t0 = Instant::now();
        while !configured(5) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let qemu = fio_bw("/dev/nbd5", rw, bs, size);
        sh("qemu-nbd", &["-d", "/dev/nbd5"]);
        println!(
            "BENCH {rw} bs={bs}: rewind {:.0} KiB/s, qemu-nbd {:.0} KiB/s, ratio rewind/qemu-nbd {:.2}",
            rewind,
            qemu,
            rewind / qemu
        );
        rows.push(rewind / qemu);
    }
    assert!(rows.iter().all(|r| *r > 0.0));
}
