//! Scripted edge cases through libnbd's python binding: pread/pwrite (with
//! and without FUA), flush, trim, zero (incl. one WRITE_ZEROES of 40 MiB, far
//! beyond the 32 MiB maximum), block_status, out-of-range requests that must
//! fail without hurting the connection, and exact change-log accounting.

use rewind_tests::*;
use serde_json::json;
use std::time::Duration;

const SIZE: u64 = 96 * MIB;
const T: Duration = Duration::from_secs(120);

/// Executes `ops` (JSON list) in order, then checks `runs` by pread, then the
/// edge cases. Strict mode is off so that bad requests reach the server.
const SCRIPT: &str = r#"
import errno, json, sys
import nbd

uri, ops, runs, size = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
assert h.get_size() == size, h.get_size()
for f in ("can_fua", "can_flush", "can_trim", "can_zero", "can_multi_conn"):
    assert getattr(h, f)(), f
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.set_strict_mode(0)

def pattern(b, n):
    return bytes([b]) * n

for op in ops:
    k = op["op"]
    if k == "pwrite":
        h.pwrite(pattern(op["byte"], op["len"]), op["off"], nbd.CMD_FLAG_FUA if op.get("fua") else 0)
    elif k == "zero":
        h.zero(op["len"], op["off"], nbd.CMD_FLAG_FUA if op.get("fua") else 0)
    elif k == "trim":
        h.trim(op["len"], op["off"])
    elif k == "flush":
        h.flush()
    else:
        raise Exception("unknown op " + k)

# read back on a second connection (multi-conn: flushed data is visible)
h2 = nbd.NBD()
h2.connect_uri(uri)
for off, n, b in runs:
    pos = off
    while pos < off + n:
        c = min(4 << 20, off + n - pos)
        got = h2.pread(c, pos)
        if got != pattern(b, c):
            bad = next(i for i in range(c) if got[i] != b)
            raise Exception("read-back mismatch at %d: %#x != %#x" % (pos + bad, got[bad], b))
        pos += c

# out-of-range requests: errors from the server, connection keeps working
def expect_err(what, fn, errnos):
    try:
        fn()
    except nbd.Error as e:
        en = e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), -1)
        assert en in errnos, "%s: errno %s (%s), wanted %s" % (what, e.errno, e, errnos)
        return
    raise Exception(what + ": succeeded, expected an error")

expect_err("read past end", lambda: h.pread(4096, size), (errno.EINVAL, errno.EOVERFLOW))
expect_err("read straddling end", lambda: h.pread(8192, size - 4096), (errno.EINVAL, errno.EOVERFLOW))
expect_err("write straddling end", lambda: h.pwrite(b"\xee" * 8192, size - 4096), (errno.EINVAL, errno.ENOSPC, errno.EOVERFLOW))
expect_err("zero past end", lambda: h.zero(65536, size), (errno.EINVAL, errno.ENOSPC, errno.EOVERFLOW))
expect_err("trim past end", lambda: h.trim(65536, size), (errno.EINVAL, errno.ENOSPC, errno.EOVERFLOW))
assert h.pread(4096, 0) == h2.pread(4096, 0), "handle broken after errors"
h.flush()

# block status over the whole export (base:allocation)
ext = []
def cb(meta, offset, entries, err):
    if meta == nbd.CONTEXT_BASE_ALLOCATION:
        for i in range(0, len(entries), 2):
            ext.append((entries[i], entries[i + 1]))
    return 0
pos = 0
while pos < size:
    before = len(ext)
    h.block_status(min(size - pos, 1 << 30), pos, cb)
    assert len(ext) > before, "no extents at %d" % pos
    pos += sum(l for l, _ in ext[before:])
assert pos == size, (pos, size)
print(json.dumps(ext))
h.shutdown()
h2.shutdown()
"#;

#[test]
fn libnbd_scripted_ops_and_edge_cases() {
    let s = Scratch::new("libnbd");
    // random data in [0, 16M) and [40M, 48M), holes elsewhere
    let data = RangeSet::from_extents([(0, 16 * MIB), (40 * MIB, 8 * MIB)]);
    let backing = s.join("vol.img");
    create_sparse_with_data(&backing, SIZE, &data, 77);
    let before = ImageCopy::capture(&s, &backing);
    let mut m = Model::from_copy(&before);
    let ex = Export::start(&s, &backing, ExportOpts::default());

    let mut ops = Vec::new();
    let pw = |m: &mut Model, off: u64, len: u64, byte: u8, fua: bool| {
        m.fill(off, len, byte);
        json!({"op": "pwrite", "off": off, "len": len, "byte": byte, "fua": fua})
    };
    ops.push(pw(&mut m, 0, 4 * KIB, 0xa1, false));
    ops.push(pw(&mut m, 4 * KIB, 4 * KIB, 0xa2, true));
    ops.push(pw(&mut m, 12345, 1000, 0xa3, true));
    ops.push(pw(&mut m, 2 * MIB - 1, 3, 0xa4, false));
    ops.push(pw(&mut m, 3 * MIB, 16 * MIB, 0xa5, false)); // 16 MiB in one request
    ops.push(json!({"op": "flush"}));
    ops.push(pw(&mut m, 64 * MIB + 7, 9 * KIB, 0xa6, true)); // into a hole
                                                             // one WRITE_ZEROES of 40 MiB over data and holes
    m.fill(36 * MIB, 40 * MIB, 0);
    ops.push(json!({"op": "zero", "off": 36 * MIB, "len": 40 * MIB}));
    m.fill(8 * MIB + 512, 1536, 0);
    ops.push(json!({"op": "zero", "off": 8 * MIB + 512, "len": 1536, "fua": true}));
    m.trim(10 * MIB, MIB);
    ops.push(json!({"op": "trim", "off": 10 * MIB, "len": MIB}));
    ops.push(json!({"op": "flush"}));
    let runs: Vec<_> = m
        .runs()
        .into_iter()
        .map(|(o, l, b)| json!([o, l, b]))
        .collect();

    let o = run_python(
        SCRIPT,
        &[
            &ex.uri(),
            &serde_json::to_string(&ops).unwrap(),
            &serde_json::to_string(&runs).unwrap(),
            &SIZE.to_string(),
        ],
        T,
    );
    let ext: Vec<(u64, u64)> = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("script output: {e}\n{}", text(&o)));
    // block status: the untouched tail [80M, 96M) was never allocated
    let mut pos = 0;
    let mut map = Vec::new();
    for (len, flags) in ext {
        map.push((pos, len, flags & 1 == 0));
        pos += len;
    }
    assert_allocation(
        &map,
        SIZE,
        &RangeSet::from_extents([(0, 8 * MIB), (14 * MIB, 4 * MIB)]),
        &RangeSet::from_extents([(80 * MIB, 16 * MIB)]),
    );
    m.assert_file_matches(&ex.backing);
    // the failed out-of-range write must not have touched the last block
    assert_changes_recorded(&ex, &before, Some(&m.written));
    ex.stop();
}

/// Command flags and degenerate requests: REQ_ONE block status, FAST_ZERO,
/// NO_HOLE, DF reads, zero-length requests (no-ops, nothing recorded),
/// block status past the end, CACHE when not advertised.
const FLAGS: &str = r#"
import errno, json, sys
import nbd
uri, size = sys.argv[1], int(sys.argv[2])
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
ext = []
def cb(meta, offset, entries, err):
    if meta == nbd.CONTEXT_BASE_ALLOCATION:
        ext.append(list(entries))
    return 0
h.block_status(size, 0, cb, nbd.CMD_FLAG_REQ_ONE)
assert len(ext) == 1 and len(ext[0]) == 2, "REQ_ONE returned %r" % ext
assert ext[0][0] <= size
h.set_strict_mode(0)
def err_of(fn):
    try:
        fn()
    except nbd.Error as e:
        return e.errno if isinstance(e.errno, int) else getattr(errno, str(e.errno), -1)
    return 0
assert err_of(lambda: h.block_status(4096, size, cb)) in (errno.EINVAL, errno.EOVERFLOW), "block status past end"
if not h.can_cache():
    assert err_of(lambda: h.cache(4096, 0)) != 0, "CACHE accepted although not advertised"
# zero-length requests: no-ops (or EINVAL), never a write
for fn in (lambda: h.pwrite(b"", 4096), lambda: h.zero(0, 8192), lambda: h.trim(0, 12288)):
    assert err_of(fn) in (0, errno.EINVAL)
r = err_of(lambda: h.zero(1 << 20, 1 << 20, nbd.CMD_FLAG_FAST_ZERO))
assert r in (0, errno.ENOTSUP, errno.EOPNOTSUPP), "FAST_ZERO: %s" % r
fast_ok = r == 0
h.zero(1 << 20, 3 << 20, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8192, 3 << 20, nbd.CMD_FLAG_DF) == bytes(8192)
assert h.pread(4096, 0) is not None
h.shutdown()
print(json.dumps({"fast_zero": fast_ok}))
"#;

#[test]
fn libnbd_flags_and_degenerate_requests() {
    let s = Scratch::new("libnbd-flags");
    let size = 8 * MIB;
    let backing = s.join("vol.img");
    create_random(&backing, size, 78);
    let before = ImageCopy::capture(&s, &backing);
    let mut m = Model::from_copy(&before);
    let ex = Export::start(&s, &backing, ExportOpts::default());
    let o = run_python(FLAGS, &[&ex.uri(), &size.to_string()], T);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    if v["fast_zero"] == true {
        m.fill(MIB, MIB, 0);
    }
    m.fill(3 * MIB, MIB, 0);
    m.assert_file_matches(&backing);
    assert_changes_recorded(&ex, &before, Some(&m.written));
    ex.stop();
}
