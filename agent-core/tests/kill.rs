//! Cross-process kill test (acceptance test of the change log): a producer
//! process and a consumer process, either or both SIGKILLed at random moments
//! and restarted, hundreds of times; at the end a fresh producer recovers, a
//! fresh consumer drains, and the replica must equal the source byte for byte.
//!
//! The test binary re-executes itself: `role_child` is a `#[test]` that returns
//! immediately unless `REWIND_KILL_ROLE` is set, in which case it runs the
//! producer or consumer loop forever (until killed).

mod common;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_core::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng};

const VOL: u64 = 4 << 20;
const ROLE_ENV: &str = "REWIND_KILL_ROLE";
const DIR_ENV: &str = "REWIND_KILL_DIR";

fn config(dir: &Path) -> ChangeLogConfig {
    let mut c = common::cfg(dir, "kill", VOL, 4096, 64 * 1024);
    c.extent_shift = 16; // 64 KiB extents: 64 of them
    c.persist_interval = Duration::from_millis(50);
    c
}

fn retry<T>(mut f: impl FnMut() -> Result<T, ChangeLogError>) -> T {
    let t0 = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(ChangeLogError::Busy { .. }) if t0.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn role_child() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    let dir = PathBuf::from(std::env::var(DIR_ENV).expect("dir"));
    match role.as_str() {
        "producer" => producer(&dir),
        "consumer" => consumer(&dir),
        "recover" => {
            // What a restarted agent does first: open (= recovery), then die.
            let log = retry(|| ChangeLog::open_or_create(config(&dir)));
            log.simulate_crash();
        }
        r => panic!("unknown role {r}"),
    }
}

/// Writes random data to the source file through the change-log protocol
/// (begin, pwrite, complete) from two threads on disjoint halves of the
/// volume (the filter serialises overlapping writes; disjoint halves model
/// that), logging each acknowledged write to `acks`.
fn producer(dir: &Path) -> ! {
    let log = std::sync::Arc::new(retry(|| ChangeLog::open_or_create(config(dir))));
    log.start_persister();
    let src = std::sync::Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("source"))
            .unwrap(),
    );
    for k in 0..2u64 {
        let (log, src) = (log.clone(), src.clone());
        let mut acks = OpenOptions::new()
            .append(true)
            .open(dir.join("acks"))
            .unwrap();
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::from_entropy();
            let mut buf = vec![0u8; 96 * 1024];
            let half = VOL / 2;
            for n in 0u64.. {
                let max_sectors = if rng.gen_bool(0.8) { 16 } else { 192 };
                let len = 512 * rng.gen_range(1..=max_sectors);
                let off = k * half + 512 * rng.gen_range(0..(half - len) / 512);
                let data = &mut buf[..len as usize];
                let what = rng.gen_range(0..100);
                let t = log.begin(off, len);
                if what < 8 {
                    data.fill(0);
                    src.write_all_at(data, off).unwrap();
                    log.complete_zero(t);
                } else if what < 10 {
                    rng.fill(&mut data[..]);
                    src.write_all_at(&data[..len as usize / 2], off).unwrap();
                    log.abort(t); // "failed" write that changed half of the range
                } else {
                    rng.fill(&mut data[..]);
                    src.write_all_at(data, off).unwrap();
                    log.complete_write(t, data);
                }
                let mut rec = [0u8; 16];
                rec[..8].copy_from_slice(&off.to_le_bytes());
                rec[8..].copy_from_slice(&len.to_le_bytes());
                acks.write_all(&rec).unwrap();
                if n % 64 == 0 {
                    let _ = log.insert_tag("t", TagType::User, [k as u8; 16]);
                }
                if n % 8 == 0 {
                    std::thread::sleep(Duration::from_micros(rng.gen_range(0..300)));
                }
            }
        });
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn apply_to_files(b: &Batch, src: &File, rep: &File, buf: &mut Vec<u8>) {
    let mut copy = |o: u64, l: u64| {
        buf.resize(l as usize, 0);
        src.read_exact_at(buf, o).unwrap();
        rep.write_all_at(buf, o).unwrap();
    };
    match b.kind() {
        BatchKind::Ring => {
            for r in b.records() {
                match r.kind {
                    RecordKind::Data => rep.write_all_at(&r.data, r.offset).unwrap(),
                    RecordKind::Metadata => copy(r.offset, r.len),
                    RecordKind::Zero => rep
                        .write_all_at(&vec![0u8; r.len as usize], r.offset)
                        .unwrap(),
                    RecordKind::Tag => {}
                }
            }
        }
        BatchKind::Bitmap => {
            for &(o, l) in b.ranges() {
                copy(o, l);
            }
        }
    }
}

/// Drains into the replica file: up to three batches outstanding, applied in
/// order, committed in order after being applied (process kill does not lose
/// page-cache writes, so "durable at the target" = written to the file).
fn consumer(dir: &Path) -> ! {
    let path = config(dir).region_path();
    while !path.exists() {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut c = retry(|| Consumer::attach(&path));
    let src = File::open(dir.join("source")).unwrap();
    let rep = OpenOptions::new()
        .write(true)
        .open(dir.join("replica"))
        .unwrap();
    let mut rng = rand::rngs::StdRng::from_entropy();
    let mut buf = Vec::new();
    loop {
        let mut batches = Vec::new();
        for _ in 0..rng.gen_range(1..=3) {
            match c.get(rng.gen_range(4096..256 * 1024)).unwrap() {
                Some(b) => batches.push(b),
                None => break,
            }
        }
        if batches.is_empty() {
            std::thread::sleep(Duration::from_micros(500));
            continue;
        }
        for b in &batches {
            apply_to_files(b, &src, &rep, &mut buf);
        }
        for b in batches {
            c.commit(b).unwrap();
        }
    }
}

fn add(acc: &mut Transitions, t: &Transitions) {
    acc.data_to_metadata += t.data_to_metadata;
    acc.metadata_to_bitmap += t.metadata_to_bitmap;
    acc.data_to_bitmap += t.data_to_bitmap;
    acc.bitmap_to_data += t.bitmap_to_data;
    acc.metadata_to_data += t.metadata_to_data;
    acc.filtering_stops += t.filtering_stops;
}

fn spawn(role: &str, dir: &Path, n: usize) -> Child {
    let err = File::create(dir.join(format!("{role}-{n}.stderr"))).unwrap();
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "role_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(ROLE_ENV, role)
        .env(DIR_ENV, dir)
        .env("RUST_BACKTRACE", "1")
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .unwrap()
}

fn kill9(c: &mut Child) {
    let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
    let _ = c.wait();
}

fn check_alive(c: &mut Child, role: &str, dir: &Path, n: usize) {
    if let Ok(Some(st)) = c.try_wait() {
        let err =
            std::fs::read_to_string(dir.join(format!("{role}-{n}.stderr"))).unwrap_or_default();
        panic!("{role} exited by itself ({st}):\n{err}");
    }
}

/// With both processes dead and recovery done: every byte where the replica
/// differs from the source must be owed by the change log (ring records or
/// dirty bits), and so must every acknowledged write. Returns (differing
/// bytes, acknowledged writes).
fn check_nothing_lost(dir: &Path, cfg: &ChangeLogConfig) -> (usize, usize) {
    let view = ChangeLogView::open(cfg.region_path()).unwrap();
    let owed = view.uncommitted_ranges();
    let source = std::fs::read(dir.join("source")).unwrap();
    let replica = std::fs::read(dir.join("replica")).unwrap();
    let mut owed_byte = vec![false; source.len()];
    for &(s, n) in &owed {
        owed_byte[s as usize..(s + n) as usize].fill(true);
    }
    let differing: Vec<usize> = (0..source.len())
        .filter(|&i| source[i] != replica[i])
        .collect();
    for &i in &differing {
        assert!(
            owed_byte[i],
            "byte {i} differs but is owed by nobody (lost change); {} owed ranges",
            owed.len()
        );
    }
    // Every acknowledged write is, byte by byte, already equal at the replica
    // or owed by the change log (prefix sums of "lost" bytes: O(1) per write).
    let mut lost_prefix = vec![0u32; source.len() + 1];
    for i in 0..source.len() {
        lost_prefix[i + 1] = lost_prefix[i] + (source[i] != replica[i] && !owed_byte[i]) as u32;
    }
    let acks = std::fs::read(dir.join("acks")).unwrap();
    let mut nacks = 0;
    for rec in acks.chunks_exact(16) {
        let off = u64::from_le_bytes(rec[..8].try_into().unwrap()) as usize;
        let len = u64::from_le_bytes(rec[8..].try_into().unwrap()) as usize;
        assert_eq!(
            lost_prefix[off + len],
            lost_prefix[off],
            "acknowledged write {off}+{len} lost"
        );
        nacks += 1;
    }
    (differing.len(), nacks)
}

#[test]
fn kill_producer_and_consumer_at_random_moments() {
    let iterations: usize = std::env::var("REWIND_KILL_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let base = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm")
    } else {
        tempfile::tempdir()
    }
    .unwrap();
    let dir = base.path();
    for f in ["source", "replica", "acks"] {
        File::create(dir.join(f))
            .unwrap()
            .set_len(if f == "acks" { 0 } else { VOL })
            .unwrap();
    }
    let seed: u64 = std::env::var("REWIND_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!(
        "kill test: {iterations} iterations, seed {seed}, dir {}",
        dir.display()
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let t0 = Instant::now();
    let (mut np, mut nc) = (0usize, 0usize);
    let mut prod = spawn("producer", dir, np);
    let mut cons = spawn("consumer", dir, nc);
    let (mut kp, mut kc, mut checks, mut reboots) = (0, 0, 0, 0);
    let mut modes = Transitions::default();
    for _ in 0..iterations {
        std::thread::sleep(Duration::from_micros(rng.gen_range(1_000..30_000)));
        check_alive(&mut prod, "producer", dir, np);
        check_alive(&mut cons, "consumer", dir, nc);
        let victim = rng.gen_range(0..3); // 0: producer; 1: consumer; 2: both, then check
        if victim != 1 {
            kill9(&mut prod);
            kp += 1;
            np += 1;
        }
        if victim != 0 {
            kill9(&mut cons);
            kc += 1;
            nc += 1;
        }
        if victim == 2 {
            // Sometimes a "host reboot": /dev/shm is wiped, only the state
            // directory (bitmap file + activity log) survives.
            if rng.gen_bool(0.25) {
                add(
                    &mut modes,
                    &ChangeLogView::open(config(dir).region_path())
                        .unwrap()
                        .stats()
                        .transitions,
                );
                std::fs::remove_file(config(dir).region_path()).unwrap();
                reboots += 1;
            }
            // Quiescent point: a child process recovers the change log, then
            // nothing may be lost.
            let st = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "role_child",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env(ROLE_ENV, "recover")
                .env(DIR_ENV, dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(st.success());
            check_nothing_lost(dir, &config(dir));
            checks += 1;
        }
        if victim != 1 {
            prod = spawn("producer", dir, np);
        }
        if victim != 0 {
            cons = spawn("consumer", dir, nc);
        }
    }
    std::thread::sleep(Duration::from_millis(20));
    kill9(&mut prod);
    kill9(&mut cons);
    let run_time = t0.elapsed();

    // Recovery by a fresh producer, then: every byte where the replica differs
    // from the source must be owed by the change log (ring or bitmap).
    let cfg = config(dir);
    let (log, report) = ChangeLog::open_with_report(cfg.clone()).unwrap();
    eprintln!("final recovery: {report:?}; {checks} intermediate no-loss checks passed ({reboots} after simulated reboots)");
    let (ndiff, nacks) = check_nothing_lost(dir, &cfg);
    let source = std::fs::read(dir.join("source")).unwrap();
    let st = log.stats();
    add(&mut modes, &st.transitions);
    log.close().unwrap();

    // Final drain with a fresh consumer.
    let mut c = Consumer::attach(cfg.region_path()).unwrap();
    let src = File::open(dir.join("source")).unwrap();
    let rep = OpenOptions::new()
        .write(true)
        .open(dir.join("replica"))
        .unwrap();
    let mut buf = Vec::new();
    while let Some(b) = c.get(1 << 20).unwrap() {
        apply_to_files(&b, &src, &rep, &mut buf);
        c.commit(b).unwrap();
    }
    drop(rep);
    let replica = std::fs::read(dir.join("replica")).unwrap();
    let first = source.iter().zip(&replica).position(|(a, b)| a != b);
    eprintln!(
        "kill test: {kp} producer kills, {kc} consumer kills in {run_time:?}; {nacks} acknowledged writes; {} bytes differed before the final drain; \
         data/meta/zero records {}/{}/{}, bitmap writes {}, transitions {:?}, recoveries {}, tags {}/{} refused",
        ndiff,
        st.data_records,
        st.metadata_records,
        st.zero_records,
        st.bitmap_writes,
        st.transitions,
        st.recoveries,
        st.tags_inserted,
        st.tags_refused
    );
    assert!(
        first.is_none(),
        "replica differs from source at byte {first:?}"
    );
    assert!(
        nacks > 1000,
        "the producer hardly wrote ({nacks} acknowledged writes)"
    );
    assert!(kp + kc >= iterations);
    eprintln!("mode transitions over the whole run (all regions): {modes:?}");
    assert!(
        modes.data_to_metadata > 0 && modes.metadata_to_bitmap + modes.data_to_bitmap > 0,
        "the run did not exercise all capture modes: {modes:?}"
    );
}
