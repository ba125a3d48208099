//! Bandwidth limiting: a token bucket whose rate follows a time-of-day
//! schedule.
//!
//! - A [`Limiter`] is a token bucket (rate in bytes/s, burst in bytes) behind
//!   a mutex; cloning it shares the bucket, so one limiter can cap all pairs
//!   going to a target while each pair has its own ([`PairLimiter`] applies
//!   both).
//! - The rate comes from a [`Schedule`]: windows of local time of day
//!   (`08:00`–`18:00` at `10M`...), first match wins, outside every window
//!   the default applies (unlimited unless set).
//! - Requests larger than the burst are allowed and paid for as debt: the
//!   caller sleeps until the bucket is back to zero, so long-run throughput
//!   equals the rate whatever the request sizes.
//! - Time comes from a [`Clock`], so the arithmetic is testable with
//!   [`ManualClock`] without sleeping.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Seconds in a day.
const DAY: u32 = 86_400;

/// Errors parsing rates and schedules.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BandwidthError {
    /// A rate string did not parse.
    #[error("invalid rate {0:?}: expected e.g. 10M, 512K, 1.5G, 100Mbit, 20MiB or unlimited")]
    Rate(String),
    /// A time of day did not parse.
    #[error("invalid time of day {0:?}: expected HH:MM (00:00..24:00)")]
    Time(String),
    /// A schedule string did not parse.
    #[error("invalid schedule entry {0:?}: expected HH:MM-HH:MM=RATE")]
    Schedule(String),
}

/// Source of time for limiters.
pub trait Clock: Send + Sync {
    /// Monotonic time since an arbitrary origin.
    fn now(&self) -> Duration;
    /// Local time of day, in seconds since midnight (0..86400).
    fn seconds_of_day(&self) -> u32;
    /// Sleeps (or, for a simulated clock, advances time).
    fn sleep(&self, d: Duration);
}

/// The real clock: `Instant` for durations, the system's local time zone for
/// schedules.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    origin: Instant,
}

impl Default for SystemClock {
    fn default() -> Self {
        SystemClock {
            origin: Instant::now(),
        }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
    fn seconds_of_day(&self) -> u32 {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let t = secs as libc::time_t;
        // SAFETY: libc::tm is a plain C struct of integers and one pointer,
        // for which all-zero bytes are a valid value.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are valid for the duration of the call;
        // localtime_r is the thread-safe variant and writes only into `tm`.
        let r = unsafe { libc::localtime_r(&t, &mut tm) };
        if r.is_null() {
            return (secs % u64::from(DAY)) as u32; // UTC fallback
        }
        let s = tm.tm_hour * 3600 + tm.tm_min * 60 + tm.tm_sec.min(59);
        u32::try_from(s).unwrap_or(0) % DAY
    }
    fn sleep(&self, d: Duration) {
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }
}

/// A simulated clock: `sleep` advances time instantly.
#[derive(Debug, Default)]
pub struct ManualClock {
    state: Mutex<(Duration, u32)>,
}

impl ManualClock {
    /// A clock at monotonic time 0 and `seconds_of_day` local time.
    pub fn new(seconds_of_day: u32) -> Self {
        ManualClock {
            state: Mutex::new((Duration::ZERO, seconds_of_day % DAY)),
        }
    }
    /// Advances time by `d`.
    pub fn advance(&self, d: Duration) {
        lock(&self.state).0 += d;
    }
    /// Total simulated time slept or advanced.
    pub fn elapsed(&self) -> Duration {
        lock(&self.state).0
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Duration {
        lock(&self.state).0
    }
    fn seconds_of_day(&self) -> u32 {
        let s = lock(&self.state);
        ((u64::from(s.1) + s.0.as_secs()) % u64::from(DAY)) as u32
    }
    fn sleep(&self, d: Duration) {
        self.advance(d);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The protected state stays consistent even if a holder panicked.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Parses a rate in bytes per second; `None` means unlimited.
///
/// Accepted: a number (decimals allowed) with an optional suffix `K`, `M`,
/// `G`, `T` (powers of 1000) or `Ki`, `Mi`, `Gi`, `Ti` (powers of 1024),
/// optionally followed by `B`, `B/s` or `/s`; or with `bit`/`bps` for bits
/// per second (`100Mbit` = 12.5 MB/s). `unlimited`, `none`, `off` and `""`
/// mean no limit. Zero is refused (pause the pair instead).
pub fn parse_rate(s: &str) -> Result<Option<u64>, BandwidthError> {
    let err = || BandwidthError::Rate(s.to_owned());
    let t = s.trim();
    if t.is_empty()
        || ["unlimited", "none", "off"]
            .iter()
            .any(|w| t.eq_ignore_ascii_case(w))
    {
        return Ok(None);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| err())?;
    let mut u = unit.trim();
    let mut bits = false;
    for suffix in ["/s", "ps"] {
        if let Some(r) = u.strip_suffix(suffix) {
            u = r;
        }
    }
    if let Some(r) = u.strip_suffix("bit").or_else(|| u.strip_suffix("b")) {
        bits = true;
        u = r;
    } else if let Some(r) = u.strip_suffix('B') {
        u = r;
    }
    let mult: f64 = match u {
        "" => 1.0,
        "K" | "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(err()),
    };
    let bytes = v * mult / if bits { 8.0 } else { 1.0 };
    if !bytes.is_finite() || !(1.0..=1e15).contains(&bytes) {
        return Err(err());
    }
    Ok(Some(bytes.round() as u64))
}

/// Parses `HH:MM` (or `HH:MM:SS`) into seconds since midnight; `24:00` is
/// the end of the day.
pub fn parse_time_of_day(s: &str) -> Result<u32, BandwidthError> {
    let err = || BandwidthError::Time(s.to_owned());
    let parts: Vec<&str> = s.trim().split(':').collect();
    if parts.len() < 2 || parts.len() > 3 || parts.iter().any(|p| p.is_empty() || p.len() > 2) {
        return Err(err());
    }
    let mut v = [0u32; 3];
    for (i, p) in parts.iter().enumerate() {
        v[i] = p.parse().map_err(|_| err())?;
    }
    let [h, m, sec] = v;
    if m > 59 || sec > 59 || h > 24 || (h == 24 && (m | sec) != 0) {
        return Err(err());
    }
    Ok(h * 3600 + m * 60 + sec)
}

/// One schedule window as written in configuration files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSpec {
    /// Start, `HH:MM` local time (inclusive).
    pub from: String,
    /// End, `HH:MM` local time (exclusive); before `from` wraps midnight;
    /// equal to `from` covers the whole day.
    pub to: String,
    /// Rate, see [`parse_rate`].
    pub rate: String,
}

/// A parsed schedule window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Start, seconds since midnight.
    pub from: u32,
    /// End, seconds since midnight.
    pub to: u32,
    /// Rate in bytes/s (`None`: unlimited).
    pub rate: Option<u64>,
}

impl Window {
    /// Whether `sod` (seconds since midnight) falls in the window.
    pub fn contains(&self, sod: u32) -> bool {
        match self.from.cmp(&self.to) {
            std::cmp::Ordering::Less => sod >= self.from && sod < self.to,
            std::cmp::Ordering::Greater => sod >= self.from || sod < self.to,
            std::cmp::Ordering::Equal => true,
        }
    }
}

/// A time-of-day rate schedule.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Schedule {
    /// Windows, first match wins.
    pub windows: Vec<Window>,
    /// Rate outside every window (`None`: unlimited).
    pub default: Option<u64>,
}

impl Schedule {
    /// No limit at any time.
    pub fn unlimited() -> Self {
        Schedule::default()
    }

    /// The same rate all day.
    pub fn fixed(rate: u64) -> Self {
        Schedule {
            windows: Vec::new(),
            default: Some(rate),
        }
    }

    /// From configuration windows and a default rate string.
    pub fn from_specs(specs: &[WindowSpec], default: &str) -> Result<Self, BandwidthError> {
        let windows = specs
            .iter()
            .map(|w| {
                Ok(Window {
                    from: parse_time_of_day(&w.from)?,
                    to: parse_time_of_day(&w.to)? % DAY,
                    rate: parse_rate(&w.rate)?,
                })
            })
            .collect::<Result<_, BandwidthError>>()?;
        Ok(Schedule {
            windows,
            default: parse_rate(default)?,
        })
    }

    /// Parses `"08:00-18:00=10M, 18:00-08:00=100M"`; an entry without a
    /// time range (`"50M"`) sets the default.
    pub fn parse(s: &str) -> Result<Self, BandwidthError> {
        let mut sched = Schedule::default();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            match entry.split_once('=') {
                None => sched.default = parse_rate(entry)?,
                Some((range, rate)) => {
                    let (from, to) = range
                        .split_once('-')
                        .ok_or_else(|| BandwidthError::Schedule(entry.to_owned()))?;
                    sched.windows.push(Window {
                        from: parse_time_of_day(from)?,
                        to: parse_time_of_day(to)? % DAY,
                        rate: parse_rate(rate)?,
                    });
                }
            }
        }
        Ok(sched)
    }

    /// The rate at `sod` seconds since local midnight.
    pub fn rate_at(&self, sod: u32) -> Option<u64> {
        self.windows
            .iter()
            .find(|w| w.contains(sod))
            .map_or(self.default, |w| w.rate)
    }
}

/// How the burst of a bucket is sized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Burst {
    /// A fixed number of bytes.
    Bytes(u64),
    /// The bytes sent at the current rate in this long (at least 64 KiB).
    Time(Duration),
}

impl Default for Burst {
    fn default() -> Self {
        Burst::Time(Duration::from_millis(100))
    }
}

impl Burst {
    fn bytes(self, rate: u64) -> f64 {
        match self {
            Burst::Bytes(b) => b.max(1) as f64,
            Burst::Time(t) => (rate as f64 * t.as_secs_f64()).max(64.0 * 1024.0),
        }
    }
}

/// Pure token bucket arithmetic (no clock, no locking).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBucket {
    rate: Option<u64>,
    burst: f64,
    tokens: f64,
    last: Duration,
}

impl TokenBucket {
    /// An empty bucket (no initial credit) at time `now`.
    pub fn new(rate: Option<u64>, burst: Burst, now: Duration) -> Self {
        let burst = rate.map_or(0.0, |r| burst.bytes(r));
        TokenBucket {
            rate,
            burst,
            tokens: 0.0,
            last: now,
        }
    }

    /// Current rate (`None`: unlimited).
    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// Changes the rate at `now`, keeping the credit (clamped to the new
    /// burst) or the debt.
    pub fn set_rate(&mut self, rate: Option<u64>, burst: Burst, now: Duration) {
        self.refill(now);
        if rate != self.rate {
            self.rate = rate;
            self.burst = rate.map_or(0.0, |r| burst.bytes(r));
            self.tokens = self.tokens.min(self.burst);
        }
    }

    fn refill(&mut self, now: Duration) {
        let dt = now.saturating_sub(self.last).as_secs_f64();
        self.last = self.last.max(now);
        match self.rate {
            Some(r) => self.tokens = (self.tokens + dt * r as f64).min(self.burst),
            None => self.tokens = 0.0,
        }
    }

    /// Takes `n` bytes at `now`; returns how long the caller must wait
    /// before sending them (zero if the credit covered them).
    pub fn reserve(&mut self, n: u64, now: Duration) -> Duration {
        self.refill(now);
        let Some(r) = self.rate else {
            return Duration::ZERO;
        };
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / r as f64)
        }
    }
}

struct LimiterState {
    schedule: Schedule,
    burst: Burst,
    bucket: TokenBucket,
}

/// A shareable, scheduled token bucket. Clones share the same bucket.
#[derive(Clone)]
pub struct Limiter {
    state: Arc<Mutex<LimiterState>>,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = lock(&self.state);
        f.debug_struct("Limiter")
            .field("schedule", &s.schedule)
            .field("rate", &s.bucket.rate)
            .finish()
    }
}

impl Limiter {
    /// A limiter following `schedule` on the real clock.
    pub fn new(schedule: Schedule) -> Self {
        Self::with_clock(schedule, Burst::default(), Arc::new(SystemClock::default()))
    }

    /// A limiter with an explicit burst and clock.
    pub fn with_clock(schedule: Schedule, burst: Burst, clock: Arc<dyn Clock>) -> Self {
        let rate = schedule.rate_at(clock.seconds_of_day());
        let bucket = TokenBucket::new(rate, burst, clock.now());
        Limiter {
            state: Arc::new(Mutex::new(LimiterState {
                schedule,
                burst,
                bucket,
            })),
            clock,
        }
    }

    /// No limit.
    pub fn unlimited() -> Self {
        Self::new(Schedule::unlimited())
    }

    /// Replaces the schedule (configuration reload).
    pub fn set_schedule(&self, schedule: Schedule) {
        let mut s = lock(&self.state);
        s.schedule = schedule;
        let rate = s.schedule.rate_at(self.clock.seconds_of_day());
        let burst = s.burst;
        s.bucket.set_rate(rate, burst, self.clock.now());
    }

    /// The rate in force now (`None`: unlimited).
    pub fn current_rate(&self) -> Option<u64> {
        let s = lock(&self.state);
        s.schedule.rate_at(self.clock.seconds_of_day())
    }

    /// Takes `n` bytes without blocking; returns how long to wait before
    /// sending them.
    pub fn reserve(&self, n: u64) -> Duration {
        let mut s = lock(&self.state);
        let now = self.clock.now();
        let rate = s.schedule.rate_at(self.clock.seconds_of_day());
        let burst = s.burst;
        s.bucket.set_rate(rate, burst, now);
        s.bucket.reserve(n, now)
    }

    /// Blocks until `n` bytes may be sent.
    pub fn acquire(&self, n: u64) {
        let wait = self.reserve(n);
        self.clock.sleep(wait);
    }

    /// The limiter's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }
}

/// The limits of one pair: its own and, optionally, its target's (shared
/// with the other pairs to that target). Both apply.
#[derive(Debug, Clone)]
pub struct PairLimiter {
    /// The pair's own limiter.
    pub pair: Limiter,
    /// The target-wide limiter, shared between pairs.
    pub target: Option<Limiter>,
}

impl PairLimiter {
    /// No limit at all.
    pub fn unlimited() -> Self {
        PairLimiter {
            pair: Limiter::unlimited(),
            target: None,
        }
    }

    /// Blocks until `n` bytes may be sent under both limits. The waits
    /// overlap (both buckets are charged first), so the delay is the
    /// longer of the two, not their sum.
    pub fn acquire(&self, n: u64) {
        let mut wait = self.pair.reserve(n);
        if let Some(t) = &self.target {
            wait = wait.max(t.reserve(n));
        }
        self.pair.clock().sleep(wait);
    }
}

/// A writer whose throughput is shaped by a [`PairLimiter`].
#[derive(Debug)]
pub struct LimitedWriter<W> {
    inner: W,
    limiter: PairLimiter,
    /// Largest slice charged at once (keeps sends smooth).
    pub max_step: usize,
}

impl<W> LimitedWriter<W> {
    /// Wraps `inner`.
    pub fn new(inner: W, limiter: PairLimiter) -> Self {
        LimitedWriter {
            inner,
            limiter,
            max_step: 64 << 10,
        }
    }
    /// The wrapped writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
    /// Unwraps.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for LimitedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.max_step.max(1));
        self.limiter.acquire(n as u64);
        // Charged for n; a short write is charged in full (conservative).
        self.inner.write(&buf[..n])
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("10M"), Ok(Some(10_000_000)));
        assert_eq!(parse_rate("10MB/s"), Ok(Some(10_000_000)));
        assert_eq!(parse_rate("512K"), Ok(Some(512_000)));
        assert_eq!(parse_rate("1.5G"), Ok(Some(1_500_000_000)));
        assert_eq!(parse_rate("20MiB"), Ok(Some(20 << 20)));
        assert_eq!(parse_rate("100Mbit"), Ok(Some(12_500_000)));
        assert_eq!(parse_rate("8kbps"), Ok(Some(1000)));
        assert_eq!(parse_rate("1234"), Ok(Some(1234)));
        assert_eq!(parse_rate("unlimited"), Ok(None));
        assert_eq!(parse_rate(""), Ok(None));
        for bad in ["0", "abc", "10X", "-5M", "1e99", "M"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn times_and_windows() {
        assert_eq!(parse_time_of_day("08:00"), Ok(8 * 3600));
        assert_eq!(parse_time_of_day("23:59:30"), Ok(86_370));
        assert_eq!(parse_time_of_day("24:00"), Ok(DAY));
        for bad in ["8", "25:00", "08:60", "24:01", "a:b", "08:00:00:00"] {
            assert!(parse_time_of_day(bad).is_err(), "{bad}");
        }
        let s = Schedule::parse("08:00-18:00=10M, 22:00-06:00=unlimited, 50M").expect("parse");
        assert_eq!(s.rate_at(7 * 3600), Some(50_000_000));
        assert_eq!(s.rate_at(8 * 3600), Some(10_000_000));
        assert_eq!(s.rate_at(18 * 3600 - 1), Some(10_000_000));
        assert_eq!(s.rate_at(18 * 3600), Some(50_000_000));
        assert_eq!(s.rate_at(23 * 3600), None);
        assert_eq!(s.rate_at(3 * 3600), None);
        let spec = [WindowSpec {
            from: "08:00".into(),
            to: "18:00".into(),
            rate: "10M".into(),
        }];
        let s2 = Schedule::from_specs(&spec, "unlimited").expect("specs");
        assert_eq!(s2.rate_at(12 * 3600), Some(10_000_000));
        assert_eq!(s2.rate_at(20 * 3600), None);
        assert!(Schedule::parse("08:00=10M").is_err());
    }
}
