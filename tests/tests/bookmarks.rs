//! Bookmarks and filtering control through the admin socket of a running
//! `rewind export`: `rewind bookmark create` puts a tag record into the
//! volume's change log between the writes before and after it; the admin
//! socket is 0600 and refuses other users even when the file is opened up;
//! `drvutil --stop-filtering/--start-filtering` are visible in `drvutil --ps`.

use rewind_tests::*;
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

const SIZE: u64 = 16 * MIB;
const T: Duration = Duration::from_secs(120);

fn qemu_write(uri: &str, offset: u64, len: u64, byte: u8) {
    run_ok(
        tool("qemu-io").args([
            "-f",
            "raw",
            uri,
            "-c",
            &format!("write -P {byte:#04x} {offset} {len}"),
        ]),
        T,
    );
}

fn rewind() -> Command {
    Command::new(rewind_bin("rewind"))
}

fn json_of(o: &std::process::Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("invalid JSON ({e}):\n{}", text(o)))
}

fn start(s: &Scratch) -> Export {
    if server_kind() != ServerKind::Rewind {
        panic!("bookmark tests need `rewind export` (unset REWIND_TEST_SERVER)");
    }
    let backing = s.join("vol.img");
    create_sparse(&backing, SIZE);
    Export::start(s, &backing, ExportOpts::default())
}

#[test]
fn bookmark_create_tags_the_change_log_between_writes() {
    let s = Scratch::new("bm-one");
    let ex = start(&s);
    qemu_write(&ex.uri(), 0, 64 * KIB, 0x11);
    let o = run_ok(
        rewind()
            .args([
                "bookmark",
                "create",
                "before-upgrade",
                "--volume",
                &ex.volume,
            ])
            .arg("--shm-dir")
            .arg(&ex.shm_dir)
            .arg("--json"),
        T,
    );
    let b = json_of(&o);
    assert_eq!(b["name"], "before-upgrade");
    assert_eq!(b["type"], "user");
    let tag_seq = b["volumes"][0]["seq"].as_u64().expect("seq");
    assert_eq!(b["volumes"][0]["volume"], ex.volume.as_str());
    let hold = b["hold_us"].as_u64().expect("hold_us");
    assert!(hold < 1_000_000, "hold {hold} us over the default bound");
    qemu_write(&ex.uri(), MIB, 4 * KIB, 0x22);

    let log = ex.dump().expect("dump");
    let kinds: Vec<(u64, &str, u64)> = log
        .records
        .iter()
        .map(|r| (r.seq, r.kind.as_str(), r.offset))
        .collect();
    let tag = kinds
        .iter()
        .position(|&(seq, k, _)| k == "tag" && seq == tag_seq)
        .unwrap_or_else(|| panic!("tag seq {tag_seq} not in the ring: {kinds:?}"));
    assert!(
        kinds[..tag].iter().any(|&(_, k, o)| k == "data" && o == 0),
        "the write before the bookmark is not before the tag: {kinds:?}"
    );
    assert!(
        kinds[tag + 1..]
            .iter()
            .any(|&(_, k, o)| k == "data" && o == MIB),
        "the write after the bookmark is not after the tag: {kinds:?}"
    );
    assert_eq!(log.raw["stats"]["tags_inserted"], 1);

    // Text output and the agent's list.
    let o = run_ok(
        rewind()
            .args(["bookmark", "create", "second", "--type", "app"])
            .arg("--admin-socket")
            .arg(ex.admin_socket()),
        T,
    );
    assert!(text(&o).contains("bookmark \"second\""), "{}", text(&o));
    let o = run_ok(
        rewind()
            .args(["bookmark", "list", "--json"])
            .arg("--admin-socket")
            .arg(ex.admin_socket()),
        T,
    );
    let list = json_of(&o);
    let names: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|e| e["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, ["before-upgrade", "second"]);
    assert_eq!(list[1]["type"], "app");

    // Bad input: a clear error, nothing inserted.
    let o = run_fails(
        rewind()
            .args(["bookmark", "create", "x", "--volume", "nope"])
            .arg("--admin-socket")
            .arg(ex.admin_socket()),
        T,
    );
    assert!(text(&o).contains("no volume \"nope\""), "{}", text(&o));
    let o = run_fails(
        rewind()
            .args(["bookmark", "create", "", "--max-hold", "5"])
            .arg("--admin-socket")
            .arg(ex.admin_socket()),
        T,
    );
    assert!(text(&o).contains("NAME"), "{}", text(&o));
    let log = ex.dump().expect("dump");
    assert_eq!(log.raw["stats"]["tags_inserted"], 2);
    ex.stop();
}

#[test]
fn admin_socket_is_private_and_refuses_other_users() {
    let s = Scratch::new("bm-peer");
    let ex = start(&s);
    let sock = ex.admin_socket();
    let mode = std::fs::metadata(&sock)
        .expect("admin socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "admin socket mode {mode:o}");
    // Open the file and its directories up, so only the SO_PEERCRED check
    // stands between `nobody` and the agent.
    for d in [s.path(), ex.shm_dir.as_path()] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = run_fails(
        Command::new(require_tool("setpriv"))
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(rewind_bin("rewind"))
            .args(["bookmark", "create", "intruder"])
            .arg("--admin-socket")
            .arg(&sock),
        T,
    );
    assert!(
        text(&o).contains("permission denied: uid 65534"),
        "{}",
        text(&o)
    );
    assert!(
        ex.log_text()
            .contains("refused a request from an unauthorized user"),
        "refusal not logged:\n{}",
        ex.log_text()
    );
    let log = ex.dump().expect("dump");
    assert_eq!(
        log.raw["stats"]["tags_inserted"], 0,
        "a refused peer inserted a tag"
    );
    // Root still gets through.
    run_ok(
        rewind()
            .args(["bookmark", "create", "root-ok"])
            .arg("--admin-socket")
            .arg(&sock),
        T,
    );
    ex.stop();
    assert!(
        !sock.exists(),
        "admin socket left behind after a clean stop"
    );
}

fn drvutil_ps(ex: &Export) -> Value {
    let o = run_ok(
        Command::new(rewind_bin("drvutil"))
            .arg("--shm-dir")
            .arg(&ex.shm_dir)
            .arg("--state-dir")
            .arg(&ex.state_dir)
            .args(["--ps", &ex.volume, "--json"]),
        T,
    );
    json_of(&o)
}

fn drvutil_filtering(ex: &Export, flag: &str) -> std::process::Output {
    run_ok(
        Command::new(rewind_bin("drvutil"))
            .arg("--shm-dir")
            .arg(&ex.shm_dir)
            .arg("--state-dir")
            .arg(&ex.state_dir)
            .args([flag, &ex.volume]),
        T,
    )
}

#[test]
fn stop_and_start_filtering_through_drvutil() {
    let s = Scratch::new("bm-filter");
    let ex = start(&s);
    let before = drvutil_ps(&ex);
    assert_eq!(before["stats"]["filtering"], true);
    assert!(before["stats"]["resync_required"].is_null());

    let o = drvutil_filtering(&ex, "--stop-filtering");
    assert!(text(&o).contains("filtering stopped"), "{}", text(&o));
    assert!(text(&o).contains("resync required"), "{}", text(&o));
    let st = drvutil_ps(&ex);
    assert_eq!(st["stats"]["filtering"], false);
    assert_eq!(st["stats"]["capture_mode"], "bitmap");
    assert!(
        st["stats"]["resync_required"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("filtering was stopped")),
        "{st}"
    );
    assert!(
        st["stats"]["alerts"].as_array().is_some_and(|a| a
            .iter()
            .any(|x| x.as_str().unwrap_or("").contains("resync required"))),
        "{st}"
    );
    assert!(
        ex.state_dir
            .join(format!("{}.resync-required", ex.volume))
            .is_file(),
        "resync marker not persisted"
    );
    // I/O is still served while filtering is stopped; no exact bookmark exists.
    qemu_write(&ex.uri(), 2 * MIB, 8 * KIB, 0x33);
    let written = drvutil_ps(&ex)["stats"]["writes"].as_u64().unwrap();
    assert_eq!(written, 1);
    let o = run_fails(
        rewind()
            .args(["bookmark", "create", "while-stopped"])
            .arg("--admin-socket")
            .arg(ex.admin_socket()),
        T,
    );
    assert!(text(&o).contains("filtering is stopped"), "{}", text(&o));

    let o = drvutil_filtering(&ex, "--start-filtering");
    assert!(text(&o).contains("filtering started"), "{}", text(&o));
    let st = drvutil_ps(&ex);
    assert_eq!(st["stats"]["filtering"], true);
    assert!(
        !st["stats"]["resync_required"].is_null(),
        "the resync flag must survive --start-filtering: {st}"
    );
    assert_eq!(st["stats"]["transitions"]["filtering_stops"], 1);
    ex.stop();
}

/// `--pre`/`--post` hooks: the pre hook's own write to the volume (an
/// application flushing before the point) lands before the tag, the post hook
/// runs after it, both see the bookmark in their environment; a failing or
/// hanging pre hook fails the bookmark with no tag, and the post hook still runs.
#[test]
fn bookmark_hooks_run_around_the_tag_and_their_failures_leave_no_tag() {
    let s = Scratch::new("bm-hooks");
    let ex = start(&s);
    let trace = s.join("hooks.txt");
    let pre = format!(
        "qemu-io -f raw '{}' -c 'write -P 0x77 2M 4K' >/dev/null && echo \"$REWIND_HOOK_STAGE $REWIND_BOOKMARK $REWIND_BOOKMARK_TYPE $REWIND_VOLUMES\" >> {}",
        ex.uri(),
        trace.display()
    );
    let post = format!(
        "echo \"$REWIND_HOOK_STAGE $REWIND_BOOKMARK_UUID\" >> {}",
        trace.display()
    );
    let o = run_ok(
        rewind()
            .args(["bookmark", "create", "app-point", "--type", "app", "--json"])
            .args(["--pre", &pre, "--post", &post])
            .arg("--admin-socket")
            .arg(ex.admin_socket()),
        T,
    );
    let b = json_of(&o);
    assert_eq!(b["pre_hook"]["exit_code"], 0, "{b}");
    assert_eq!(b["post_hook"]["exit_code"], 0, "{b}");
    let uuid = b["uuid"].as_str().unwrap();
    let lines = std::fs::read_to_string(&trace).unwrap();
    assert_eq!(
        lines,
        format!("pre app-point app {}\npost {uuid}\n", ex.volume),
        "hook order/environment"
    );
    let tag_seq = b["volumes"][0]["seq"].as_u64().unwrap();
    let log = ex.dump().expect("dump");
    let pre_write = log
        .records
        .iter()
        .find(|r| r.kind == "data" && r.offset == 2 * MIB)
        .expect("the pre hook's write is recorded");
    assert!(
        pre_write.seq < tag_seq,
        "the pre hook's write is after the tag"
    );

    // A failing pre hook: no tag, post still runs, the message says why.
    std::fs::remove_file(&trace).unwrap();
    let o = run_fails(
        rewind()
            .args(["bookmark", "create", "bad-pre"])
            .args(["--pre", "echo frozen-not; exit 3", "--post", &post])
            .arg("--admin-socket")
            .arg(ex.admin_socket()),
        T,
    );
    assert!(
        text(&o).contains("pre hook") && text(&o).contains("exited with status 3: frozen-not"),
        "{}",
        text(&o)
    );
    assert!(
        std::fs::read_to_string(&trace)
            .unwrap()
            .starts_with("post "),
        "post hook did not run after a failed pre hook"
    );
    // A hanging pre hook is killed after --hook-timeout.
    let t0 = std::time::Instant::now();
    let o = run_fails(
        rewind()
            .args(["bookmark", "create", "slow-pre", "--hook-timeout", "1"])
            .args(["--pre", "sleep 30"])
            .arg("--admin-socket")
            .arg(ex.admin_socket()),
        T,
    );
    assert!(text(&o).contains("timed out"), "{}", text(&o));
    assert!(t0.elapsed() < Duration::from_secs(10));
    let log = ex.dump().expect("dump");
    assert_eq!(
        log.raw["stats"]["tags_inserted"], 1,
        "a failed bookmark inserted a tag"
    );
    ex.stop();
}
