//! Link faults and bad peers.
//!
//! - A loopback proxy between replicator and target stalls, cuts and slows
//!   the link during a workload: the pair converges after each fault, and
//!   `rewind status` shows what happened (RPO growing, disconnection and
//!   reconnection, the pair's state history).
//! - Bad peers (no client certificate, a certificate of another CA, a
//!   re-created source volume identity, a corrupted frame, a truncated
//!   frame) are refused with a clear error in the target's log and status,
//!   and the target's state (durable sequence, replica) does not change.

use replicator::handshake::client_hello;
use replicator::tls::{self, ClientTls};
use replicator::wire::{
    Chunk, Compression, Extent, ExtentKind, Frame, Hello, DEFAULT_MAX_FRAME, PROTOCOL_VERSION,
};
use rewind_tests::faultproxy::FaultProxy;
use rewind_tests::replication::*;
use rewind_tests::*;
use serde_json::Value;
use std::io::Write;
use std::time::{Duration, Instant};

const SIZE: u64 = 32 * MIB;

/// [`poll_until`] every 50 ms.
fn wait_for(what: &str, timeout: Duration, f: impl FnMut() -> bool) {
    poll_until(what, timeout, Duration::from_millis(50), f)
}

#[test]
fn replication_link_faults_stall_cut_slow() {
    let s = Scratch::new("repl-link");
    let backing = s.join("vol.img");
    create_sparse(&backing, SIZE);
    let pki = Pki::new(&s, "pki");
    let export = Export::start(&s, &backing, ExportOpts::for_volume("vol0"));
    let target = Target::start(&s, TargetOpts::tls(&pki));
    let proxy = FaultProxy::start(target.addr);
    let repl = Replicator::start(
        &s,
        proxy.addr(),
        ReplicatorOpts::tls(&pki, "vol0", &backing, &export.shm_dir, "zstd:1"),
    );
    let converge = |what: &str| {
        wait_drained(&repl, &target, Duration::from_secs(60));
        assert_same(&backing, &target.replica("vol0"), what);
    };
    converge("initial");
    let writer = Writer::start(export.uri(), SIZE, 7);

    // Stall: connections stay open, nothing moves; the RPO grows.
    writer.resume();
    std::thread::sleep(Duration::from_millis(300));
    proxy.stall();
    std::thread::sleep(Duration::from_secs(3));
    let p = repl.pair();
    assert!(
        p["rpo_secs"].as_f64().unwrap_or(0.0) >= 1.0,
        "RPO does not show the stall: {p}"
    );
    assert!(
        p["status"]["pending_source_bytes"].as_u64().unwrap_or(0) > 0
            || p["status"]["in_flight_frames"].as_u64().unwrap_or(0) > 0,
        "nothing pending during the stall: {p}"
    );
    proxy.resume();
    writer.pause();
    converge("after a stall");
    writer.check(&target.replica("vol0"));

    // Cut and keep the link down: the pair shows it is disconnected, then
    // reconnects by itself.
    let reconnects0 = repl.pair()["status"]["reconnects"].as_u64().unwrap_or(0);
    writer.resume();
    std::thread::sleep(Duration::from_millis(300));
    proxy.cut(true);
    wait_for(
        "the status to show the disconnection",
        Duration::from_secs(10),
        || repl.pair()["status"]["connected"] == false,
    );
    let p = repl.pair();
    assert!(
        p["alerts"].as_array().is_some_and(|a| a
            .iter()
            .any(|x| x.as_str().unwrap_or("").contains("not connected"))),
        "no alert while disconnected: {p}"
    );
    std::thread::sleep(Duration::from_secs(2));
    proxy.resume();
    writer.pause();
    converge("after a cut");
    writer.check(&target.replica("vol0"));
    let p = repl.pair();
    assert!(
        p["status"]["reconnects"].as_u64().unwrap_or(0) > reconnects0,
        "{p}"
    );
    let hist = p["history"].as_array().cloned().unwrap_or_default();
    assert!(
        hist.iter().any(|h| h["connected"] == false)
            && hist.last().is_some_and(|h| h["connected"] == true),
        "history does not show the disconnection and reconnection: {hist:?}"
    );

    // Slow link: 200 kB/s each way; the shipped rate follows it.
    proxy.slow(200_000);
    let w0 = repl.pair()["status"]["wire_bytes"].as_u64().unwrap_or(0);
    let t0 = Instant::now();
    writer.resume();
    std::thread::sleep(Duration::from_secs(3));
    writer.pause();
    let w1 = repl.pair()["status"]["wire_bytes"].as_u64().unwrap_or(0);
    let rate = (w1 - w0) as f64 / t0.elapsed().as_secs_f64();
    // wire_bytes counts what was handed to TLS; the socket buffers hold a
    // little more than the proxy let through.
    assert!(
        rate < 200_000.0 * 1.5 + 300_000.0 / 3.0,
        "shipped {rate:.0} B/s through a 200 kB/s link"
    );
    proxy.resume();
    converge("after a slow link");
    writer.check(&target.replica("vol0"));
    drop(writer);
    let status = repl.status_json(Some(&target));
    eprintln!(
        "final status: {}",
        serde_json::to_string(&status["source"]["pairs"][0]["history"]).unwrap_or_default()
    );
}

fn pair_identity(repl: &Replicator) -> ([u8; 16], u64) {
    let path = repl.state_dir.join("vol0").join("vol0.pair.json");
    let v: Value =
        serde_json::from_slice(&std::fs::read(&path).expect("pair state")).expect("json");
    let hex = v["volume_uuid"].as_str().expect("uuid");
    let mut uuid = [0u8; 16];
    for (i, b) in uuid.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex");
    }
    (uuid, v["generation"].as_u64().expect("generation"))
}

fn target_state(t: &Target) -> (Value, Value, String) {
    let v = t.volume_status("vol0");
    (
        v["status"]["durable_seq"].clone(),
        v["status"]["applied_seq"].clone(),
        blake3_file(&t.replica("vol0")),
    )
}

fn refused(t: &Target) -> u64 {
    t.status()["refused"].as_u64().unwrap_or(0)
}

#[test]
fn replication_bad_peers_refused() {
    let s = Scratch::new("repl-bad");
    let backing = s.join("vol.img");
    create_random(&backing, SIZE, 3);
    let mut st = Setup::start(&s, &backing, "zstd:1");
    st.converge(Duration::from_secs(60), "initial");
    let (uuid, generation) = pair_identity(&st.repl);
    st.repl.daemon.stop();
    std::thread::sleep(Duration::from_millis(300));
    let before = target_state(&st.target);
    let addr = st.target.addr.to_string();
    let ca = st.pki.dir.join("ca.pem");

    // 1. No client certificate.
    let r0 = refused(&st.target);
    let cfg = ClientTls::without_client_cert(&ca).expect("client tls");
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        max_frame: DEFAULT_MAX_FRAME,
        volume_name: "vol0".into(),
        volume_uuid: uuid,
        generation,
        size: SIZE,
        block_size: 4096,
        source_host: "intruder".into(),
    };
    let r = tls::connect(&addr, "127.0.0.1", &cfg)
        .map_err(|e| e.to_string())
        .and_then(|mut t| client_hello(&mut t, &hello).map_err(|e| e.to_string()));
    assert!(r.is_err(), "a client without a certificate was accepted");
    wait_for(
        "the refusal in the target's status",
        Duration::from_secs(5),
        || refused(&st.target) > r0,
    );
    let log = st.target.daemon.log_text();
    assert!(
        log.contains("refused"),
        "no refusal in the target log\n{log}"
    );
    eprintln!(
        "no certificate: client error {:?}; target: {}",
        r.err(),
        st.target.status()["last_refusal"]
    );

    // 2. A certificate of another CA (a whole replicator with it).
    let r0 = refused(&st.target);
    let other = Pki::new(&s, "other-pki");
    let mut bad = Replicator::start(
        &s,
        st.target.addr,
        ReplicatorOpts {
            auth: Auth::Tls(other.dir.clone()),
            ..st.repl.opts.clone()
        },
    );
    wait_for("the wrong-CA refusal", Duration::from_secs(10), || {
        refused(&st.target) > r0
    });
    wait_for(
        "the replicator to report the error",
        Duration::from_secs(10),
        || {
            bad.pair()["status"]["last_error"]
                .as_str()
                .is_some_and(|e| !e.is_empty())
        },
    );
    eprintln!(
        "wrong CA: replicator says {}; target says {}",
        bad.pair()["status"]["last_error"],
        st.target.status()["last_refusal"]
    );
    assert_eq!(bad.pair()["status"]["connected"], false);
    bad.daemon.stop();

    // 3. A corrupted frame after a valid handshake.
    let client = ClientTls::from_pem(
        &ca,
        &st.pki.dir.join("replicator.pem"),
        &st.pki.dir.join("replicator.key"),
    )
    .expect("tls");
    let seq = before.0.as_u64().unwrap_or(0) + 1;
    let data = vec![0x5au8; 4096];
    let chunk = Chunk::build(
        seq,
        seq,
        1,
        vec![Extent {
            offset: 0,
            len: 4096,
            kind: ExtentKind::Data,
        }],
        &data,
        Compression::None,
    )
    .expect("chunk");
    let frame = Frame::Chunk(chunk)
        .encode(DEFAULT_MAX_FRAME)
        .expect("encode");
    {
        let mut t = tls::connect(&addr, "127.0.0.1", &client).expect("connect");
        client_hello(&mut t, &hello).expect("valid handshake");
        let mut bad = frame.clone();
        let n = bad.len();
        bad[n - 100] ^= 0xff;
        t.write_all(&bad).expect("send");
        t.flush().expect("flush");
        t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let answer = replicator::wire::read_frame(&mut t, DEFAULT_MAX_FRAME);
        eprintln!("corrupted frame: target answered {answer:?}");
        assert!(
            matches!(answer, Ok(Frame::Error(_)) | Err(_)),
            "a corrupted frame was not refused: {answer:?}"
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        target_state(&st.target),
        before,
        "a corrupted frame changed the target"
    );

    // 3b. The right volume with another generation (split-brain guard).
    {
        let r0 = refused(&st.target);
        let mut t = tls::connect(&addr, "127.0.0.1", &client).expect("connect");
        let h = Hello {
            generation: generation + 1,
            ..hello.clone()
        };
        let r = client_hello(&mut t, &h);
        let msg = format!("{r:?}");
        eprintln!("generation {}: {msg}", generation + 1);
        assert!(
            msg.contains("GenerationMismatch"),
            "another generation was not refused: {msg}"
        );
        wait_for("the generation refusal", Duration::from_secs(5), || {
            refused(&st.target) > r0
        });
    }
    assert_eq!(
        target_state(&st.target),
        before,
        "a refused generation changed the target"
    );

    // 4. A truncated frame: half of it, then the connection closes.
    {
        let mut t = tls::connect(&addr, "127.0.0.1", &client).expect("connect");
        client_hello(&mut t, &hello).expect("valid handshake");
        t.write_all(&frame[..frame.len() / 2]).expect("send");
        t.flush().expect("flush");
        let _ = t.close();
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        target_state(&st.target),
        before,
        "a truncated frame changed the target"
    );

    // 5. The source volume re-created (new identity): refused, split-brain guard.
    let r0 = refused(&st.target);
    let shm = st.export.shm_dir.clone();
    let state = st.export.state_dir.clone();
    let ex = std::mem::replace(
        &mut st.export,
        Export::start(&s, &s.join("vol2.img"), {
            create_sparse(&s.join("vol2.img"), SIZE);
            ExportOpts::for_volume("vol-tmp")
        }),
    );
    ex.stop();
    std::fs::remove_dir_all(&shm).ok();
    std::fs::remove_dir_all(&state).ok();
    let recreated = Export::start(
        &s,
        &backing,
        ExportOpts {
            shm_dir: Some(shm.clone()),
            state_dir: Some(state.clone()),
            ..ExportOpts::for_volume("vol0")
        },
    );
    let mut newer = Replicator::start(
        &s,
        st.target.addr,
        ReplicatorOpts {
            shm_dir: shm.clone(),
            ..st.repl.opts.clone()
        },
    );
    wait_for("the identity refusal", Duration::from_secs(15), || {
        refused(&st.target) > r0
    });
    wait_for(
        "the replicator to report the refusal",
        Duration::from_secs(10),
        || {
            newer.pair()["status"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("generation") || e.contains("UUID"))
        },
    );
    eprintln!(
        "re-created volume: replicator says {}; target says {}",
        newer.pair()["status"]["last_error"],
        st.target.status()["last_refusal"]
    );
    newer.daemon.stop();
    drop(recreated);
    assert_eq!(
        target_state(&st.target),
        before,
        "a refused peer changed the target"
    );
}

/// A small change-log ring and a stalled link: the ring overflows, capture
/// falls back (metadata, then bitmap mode), `rewind status` shows the mode
/// and raises the alert; after the link comes back the pair drains and the
/// replica is equal, every acknowledged write in it.
#[test]
fn replication_ring_overflow_falls_back_and_recovers() {
    let s = Scratch::new("repl-ovf");
    let backing = s.join("vol.img");
    create_sparse(&backing, SIZE);
    let pki = Pki::new(&s, "pki");
    let export = Export::start(
        &s,
        &backing,
        ExportOpts {
            ring_size: Some(MIB),
            ..ExportOpts::for_volume("vol0")
        },
    );
    let target = Target::start(&s, TargetOpts::tls(&pki));
    let proxy = FaultProxy::start(target.addr);
    let repl = Replicator::start(
        &s,
        proxy.addr(),
        ReplicatorOpts::tls(&pki, "vol0", &backing, &export.shm_dir, "zstd:1"),
    );
    wait_drained(&repl, &target, Duration::from_secs(60));
    proxy.stall();
    let writer = Writer::start(export.uri(), SIZE, 99);
    writer.resume();
    wait_for(
        "capture to fall back to bitmap mode",
        Duration::from_secs(60),
        || repl.pair()["status"]["capture_mode"] == "Bitmap",
    );
    writer.pause();
    let p = repl.pair();
    eprintln!(
        "during the stall: capture {} alerts {}",
        p["status"]["capture_mode"], p["alerts"]
    );
    let has = |p: &Value, what: &str| {
        p["alerts"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x.as_str().unwrap_or("").contains(what)))
    };
    assert!(has(&p, "capture in bitmap mode"), "no bitmap alert: {p}");
    proxy.resume();
    wait_drained(&repl, &target, Duration::from_secs(60));
    assert_same(&backing, &target.replica("vol0"), "after a ring overflow");
    writer.check(&target.replica("vol0"));
    let p = repl.pair();
    let modes: Vec<String> = p["history"]
        .as_array()
        .map(|h| {
            h.iter()
                .map(|x| x["capture_mode"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default();
    eprintln!("capture modes seen: {modes:?}; alerts now {}", p["alerts"]);
    assert!(modes.iter().any(|m| m == "Bitmap"), "{modes:?}");
    // Drained: no longer an alert, but the fallback is still reported.
    assert!(has(&p, "fell back to bitmap mode"), "{}", p["alerts"]);
    assert!(!has(&p, "capture in bitmap mode"), "{}", p["alerts"]);
    // The next write brings the change log back to data mode.
    run_ok(
        tool("qemu-io").args(["-f", "raw", &export.uri(), "-c", "write -P 0x42 0 64k"]),
        Duration::from_secs(30),
    );
    wait_for("capture back in data mode", Duration::from_secs(20), || {
        repl.pair()["status"]["capture_mode"] == "Data"
    });
    wait_drained(&repl, &target, Duration::from_secs(60));
    assert_same(
        &backing,
        &target.replica("vol0"),
        "after leaving bitmap mode",
    );
}
