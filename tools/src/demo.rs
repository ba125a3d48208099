//! `rewind demo`: rewind's main job on an embedded default, on one machine.
//!
//! Generates a private CA and certificates, starts a target (recovery
//! site) and an export of a file-backed volume on loopback, starts the
//! replicator and protects the volume with `rewind protect`, puts ext4 on the
//! volume (nbdfuse + loop) and writes files with fsync while it replicates,
//! takes file-system-consistent bookmarks (`rewind bookmark create --type fs`
//! with fsfreeze hooks) before and after changing files, shows `rewind
//! status`, waits until the recovery site has everything, and verifies the
//! recovery: the replica equals the source and mounts with the latest
//! files; a virtual snapshot of the first bookmark (`rewind snapshot
//! create --bookmark`) checks clean with `e2fsck -fn` and mounts with
//! exactly the files of that bookmark.
//! Every daemon is this same binary; all state lives in one temporary
//! directory, removed at the end (unless `--keep`), also on failure.
//! Runs are serialised machine-wide with `scripts/fs-over-nbd`'s lock file
//! (loop devices and FUSE are shared resources).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use replicator::pair::PairState;

use crate::protect::DaemonAddr;
use crate::status::{read_status, ReplicatorStatusFile, TargetStatusFile};

/// Arguments of `rewind demo`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    rewind demo                       # as root; needs nbdfuse, fuse3, e2fsprogs (scripts/setup installs them)\n  \
    rewind demo --size 128M --data-mb 16\n  \
    rewind demo --keep                # keep the working directory (logs, replica) for a look afterwards\n\n\
Everything runs on this machine over loopback with mutual TLS; nothing outside the temporary \
directory is changed, and every process, mount and loop device is cleaned up at the end.")]
pub struct DemoArgs {
    /// Size of the demo volume.
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = crate::export::parse_size)]
    pub size: u64,
    /// MiB of file data the workload writes.
    #[arg(long, value_name = "MIB", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub data_mb: u64,
    /// Parent of the temporary working directory.
    #[arg(long, value_name = "DIR", default_value = "/var/tmp")]
    pub dir: PathBuf,
    /// Keep the working directory.
    #[arg(long)]
    pub keep: bool,
}

/// Lock file shared with `scripts/fs-over-nbd`.
const FS_LOCK: &str = "/tmp/rewind-fs-over-nbd.lock";

struct Work {
    dir: PathBuf,
    keep: bool,
    children: Vec<(String, Child)>,
    mounts: Vec<PathBuf>,
    loops: Vec<String>,
    fuse: Vec<(PathBuf, Child)>,
}

impl Work {
    fn spawn(&mut self, name: &str, args: &[&str]) -> Result<()> {
        let log = File::create(self.dir.join(format!("{name}.log")))?;
        let exe = std::env::current_exe().context("locating the rewind binary")?;
        let child = Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting rewind {}", args.join(" ")))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    fn check_alive(&mut self) -> Result<()> {
        for (name, c) in &mut self.children {
            if let Ok(Some(st)) = c.try_wait() {
                let log = std::fs::read_to_string(self.dir.join(format!("{name}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                bail!(
                    "rewind {name} exited ({st}); its log ends with:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        Ok(())
    }

    fn cleanup(&mut self) {
        for m in self.mounts.drain(..).rev() {
            let _ = Command::new("umount").arg(&m).status();
        }
        for l in self.loops.drain(..) {
            let _ = Command::new("losetup").args(["-d", &l]).status();
        }
        for (dir, mut c) in self.fuse.drain(..) {
            let _ = Command::new("fusermount3").arg("-u").arg(&dir).status();
            wait_or_kill(&mut c);
        }
        for (_, mut c) in self.children.drain(..).rev() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            wait_or_kill(&mut c);
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn wait_or_kill(c: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
}

fn say(step: &str) {
    println!("\n== {step}");
}

fn show(cmd: &str) {
    println!("   $ {cmd}");
}

fn indent(text: &str) {
    for l in text.lines() {
        println!("   {l}");
    }
}

fn rewind_out(args: &[&str]) -> Result<String> {
    let exe = std::env::current_exe()?;
    let o = Command::new(exe)
        .args(args)
        .output()
        .with_context(|| format!("running rewind {}", args.join(" ")))?;
    if !o.status.success() {
        bail!(
            "rewind {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn sh(cmd: &mut Command, what: &str) -> Result<String> {
    let o = cmd.output().with_context(|| format!("running {what}"))?;
    if !o.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn wait_until(
    what: &str,
    timeout: Duration,
    w: &mut Work,
    mut f: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        w.check_alive()?;
        if Instant::now() > deadline {
            bail!("timed out after {} s waiting for {what}", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn check_prerequisites() -> Result<()> {
    if crate::admin::effective_uid() != 0 {
        bail!("rewind demo needs root (loop devices, mounts)");
    }
    if !Path::new("/dev/fuse").exists() {
        bail!("/dev/fuse is missing (load the fuse module)");
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = [
        "nbdfuse",
        "fusermount3",
        "losetup",
        "mkfs.ext4",
        "fsfreeze",
        "e2fsck",
        "mount",
        "umount",
    ]
    .into_iter()
    .filter(|t| !std::env::split_paths(&path).any(|d| d.join(t).is_file()))
    .collect();
    if !missing.is_empty() {
        bail!(
            "missing tools: {} (install libnbd-bin, fuse3, e2fsprogs, util-linux: scripts/setup does it)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// Deterministic file contents (xorshift), so a rerun writes the same data.
fn file_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Creates `mnt/rel` with `data`, fsyncs it and records its blake3 in `sums`.
fn put_file(
    mnt: &Path,
    sums: &mut BTreeMap<String, String>,
    rel: String,
    data: &[u8],
) -> Result<()> {
    let p = mnt.join(&rel);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    let mut f = File::create(&p).with_context(|| format!("creating {}", p.display()))?;
    f.write_all(data)?;
    f.sync_all()
        .with_context(|| format!("fsync {}", p.display()))?;
    sums.insert(rel, blake3::hash(data).to_hex().to_string());
    Ok(())
}

/// Writes the workload into `mnt`: a few big files and many small ones,
/// each fsync'ed; returns path -> blake3.
fn workload(mnt: &Path, data_mb: u64) -> Result<BTreeMap<String, String>> {
    let mut sums = BTreeMap::new();
    let mut put = |rel: String, data: &[u8]| put_file(mnt, &mut sums, rel, data);
    let big = data_mb.saturating_mul(1 << 20) * 3 / 4;
    for i in 0..3u64 {
        put(
            format!("big/file{i}.bin"),
            &file_bytes(i + 1, (big / 3) as usize),
        )?;
    }
    let small_total = data_mb.saturating_mul(1 << 20) / 4;
    let mut written = 0u64;
    let mut i = 0u64;
    while written < small_total && i < 2000 {
        let len = ((i * 7919) % 65_536 + 1) as usize;
        put(
            format!("small/d{}/f{i}.dat", i % 16),
            &file_bytes(1000 + i, len),
        )?;
        written += len as u64;
        i += 1;
    }
    Ok(sums)
}

/// Changes after the consistency point: overwrites the first big file,
/// deletes a sixteenth of the small ones, adds new files; returns the new
/// manifest.
fn change_files(mnt: &Path, before: &BTreeMap<String, String>) -> Result<BTreeMap<String, String>> {
    let mut sums = before.clone();
    let mut put = |rel: String, data: &[u8]| put_file(mnt, &mut sums, rel, data);
    if let Some(len) = std::fs::metadata(mnt.join("big/file0.bin"))
        .ok()
        .map(|m| m.len())
    {
        put("big/file0.bin".into(), &file_bytes(777, len as usize))?;
    }
    for i in 0..64u64 {
        put(
            format!("after/new{i}.dat"),
            &file_bytes(5000 + i, 4096 + (i as usize) * 512),
        )?;
    }
    let gone: Vec<String> = sums
        .keys()
        .filter(|k| k.starts_with("small/d0/"))
        .cloned()
        .collect();
    for k in &gone {
        std::fs::remove_file(mnt.join(k)).with_context(|| format!("removing {k}"))?;
        sums.remove(k);
    }
    File::open(mnt.join("small"))
        .and_then(|d| d.sync_all())
        .context("syncing the directory")?;
    Ok(sums)
}

/// Files whose contents under `root` differ from `manifest` (or that are
/// missing), and files present that the manifest does not have.
fn check_files(root: &Path, manifest: &BTreeMap<String, String>) -> Vec<String> {
    let mut bad = Vec::new();
    for (rel, sum) in manifest {
        let got = std::fs::read(root.join(rel))
            .map(|b| blake3::hash(&b).to_hex().to_string())
            .unwrap_or_else(|e| format!("unreadable: {e}"));
        if &got != sum {
            bad.push(rel.clone());
        }
    }
    for top in ["big", "small", "after"] {
        let mut stack = vec![root.join(top)];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let path = e.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(root) {
                    let rel = rel.to_string_lossy().into_owned();
                    if !manifest.contains_key(&rel) {
                        bad.push(format!("{rel} (should not exist)"));
                    }
                }
            }
        }
    }
    bad
}

fn attach_fs(w: &mut Work, uri: &str, tag: &str) -> Result<String> {
    attach(w, uri, tag, false)
}

fn attach(w: &mut Work, uri: &str, tag: &str, read_only: bool) -> Result<String> {
    let fusedir = w.dir.join(format!("fuse-{tag}"));
    std::fs::create_dir_all(&fusedir)?;
    let disk = fusedir.join("disk");
    let log = File::create(w.dir.join(format!("nbdfuse-{tag}.log")))?;
    let mut nbdfuse = Command::new("nbdfuse");
    if read_only {
        nbdfuse.arg("-r");
    }
    let child = nbdfuse
        .arg(&disk)
        .arg(uri)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting nbdfuse")?;
    w.fuse.push((fusedir.clone(), child));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !disk.exists() {
        if Instant::now() > deadline {
            bail!("nbdfuse did not come up (see nbdfuse-{tag}.log)");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut losetup = Command::new("losetup");
    losetup.args(["-f", "--show", "--direct-io=on"]);
    if read_only {
        losetup.arg("--read-only");
    }
    let dev = sh(losetup.arg(&disk), "losetup")?.trim().to_owned();
    w.loops.push(dev.clone());
    Ok(dev)
}

fn mount(w: &mut Work, dev: &str, mnt: &Path, opts: &str) -> Result<()> {
    std::fs::create_dir_all(mnt)?;
    sh(
        Command::new("mount").args(["-o", opts, dev]).arg(mnt),
        "mount",
    )?;
    w.mounts.push(mnt.to_path_buf());
    Ok(())
}

fn unmount_last(w: &mut Work) -> Result<()> {
    if let Some(m) = w.mounts.pop() {
        sh(Command::new("umount").arg(&m), "umount")?;
    }
    Ok(())
}

fn detach_last(w: &mut Work) -> Result<()> {
    if let Some(l) = w.loops.pop() {
        sh(Command::new("losetup").args(["-d", &l]), "losetup -d")?;
    }
    if let Some((dir, mut c)) = w.fuse.pop() {
        let _ = Command::new("fusermount3").arg("-u").arg(&dir).status();
        wait_or_kill(&mut c);
    }
    Ok(())
}

/// Runs `rewind demo`.
pub fn run(args: DemoArgs) -> Result<()> {
    check_prerequisites()?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let lock = File::create(FS_LOCK).with_context(|| format!("opening {FS_LOCK}"))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("locking {FS_LOCK}: {e}"))?;
    let dir = args.dir.join(format!(
        "rewind-demo.{}.{}",
        std::process::id(),
        replicator::pair::now_ns() % 1_000_000
    ));
    std::fs::create_dir_all(&dir)?;
    let mut w = Work {
        dir: dir.clone(),
        keep: args.keep,
        children: Vec::new(),
        mounts: Vec::new(),
        loops: Vec::new(),
        fuse: Vec::new(),
    };
    let r = demo(&mut w, &args);
    if let Err(e) = &r {
        println!("\nDEMO FAILED: {e:#}");
        if args.keep {
            println!("logs are in {}", dir.display());
        }
    }
    w.cleanup();
    r
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap_or("?")
}

fn demo(w: &mut Work, args: &DemoArgs) -> Result<()> {
    let d = w.dir.clone();
    println!(
        "rewind demo: protect a volume, write a filesystem on it while it replicates to a recovery"
    );
    println!("site, and recover it there — all on this machine, over loopback with mutual TLS.");
    println!(
        "Working directory: {} ({})",
        d.display(),
        if args.keep {
            "kept"
        } else {
            "removed at the end"
        }
    );

    say("1. Certificates: a private CA, a server certificate for the target, a client certificate for the replicator");
    let pki = d.join("pki");
    for a in [
        vec!["pki", "init", "--dir", p(&pki)],
        vec![
            "pki",
            "issue",
            "--dir",
            p(&pki),
            "--host",
            "127.0.0.1",
            "--kind",
            "server",
        ],
        vec![
            "pki",
            "issue",
            "--dir",
            p(&pki),
            "--host",
            "demo-source",
            "--kind",
            "client",
        ],
    ] {
        show(&format!("rewind {}", a.join(" ")));
        rewind_out(&a)?;
    }

    say("2. The recovery site: `rewind target` on 127.0.0.1, accepting only the client 'demo-source'");
    let (tdir, tstate) = (d.join("target"), d.join("tstate"));
    let targs = [
        "target",
        "--listen",
        "tcp:127.0.0.1:0",
        "--dir",
        p(&tdir),
        "--tls-dir",
        p(&pki),
        "--host",
        "127.0.0.1",
        "--allow",
        "demo-source",
        "--state-dir",
        p(&tstate),
    ];
    show(&format!("rewind {}", targs.join(" ")));
    w.spawn("target", &targs)?;
    let mut listen = String::new();
    wait_until("the target to listen", Duration::from_secs(30), w, || {
        read_status::<TargetStatusFile>(&tstate)
            .map(|s| listen = s.listen)
            .is_ok()
            && !listen.is_empty()
    })?;
    println!("   listening on {listen}");

    say(&format!(
        "3. The protected volume: a {} MiB file that already holds data, served through rewind's change-tracking NBD filter",
        args.size >> 20
    ));
    let img = d.join("demo.img");
    {
        let f = File::create(&img)?;
        f.set_len(args.size)?;
        let mut f = std::fs::OpenOptions::new().write(true).open(&img)?;
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(args.size / 2))?;
        f.write_all(&file_bytes(42, (args.size / 16).min(16 << 20) as usize))?;
        f.sync_all()?;
    }
    let sock = d.join("demo.sock");
    let (shm, vstate) = (d.join("shm"), d.join("vstate"));
    let eargs = [
        "export",
        "--backing",
        p(&img),
        "--listen",
        &format!("unix:{}", p(&sock)),
        "--volume",
        "demo",
        "--shm-dir",
        p(&shm),
        "--state-dir",
        p(&vstate),
    ];
    show(&format!("rewind {}", eargs.join(" ")));
    w.spawn("export", &eargs)?;
    wait_until("the export's socket", Duration::from_secs(30), w, || {
        sock.exists()
    })?;
    let uri = format!("nbd+unix:///demo?socket={}", p(&sock));

    say("4. The replicator, then `rewind protect`: the target compares checksums first (Resync Step I/II), then Differential Sync");
    let rstate = d.join("rstate");
    let rargs = [
        "replicator",
        "--target",
        &format!("tcp:{listen}"),
        "--server-name",
        "127.0.0.1",
        "--tls-dir",
        p(&pki),
        "--host",
        "demo-source",
        "--state-dir",
        p(&rstate),
    ];
    show(&format!("rewind {}", rargs.join(" ")));
    w.spawn("replicator", &rargs)?;
    wait_until(
        "the replicator's admin socket",
        Duration::from_secs(30),
        w,
        || rstate.join(crate::replicate::CONTROL_SOCKET).exists(),
    )?;
    let pargs = [
        "protect",
        "--volume",
        "demo",
        "--device",
        p(&img),
        "--shm-dir",
        p(&shm),
        "--compression",
        "zstd:1",
        "--state-dir",
        p(&rstate),
    ];
    show(&format!("rewind {}", pargs.join(" ")));
    indent(&rewind_out(&pargs)?);
    println!("   following the initial synchronisation:");
    let addr = DaemonAddr {
        state_dir: rstate.clone(),
        socket: None,
    };
    crate::protect::wait_synced(
        &addr,
        &["demo".to_string()],
        Duration::from_secs(600),
        false,
    )?;
    println!("   demo is protected (Differential Sync)");

    say(&format!(
        "5. A workload: ext4 on the protected volume (nbdfuse + loop), {} MiB of files, each fsync'ed",
        args.data_mb
    ));
    let dev = attach_fs(w, &uri, "src")?;
    sh(
        Command::new("mkfs.ext4").args(["-F", "-q", &dev]),
        "mkfs.ext4",
    )?;
    let mnt = d.join("mnt");
    mount(w, &dev, &mnt, "rw")?;
    let t0 = Instant::now();
    let at_point = workload(&mnt, args.data_mb)?;
    println!(
        "   wrote {} files in {:.1} s; the filesystem is mounted on {}",
        at_point.len(),
        t0.elapsed().as_secs_f64(),
        mnt.display()
    );

    say("6. A bookmark: `rewind bookmark create` (file-system consistent: fsfreeze around the tag), then wait until the recovery site has it");
    let freeze = format!("fsfreeze -f {}", p(&mnt));
    let thaw = format!("fsfreeze -u {}", p(&mnt));
    let bargs = [
        "bookmark",
        "create",
        "demo-before-changes",
        "--volume",
        "demo",
        "--type",
        "fs",
        "--pre",
        &freeze,
        "--post",
        &thaw,
        "--shm-dir",
        p(&shm),
    ];
    show(&format!(
        "rewind bookmark create demo-before-changes --volume demo --type fs --pre '{freeze}' --post '{thaw}' --shm-dir {}",
        p(&shm)
    ));
    indent(&rewind_out(&bargs)?);
    wait_drained(w, &addr, &tstate, replicator::pair::now_ns())?;
    println!(
        "   bookmark demo-before-changes: {} files, ext4 frozen (clean) when it was taken",
        at_point.len()
    );
    say("7. More changes after the bookmark: a big file overwritten, 64 files added, some deleted");
    let latest = change_files(&mnt, &at_point)?;
    println!(
        "   now {} files ({} differ from the bookmark)",
        latest.len(),
        latest
            .iter()
            .filter(|(k, v)| at_point.get(*k) != Some(v))
            .count()
            + at_point.keys().filter(|k| !latest.contains_key(*k)).count()
    );
    let bargs = [
        "bookmark",
        "create",
        "demo-after-changes",
        "--volume",
        "demo",
        "--type",
        "fs",
        "--pre",
        &freeze,
        "--post",
        &thaw,
        "--shm-dir",
        p(&shm),
    ];
    show("rewind bookmark create demo-after-changes --volume demo --type fs ...");
    indent(&rewind_out(&bargs)?);

    say("8. Status while it replicates (`rewind status`)");
    indent(&rewind_out(&[
        "status",
        "--state-dir",
        p(&rstate),
        "--target-state-dir",
        p(&tstate),
    ])?);

    unmount_last(w)?;
    detach_last(w)?;
    println!("   unmounted the filesystem (every write is now on the source volume)");

    say("9. Waiting until the recovery site has applied everything (RPO 0, nothing pending anywhere)");
    let t0 = Instant::now();
    wait_drained(w, &addr, &tstate, replicator::pair::now_ns())?;
    println!("   caught up in {:.1} s", t0.elapsed().as_secs_f64());
    indent(&rewind_out(&[
        "status",
        "--state-dir",
        p(&rstate),
        "--target-state-dir",
        p(&tstate),
    ])?);

    say("10. Recovery check: the replica (latest state) at the recovery site");
    let replica = tdir.join("demo").join("replica.img");
    let (a, b) = (blake3_file(&img)?, blake3_file(&replica)?);
    println!("   source  blake3 {}…", &a[..32]);
    println!("   replica blake3 {}…", &b[..32]);
    if a != b {
        bail!("the replica differs from the source");
    }
    println!("   the replica equals the source, byte for byte");

    say("11. Recovery of the first bookmark: a virtual snapshot at the recovery site (no copy), checked with e2fsck and mounted");
    indent(&rewind_out(&[
        "recover",
        "list",
        "--volume",
        "demo",
        "--state-dir",
        p(&tstate),
    ])?);
    let snap_sock = d.join("snap.sock");
    let sargs = [
        "snapshot",
        "create",
        "--volume",
        "demo",
        "--bookmark",
        "demo-before-changes",
        "--listen",
        &format!("unix:{}", p(&snap_sock)),
        "--state-dir",
        p(&tstate),
    ];
    show(&format!("rewind {}", sargs.join(" ")));
    w.spawn("snapshot", &sargs)?;
    wait_until("the virtual snapshot", Duration::from_secs(60), w, || {
        snap_sock.exists()
    })?;
    let snap_uri = format!("nbd+unix:///demo?socket={}", p(&snap_sock));
    println!("   serving {snap_uri} (read-only)");
    let sdev = attach(w, &snap_uri, "snap", true)?;
    sh(
        Command::new("e2fsck").arg("-fn").arg(&sdev),
        "e2fsck -fn on the snapshot",
    )?;
    println!("   e2fsck -fn on the snapshot: clean");
    let smnt = d.join("snap-mnt");
    mount(w, &sdev, &smnt, "ro,noload")?;
    let bad = check_files(&smnt, &at_point);
    unmount_last(w)?;
    detach_last(w)?;
    if !bad.is_empty() {
        bail!(
            "{} file(s) differ in the snapshot from the bookmark, e.g. {}",
            bad.len(),
            bad[0]
        );
    }
    println!(
        "   mounted read-only: exactly the {} files of the bookmark, each with the blake3 it had then",
        at_point.len()
    );

    say("12. And the latest state: the replica itself, checked and mounted read-only");
    sh(
        Command::new("e2fsck").arg("-fn").arg(&replica),
        "e2fsck -fn on the replica",
    )?;
    println!("   e2fsck -fn on the replica: clean");
    let rdev = sh(
        Command::new("losetup")
            .args(["-f", "--show", "--read-only"])
            .arg(&replica),
        "losetup",
    )?
    .trim()
    .to_owned();
    w.loops.push(rdev.clone());
    let rmnt = d.join("replica-mnt");
    mount(w, &rdev, &rmnt, "ro,noload")?;
    let bad = check_files(&rmnt, &latest);
    unmount_last(w)?;
    if let Some(l) = w.loops.pop() {
        sh(Command::new("losetup").args(["-d", &l]), "losetup -d")?;
    }
    if !bad.is_empty() {
        bail!(
            "{} file(s) differ on the replica, e.g. {}",
            bad.len(),
            bad[0]
        );
    }
    println!(
        "   mounted read-only: all {} files read back with the blake3 they were written with",
        latest.len()
    );
    println!(
        "\nDEMO OK: every write acknowledged to the filesystem is at the recovery site, and the"
    );
    println!(
        "earlier bookmark recovers exactly, as a virtual snapshot that mounts and checks clean."
    );
    Ok(())
}

/// Waits until the pair is drained as of a time after `since_ns` and the
/// target has applied everything it holds.
fn wait_drained(w: &mut Work, addr: &DaemonAddr, tstate: &Path, since_ns: u64) -> Result<()> {
    let mut hits = 0;
    wait_until(
        "the recovery site to catch up",
        Duration::from_secs(600),
        w,
        || {
            let ok = crate::protect::call::<ReplicatorStatusFile>(
                addr,
                &crate::replicate::ControlRequest::Status,
            )
            .ok()
            .and_then(|s| s.pairs.into_iter().find(|p| p.status.volume == "demo"))
            .is_some_and(|p| {
                let s = p.status;
                s.state == PairState::DifferentialSync
                    && s.connected
                    && s.drained
                    && s.drained_as_of_ns > since_ns
                    && s.pending_source_bytes == 0
                    && s.in_flight_frames == 0
            }) && read_status::<TargetStatusFile>(tstate).is_ok_and(|t| {
                t.volumes.iter().any(|v| {
                    v.name == "demo"
                        && v.status
                            .as_ref()
                            .is_some_and(|s| s.spool_bytes == 0 && s.applied_seq == s.durable_seq)
                })
            });
            hits = if ok { hits + 1 } else { 0 };
            hits >= 3
        },
    )
}

fn blake3_file(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::copy(&mut f, &mut h).with_context(|| format!("reading {}", path.display()))?;
    Ok(h.finalize().to_hex().to_string())
}
