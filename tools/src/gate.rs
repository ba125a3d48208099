//! The write gate: a [`ChangeSink`] wrapper that can hold new writes of a
//! volume while a bookmark's tag is inserted (the barrier of a group
//! bookmark).
//!
//! While the gate is raised, [`ChangeSink::begin`] blocks: no new write
//! reaches the backing store. [`WriteGate::raise`] waits, up to a deadline,
//! for the writes already begun to complete — except those owned by
//! connection threads that are themselves parked at the gate: such a thread
//! reaps its own completions (the NBD server's io_uring loop), so its writes
//! cannot complete before the gate is lowered, and waiting for them would
//! only deadlock until the timeout.
//!
//! Why this is enough for a crash-consistent group point: a write is
//! acknowledged to the client only after it is recorded (completion order is
//! stream order). If a write W2 on volume B was issued after an earlier write
//! W1 on volume A was acknowledged, W1 is recorded before W2 began. With every
//! gate of the group raised before the first tag is inserted, W2 either began
//! before B's gate went up — then W1 was recorded before A's tag — or it is
//! held until all tags are in, and lands after B's tag. A write still in
//! flight when a tag is inserted was never acknowledged, so nothing can
//! depend on it; it lands after the tag, as if the crash came before it.
//!
//! Ownership is tracked per thread (begin and complete on the same thread,
//! which is how the filter works). If a completion arrived on another thread,
//! the only effect is that `raise` may stop waiting before that write
//! completed, which the argument above shows is still consistent.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use agent_core::{ChangeSink, WriteTicket};

static NEXT_GATE_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Writes begun (not yet completed) by this thread, per gate id.
    static OWNED: RefCell<HashMap<u64, u64>> = RefCell::new(HashMap::new());
}

fn owned(id: u64) -> u64 {
    OWNED.with(|o| o.borrow().get(&id).copied().unwrap_or(0))
}

fn add_owned(id: u64, delta: i64) {
    OWNED.with(|o| {
        let mut o = o.borrow_mut();
        let e = o.entry(id).or_insert(0);
        *e = e.saturating_add_signed(delta);
        if *e == 0 {
            o.remove(&id);
        }
    });
}

#[derive(Debug, Default)]
struct State {
    raised: bool,
    /// Writes between begin and complete/abort.
    in_flight: u64,
    /// Threads blocked in `begin`.
    parked: u64,
    /// In-flight writes owned by parked threads.
    parked_in_flight: u64,
}

/// Statistics of a gate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GateStats {
    /// Writes in flight now.
    pub in_flight: u64,
    /// Whether new writes are held now.
    pub raised: bool,
}

/// Why raising failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{in_flight} write(s) still in flight when the hold bound expired")]
pub struct RaiseTimeout {
    /// Writes that had not completed.
    pub in_flight: u64,
}

/// A [`ChangeSink`] that forwards to an inner sink and can hold new writes.
pub struct WriteGate {
    id: u64,
    inner: Arc<dyn ChangeSink>,
    st: Mutex<State>,
    cv: Condvar,
}

impl std::fmt::Debug for WriteGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteGate")
            .field("id", &self.id)
            .field("stats", &self.stats())
            .finish()
    }
}

impl WriteGate {
    /// A lowered gate in front of `inner`.
    pub fn new(inner: Arc<dyn ChangeSink>) -> WriteGate {
        WriteGate {
            id: NEXT_GATE_ID.fetch_add(1, Ordering::Relaxed),
            inner,
            st: Mutex::new(State::default()),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Current statistics.
    pub fn stats(&self) -> GateStats {
        let st = self.lock();
        GateStats {
            in_flight: st.in_flight,
            raised: st.raised,
        }
    }

    /// Holds new writes, then waits until every in-flight write that can
    /// complete has completed, or `deadline` passes. On timeout the gate is
    /// lowered again (writes resume) and the number of writes still in flight
    /// is returned. The caller must [`lower`](Self::lower) after success.
    /// Raising a raised gate is a caller bug: callers serialise raises.
    pub fn raise(&self, deadline: Instant) -> Result<(), RaiseTimeout> {
        let mut st = self.lock();
        st.raised = true;
        loop {
            let waiting_for = st.in_flight.saturating_sub(st.parked_in_flight);
            if waiting_for == 0 {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                st.raised = false;
                drop(st);
                self.cv.notify_all();
                return Err(RaiseTimeout {
                    in_flight: waiting_for,
                });
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Lets held writes proceed.
    pub fn lower(&self) {
        self.lock().raised = false;
        self.cv.notify_all();
    }

    fn finished(&self) {
        add_owned(self.id, -1);
        let mut st = self.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        drop(st);
        self.cv.notify_all();
    }
}

impl ChangeSink for WriteGate {
    fn begin(&self, offset: u64, len: u64) -> WriteTicket {
        let mut st = self.lock();
        if st.raised {
            let mine = owned(self.id);
            st.parked += 1;
            st.parked_in_flight += mine;
            // The raiser may now stop waiting for our writes.
            self.cv.notify_all();
            while st.raised {
                st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            st.parked -= 1;
            st.parked_in_flight = st.parked_in_flight.saturating_sub(mine);
        }
        st.in_flight += 1;
        drop(st);
        add_owned(self.id, 1);
        self.inner.begin(offset, len)
    }

    fn complete_write(&self, ticket: WriteTicket, data: &[u8]) {
        self.inner.complete_write(ticket, data);
        self.finished();
    }

    fn complete_zero(&self, ticket: WriteTicket) {
        self.inner.complete_zero(ticket);
        self.finished();
    }

    fn abort(&self, ticket: WriteTicket) {
        self.inner.abort(ticket);
        self.finished();
    }

    fn note_read(&self, len: u64) {
        self.inner.note_read(len);
    }
}

/// How long [`WriteGate::raise`] waits at most by default.
pub const DEFAULT_MAX_HOLD: Duration = Duration::from_millis(1000);

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// Counts calls; nothing else.
    #[derive(Default)]
    struct Count(AtomicU64);
    impl ChangeSink for Count {
        fn begin(&self, offset: u64, len: u64) -> WriteTicket {
            self.0.fetch_add(1, Ordering::SeqCst);
            WriteTicket {
                offset,
                len,
                cookie: 0,
            }
        }
        fn complete_write(&self, _t: WriteTicket, _d: &[u8]) {}
        fn complete_zero(&self, _t: WriteTicket) {}
        fn abort(&self, _t: WriteTicket) {}
        fn note_read(&self, _l: u64) {}
    }

    #[test]
    fn raised_gate_holds_new_writes_until_lowered() {
        let inner = Arc::new(Count::default());
        let g = Arc::new(WriteGate::new(inner.clone()));
        g.raise(Instant::now() + Duration::from_secs(1)).unwrap();
        let started = Arc::new(AtomicBool::new(false));
        let (g2, s2) = (g.clone(), started.clone());
        let t = std::thread::spawn(move || {
            let tk = g2.begin(0, 4096);
            s2.store(true, Ordering::SeqCst);
            g2.complete_write(tk, &[0; 4096]);
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !started.load(Ordering::SeqCst),
            "write passed a raised gate"
        );
        assert_eq!(inner.0.load(Ordering::SeqCst), 0);
        g.lower();
        t.join().unwrap();
        assert!(started.load(Ordering::SeqCst));
        assert_eq!(g.stats().in_flight, 0);
    }

    #[test]
    fn raise_waits_for_in_flight_and_times_out_cleanly() {
        let g = Arc::new(WriteGate::new(Arc::new(Count::default())));
        let tk = g.begin(0, 512);
        let t0 = Instant::now();
        let e = g
            .raise(Instant::now() + Duration::from_millis(150))
            .unwrap_err();
        assert_eq!(e.in_flight, 1);
        assert!(t0.elapsed() >= Duration::from_millis(150));
        assert!(!g.stats().raised, "gate lowered after the timeout");
        // Writes proceed after the failed raise.
        let tk2 = g.begin(4096, 512);
        g.complete_zero(tk2);
        // A write completing while raise waits lets it succeed.
        let g2 = g.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            // Completed on another thread than begin: still counted down.
            g2.complete_write(tk, &[0; 512]);
        });
        g.raise(Instant::now() + Duration::from_secs(5)).unwrap();
        g.lower();
        t.join().unwrap();
    }

    #[test]
    fn a_parked_thread_own_writes_are_not_waited_for() {
        let g = Arc::new(WriteGate::new(Arc::new(Count::default())));
        let (tx, rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let g2 = g.clone();
        let t = std::thread::spawn(move || {
            // One write in flight on this thread, then a second begin that
            // parks at the gate: the first cannot complete meanwhile.
            let first = g2.begin(0, 512);
            tx.send(()).unwrap();
            go_rx.recv().unwrap();
            let second = g2.begin(4096, 512);
            g2.complete_write(first, &[0; 512]);
            g2.complete_write(second, &[0; 512]);
        });
        rx.recv().unwrap();
        let g3 = g.clone();
        let raiser = std::thread::spawn(move || {
            let r = g3.raise(Instant::now() + Duration::from_secs(10));
            let waited = g3.stats();
            g3.lower();
            (r, waited)
        });
        std::thread::sleep(Duration::from_millis(50));
        go_tx.send(()).unwrap();
        let t0 = Instant::now();
        let (r, waited) = raiser.join().unwrap();
        assert!(r.is_ok());
        assert!(t0.elapsed() < Duration::from_secs(5), "raise deadlocked");
        assert_eq!(
            waited.in_flight, 1,
            "the parked thread's write was left in flight"
        );
        t.join().unwrap();
        assert_eq!(g.stats().in_flight, 0);
    }
}
