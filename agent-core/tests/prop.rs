//! Property test: random writes / zeroes / aborts, tags, filtering toggles,
//! consumer and producer crashes and host reboots, interleaved with a
//! transactional drain into a simulated replica. Whatever happens, after a
//! final drain the replica equals the source.

mod common;

use std::collections::VecDeque;

use agent_core::*;
use common::*;
use proptest::prelude::*;

const VOL: u64 = 256 * 1024;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u64 },
    Zero { off: u64, len: u64 },
    Abort { off: u64, len: u64, seed: u64 },
    Get { max: u64 },
    Commit,
    Tag,
    Filtering(bool),
    ConsumerCrash,
    ProducerCrashMidWrite { off: u64, len: u64, seed: u64 },
    Reboot { clean: bool },
    Persist,
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..VOL, prop_oneof![1u64..600, 1u64..5000, 1u64..14000]).prop_map(|(o, l)| (o, l.min(VOL - o)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        30 => (range(), any::<u64>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        4 => range().prop_map(|(off, len)| Op::Zero { off, len }),
        2 => (range(), any::<u64>()).prop_map(|((off, len), seed)| Op::Abort { off, len, seed }),
        12 => prop_oneof![Just(1u64), Just(4096u64), Just(65536u64)].prop_map(|max| Op::Get { max }),
        12 => Just(Op::Commit),
        2 => Just(Op::Tag),
        2 => any::<bool>().prop_map(Op::Filtering),
        2 => Just(Op::ConsumerCrash),
        1 => (range(), any::<u64>()).prop_map(|((off, len), seed)| Op::ProducerCrashMidWrite { off, len, seed }),
        2 => any::<bool>().prop_map(|clean| Op::Reboot { clean }),
        3 => Just(Op::Persist),
    ]
}

struct World {
    dir: tempfile::TempDir,
    cfg: ChangeLogConfig,
    log: Option<ChangeLog>,
    cons: Option<Consumer>,
    outstanding: VecDeque<Batch>,
    src: Vec<u8>,
    rep: Vec<u8>,
}

impl World {
    fn new(ring: u64) -> World {
        let dir = tmpdir();
        let mut cfg = cfg(dir.path(), "p", VOL, 4096, ring);
        cfg.extent_shift = 14; // 16 KiB extents: 16 of them, so the hot set matters
        let log = ChangeLog::open_or_create(cfg.clone()).unwrap();
        let cons = Consumer::attach(log.path()).unwrap();
        World {
            dir,
            cfg,
            log: Some(log),
            cons: Some(cons),
            outstanding: VecDeque::new(),
            src: vec![0; VOL as usize],
            rep: vec![0; VOL as usize],
        }
    }
    fn log(&self) -> &ChangeLog {
        self.log.as_ref().unwrap()
    }
    fn cons(&mut self) -> &mut Consumer {
        self.cons.as_mut().unwrap()
    }
    fn reattach(&mut self) {
        self.outstanding.clear();
        self.cons = None;
        self.cons = Some(Consumer::attach(self.cfg.region_path()).unwrap());
    }
    fn run(&mut self, op: &Op) {
        match *op {
            Op::Write { off, len, seed } => {
                let t = self.log().begin(off, len);
                let r = off as usize..(off + len) as usize;
                fill(&mut self.src[r.clone()], seed);
                let data = self.src[r].to_vec();
                self.log().complete_write(t, &data);
            }
            Op::Zero { off, len } => {
                let t = self.log().begin(off, len);
                self.src[off as usize..(off + len) as usize].fill(0);
                self.log().complete_zero(t);
            }
            Op::Abort { off, len, seed } => {
                let t = self.log().begin(off, len);
                // a failed write may have changed part of the range
                let half = (len / 2) as usize;
                fill(&mut self.src[off as usize..off as usize + half], seed);
                self.log().abort(t);
            }
            Op::Get { max } => {
                if let Some(b) = self.cons().get(max).unwrap() {
                    self.outstanding.push_back(b);
                }
            }
            Op::Commit => {
                if let Some(b) = self.outstanding.pop_front() {
                    apply(&b, &self.src, &mut self.rep);
                    self.cons().commit(b).unwrap();
                }
            }
            Op::Tag => {
                let _ = self.log().insert_tag("t", TagType::User, [1; 16]);
            }
            Op::Filtering(on) => self.log().set_filtering(on),
            Op::Persist => self.log().persist().unwrap(),
            Op::ConsumerCrash => self.reattach(),
            Op::ProducerCrashMidWrite { off, len, seed } => {
                let t = self.log().begin(off, len);
                fill(&mut self.src[off as usize..(off + len) as usize], seed);
                let _ = t; // never completed: the "process" dies with the write in flight
                self.log.take().unwrap().simulate_crash();
                self.log = Some(ChangeLog::open_or_create(self.cfg.clone()).unwrap());
            }
            Op::Reboot { clean } => {
                let log = self.log.take().unwrap();
                if clean {
                    log.close().unwrap();
                    drop(log);
                } else {
                    log.simulate_crash();
                }
                self.outstanding.clear();
                self.cons = None;
                std::fs::remove_file(self.cfg.region_path()).unwrap();
                self.log = Some(ChangeLog::open_or_create(self.cfg.clone()).unwrap());
                self.cons = Some(Consumer::attach(self.cfg.region_path()).unwrap());
            }
        }
    }
    fn finish(&mut self) {
        // commit what is outstanding, then drain everything
        while let Some(b) = self.outstanding.pop_front() {
            apply(&b, &self.src, &mut self.rep);
            self.cons().commit(b).unwrap();
        }
        let src = self.src.clone();
        let mut rep = std::mem::take(&mut self.rep);
        drain(self.cons(), &src, &mut rep, 65536);
        self.rep = rep;
        let view = ChangeLogView::open(self.cfg.region_path()).unwrap();
        assert!(view.dirty_ranges().is_empty());
        assert_eq!(view.records().count(), 0);
        let _ = &self.dir;
    }
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn replica_converges(ops in prop::collection::vec(op(), 1..160), ring in prop_oneof![Just(8192u64), Just(16384u64), Just(65536u64)]) {
        let mut w = World::new(ring);
        for op in &ops {
            w.run(op);
            // Invariant: every byte that differs between source and replica is
            // owed by the change log (ring record, dirty bit) or by a batch
            // that is handed out and not committed.
            let view = ChangeLogView::open(w.cfg.region_path()).unwrap();
            let mut owed = view.uncommitted_ranges();
            for b in &w.outstanding {
                owed.extend(b.ranges().iter().copied());
                owed.extend(b.records().iter().map(|r| (r.offset, r.len)));
            }
            let mut i = 0usize;
            while let Some(d) = first_diff(&w.src[i..], &w.rep[i..]) {
                let pos = (i + d) as u64;
                prop_assert!(owed.iter().any(|&(s, n)| s <= pos && pos < s + n), "byte {pos} differs but is not owed after {op:?}");
                i += d + 1;
            }
        }
        w.finish();
        prop_assert!(first_diff(&w.src, &w.rep).is_none(), "replica differs at {:?}", first_diff(&w.src, &w.rep));
        let st = w.log().stats();
        prop_assert_eq!(st.dirty_blocks_active + st.dirty_blocks_pending, 0);
    }
}

/// All three modes occur in a plain run with a small ring and a slow consumer.
#[test]
fn modes_all_occur_and_converge() {
    let mut w = World::new(8192);
    let mut seed = 1u64;
    for i in 0..2000u64 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (seed >> 20) % (VOL - 3000);
        w.run(&Op::Write {
            off,
            len: 1 + (seed >> 50) % 3000,
            seed,
        });
        if i % 7 == 0 {
            w.run(&Op::Get { max: 4096 });
            w.run(&Op::Commit);
        }
    }
    w.finish();
    assert!(first_diff(&w.src, &w.rep).is_none());
    assert_eq!(w.log().mode(), CaptureMode::Bitmap);
    w.run(&Op::Write {
        off: 0,
        len: 10,
        seed: 5,
    });
    assert_eq!(w.log().mode(), CaptureMode::Data);
    let t = w.log().stats().transitions;
    assert!(
        t.data_to_metadata > 0
            && t.metadata_to_data > 0
            && t.metadata_to_bitmap + t.data_to_bitmap > 0
            && t.bitmap_to_data >= 1,
        "{t:?}"
    );
}
