//! `rewind pki init|issue`: a CA and host certificates for replication links
//! (a thin command-line layer over [`replicator::pki`]).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use replicator::pki::{self, CertKind, IssueOptions};

/// Arguments of `rewind pki`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    rewind pki init  --dir /etc/rewind/pki\n  \
    rewind pki issue --dir /etc/rewind/pki --host target1.example --kind server\n  \
    rewind pki issue --dir /etc/rewind/pki --host source1.example --kind client\n\n\
Copy ca.pem plus the host's <host>.pem and <host>.key to that host; ca.key stays on the machine \
that issues certificates.")]
pub struct PkiArgs {
    #[command(subcommand)]
    pub command: PkiCommand,
}

/// `rewind pki` subcommands.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a certificate authority: DIR/ca.pem (certificate) and DIR/ca.key (private key, 0600).
    #[command(after_help = "Example:\n  rewind pki init --dir /etc/rewind/pki")]
    Init {
        /// PKI directory (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Overwrite an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue a host certificate signed by the CA in DIR: DIR/<host>.pem and DIR/<host>.key (0600).
    #[command(after_help = "Examples:\n  \
        rewind pki issue --dir /etc/rewind/pki --host 127.0.0.1 --kind server\n  \
        rewind pki issue --dir /etc/rewind/pki --host replicator1 --kind client\n  \
        rewind pki issue --dir /etc/rewind/pki --host dr1.example --name 10.0.0.7 --kind both")]
    Issue {
        /// PKI directory holding ca.pem and ca.key.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Host identity: a DNS name or an IP address (goes into the certificate's names and the file names).
        #[arg(long, value_name = "NAME")]
        host: String,
        /// Extra DNS names or IP addresses for the certificate (repeatable).
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
        /// What the certificate is for: server (a target), client (a replicator) or both.
        #[arg(long, value_enum, default_value_t = Kind::Both)]
        kind: Kind,
        /// Validity in days.
        #[arg(long, default_value_t = pki::HOST_DAYS)]
        days: i64,
        /// Overwrite existing files for this host.
        #[arg(long)]
        force: bool,
    },
}

/// Certificate usage on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    /// TLS server (a target).
    Server,
    /// TLS client (a replicator).
    Client,
    /// Both.
    Both,
}

impl From<Kind> for CertKind {
    fn from(k: Kind) -> CertKind {
        match k {
            Kind::Server => CertKind::Server,
            Kind::Client => CertKind::Client,
            Kind::Both => CertKind::Both,
        }
    }
}

/// Runs `rewind pki`.
pub fn run(args: PkiArgs) -> Result<()> {
    match args.command {
        PkiCommand::Init { dir, force } => {
            let issued = pki::init_ca(&dir, force)
                .with_context(|| format!("creating a CA in {}", dir.display()))?;
            println!("CA created in {}", dir.display());
            println!(
                "  certificate: {}  (distribute to every host)",
                issued.cert.display()
            );
            println!(
                "  private key: {}  (mode 0600; keep it on this machine)",
                issued.key.display()
            );
            Ok(())
        }
        PkiCommand::Issue {
            dir,
            host,
            names,
            kind,
            days,
            force,
        } => {
            let opts = IssueOptions {
                extra_names: names,
                kind: kind.into(),
                days,
                force,
            };
            let issued = pki::issue_with(&dir, &host, &opts).with_context(|| {
                format!("issuing a certificate for {host:?} in {}", dir.display())
            })?;
            let what = match kind {
                Kind::Server => "server (target)",
                Kind::Client => "client (replicator)",
                Kind::Both => "server and client",
            };
            println!("{what} certificate issued for {host}");
            println!("  certificate: {}", issued.cert.display());
            println!("  private key: {}  (mode 0600)", issued.key.display());
            println!("  CA:          {}", dir.join(pki::CA_CERT).display());
            Ok(())
        }
    }
}

/// The certificate and key paths `rewind pki issue` writes for `host` in `dir`.
pub fn host_files(dir: &Path, host: &str) -> (PathBuf, PathBuf) {
    let file = host.replace(':', "_");
    (
        dir.join(format!("{file}.pem")),
        dir.join(format!("{file}.key")),
    )
}
