use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use crate::sys::{self, IntIoctl};
use crate::{block, DevNum};

/// A loop device attached to a backing file, detached on drop. Used by the kernel tests
/// (and tools) to get a real block device to put device-mapper tables on.
#[derive(Debug)]
pub struct LoopDevice {
    file: Option<File>,
    path: PathBuf,
    dev: DevNum,
}

impl LoopDevice {
    /// Attaches `backing` (opened read-write) to a free loop device.
    pub fn attach(backing: &Path) -> io::Result<Self> {
        let backing = OpenOptions::new().read(true).write(true).open(backing)?;
        let ctl = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/loop-control")?;
        let mut last = None;
        for _ in 0..20 {
            let n = sys::int_ioctl(ctl.as_fd(), IntIoctl::LoopCtlGetFree, 0)?;
            let path = PathBuf::from(format!("/dev/loop{n}"));
            let file = match OpenOptions::new().read(true).write(true).open(&path) {
                Ok(f) => f,
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                }
            };
            match sys::int_ioctl(
                file.as_fd(),
                IntIoctl::LoopSetFd,
                backing.as_raw_fd() as libc::c_ulong,
            ) {
                Ok(_) => {
                    let dev = block::dev_num(&file)?;
                    return Ok(LoopDevice {
                        file: Some(file),
                        path,
                        dev,
                    });
                }
                // someone else took it between GET_FREE and SET_FD: try the next one
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no free loop device")))
    }

    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn dev(&self) -> DevNum {
        self.dev
    }

    /// Detaches the backing file (`LOOP_CLR_FD`).
    pub fn detach(mut self) -> io::Result<()> {
        self.clear()
    }

    fn clear(&mut self) -> io::Result<()> {
        match self.file.take() {
            Some(f) => sys::int_ioctl(f.as_fd(), IntIoctl::LoopClrFd, 0).map(|_| ()),
            None => Ok(()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = self.clear();
    }
}
