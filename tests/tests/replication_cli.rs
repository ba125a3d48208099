//! The admin surface of replication: `rewind pki` output and files, config
//! files (`target.toml`, `replicator.toml`) and their key-naming errors, a
//! replication run driven by config files, `rewind status` and `cdpcli`
//! human output with the seed's field names, `--help` examples.

use rewind_tests::replication::*;
use rewind_tests::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

fn rewind() -> Command {
    Command::new(rewind_bin("rewind"))
}

#[test]
fn replication_pki_cli() {
    let s = Scratch::new("repl-pki");
    let dir = s.join("pki");
    let o = run_ok(rewind().args(["pki", "init", "--dir"]).arg(&dir), T);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("ca.pem") && out.contains("ca.key"), "{out}");
    let mode = std::fs::metadata(dir.join("ca.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let o = run_fails(rewind().args(["pki", "init", "--dir"]).arg(&dir), T);
    assert!(text(&o).contains("already exists"), "{}", text(&o));
    let o = run_ok(
        rewind().args(["pki", "issue", "--dir"]).arg(&dir).args([
            "--host",
            "dr1.example",
            "--kind",
            "server",
        ]),
        T,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("dr1.example.pem")
            && out.contains("dr1.example.key")
            && out.contains("server"),
        "{out}"
    );
    let o = run_fails(
        rewind()
            .args(["pki", "issue", "--dir"])
            .arg(s.join("nothing"))
            .args(["--host", "x"]),
        T,
    );
    assert!(text(&o).contains("CA not usable"), "{}", text(&o));
    let o = run_fails(
        rewind()
            .args(["pki", "issue", "--dir"])
            .arg(&dir)
            .args(["--host", "bad/name"]),
        T,
    );
    assert!(text(&o).contains("invalid host name"), "{}", text(&o));
}

#[test]
fn replication_help_has_examples() {
    for args in [
        &["pki", "--help"][..],
        &["pki", "issue", "--help"],
        &["target", "--help"],
        &["replicator", "--help"],
        &["status", "--help"],
    ] {
        let o = run_ok(rewind().args(args), T);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.contains("Example"),
            "rewind {args:?} has no examples:\n{out}"
        );
    }
    let o = run_ok(Command::new(rewind_bin("cdpcli")).arg("--help"), T);
    assert!(String::from_utf8_lossy(&o.stdout).contains("--displaystatistics --vol=vol0"));
}

#[test]
fn replication_config_errors_name_the_key() {
    let s = Scratch::new("repl-cfg");
    let cases: [(&str, &str, &str); 6] = [
        (
            "target",
            "listen = \"127.0.0.1:0\"\n[tls]\ninsecure = true\n[[volume]]\nname = \"v\"\nreplica = \"/tmp/r\"\njournal_dir = \"/tmp/j\"\nspool_budget = \"lots\"\n",
            "volume[0].spool_budget",
        ),
        (
            "target",
            "listen = \"127.0.0.1:0\"\n[tls]\ninsecure = true\n[[volume]]\nname = \"v\"\nreplica = \"/tmp/r\"\njournal_dir = \"/tmp/j\"\nundo_compression = \"zstd:42\"\n",
            "volume[0].undo_compression",
        ),
        ("target", "listen = \"0.0.0.0:7700\"\n[tls]\ninsecure = true\n", "loopback only"),
        ("target", "lisen = \"127.0.0.1:0\"\n", "lisen"),
        (
            "replicator",
            "[target]\naddress = \"127.0.0.1:7700\"\n[tls]\ninsecure = true\n[[pair]]\nvolume = \"vol0\"\ndevice = \"/tmp/x\"\ncompression = \"lz4\"\n",
            "pair[0] (volume \"vol0\").compression",
        ),
        (
            "replicator",
            "[target]\naddress = \"127.0.0.1:7700\"\n[tls]\nca = \"/x/ca.pem\"\n[[pair]]\nvolume = \"vol0\"\ndevice = \"/tmp/x\"\n",
            "tls.cert is missing",
        ),
    ];
    for (i, (cmd, body, want)) in cases.iter().enumerate() {
        let f = s.join(&format!("c{i}.toml"));
        std::fs::write(&f, body).unwrap();
        let o = run_fails(
            rewind()
                .arg(cmd)
                .arg("--config")
                .arg(&f)
                .arg("--state-dir")
                .arg(s.join("st")),
            T,
        );
        assert!(
            text(&o).contains(want),
            "case {i}: expected {want:?} in:\n{}",
            text(&o)
        );
    }
}

/// Both daemons from config files, then `rewind status` and `cdpcli` text.
#[test]
fn replication_from_config_files() {
    let s = Scratch::new("repl-conf");
    let pki = Pki::new(&s, "pki");
    let backing = s.join("vol.img");
    create_random(&backing, 16 * MIB, 9);
    let export = Export::start(&s, &backing, ExportOpts::for_volume("vol0"));
    let p = pki.dir.display();
    let tstate = s.join("tstate");
    let ttoml = s.join("target.toml");
    std::fs::write(
        &ttoml,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n[tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/127.0.0.1.pem\"\nkey = \"{p}/127.0.0.1.key\"\nallowed_clients = [\"replicator\"]\n\
             [[volume]]\nname = \"vol0\"\nreplica = \"{}\"\njournal_dir = \"{}\"\nspool_budget = \"256M\"\n",
            tstate.display(),
            s.join("replica0.img").display(),
            s.join("journal0").display()
        ),
    )
    .unwrap();
    let mut target = Daemon::spawn(
        {
            let mut c = rewind();
            c.arg("target").arg("--config").arg(&ttoml);
            c
        },
        s.join("target.log"),
    );
    let addr = wait_listen(&mut target, &tstate, "target");
    let rstate = s.join("rstate");
    let rtoml = s.join("replicator.toml");
    std::fs::write(
        &rtoml,
        format!(
            "state_dir = \"{}\"\nrpo_threshold_secs = 30\n[target]\naddress = \"{addr}\"\nserver_name = \"127.0.0.1\"\nbandwidth = \"100M\"\n\
             [tls]\nca = \"{p}/ca.pem\"\ncert = \"{p}/replicator.pem\"\nkey = \"{p}/replicator.key\"\n\
             [[pair]]\nvolume = \"vol0\"\nshm_dir = \"{}\"\ndevice = \"{}\"\ncompression = \"zstd:3\"\n\
             schedule = [{{ from = \"00:00\", to = \"24:00\", rate = \"50M\" }}]\n",
            rstate.display(),
            export.shm_dir.display(),
            backing.display()
        ),
    )
    .unwrap();
    let mut repl = Daemon::spawn(
        {
            let mut c = rewind();
            c.arg("replicator").arg("--config").arg(&rtoml);
            c
        },
        s.join("repl.log"),
    );
    run_ok(
        tool("qemu-io").args([
            "-f",
            "raw",
            &export.uri(),
            "-c",
            "write -P 0x77 1M 3M",
            "-c",
            "write -z 8M 1M",
        ]),
        T,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        repl.assert_alive();
        let v = status_json(&rstate, Some(&tstate));
        if fully_drained(&v) {
            assert_eq!(v["source"]["pairs"][0]["bandwidth_bps"], 50_000_000u64);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not drained: {v}\n{}\n{}",
            repl.log_text(),
            target.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_same(&backing, &s.join("replica0.img"), "config-driven replica");
    let o = run_ok(
        rewind()
            .args(["status", "--state-dir"])
            .arg(&rstate)
            .arg("--target-state-dir")
            .arg(&tstate),
        T,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    for want in [
        "pair vol0",
        "DifferentialSync",
        "RPO",
        "pending",
        "zstd:3",
        "target: running",
    ] {
        assert!(
            out.contains(want),
            "{want:?} missing in rewind status:\n{out}"
        );
    }
    let o = run_ok(
        Command::new(rewind_bin("cdpcli"))
            .arg("--listtargetvolumes")
            .arg("--state-dir")
            .arg(&tstate),
        T,
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "vol0");
    let o = run_ok(
        Command::new(rewind_bin("cdpcli"))
            .args(["--displaystatistics", "--vol=vol0", "--state-dir"])
            .arg(&tstate),
        T,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    for field in [
        "Target Volume Name",
        "Diffs pending in CX",
        "Diffs pending in Target",
        "Current RPO (secs)",
        "Apply rate (Bytes/sec)",
        "Apply time (secs)",
    ] {
        assert!(out.contains(field), "{field} missing:\n{out}");
    }
    let o = run_fails(
        Command::new(rewind_bin("cdpcli"))
            .args(["--displaystatistics", "--vol=nope", "--state-dir"])
            .arg(&tstate),
        T,
    );
    assert!(
        text(&o).contains("no target volume \"nope\""),
        "{}",
        text(&o)
    );
    repl.stop();
    // After a clean stop the status says so; after a kill -9 too.
    let o = run_ok(rewind().args(["status", "--state-dir"]).arg(&rstate), T);
    assert!(String::from_utf8_lossy(&o.stdout).contains("replicator: stopped"));
    target.kill9();
    let v = status_json(&rstate, Some(&tstate));
    assert_eq!(v["target_daemon"], "dead (killed?)", "{v}");
}

/// `--insecure` on both sides works on loopback (tests, demos).
#[test]
fn replication_insecure_loopback() {
    let s = Scratch::new("repl-insec");
    let backing = s.join("vol.img");
    create_random(&backing, 8 * MIB, 4);
    let export = Export::start(&s, &backing, ExportOpts::for_volume("vol0"));
    let target = Target::start(
        &s,
        TargetOpts {
            spool_budget: Some("16M".into()),
            ..TargetOpts::insecure()
        },
    );
    let repl = Replicator::start(
        &s,
        target.addr,
        ReplicatorOpts::insecure("vol0", &backing, &export.shm_dir, "zstd"),
    );
    run_ok(
        tool("qemu-io").args(["-f", "raw", &export.uri(), "-c", "write -P 0x31 0 2M"]),
        T,
    );
    wait_drained(&repl, &target, Duration::from_secs(60));
    assert_same(&backing, &target.replica("vol0"), "insecure replica");
    assert!(target.daemon.log_text().contains("insecure"));
}

/// An 8 MiB volume replicated uncompressed to a target started with
/// `target_flag value` (if any), after `writes` acknowledged writes of the
/// test writer (then paused) have converged to the replica.
fn converged_after_writes(
    name: &str,
    target_flag: &str,
    value: Option<&str>,
    writes: u64,
) -> (Scratch, Setup, Writer) {
    let s = Scratch::new(name);
    let backing = s.join("vol.img");
    create_sparse(&backing, 8 * MIB);
    let setup = Setup::start_with(
        &s,
        &backing,
        "none",
        |t| {
            if let Some(v) = value {
                t.extra_args = vec![target_flag.into(), v.into()];
            }
        },
        |_| {},
    );
    let writer = Writer::start(setup.export.uri(), 8 * MIB, 3);
    writer.resume();
    poll_until(
        "writes",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || writer.acked.load(std::sync::atomic::Ordering::Relaxed) >= writes,
    );
    writer.pause();
    setup.converge(Duration::from_secs(60), name);
    (s, setup, writer)
}

/// `rewind target --undo-compression`: the retention journal stores the old
/// data of overwritten blocks compressed by default (lz4) and with `zstd`
/// (the test's writes are one repeated byte per write: both shrink them to
/// almost nothing), and as is with `off`; the figures come from
/// `rewind status --json`.
#[test]
fn target_undo_compression_lz4_by_default_zstd_or_off_by_flag() {
    let mut ratios = Vec::new();
    for flag in [None, Some("zstd:3"), Some("off")] {
        let name = match flag {
            None => "undo-default",
            Some("off") => "undo-off",
            Some(_) => "undo-zstd",
        };
        // Every block written several times over: most undo data is old,
        // non-zero writer data (zero old data is elided either way).
        let (_s, setup, writer) = converged_after_writes(name, "--undo-compression", flag, 1500);
        let mut figures = (0u64, 0u64);
        poll_until("journal figures", T, Duration::from_millis(100), || {
            let j = &setup.target.volume_status("vol0")["journal"];
            figures = (
                j["undo_raw_bytes"].as_u64().unwrap_or(0),
                j["undo_stored_bytes"].as_u64().unwrap_or(0),
            );
            j["applied_seq"] == setup.target.volume_status("vol0")["status"]["applied_seq"]
                && figures.0 > 0
        });
        let (raw, stored) = figures;
        let ratio = stored as f64 / raw as f64;
        eprintln!("undo compression {flag:?}: {raw} old bytes stored as {stored} ({ratio:.3})");
        ratios.push(ratio);
        drop(writer);
    }
    assert!(ratios[0] < 0.05, "default: not compressed: {ratios:?}");
    assert!(ratios[1] < 0.05, "zstd:3: not compressed: {ratios:?}");
    assert!(ratios[2] > 0.5, "off: compressed anyway: {ratios:?}");
}

/// `rewind target --direct-apply true`: while nothing is pending, received
/// chunks go straight to the replica (the spool stores little or nothing),
/// the replica still converges, and the target's applied-bytes figure
/// counts what the direct path applied. By default chunks are spooled first.
#[test]
fn target_direct_apply_skips_the_spool_and_is_counted() {
    for flag in [None, Some("true")] {
        let name = if flag.is_some() {
            "direct-on"
        } else {
            "direct-default"
        };
        let (_s, setup, writer) = converged_after_writes(name, "--direct-apply", flag, 800);
        let mut figures = (0u64, 0u64, 0u64);
        poll_until("figures", T, Duration::from_millis(100), || {
            let v = setup.target.volume_status("vol0");
            figures = (
                v["journal"]["applied_bytes"].as_u64().unwrap_or(0),
                v["journal"]["spooled_bytes"].as_u64().unwrap_or(0),
                v["status"]["applied_bytes"].as_u64().unwrap_or(0),
            );
            v["journal"]["applied_seq"] == v["status"]["applied_seq"]
                && figures.0 > 0
                && figures.2 >= figures.0
        });
        let (applied, spooled, reported) = figures;
        eprintln!(
            "direct apply {flag:?}: applied {applied}, spooled {spooled}, reported {reported}"
        );
        if flag.is_some() {
            assert!(
                spooled < applied / 2,
                "direct apply still spooled most: {figures:?}"
            );
        } else {
            assert!(spooled >= applied / 2, "default spools first: {figures:?}");
        }
        drop(writer);
    }
}
