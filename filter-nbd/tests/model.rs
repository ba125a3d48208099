//! Randomised model test: pipelined batches of random WRITE / READ / TRIM /
//! WRITE_ZEROES / FLUSH / BLOCK_STATUS (non-overlapping within a batch)
//! against an in-memory model, in all three reply modes and with and without
//! io_uring.

mod common;

use common::*;
use filter_nbd::proto::*;
use filter_nbd::ServerOptions;
use rand::{Rng, SeedableRng};

const SIZE: u64 = 4 << 20;
const SLOT: u64 = 64 << 10;

#[test]
fn random_pipelined_ops_match_model() {
    for uring in [true, false] {
        let mut spec = Spec::rw("vol", SIZE);
        spec.fill = 0;
        let f = serve(
            vec![spec],
            ServerOptions {
                io_uring: uring,
                ..Default::default()
            },
        );
        let mut model = vec![0u8; SIZE as usize];
        let mut rng = rand::rngs::StdRng::seed_from_u64(if uring { 1 } else { 2 });
        for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
            let mut c = Client::go(&f.sock, "vol", mode, mode != Mode::Simple);
            for _batch in 0..30 {
                let mut slots: Vec<u64> = (0..SIZE / SLOT).collect();
                let n = rng.gen_range(1..24);
                let mut expect = std::collections::HashMap::new();
                for _ in 0..n {
                    let s = slots.swap_remove(rng.gen_range(0..slots.len()));
                    let off = s * SLOT + rng.gen_range(0..SLOT / 2);
                    let len = rng.gen_range(1..SLOT / 2);
                    let op = rng.gen_range(0..6);
                    let h = match op {
                        0 | 1 => {
                            let v: u8 = rng.gen();
                            let data: Vec<u8> = (0..len).map(|i| v.wrapping_add(i as u8)).collect();
                            model[off as usize..(off + len) as usize].copy_from_slice(&data);
                            let fl = if rng.gen_bool(0.2) { CMD_FLAG_FUA } else { 0 };
                            c.send(CMD_WRITE, fl, off, len, &data)
                        }
                        2 => {
                            let h = c.send(CMD_READ, 0, off, len, &[]);
                            expect.insert(h, model[off as usize..(off + len) as usize].to_vec());
                            h
                        }
                        3 => {
                            model[off as usize..(off + len) as usize].fill(0);
                            let fl = if rng.gen_bool(0.5) {
                                CMD_FLAG_NO_HOLE
                            } else {
                                0
                            };
                            c.send(CMD_WRITE_ZEROES, fl, off, len, &[])
                        }
                        4 => c.send(CMD_FLUSH, 0, 0, 0, &[]),
                        _ if mode != Mode::Simple => c.send(CMD_BLOCK_STATUS, 0, off, len, &[]),
                        _ => c.send(CMD_FLUSH, 0, 0, 0, &[]),
                    };
                    let _ = h;
                }
                for _ in 0..n {
                    let r = c.recv();
                    assert_eq!(r.error, 0, "mode {mode:?} uring {uring}");
                    if let Some(want) = expect.remove(&r.handle) {
                        assert!(r.data == want, "read mismatch mode {mode:?} uring {uring}");
                    }
                    if !r.extents.is_empty() {
                        assert!(r.extents.iter().all(|e| e.0 > 0));
                    }
                }
                assert!(expect.is_empty());
            }
            c.disconnect();
        }
        assert!(
            read_file(&f.files[0]) == model,
            "backing differs from model (uring {uring})"
        );
    }
}
