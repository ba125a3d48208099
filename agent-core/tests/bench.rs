//! Producer-path micro-benchmark (ignored by default; run with
//! `cargo test --release -p agent-core --test bench -- --ignored --nocapture`).
//! Reports ns per recorded 4 KiB write with a consumer draining concurrently,
//! next to the cost of a bare 4 KiB memcpy measured in the same run.

mod common;

use std::sync::Arc;
use std::time::Instant;

use agent_core::*;

fn setup(d: &std::path::Path) -> (Arc<ChangeLog>, Consumer) {
    let vol = 1u64 << 30;
    let log =
        Arc::new(ChangeLog::open_or_create(common::cfg(d, "bench", vol, 4096, 64 << 20)).unwrap());
    // warm the activity log (one write per extent) and the ring pages
    let mut c = Consumer::attach(log.path()).unwrap();
    for i in 0..16_000u64 {
        let t = log.begin((i << 26) % vol + (i % 64) * 4096, 4096);
        log.complete_write(t, &[0u8; 4096]);
    }
    drain(&mut c);
    (log, c)
}

fn drain(c: &mut Consumer) {
    while let Some(b) = c.get(64 << 20).unwrap() {
        c.commit(b).unwrap();
    }
}

/// ns per 4 KiB write (per thread), data mode: rounds of writes that fit in the
/// 64 MiB ring, drained (untimed) between rounds.
fn data_mode(threads: usize, rounds: u64) -> f64 {
    let d = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let (log, mut c) = setup(d.path());
    let per_round = 15_000u64 / threads as u64;
    let mut busy = std::time::Duration::ZERO;
    for r in 0..rounds {
        let t0 = Instant::now();
        let workers: Vec<_> = (0..threads)
            .map(|k| {
                let log = log.clone();
                std::thread::spawn(move || {
                    let buf = vec![k as u8; 4096];
                    for i in 0..per_round {
                        let off = ((r * 100_003 + i * 7919 + k as u64 * 13) % (1 << 18)) * 4096;
                        let t = log.begin(off, 4096);
                        log.complete_write(t, &buf);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        busy += t0.elapsed();
        drain(&mut c);
    }
    let st = log.stats();
    assert_eq!(st.metadata_records + st.bitmap_writes, 0, "left data mode");
    let total = rounds * per_round * threads as u64;
    let ns = busy.as_nanos() as f64 * threads as f64 / total as f64;
    eprintln!("data mode, {threads} thread(s): {total} x 4 KiB: {ns:.0} ns/write per thread ({:.0} k writes/s)", total as f64 / busy.as_secs_f64() / 1e3);
    ns
}

fn bitmap_mode(n: u64) -> f64 {
    let d = tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap();
    let (log, _c) = setup(d.path());
    log.set_filtering(false);
    let buf = vec![0u8; 4096];
    let t0 = Instant::now();
    for i in 0..n {
        let t = log.begin(((i * 7919) % (1 << 18)) * 4096, 4096);
        log.complete_write(t, &buf);
    }
    let ns = t0.elapsed().as_nanos() as f64 / n as f64;
    eprintln!("bitmap mode, 1 thread: {ns:.0} ns/write");
    ns
}

#[test]
#[ignore]
fn producer_ns_per_4k_write() {
    // baseline: 4 KiB memcpy into a warm 64 MiB buffer
    let src = vec![1u8; 4096];
    let mut dst = vec![1u8; 64 << 20];
    let n = 500_000u64;
    let t0 = Instant::now();
    for i in 0..n {
        let o = ((i * 4104) % ((64 << 20) - 4096)) as usize;
        dst[o..o + 4096].copy_from_slice(&src);
    }
    std::hint::black_box(&dst);
    eprintln!(
        "baseline 4 KiB memcpy: {:.0} ns",
        t0.elapsed().as_nanos() as f64 / n as f64
    );
    data_mode(1, 20);
    data_mode(2, 20);
    bitmap_mode(500_000);
}
