//! Hot insertion of the NBD filter under a live dm device, and its removal, without
//! unmounting.
//!
//! ```text
//!   before:   /dev/mapper/LIVE  = <original table>  -> underlying devices
//!   inserted: /dev/mapper/LIVE  = linear /dev/nbdN 0
//!             /dev/nbdN         -> filter process -> /dev/mapper/LIVE-rewind-origin
//!             LIVE-rewind-origin = <original table> -> underlying devices
//! ```
//!
//! 1. [`prepare`] creates the hidden *origin* device with the live device's table (same
//!    targets, same length): the filter serves it as its backing store on `/dev/nbdN`.
//! 2. [`Prepared::insert`] swaps the live table for `linear <nbdN> 0` (load, suspend, resume:
//!    the suspend freezes the filesystem and drains in-flight I/O, so every write before the
//!    swap reached the underlying devices and every write after it goes through the filter).
//! 3. [`Inserted::remove`] loads the original table again, suspends (drains the filter),
//!    flushes the origin device's page cache (the filter writes through it), resumes into the
//!    original table. [`Removed::finish`] removes the origin device once the filter has
//!    stopped serving (closed) it.
//!
//! Every swap is all-or-nothing: on any failure the previous table is put back and the device
//! resumed, and a half-built origin device is removed. The time between the suspend call and
//! the end of the resume (the I/O pause) is measured and returned.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::{block, table_to_string, DevNum, DmControl, DmError, Target};

/// Suffix of the hidden origin device's name.
pub const ORIGIN_SUFFIX: &str = "-rewind-origin";

/// Errors of hot insertion/removal. Nothing is left half-changed when one is returned
/// (unless it is [`DmError::RollbackFailed`] inside [`InsertError::Dm`]).
#[derive(Debug, thiserror::Error)]
pub enum InsertError {
    #[error(transparent)]
    Dm(#[from] DmError),
    #[error("{device}: the table already routes through an NBD device ({table}): the filter is inserted already")]
    AlreadyInserted { device: String, table: String },
    #[error("{device}: has no live table; nothing to insert under")]
    NoTable { device: String },
    #[error("{device} is {live} bytes but the filter device {dev} is {filter} bytes; is it attached to the origin {origin}?")]
    SizeMismatch {
        device: String,
        live: u64,
        dev: DevNum,
        filter: u64,
        origin: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The origin device is built; the live device is unchanged.
#[derive(Debug)]
pub struct Prepared<'a> {
    dm: &'a DmControl,
    live: String,
    origin: String,
    table: Vec<Target>,
    len_sectors: u64,
}

/// The live device routes through the filter.
#[derive(Debug)]
pub struct Inserted<'a> {
    dm: &'a DmControl,
    live: String,
    origin: String,
    table: Vec<Target>,
    filter_dev: DevNum,
    /// Time I/O to the live device was held during the insertion swap.
    pub pause: Duration,
}

/// Block major of the NBD driver.
const NBD_MAJOR: u32 = 43;

fn routes_through_nbd(table: &[Target]) -> bool {
    table.iter().any(|t| {
        t.params
            .split_whitespace()
            .next()
            .and_then(|d| d.split_once(':'))
            .and_then(|(a, _)| a.parse::<u32>().ok())
            == Some(NBD_MAJOR)
    })
}

fn dev_size(dev: DevNum) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/sys/dev/block/{dev}/size")).ok()?;
    Some(s.trim().parse::<u64>().ok()? * 512)
}

/// Logical block size of a block device, per sysfs (512 if unknown).
pub fn logical_block_size(dev: DevNum) -> u32 {
    std::fs::read_to_string(format!("/sys/dev/block/{dev}/queue/logical_block_size"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(512)
}

/// Step 1: builds the hidden origin device `<live>-rewind-origin` with `live`'s table.
pub fn prepare<'a>(dm: &'a DmControl, live: &str) -> Result<Prepared<'a>, InsertError> {
    let info = dm.info(live)?;
    if !info.active_table {
        return Err(InsertError::NoTable {
            device: live.into(),
        });
    }
    let table = dm.table(live)?;
    if routes_through_nbd(&table) {
        return Err(InsertError::AlreadyInserted {
            device: live.into(),
            table: table_to_string(&table).replace('\n', "; "),
        });
    }
    let len_sectors = table.iter().map(|t| t.start + t.len).max().unwrap_or(0);
    let origin = format!("{live}{ORIGIN_SUFFIX}");
    dm.create_with_table(&origin, None, &table)?;
    Ok(Prepared {
        dm,
        live: live.into(),
        origin,
        table,
        len_sectors,
    })
}

impl<'a> Prepared<'a> {
    /// Node of the origin device: serve it through the filter on `/dev/nbdN`.
    pub fn origin_path(&self) -> PathBuf {
        self.dm.node_path(&self.origin)
    }
    /// The origin device's name.
    pub fn origin_name(&self) -> &str {
        &self.origin
    }
    /// Size of the live (and origin) device in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.len_sectors * 512
    }
    /// Logical block size of the live device: attach `/dev/nbdN` with this block size.
    pub fn logical_block_size(&self) -> Result<u32, InsertError> {
        Ok(logical_block_size(self.dm.info(&self.live)?.dev))
    }

    /// Removes the origin device without inserting (e.g. the filter could not start).
    pub fn abandon(self) -> Result<(), InsertError> {
        self.dm.remove(&self.origin)?;
        Ok(())
    }

    /// Step 2: routes the live device through `filter_dev` (`/dev/nbdN`, served by the
    /// filter over the origin). On failure the live table is restored and the origin device
    /// removed (the caller should stop serving it).
    pub fn insert(self, filter_dev: DevNum) -> Result<Inserted<'a>, InsertError> {
        self.insert_with(filter_dev, || {})
    }

    /// [`Prepared::insert`], running `while_suspended` while the live device is suspended
    /// (no I/O in flight, none reaching the underlying devices): e.g. to take a consistent
    /// image in a test. Its time counts in the pause.
    pub fn insert_with(
        self,
        filter_dev: DevNum,
        while_suspended: impl FnOnce(),
    ) -> Result<Inserted<'a>, InsertError> {
        let size = dev_size(filter_dev).unwrap_or(0);
        if size != self.size_bytes() {
            let e = InsertError::SizeMismatch {
                device: self.live.clone(),
                live: self.size_bytes(),
                dev: filter_dev,
                filter: size,
                origin: self.origin.clone(),
            };
            let _ = self.dm.remove(&self.origin);
            return Err(e);
        }
        let new = [Target::linear(0, self.len_sectors, filter_dev, 0)];
        match swap(self.dm, &self.live, &new, || {
            while_suspended();
            Ok(())
        }) {
            Ok(pause) => Ok(Inserted {
                dm: self.dm,
                live: self.live,
                origin: self.origin,
                table: self.table,
                filter_dev,
                pause,
            }),
            Err(e) => {
                let _ = self.dm.remove(&self.origin);
                Err(e)
            }
        }
    }
}

/// The live device has its original table back; the origin device still exists.
#[derive(Debug)]
pub struct Removed<'a> {
    dm: &'a DmControl,
    origin: String,
    /// Time I/O to the live device was held during the removal swap.
    pub pause: Duration,
}

impl Removed<'_> {
    /// Removes the origin device (after the filter closed it; retried for up to 5 s while
    /// it is still open).
    pub fn finish(self) -> Result<(), InsertError> {
        let path = self.dm.node_path(&self.origin);
        if let Ok(f) = File::open(&path) {
            let _ = block::flush_buffers(&f);
        }
        let mut last = Ok(());
        for _ in 0..50 {
            last = self.dm.remove(&self.origin);
            if last.is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(last?)
    }
}

impl<'a> Inserted<'a> {
    /// The original table (now in force on the origin device).
    pub fn original_table(&self) -> &[Target] {
        &self.table
    }
    /// The filter device the live device routes through.
    pub fn filter_dev(&self) -> DevNum {
        self.filter_dev
    }
    /// The origin device's name.
    pub fn origin_name(&self) -> &str {
        &self.origin
    }

    /// Step 3: puts the original table back (the filter's writes flushed to the underlying
    /// devices while the live device is suspended). On failure the device stays inserted
    /// (and resumed) and `self` is returned (boxed) with the error, so the caller can retry. Then
    /// stop the filter and call [`Removed::finish`].
    pub fn remove(self) -> Result<Removed<'a>, Box<(Self, InsertError)>> {
        self.remove_with(|| {})
    }

    /// [`Inserted::remove`], running `while_suspended` while the live device is suspended,
    /// after the filter's writes were flushed to the underlying devices.
    pub fn remove_with(
        self,
        while_suspended: impl FnOnce(),
    ) -> Result<Removed<'a>, Box<(Self, InsertError)>> {
        let origin_path = self.dm.node_path(&self.origin);
        let flush = || -> Result<(), InsertError> {
            let f = OpenOptions::new()
                .write(true)
                .open(&origin_path)
                .map_err(|source| InsertError::Io {
                    what: "opening the origin device",
                    path: origin_path.clone(),
                    source,
                })?;
            f.sync_all().map_err(|source| InsertError::Io {
                what: "flushing the origin device",
                path: origin_path.clone(),
                source,
            })?;
            while_suspended();
            Ok(())
        };
        // Write back most of the origin's dirty pages before the suspend, so that the flush
        // inside the pause has little left to do.
        if let Ok(f) = OpenOptions::new().write(true).open(&origin_path) {
            let _ = f.sync_all();
        }
        match swap(self.dm, &self.live, &self.table, flush) {
            Ok(pause) => Ok(Removed {
                dm: self.dm,
                origin: self.origin,
                pause,
            }),
            Err(e) => Err(Box::new((self, e))),
        }
    }
}

/// Loads `new` as `name`'s table, suspends, runs `between` (the device is suspended: no I/O
/// in flight), resumes into `new`. On failure the old table is restored and the device
/// resumed. Returns the time from the suspend call to the end of the resume.
fn swap(
    dm: &DmControl,
    name: &str,
    new: &[Target],
    between: impl FnOnce() -> Result<(), InsertError>,
) -> Result<Duration, InsertError> {
    let before = dm.info(name)?;
    let old = dm.table(name)?;
    if before.inactive_table {
        dm.clear_inactive(name)?;
    }
    dm.load_table(name, new)?;
    let t0 = Instant::now();
    if let Err(e) = dm.suspend(name) {
        let _ = dm.clear_inactive(name);
        // a failed suspend may leave it suspended
        if dm.info(name).map(|i| i.suspended).unwrap_or(false) {
            let _ = dm.resume(name);
        }
        return Err(e.into());
    }
    let r = between().and_then(|()| dm.resume(name).map_err(InsertError::from));
    let pause = t0.elapsed();
    match r {
        Ok(()) => Ok(pause),
        Err(cause) => match restore(dm, name, &old) {
            Ok(()) => Err(cause),
            Err(restore) => Err(DmError::RollbackFailed {
                device: name.into(),
                cause: Box::new(match cause {
                    InsertError::Dm(e) => e,
                    other => DmError::InvalidArgument {
                        what: "table swap",
                        value: name.into(),
                        reason: other.to_string(),
                    },
                }),
                restore: Box::new(restore),
            }
            .into()),
        },
    }
}

fn restore(dm: &DmControl, name: &str, old: &[Target]) -> Result<(), DmError> {
    let now = dm.info(name)?;
    if now.inactive_table {
        dm.clear_inactive(name)?;
    }
    if dm.table(name)? != old {
        dm.load_table(name, old)?;
    }
    if now.suspended || dm.info(name)?.inactive_table {
        dm.resume(name)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nbd_tables_are_recognised() {
        let t = [Target::linear(0, 8, DevNum::new(43, 0), 0)];
        assert!(routes_through_nbd(&t));
        let t = [Target::linear(0, 8, DevNum::new(7, 0), 0)];
        assert!(!routes_through_nbd(&t));
    }
}
