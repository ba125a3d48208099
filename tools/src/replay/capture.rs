//! `rewind export --trace-out FILE`: records every request the filter
//! receives as a fio version 3 iolog (`TIME_US FILE ACTION [OFFSET LENGTH]`,
//! times in microseconds since the export started), so a real
//! application's workload becomes a replayable trace (`rewind replay`,
//! `fio --read_iolog`).
//!
//! Requests are recorded in arrival order when the server starts handling
//! them; requests outside the export are left out (the server refuses them).
//! WRITE_ZEROES is recorded as `trim` (fio has no zeroing action). The file
//! is flushed at least every second and on drop; a crash loses at most the
//! last second.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use filter_nbd::{RequestObserver, RequestOp};

/// Writes observed requests as a fio v3 iolog.
pub struct IologWriter {
    inner: Mutex<Inner>,
    start: Instant,
    size: u64,
    name: String,
}

struct Inner {
    out: BufWriter<File>,
    last_flush: Instant,
    error: bool,
}

impl IologWriter {
    /// Creates (truncates) `path`; `name` is the file name used in the log,
    /// `size` the export size. A background thread flushes the file every
    /// second until the writer is dropped.
    pub fn create(path: &Path, name: &str, size: u64) -> std::io::Result<Arc<IologWriter>> {
        let mut out = BufWriter::new(File::create(path)?);
        let name: String = name
            .chars()
            .map(|c| if c.is_whitespace() { '_' } else { c })
            .collect();
        let name = if name.is_empty() {
            "volume".into()
        } else {
            name
        };
        writeln!(out, "fio version 3 iolog")?;
        writeln!(out, "0 {name} add")?;
        writeln!(out, "0 {name} open")?;
        out.flush()?;
        let w = Arc::new(IologWriter {
            inner: Mutex::new(Inner {
                out,
                last_flush: Instant::now(),
                error: false,
            }),
            start: Instant::now(),
            size,
            name,
        });
        let weak = Arc::downgrade(&w);
        std::thread::Builder::new()
            .name("trace-flush".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                let Some(w) = weak.upgrade() else { return };
                let mut g = w.inner.lock().unwrap_or_else(|e| e.into_inner());
                if g.last_flush.elapsed() >= Duration::from_secs(1) {
                    g.last_flush = Instant::now();
                    let _ = g.out.flush();
                }
            })?;
        Ok(w)
    }

    /// Writes the `close` line and flushes.
    pub fn close(&self) -> std::io::Result<()> {
        let us = self.start.elapsed().as_micros();
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        writeln!(g.out, "{us} {} close", self.name)?;
        g.out.flush()
    }
}

impl RequestObserver for IologWriter {
    fn observe(&self, op: RequestOp, offset: u64, len: u64, _fua: bool) {
        let action = match op {
            RequestOp::Read => "read",
            RequestOp::Write => "write",
            RequestOp::Trim | RequestOp::WriteZeroes => "trim",
            RequestOp::Flush => "sync",
        };
        if op != RequestOp::Flush
            && (len == 0 || !matches!(offset.checked_add(len), Some(e) if e <= self.size))
        {
            return;
        }
        let us = self.start.elapsed().as_micros();
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if g.error {
            return;
        }
        let r = if op == RequestOp::Flush {
            writeln!(g.out, "{us} {} {action} 0 0", self.name)
        } else {
            writeln!(g.out, "{us} {} {action} {offset} {len}", self.name)
        };
        let r = r.and_then(|_| {
            if g.last_flush.elapsed() >= Duration::from_secs(1) {
                g.last_flush = Instant::now();
                g.out.flush()
            } else {
                Ok(())
            }
        });
        if let Err(e) = r {
            g.error = true;
            tracing::error!(error = %e, "writing the trace file failed; trace capture stopped");
        }
    }
}

impl Drop for IologWriter {
    fn drop(&mut self) {
        let g = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = g.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::trace::{parse, Format, Malformed, OpKind};

    #[test]
    fn captured_log_parses_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.iolog");
        let w = IologWriter::create(&p, "vol 0", 1 << 20).unwrap();
        w.observe(RequestOp::Write, 4096, 8192, true);
        w.observe(RequestOp::Read, 0, 512, false);
        w.observe(RequestOp::Flush, 0, 0, false);
        w.observe(RequestOp::WriteZeroes, 0, 4096, false);
        w.observe(RequestOp::Write, 1 << 20, 4096, false); // beyond the end: left out
        w.close().unwrap();
        drop(w);
        let text = std::fs::read(&p).unwrap();
        let t = parse(&text, Format::Fio, None, Malformed::Refuse).unwrap();
        let kinds: Vec<_> = t.ops.iter().map(|o| (o.kind, o.offset, o.len)).collect();
        assert_eq!(
            kinds,
            vec![
                (OpKind::Write, 4096, 8192),
                (OpKind::Read, 0, 512),
                (OpKind::Flush, 0, 0),
                (OpKind::Trim, 0, 4096)
            ]
        );
        assert!(String::from_utf8_lossy(&text).contains(" vol_0 add"));
    }
}
