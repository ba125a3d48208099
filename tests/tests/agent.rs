//! `rewind agent --config agent.toml`: every class of bad configuration is
//! refused with a message naming the key and nothing starts (no admin
//! socket, no change log, no NBD socket); a valid file serves all volumes;
//! SIGHUP adds and removes volumes without disturbing a connection to a
//! running one, and an invalid reload changes nothing; periodic bookmarks.

use rewind_tests::agent::{head, volume, Agent};
use rewind_tests::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn nothing_started(s: &Scratch) {
    assert!(!s.join("admin.sock").exists(), "admin socket created");
    let clogs: Vec<_> = std::fs::read_dir(s.join("shm"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(clogs.is_empty(), "change logs created: {clogs:?}");
    for e in std::fs::read_dir(s.path()).unwrap().flatten() {
        assert!(
            !e.file_name().to_string_lossy().ends_with(".sock"),
            "socket created: {:?}",
            e.file_name()
        );
    }
}

#[test]
fn agent_config_errors_name_the_key_and_start_nothing() {
    let s = Scratch::new("agent-cfg");
    let good = format!("{}{}", head(&s), volume(&s, "a", None));
    // The valid file passes --check.
    std::fs::write(s.join("ok.toml"), &good).unwrap();
    let o = run_ok(
        Command::new(rewind_bin("rewind"))
            .args(["agent", "--check", "--config"])
            .arg(s.join("ok.toml")),
        T,
    );
    assert!(text(&o).contains("valid (1 volume(s)"), "{}", text(&o));
    nothing_started(&s);

    let a_img = s.join("a.img").display().to_string();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "missing key",
            good.replace(&format!("backing = \"{a_img}\"\n"), ""),
            "missing field `backing`",
        ),
        (
            "wrong type",
            good.replace("memory_budget = \"16M\"", "memory_budget = 16"),
            "memory_budget",
        ),
        (
            "unknown key",
            good.replace("name = \"a\"", "name = \"a\"\nbakcing = \"/x\""),
            "unknown field `bakcing`",
        ),
        (
            "bad size",
            good.replace("memory_budget = \"16M\"", "memory_budget = \"lots\""),
            "memory_budget: \"lots\"",
        ),
        (
            "bad block size",
            good.replace("name = \"a\"", "name = \"a\"\nblock_size = \"3K\""),
            "volume[0] (\"a\").block_size",
        ),
        (
            "budget too small",
            good.replace("memory_budget = \"16M\"", "memory_budget = \"512K\""),
            "memory_budget = \"512K\"",
        ),
        (
            "relative path",
            good.replace(&a_img, "a.img"),
            "volume[0] (\"a\").backing = \"a.img\": must be an absolute path",
        ),
        (
            "missing backing",
            good.replace(&a_img, "/nonexistent/a.img"),
            "volume[0] (\"a\").backing = \"/nonexistent/a.img\"",
        ),
        (
            "duplicate volume",
            format!("{good}{}", volume(&s, "a", None).replace(".sock", "2.sock")),
            "volume[1] (\"a\").name: \"a\" is configured twice",
        ),
        (
            "bad group reference",
            format!("{}{}", head(&s), volume(&s, "a", Some("nogroup"))),
            "volume[0] (\"a\").group = \"nogroup\": no [[group]]",
        ),
        (
            "bad listen address",
            good.replace("listen = \"unix:", "listen = \"udp:"),
            "volume[0] (\"a\").listen",
        ),
        (
            "non-loopback listen",
            good.replace(
                &format!("listen = \"unix:{}\"", s.join("a.sock").display()),
                "listen = \"tcp:10.1.2.3:10809\"",
            ),
            "only loopback addresses",
        ),
        (
            "shared listen socket",
            format!(
                "{good}{}",
                volume(&s, "b", None).replace("b.sock", "a.sock")
            ),
            "volume[1] (\"b\").listen",
        ),
        (
            "bad attach device",
            good.replace("name = \"a\"", "name = \"a\"\nattach = \"/dev/sda\""),
            "volume[0] (\"a\").attach = \"/dev/sda\": expected /dev/nbdN",
        ),
        (
            "bad interval",
            good.replace(
                "memory_budget",
                "consistency_interval = \"soon\"\nmemory_budget",
            ),
            "consistency_interval",
        ),
        (
            "bad max hold",
            good.replace("memory_budget", "max_hold_ms = 0\nmemory_budget"),
            "max_hold_ms = 0",
        ),
        (
            "relative admin socket",
            good.replace(&s.join("admin.sock").display().to_string(), "admin.sock"),
            "admin_socket = \"admin.sock\": must be an absolute path",
        ),
        (
            "bad volume name",
            good.replace("name = \"a\"", "name = \"../a\""),
            "volume[0].name",
        ),
        (
            "duplicate group",
            format!(
                "{}\n[[group]]\nname = \"g\"\n[[group]]\nname = \"g\"\n",
                good
            ),
            "group[1].name: \"g\" is configured twice",
        ),
        ("not TOML", "this is = = not toml".into(), "agent.toml"),
    ];
    for (what, text_, expect) in cases {
        let path = s.join("agent.toml");
        std::fs::write(&path, &text_).unwrap();
        let o = run_fails(
            Command::new(rewind_bin("rewind"))
                .args(["agent", "--config"])
                .arg(&path),
            T,
        );
        let msg = text(&o);
        assert!(
            msg.contains(expect),
            "{what}: expected {expect:?} in the error, got:\n{msg}"
        );
        nothing_started(&s);
    }
}

#[test]
fn agent_serves_all_volumes_and_sighup_adds_and_removes_without_disturbing() {
    let s = Scratch::new("agent-hup");
    let one = format!("{}{}", head(&s), volume(&s, "a", None));
    let agent = Agent::start(&s, &one);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&agent.admin).unwrap().permissions(),
    ) & 0o777;
    assert_eq!(mode, 0o600);
    let a_uri = format!("nbd+unix:///a?socket={}", s.join("a.sock").display());

    // A client connected to volume a across the reloads: it writes, waits,
    // writes again on the same connection and reads both back.
    let script = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b'\x11' * 65536, 0)
print('ready', flush=True)
sys.stdin.readline()
h.pwrite(b'\x22' * 65536, 1 << 20)
assert h.pread(65536, 0) == b'\x11' * 65536
assert h.pread(65536, 1 << 20) == b'\x22' * 65536
h.shutdown()
print('done', flush=True)
"#;
    let mut client = python_nbd()
        .arg("-c")
        .arg(script)
        .arg(&a_uri)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(client.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    // Add b and c (a group of two).
    let three = format!(
        "{}\n[[group]]\nname = \"g\"\n{}{}{}",
        head(&s),
        volume(&s, "a", None),
        volume(&s, "b", Some("g")),
        volume(&s, "c", Some("g"))
    );
    std::fs::write(&agent.config, &three).unwrap();
    agent.signal("HUP");
    let mut agent = agent;
    agent.wait_for(
        |a| a.log_text().matches("reload: volume added").count() == 2,
        "b and c added",
    );
    let names: Vec<String> = agent
        .volumes()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    run_ok(
        tool("qemu-io").args([
            "-f",
            "raw",
            &format!("nbd+unix:///b?socket={}", s.join("b.sock").display()),
            "-c",
            "write -P 0x33 0 4096",
        ]),
        T,
    );
    // A group bookmark over the new volumes.
    let o = run_ok(
        Command::new(rewind_bin("rewind"))
            .args([
                "bookmark",
                "create",
                "after-reload",
                "--group",
                "g",
                "--json",
            ])
            .arg("--admin-socket")
            .arg(&agent.admin),
        T,
    );
    let b: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(b["volumes"].as_array().unwrap().len(), 2, "{b}");

    // An invalid file changes nothing.
    std::fs::write(
        &agent.config,
        three.replace("name = \"c\"", "name = \"c\"\noops = 1"),
    )
    .unwrap();
    agent.signal("HUP");
    agent.wait_for(
        |a| a.log_text().contains("reload refused"),
        "reload refused",
    );
    assert_eq!(agent.volumes().as_array().unwrap().len(), 3);

    // Changing a live volume's backing is not applied, and says so.
    let moved = three.replace(
        &s.join("b.img").display().to_string(),
        &s.join("a.img").display().to_string(),
    );
    std::fs::write(&agent.config, &moved).unwrap();
    agent.signal("HUP");
    agent.wait_for(
        |a| a.log_text().contains("is not applied"),
        "not applied warning",
    );

    // Remove c.
    let two = format!(
        "{}\n[[group]]\nname = \"g\"\n{}{}",
        head(&s),
        volume(&s, "a", None),
        volume(&s, "b", Some("g"))
    );
    std::fs::write(&agent.config, &two).unwrap();
    agent.signal("HUP");
    agent.wait_for(|a| a.log_text().contains("volume stopped"), "c stopped");
    assert!(!s.join("c.sock").exists(), "c's socket left behind");
    assert_eq!(agent.volumes().as_array().unwrap().len(), 2);

    // The connection to a survived all of it.
    client.stdin.take().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        "done",
        "client on volume a failed after reloads"
    );
    assert!(client.wait().unwrap().success());
    agent.stop();
    assert!(!s.join("admin.sock").exists());
    // Each change log was closed cleanly.
    for v in ["a", "b"] {
        let o = run_ok(
            Command::new(rewind_bin("drvutil"))
                .arg("--shm-dir")
                .arg(s.join("shm"))
                .args(["--ps", v, "--json"]),
            T,
        );
        let r: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["stats"]["producer_state"], "clean-shutdown", "{v}: {r}");
    }
}

#[test]
fn agent_takes_periodic_bookmarks() {
    let s = Scratch::new("agent-periodic");
    let cfg = format!(
        "{}consistency_interval = \"off\"\n[[group]]\nname = \"g\"\nconsistency_interval = \"1s\"\n{}{}",
        head(&s),
        volume(&s, "p", Some("g")),
        volume(&s, "q", None)
    );
    let mut agent = Agent::start(&s, &cfg);
    let list = |a: &Agent| -> Vec<Value> {
        let o = run_ok(
            Command::new(rewind_bin("rewind"))
                .args(["bookmark", "list", "--json"])
                .arg("--admin-socket")
                .arg(&a.admin),
            T,
        );
        serde_json::from_slice::<Value>(&o.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    agent.wait_for(|a| list(a).len() >= 2, "two periodic bookmarks");
    let l = list(&agent);
    for e in &l {
        assert_eq!(e["periodic"], true, "{e}");
        assert_eq!(e["ok"], true, "{e}");
        assert!(
            e["name"].as_str().unwrap().starts_with("periodic-g-"),
            "{e}"
        );
        // Only the group's volume: q has consistency_interval = off.
        assert_eq!(e["requested"], serde_json::json!(["p"]), "{e}");
    }
    agent.stop();
}

/// The shipped example configuration is valid as is and once uncommented,
/// and the systemd unit passes `systemd-analyze verify`.
#[test]
fn agent_example_config_and_unit_are_valid() {
    let s = Scratch::new("agent-example");
    let example = workspace_root().join("scripts/systemd/agent.toml.example");
    let check = |p: &std::path::Path| {
        run_ok(
            Command::new(rewind_bin("rewind"))
                .args(["agent", "--check", "--config"])
                .arg(p),
            T,
        )
    };
    check(&example);
    create_sparse(&s.join("data.img"), 8 * MIB);
    let text_ = std::fs::read_to_string(&example).unwrap();
    let uncommented: String = text_
        .lines()
        .map(|l| {
            l.strip_prefix("# ")
                .filter(|r| !r.starts_with(' ') && r.contains(['=', '[']))
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace("/dev/vg0/data", &s.join("data.img").display().to_string());
    let p = s.join("agent.toml");
    std::fs::write(&p, &uncommented).unwrap();
    let o = check(&p);
    assert!(
        text(&o).contains("valid (1 volume(s), 1 group(s))"),
        "{}\n{uncommented}",
        text(&o)
    );
    if std::path::Path::new("/usr/bin/systemd-analyze").exists() {
        let unit =
            std::fs::read_to_string(workspace_root().join("scripts/systemd/rewind-agent.service"))
                .unwrap()
                .replace(
                    "/usr/local/bin/rewind",
                    &rewind_bin("rewind").display().to_string(),
                );
        let u = s.join("rewind-agent.service");
        std::fs::write(&u, unit).unwrap();
        let o = run(Command::new("systemd-analyze").arg("verify").arg(&u), T);
        assert!(
            o.status.success()
                && text(&o)
                    .trim()
                    .lines()
                    .all(|l| l.starts_with("---") || l.trim().is_empty()),
            "{}",
            text(&o)
        );
    }
}
