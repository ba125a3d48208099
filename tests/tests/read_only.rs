//! A `--read-only` export: every write-like request fails with EPERM from
//! the server (libnbd with client-side checks off), every write-like client
//! tool fails, the server survives, the backing file is unchanged and the
//! change log stays empty.

use rewind_tests::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);
const SIZE: u64 = 16 * MIB;

const SCRIPT: &str = r#"
import errno, sys
import nbd

uri, size = sys.argv[1], int(sys.argv[2])
# qemu-nbd (harness self-test mode only) answers EINVAL instead of EPERM
allowed = (errno.EPERM, errno.EINVAL) if sys.argv[3] == "qemu-nbd" else (errno.EPERM,)
h = nbd.NBD()
h.connect_uri(uri)
assert h.is_read_only(), "export not flagged read-only"
assert h.get_size() == size
h.set_strict_mode(0)   # send the requests anyway: the server must refuse them
def expect_eperm(what, fn):
    try:
        fn()
    except nbd.Error as e:
        en = e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), -1)
        assert en in allowed, "%s: %s, expected EPERM" % (what, e)
        return
    raise Exception(what + ": succeeded on a read-only export")
first = h.pread(4096, 0)
expect_eperm("pwrite", lambda: h.pwrite(b"\x55" * 4096, 0))
expect_eperm("pwrite FUA", lambda: h.pwrite(b"\x55" * 1024, 1537, nbd.CMD_FLAG_FUA))
expect_eperm("zero", lambda: h.zero(1 << 20, 1 << 20))
expect_eperm("zero 40M", lambda: h.zero(40 << 20 if size >= 40 << 20 else size, 0))
expect_eperm("trim", lambda: h.trim(1 << 20, 2 << 20))
assert h.pread(4096, 0) == first, "connection broken or data changed"
h.shutdown()
print("ok")
"#;

#[test]
fn read_only_export_refuses_all_writes() {
    let s = Scratch::new("ro");
    let backing = s.join("vol.img");
    create_random(&backing, SIZE, 21);
    let before = ImageCopy::capture(&s, &backing);
    let mut ex = Export::start(
        &s,
        &backing,
        ExportOpts {
            read_only: true,
            ..Default::default()
        },
    );
    let uri = ex.uri();

    let kind = match ex.kind {
        ServerKind::Rewind => "rewind",
        ServerKind::QemuNbd => "qemu-nbd",
    };
    let o = run_python(SCRIPT, &[&uri, &SIZE.to_string(), kind], T);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        "ok",
        "{}",
        text(&o)
    );

    // client tools that write must fail
    run_fails(
        tool("qemu-io").args(["-f", "raw", &uri, "-c", "write -P 0x55 0 4k"]),
        T,
    );
    let src = s.join("src.img");
    create_random(&src, SIZE, 22);
    run_fails(
        tool("qemu-img")
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(&src)
            .arg(&uri),
        T,
    );
    run_fails(tool("nbdcopy").arg(&src).arg(&uri), T);
    run_fails(
        tool("fio")
            .args(["--name=ro", "--ioengine=nbd", &format!("--uri={uri}")])
            .args(["--rw=randwrite", "--bs=4k", "--size=1m"]),
        T,
    );
    // reads still work and match the backing file
    let out = s.join("out.img");
    run_ok(tool("nbdcopy").arg(&uri).arg(&out), T);
    assert!(
        files_equal(&out, &before.path),
        "read-only export content differs"
    );

    ex.assert_alive();
    assert_nothing_recorded(&ex, &before);
    ex.stop();
}
