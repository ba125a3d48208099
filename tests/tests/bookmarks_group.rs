//! Group bookmarks of `rewind agent` across three volumes under concurrent
//! causal writes, checked at the change-log level, and the hold bound with a
//! write stuck in the backing store.
//!
//! The same workload end to end: replicated by three `rewind replicator`
//! pairs to one `rewind target`, each bookmark materialized per volume with
//! `rewind snapshot materialize --bookmark` and checked the same way.
//!
//! Causal writer: for i = 1.., write i to volume x, wait for the ack, then to
//! y, then to z. A mutually consistent cut at a bookmark has, with `lx`,
//! `ly`, `lz` the last counter before the tag in each volume's record stream:
//! `lx >= ly >= lz >= lx - 1` (a write on one volume is never in the point
//! while a write acknowledged before it on another volume is missing).

use agent_core::{BatchKind, Consumer, RecordKind};
use rewind_tests::agent::{head, volume, Agent};
use rewind_tests::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

/// The last counter before each tag (by uuid) in `volume`'s record stream.
fn cut_points(shm: &std::path::Path, volume: &str) -> HashMap<[u8; 16], u64> {
    let mut c = Consumer::attach(shm.join(format!("{volume}.clog"))).expect("attach consumer");
    let mut last = 0u64;
    let mut out = HashMap::new();
    while let Some(b) = c.get(64 << 20).expect("get") {
        assert_eq!(
            b.kind(),
            BatchKind::Ring,
            "{volume}: the log fell into bitmap mode (ring too small?)"
        );
        for r in b.records() {
            match r.kind {
                RecordKind::Data => {
                    let n = u64::from_le_bytes(r.data[..8].try_into().unwrap());
                    assert!(n > last, "{volume}: counter went back from {last} to {n}");
                    last = n;
                }
                RecordKind::Tag => {
                    out.insert(r.tag.as_ref().unwrap().uuid, last);
                }
                k => panic!("{volume}: unexpected record {k:?}"),
            }
        }
        c.commit(b).expect("commit");
    }
    out
}

const WRITER: &str = r#"
import nbd, struct, sys
n = int(sys.argv[1])
hs = []
for uri in sys.argv[2:]:
    h = nbd.NBD()
    h.connect_uri(uri)
    hs.append(h)
for i in range(1, n + 1):
    buf = struct.pack('<Q', i) * 512
    for h in hs:
        h.pwrite(buf, (i % 1024) * 4096)
for h in hs:
    h.shutdown()
print('wrote', n)
"#;

/// Starts the causal writer over `uris` and takes group bookmarks of `g`
/// until it ends; returns the bookmarks' JSON.
fn write_and_bookmark(agent: &Agent, uris: &[String], n: u64) -> Vec<Value> {
    let mut writer = python_nbd()
        .arg("-c")
        .arg(WRITER)
        .arg(n.to_string())
        .args(uris)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut taken: Vec<Value> = Vec::new();
    let t0 = Instant::now();
    while writer.try_wait().unwrap().is_none() {
        assert!(t0.elapsed() < Duration::from_secs(240), "writer too slow");
        let o = run_ok(
            Command::new(rewind_bin("rewind"))
                .args([
                    "bookmark",
                    "create",
                    &format!("b{}", taken.len()),
                    "--group",
                    "g",
                    "--json",
                ])
                .arg("--admin-socket")
                .arg(&agent.admin),
            T,
        );
        taken.push(serde_json::from_slice(&o.stdout).unwrap());
        std::thread::sleep(Duration::from_millis(20));
    }
    let wo = writer.wait_with_output().unwrap();
    assert!(wo.status.success(), "writer failed: {}", text(&wo));
    taken
}

/// `lx >= ly >= lz >= lx - 1`.
fn assert_consistent(name: &Value, l: &[u64]) {
    let (lx, ly, lz) = (l[0], l[1], l[2]);
    assert!(
        lx >= ly && ly >= lz && lz + 1 >= lx,
        "bookmark {name} is not mutually consistent: x={lx} y={ly} z={lz}"
    );
}

#[test]
fn replication_group_bookmarks_recover_mutually_consistent() {
    use rewind_tests::replication::*;
    let s = Scratch::new("bm-group-e2e");
    let cfg = format!(
        "{}consistency_interval = \"off\"\n[[group]]\nname = \"g\"\n{}{}{}",
        head(&s).replace("memory_budget = \"16M\"", "memory_budget = \"96M\""),
        volume(&s, "x", Some("g")),
        volume(&s, "y", Some("g")),
        volume(&s, "z", Some("g"))
    );
    let agent = Agent::start(&s, &cfg);
    // A change on every volume first (outside the counter slots), so even a
    // bookmark taken before the writer's first write is a recovery point.
    for v in ["x", "y", "z"] {
        run_ok(
            tool("qemu-io").args([
                "-f",
                "raw",
                &format!(
                    "nbd+unix:///{v}?socket={}",
                    s.join(&format!("{v}.sock")).display()
                ),
                "-c",
                "write -P 0xff 7M 4K",
            ]),
            T,
        );
    }
    let target = Target::start(&s, TargetOpts::insecure());
    let reps: Vec<Replicator> = ["x", "y", "z"]
        .iter()
        .map(|v| {
            Replicator::start(
                &s,
                target.addr,
                ReplicatorOpts::insecure(v, &s.join(&format!("{v}.img")), &s.join("shm"), "off"),
            )
        })
        .collect();
    for r in &reps {
        wait_drained(r, &target, Duration::from_secs(120));
    }
    let uri = |v: &str| {
        format!(
            "nbd+unix:///{v}?socket={}",
            s.join(&format!("{v}.sock")).display()
        )
    };
    // n <= 1024: every counter has its own slot, the image shows the last one.
    let n = 1000;
    let taken = write_and_bookmark(&agent, &[uri("x"), uri("y"), uri("z")], n);
    assert!(
        taken.len() >= 3,
        "only {} bookmarks during the run",
        taken.len()
    );
    let mut holds: Vec<u64> = taken
        .iter()
        .map(|b| b["hold_us"].as_u64().unwrap())
        .collect();
    holds.sort_unstable();
    eprintln!(
        "group bookmark hold over 3 volumes under causal writes: n={} min={} us median={} us max={} us",
        holds.len(),
        holds[0],
        holds[holds.len() / 2],
        holds[holds.len() - 1]
    );
    for r in &reps {
        wait_drained(r, &target, Duration::from_secs(120));
    }
    let sd = target.state_dir.to_str().unwrap().to_string();
    let step = (taken.len() / 6).max(1);
    let mut inside = 0;
    for b in taken.iter().step_by(step) {
        let name = b["name"].as_str().unwrap();
        let mut l = Vec::new();
        for v in ["x", "y", "z"] {
            let out = s.join(&format!("m-{v}.raw"));
            run_ok(
                Command::new(rewind_bin("rewind"))
                    .args([
                        "snapshot",
                        "materialize",
                        "--volume",
                        v,
                        "--bookmark",
                        name,
                        "--out",
                    ])
                    .arg(&out)
                    .args(["--state-dir", &sd]),
                T,
            );
            let img = std::fs::read(&out).unwrap();
            let last = (0..1024)
                .map(|slot| {
                    u64::from_le_bytes(img[slot * 4096..slot * 4096 + 8].try_into().unwrap())
                })
                .max()
                .unwrap();
            l.push(last);
        }
        assert_consistent(&b["name"], &l);
        if l[0] > 0 && l[0] < n {
            inside += 1;
        }
    }
    assert!(
        inside >= 1,
        "no recovered bookmark fell inside the write run"
    );
    agent.stop();
}

#[test]
fn group_bookmarks_are_mutually_consistent_under_causal_writes() {
    let s = Scratch::new("bm-group");
    let cfg = format!(
        "{}consistency_interval = \"off\"\n[[group]]\nname = \"g\"\n{}{}{}",
        head(&s).replace("memory_budget = \"16M\"", "memory_budget = \"96M\""),
        volume(&s, "x", Some("g")),
        volume(&s, "y", Some("g")),
        volume(&s, "z", Some("g"))
    );
    // Stretch the gap between tag insertions: writes must stay held across it.
    let agent = Agent::start_with_env(&s, &cfg, &[("REWIND_TEST_TAG_GAP_US", "3000")]);
    let uri = |v: &str| {
        format!(
            "nbd+unix:///{v}?socket={}",
            s.join(&format!("{v}.sock")).display()
        )
    };
    let n = 3000;
    let taken = write_and_bookmark(&agent, &[uri("x"), uri("y"), uri("z")], n);
    assert!(
        taken.len() >= 5,
        "only {} bookmarks during the run",
        taken.len()
    );

    let points: BTreeMap<&str, HashMap<[u8; 16], u64>> = ["x", "y", "z"]
        .into_iter()
        .map(|v| (v, cut_points(&s.join("shm"), v)))
        .collect();
    let mut inside = 0;
    for b in &taken {
        let uuid = *uuid_bytes(b["uuid"].as_str().unwrap());
        let hold = b["hold_us"].as_u64().unwrap();
        assert!(
            hold >= 6000,
            "hold {hold} us shorter than the two injected gaps"
        );
        let l: Vec<u64> = ["x", "y", "z"]
            .iter()
            .map(|v| {
                *points[v]
                    .get(&uuid)
                    .unwrap_or_else(|| panic!("bookmark {} missing in {v}", b["name"]))
            })
            .collect();
        assert_consistent(&b["name"], &l);
        if l[0] > 0 && l[0] < n {
            inside += 1;
        }
    }
    assert!(
        inside >= 3,
        "too few bookmarks fell inside the write run ({inside})"
    );
    agent.stop();
}

fn uuid_bytes(s: &str) -> Box<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let mut out = [0u8; 16];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    Box::new(out)
}

/// A write stuck in the backing store (nbdkit's delay filter under nbdfuse)
/// makes a bookmark fail within its bound; writes go on meanwhile and after.
#[test]
fn fs_stuck_write_bounds_the_bookmark_hold() {
    let _l = fs_lock();
    let s = Scratch::new("bm-stuck");
    let mnt = s.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let nbdkit_sock = s.join("kit.sock");
    let mut kit = Command::new(require_tool("nbdkit"))
        .args(["--foreground", "--exit-with-parent", "-U"])
        .arg(&nbdkit_sock)
        .args(["--filter=delay", "memory", "8M", "wdelay=3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !nbdkit_sock.exists() {
        assert!(Instant::now() < deadline, "nbdkit did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut fuse = Command::new(require_tool("nbdfuse"))
        .arg(&mnt)
        .arg("--unix")
        .arg(&nbdkit_sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let slow = mnt.join("nbd");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&slow).map(|m| m.len()).unwrap_or(0) == 0 {
        assert!(Instant::now() < deadline, "nbdfuse did not mount");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _mounted = Mounted {
        kit: &mut kit,
        fuse: &mut fuse,
        mnt: mnt.clone(),
    };

    let cfg = format!(
        "{}consistency_interval = \"off\"\n[[group]]\nname = \"g\"\n{}\n[[volume]]\nname = \"slow\"\nbacking = \"{}\"\nlisten = \"unix:{}\"\ngroup = \"g\"\n",
        head(&s),
        volume(&s, "fast", Some("g")),
        slow.display(),
        s.join("slow.sock").display()
    );
    let agent = Agent::start(&s, &cfg);
    let slow_uri = format!("nbd+unix:///slow?socket={}", s.join("slow.sock").display());
    let fast_uri = format!("nbd+unix:///fast?socket={}", s.join("fast.sock").display());
    // One write into the slow volume: in flight for ~3 s.
    let stuck = Command::new(require_tool("qemu-io"))
        .args(["-f", "raw", &slow_uri, "-c", "write -P 0x44 0 4096"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    let o = run_fails(
        Command::new(rewind_bin("rewind"))
            .args([
                "bookmark",
                "create",
                "held",
                "--group",
                "g",
                "--max-hold",
                "300",
            ])
            .arg("--admin-socket")
            .arg(&agent.admin),
        T,
    );
    let took = t0.elapsed();
    let msg = text(&o);
    assert!(
        msg.contains("writes held longer than the bound of 300 ms")
            && msg.contains("no tag inserted"),
        "{msg}"
    );
    assert!(
        took < Duration::from_millis(2000),
        "bookmark failed only after {took:?}"
    );
    // Writes resumed at once on the other volume of the group.
    let t1 = Instant::now();
    run_ok(
        tool("qemu-io").args(["-f", "raw", &fast_uri, "-c", "write -P 0x55 0 4096"]),
        T,
    );
    assert!(
        t1.elapsed() < Duration::from_secs(2),
        "fast volume still held"
    );
    // The stuck write completes, and later writes to the slow volume too.
    let st = stuck.wait_with_output().unwrap();
    assert!(st.status.success());
    run_ok(
        tool("qemu-io").args(["-f", "raw", &slow_uri, "-c", "write -P 0x66 4096 4096"]),
        T,
    );
    // Nothing tagged; the failure is in the history; a later bookmark works.
    let o = run_ok(
        Command::new(rewind_bin("rewind"))
            .args(["bookmark", "list", "--json"])
            .arg("--admin-socket")
            .arg(&agent.admin),
        T,
    );
    let h: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(h[0]["ok"], false);
    assert_eq!(h[0]["volumes"], serde_json::json!([]));
    for v in ["fast", "slow"] {
        let o = run_ok(
            Command::new(rewind_bin("drvutil"))
                .arg("--shm-dir")
                .arg(s.join("shm"))
                .args(["--ps", v, "--json"]),
            T,
        );
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["stats"]["tags_inserted"], 0, "{v}");
    }
    let o = run_ok(
        Command::new(rewind_bin("rewind"))
            .args([
                "bookmark",
                "create",
                "after",
                "--group",
                "g",
                "--json",
                "--max-hold",
                "5000",
            ])
            .arg("--admin-socket")
            .arg(&agent.admin),
        T,
    );
    let b: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(b["volumes"].as_array().unwrap().len(), 2);
    agent.stop();
}

/// Unmounts nbdfuse and stops it and nbdkit (also when the test panics).
struct Mounted<'a> {
    kit: &'a mut std::process::Child,
    fuse: &'a mut std::process::Child,
    mnt: std::path::PathBuf,
}

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.mnt)
            .status();
        let _ = self.fuse.kill();
        let _ = self.fuse.wait();
        let _ = self.kit.kill();
        let _ = self.kit.wait();
    }
}
