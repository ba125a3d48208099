//! dm-era as a kernel-side change tracker (design §5).
//!
//! An `era` target sits over the origin device and records, per block of
//! `block_size_sectors`, the *era* in which the block was last written; `checkpoint` starts a
//! new era. Userspace reads the record from the metadata device through a metadata snapshot
//! (`take_metadata_snap`), which [`meta`] parses. [`Era::changed_since`] is the query the
//! agent uses after a restart: every byte range written in an era `>=` the one it saw last.
//!
//! Format and kernel behaviour: `vendor-docs/dm-era.md`.

pub mod meta;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::{block, DevNum, DmControl, DmError, Target};
pub use meta::{
    clamp_ranges, EraMetadata, EraView, MetaError, MetadataSource, Superblock, Writeset,
    WritesetRoot, META_BLOCK_SIZE,
};

/// Errors of the dm-era layer.
#[derive(Debug, thiserror::Error)]
pub enum EraError {
    #[error(transparent)]
    Dm(#[from] DmError),

    #[error("block device {dev} does not exist ({what})")]
    NoSuchBlockDevice { what: &'static str, dev: DevNum },

    #[error(
        "invalid era block size {sectors} sectors: it must be a positive multiple of 8 (4 KiB)"
    )]
    BadBlockSize { sectors: u32 },

    #[error("the era metadata device {dev} ({path}) has {bytes} bytes: too small for {nr_blocks} tracked blocks (needs about {needed} bytes); the kernel refused the era table: {source}")]
    MetadataTooSmall {
        dev: DevNum,
        path: String,
        bytes: u64,
        nr_blocks: u64,
        needed: u64,
        source: Box<DmError>,
    },

    #[error("{device:?}: a metadata snapshot is already held (at metadata block {root}); drop it first (nothing was changed)")]
    SnapshotAlreadyHeld { device: String, root: u64 },

    #[error("{device:?}: no metadata snapshot is held")]
    NoSnapshotHeld { device: String },

    #[error("{device:?} is not a single-target dm-era device (table: {table})")]
    NotEra { device: String, table: String },

    #[error("{device:?}: unexpected dm-era status {status:?}")]
    BadStatus { device: String, status: String },

    #[error("era metadata of {device:?} (device {path}): {source}")]
    Metadata {
        device: String,
        path: PathBuf,
        source: MetaError,
    },

    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// The status line of an era target: `<metadata block size> <used>/<total metadata
/// blocks> <current era> <held metadata root | ->`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EraStatus {
    /// In 512-byte sectors (8).
    pub metadata_block_sectors: u32,
    pub used_metadata_blocks: u64,
    pub total_metadata_blocks: u64,
    pub current_era: u32,
    /// Location of the metadata snapshot's superblock, if one is held.
    pub held_metadata_root: Option<u64>,
}

impl EraStatus {
    /// Parses the status string of an era target.
    pub fn parse(s: &str) -> Option<EraStatus> {
        let mut it = s.split_whitespace();
        let bs = it.next()?.parse().ok()?;
        let (used, total) = it.next()?.split_once('/')?;
        let era = it.next()?.parse().ok()?;
        let held = match it.next()? {
            "-" => None,
            r => Some(r.parse().ok()?),
        };
        if it.next().is_some() {
            return None;
        }
        Some(EraStatus {
            metadata_block_sectors: bs,
            used_metadata_blocks: used.parse().ok()?,
            total_metadata_blocks: total.parse().ok()?,
            current_era: era,
            held_metadata_root: held,
        })
    }
}

/// Size of a block device in bytes, from sysfs (`None` if there is no such device).
fn dev_size(dev: DevNum) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/sys/dev/block/{dev}/size")).ok()?;
    s.trim().parse::<u64>().ok().map(|sectors| sectors * 512)
}

/// `/dev/<DEVNAME>` of a block device, from sysfs.
fn dev_path(dev: DevNum) -> Option<PathBuf> {
    let s = std::fs::read_to_string(format!("/sys/dev/block/{dev}/uevent")).ok()?;
    let name = s.lines().find_map(|l| l.strip_prefix("DEVNAME="))?;
    Some(Path::new("/dev").join(name.trim()))
}

/// An estimate of the metadata space dm-era needs to start with `nr_blocks` tracked blocks:
/// the era array (4 bytes a block), two writesets (1 bit a block), their btree nodes, and 8
/// blocks for the superblock, space map, writeset tree and the copies a commit shadows.
/// Measured on Linux 6.1 with 2048 blocks: 12 metadata blocks are refused, 16 (this
/// estimate) work. The kernel's real limit is found only by trying; the error quotes this.
/// A running device needs more as eras pile up (the status line shows the use).
pub fn metadata_bytes_needed(nr_blocks: u64) -> u64 {
    let per_array_block = ((META_BLOCK_SIZE - 24) / 4) as u64;
    let per_bitset_block = ((META_BLOCK_SIZE - 24) / 8 * 64) as u64;
    let array = nr_blocks.div_ceil(per_array_block);
    let bitset = nr_blocks.div_ceil(per_bitset_block);
    let nodes = array.div_ceil(252) + 2 * bitset.div_ceil(252);
    let blocks = 8 + array + 2 * bitset + nodes;
    blocks * META_BLOCK_SIZE as u64
}

/// A dm-era device driven through a [`DmControl`].
#[derive(Debug)]
pub struct Era<'a> {
    dm: &'a DmControl,
    name: String,
    metadata: DevNum,
    origin: DevNum,
    block_sectors: u32,
    len_sectors: u64,
}

impl<'a> Era<'a> {
    /// Creates `name`: an era target over the whole of `origin_dev`, with its metadata on
    /// `metadata_dev` (formatted if all zeroes, else reopened), tracking blocks of
    /// `block_size_sectors` (a multiple of 8). Nothing is left behind on failure.
    pub fn create(
        dm: &'a DmControl,
        name: &str,
        metadata_dev: DevNum,
        origin_dev: DevNum,
        block_size_sectors: u32,
    ) -> Result<Era<'a>, EraError> {
        if block_size_sectors == 0 || block_size_sectors & 7 != 0 {
            return Err(EraError::BadBlockSize {
                sectors: block_size_sectors,
            });
        }
        let meta_bytes = dev_size(metadata_dev).ok_or(EraError::NoSuchBlockDevice {
            what: "era metadata device",
            dev: metadata_dev,
        })?;
        let origin_bytes = dev_size(origin_dev).ok_or(EraError::NoSuchBlockDevice {
            what: "era origin device",
            dev: origin_dev,
        })?;
        let len_sectors = origin_bytes / 512;
        let nr_blocks = len_sectors.div_ceil(u64::from(block_size_sectors));
        let table = [Target::new(
            0,
            len_sectors,
            "era",
            format!("{metadata_dev} {origin_dev} {block_size_sectors}"),
        )];
        match dm.create_with_table(name, None, &table) {
            Ok(_) => Ok(Era {
                dm,
                name: name.into(),
                metadata: metadata_dev,
                origin: origin_dev,
                block_sectors: block_size_sectors,
                len_sectors,
            }),
            // The kernel says why only in its log: out of metadata space is ENOSPC (at load
            // or, for the era array, at resume), or EINVAL when not even the space map fits.
            Err(e @ (DmError::InvalidTable { .. } | DmError::Ioctl { .. }))
                if e.raw_os_error() == Some(libc::ENOSPC)
                    || meta_bytes < metadata_bytes_needed(nr_blocks) =>
            {
                Err(EraError::MetadataTooSmall {
                    dev: metadata_dev,
                    path: dev_path(metadata_dev)
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "?".into()),
                    bytes: meta_bytes,
                    nr_blocks,
                    needed: metadata_bytes_needed(nr_blocks),
                    source: Box::new(e),
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// An existing era device: its table must be one `era` target.
    pub fn open(dm: &'a DmControl, name: &str) -> Result<Era<'a>, EraError> {
        let table = dm.table(name)?;
        let not_era = || EraError::NotEra {
            device: name.into(),
            table: crate::table_to_string(&table).replace('\n', "; "),
        };
        let [t] = table.as_slice() else {
            return Err(not_era());
        };
        if t.target_type != "era" || t.start != 0 {
            return Err(not_era());
        }
        let p: Vec<&str> = t.params.split_whitespace().collect();
        let parse_dev = |s: &str| {
            let (a, b) = s.split_once(':')?;
            Some(DevNum::new(a.parse().ok()?, b.parse().ok()?))
        };
        match p.as_slice() {
            [m, o, bs] => Ok(Era {
                dm,
                name: name.into(),
                metadata: parse_dev(m).ok_or_else(not_era)?,
                origin: parse_dev(o).ok_or_else(not_era)?,
                block_sectors: bs.parse().map_err(|_| not_era())?,
                len_sectors: t.len,
            }),
            _ => Err(not_era()),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn metadata_dev(&self) -> DevNum {
        self.metadata
    }
    pub fn origin_dev(&self) -> DevNum {
        self.origin
    }
    /// Tracked block size in 512-byte sectors.
    pub fn block_sectors(&self) -> u32 {
        self.block_sectors
    }
    /// Size of the era device in bytes.
    pub fn len_bytes(&self) -> u64 {
        self.len_sectors * 512
    }

    /// The parsed status line.
    pub fn status(&self) -> Result<EraStatus, EraError> {
        let st = self.dm.status(&self.name)?;
        let bad = |s: String| EraError::BadStatus {
            device: self.name.clone(),
            status: s,
        };
        match st.as_slice() {
            [t] if t.target_type == "era" => {
                EraStatus::parse(&t.params).ok_or_else(|| bad(t.params.clone()))
            }
            _ => Err(bad(crate::table_to_string(&st))),
        }
    }

    fn message(&self, msg: &str) -> Result<(), EraError> {
        self.dm.message(&self.name, 0, msg)?;
        Ok(())
    }

    /// Ends the current era and starts the next; returns the new current era. Writes from
    /// now on are recorded in it.
    pub fn checkpoint(&self) -> Result<u32, EraError> {
        self.message("checkpoint")?;
        Ok(self.status()?.current_era)
    }

    /// Takes the metadata snapshot (which also starts a new era: the writes of the era it
    /// ends are in the snapshot). Returns the snapshot's metadata block. Refused with
    /// [`EraError::SnapshotAlreadyHeld`], changing nothing, if one is held already.
    pub fn take_metadata_snap(&self) -> Result<u64, EraError> {
        if let Some(root) = self.status()?.held_metadata_root {
            return Err(EraError::SnapshotAlreadyHeld {
                device: self.name.clone(),
                root,
            });
        }
        match self.message("take_metadata_snap") {
            Ok(()) => {}
            // someone else took one in between: the kernel refuses with EINVAL, unchanged
            Err(e) => {
                return match self.status().ok().and_then(|s| s.held_metadata_root) {
                    Some(root) => Err(EraError::SnapshotAlreadyHeld {
                        device: self.name.clone(),
                        root,
                    }),
                    None => Err(e),
                }
            }
        }
        self.status()?
            .held_metadata_root
            .ok_or_else(|| EraError::BadStatus {
                device: self.name.clone(),
                status: "no metadata snapshot held after take_metadata_snap".into(),
            })
    }

    /// Drops the held metadata snapshot.
    pub fn drop_metadata_snap(&self) -> Result<(), EraError> {
        if self.status()?.held_metadata_root.is_none() {
            return Err(EraError::NoSnapshotHeld {
                device: self.name.clone(),
            });
        }
        self.message("drop_metadata_snap")
    }

    /// Path of the metadata device node.
    pub fn metadata_path(&self) -> Result<PathBuf, EraError> {
        dev_path(self.metadata).ok_or(EraError::NoSuchBlockDevice {
            what: "era metadata device",
            dev: self.metadata,
        })
    }

    /// Opens the metadata device for reading, its cached pages dropped (the kernel writes it
    /// around the page cache), and reads the superblock.
    pub fn read_metadata(&self) -> Result<EraMetadata<File>, EraError> {
        let path = self.metadata_path()?;
        let io_err = |source| EraError::Io {
            what: "era metadata device",
            path: path.clone(),
            source,
        };
        let f = File::open(&path).map_err(io_err)?;
        block::flush_buffers(&f).map_err(io_err)?;
        EraMetadata::open(Box::new(f)).map_err(|source| EraError::Metadata {
            device: self.name.clone(),
            path: path.clone(),
            source,
        })
    }

    /// Byte ranges of the era device written in an era `>= era`, coalesced and cut at the
    /// device's end: takes a metadata snapshot (which starts a new era), reads it and drops
    /// it again (also on failure). Returns the ranges and the era current after the
    /// snapshot: pass that era next time to get the writes made from now on.
    pub fn changed_since(&self, era: u32) -> Result<(Vec<(u64, u64)>, u32), EraError> {
        self.take_metadata_snap()?;
        let r = self.read_snapshot_ranges(era);
        let dropped = self.message("drop_metadata_snap");
        let (ranges, next) = r?;
        dropped?;
        Ok((ranges, next))
    }

    fn read_snapshot_ranges(&self, era: u32) -> Result<(Vec<(u64, u64)>, u32), EraError> {
        let md = self.read_metadata()?;
        let wrap = |source| EraError::Metadata {
            device: self.name.clone(),
            path: dev_path(self.metadata).unwrap_or_default(),
            source,
        };
        let snap = md.snapshot().map_err(wrap)?;
        let ranges = snap.changed_since(era).map_err(wrap)?;
        Ok((
            clamp_ranges(ranges, self.len_bytes()),
            snap.superblock().current_era,
        ))
    }

    /// Removes the era device (its metadata stays on the metadata device).
    pub fn remove(self) -> Result<(), EraError> {
        self.dm.remove(&self.name)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        assert_eq!(
            EraStatus::parse("8 25/1024 3 -"),
            Some(EraStatus {
                metadata_block_sectors: 8,
                used_metadata_blocks: 25,
                total_metadata_blocks: 1024,
                current_era: 3,
                held_metadata_root: None,
            })
        );
        assert_eq!(
            EraStatus::parse("8 34/1024 3 63")
                .unwrap()
                .held_metadata_root,
            Some(63)
        );
        for bad in [
            "",
            "Error",
            "8 25 3 -",
            "8 25/x 3 -",
            "8 1/2 3",
            "8 1/2 3 - x",
            "8 1/2 -1 -",
        ] {
            assert_eq!(EraStatus::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn metadata_estimate_matches_what_the_kernel_took() {
        // Linux 6.1, 2048 blocks: 12 metadata blocks refused, 16 accepted (kernel_era.rs)
        assert_eq!(metadata_bytes_needed(2048), 16 * 4096);
        assert!(metadata_bytes_needed(16384) > metadata_bytes_needed(2048));
        // at least the era array: 4 bytes a block
        assert!(metadata_bytes_needed(1 << 31) > (1 << 31) * 4);
    }
}
