//! Parsing of `--listen` addresses: `unix:PATH` or `tcp:HOST:PORT`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A unix stream socket at this path (the default and the safe choice).
    Unix(PathBuf),
    /// A TCP address; only when explicitly asked for.
    Tcp(SocketAddr),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/run/rewind/vol0.sock".into());
            }
            Ok(ListenAddr::Unix(PathBuf::from(path)))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            addr.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|e| {
                format!("tcp:{addr} is not HOST:PORT with a numeric address (e.g. tcp:127.0.0.1:10809): {e}")
            })
        } else {
            Err(format!(
                "{s:?}: expected unix:PATH or tcp:HOST:PORT (e.g. unix:/run/rewind/vol0.sock)"
            ))
        }
    }
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ListenAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_unix_and_tcp() {
        assert_eq!(
            "unix:/tmp/x.sock".parse::<ListenAddr>(),
            Ok(ListenAddr::Unix("/tmp/x.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:10809".parse::<ListenAddr>(),
            Ok(ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap()))
        );
    }

    #[test]
    fn rejects_bad_addresses() {
        for bad in [
            "",
            "unix:",
            "tcp:",
            "tcp:localhost",
            "udp:1.2.3.4:5",
            "/tmp/x.sock",
        ] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad:?} accepted");
        }
    }
}
