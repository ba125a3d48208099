//! Token bucket accuracy with a simulated clock, schedules, shared limits,
//! and a real-time limited transfer over loopback.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use replicator::bandwidth::{
    Burst, Clock, LimitedWriter, Limiter, ManualClock, PairLimiter, Schedule,
};
use replicator::tls::{self, ClientTls, ServerTls};

/// Deterministic pseudo-random request sizes (1 B .. 256 KiB).
fn sizes() -> impl Iterator<Item = u64> {
    let mut x = 0x9e3779b97f4a7c15u64;
    std::iter::from_fn(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Some(1 + x % (256 << 10))
    })
}

fn within(actual: f64, expected: f64, tol: f64) -> bool {
    (actual - expected).abs() <= expected * tol
}

#[test]
fn accuracy_over_simulated_ten_seconds() {
    for rate in [100_000u64, 10_000_000, 1_000_000_000] {
        let clock = Arc::new(ManualClock::new(12 * 3600));
        let lim = Limiter::with_clock(Schedule::fixed(rate), Burst::Bytes(64 << 10), clock.clone());
        let mut bytes = 0u64;
        let mut it = sizes();
        while clock.elapsed() < Duration::from_secs(10) {
            let n = it.next().unwrap_or(1);
            lim.acquire(n);
            bytes += n;
        }
        let secs = clock.elapsed().as_secs_f64();
        let got = bytes as f64 / secs;
        assert!(
            within(got, rate as f64, 0.01),
            "rate {rate}: got {got:.0} B/s over {secs:.3} s"
        );
    }
}

#[test]
fn unlimited_never_waits() {
    let clock = Arc::new(ManualClock::new(0));
    let lim = Limiter::with_clock(Schedule::unlimited(), Burst::default(), clock.clone());
    for n in sizes().take(1000) {
        assert_eq!(lim.reserve(n), Duration::ZERO);
    }
    assert_eq!(clock.elapsed(), Duration::ZERO);
}

#[test]
fn schedule_switches_rate_at_window_edges() {
    // 07:59:50 local: 10 s at the default 10 MB/s, then 1 MB/s from 08:00.
    let clock = Arc::new(ManualClock::new(8 * 3600 - 10));
    let sched = Schedule::parse("08:00-18:00=1M, 10M").unwrap();
    let lim = Limiter::with_clock(sched, Burst::Bytes(16 << 10), clock.clone());
    assert_eq!(lim.current_rate(), Some(10_000_000));
    let mut before = 0u64;
    while clock.elapsed() < Duration::from_secs(10) {
        lim.acquire(16 << 10);
        before += 16 << 10;
    }
    assert_eq!(lim.current_rate(), Some(1_000_000));
    let t0 = clock.elapsed();
    let mut after = 0u64;
    while clock.elapsed() - t0 < Duration::from_secs(10) {
        lim.acquire(16 << 10);
        after += 16 << 10;
    }
    let r1 = before as f64 / t0.as_secs_f64();
    let r2 = after as f64 / (clock.elapsed() - t0).as_secs_f64();
    assert!(within(r1, 10e6, 0.02), "before 08:00: {r1:.0}");
    assert!(within(r2, 1e6, 0.02), "after 08:00: {r2:.0}");
}

#[test]
fn pair_and_target_limits_both_apply() {
    let clock = Arc::new(ManualClock::new(0));
    let c: Arc<dyn Clock> = clock.clone();
    let target = Limiter::with_clock(
        Schedule::fixed(10_000_000),
        Burst::Bytes(64 << 10),
        c.clone(),
    );
    let a = PairLimiter {
        pair: Limiter::with_clock(
            Schedule::fixed(8_000_000),
            Burst::Bytes(64 << 10),
            c.clone(),
        ),
        target: Some(target.clone()),
    };
    let b = PairLimiter {
        pair: Limiter::with_clock(
            Schedule::fixed(8_000_000),
            Burst::Bytes(64 << 10),
            c.clone(),
        ),
        target: Some(target.clone()),
    };
    // One pair alone: its own 8 MB/s binds.
    let mut bytes = 0u64;
    while clock.elapsed() < Duration::from_secs(10) {
        a.acquire(32 << 10);
        bytes += 32 << 10;
    }
    let r = bytes as f64 / clock.elapsed().as_secs_f64();
    assert!(within(r, 8e6, 0.01), "single pair: {r:.0}");
    // Two pairs interleaved: the shared 10 MB/s binds (each would allow 8).
    let t0 = clock.elapsed();
    let (mut ba, mut bb) = (0u64, 0u64);
    while clock.elapsed() - t0 < Duration::from_secs(10) {
        a.acquire(32 << 10);
        ba += 32 << 10;
        b.acquire(32 << 10);
        bb += 32 << 10;
    }
    let secs = (clock.elapsed() - t0).as_secs_f64();
    let total = (ba + bb) as f64 / secs;
    assert!(
        within(total, 10e6, 0.01),
        "two pairs through the target limit: {total:.0}"
    );
    assert!(
        within(ba as f64, bb as f64, 0.01),
        "fair share: {ba} vs {bb}"
    );
}

#[test]
fn large_requests_are_paid_as_debt() {
    let clock = Arc::new(ManualClock::new(0));
    let lim = Limiter::with_clock(
        Schedule::fixed(1_000_000),
        Burst::Bytes(1000),
        clock.clone(),
    );
    // 5 MB at once with a 1 KB burst: waits 5 s.
    let w = lim.reserve(5_000_000);
    assert!(within(w.as_secs_f64(), 5.0, 0.001), "{w:?}");
    clock.advance(w);
    // The debt is paid: a small request now waits only for itself.
    let w = lim.reserve(1000);
    assert!(w <= Duration::from_millis(2), "{w:?}");
}

/// A limited transfer over loopback stays within 10% of the configured rate
/// over ~3 s of real time.
#[test]
fn real_time_transfer_over_loopback() {
    const RATE: u64 = 4_000_000;
    const SECS: f64 = 3.0;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let rx = thread::spawn(move || {
        let mut t = tls::accept(&listener, &ServerTls::insecure()).unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        let mut t0 = None;
        loop {
            match t.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    t0.get_or_insert_with(Instant::now);
                    total += n as u64;
                }
            }
        }
        (total, t0.map_or(Duration::ZERO, |t| t.elapsed()))
    });
    let t = tls::connect(&addr, "localhost", &ClientTls::insecure()).unwrap();
    let lim = PairLimiter {
        pair: Limiter::new(Schedule::fixed(RATE)),
        target: None,
    };
    let mut w = LimitedWriter::new(t, lim);
    let block = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < SECS {
        w.write_all(&block[..256 << 10]).unwrap();
        sent += 256 << 10;
    }
    w.flush().unwrap();
    let send_secs = start.elapsed().as_secs_f64();
    w.into_inner().close().unwrap();
    let (got, recv_time) = rx.join().unwrap();
    assert_eq!(got, sent);
    let send_rate = sent as f64 / send_secs;
    let recv_rate = got as f64 / recv_time.as_secs_f64();
    eprintln!("configured {RATE} B/s: sent {sent} B in {send_secs:.3} s = {send_rate:.0} B/s; received at {recv_rate:.0} B/s");
    assert!(
        within(send_rate, RATE as f64, 0.10),
        "sender rate {send_rate:.0}"
    );
    assert!(
        within(recv_rate, RATE as f64, 0.10),
        "receiver rate {recv_rate:.0}"
    );
}
