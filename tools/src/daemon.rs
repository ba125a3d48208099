//! Shared pieces of the daemons (`rewind target`, `rewind replicator`):
//! stop signals, and a logging layer that counts refusals for the status.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context as LayerContext, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Blocks SIGINT/SIGTERM in every thread (call before spawning any) and
/// returns a flag raised when one arrives.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("blocking SIGINT/SIGTERM")?;
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                tracing::info!(?sig, "stopping");
            }
            f.store(true, Ordering::SeqCst);
        })
        .context("spawning the signal thread")?;
    Ok(flag)
}

/// Like [`stop_flag`], and also blocks SIGHUP: returns `(stop, reload)`,
/// the second raised on each SIGHUP (the daemon clears it when it reloads).
pub fn stop_and_reload_flags() -> Result<(Arc<AtomicBool>, Arc<AtomicBool>)> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGHUP);
    set.thread_block()
        .context("blocking SIGINT/SIGTERM/SIGHUP")?;
    let stop = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    let (s, r) = (stop.clone(), reload.clone());
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            match set.wait() {
                Ok(Signal::SIGHUP) => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    r.store(true, Ordering::SeqCst);
                }
                Ok(sig) => {
                    tracing::info!(?sig, "stopping");
                    s.store(true, Ordering::SeqCst);
                    return;
                }
                Err(_) => {
                    s.store(true, Ordering::SeqCst);
                    return;
                }
            }
        })
        .context("spawning the signal thread")?;
    Ok((stop, reload))
}

/// Refusals seen in the log (TLS or handshake) and the last message.
#[derive(Debug, Default)]
pub struct Refusals {
    /// How many.
    pub count: AtomicU64,
    /// The last one, with its error.
    pub last: Mutex<Option<String>>,
}

struct RefusalLayer(Arc<Refusals>);

#[derive(Default)]
struct Fields {
    message: String,
    rest: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        } else {
            self.rest.push_str(&format!(" {}={value:?}", field.name()));
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message = value.to_owned();
        } else {
            self.rest.push_str(&format!(" {}={value}", field.name()));
        }
    }
}

impl<S: Subscriber> Layer<S> for RefusalLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: LayerContext<'_, S>) {
        if *event.metadata().level() > tracing::Level::WARN {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        let m = f.message.to_ascii_lowercase();
        if m.contains("refused")
            || m.contains("handshake failed")
            || m.contains("closing replication connection with an error")
        {
            self.0.count.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut l) = self.0.last.lock() {
                *l = Some(format!("{}{}", f.message, f.rest));
            }
        }
    }
}

/// Logging to stderr (`RUST_LOG`, default info) plus the refusal counter.
pub fn init_logging() -> Arc<Refusals> {
    let refusals = Arc::new(Refusals::default());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_filter(filter),
        )
        .with(RefusalLayer(refusals.clone()))
        .try_init();
    refusals
}

/// Parses `tcp:HOST:PORT` or `HOST:PORT` into a socket address.
pub fn parse_tcp(s: &str) -> std::result::Result<std::net::SocketAddr, String> {
    let a = s.strip_prefix("tcp:").unwrap_or(s);
    a.parse()
        .map_err(|e| format!("{s:?}: expected tcp:IP:PORT, e.g. tcp:127.0.0.1:7700 ({e})"))
}
