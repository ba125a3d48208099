//! A really full target filesystem, for the `diskfull` fault: a small ext4
//! file system on a loop device ([`SmallFs`]) that holds the target's
//! directory (replica, journal, spool), and a [`Ballast`] that fills it until
//! writes fail with `ENOSPC` and keeps it full until it is dropped.
//!
//! Why ext4 on a loop device and not a size-limited tmpfs: production targets
//! keep their journals on ext4/xfs, where `ENOSPC` comes from block
//! allocation (delayed allocation reserves at `write`), directory and inode
//! allocation and the file system journal, and where `fdatasync` really goes
//! to a device; tmpfs has none of that (its `fsync` is a no-op), so it would
//! test a different failure. Needs root (mount, loop devices), like the other
//! loop-device tests.
//!
//! Cleanup: [`SmallFs`] unmounts on drop (also when a test panics: unwinding
//! drops it), falling back to a lazy unmount if a process still holds files
//! there; `mount -o loop` sets autoclear, so the loop device goes with it.

use crate::{run, Scratch};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// `ENOSPC` and `EDQUOT` (Linux).
fn is_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(28) | Some(122))
}

/// A loop-mounted ext4 image of a fixed size, unmounted on drop.
pub struct SmallFs {
    /// The mount point.
    pub mount: PathBuf,
    image: PathBuf,
    mounted: bool,
}

impl SmallFs {
    /// Creates a `size`-byte ext4 image in `scratch` (no blocks reserved for
    /// root: the target runs as root and must hit the real end of the disk)
    /// and mounts it at `scratch/<name>`. Panics with the tool's output if
    /// mkfs or mount fail.
    pub fn create(scratch: &Scratch, name: &str, size: u64) -> SmallFs {
        let image = scratch.join(&format!("{name}.ext4"));
        let mount = scratch.join(name);
        File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("create the file system image");
        fs::create_dir_all(&mount).expect("create the mount point");
        let o = run(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0", "-b", "4096", "-E", "nodiscard"])
                .arg(&image),
            Duration::from_secs(60),
        );
        assert!(o.status.success(), "mkfs.ext4: {}", crate::text(&o));
        let o = run(
            Command::new("mount")
                .args(["-t", "ext4", "-o", "loop"])
                .arg(&image)
                .arg(&mount),
            Duration::from_secs(60),
        );
        assert!(o.status.success(), "mount: {}", crate::text(&o));
        SmallFs {
            mount,
            image,
            mounted: true,
        }
    }

    /// Free bytes (for unprivileged users; `-m 0` makes it the same for root).
    pub fn free_bytes(&self) -> u64 {
        let o = run(
            Command::new("df")
                .args(["--output=avail", "-B1"])
                .arg(&self.mount),
            Duration::from_secs(10),
        );
        crate::text(&o)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .next()
            .unwrap_or(0)
    }

    /// Unmounts now (also done on drop). Lazy unmount if busy.
    pub fn unmount(&mut self) {
        if !self.mounted {
            return;
        }
        self.mounted = false;
        let o = run(
            Command::new("umount").arg(&self.mount),
            Duration::from_secs(60),
        );
        if !o.status.success() {
            eprintln!(
                "umount {}: {}; detaching lazily",
                self.mount.display(),
                crate::text(&o)
            );
            let _ = run(
                Command::new("umount").arg("-l").arg(&self.mount),
                Duration::from_secs(60),
            );
        }
        let _ = fs::remove_file(&self.image);
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Fills a file system with a ballast file until writes fail with `ENOSPC`,
/// and keeps it full (a thread grabs any space that frees up, e.g. when the
/// target deletes a spool file) until [`Ballast::release`] or drop, which
/// delete the ballast.
pub struct Ballast {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    keeper: Option<JoinHandle<()>>,
}

/// Appends to `f` until the file system says it is full; returns the bytes
/// written. Big writes first, then 4 KiB ones for the last partial space.
fn fill(f: &mut File) -> std::io::Result<u64> {
    let big = vec![0xA5u8; 1 << 20];
    let mut n = 0u64;
    for chunk in [&big[..], &big[..4096]] {
        loop {
            match f.write(chunk) {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(e) if is_full(&e) => break,
                Err(e) => return Err(e),
            }
        }
    }
    match f.sync_data() {
        Ok(()) => {}
        Err(e) if is_full(&e) => {}
        Err(e) => return Err(e),
    }
    Ok(n)
}

impl Ballast {
    /// Fills the file system holding `dir` (ballast file `dir/.ballast`) until
    /// a write fails with `ENOSPC`; panics if that never happens (the fault
    /// would not be real).
    pub fn fill(dir: &Path) -> Ballast {
        let path = dir.join(".ballast");
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("create the ballast file");
        let mut n = fill(&mut f).expect("fill the file system");
        // Proof that it is full: a fill that cannot write a single block.
        // (The target may free space meanwhile, e.g. delete an applied spool
        // file: then the ballast takes that too, and we look again.)
        let mut proven = false;
        for _ in 0..100 {
            match fill(&mut f).expect("fill the file system") {
                0 => {
                    proven = true;
                    break;
                }
                k => n += k,
            }
        }
        assert!(
            proven,
            "the file system keeps taking writes after the ballast"
        );
        let bytes = Arc::new(AtomicU64::new(n));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, b) = (stop.clone(), bytes.clone());
        let keeper = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                if let Ok(k) = fill(&mut f) {
                    b.fetch_add(k, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Ballast {
            path,
            stop,
            bytes,
            keeper: Some(keeper),
        }
    }

    /// Ballast bytes written so far (initial fill plus top-ups).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Stops topping up and deletes the ballast: the space is back.
    pub fn release(mut self) -> u64 {
        self.stop_keeper();
        self.bytes()
    }

    fn stop_keeper(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.keeper.take() {
            let _ = h.join();
        }
        let _ = fs::remove_file(&self.path);
    }
}

impl Drop for Ballast {
    fn drop(&mut self) {
        self.stop_keeper();
    }
}
