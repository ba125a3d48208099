//! The replay engine: maps a trace onto the export and replays it over one
//! pipelined NBD connection.
//!
//! Ordering rules (what makes the model exact):
//! * requests are issued in trace order, up to the queue depth in flight;
//! * a write-like request waits until no in-flight request overlaps it, and
//!   a read waits until no in-flight write overlaps it, so overlapping
//!   operations reach the volume in trace order;
//! * a flush (or a preflush) waits until every earlier write has been
//!   answered, then is sent: it covers all of them;
//! * a barrier (bookmark, time point, sync position) waits until nothing is
//!   in flight.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use filter_nbd::client::{Cmd, Connection, ReplyReceiver, RequestSender};
use filter_nbd::proto::{TF_SEND_FLUSH, TF_SEND_FUA, TF_SEND_TRIM, TF_SEND_WRITE_ZEROES};

use super::block::{self, BLOCK};
use super::model::{Mismatch, Model, State};
use super::trace::{OpKind, Trace};

/// How offsets of a trace larger than the export were mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MapMode {
    /// The trace fits: offsets unchanged.
    Identity,
    /// Offsets taken modulo the export size.
    Wrap,
    /// Offsets scaled by export size / trace size.
    Scale,
}

/// One planned operation in whole blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOp {
    /// Sequence number (1-based trace position).
    pub seq: u64,
    /// Trace line.
    pub line: usize,
    /// Time since the start of the trace.
    pub time_ns: u64,
    /// Operation.
    pub kind: OpKind,
    /// First block.
    pub first: u64,
    /// Number of blocks (0 for a flush).
    pub n: u64,
    /// FUA.
    pub fua: bool,
    /// Flush before.
    pub preflush: bool,
}

/// Summary of the mapping.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MapReport {
    /// Mode used.
    pub mode: MapMode,
    /// Largest byte offset of the trace.
    pub trace_end: u64,
    /// Export size.
    pub export_size: u64,
    /// Operations whose range was widened to whole 4 KiB blocks.
    pub rounded: u64,
    /// Operations shortened to fit the export.
    pub clipped: u64,
}

/// Maps a trace onto an export of `size` bytes, in whole 4 KiB blocks.
/// `mode` is the method used when the trace is larger (never Identity then).
pub fn plan(trace: &Trace, size: u64, mode: MapMode) -> Result<(Vec<PlanOp>, MapReport)> {
    let nblocks = size / BLOCK;
    if nblocks == 0 {
        bail!("the export ({size} bytes) is smaller than one 4 KiB block");
    }
    let mode = if trace.max_end <= nblocks * BLOCK {
        MapMode::Identity
    } else if mode == MapMode::Identity {
        bail!(
            "the trace addresses {} bytes but the export has {size}; use --map wrap or --map scale",
            trace.max_end
        );
    } else {
        mode
    };
    let mut rep = MapReport {
        mode,
        trace_end: trace.max_end,
        export_size: size,
        rounded: 0,
        clipped: 0,
    };
    let trace_blocks = trace.max_end.div_ceil(BLOCK).max(1);
    let mut out = Vec::with_capacity(trace.ops.len());
    for (i, o) in trace.ops.iter().enumerate() {
        let seq = i as u64 + 1;
        let (mut first, mut n) = if o.kind == OpKind::Flush {
            (0, 0)
        } else {
            let a = o.offset / BLOCK;
            let e = (o.offset + o.len).div_ceil(BLOCK);
            if o.offset % BLOCK != 0 || o.len % BLOCK != 0 {
                rep.rounded += 1;
            }
            (a, e - a)
        };
        if n > 0 {
            match mode {
                MapMode::Identity => {}
                MapMode::Wrap => first %= nblocks,
                MapMode::Scale => {
                    first = ((u128::from(first) * u128::from(nblocks)) / u128::from(trace_blocks))
                        as u64
                }
            }
            if n > nblocks {
                n = nblocks;
                rep.clipped += 1;
            }
            if first + n > nblocks {
                first = nblocks - n;
            }
        }
        out.push(PlanOp {
            seq,
            line: o.line,
            time_ns: o.time_ns,
            kind: o.kind,
            first,
            n,
            fua: o.fua,
            preflush: o.preflush,
        });
    }
    Ok((out, rep))
}

/// Pacing of the replay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Speed {
    /// As fast as the queue depth allows.
    Asap,
    /// At the trace's timestamps divided by the factor (1.0 = original).
    Factor(f64),
}

/// A barrier in the replay, reported to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Barrier {
    /// A bookmark is due after this many operations.
    Bookmark,
    /// A sampled time point.
    TimePoint,
    /// A caller-requested synchronisation position.
    Sync,
}

/// Engine options.
pub struct EngineOpts {
    /// Maximum requests in flight.
    pub queue_depth: usize,
    /// Pacing.
    pub speed: Speed,
    /// Writer id stamped into blocks.
    pub writer: u32,
    /// Barriers: after how many operations (sorted), and which kind.
    pub barriers: Vec<(u64, Barrier)>,
    /// Bookmark every this much time (in addition to `barriers`).
    pub bookmark_interval: Option<Duration>,
    /// Print progress to stderr every second.
    pub progress: bool,
}

/// Result counters of a replay.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Stats {
    /// Operations replayed (including flushes).
    pub ops: u64,
    /// Reads / writes / trims / flushes sent.
    pub reads: u64,
    /// Writes sent.
    pub writes: u64,
    /// Trims sent.
    pub trims: u64,
    /// Flushes sent (including preflushes and barrier flushes).
    pub flushes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Wall time of the replay in seconds.
    pub seconds: f64,
    /// Time spent waiting at barriers (bookmarks etc.), seconds.
    pub barrier_seconds: f64,
    /// Read blocks checked inline.
    pub read_blocks_checked: u64,
    /// Largest number of requests in flight seen.
    pub max_in_flight: usize,
    /// Trims skipped because the export supports neither TRIM nor WRITE_ZEROES.
    pub trims_skipped: u64,
}

struct Flight {
    seq: u64,
    kind: OpKind,
    first: u64,
    n: u64,
}

#[derive(Default)]
struct Shared {
    flights: HashMap<u64, Flight>,
    /// completed reads awaiting their check: (seq, first block, data)
    reads: Vec<(u64, u64, Vec<u8>)>,
    error: Option<String>,
    completed: u64,
    receiver_done: bool,
    /// per sequence number: wall time (ns since the epoch) the last reply arrived
    done_ns: Vec<u64>,
}

type Sync = Arc<(Mutex<Shared>, Condvar)>;

fn lock(s: &Sync) -> std::sync::MutexGuard<'_, Shared> {
    s.0.lock().unwrap_or_else(|e| e.into_inner())
}

fn receiver_loop<R: Read>(mut rx: ReplyReceiver<R>, sync: Sync) {
    loop {
        let r = rx.recv();
        let mut st = lock(&sync);
        match r {
            Ok(reply) => {
                let f = st.flights.remove(&reply.handle);
                match (reply.result, f) {
                    (Ok(data), Some(f)) => {
                        st.completed += 1;
                        let i = f.seq as usize;
                        if st.done_ns.len() <= i {
                            st.done_ns.resize(i + 1, 0);
                        }
                        st.done_ns[i] = super::now_ns();
                        if f.kind == OpKind::Read {
                            st.reads.push((f.seq, f.first, data));
                        }
                    }
                    (Err(errno), f) => {
                        let what =
                            f.map_or("?".to_string(), |f| format!("{:?} seq {}", f.kind, f.seq));
                        st.error
                            .get_or_insert(format!("server error {errno} on {what}"));
                    }
                    (Ok(_), None) => {
                        st.error.get_or_insert("reply to an unknown request".into());
                    }
                }
            }
            Err(e) => {
                if !st.flights.is_empty() || st.error.is_none() {
                    st.error.get_or_insert(format!("{e}"));
                }
                st.receiver_done = true;
                sync.1.notify_all();
                return;
            }
        }
        sync.1.notify_all();
    }
}

/// Callback at each barrier: (kind, operations done so far).
pub type BarrierHook<'a> = dyn FnMut(Barrier, u64, &Model) -> Result<()> + 'a;

/// The replay engine over one connection.
pub struct Engine {
    tx: RequestSender,
    sync: Sync,
    rx_thread: Option<std::thread::JoinHandle<()>>,
    flags: u16,
    max_payload: u64,
    /// Checked-read mismatches.
    pub read_mismatches: Vec<Mismatch>,
    /// Counters.
    pub stats: Stats,
    /// per sequence number: wall time (ns since the epoch) its first request was sent
    issue_ns: Vec<u64>,
    buf: Vec<u8>,
}

/// When each operation was sent and answered (wall clock, ns since the
/// epoch), to bound which writes a recovery point at time T may contain.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// `issue[seq]`: when operation `seq` was sent (non-decreasing).
    pub issue: Vec<u64>,
    /// `done_prefix[seq]`: when operations `1..=seq` had all been answered.
    pub done_prefix: Vec<u64>,
}

impl Timeline {
    /// The longest prefix of operations all answered at or before `t`.
    pub fn done_by(&self, t: u64) -> u64 {
        self.done_prefix
            .partition_point(|&d| d <= t)
            .saturating_sub(1) as u64
    }
    /// The last operation sent at or before `t`.
    pub fn issued_by(&self, t: u64) -> u64 {
        self.issue.partition_point(|&d| d <= t).saturating_sub(1) as u64
    }
    /// When operation `seq` was sent.
    pub fn issued_at(&self, seq: u64) -> u64 {
        self.issue.get(seq as usize).copied().unwrap_or(u64::MAX)
    }
}

impl Engine {
    /// Takes over `conn`.
    pub fn new(conn: Connection) -> Engine {
        let flags = conn.info.flags;
        let max_payload = (conn.info.max_payload() / BLOCK * BLOCK).max(BLOCK);
        let (tx, rx) = conn.split();
        let sync: Sync = Arc::default();
        let s2 = sync.clone();
        let rx_thread = std::thread::Builder::new()
            .name("replay-rx".into())
            .spawn(move || receiver_loop(rx, s2))
            .ok();
        Engine {
            tx,
            sync,
            rx_thread,
            flags,
            max_payload,
            read_mismatches: Vec::new(),
            stats: Stats::default(),
            issue_ns: Vec::new(),
            buf: Vec::new(),
        }
    }

    /// Waits until `ok(state)` holds; fails if the connection failed.
    fn wait_until(&self, mut ok: impl FnMut(&Shared) -> bool) -> Result<()> {
        let mut st = lock(&self.sync);
        loop {
            if let Some(e) = &st.error {
                bail!("replay failed: {e}");
            }
            if ok(&st) {
                return Ok(());
            }
            if st.receiver_done {
                bail!("the NBD connection closed");
            }
            st = self
                .sync
                .1
                .wait_timeout(st, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    fn check_reads(&mut self, model: &Model) {
        let reads = std::mem::take(&mut lock(&self.sync).reads);
        for (seq, first, data) in reads {
            for (i, c) in data.chunks(BLOCK as usize).enumerate() {
                self.stats.read_blocks_checked += 1;
                // the read saw every write before it and none after
                if let Some(m) = model.check(first + i as u64, seq - 1, c) {
                    if self.read_mismatches.len() < 1000 {
                        self.read_mismatches.push(m);
                    }
                }
            }
        }
    }

    fn send(&mut self, cmd: Cmd<'_>, f: Flight) -> Result<()> {
        // register before sending: the reply may arrive before send returns
        let h = self.tx.next_handle();
        if let Some(t) = self.issue_ns.get_mut(f.seq as usize).filter(|t| **t == 0) {
            *t = super::now_ns();
        }
        {
            let mut st = lock(&self.sync);
            st.flights.insert(h, f);
            self.stats.max_in_flight = self.stats.max_in_flight.max(st.flights.len());
        }
        match self.tx.send(cmd) {
            Ok(sent) if sent == h => Ok(()),
            Ok(_) => bail!("NBD client handle numbering changed"),
            Err(e) => {
                lock(&self.sync).flights.remove(&h);
                Err(e.into())
            }
        }
    }

    fn flush(&mut self, seq: u64) -> Result<()> {
        if self.flags & TF_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.wait_until(|s| {
            s.flights
                .values()
                .all(|f| f.kind == OpKind::Read || f.kind == OpKind::Flush)
        })?;
        self.stats.flushes += 1;
        self.send(
            Cmd::Flush,
            Flight {
                seq,
                kind: OpKind::Flush,
                first: 0,
                n: 0,
            },
        )
    }

    /// Waits until nothing is in flight.
    pub fn drain(&mut self, model: &Model) -> Result<()> {
        self.wait_until(|s| s.flights.is_empty())?;
        self.check_reads(model);
        Ok(())
    }

    /// Flushes and drains (a barrier).
    pub fn barrier(&mut self, seq: u64, model: &Model) -> Result<()> {
        self.flush(seq)?;
        self.drain(model)
    }

    /// Replays `plan`, updating `model`; `hook` runs at each barrier after
    /// everything before it was answered and flushed.
    pub fn run(
        &mut self,
        plan: &[PlanOp],
        model: &mut Model,
        opts: &EngineOpts,
        hook: &mut BarrierHook<'_>,
    ) -> Result<()> {
        let start = Instant::now();
        let mut last_progress = Instant::now();
        let mut last_bookmark = Instant::now();
        let mut barriers = opts.barriers.iter().peekable();
        let qd = opts.queue_depth.max(1);
        for op in plan {
            model.note_line(op.seq, op.line);
            // barriers due before this op
            while let Some(&&(at, kind)) = barriers.peek() {
                if at >= op.seq {
                    break;
                }
                barriers.next();
                let t = Instant::now();
                self.barrier(op.seq - 1, model)?;
                hook(kind, op.seq - 1, model)?;
                self.stats.barrier_seconds += t.elapsed().as_secs_f64();
            }
            if let Some(iv) = opts.bookmark_interval {
                if last_bookmark.elapsed() >= iv {
                    last_bookmark = Instant::now();
                    let t = Instant::now();
                    self.barrier(op.seq - 1, model)?;
                    hook(Barrier::Bookmark, op.seq - 1, model)?;
                    self.stats.barrier_seconds += t.elapsed().as_secs_f64();
                }
            }
            if let Speed::Factor(f) = opts.speed {
                let due = Duration::from_nanos((op.time_ns as f64 / f) as u64);
                let now = start.elapsed();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            if op.preflush {
                self.flush(op.seq)?;
            }
            self.issue(op, model, qd)?;
            self.stats.ops += 1;
            if lock(&self.sync).reads.len() > 64 {
                self.check_reads(model);
            }
            if opts.progress && last_progress.elapsed() >= Duration::from_secs(1) {
                last_progress = Instant::now();
                let secs = start.elapsed().as_secs_f64().max(1e-9);
                eprintln!(
                    "replay: {}/{} ops ({:.0}%), {:.0} IOPS, {:.1} MB/s written, {:.1} MB/s read",
                    op.seq,
                    plan.len(),
                    op.seq as f64 * 100.0 / plan.len().max(1) as f64,
                    self.stats.ops as f64 / secs,
                    self.stats.bytes_written as f64 / secs / 1e6,
                    self.stats.bytes_read as f64 / secs / 1e6
                );
            }
        }
        let last = plan.last().map_or(0, |o| o.seq);
        for &(_, kind) in barriers {
            self.barrier(last, model)?;
            hook(kind, last, model)?;
        }
        self.barrier(last, model)?;
        self.stats.seconds = start.elapsed().as_secs_f64();
        Ok(())
    }

    /// The send/answer times of the operations replayed so far.
    pub fn timeline(&self) -> Timeline {
        let done = lock(&self.sync).done_ns.clone();
        let n = self.issue_ns.len();
        let mut done_prefix = vec![0u64; n];
        let mut m = 0u64;
        for (i, d) in done_prefix.iter_mut().enumerate().skip(1) {
            // an op without a reply time (a flush skipped, a trim not sent) counts as answered when sent
            let t = done
                .get(i)
                .copied()
                .filter(|&x| x > 0)
                .unwrap_or(self.issue_ns[i]);
            m = m.max(t);
            *d = m;
        }
        let mut issue = self.issue_ns.clone();
        for i in 1..issue.len() {
            issue[i] = issue[i].max(issue[i - 1]);
        }
        Timeline { issue, done_prefix }
    }

    fn issue(&mut self, op: &PlanOp, model: &mut Model, qd: usize) -> Result<()> {
        let i = op.seq as usize;
        if self.issue_ns.len() <= i {
            self.issue_ns.resize(i + 1, 0);
        }
        let r = self.issue_inner(op, model, qd);
        if self.issue_ns[i] == 0 {
            self.issue_ns[i] = super::now_ns();
        }
        r
    }

    fn issue_inner(&mut self, op: &PlanOp, model: &mut Model, qd: usize) -> Result<()> {
        let (a, e) = (op.first, op.first + op.n);
        let overlaps = move |f: &Flight| f.n > 0 && f.first < e && a < f.first + f.n;
        match op.kind {
            OpKind::Flush => return self.flush(op.seq),
            OpKind::Read => {
                self.wait_until(|s| {
                    s.flights.len() < qd
                        && !s
                            .flights
                            .values()
                            .any(|f| f.kind != OpKind::Read && overlaps(f))
                })?;
            }
            OpKind::Write | OpKind::Trim => {
                self.wait_until(|s| s.flights.len() < qd && !s.flights.values().any(overlaps))?;
            }
        }
        let fua = op.fua && self.flags & TF_SEND_FUA != 0;
        // READ/WRITE are bounded by the maximum payload; a TRIM only by the 32-bit length
        let step = if op.kind == OpKind::Trim {
            u64::from(u32::MAX) / BLOCK
        } else {
            self.max_payload / BLOCK
        };
        let mut b = a;
        while b < e {
            let n = step.min(e - b);
            let off = b * BLOCK;
            let len = n * BLOCK;
            let flight = Flight {
                seq: op.seq,
                kind: op.kind,
                first: b,
                n,
            };
            match op.kind {
                OpKind::Read => {
                    self.stats.reads += 1;
                    self.stats.bytes_read += len;
                    self.send(Cmd::Read { offset: off, len }, flight)?;
                }
                OpKind::Write => {
                    let mut buf = std::mem::take(&mut self.buf);
                    buf.resize(len as usize, 0);
                    for (i, c) in buf.chunks_mut(BLOCK as usize).enumerate() {
                        block::encode(&model.stamp(off + i as u64 * BLOCK, op.seq, WRITER), c);
                    }
                    self.stats.writes += 1;
                    self.stats.bytes_written += len;
                    let r = self.send(
                        Cmd::Write {
                            offset: off,
                            data: &buf,
                            fua,
                        },
                        flight,
                    );
                    self.buf = buf;
                    r?;
                    model.apply(op.seq, b, n, State::Data { writer: WRITER });
                }
                OpKind::Trim => {
                    if self.flags & TF_SEND_TRIM != 0 {
                        self.stats.trims += 1;
                        self.send(
                            Cmd::Trim {
                                offset: off,
                                len,
                                fua,
                            },
                            flight,
                        )?;
                        model.apply(op.seq, b, n, State::Trimmed);
                    } else if self.flags & TF_SEND_WRITE_ZEROES != 0 {
                        self.stats.trims += 1;
                        self.send(
                            Cmd::WriteZeroes {
                                offset: off,
                                len,
                                fua,
                            },
                            flight,
                        )?;
                        model.apply(op.seq, b, n, State::Zero);
                    } else {
                        self.stats.trims_skipped += 1;
                    }
                }
                OpKind::Flush => {}
            }
            b += n;
        }
        Ok(())
    }

    /// Sends DISC and stops the receiver.
    pub fn finish(mut self) -> Result<()> {
        let _ = self.tx.disconnect();
        if let Some(t) = self.rx_thread.take() {
            let _ = t.join();
        }
        Ok(())
    }
}

/// Builds the model of a replay of `plan` without any I/O (for `--verify-only`),
/// exactly as [`Engine::run`] would against an export with transmission `flags`.
pub fn apply_dry(plan: &[PlanOp], model: &mut Model, flags: u16) {
    for op in plan {
        model.note_line(op.seq, op.line);
        match op.kind {
            OpKind::Write => model.apply(op.seq, op.first, op.n, State::Data { writer: WRITER }),
            OpKind::Trim if flags & TF_SEND_TRIM != 0 => {
                model.apply(op.seq, op.first, op.n, State::Trimmed)
            }
            OpKind::Trim if flags & TF_SEND_WRITE_ZEROES != 0 => {
                model.apply(op.seq, op.first, op.n, State::Zero)
            }
            _ => {}
        }
    }
}

/// The writer id stamped into blocks by this engine (one connection).
pub const WRITER: u32 = 1;
