//! Recovery at the target (issue 4 items 4–6): recovery points, virtual
//! snapshots read by third-party NBD clients, materialization, against the
//! exact bytes the source had at each point; replication keeps running
//! while snapshots are served.

use rewind_tests::recovery::*;
use rewind_tests::replication::{blake3_file, Setup};
use rewind_tests::*;
use std::time::Duration;

const SIZE: u64 = 16 * MIB;

/// Random workload through the export in rounds; after each round the pair
/// is drained and the source's blake3 recorded with the time. Every recorded
/// time then recovers to exactly those bytes, through the vsnap NBD export
/// (qemu-img and nbdcopy) and through materialize — while the target keeps
/// applying a later workload.
#[test]
fn recovery_time_points_exact_through_vsnap_and_materialize() {
    let s = Scratch::new("rec-time");
    let backing = s.join("vol.img");
    create_random(&backing, SIZE, 1);
    let st = Setup::start(&s, &backing, "zstd:1");
    st.converge(Duration::from_secs(60), "initial sync");
    let mut points = Vec::new();
    for round in 0..4u64 {
        random_writes(&st.export.uri(), SIZE, 40, 100 + round);
        st.converge(Duration::from_secs(60), "round");
        points.push((now_ns(), blake3_file(&backing)));
        std::thread::sleep(Duration::from_millis(20));
    }
    let sd = st.target.state_dir.to_str().unwrap().to_string();
    let list = rewind_json(&["recover", "list", "--volume", "vol0", "--state-dir", &sd]);
    assert!(list["latest_seq"].as_u64().unwrap() > 0, "{list}");
    // More writes keep arriving while the earlier points are read back.
    random_writes(&st.export.uri(), SIZE, 40, 999);
    for (i, (t, h)) in points.iter().enumerate() {
        let snap = Snapshot::start(&s, "vol0", &["--at", &at_arg(*t), "--state-dir", &sd]);
        let img = s.join("p.raw");
        if i % 2 == 0 {
            qemu_img_copy(&snap.uri, &img);
        } else {
            nbdcopy(&snap.uri, &img);
        }
        assert_eq!(
            &blake3_file(&img),
            h,
            "point {i} through the vsnap\n{}",
            snap.log_text()
        );
        snap.stop();
        let out = s.join("m.raw");
        let o = rewind(&[
            "snapshot",
            "materialize",
            "--volume",
            "vol0",
            "--at",
            &at_arg(*t),
            "--out",
            out.to_str().unwrap(),
            "--state-dir",
            &sd,
        ]);
        assert!(o.status.success(), "materialize: {}", text(&o));
        assert_eq!(&blake3_file(&out), h, "point {i} materialized");
    }
    st.converge(Duration::from_secs(60), "after the reads");
}
