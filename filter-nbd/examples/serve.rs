//! Serves one file or block device over NBD, for manual interop and
//! benchmark runs:
//!
//! ```text
//! cargo run -p filter-nbd --release --example serve -- SOCKET_OR_HOST:PORT FILE [--ro] [--no-uring] [--io-workers N] [--name NAME]
//! ```
//! A first argument containing '/' is a unix socket path; anything else is a
//! TCP address. Stop it with Ctrl-C. `RUST_LOG=debug` shows the negotiated mode per connection.

use std::sync::Arc;

use filter_nbd::{Backing, Export, Server, ServerOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!(
            "usage: serve SOCKET|HOST:PORT FILE [--ro] [--no-uring] [--io-workers N] [--name NAME]"
        );
        std::process::exit(2);
    }
    let ro = args.iter().any(|a| a == "--ro");
    let mut opts = ServerOptions::default();
    if args.iter().any(|a| a == "--no-uring") {
        opts.io_uring = false;
    }
    if let Some(w) = args
        .iter()
        .position(|a| a == "--io-workers")
        .and_then(|i| args.get(i + 1))
    {
        opts.io_workers = w.parse()?;
    }
    let name = args
        .iter()
        .position(|a| a == "--name")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_default();
    let backing = Backing::open(&args[1], ro)?;
    let export = Export::new(name, Arc::new(backing)).with_description(format!("file {}", args[1]));
    let server = Server::new(vec![export], opts)?;
    if args[0].contains('/') {
        server.serve_unix(&args[0])?;
    } else {
        server.serve_tcp(args[0].as_str())?;
    }
    Ok(())
}
