//! A minimal PKI for replication links (`rewind pki init|issue`).
//!
//! - [`init_ca`] creates a self-signed CA in a directory: `ca.pem` (the
//!   certificate, world readable) and `ca.key` (its private key, mode 0600).
//! - [`issue`] signs a host certificate with that CA: `<host>.pem` and
//!   `<host>.key` (0600), for a server (target), a client (replicator) or
//!   both. The host name goes into the subject alternative names, as an IP
//!   address SAN if it parses as one, as a DNS SAN otherwise.
//!
//! Keys are ECDSA P-256 (SHA-256 signatures), generated with `ring` through
//! rcgen. Nothing is overwritten unless `force` is given.
//!
//! The CA's subject is derived from its key (`CN=rewind CA <16 hex digits of
//! blake3(public key)>`), so [`issue`] can rebuild the issuer name and key
//! identifier from `ca.key` alone and two CAs never share a subject.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use thiserror::Error;

/// CA certificate file name.
pub const CA_CERT: &str = "ca.pem";
/// CA private key file name.
pub const CA_KEY: &str = "ca.key";
/// Validity of a CA certificate, in days.
pub const CA_DAYS: i64 = 20 * 365;
/// Validity of a host certificate, in days.
pub const HOST_DAYS: i64 = 5 * 365;

/// Errors of certificate management.
#[derive(Debug, Error)]
pub enum PkiError {
    /// A file exists and `force` was not given.
    #[error("{0} already exists (use force to overwrite)")]
    Exists(PathBuf),
    /// The CA is missing or unreadable.
    #[error("CA not usable in {dir}: {reason}")]
    NoCa {
        /// The PKI directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// The host name is not usable as a file name and SAN.
    #[error("invalid host name {0:?}")]
    HostName(String),
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// What a host certificate may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    /// TLS server (a target).
    Server,
    /// TLS client (a replicator).
    Client,
    /// Both (a host that is source of some pairs and target of others).
    Both,
}

/// Paths of an issued certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PEM, mode 0600).
    pub key: PathBuf,
}

fn write_file(path: &Path, data: &str, mode: u32, force: bool) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut opts = OpenOptions::new();
    opts.write(true).mode(mode);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            PkiError::Exists(path.to_owned())
        } else {
            io(e)
        }
    })?;
    // The mode of an existing file is not changed by open(): enforce it.
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io)?;
    f.write_all(data.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

fn check_absent(paths: &[&Path], force: bool) -> Result<(), PkiError> {
    if !force {
        if let Some(p) = paths.iter().find(|p| p.exists()) {
            return Err(PkiError::Exists(p.to_path_buf()));
        }
    }
    Ok(())
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Civil date (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i32, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u8;
    let y = if m <= 2 { y + 1 } else { y };
    (y as i32, m, d)
}

fn set_validity(p: &mut CertificateParams, days: i64) {
    let today = now_unix().div_euclid(86_400);
    // Valid from yesterday (clock skew), or from before the end for a
    // validity in the past (tests of expiry).
    let (y, m, d) = civil_from_days((today - 1).min(today + days - 1));
    p.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = civil_from_days(today + days);
    p.not_after = rcgen::date_time_ymd(y, m, d);
}

fn serial(seed: &[u8]) -> SerialNumber {
    let mut h = blake3::Hasher::new();
    h.update(seed);
    h.update(&now_unix().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    let mut s = [0u8; 16];
    s.copy_from_slice(&h.finalize().as_bytes()[..16]);
    s[0] &= 0x7f; // positive
    s[0] |= 0x01; // and no leading zero byte
    SerialNumber::from_slice(&s)
}

/// The CA's parameters, rebuilt from its key (deterministic subject).
fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut p = CertificateParams::default();
    let id = blake3::hash(&key.public_key_der());
    let hex: String = id.as_bytes()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "rewind");
    dn.push(DnType::CommonName, format!("rewind CA {hex}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

/// Creates a CA in `dir` (created if needed): `ca.pem` and `ca.key` (0600).
/// Refuses to overwrite an existing CA unless `force`.
pub fn init_ca(dir: &Path, force: bool) -> Result<Issued, PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    check_absent(&[&cert_path, &key_path], force)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut p = ca_params(&key);
    set_validity(&mut p, CA_DAYS);
    p.serial_number = Some(serial(&key.public_key_der()));
    let cert = p.self_signed(&key)?;
    // Key first: a certificate without its key is useless, the reverse is
    // recoverable with force.
    write_file(&key_path, &key.serialize_pem(), 0o600, force)?;
    write_file(&cert_path, &cert.pem(), 0o644, force)?;
    Ok(Issued {
        cert: cert_path,
        key: key_path,
    })
}

fn check_host(host: &str) -> Result<(), PkiError> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && !host.starts_with('.')
        && !host.starts_with('-')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
    if ok
        && (host.parse::<std::net::IpAddr>().is_ok()
            || rustls::pki_types::ServerName::try_from(host).is_ok())
    {
        Ok(())
    } else {
        Err(PkiError::HostName(host.to_owned()))
    }
}

/// Issues `<host>.pem`/`<host>.key` in `dir`, signed by the CA in `dir`, for
/// `host` (a DNS name or an IP address, put in the SANs). Refuses to
/// overwrite unless `force`.
pub fn issue(dir: &Path, host: &str, kind: CertKind, force: bool) -> Result<Issued, PkiError> {
    issue_with_names(dir, host, &[], kind, force)
}

/// Like [`issue`], with extra subject alternative names (DNS names or IP
/// addresses) besides `host`.
pub fn issue_with_names(
    dir: &Path,
    host: &str,
    extra: &[String],
    kind: CertKind,
    force: bool,
) -> Result<Issued, PkiError> {
    issue_with(
        dir,
        host,
        &IssueOptions {
            extra_names: extra.to_vec(),
            kind,
            days: HOST_DAYS,
            force,
        },
    )
}

/// Options of [`issue_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueOptions {
    /// Subject alternative names besides the host name.
    pub extra_names: Vec<String>,
    /// Server, client or both.
    pub kind: CertKind,
    /// Validity in days from today (negative: already expired, for tests).
    pub days: i64,
    /// Overwrite existing files.
    pub force: bool,
}

/// Issues a host certificate with explicit options (see [`issue`]).
pub fn issue_with(dir: &Path, host: &str, opts: &IssueOptions) -> Result<Issued, PkiError> {
    let IssueOptions {
        extra_names: extra,
        kind,
        days,
        force,
    } = opts;
    let (kind, days, force) = (*kind, *days, *force);
    check_host(host)?;
    for n in extra {
        check_host(n)?;
    }
    let no_ca = |reason: String| PkiError::NoCa {
        dir: dir.to_owned(),
        reason,
    };
    let ca_key_pem =
        fs::read_to_string(dir.join(CA_KEY)).map_err(|e| no_ca(format!("{CA_KEY}: {e}")))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|e| no_ca(format!("{CA_KEY}: {e}")))?;
    if !dir.join(CA_CERT).exists() {
        return Err(no_ca(format!("{CA_CERT} missing")));
    }
    // The issuer as rcgen needs it: same subject and key identifier as the
    // certificate in ca.pem (both derived from the key).
    let issuer = ca_params(&ca_key).self_signed(&ca_key)?;

    let file = host.replace(':', "_");
    let cert_path = dir.join(format!("{file}.pem"));
    let key_path = dir.join(format!("{file}.key"));
    check_absent(&[&cert_path, &key_path], force)?;

    let mut names = vec![host.to_owned()];
    names.extend(extra.iter().cloned());
    let mut p = CertificateParams::new(names)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "rewind");
    dn.push(DnType::CommonName, host);
    p.distinguished_name = dn;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = match kind {
        CertKind::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
        CertKind::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        CertKind::Both => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    };
    p.use_authority_key_identifier_extension = true;
    set_validity(&mut p, days);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    p.serial_number = Some(serial(&key.public_key_der()));
    let cert = p.signed_by(&key, &issuer, &ca_key)?;
    write_file(&key_path, &key.serialize_pem(), 0o600, force)?;
    write_file(&cert_path, &cert.pem(), 0o644, force)?;
    Ok(Issued {
        cert: cert_path,
        key: key_path,
    })
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }
}
