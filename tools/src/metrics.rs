//! Prometheus text endpoint of the daemons (`--metrics 127.0.0.1:PORT`).
//!
//! A minimal HTTP/1.0 responder on its own thread: `GET /metrics` (or `/`)
//! answers the text exposition format (version 0.0.4) produced by a render
//! callback at request time, so every scrape sees live figures. It binds
//! loopback addresses only unless the operator explicitly allows a remote
//! bind (`metrics_allow_remote` / `--metrics-allow-remote`): the endpoint
//! has no authentication. Requests are read with a 2 s timeout and at most
//! 8 KiB of header, one connection at a time.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

/// Parses a metrics bind address and refuses a non-loopback one unless
/// `allow_remote`.
pub fn check_bind(addr: &str, allow_remote: bool) -> std::result::Result<SocketAddr, String> {
    let a = addr.strip_prefix("tcp:").unwrap_or(addr);
    let sa: SocketAddr = a
        .parse()
        .map_err(|e| format!("{addr:?}: expected IP:PORT, e.g. 127.0.0.1:9470 ({e})"))?;
    if !sa.ip().is_loopback() && !allow_remote {
        return Err(format!(
            "{addr:?} is not a loopback address: the metrics endpoint has no authentication; \
             bind 127.0.0.1 (or ::1), or allow it explicitly with metrics_allow_remote = true / \
             --metrics-allow-remote"
        ));
    }
    Ok(sa)
}

/// A running metrics endpoint; stops when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MetricsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsServer")
            .field("addr", &self.addr)
            .finish()
    }
}

impl MetricsServer {
    /// Binds `addr` (checked with [`check_bind`]) and serves `render()`.
    pub fn start<F>(addr: &str, allow_remote: bool, render: F) -> Result<MetricsServer>
    where
        F: Fn() -> String + Send + 'static,
    {
        let sa = check_bind(addr, allow_remote).map_err(|e| anyhow::anyhow!("--metrics {e}"))?;
        let listener =
            TcpListener::bind(sa).with_context(|| format!("binding the metrics endpoint {sa}"))?;
        let bound = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let handle = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if st.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(s) = conn {
                        serve(s, &render);
                    }
                }
            })
            .context("spawning the metrics thread")?;
        tracing::info!(addr = %bound, "metrics endpoint (Prometheus text) ready");
        Ok(MetricsServer {
            addr: bound,
            stop,
            handle: Some(handle),
        })
    }

    /// The bound address (useful with port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve(mut s: TcpStream, render: &dyn Fn() -> String) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 8192 {
            break;
        }
    }
    let line = String::from_utf8_lossy(&head);
    let first = line.lines().next().unwrap_or("");
    let mut parts = first.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        )
    } else if path == "/metrics" || path == "/" {
        (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        )
    } else {
        ("404 Not Found", "text/plain", "try /metrics\n".to_string())
    };
    let resp = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes());
}

/// Builds a text exposition: `# HELP`/`# TYPE` once per metric name, then
/// samples with escaped label values.
#[derive(Debug, Default)]
pub struct PromText {
    out: String,
    seen: HashSet<String>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl PromText {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one sample of `name` (`kind`: `gauge` or `counter`).
    pub fn sample(&mut self, name: &str, kind: &str, help: &str, labels: &[(&str, &str)], v: f64) {
        if self.seen.insert(name.to_owned()) {
            let _ = writeln!(self.out, "# HELP {name} {help}");
            let _ = writeln!(self.out, "# TYPE {name} {kind}");
        }
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(val));
            }
            self.out.push('}');
        }
        if v.is_finite() {
            let _ = writeln!(self.out, " {v}");
        } else {
            let _ = writeln!(self.out, " NaN");
        }
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_policy() {
        assert!(check_bind("127.0.0.1:9470", false).is_ok());
        assert!(check_bind("[::1]:9470", false).is_ok());
        let e = check_bind("0.0.0.0:9470", false).unwrap_err();
        assert!(e.contains("not a loopback address"), "{e}");
        assert!(check_bind("10.1.2.3:9470", false).is_err());
        assert!(check_bind("10.1.2.3:9470", true).is_ok());
        assert!(check_bind("localhost", false).is_err());
    }

    #[test]
    fn serves_text_and_404() {
        let srv = MetricsServer::start("127.0.0.1:0", false, || {
            let mut p = PromText::new();
            p.sample("x_total", "counter", "an x", &[("v", "a\"b")], 3.0);
            p.sample("x_total", "counter", "an x", &[("v", "c")], 4.0);
            p.finish()
        })
        .unwrap();
        let get = |path: &str| {
            let mut s = TcpStream::connect(srv.addr()).unwrap();
            write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
            let mut r = String::new();
            s.read_to_string(&mut r).unwrap();
            r
        };
        let r = get("/metrics");
        assert!(r.starts_with("HTTP/1.0 200"), "{r}");
        assert_eq!(r.matches("# TYPE x_total counter").count(), 1, "{r}");
        assert!(r.contains("x_total{v=\"a\\\"b\"} 3"), "{r}");
        assert!(get("/other").starts_with("HTTP/1.0 404"));
    }
}
