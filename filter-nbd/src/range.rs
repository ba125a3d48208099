//! In-flight range tracker: serialises overlapping write-like requests of an
//! export (across all its connections) so that they reach the change sink in
//! the order they reached the backing store.

use std::sync::{Condvar, Mutex};

/// Set of byte ranges currently being written (begun but not yet recorded).
#[derive(Debug, Default)]
pub struct RangeLocks {
    held: Mutex<Held>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct Held {
    next_id: u64,
    ranges: Vec<(u64, u64, u64)>, // (start, end, id)
}

impl RangeLocks {
    /// Creates an empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Blocks until no held range overlaps `[offset, offset+len)`, then holds
    /// it and returns its id for [`RangeLocks::release`].
    pub fn acquire(&self, offset: u64, len: u64) -> u64 {
        let end = offset.saturating_add(len.max(1));
        let mut g = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while g.ranges.iter().any(|&(s, e, _)| s < end && offset < e) {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.next_id += 1;
        let id = g.next_id;
        g.ranges.push((offset, end, id));
        id
    }

    /// Holds `[offset, offset+len)` if nothing overlapping is held, without
    /// blocking.
    pub fn try_acquire(&self, offset: u64, len: u64) -> Option<u64> {
        let end = offset.saturating_add(len.max(1));
        let mut g = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if g.ranges.iter().any(|&(s, e, _)| s < end && offset < e) {
            return None;
        }
        g.next_id += 1;
        let id = g.next_id;
        g.ranges.push((offset, end, id));
        Some(id)
    }

    /// Releases a range held by [`RangeLocks::acquire`].
    pub fn release(&self, id: u64) {
        let mut g = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = g.ranges.iter().position(|r| r.2 == id) {
            g.ranges.swap_remove(i);
        }
        drop(g);
        self.cv.notify_all();
    }

    /// Number of ranges currently held.
    pub fn held(&self) -> usize {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ranges
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn overlapping_waits_disjoint_does_not() {
        let r = Arc::new(RangeLocks::new());
        let a = r.acquire(0, 4096);
        let b = r.acquire(4096, 4096); // adjacent: no overlap
        let r2 = r.clone();
        let t = std::thread::spawn(move || {
            let c = r2.acquire(4000, 10);
            r2.release(c);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished());
        r.release(a);
        t.join().unwrap();
        r.release(b);
        assert_eq!(r.held(), 0);
    }
}
