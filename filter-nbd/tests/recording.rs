//! Change recording: every write-like request reaches the sink, before the
//! reply, and overlapping writes are recorded in backing order. Plus
//! multi-connection flush semantics and a non-file BlockSource.

mod common;

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use common::*;
use filter_nbd::proto::*;
use filter_nbd::{BlockSource, Export, Server, ServerOptions, TrimOutcome};

const SIZE: u64 = 1 << 20;

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

/// Checks the sink log: each ticket is completed exactly once, and no two
/// overlapping tickets are ever open at the same time.
fn check_serialised(log: &[Event]) {
    let mut open: HashMap<u64, (u64, u64)> = HashMap::new();
    for e in log {
        match *e {
            Event::Begin {
                offset,
                len,
                cookie,
            } => {
                for (&c, &r) in &open {
                    assert!(
                        !overlaps(r, (offset, len)),
                        "ticket {cookie} {offset}+{len} began while {c} {r:?} open"
                    );
                }
                open.insert(cookie, (offset, len));
            }
            Event::Write { cookie, .. }
            | Event::Zero { cookie, .. }
            | Event::Abort { cookie, .. } => {
                assert!(
                    open.remove(&cookie).is_some(),
                    "ticket {cookie} completed twice or never begun"
                );
            }
            Event::Read(_) => {}
        }
    }
    assert!(open.is_empty(), "tickets left open: {open:?}");
}

fn recording_fixture(opts: ServerOptions) -> (Fixture, Arc<RecordingSink>) {
    let sink = Arc::new(RecordingSink::default());
    let mut s = Spec::rw("vol", SIZE);
    s.sink = Some(sink.clone());
    (serve(vec![s], opts), sink)
}

#[test]
fn every_write_trim_zero_and_read_is_recorded() {
    for uring in [true, false] {
        let (f, sink) = recording_fixture(ServerOptions {
            io_uring: uring,
            ..Default::default()
        });
        let mut c = Client::go(&f.sock, "vol", Mode::Structured, false);
        assert_eq!(c.write(4096, &[1; 8192]), 0);
        assert_eq!(c.call(CMD_WRITE, CMD_FLAG_FUA, 100, 10, &[2; 10]).error, 0);
        assert_eq!(c.call(CMD_TRIM, 0, 65536, 65536, &[]).error, 0);
        assert_eq!(
            c.call(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 131072, 4096, &[])
                .error,
            0
        );
        assert_eq!(c.read(0, 512).unwrap().len(), 512);
        // Refused requests are not recorded.
        assert_eq!(c.write(SIZE, &[1]), ENOSPC);
        c.disconnect();
        let log = sink.log.lock().unwrap().clone();
        check_serialised(&log);
        let done: Vec<_> = log
            .iter()
            .filter(|e| !matches!(e, Event::Begin { .. }))
            .cloned()
            .collect();
        assert_eq!(
            done,
            vec![
                Event::Write {
                    offset: 4096,
                    len: 8192,
                    cookie: 1,
                    first: 1
                },
                Event::Write {
                    offset: 100,
                    len: 10,
                    cookie: 2,
                    first: 2
                },
                Event::Zero {
                    offset: 65536,
                    len: 65536,
                    cookie: 3
                },
                Event::Zero {
                    offset: 131072,
                    len: 4096,
                    cookie: 4
                },
                Event::Read(512),
            ],
            "uring={uring}"
        );
    }
}

#[test]
fn overlapping_concurrent_writes_are_recorded_in_backing_order() {
    for uring in [true, false] {
        let (f, sink) = recording_fixture(ServerOptions {
            io_uring: uring,
            ..Default::default()
        });
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let sock = f.sock.clone();
                std::thread::spawn(move || {
                    let mut c = Client::go(&sock, "vol", Mode::Structured, false);
                    for round in 0..10u8 {
                        // 24 pipelined, partly overlapping writes per round.
                        let mut handles = Vec::new();
                        for i in 0..24u8 {
                            let off = u64::from(i % 8) * 2048;
                            let val = t
                                .wrapping_mul(61)
                                .wrapping_add(round.wrapping_mul(24))
                                .wrapping_add(i)
                                | 1;
                            handles.push(c.send(CMD_WRITE, 0, off, 4096, &[val; 4096]));
                        }
                        for _ in &handles {
                            assert_eq!(c.recv().error, 0);
                        }
                    }
                    c.disconnect();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let log = sink.log.lock().unwrap().clone();
        check_serialised(&log);
        // The backing holds, for every 2 KiB block, the value of the last
        // recorded write covering it.
        let data = read_file(&f.files[0]);
        for blk in 0..9u64 {
            let last = log.iter().rev().find_map(|e| match *e {
                Event::Write {
                    offset, len, first, ..
                } if overlaps((offset, len), (blk * 2048, 2048)) => Some(first),
                _ => None,
            });
            let got = &data[(blk * 2048) as usize..(blk * 2048 + 2048) as usize];
            assert!(
                got.iter().all(|&b| Some(b) == last),
                "block {blk}: backing {} vs sink {last:?} (uring={uring})",
                got[0]
            );
        }
        assert_eq!(
            log.iter()
                .filter(|e| matches!(e, Event::Write { .. }))
                .count(),
            4 * 10 * 24
        );
    }
}

/// An in-memory source with an explicit volatile cache, to observe flushes.
struct CacheSource {
    durable: Mutex<Vec<u8>>,
    cache: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl CacheSource {
    fn view(&self) -> Vec<u8> {
        let mut d = self.durable.lock().unwrap().clone();
        for (off, b) in self.cache.lock().unwrap().iter() {
            d[*off as usize..*off as usize + b.len()].copy_from_slice(b);
        }
        d
    }
}

impl BlockSource for CacheSource {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let v = self.view();
        buf.copy_from_slice(&v[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.cache.lock().unwrap().push((offset, buf.to_vec()));
        if fua {
            self.flush()?;
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _: bool, _: bool) -> io::Result<()> {
        self.write_at(&vec![0; len as usize], offset, false)
    }
    fn trim(&self, _: u64, _: u64) -> io::Result<TrimOutcome> {
        Ok(TrimOutcome::Ignored)
    }
    fn flush(&self) -> io::Result<()> {
        let v = self.view();
        *self.durable.lock().unwrap() = v;
        self.cache.lock().unwrap().clear();
        Ok(())
    }
    fn block_status(&self, _: u64, len: u64, _: usize, out: &mut Vec<Extent>) -> io::Result<()> {
        out.push(Extent { len, flags: 0 });
        Ok(())
    }
}

#[test]
fn flush_on_one_connection_covers_writes_replied_on_another() {
    let src = Arc::new(CacheSource {
        durable: Mutex::new(vec![0; SIZE as usize]),
        cache: Mutex::new(Vec::new()),
    });
    let sink = Arc::new(RecordingSink::default());
    let export = Export::new("mem", src.clone()).with_sink(Some(sink.clone()));
    let server = Server::new(vec![export], ServerOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let stop = server.shutdown_handle();
    let t = std::thread::spawn(move || server.serve_unix_listener(l).unwrap());

    let mut a = Client::go(&sock, "mem", Mode::Structured, false);
    let mut b = Client::go(&sock, "mem", Mode::Simple, false);
    assert_ne!(a.flags & TF_CAN_MULTI_CONN, 0);
    assert_eq!(a.write(0, &[7; 4096]), 0);
    assert_eq!(a.write(8192, &[8; 4096]), 0);
    // Visible to the other connection before the flush.
    assert_eq!(b.read(0, 4).unwrap(), vec![7; 4]);
    assert!(src.durable.lock().unwrap()[..4096].iter().all(|&x| x == 0));
    assert_eq!(b.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0);
    let d = src.durable.lock().unwrap().clone();
    assert!(d[..4096].iter().all(|&x| x == 7) && d[8192..12288].iter().all(|&x| x == 8));
    // FUA on a write makes it durable by itself.
    assert_eq!(
        b.call(CMD_WRITE, CMD_FLAG_FUA, 65536, 512, &[9; 512]).error,
        0
    );
    assert_eq!(src.durable.lock().unwrap()[65536], 9);
    // A trim the source ignores is recorded as dirty (abort), not as zeroes.
    assert_eq!(a.call(CMD_TRIM, 0, 0, 4096, &[]).error, 0);
    assert_eq!(a.read(0, 1).unwrap(), vec![7]);
    a.disconnect();
    b.disconnect();
    let log = sink.log.lock().unwrap().clone();
    check_serialised(&log);
    assert!(log.contains(&Event::Abort {
        offset: 0,
        len: 4096,
        cookie: 4
    }));
    stop.shutdown();
    t.join().unwrap();
}

#[test]
fn flush_with_io_uring_after_multi_conn_writes() {
    let f = serve_one(SIZE);
    let mut a = Client::go(&f.sock, "vol", Mode::Extended, false);
    let mut b = Client::go(&f.sock, "vol", Mode::Structured, false);
    for i in 0..16u64 {
        assert_eq!(a.write(i * 4096, &[i as u8 + 1; 4096]), 0);
    }
    assert_eq!(b.call(CMD_FLUSH, 0, 0, 0, &[]).error, 0);
    let d = read_file(&f.files[0]);
    for i in 0..16u64 {
        assert_eq!(d[(i * 4096) as usize], i as u8 + 1);
    }
    assert_eq!(b.read(15 * 4096, 4).unwrap(), vec![16; 4]);
    a.disconnect();
    b.disconnect();
}

#[test]
fn pipelined_reads_and_writes_on_one_connection() {
    let f = serve_one(SIZE);
    for mode in [Mode::Simple, Mode::Structured, Mode::Extended] {
        let mut c = Client::go(&f.sock, "vol", mode, mode != Mode::Simple);
        let mut expect = HashMap::new();
        for i in 0..64u64 {
            let h = c.send(
                CMD_WRITE,
                if i % 5 == 0 { CMD_FLAG_FUA } else { 0 },
                i * 8192,
                8192,
                &[i as u8; 8192],
            );
            expect.insert(h, None);
        }
        for _ in 0..64 {
            let r = c.recv();
            assert_eq!(r.error, 0);
            assert!(expect.remove(&r.handle).is_some());
        }
        for i in 0..64u64 {
            let h = c.send(CMD_READ, 0, i * 8192, 8192, &[]);
            expect.insert(h, Some(i as u8));
        }
        for _ in 0..64 {
            let r = c.recv();
            let v = expect.remove(&r.handle).unwrap().unwrap();
            assert!(r.data.len() == 8192 && r.data.iter().all(|&b| b == v));
        }
        if mode != Mode::Simple {
            let r = c.call(CMD_BLOCK_STATUS, 0, 0, SIZE, &[]);
            assert_eq!(r.error, 0);
            assert_eq!(r.extents.iter().map(|e| e.0).sum::<u64>(), SIZE);
            let r = c.call(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, SIZE, &[]);
            assert_eq!(r.extents.len(), 1);
        }
        c.disconnect();
    }
}

#[test]
fn large_write_zeroes_beyond_max_payload() {
    let f = serve_one(256 << 20);
    let mut c = Client::go(&f.sock, "vol", Mode::Structured, true);
    assert_eq!(c.write(100 << 20, &[3; 4096]), 0);
    // 192 MiB WRITE_ZEROES (no payload) is accepted although max is 32 MiB.
    assert_eq!(c.call(CMD_WRITE_ZEROES, 0, 0, 192 << 20, &[]).error, 0);
    assert_eq!(c.read(100 << 20, 4096).unwrap(), vec![0; 4096]);
    let r = c.call(CMD_BLOCK_STATUS, 0, 0, 192 << 20, &[]);
    assert_eq!(r.extents, vec![(192 << 20, STATE_HOLE | STATE_ZERO)]);
    assert_eq!(
        c.call(
            CMD_WRITE_ZEROES,
            CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            0,
            1 << 20,
            &[]
        )
        .error,
        0
    );
    assert_eq!(c.call(CMD_TRIM, CMD_FLAG_FUA, 0, 256 << 20, &[]).error, 0);
    c.disconnect();
}
