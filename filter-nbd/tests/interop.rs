//! Interop with third-party clients against an in-process server:
//! qemu-io / qemu-img (extended headers or structured replies, GO, meta
//! context, BLOCK_STATUS, FUA writes, zeroes, discards), libnbd's python
//! binding (GO with structured replies, EXPORT_NAME fallback with non-fixed
//! newstyle, LIST in option mode) and nbdinfo.
//!
//! Nothing is skipped: a missing tool fails the test with a pointer to
//! `scripts/setup`.

mod common;

use std::process::{Command, Output};

use common::*;
use filter_nbd::ServerOptions;

const SIZE: u64 = 64 << 20;

fn tool(name: &str, args: &[&str]) -> Output {
    match Command::new(name).args(args).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{name}` is not installed: run scripts/setup (qemu-utils, libnbd-bin, python3-libnbd)")
        }
        Err(e) => panic!("cannot run {name}: {e}"),
    }
}

fn ok(name: &str, args: &[&str]) -> String {
    let o = tool(name, args);
    let out = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{name} {args:?} failed: {out}");
    out
}

fn python_nbd(script: &str) -> String {
    let python = "/usr/bin/python3";
    if !std::path::Path::new(python).exists() {
        panic!("{python} missing: run scripts/setup");
    }
    let check = tool(python, &["-c", "import nbd"]);
    assert!(
        check.status.success(),
        "python3 libnbd binding missing (python3-libnbd): run scripts/setup"
    );
    ok(python, &["-c", script])
}

fn fixture() -> Fixture {
    let mut s = Spec::rw("vol", SIZE);
    s.fill = 0;
    let mut ro = Spec::rw("snap", 1 << 20);
    ro.read_only = true;
    ro.fill = 0x42;
    serve(vec![s, ro], ServerOptions::default())
}

#[test]
fn qemu_io_and_qemu_img() {
    let f = fixture();
    let uri = format!("nbd+unix:///vol?socket={}", f.sock.display());
    let out = ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "write -z 1M 1M",
            "-c",
            "write -P 0xcd 3M 4k",
            "-c",
            "discard 3M 4k",
            "-c",
            "read -P 0 3M 4k",
            "-c",
            "write -P 0x11 4M 32M",
            "-c",
            "flush",
            "-c",
            "read -P 0 1M 1M",
            "-c",
            "read -P 0x11 4M 32M",
        ],
    );
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io: {out}"
    );
    let data = read_file(&f.files[0]);
    assert!(data[..65536].iter().all(|&b| b == 0xab));
    assert!(data[4 << 20..36 << 20].iter().all(|&b| b == 0x11));
    // BLOCK_STATUS through qemu-img map: the data we wrote shows up as data.
    let map = ok("qemu-img", &["map", "--output=json", "-f", "raw", &uri]);
    assert!(
        map.contains("\"data\": true") && map.contains("\"data\": false"),
        "qemu-img map: {map}"
    );
    // Whole-image copy and compare (large WRITE_ZEROES from convert).
    let src = f.dir.path().join("src.img");
    let mut content = vec![0u8; SIZE as usize];
    for (i, b) in content.iter_mut().enumerate().step_by(4096) {
        *b = (i / 4096) as u8 | 1;
    }
    std::fs::write(&src, &content).unwrap();
    let src_s = src.to_str().unwrap();
    ok(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri],
    );
    let cmp = ok(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src_s, &uri],
    );
    assert!(cmp.contains("identical"), "{cmp}");
    // Read-only export: writes are refused.
    let ro_uri = format!("nbd+unix:///snap?socket={}", f.sock.display());
    let o = tool(
        "qemu-io",
        &["-r", "-f", "raw", &ro_uri, "-c", "read -P 0x42 0 4k"],
    );
    assert!(o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("failed"));
}

#[test]
fn libnbd_go_export_name_and_list() {
    let f = fixture();
    let sock = f.sock.display().to_string();
    // GO with structured replies and base:allocation.
    let out = python_nbd(&format!(
        r#"
import nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri("nbd+unix:///vol?socket={sock}")
assert h.get_structured_replies_negotiated()
assert h.can_meta_context("base:allocation")
assert h.can_multi_conn() and h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()
assert h.get_size() == {SIZE}
h.pwrite(b"\x77" * 8192, 4096, nbd.CMD_FLAG_FUA)
assert h.pread(8192, 4096) == b"\x77" * 8192
h.zero(1 << 20, 1 << 20)
h.trim(4096, 65536)
h.flush()
seen = []
h.block_status({SIZE}, 0, lambda ctx, off, ents, err: seen.append((ctx, list(ents))) or 0)
assert seen and seen[0][0] == "base:allocation", seen
try:
    h.pread(10, {SIZE} - 5)
    raise SystemExit("out of range read succeeded")
except nbd.Error:
    pass
h.shutdown()
print("go-ok")
"#
    ));
    assert!(out.contains("go-ok"), "{out}");
    // Non-fixed newstyle: libnbd falls back to NBD_OPT_EXPORT_NAME.
    let out = python_nbd(&format!(
        r#"
import nbd
h = nbd.NBD()
h.set_handshake_flags(0)
h.connect_uri("nbd+unix:///vol?socket={sock}")
assert h.get_protocol() == "newstyle", h.get_protocol()
assert not h.get_structured_replies_negotiated()
assert h.pread(8192, 4096) == b"\x77" * 8192
h.pwrite(b"\x01" * 512, 0)
h.shutdown()
print("export-name-ok")
"#
    ));
    assert!(out.contains("export-name-ok"), "{out}");
    // LIST in option mode.
    let out = python_nbd(&format!(
        r#"
import nbd
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri("nbd+unix://?socket={sock}")
names = []
h.opt_list(lambda name, desc: names.append(name) or 0)
assert names == ["vol", "snap"], names
h.opt_abort()
print("list-ok")
"#
    ));
    assert!(out.contains("list-ok"), "{out}");
    // nbdinfo: LIST, and INFO of the read-only export.
    let out = ok(
        "nbdinfo",
        &["--list", &format!("nbd+unix://?socket={sock}")],
    );
    assert!(
        out.contains("export=\"vol\"") && out.contains("export=\"snap\""),
        "{out}"
    );
    let out = ok("nbdinfo", &[&format!("nbd+unix:///snap?socket={sock}")]);
    assert!(
        out.contains("is_read_only: true") && out.contains("block_size_maximum: 33554432"),
        "{out}"
    );
}
