//! `drvutil --kernel`: the kernel side of attached and inserted volumes — every connected
//! `/dev/nbdN` (size, block size, configuring pid, whether that process still lives), every
//! device-mapper device with the table in force, which of them route through an NBD device
//! (the filter is inserted), the hidden origin devices of insertions, and the era (current
//! era, metadata use, held snapshot) of dm-era devices. Read-only: sysfs and DM_TABLE_STATUS.

use std::fmt::Write as _;

use filter_dm::era::EraStatus;
use filter_dm::insert::ORIGIN_SUFFIX;
use filter_dm::{table_to_string, DmControl};
use filter_nbd::attach;
use serde::Serialize;

/// One connected kernel NBD device.
#[derive(Debug, Serialize)]
pub struct NbdOut {
    /// `/dev/nbdN`.
    pub device: String,
    /// Size in bytes.
    pub size: u64,
    /// Logical block size.
    pub logical_block_size: u32,
    /// Pid that connected it (sysfs `pid`), if shown. The kernel does not update it when a
    /// restarted agent takes the device over (NBD_CMD_RECONFIGURE).
    pub pid: Option<u32>,
    /// Whether that pid is a running process. False right after an agent crash (the kernel
    /// holds I/O for its dead-connection timeout) but also after a take-over.
    pub pid_alive: Option<bool>,
}

/// dm-era state.
#[derive(Debug, Serialize)]
pub struct EraOut {
    /// The era writes go to now.
    pub current_era: u32,
    /// Metadata blocks used / total.
    pub metadata_used: u64,
    /// Metadata blocks in all.
    pub metadata_total: u64,
    /// Metadata snapshot held (its root block), if any.
    pub held_metadata_root: Option<u64>,
}

/// One device-mapper device.
#[derive(Debug, Serialize)]
pub struct DmOut {
    /// dm name.
    pub name: String,
    /// major:minor.
    pub dev: String,
    /// Suspended now.
    pub suspended: bool,
    /// Open count.
    pub open_count: i32,
    /// The table in force, dmsetup format.
    pub table: Vec<String>,
    /// `/dev/nbdN` when the table routes through an NBD device (filter inserted).
    pub inserted_via: Option<String>,
    /// For an insertion's hidden origin device: the live device it belongs to.
    pub origin_of: Option<String>,
    /// For an era device.
    pub era: Option<EraOut>,
}

/// Everything `drvutil --kernel` reports.
#[derive(Debug, Serialize)]
pub struct KernelReport {
    /// Connected NBD devices.
    pub nbd: Vec<NbdOut>,
    /// device-mapper devices.
    pub dm: Vec<DmOut>,
    /// What could not be read (no nbd module, no device-mapper, ...).
    pub notes: Vec<String>,
}

fn nbd_devices() -> Vec<NbdOut> {
    let mut idx: Vec<u32> = std::fs::read_dir("/sys/block")
        .map(|d| {
            d.filter_map(|e| {
                e.ok()?
                    .file_name()
                    .to_str()?
                    .strip_prefix("nbd")?
                    .parse()
                    .ok()
            })
            .collect()
        })
        .unwrap_or_default();
    idx.sort_unstable();
    idx.into_iter()
        .filter_map(|i| attach::kernel_device_info(i).ok())
        .filter(|d| d.size > 0)
        .map(|d| NbdOut {
            device: format!("/dev/nbd{}", d.index),
            size: d.size,
            logical_block_size: d.logical_block_size,
            pid: d.pid,
            pid_alive: d
                .pid
                .map(|p| std::path::Path::new(&format!("/proc/{p}")).exists()),
        })
        .collect()
}

fn nbd_name_of(dev: &str) -> Option<String> {
    let (maj, min) = dev.split_once(':')?;
    if maj.parse::<u32>().ok()? != attach::NBD_MAJOR {
        return None;
    }
    let link = std::fs::read_link(format!("/sys/dev/block/{maj}:{min}")).ok()?;
    Some(format!("/dev/{}", link.file_name()?.to_str()?))
}

/// Collects the report; never fails (what cannot be read becomes a note).
pub fn collect() -> KernelReport {
    let mut notes = Vec::new();
    let nbd = nbd_devices();
    if !std::path::Path::new("/sys/module/nbd").exists() {
        notes.push("nbd module not loaded".into());
    }
    let mut dm = Vec::new();
    match DmControl::open() {
        Err(e) => notes.push(e.to_string()),
        Ok(ctl) => match ctl.list() {
            Err(e) => notes.push(format!("listing dm devices: {e}")),
            Ok(list) => {
                for (name, dev) in list {
                    let info = ctl.info(&name).ok();
                    let table = ctl.table(&name).unwrap_or_default();
                    let inserted_via = table.iter().find_map(|t| {
                        nbd_name_of(t.params.split_whitespace().next().unwrap_or(""))
                    });
                    let era = if table.len() == 1 && table[0].target_type == "era" {
                        ctl.status(&name)
                            .ok()
                            .and_then(|s| s.first().and_then(|t| EraStatus::parse(&t.params)))
                            .map(|s| EraOut {
                                current_era: s.current_era,
                                metadata_used: s.used_metadata_blocks,
                                metadata_total: s.total_metadata_blocks,
                                held_metadata_root: s.held_metadata_root,
                            })
                    } else {
                        None
                    };
                    dm.push(DmOut {
                        origin_of: name.strip_suffix(ORIGIN_SUFFIX).map(str::to_owned),
                        dev: dev.to_string(),
                        suspended: info.as_ref().is_some_and(|i| i.suspended),
                        open_count: info.as_ref().map_or(0, |i| i.open_count),
                        table: table_to_string(&table).lines().map(str::to_owned).collect(),
                        inserted_via,
                        era,
                        name,
                    });
                }
            }
        },
    }
    KernelReport { nbd, dm, notes }
}

/// Human-readable form.
pub fn render_text(r: &KernelReport) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "Kernel NBD devices      : {}", r.nbd.len());
    for d in &r.nbd {
        let alive = match d.pid_alive {
            Some(true) => "alive",
            Some(false) => "exited: the device waits for a reconnect, or was taken over",
            None => "?",
        };
        let _ = writeln!(
            o,
            "  {:<12} size {:>14}  block {:>4}  pid {} ({alive})",
            d.device,
            d.size,
            d.logical_block_size,
            d.pid.map_or("-".into(), |p| p.to_string()),
        );
    }
    let _ = writeln!(o, "Device-mapper devices   : {}", r.dm.len());
    for d in &r.dm {
        let mut tags = Vec::new();
        if let Some(n) = &d.inserted_via {
            tags.push(format!("filter inserted via {n}"));
        }
        if let Some(l) = &d.origin_of {
            tags.push(format!("insertion origin of {l}"));
        }
        if d.suspended {
            tags.push("SUSPENDED".into());
        }
        let _ = writeln!(
            o,
            "  {} ({}) open {}{}",
            d.name,
            d.dev,
            d.open_count,
            if tags.is_empty() {
                String::new()
            } else {
                format!("  [{}]", tags.join(", "))
            }
        );
        for t in &d.table {
            let _ = writeln!(o, "      table: {t}");
        }
        if let Some(e) = &d.era {
            let _ = writeln!(
                o,
                "      era: current {}  metadata {}/{}  snapshot {}",
                e.current_era,
                e.metadata_used,
                e.metadata_total,
                e.held_metadata_root
                    .map_or("none".into(), |r| format!("held at block {r}"))
            );
        }
    }
    for n in &r.notes {
        let _ = writeln!(o, "note: {n}");
    }
    o
}
