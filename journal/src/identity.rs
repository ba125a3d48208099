//! The identity file (`<dir>/identity`): encode, decode, atomic rewrite.

use crate::error::{corrupt, ioe, JournalError, Result};
use crate::format::*;
use crate::fsutil::fsync_dir;
use crate::{VolumeIdentity, IDENTITY_FILE};
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub(crate) fn encode_identity(id: &VolumeIdentity, replica: &Path) -> Result<Vec<u8>> {
    let name = id.name.as_bytes();
    let path = replica.as_os_str().as_bytes();
    if name.len() > 4096 || path.len() > 4096 {
        return Err(JournalError::Invalid(
            "name or replica path too long".into(),
        ));
    }
    let mut b = Vec::with_capacity(64 + name.len() + path.len() + 32);
    b.extend_from_slice(&IDENTITY_MAGIC);
    b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    let total = (56 + name.len() + path.len() + 32) as u32;
    b.extend_from_slice(&total.to_le_bytes());
    b.extend_from_slice(&id.uuid);
    b.extend_from_slice(&id.generation.to_le_bytes());
    b.extend_from_slice(&id.size.to_le_bytes());
    b.extend_from_slice(&id.block_size.to_le_bytes());
    b.extend_from_slice(&(name.len() as u16).to_le_bytes());
    b.extend_from_slice(&(path.len() as u16).to_le_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(path);
    let h = hash32(&b);
    b.extend_from_slice(&h);
    Ok(b)
}

pub(crate) fn decode_identity(b: &[u8], path: &Path) -> Result<(VolumeIdentity, PathBuf)> {
    let bad = |r: &str| corrupt(path, 0, r);
    if b.len() < 56 + 32 {
        return Err(bad("identity file too short"));
    }
    if b[0..8] != IDENTITY_MAGIC {
        return Err(bad("bad identity magic"));
    }
    let total = rd32(b, 12) as usize;
    if total != b.len() {
        return Err(bad("identity length mismatch"));
    }
    if hash32(&b[..total - 32]) != b[total - 32..] {
        return Err(bad("identity checksum mismatch"));
    }
    let v = rd32(b, 8);
    if v != FORMAT_VERSION {
        return Err(bad(&format!("unsupported identity version {v}")));
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&b[16..32]);
    let nl = rd16(b, 52) as usize;
    let pl = rd16(b, 54) as usize;
    if 56 + nl + pl + 32 != total {
        return Err(bad("identity field lengths"));
    }
    let name = String::from_utf8(b[56..56 + nl].to_vec()).map_err(|_| bad("name not UTF-8"))?;
    let rp = PathBuf::from(std::ffi::OsStr::from_bytes(&b[56 + nl..56 + nl + pl]));
    Ok((
        VolumeIdentity {
            name,
            uuid,
            generation: rd64(b, 32),
            size: rd64(b, 40),
            block_size: rd32(b, 48),
        },
        rp,
    ))
}

pub(crate) fn write_identity(dir: &Path, id: &VolumeIdentity, replica: &Path) -> Result<()> {
    let b = encode_identity(id, replica)?;
    let tmp = dir.join("identity.tmp");
    let fin = dir.join(IDENTITY_FILE);
    (|| -> io::Result<()> {
        let f = File::create(&tmp)?;
        f.write_all_at(&b, 0)?;
        f.sync_all()?;
        fs::rename(&tmp, &fin)
    })()
    .map_err(ioe(|| format!("write {}", fin.display())))?;
    fsync_dir(dir)
}

pub(crate) fn read_identity(dir: &Path) -> Result<(VolumeIdentity, PathBuf)> {
    let p = dir.join(IDENTITY_FILE);
    let b = fs::read(&p).map_err(ioe(|| format!("read {}", p.display())))?;
    decode_identity(&b, &p)
}
