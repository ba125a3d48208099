//! On-disk state in the state directory: volume identity, the bitmap file and
//! the activity log (hot extents). Formats are described in
//! docs/change-log-format.md.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::crc::{crc32c, Crc};
use crate::error::{ChangeLogError, Result};

/// Magic of `<volume>.bitmap`.
pub const BITMAP_MAGIC: [u8; 8] = *b"RWNDBMAP";
/// Magic of each slot of `<volume>.al`.
pub const AL_MAGIC: [u8; 8] = *b"RWNDAL01";
/// Version of the bitmap file format.
pub const BITMAP_VERSION: u32 = 1;
const BITMAP_HDR: usize = 72;
const AL_HDR: usize = 32;

/// Identity of a protected volume, persisted as JSON in `<volume>.identity`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeIdentity {
    /// Volume UUID (hyphenated), stable for the life of the protection.
    pub uuid: String,
    /// Generation: bumped when the change history was lost (the target must
    /// then do a full resync and refuse to mix the generations).
    pub generation: u64,
    /// Volume size in bytes the identity was created for.
    pub volume_size: u64,
    /// Tracking block size.
    pub block_size: u32,
}

impl VolumeIdentity {
    pub(crate) fn uuid_bytes(&self) -> Result<[u8; 16]> {
        uuid::Uuid::parse_str(&self.uuid)
            .map(|u| *u.as_bytes())
            .map_err(|e| ChangeLogError::BadStateFile {
                path: PathBuf::new(),
                reason: format!("uuid: {e}"),
            })
    }
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ChangeLogError::io("fsync dir", dir, e))
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync dir.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| ChangeLogError::io("create", &tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| ChangeLogError::io("write", &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| ChangeLogError::io("rename", path, e))?;
    fsync_dir(path.parent().unwrap_or(Path::new(".")))
}

pub(crate) fn read_identity(path: &Path) -> Result<Option<VolumeIdentity>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| ChangeLogError::BadStateFile {
                path: path.into(),
                reason: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ChangeLogError::io("read", path, e)),
    }
}

pub(crate) fn write_identity(path: &Path, id: &VolumeIdentity) -> Result<()> {
    let mut s = serde_json::to_vec_pretty(id).map_err(|e| ChangeLogError::BadStateFile {
        path: path.into(),
        reason: e.to_string(),
    })?;
    s.push(b'\n');
    write_atomic(path, &s)
}

/// Contents of `<volume>.bitmap`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BitmapFile {
    pub block_size: u32,
    pub volume_size: u64,
    pub uuid: [u8; 16],
    pub generation: u64,
    /// Next sequence number of the region at the time of writing.
    pub next_seq: u64,
    /// One bit per block: active | pending | blocks of unconsumed ring records.
    pub bits: Vec<u64>,
    /// One bit per extent: the hot set at the time of writing.
    pub hot: Vec<u64>,
}

impl BitmapFile {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(BITMAP_HDR + 8 * (self.bits.len() + self.hot.len()) + 4);
        b.extend_from_slice(&BITMAP_MAGIC);
        b.extend_from_slice(&BITMAP_VERSION.to_le_bytes());
        b.extend_from_slice(&self.block_size.to_le_bytes());
        b.extend_from_slice(&self.volume_size.to_le_bytes());
        b.extend_from_slice(&self.uuid);
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&(self.bits.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.hot.len() as u64).to_le_bytes());
        b.extend_from_slice(&self.next_seq.to_le_bytes());
        debug_assert_eq!(b.len(), BITMAP_HDR);
        for w in self.bits.iter().chain(self.hot.iter()) {
            b.extend_from_slice(&w.to_le_bytes());
        }
        let crc = crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    pub(crate) fn decode(path: &Path, b: &[u8]) -> Result<BitmapFile> {
        let bad = |r: &str| ChangeLogError::BadStateFile {
            path: path.into(),
            reason: r.into(),
        };
        if b.len() < BITMAP_HDR + 4 || b[..8] != BITMAP_MAGIC {
            return Err(bad("bad magic or too short"));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c(body) != u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]) {
            return Err(bad("checksum mismatch"));
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let version = u32::from_le_bytes([body[8], body[9], body[10], body[11]]);
        if version != BITMAP_VERSION {
            return Err(bad("unknown version"));
        }
        let block_size = u32::from_le_bytes([body[12], body[13], body[14], body[15]]);
        let volume_size = u64_at(16);
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&body[24..40]);
        let generation = u64_at(40);
        let nbits = u64_at(48);
        let nhot = u64_at(56);
        let next_seq = u64_at(64);
        let words = nbits
            .checked_add(nhot)
            .and_then(|n| n.checked_mul(8))
            .and_then(|n| n.checked_add(BITMAP_HDR as u64));
        if words != Some(body.len() as u64) {
            return Err(bad("length does not match word counts"));
        }
        let word = |i: usize| u64_at(BITMAP_HDR + 8 * i);
        let bits = (0..nbits as usize).map(word).collect();
        let hot = (nbits as usize..(nbits + nhot) as usize)
            .map(word)
            .collect();
        Ok(BitmapFile {
            block_size,
            volume_size,
            uuid,
            generation,
            next_seq,
            bits,
            hot,
        })
    }

    pub(crate) fn load(path: &Path) -> Result<Option<BitmapFile>> {
        match std::fs::read(path) {
            Ok(b) => Self::decode(path, &b).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ChangeLogError::io("read", path, e)),
        }
    }
}

/// The activity-log file: two fixed-size slots written alternately (pwrite +
/// fdatasync), each `magic, seq, extent words, words..., crc`. The valid slot
/// with the higher sequence number is current, so a torn slot write leaves the
/// previous one in force.
pub(crate) struct AlFile {
    file: File,
    path: PathBuf,
    words: usize,
    seq: u64,
    buf: Vec<u8>,
}

impl AlFile {
    fn slot_len(words: usize) -> usize {
        (AL_HDR + 8 * words + 4).div_ceil(4096) * 4096
    }

    /// Opens (creating if needed) the AL file; returns it with the current hot
    /// set (all zero if the file is new; `None` if both slots are unreadable).
    pub(crate) fn open(path: &Path, words: usize) -> Result<(AlFile, Option<Vec<u64>>)> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| ChangeLogError::io("open", path, e))?;
        let mut all = Vec::new();
        file.read_to_end(&mut all)
            .map_err(|e| ChangeLogError::io("read", path, e))?;
        let sl = Self::slot_len(words);
        let mut best: Option<(u64, Vec<u64>)> = None;
        let fresh = all.is_empty();
        for s in 0..2 {
            if let Some(slot) = all.get(s * sl..(s + 1) * sl) {
                if let Some((seq, hot)) = Self::decode_slot(slot, words) {
                    if best.as_ref().map_or(true, |(s, _)| *s < seq) {
                        best = Some((seq, hot));
                    }
                }
            }
        }
        let mut al = AlFile {
            file,
            path: path.to_path_buf(),
            words,
            seq: 0,
            buf: vec![0u8; sl],
        };
        let hot = match best {
            Some((seq, hot)) => {
                al.seq = seq;
                Some(hot)
            }
            None if fresh => {
                let zero = vec![0u64; words];
                al.write(&zero)?;
                al.write(&zero)?;
                Some(zero)
            }
            None => None,
        };
        Ok((al, hot))
    }

    fn decode_slot(slot: &[u8], words: usize) -> Option<(u64, Vec<u64>)> {
        if slot[..8] != AL_MAGIC {
            return None;
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&slot[o..o + 8]);
            u64::from_le_bytes(a)
        };
        if u64_at(16) != words as u64 {
            return None;
        }
        let end = AL_HDR + 8 * words;
        let crc = u32::from_le_bytes([slot[end], slot[end + 1], slot[end + 2], slot[end + 3]]);
        if crc32c(&slot[..end]) != crc {
            return None;
        }
        Some((
            u64_at(8),
            (0..words).map(|i| u64_at(AL_HDR + 8 * i)).collect(),
        ))
    }

    /// Durably replaces the hot set (one pwrite of one slot + fdatasync).
    pub(crate) fn write(&mut self, hot: &[u64]) -> Result<()> {
        debug_assert_eq!(hot.len(), self.words);
        self.seq += 1;
        let b = &mut self.buf;
        b.fill(0);
        b[..8].copy_from_slice(&AL_MAGIC);
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&(self.words as u64).to_le_bytes());
        for (i, w) in hot.iter().enumerate() {
            b[AL_HDR + 8 * i..AL_HDR + 8 * i + 8].copy_from_slice(&w.to_le_bytes());
        }
        let end = AL_HDR + 8 * self.words;
        let crc = Crc::new().update(&b[..end]).finish();
        b[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        let off = (self.seq % 2) * b.len() as u64;
        self.file
            .write_all_at(b, off)
            .and_then(|_| self.file.sync_data())
            .map_err(|e| ChangeLogError::io("write activity log", &self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn bitmap_file_round_trip_and_corruption() {
        let f = BitmapFile {
            block_size: 4096,
            volume_size: 1 << 30,
            uuid: [7; 16],
            generation: 3,
            next_seq: 9,
            bits: vec![1, 0, u64::MAX],
            hot: vec![5],
        };
        let mut b = f.encode();
        assert_eq!(BitmapFile::decode(Path::new("x"), &b).ok(), Some(f));
        b[70] ^= 1;
        assert!(BitmapFile::decode(Path::new("x"), &b).is_err());
        assert!(BitmapFile::decode(Path::new("x"), &b[..10]).is_err());
    }
    #[test]
    fn al_slots() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("v.al");
        let (mut al, hot) = AlFile::open(&p, 2).unwrap();
        assert_eq!(hot, Some(vec![0, 0]));
        al.write(&[3, 4]).unwrap();
        al.write(&[5, 6]).unwrap();
        drop(al);
        let (_, hot) = AlFile::open(&p, 2).unwrap();
        assert_eq!(hot, Some(vec![5, 6]));
        // tear the newest slot: the previous one is used
        let mut all = std::fs::read(&p).unwrap();
        let sl = AlFile::slot_len(2);
        let newest = if all[8] > all[sl + 8] { 0 } else { sl };
        all[newest + AL_HDR] ^= 0xff;
        std::fs::write(&p, &all).unwrap();
        let (_, hot) = AlFile::open(&p, 2).unwrap();
        assert_eq!(hot, Some(vec![3, 4]));
    }
}
