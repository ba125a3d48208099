//! Edge cases of the export as a whole: TCP on loopback, shutdown with a
//! client still connected (SIGTERM and SIGINT), an export whose size is not a
//! multiple of the tracking block, a 192 MiB WRITE_ZEROES (what qemu-img
//! sends) and a 100 MiB TRIM, and requests beyond the advertised maximum
//! size. Each ends with the change-log accounting check.

use rewind_tests::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

const T: Duration = Duration::from_secs(120);

/// Runs `ops` through libnbd (strict mode off) and prints one JSON result
/// per op: "ok", ["err", errno-name] or "closed" (connection lost; later ops
/// then run on a fresh connection).
const OPS: &str = r#"
import json, sys
import nbd
uri, ops = sys.argv[1], json.loads(sys.argv[2])
def conn():
    h = nbd.NBD()
    h.connect_uri(uri)
    h.set_strict_mode(0)
    return h
h = conn()
out = []
for op in ops:
    k = op["op"]
    try:
        if k == "pwrite":
            h.pwrite(bytes([op["byte"]]) * op["len"], op["off"], nbd.CMD_FLAG_FUA if op.get("fua") else 0)
        elif k == "zero":
            h.zero(op["len"], op["off"])
        elif k == "trim":
            h.trim(op["len"], op["off"])
        elif k == "pread":
            got = h.pread(op["len"], op["off"])
            if "byte" in op and got != bytes([op["byte"]]) * op["len"]:
                raise Exception("read mismatch at %d" % op["off"])
        elif k == "flush":
            h.flush()
        elif k == "size":
            assert h.get_size() == op["size"], h.get_size()
        out.append("ok")
    except nbd.Error as e:
        if not h.aio_is_ready() and not h.aio_is_processing():
            out.append("closed")
            h = conn()
        else:
            out.append(["err", str(e.errno)])
print(json.dumps(out))
"#;

fn ops(uri: &str, ops: &Value) -> Vec<Value> {
    let o = run_python(OPS, &[uri, &ops.to_string()], T);
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}\n{}", text(&o)))
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn tcp_loopback_export() {
    let s = Scratch::new("edge-tcp");
    let backing = s.join("vol.img");
    create_random(&backing, 16 * MIB, 51);
    let before = ImageCopy::capture(&s, &backing);
    let mut m = Model::from_copy(&before);
    let ex = Export::start(
        &s,
        &backing,
        ExportOpts {
            tcp_port: Some(free_port()),
            ..Default::default()
        },
    );
    assert!(ex.uri().starts_with("nbd://127.0.0.1:"));
    let mut c = tool("qemu-io");
    c.args(["-f", "raw", &ex.uri()]);
    for (o, l, b) in [
        (0u64, 4096u64, 0x31u8),
        (MIB + 7, 3000, 0x32),
        (4 * MIB, 4 * MIB, 0x33),
    ] {
        c.arg("-c").arg(format!("write -P {b:#04x} {o} {l}"));
        m.fill(o, l, b);
    }
    for (o, l, b) in m.runs() {
        c.arg("-c").arg(format!("read -P {b:#04x} {o} {l}"));
    }
    let out = run_ok(&mut c, T);
    assert!(!text(&out).contains("failed"), "{}", text(&out));
    m.assert_file_matches(&backing);
    assert_changes_recorded(&ex, &before, Some(&m.written));
    ex.stop();
}

fn shutdown_with_client(tag: &str, sig: &str) {
    let s = Scratch::new(tag);
    let backing = s.join("vol.img");
    create_random(&backing, 8 * MIB, 52);
    let before = ImageCopy::capture(&s, &backing);
    let ex = Export::start(&s, &backing, ExportOpts::default());
    // a client that wrote, then stays connected and idle
    let mut py = python_nbd();
    py.arg("-c")
        .arg(
            "import nbd, sys, time\n\
             h = nbd.NBD(); h.connect_uri(sys.argv[1])\n\
             h.pwrite(b'\\x77' * 8192, 4096, nbd.CMD_FLAG_FUA)\n\
             print('connected', flush=True)\n\
             time.sleep(60)\n",
        )
        .arg(ex.uri())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = py.spawn().expect("spawn python");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), "connected");
    assert_changes_recorded(&ex, &before, Some(&RangeSet::from_extents([(4096, 8192)])));
    let t0 = std::time::Instant::now();
    ex.stop_with(sig);
    let _ = child.kill();
    let _ = child.wait();
    assert!(t0.elapsed() < Duration::from_secs(15));
    assert_eq!(read_at(&backing, 4096, 8192), vec![0x77; 8192]);
}

#[test]
fn sigterm_with_idle_client_connected() {
    shutdown_with_client("edge-term", "TERM");
}

#[test]
fn sigint_with_idle_client_connected() {
    shutdown_with_client("edge-int", "INT");
}

#[test]
fn odd_sized_export_tail() {
    let s = Scratch::new("edge-odd");
    let size = 8 * MIB + 1537;
    let backing = s.join("vol.img");
    create_random(&backing, size, 53);
    let before = ImageCopy::capture(&s, &backing);
    let mut m = Model::from_copy(&before);
    let ex = Export::start(&s, &backing, ExportOpts::default());
    m.fill(size - 3000, 2900, 0);
    m.fill(size - 100, 100, 0xee);
    m.fill(8 * MIB - 10, 20, 0xdd);
    let r = ops(
        &ex.uri(),
        &serde_json::json!([
            {"op": "size", "size": size},
            {"op": "zero", "off": size - 3000, "len": 2900},
            {"op": "pwrite", "off": size - 100, "len": 100, "byte": 0xee, "fua": true},
            {"op": "pwrite", "off": 8 * MIB - 10, "len": 20, "byte": 0xdd},
            {"op": "pwrite", "off": size - 10, "len": 20, "byte": 0x11},
            {"op": "pread", "off": size - 100, "len": 100, "byte": 0xee},
            {"op": "pread", "off": size - 3000, "len": 8 * MIB - 10 - (size - 3000), "byte": 0},
            {"op": "flush"},
        ]),
    );
    let ok = Value::from("ok");
    for (i, x) in r.iter().enumerate() {
        if i == 4 {
            assert!(x.is_array(), "write across the end must fail: {r:?}");
        } else {
            assert_eq!(x, &ok, "op {i}: {r:?}");
        }
    }
    m.assert_file_matches(&backing);
    if let Some(log) = assert_changes_recorded(&ex, &before, Some(&m.written)) {
        // the last, partial tracking block is dirty
        assert!(
            log.covered()
                .contains_set(&RangeSet::from_extents([(size - 100, 100)])),
            "{}",
            log.summary()
        );
    }
    ex.stop();
}

#[test]
fn write_zeroes_192m_and_trim_100m() {
    let s = Scratch::new("edge-bigzero");
    let size = 256 * MIB;
    let data =
        RangeSet::from_extents([(10 * MIB, 10 * MIB), (150 * MIB, MIB), (230 * MIB, 2 * MIB)]);
    let backing = s.join("vol.img");
    create_sparse_with_data(&backing, size, &data, 54);
    let before = ImageCopy::capture(&s, &backing);
    let mut m = Model::from_copy(&before);
    let ex = Export::start(&s, &backing, ExportOpts::default());
    m.fill(8 * MIB, 192 * MIB, 0);
    m.trim(220 * MIB, 30 * MIB + 4096);
    let r = ops(
        &ex.uri(),
        &serde_json::json!([
            {"op": "zero", "off": 8 * MIB, "len": 192 * MIB},
            {"op": "trim", "off": 220 * MIB, "len": 30 * MIB + 4096},
            {"op": "pread", "off": 10 * MIB, "len": 4 * MIB, "byte": 0},
            {"op": "pread", "off": 150 * MIB, "len": MIB, "byte": 0},
            {"op": "flush"},
        ]),
    );
    assert!(r.iter().all(|x| x == "ok"), "{r:?}");
    m.assert_file_matches(&backing);
    assert_changes_recorded(&ex, &before, Some(&m.written));
    ex.stop();
}

#[test]
fn requests_beyond_maximum_size() {
    let s = Scratch::new("edge-oversize");
    let size = 128 * MIB;
    let backing = s.join("vol.img");
    create_random(&backing, size, 55);
    let before = ImageCopy::capture(&s, &backing);
    let mut m = Model::from_copy(&before);
    let ex = Export::start(&s, &backing, ExportOpts::default());
    // 48 MiB write and read (maximum advertised: 32 MiB): the server may
    // serve them or refuse them, but must not corrupt anything and must
    // keep serving (the connection, or at least new connections)
    let r = ops(
        &ex.uri(),
        &serde_json::json!([
            {"op": "pwrite", "off": 8 * MIB, "len": 48 * MIB, "byte": 0x5c},
            {"op": "pread", "off": 0, "len": 48 * MIB},
            {"op": "pwrite", "off": 100 * MIB, "len": 4096, "byte": 0x5d},
            {"op": "pread", "off": 100 * MIB, "len": 4096, "byte": 0x5d},
        ]),
    );
    eprintln!("oversized requests: {r:?}");
    if r[0] == "ok" {
        m.fill(8 * MIB, 48 * MIB, 0x5c);
    }
    m.fill(100 * MIB, 4096, 0x5d);
    assert_eq!(r[2], "ok", "{r:?}");
    assert_eq!(r[3], "ok", "{r:?}");
    m.assert_file_matches(&backing);
    assert_changes_recorded(&ex, &before, Some(&m.written));
    ex.stop();
}
