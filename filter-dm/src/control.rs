use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::DmError;
use crate::wire::{self, flags, Cmd, Header, DM_IOCTL_SIZE};
use crate::{sys, table_to_string, DevNum, Target};

/// Where the device-mapper control device lives.
pub const DM_CONTROL_PATH: &str = "/dev/mapper/control";

/// First reply buffer for commands that return data; doubled while the kernel reports
/// `DM_BUFFER_FULL_FLAG`, up to [`MAX_REPLY`].
pub(crate) const FIRST_REPLY: usize = 16 * 1024;
pub(crate) const MAX_REPLY: usize = 16 * 1024 * 1024;

/// Something that runs DM ioctls: the control device, or a fake kernel in unit tests.
pub(crate) trait Transport: Send + Sync {
    fn ioctl(&self, cmd: Cmd, buf: &mut [u8]) -> io::Result<()>;
}

struct ControlFile(File);

impl Transport for ControlFile {
    fn ioctl(&self, cmd: Cmd, buf: &mut [u8]) -> io::Result<()> {
        sys::dm_ioctl(self.0.as_fd(), cmd.request(), buf)
    }
}

/// State of a device-mapper device (`DM_DEV_STATUS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub name: String,
    pub uuid: String,
    pub dev: DevNum,
    /// How many times the block device is open.
    pub open_count: i32,
    pub target_count: u32,
    pub event_nr: u32,
    pub suspended: bool,
    pub read_only: bool,
    /// A live table is in force.
    pub active_table: bool,
    /// A table is loaded and waits for the next resume.
    pub inactive_table: bool,
}

impl DeviceInfo {
    fn from_header(h: &Header) -> Self {
        DeviceInfo {
            name: h.name.clone(),
            uuid: h.uuid.clone(),
            dev: DevNum::from_kernel(h.dev),
            open_count: h.open_count,
            target_count: h.target_count,
            event_nr: h.event_nr,
            suspended: h.flags & flags::SUSPEND != 0,
            read_only: h.flags & flags::READONLY != 0,
            active_table: h.flags & flags::ACTIVE_PRESENT != 0,
            inactive_table: h.flags & flags::INACTIVE_PRESENT != 0,
        }
    }
}

/// An open handle on `/dev/mapper/control`.
pub struct DmControl {
    transport: Box<dyn Transport>,
    /// Where `<name>` device nodes live (`/dev/mapper`); `None` = do not manage nodes.
    node_dir: Option<PathBuf>,
}

impl std::fmt::Debug for DmControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmControl")
            .field("node_dir", &self.node_dir)
            .finish_non_exhaustive()
    }
}

impl DmControl {
    /// Opens `/dev/mapper/control`, creating the node from sysfs if dm-mod is loaded but the
    /// node is missing (a /dev without udev or devtmpfs).
    pub fn open() -> Result<Self, DmError> {
        let path = Path::new(DM_CONTROL_PATH);
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_control_node(path).map_err(|source| DmError::Open {
                    path: path.into(),
                    source,
                })?;
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|source| DmError::Open {
                        path: path.into(),
                        source,
                    })?
            }
            Err(source) => {
                return Err(DmError::Open {
                    path: path.into(),
                    source,
                })
            }
        };
        Ok(DmControl {
            transport: Box::new(ControlFile(file)),
            node_dir: Some(PathBuf::from("/dev/mapper")),
        })
    }

    #[cfg(test)]
    pub(crate) fn with_transport(transport: Box<dyn Transport>) -> Self {
        DmControl {
            transport,
            node_dir: None,
        }
    }

    /// One ioctl round trip. `reply` asks for room for the kernel's result; the buffer grows
    /// while the kernel sets `DM_BUFFER_FULL_FLAG`. Errno values become the specific errors.
    fn call(
        &self,
        cmd: Cmd,
        req: &Header,
        payload: &[u8],
        reply: bool,
    ) -> Result<(Header, Vec<u8>), DmError> {
        let mut size = if reply { FIRST_REPLY } else { 0 }.max(DM_IOCTL_SIZE + payload.len());
        loop {
            let mut hdr = req.clone();
            hdr.version = [4, 0, 0];
            let mut buf = wire::encode(&hdr, payload, size);
            if let Err(e) = self.transport.ioctl(cmd, &mut buf) {
                return Err(map_errno(cmd, &req.name, e));
            }
            let out = wire::decode_header(&buf);
            if reply && out.flags & flags::BUFFER_FULL != 0 {
                if size >= MAX_REPLY {
                    return Err(DmError::ReplyTooLarge {
                        op: cmd.name(),
                        device: req.name.clone(),
                        limit: MAX_REPLY,
                    });
                }
                size = (size * 2).min(MAX_REPLY);
                continue;
            }
            return Ok((out, buf));
        }
    }

    fn named(name: &str) -> Result<Header, DmError> {
        wire::check_name(name).map_err(|e| DmError::InvalidArgument {
            what: "device-mapper device name",
            value: name.into(),
            reason: e.reason(),
        })?;
        Ok(Header {
            name: name.into(),
            ..Header::default()
        })
    }

    fn malformed(cmd: Cmd, name: &str, e: wire::Malformed) -> DmError {
        DmError::Malformed {
            op: cmd.name(),
            device: name.into(),
            reason: e.0,
        }
    }

    /// The kernel's DM ioctl interface version, e.g. `(4, 47, 0)`.
    pub fn version(&self) -> Result<(u32, u32, u32), DmError> {
        let (h, _) = self.call(Cmd::Version, &Header::default(), &[], false)?;
        Ok((h.version[0], h.version[1], h.version[2]))
    }

    /// Creates a device with no table (I/O to it fails until a table is loaded and resumed)
    /// and its `/dev/mapper/<name>` node.
    pub fn create(&self, name: &str, uuid: Option<&str>) -> Result<DeviceInfo, DmError> {
        let mut req = Self::named(name)?;
        if let Some(u) = uuid {
            wire::check_cstr(u, wire::UUID_LEN).map_err(|e| DmError::InvalidArgument {
                what: "device-mapper uuid",
                value: u.into(),
                reason: e.reason(),
            })?;
            req.uuid = u.into();
        }
        let (h, _) = self.call(Cmd::DevCreate, &req, &[], false)?;
        let info = DeviceInfo::from_header(&h);
        if let Err(e) = self.ensure_node(name, info.dev) {
            let _ = self.call(Cmd::DevRemove, &req, &[], false);
            return Err(e);
        }
        Ok(info)
    }

    /// Creates a device, loads `table` and resumes it; on any failure the device is removed.
    pub fn create_with_table(
        &self,
        name: &str,
        uuid: Option<&str>,
        table: &[Target],
    ) -> Result<DeviceInfo, DmError> {
        self.create(name, uuid)?;
        let r = self
            .load_table(name, table)
            .and_then(|()| self.resume(name))
            .and_then(|()| self.info(name));
        if r.is_err() {
            let _ = self.remove(name);
        }
        r
    }

    /// Loads `table` into the device's inactive slot; the next [`resume`](Self::resume) makes
    /// it live. A table the kernel refuses fails with [`DmError::InvalidTable`] (with the
    /// errno; the kernel log says why) and changes nothing.
    pub fn load_table(&self, name: &str, table: &[Target]) -> Result<(), DmError> {
        let mut req = Self::named(name)?;
        let payload = wire::encode_table(table).map_err(|e| {
            let (what, value, reason) = match e {
                wire::BadTable::Empty => ("table", String::new(), "has no targets".to_string()),
                wire::BadTable::TargetType(i, b) => {
                    ("target type", table[i].target_type.clone(), b.reason())
                }
                wire::BadTable::Params(i, b) => {
                    ("target parameters", table[i].params.clone(), b.reason())
                }
            };
            DmError::InvalidArgument {
                what,
                value,
                reason,
            }
        })?;
        req.target_count = table.len() as u32;
        match self.call(Cmd::TableLoad, &req, &payload, false) {
            // EINVAL (bad arguments, unknown target, gaps), ENODEV (a device that cannot be
            // found), EBUSY (a device held exclusively), ...: the kernel refused the table.
            Err(DmError::Ioctl { op, device, source }) => Err(DmError::InvalidTable {
                op,
                device,
                table: table_to_string(table).replace('\n', "; "),
                source,
            }),
            r => r.map(|_| ()),
        }
    }

    /// Drops a loaded, not yet live table (`DM_TABLE_CLEAR`).
    pub fn clear_inactive(&self, name: &str) -> Result<(), DmError> {
        self.call(Cmd::TableClear, &Self::named(name)?, &[], false)
            .map(|_| ())
    }

    /// Suspends the device: waits for in-flight I/O, flushes and freezes a filesystem on it;
    /// new I/O queues until [`resume`](Self::resume).
    pub fn suspend(&self, name: &str) -> Result<(), DmError> {
        let mut req = Self::named(name)?;
        req.flags = flags::SUSPEND;
        self.call(Cmd::DevSuspend, &req, &[], false).map(|_| ())
    }

    /// Resumes the device, first making a loaded inactive table live if there is one.
    pub fn resume(&self, name: &str) -> Result<(), DmError> {
        let (h, _) = self.call(Cmd::DevSuspend, &Self::named(name)?, &[], false)?;
        // The device node follows the device (its number does not change on resume, but a
        // node removed by someone else is put back).
        self.ensure_node(name, DevNum::from_kernel(h.dev))
    }

    /// Removes the device and its `/dev/mapper/<name>` node. An open device is refused with
    /// [`DmError::Busy`] and stays as it was.
    pub fn remove(&self, name: &str) -> Result<(), DmError> {
        let req = Self::named(name)?;
        let dev = match self.info(name) {
            Ok(i) => i.dev,
            Err(DmError::NoSuchDevice { device, .. }) => {
                return Err(DmError::NoSuchDevice {
                    op: Cmd::DevRemove.name(),
                    device,
                })
            }
            Err(e) => return Err(e),
        };
        self.call(Cmd::DevRemove, &req, &[], false)?;
        self.remove_node(name, dev)
    }

    /// State of the device.
    pub fn info(&self, name: &str) -> Result<DeviceInfo, DmError> {
        let (h, _) = self.call(Cmd::DevStatus, &Self::named(name)?, &[], false)?;
        Ok(DeviceInfo::from_header(&h))
    }

    fn table_status(&self, name: &str, table: bool) -> Result<Vec<Target>, DmError> {
        let mut req = Self::named(name)?;
        if table {
            req.flags = flags::STATUS_TABLE;
        }
        let (h, buf) = self.call(Cmd::TableStatus, &req, &[], true)?;
        let area =
            wire::result_area(&h, &buf).map_err(|e| Self::malformed(Cmd::TableStatus, name, e))?;
        wire::decode_targets(area, h.target_count)
            .map_err(|e| Self::malformed(Cmd::TableStatus, name, e))
    }

    /// The live table, one [`Target`] per line (`dmsetup table`).
    pub fn table(&self, name: &str) -> Result<Vec<Target>, DmError> {
        self.table_status(name, true)
    }

    /// The targets' status lines (`dmsetup status`): [`Target::params`] holds the status.
    pub fn status(&self, name: &str) -> Result<Vec<Target>, DmError> {
        self.table_status(name, false)
    }

    /// All device-mapper devices: name and device number.
    pub fn list(&self) -> Result<Vec<(String, DevNum)>, DmError> {
        let (h, buf) = self.call(Cmd::ListDevices, &Header::default(), &[], true)?;
        let area =
            wire::result_area(&h, &buf).map_err(|e| Self::malformed(Cmd::ListDevices, "", e))?;
        wire::decode_name_list(area).map_err(|e| Self::malformed(Cmd::ListDevices, "", e))
    }

    /// Sends a message to the target at `sector` (`dmsetup message`), e.g. dm-era's
    /// `checkpoint`; returns the target's reply text, if any.
    pub fn message(&self, name: &str, sector: u64, msg: &str) -> Result<Option<String>, DmError> {
        let req = Self::named(name)?;
        wire::check_cstr(msg, usize::MAX).map_err(|e| DmError::InvalidArgument {
            what: "target message",
            value: msg.into(),
            reason: e.reason(),
        })?;
        let (h, buf) = self.call(
            Cmd::TargetMsg,
            &req,
            &wire::encode_message(sector, msg),
            true,
        )?;
        if h.flags & flags::DATA_OUT == 0 {
            return Ok(None);
        }
        let area =
            wire::result_area(&h, &buf).map_err(|e| Self::malformed(Cmd::TargetMsg, name, e))?;
        Ok(Some(wire::decode_string(area)))
    }

    /// Replaces the live table of `name` with `new_table`, all or nothing: load into the
    /// inactive slot, suspend, resume (the swap). If any step fails the previous table is put
    /// back in force and the device is resumed, then the first error is returned; the device
    /// is never left suspended or half-changed unless restoring fails too
    /// ([`DmError::RollbackFailed`]). On success the device is resumed.
    pub fn reload_preserving(&self, name: &str, new_table: &[Target]) -> Result<(), DmError> {
        let before = self.info(name)?;
        let old = if before.active_table {
            Some(self.table(name)?)
        } else {
            None
        };
        if before.inactive_table {
            // A stale loaded table would otherwise be what a later rollback resume swaps in.
            self.clear_inactive(name)?;
        }
        let result = self
            .load_table(name, new_table)
            .and_then(|()| self.suspend(name))
            .and_then(|()| {
                // The resume swaps the new table in; the kernel checks some things only then (e.g.
                // that every target fits in its device), so a failure here is a refused table.
                self.resume(name).map_err(|e| match e {
                    DmError::Ioctl { device, source, .. } => DmError::InvalidTable {
                        op: "DM_DEV_SUSPEND (resume into the new table)",
                        device,
                        table: table_to_string(new_table).replace('\n', "; "),
                        source,
                    },
                    e => e,
                })
            });
        let cause = match result {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        match self.restore(name, old.as_deref()) {
            Ok(()) => Err(cause),
            Err(restore) => Err(DmError::RollbackFailed {
                device: name.into(),
                cause: Box::new(cause),
                restore: Box::new(restore),
            }),
        }
    }

    /// Puts `old` back as the live table (if it is not live already) and resumes.
    fn restore(&self, name: &str, old: Option<&[Target]>) -> Result<(), DmError> {
        let now = self.info(name)?;
        if now.inactive_table {
            self.clear_inactive(name)?;
        }
        match old {
            Some(old) => {
                let live = if now.active_table {
                    Some(self.table(name)?)
                } else {
                    None
                };
                if live.as_deref() != Some(old) {
                    self.load_table(name, old)?;
                }
            }
            // There was no live table before: nothing to resume into.
            None if !now.suspended => return Ok(()),
            None => {}
        }
        if now.suspended || old.is_some() {
            self.resume(name)?;
        }
        Ok(())
    }

    /// Path of the device's node, `/dev/mapper/<name>`.
    pub fn node_path(&self, name: &str) -> PathBuf {
        self.node_dir
            .as_deref()
            .unwrap_or(Path::new("/dev/mapper"))
            .join(name)
    }

    /// Makes sure `/dev/mapper/<name>` is a block node (or a symlink to one, as udev makes)
    /// for `dev`, creating or replacing it otherwise.
    fn ensure_node(&self, name: &str, dev: DevNum) -> Result<(), DmError> {
        let Some(dir) = &self.node_dir else {
            return Ok(());
        };
        let path = dir.join(name);
        let node_err = |source| DmError::Node {
            device: name.into(),
            path: path.clone(),
            source,
        };
        match std::fs::metadata(&path) {
            Ok(m) if m.file_type().is_block_device() && DevNum::from_rdev(m.rdev()) == dev => {
                return Ok(())
            }
            Ok(_) => std::fs::remove_file(&path).map_err(node_err)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // a dangling symlink counts as missing
                let _ = std::fs::remove_file(&path);
            }
            Err(e) => return Err(node_err(e)),
        }
        std::fs::create_dir_all(dir).map_err(node_err)?;
        match sys::mknod_block(&path, dev, 0o600) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(node_err(e)),
            _ => Ok(()),
        }
    }

    /// Removes `/dev/mapper/<name>` if it is our block node for `dev` (a udev symlink is
    /// left to udev).
    fn remove_node(&self, name: &str, dev: DevNum) -> Result<(), DmError> {
        let Some(dir) = &self.node_dir else {
            return Ok(());
        };
        let path = dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_block_device() && DevNum::from_rdev(m.rdev()) == dev => {
                std::fs::remove_file(&path).map_err(|source| DmError::Node {
                    device: name.into(),
                    path,
                    source,
                })
            }
            _ => Ok(()),
        }
    }
}

/// Turns an ioctl errno into the specific error for that command.
fn map_errno(cmd: Cmd, name: &str, e: io::Error) -> DmError {
    let (op, device) = (cmd.name(), name.to_string());
    match (cmd, e.raw_os_error()) {
        (Cmd::Version | Cmd::ListDevices, _) => DmError::Ioctl {
            op,
            device,
            source: e,
        },
        (_, Some(libc::ENXIO)) => DmError::NoSuchDevice { op, device },
        (Cmd::DevCreate, Some(libc::EBUSY)) => DmError::NameInUse { op, device },
        (Cmd::DevRemove, Some(libc::EBUSY)) => DmError::Busy { op, device },
        _ => DmError::Ioctl {
            op,
            device,
            source: e,
        },
    }
}

/// mknod /dev/mapper/control from /sys/class/misc/device-mapper/dev ("10:236").
fn create_control_node(path: &Path) -> io::Result<()> {
    let text = std::fs::read_to_string("/sys/class/misc/device-mapper/dev")?;
    let (maj, min) = text.trim().split_once(':').ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, "bad device-mapper dev in sysfs")
    })?;
    let parse = |s: &str| {
        s.parse::<u32>()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    };
    let dev = DevNum::new(parse(maj)?, parse(min)?);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    sys::mknod_char(path, dev, 0o600)
}
