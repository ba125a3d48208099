//! Kill -9 of the replicator, of the target and of the export at random
//! moments during a workload (30 iterations): after each restart the pair
//! converges to a replica equal to the source, every acknowledged write is
//! in it, and no full resync (step 1) ever runs again.

use rewind_tests::replication::*;
use rewind_tests::*;
use std::time::{Duration, Instant};

const SIZE: u64 = 32 * MIB;
const ITERATIONS: usize = 30;

#[test]
fn replication_kill9_any_process_converges() {
    let s = Scratch::new("repl-kill");
    let backing = s.join("vol.img");
    create_sparse(&backing, SIZE);
    let st = Setup::start(&s, &backing, "zstd:1");
    st.converge(Duration::from_secs(60), "initial sync");
    let writer = Writer::start(st.export.uri(), SIZE, 42);
    let (mut st, kills) = kill_loop(&s, &backing, st, &writer, ITERATIONS, |i| i % 3);
    assert!(kills.iter().all(|&k| k >= 10));
    drop(writer);
    st.repl.daemon.stop();
    st.target.daemon.stop();
}

/// The same with a target that applies in place of spooling while idle
/// (`--direct-apply true`), killed -9 at random moments: a batch applied
/// but not yet committed when the target dies is rolled back at the next
/// open and sent again, so nothing acknowledged is missing and nothing is
/// applied twice.
#[test]
fn replication_kill9_of_a_direct_apply_target_converges() {
    let s = Scratch::new("repl-kill-direct");
    let backing = s.join("vol.img");
    create_sparse(&backing, SIZE);
    let st = Setup::start_with(
        &s,
        &backing,
        "none",
        |t| t.extra_args = vec!["--direct-apply".into(), "true".into()],
        |_| {},
    );
    st.converge(Duration::from_secs(60), "initial sync");
    let writer = Writer::start(st.export.uri(), SIZE, 43);
    // First the replicator (its counters then start after the initial
    // sync, as `kill_loop` checks), then the target ten times.
    let (mut st, kills) = kill_loop(&s, &backing, st, &writer, 11, |i| usize::from(i > 0));
    assert_eq!(kills, [1, 10, 0]);
    let applied = st.target.volume_status("vol0")["status"]["applied_bytes"].as_u64();
    assert!(applied > Some(0), "the direct applies are counted");
    drop(writer);
    st.repl.daemon.stop();
    st.target.daemon.stop();
}

/// Kills `victim_of(i)` (0 replicator, 1 target, 2 export) in iteration `i`
/// while the writer runs, then checks the converged replica, every
/// acknowledged write and that no resync ran; returns the set-up (with the
/// restarted processes) and the kills per victim.
fn kill_loop(
    s: &Scratch,
    backing: &std::path::Path,
    mut st: Setup,
    writer: &Writer,
    iterations: usize,
    victim_of: impl Fn(usize) -> usize,
) -> (Setup, [usize; 3]) {
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rand = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut kills = [0usize; 3];
    let t0 = Instant::now();
    for i in 0..iterations {
        let victim = victim_of(i);
        writer.resume();
        std::thread::sleep(Duration::from_millis(100 + rand(400)));
        match victim {
            0 => st.repl = st.repl.restart_after_kill9(s),
            1 => st.target = st.target.restart_after_kill9(s),
            _ => {
                let pid = st.export.pid();
                let _ = std::process::Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .status();
                // Reap it now (the harness's Export would only on drop): a
                // zombie still counts as the change log's live producer.
                let mut status = 0;
                // SAFETY: waitpid on our own child pid with a valid status pointer.
                unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
                let opts = ExportOpts {
                    shm_dir: Some(st.export.shm_dir.clone()),
                    state_dir: Some(st.export.state_dir.clone()),
                    ..ExportOpts::for_volume("vol0")
                };
                std::thread::sleep(Duration::from_millis(rand(200)));
                let new = Export::start(s, backing, opts);
                drop(std::mem::replace(&mut st.export, new));
                writer.set_uri(st.export.uri());
            }
        }
        kills[victim] += 1;
        std::thread::sleep(Duration::from_millis(100 + rand(300)));
        writer.pause();
        let doc = wait_drained(&st.repl, &st.target, Duration::from_secs(60));
        assert_same(
            backing,
            &st.target.replica("vol0"),
            &format!("iteration {i}"),
        );
        let checked = writer.check(&st.target.replica("vol0"));
        let p = &doc["source"]["pairs"][0];
        assert_eq!(
            p["resync_step1_entered"], 0,
            "iteration {i}: a full resync ran after a restart: {p}"
        );
        let tv = st.target.volume_status("vol0");
        assert_eq!(tv["needs_initial_sync"], false, "{tv}");
        // The initial synchronisation was the one and only checksum pass
        // (counted by the target at every pass start, across restarts).
        assert_eq!(
            tv["resync_passes"], 1,
            "iteration {i}: a resync pass ran: {tv}"
        );
        if kills[0] > 0 {
            assert!(
                p["status"]["resync"].is_null(),
                "iteration {i}: the restarted replicator ran a resync: {p}"
            );
        }
        assert_eq!(
            tv["status"]["resync_blocks"], 0,
            "iteration {i}: resync data sent: {tv}"
        );
        eprintln!(
            "iteration {i}: killed {} — converged, {checked} blocks checked, {} writes acknowledged so far",
            ["replicator", "target", "export"][victim],
            writer.acked.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    eprintln!("{iterations} kills in {:?}", t0.elapsed());
    (st, kills)
}
