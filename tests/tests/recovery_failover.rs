//! Failover, failback and reprotect with real daemons over mutual TLS on
//! loopback (docs/recovery.md).

use rewind_tests::recovery::*;
use rewind_tests::replication::*;
use rewind_tests::*;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const SIZE: u64 = 32 * MIB;

fn wait_socket(p: &std::path::Path, d: &mut Daemon) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(p).is_err() {
        d.assert_alive();
        assert!(
            Instant::now() < deadline,
            "{} not up\n{}",
            p.display(),
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Fail over to a bookmark (the replica rolls back to exactly its bytes, the
/// target refuses the source from then on), use the replica read-write
/// through `rewind failover --export`, fail back into the original source
/// device with a checksum resync (original = failed-over replica + changes
/// made on it; bytes on the wire far below the volume size), then
/// `rewind reprotect` at the target: the old direction resyncs by checksum.
#[test]
fn recovery_failover_failback_reprotect() {
    let s = Scratch::new("rec-fo");
    let src = s.join("src.img");
    create_random(&src, SIZE, 3);
    let st = Setup::start(&s, &src, "zstd:1");
    st.converge(Duration::from_secs(60), "initial sync");
    random_writes(&st.export.uri(), SIZE, 40, 11);
    create_bookmark(&st.export, "pre", None);
    let h_pre = blake3_file(&src);
    random_writes(&st.export.uri(), SIZE, 10, 12);
    st.converge(Duration::from_secs(60), "before the failover");
    let sd = st.target.state_dir.to_str().unwrap().to_string();
    let replica = st.target.replica("vol0");

    // Failover to the bookmark, serving the replica with change tracking.
    let dr_sock = s.join("dr.sock");
    let dr_shm = s.join("dr-shm");
    let dr_state = s.join("dr-state");
    let mut dr = spawn_rewind(
        &s,
        &[
            "failover",
            "--volume",
            "vol0",
            "--bookmark",
            "pre",
            "--state-dir",
            &sd,
            "--export",
            &format!("unix:{}", dr_sock.display()),
            "--export-shm-dir",
            dr_shm.to_str().unwrap(),
            "--export-state-dir",
            dr_state.to_str().unwrap(),
        ],
    );
    wait_socket(&dr_sock, &mut dr);
    assert_eq!(
        blake3_file(&replica),
        h_pre,
        "replica after the failover\n{}",
        dr.log_text()
    );
    assert!(
        dr.log_text().contains("failed over to bookmark"),
        "{}",
        dr.log_text()
    );
    // The target refuses the source now: new source writes never reach the replica.
    random_writes(&st.export.uri(), SIZE, 10, 13);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        blake3_file(&replica),
        h_pre,
        "the fenced replica was written"
    );
    let list = rewind_json(&["recover", "list", "--volume", "vol0", "--state-dir", &sd]);
    assert!(list["failed_over"].is_object(), "{list}");
    let o = rewind(&[
        "snapshot",
        "create",
        "--volume",
        "vol0",
        "--latest",
        "--listen",
        &format!("unix:{}", s.join("x.sock").display()),
        "--state-dir",
        &sd,
    ]);
    assert!(
        !o.status.success() && text(&o).contains("failed over"),
        "{}",
        text(&o)
    );
    // The recovered side is used: changes on the failed-over volume.
    let dr_uri = format!("nbd+unix:///vol0?socket={}", dr_sock.display());
    random_writes(&dr_uri, SIZE, 10, 14);
    let h_dr = blake3_file(&replica);
    assert_ne!(h_dr, h_pre);

    // The disaster ends: the original source side stops its export/replicator.
    let Setup {
        export,
        mut repl,
        pki,
        target,
        ..
    } = st;
    repl.daemon.stop();
    let (eshm, estate) = (export.shm_dir.clone(), export.state_dir.clone());
    export.stop();

    // Failback: the original device receives the recovered volume.
    let fb_state = s.join("fb-state");
    let mut c = std::process::Command::new(rewind_bin("rewind"));
    c.args(["failback", "--volume", "vol0", "--device"])
        .arg(&src)
        .arg("--journal-dir")
        .arg(s.join("fb-journal"))
        .args(["--listen", "tcp:127.0.0.1:0", "--tls-dir"])
        .arg(&pki.dir)
        .args([
            "--host",
            "127.0.0.1",
            "--allow",
            "replicator",
            "--state-dir",
        ])
        .arg(&fb_state);
    let mut fb_daemon = Daemon::spawn(c, s.join("failback.log"));
    let addr = wait_listen(&mut fb_daemon, &fb_state, "failback");
    let fb = Target {
        daemon: fb_daemon,
        addr,
        dir: s.join("unused"),
        state_dir: fb_state,
        opts: TargetOpts::tls(&pki),
    };
    let back = Replicator::start(
        &s,
        addr,
        ReplicatorOpts {
            hash_block: Some(4 * KIB),
            ..ReplicatorOpts::tls(&pki, "vol0", &replica, &dr_shm, "off")
        },
    );
    let doc = wait_drained(&back, &fb, Duration::from_secs(90));
    assert_same(
        &replica,
        &src,
        "failback: original source vs recovered volume",
    );
    assert_eq!(blake3_file(&src), h_dr);
    let wire = doc["source"]["pairs"][0]["status"]["wire_bytes"]
        .as_u64()
        .unwrap_or(u64::MAX);
    eprintln!("failback wire bytes: {wire} of a {SIZE}-byte volume");
    assert!(wire < SIZE / 8, "failback shipped {wire} bytes: {doc}");
    // More changes at the recovered side stream to the original continuously.
    random_writes(&dr_uri, SIZE, 20, 15);
    wait_drained(&back, &fb, Duration::from_secs(60));
    assert_same(&replica, &src, "failback after more changes");
    let mut back = back;
    back.daemon.stop();
    drop(dr);
    let mut fb = fb;
    fb.daemon.stop();

    // Switch back: the original source is protected again towards the
    // target, with a fresh change log (the old one holds changes from before
    // the failback that the device no longer has).
    let _ = (
        std::fs::remove_dir_all(&eshm),
        std::fs::remove_dir_all(&estate),
    );
    let export = Export::start(&s, &src, ExportOpts::for_volume("vol0"));
    let o = rewind(&["reprotect", "--volume", "vol0", "--state-dir", &sd]);
    assert!(o.status.success(), "reprotect: {}", text(&o));
    let mut ropts = repl.opts.clone();
    ropts.shm_dir = export.shm_dir.clone();
    let repl = Replicator::start(&s, target.addr, ropts);
    random_writes(&export.uri(), SIZE, 20, 16);
    wait_drained(&repl, &target, Duration::from_secs(90));
    assert_same(&src, &replica, "reprotect");
    assert!(
        target.volume_status("vol0")["resync_passes"]
            .as_u64()
            .unwrap_or(0)
            >= 2
    );
}
