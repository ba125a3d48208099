//! Host unit tests: the ioctl buffer layout, and the control API against a fake kernel that
//! implements the kernel's side of the DM ioctls (reply layout, buffer-full, errnos).

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use crate::control::{Transport, FIRST_REPLY, MAX_REPLY};
use crate::wire::{self, flags, Cmd, Header, DM_IOCTL_SIZE, TARGET_SPEC_SIZE};
use crate::{DevNum, DmControl, DmError, Target};

// ------------------------------------------------------------------ layout

#[test]
fn header_layout_matches_dm_ioctl_h() {
    assert_eq!(Cmd::Version.request(), 0xc138_fd00);
    assert_eq!(Cmd::TableStatus.request(), 0xc138_fd0c);
    let hdr = Header {
        version: [4, 5, 6],
        target_count: 3,
        open_count: -1,
        flags: 0x1234,
        event_nr: 9,
        dev: 0xfd01,
        name: "vol".into(),
        uuid: "U".repeat(128),
        ..Header::default()
    };
    let buf = wire::encode(&hdr, b"payload", 0);
    assert_eq!(buf.len(), DM_IOCTL_SIZE + 7);
    assert_eq!(wire::get_u32(&buf, 0), 4);
    assert_eq!(wire::get_u32(&buf, 8), 6);
    assert_eq!(wire::get_u32(&buf, 12), buf.len() as u32, "data_size");
    assert_eq!(wire::get_u32(&buf, 16), 312, "data_start");
    assert_eq!(wire::get_u32(&buf, 20), 3, "target_count");
    assert_eq!(wire::get_u32(&buf, 28), 0x1234, "flags");
    assert_eq!(wire::get_u64(&buf, 40), 0xfd01, "dev");
    assert_eq!(&buf[48..52], b"vol\0", "name at 48");
    assert_eq!(&buf[176..177], b"U", "uuid at 176");
    assert_eq!(buf[176 + 128], 0, "uuid NUL");
    assert_eq!(&buf[312..], b"payload");
    let back = wire::decode_header(&buf);
    assert_eq!(back.name, "vol");
    assert_eq!(back.uuid.len(), 128);
    assert_eq!(back.open_count, -1);
    assert_eq!(back.dev, 0xfd01);
}

#[test]
fn dev_numbers_use_the_kernels_huge_encoding() {
    assert_eq!(DevNum::from_kernel(0xfd00), DevNum::new(253, 0));
    assert_eq!(DevNum::new(7, 3).to_kernel(), 0x0703);
    // minors above 255 go to bits 20..
    let d = DevNum::new(259, 0x12345);
    assert_eq!(d.to_kernel(), 0x45 | (259 << 8) | (0x123 << 20));
    assert_eq!(DevNum::from_kernel(d.to_kernel()), d);
    assert_eq!(d.to_string(), "259:74565");
}

#[test]
fn table_encoding_is_load_layout() {
    let t = [
        Target::new(0, 100, "linear", "7:0 2048"),
        Target::new(100, 28, "error", ""),
    ];
    let p = wire::encode_table(&t).unwrap();
    // first spec: 40 bytes + "7:0 2048\0" (9) = 49 -> 56
    assert_eq!(wire::get_u64(&p, 0), 0);
    assert_eq!(wire::get_u64(&p, 8), 100);
    assert_eq!(
        wire::get_u32(&p, 20),
        56,
        "next = distance to the next spec"
    );
    assert_eq!(&p[24..31], b"linear\0");
    assert_eq!(&p[40..49], b"7:0 2048\0");
    assert_eq!(wire::get_u64(&p, 56), 100);
    assert_eq!(&p[56 + 24..56 + 30], b"error\0");
    assert_eq!(p.len(), 56 + 48);
    assert_eq!(p.len() % 8, 0);
    assert_eq!(fake_parse_load(&p, 2).unwrap(), t);
}

#[test]
fn table_encoding_refuses_what_the_kernel_cannot_take() {
    assert_eq!(wire::encode_table(&[]), Err(wire::BadTable::Empty));
    let long = Target::new(0, 8, "x".repeat(16), "");
    assert!(matches!(
        wire::encode_table(&[long]),
        Err(wire::BadTable::TargetType(0, wire::BadString::TooLong(15)))
    ));
    assert!(wire::encode_table(&[Target::new(0, 8, "x".repeat(15), "")]).is_ok());
    let nul = Target::new(0, 8, "linear", "7:0\0 0");
    assert!(matches!(
        wire::encode_table(&[nul]),
        Err(wire::BadTable::Params(0, wire::BadString::Nul))
    ));
}

#[test]
fn status_and_name_list_decoding() {
    let targets = vec![
        Target::new(0, 8, "era", "128 3 1/2 -"),
        Target::new(8, 8, "zero", ""),
    ];
    let area = fake_status_area(&targets);
    assert_eq!(wire::decode_targets(&area, 2).unwrap(), targets);
    // the count governs, even if `next` of the last points beyond
    assert_eq!(wire::decode_targets(&area, 1).unwrap(), targets[..1]);
    assert!(
        wire::decode_targets(&area[..30], 1).is_err(),
        "truncated spec"
    );
    let mut bad = area.clone();
    wire::put_u32(&mut bad, 20, 0);
    assert!(
        wire::decode_targets(&bad, 2).is_err(),
        "next that does not advance"
    );
    let mut unterminated = area[..TARGET_SPEC_SIZE + 3].to_vec();
    unterminated[TARGET_SPEC_SIZE..].copy_from_slice(b"abc");
    assert!(wire::decode_targets(&unterminated, 1).is_err());

    assert_eq!(wire::decode_name_list(&[0u8; 16]).unwrap(), vec![]);
    let devs = vec![
        ("a".to_string(), DevNum::new(254, 0)),
        ("vg-lv".to_string(), DevNum::new(254, 300)),
    ];
    assert_eq!(
        wire::decode_name_list(&fake_name_list(&devs)).unwrap(),
        devs
    );
    assert!(wire::decode_name_list(&fake_name_list(&devs)[..20]).is_err());
}

#[test]
fn names_are_checked_before_any_ioctl() {
    let (dm, k) = fake();
    for (name, what) in [
        ("x".repeat(128), "longer than 127"),
        (String::new(), "empty"),
        ("a/b".into(), "'/'"),
        ("..".into(), "\"..\""),
        ("a\0b".into(), "NUL"),
    ] {
        let e = dm.create(&name, None).unwrap_err();
        assert!(matches!(e, DmError::InvalidArgument { .. }), "{e}");
        assert!(e.to_string().contains(what), "{e}");
    }
    let e = dm.create("ok", Some(&"u".repeat(129))).unwrap_err();
    assert!(e.to_string().contains("uuid"), "{e}");
    assert!(k.calls().is_empty(), "nothing reached the kernel");
    dm.create(&"y".repeat(127), Some(&"u".repeat(128))).unwrap();
}

// ------------------------------------------------------------------ control API

#[test]
fn create_load_resume_table_status_list_remove() {
    let (dm, _k) = fake();
    assert_eq!(dm.version().unwrap(), (4, 47, 0));
    let t = vec![Target::linear(0, 100, DevNum::new(7, 0), 0)];
    let info = dm.create_with_table("v1", Some("uuid-1"), &t).unwrap();
    assert!(info.active_table && !info.suspended && !info.inactive_table);
    assert_eq!(info.uuid, "uuid-1");
    assert_eq!(dm.table("v1").unwrap(), t);
    assert_eq!(
        dm.status("v1").unwrap(),
        vec![Target::new(0, 100, "linear", "")]
    );
    dm.create("v2", None).unwrap();
    let list = dm.list().unwrap();
    assert_eq!(
        list.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["v1", "v2"]
    );
    assert_eq!(list[0].1, info.dev);
    assert_eq!(
        dm.message("v1", 0, "ping").unwrap().as_deref(),
        Some("pong")
    );
    dm.remove("v1").unwrap();
    dm.remove("v2").unwrap();
    assert_eq!(dm.list().unwrap(), vec![]);
}

#[test]
fn errnos_become_errors_that_name_the_device() {
    let (dm, k) = fake();
    let e = dm.info("nope").unwrap_err();
    assert!(
        matches!(
            e,
            DmError::NoSuchDevice {
                op: "DM_DEV_STATUS",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("\"nope\""), "{e}");
    dm.create("d", None).unwrap();
    let e = dm.create("d", None).unwrap_err();
    assert!(matches!(e, DmError::NameInUse { .. }), "{e}");
    k.state
        .lock()
        .unwrap()
        .devs
        .get_mut("d")
        .unwrap()
        .open_count = 1;
    let e = dm.remove("d").unwrap_err();
    assert!(matches!(e, DmError::Busy { .. }), "{e}");
    assert_eq!(e.raw_os_error(), Some(libc::EBUSY));
    let e = dm
        .load_table("d", &[Target::new(0, 8, "bogus", "")])
        .unwrap_err();
    assert!(matches!(e, DmError::InvalidTable { .. }), "{e}");
    assert!(e.to_string().contains("0 8 bogus"), "{e}");
    k.fail_next(Cmd::DevStatus, libc::EPERM);
    let e = dm.info("d").unwrap_err();
    assert!(
        matches!(
            e,
            DmError::Ioctl {
                op: "DM_DEV_STATUS",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_full_reply_buffer_is_retried_larger() {
    let (dm, k) = fake();
    // ~40 KiB of table text: does not fit in the first 16 KiB buffer
    let t: Vec<Target> = (0..400)
        .map(|i| Target::new(i * 8, 8, "linear", format!("7:0 {i:>80}")))
        .collect();
    dm.create_with_table("big", None, &t).unwrap();
    k.clear_calls();
    assert_eq!(dm.table("big").unwrap(), t);
    let sizes: Vec<usize> = k
        .calls()
        .iter()
        .filter(|c| c.0 == Cmd::TableStatus)
        .map(|c| c.1)
        .collect();
    assert_eq!(sizes, [FIRST_REPLY, 2 * FIRST_REPLY, 4 * FIRST_REPLY]);

    k.state.lock().unwrap().always_full = true;
    let e = dm.list().unwrap_err();
    assert!(
        matches!(
            e,
            DmError::ReplyTooLarge {
                limit: MAX_REPLY,
                ..
            }
        ),
        "{e}"
    );
}

fn two_tables() -> (Vec<Target>, Vec<Target>) {
    (
        vec![Target::linear(0, 100, DevNum::new(7, 0), 0)],
        vec![Target::linear(0, 100, DevNum::new(43, 0), 0)],
    )
}

fn assert_live(k: &FakeKernel, name: &str, table: &[Target]) {
    let s = k.state.lock().unwrap();
    let d = &s.devs[name];
    assert_eq!(d.active.as_deref(), Some(table));
    assert!(!d.suspended, "left suspended");
    assert!(d.inactive.is_none(), "left an inactive table");
}

#[test]
fn reload_preserving_swaps_the_table() {
    let (dm, k) = fake();
    let (old, new) = two_tables();
    dm.create_with_table("v", None, &old).unwrap();
    k.clear_calls();
    dm.reload_preserving("v", &new).unwrap();
    assert_live(&k, "v", &new);
    let cmds: Vec<Cmd> = k.calls().iter().map(|c| c.0).collect();
    assert_eq!(
        cmds,
        [
            Cmd::DevStatus,
            Cmd::TableStatus,
            Cmd::TableLoad,
            Cmd::DevSuspend,
            Cmd::DevSuspend
        ]
    );
}

#[test]
fn reload_preserving_refused_table_changes_nothing() {
    let (dm, k) = fake();
    let (old, _) = two_tables();
    dm.create_with_table("v", None, &old).unwrap();
    let e = dm
        .reload_preserving("v", &[Target::new(0, 8, "bogus", "")])
        .unwrap_err();
    assert!(matches!(e, DmError::InvalidTable { .. }), "{e}");
    assert_live(&k, "v", &old);
    assert_eq!(k.state.lock().unwrap().suspends, 0, "never suspended");
}

#[test]
fn reload_preserving_restores_when_the_swap_fails() {
    let (dm, k) = fake();
    let (old, new) = two_tables();
    dm.create_with_table("v", None, &old).unwrap();
    k.state.lock().unwrap().refuse_swap = true;
    let e = dm.reload_preserving("v", &new).unwrap_err();
    assert!(matches!(e, DmError::InvalidTable { .. }), "{e}");
    assert_live(&k, "v", &old);
}

#[test]
fn reload_preserving_restores_when_resume_fails_after_the_swap() {
    // the new table went live but the device stayed suspended (e.g. a target's preresume
    // failed): the old table is loaded again and the device resumed
    let (dm, k) = fake();
    let (old, new) = two_tables();
    dm.create_with_table("v", None, &old).unwrap();
    k.state.lock().unwrap().fail_resume_after_swap = 1;
    let e = dm.reload_preserving("v", &new).unwrap_err();
    assert!(e.to_string().contains("DM_DEV_SUSPEND"), "{e}");
    assert_live(&k, "v", &old);
}

#[test]
fn reload_preserving_clears_the_new_table_when_suspend_fails() {
    let (dm, k) = fake();
    let (old, new) = two_tables();
    dm.create_with_table("v", None, &old).unwrap();
    k.fail_next(Cmd::DevSuspend, libc::EINTR);
    let e = dm.reload_preserving("v", &new).unwrap_err();
    assert!(
        matches!(
            e,
            DmError::Ioctl {
                op: "DM_DEV_SUSPEND",
                ..
            }
        ),
        "{e}"
    );
    assert_live(&k, "v", &old);
}

#[test]
fn reload_preserving_reports_a_failed_rollback() {
    let (dm, k) = fake();
    let (old, new) = two_tables();
    dm.create_with_table("v", None, &old).unwrap();
    k.state.lock().unwrap().fail_resume_after_swap = 2; // the restoring resume fails too
    let e = dm.reload_preserving("v", &new).unwrap_err();
    assert!(matches!(e, DmError::RollbackFailed { .. }), "{e}");
    assert!(e.to_string().contains("\"v\""), "{e}");
}

// ------------------------------------------------------------------ the fake kernel

#[derive(Default)]
struct FakeDev {
    dev: DevNum,
    uuid: String,
    active: Option<Vec<Target>>,
    inactive: Option<Vec<Target>>,
    suspended: bool,
    open_count: i32,
}

impl Default for DevNum {
    fn default() -> Self {
        DevNum::new(0, 0)
    }
}

#[derive(Default)]
struct State {
    devs: BTreeMap<String, FakeDev>,
    next_minor: u32,
    calls: Vec<(Cmd, usize)>,
    fail: Vec<(Cmd, i32)>,
    always_full: bool,
    refuse_swap: bool,
    fail_resume_after_swap: u32,
    suspends: u32,
}

#[derive(Clone, Default)]
struct FakeKernel {
    state: Arc<Mutex<State>>,
}

impl FakeKernel {
    fn calls(&self) -> Vec<(Cmd, usize)> {
        self.state.lock().unwrap().calls.clone()
    }
    fn clear_calls(&self) {
        self.state.lock().unwrap().calls.clear();
    }
    fn fail_next(&self, cmd: Cmd, errno: i32) {
        self.state.lock().unwrap().fail.push((cmd, errno));
    }
}

fn fake() -> (DmControl, FakeKernel) {
    let k = FakeKernel::default();
    (DmControl::with_transport(Box::new(k.clone())), k)
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// Parses a DM_TABLE_LOAD payload the way the kernel does: `next` is relative to the spec.
fn fake_parse_load(p: &[u8], count: u32) -> io::Result<Vec<Target>> {
    let mut out = Vec::new();
    let mut off = 0;
    for _ in 0..count {
        if off + TARGET_SPEC_SIZE > p.len() || off % 8 != 0 {
            return Err(errno(libc::EINVAL));
        }
        let params = wire::get_cstr(p, off + TARGET_SPEC_SIZE, p.len() - off - TARGET_SPEC_SIZE);
        if !p[off + TARGET_SPEC_SIZE..].contains(&0) {
            return Err(errno(libc::EINVAL));
        }
        out.push(Target {
            start: wire::get_u64(p, off),
            len: wire::get_u64(p, off + 8),
            target_type: wire::get_cstr(p, off + 24, 16),
            params,
        });
        off += wire::get_u32(p, off + 20) as usize;
    }
    Ok(out)
}

/// A status result area the way `retrieve_status` writes it: `next` from the area start.
fn fake_status_area(targets: &[Target]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in targets {
        let at = out.len();
        out.resize(at + wire::align8(TARGET_SPEC_SIZE + t.params.len() + 1), 0);
        wire::put_u64(&mut out, at, t.start);
        wire::put_u64(&mut out, at + 8, t.len);
        wire::put_cstr(&mut out, at + 24, 16, &t.target_type);
        out[at + TARGET_SPEC_SIZE..at + TARGET_SPEC_SIZE + t.params.len()]
            .copy_from_slice(t.params.as_bytes());
        let next = out.len() as u32;
        wire::put_u32(&mut out, at + 20, next);
    }
    out
}

/// A `struct dm_name_list` chain, with the event_nr/flags words newer kernels append.
fn fake_name_list(devs: &[(String, DevNum)]) -> Vec<u8> {
    let mut out = vec![0u8; 16];
    let mut prev: Option<usize> = None;
    for (name, dev) in devs {
        let at = prev.map_or(0, |_| out.len());
        out.resize(at + wire::align8(12 + name.len() + 1) + 8, 0);
        wire::put_u64(&mut out, at, dev.to_kernel());
        wire::put_cstr(&mut out, at + 12, name.len() + 1, name);
        if let Some(p) = prev {
            wire::put_u32(&mut out, p + 8, (at - p) as u32);
        }
        prev = Some(at);
    }
    out
}

impl Transport for FakeKernel {
    fn ioctl(&self, cmd: Cmd, buf: &mut [u8]) -> io::Result<()> {
        assert_eq!(Cmd::from_request(cmd.request()), Some(cmd));
        let mut h = wire::decode_header(buf);
        assert_eq!(h.version[0], 4);
        assert_eq!(h.data_size as usize, buf.len());
        assert_eq!(h.data_start as usize, DM_IOCTL_SIZE);
        let mut guard = self.state.lock().unwrap();
        let s = &mut *guard;
        s.calls.push((cmd, buf.len()));
        if let Some(i) = s.fail.iter().position(|f| f.0 == cmd) {
            return Err(errno(s.fail.remove(i).1));
        }
        let area_len = buf.len() - DM_IOCTL_SIZE;
        let mut reply: Option<Vec<u8>> = None;
        let in_flags = h.flags;
        h.flags = 0;
        match cmd {
            Cmd::Version => h.version = [4, 47, 0],
            Cmd::ListDevices => {
                let devs: Vec<(String, DevNum)> =
                    s.devs.iter().map(|(n, d)| (n.clone(), d.dev)).collect();
                reply = Some(fake_name_list(&devs));
            }
            Cmd::DevCreate => {
                if s.devs.contains_key(&h.name) {
                    return Err(errno(libc::EBUSY));
                }
                let dev = DevNum::new(254, s.next_minor);
                s.next_minor += 1;
                s.devs.insert(
                    h.name.clone(),
                    FakeDev {
                        dev,
                        uuid: h.uuid.clone(),
                        ..FakeDev::default()
                    },
                );
            }
            Cmd::TargetMsg => {
                s.devs.get(&h.name).ok_or_else(|| errno(libc::ENXIO))?;
                reply = Some(b"pong\0".to_vec());
                h.flags |= flags::DATA_OUT;
            }
            _ => {
                let d = s.devs.get_mut(&h.name).ok_or_else(|| errno(libc::ENXIO))?;
                match cmd {
                    Cmd::DevRemove => {
                        if d.open_count > 0 {
                            return Err(errno(libc::EBUSY));
                        }
                        s.devs.remove(&h.name);
                        wire::write_header(buf, &h);
                        return Ok(());
                    }
                    Cmd::DevSuspend if in_flags & flags::SUSPEND != 0 => {
                        d.suspended = true;
                        s.suspends += 1;
                    }
                    Cmd::DevSuspend => {
                        if let Some(new) = d.inactive.take() {
                            d.suspended = true;
                            if s.refuse_swap {
                                return Err(errno(libc::EINVAL));
                            }
                            d.active = Some(new);
                            if s.fail_resume_after_swap > 0 {
                                s.fail_resume_after_swap -= 1;
                                return Err(errno(libc::EIO));
                            }
                        }
                        d.suspended = false;
                    }
                    Cmd::DevStatus => {}
                    Cmd::TableLoad => {
                        let t = fake_parse_load(&buf[DM_IOCTL_SIZE..], h.target_count)?;
                        let known = ["linear", "error", "zero"];
                        if t.iter().any(|t| !known.contains(&t.target_type.as_str())) {
                            return Err(errno(libc::EINVAL));
                        }
                        d.inactive = Some(t);
                    }
                    Cmd::TableClear => d.inactive = None,
                    Cmd::TableStatus => {
                        let t = d.active.clone().unwrap_or_default();
                        h.target_count = t.len() as u32;
                        let shown: Vec<Target> = if in_flags & flags::STATUS_TABLE != 0 {
                            t
                        } else {
                            t.into_iter()
                                .map(|t| Target {
                                    params: String::new(),
                                    ..t
                                })
                                .collect()
                        };
                        reply = Some(fake_status_area(&shown));
                    }
                    _ => unreachable!(),
                }
            }
        }
        if let Some(d) = s.devs.get(&h.name) {
            h.dev = d.dev.to_kernel();
            h.uuid = d.uuid.clone();
            h.open_count = d.open_count;
            h.target_count = d.active.as_ref().map_or(0, |t| t.len() as u32);
            h.flags |= if d.suspended { flags::SUSPEND } else { 0 }
                | if d.active.is_some() {
                    flags::ACTIVE_PRESENT
                } else {
                    0
                }
                | if d.inactive.is_some() {
                    flags::INACTIVE_PRESENT
                } else {
                    0
                };
        }
        h.data_start = DM_IOCTL_SIZE as u32;
        h.data_size = DM_IOCTL_SIZE as u32;
        if let Some(r) = reply {
            if r.len() > area_len || s.always_full {
                h.flags |= flags::BUFFER_FULL;
            } else {
                buf[DM_IOCTL_SIZE..DM_IOCTL_SIZE + r.len()].copy_from_slice(&r);
                h.data_size = (DM_IOCTL_SIZE + r.len()) as u32;
            }
        }
        wire::write_header(buf, &h);
        Ok(())
    }
}

#[test]
fn the_raw_ioctl_refuses_a_header_larger_than_its_buffer() {
    use std::os::fd::AsFd;
    let null = std::fs::File::open("/dev/null").unwrap();
    let mut buf = wire::encode(&Header::default(), &[], 0);
    wire::put_u32(&mut buf, 12, 4096); // data_size beyond the 312-byte buffer
    let e = crate::sys::dm_ioctl(null.as_fd(), Cmd::Version.request(), &mut buf).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    let mut ok = wire::encode(&Header::default(), &[], 0);
    let e = crate::sys::dm_ioctl(null.as_fd(), 0x1234, &mut ok).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "not a DM request");
    let e = crate::sys::dm_ioctl(null.as_fd(), Cmd::Version.request(), &mut ok[..100]).unwrap_err();
    assert_eq!(
        e.kind(),
        io::ErrorKind::InvalidInput,
        "shorter than the header"
    );
}
