//! Codec tests: round trips of every frame, typed errors for corrupt,
//! truncated, oversized and inconsistent frames, and property tests that
//! decoding never panics nor over-allocates.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Cursor;

use proptest::prelude::*;
use replicator::wire::*;

const MAX: u32 = DEFAULT_MAX_FRAME;

/// Global allocator recording, per thread, the largest single allocation
/// (so the property tests can assert that no allocation is sized by an
/// untrusted length).
struct Largest;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: delegates every operation to the system allocator unchanged; the
// bookkeeping touches only a const-initialised thread-local Cell (no
// allocation, no reentrancy).
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|c| c.set(c.get().max(l.size())));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|c| c.set(c.get().max(new)));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

/// Runs `f` and returns the largest single allocation it made.
fn largest_alloc(f: impl FnOnce()) -> usize {
    LARGEST.with(|c| c.set(0));
    f();
    LARGEST.with(|c| c.get())
}

/// No decode of a small input may allocate more than this at once (the
/// initial buffers of `read_frame` and the decompressor are capped at 64 KiB
/// and 256 KiB whatever the frame claims).
const ALLOC_CAP: usize = 300 << 10;

fn data_extents() -> Vec<Extent> {
    vec![
        Extent {
            offset: 0,
            len: 4096,
            kind: ExtentKind::Data,
        },
        Extent {
            offset: 8192,
            len: 4096,
            kind: ExtentKind::Zero,
        },
        Extent {
            offset: 1 << 30,
            len: 512,
            kind: ExtentKind::Data,
        },
    ]
}

fn sample_data() -> Vec<u8> {
    (0..4096 + 512).map(|i| (i % 251) as u8).collect()
}

/// One frame of every type (and both compressions where relevant).
pub fn samples() -> Vec<Frame> {
    let data = sample_data();
    vec![
        Frame::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            max_frame: MAX,
            volume_name: "db-data".into(),
            volume_uuid: [7; 16],
            generation: 3,
            size: 10 << 30,
            block_size: 4096,
            source_host: "src-01.example".into(),
        }),
        Frame::Welcome(Welcome {
            accepted: true,
            protocol_version: 1,
            max_frame: MAX,
            durable_seq: 1234,
            applied_seq: 1200,
            replica_size: 10 << 30,
            resync: Some(ResyncReason::SizeChanged),
        }),
        Frame::Welcome(Welcome {
            accepted: false,
            protocol_version: 1,
            max_frame: MAX,
            durable_seq: 0,
            applied_seq: 0,
            replica_size: 0,
            resync: None,
        }),
        Frame::Chunk(
            Chunk::build(
                10,
                20,
                1_700_000_000_000_000_000,
                data_extents(),
                &data,
                Compression::None,
            )
            .unwrap(),
        ),
        Frame::Chunk(Chunk::build(10, 20, 5, data_extents(), &data, Compression::Zstd(1)).unwrap()),
        Frame::Chunk(Chunk::build(0, 0, 5, data_extents(), &data, Compression::Zstd(19)).unwrap()),
        Frame::Chunk(Chunk::build(0, 0, 0, vec![], &[], Compression::None).unwrap()),
        Frame::Chunk(
            Chunk::build(10, 20, 5, data_extents(), &data, Compression::None)
                .and_then(|c| c.with_horizon(25))
                .unwrap(),
        ),
        Frame::Chunk(
            Chunk::build(0, 0, 5, data_extents(), &data, Compression::None)
                .and_then(|c| c.with_horizon(7))
                .unwrap(),
        ),
        Frame::Tag(Tag {
            seq: 99,
            name: "nightly-backup ✓".into(),
            kind: TagKind::App,
            uuid: [9; 16],
            source_time_ns: 42,
        }),
        Frame::Tag(Tag {
            seq: 1,
            name: String::new(),
            kind: TagKind::User,
            uuid: [0; 16],
            source_time_ns: 0,
        }),
        Frame::ResyncRequest(ResyncRequest {
            offset: 1 << 20,
            len: 64 << 20,
            hash_block: 1 << 20,
        }),
        Frame::ResyncHashes(ResyncHashes {
            offset: 0,
            hash_block: 65536,
            hashes: (0..100u8).map(|i| *blake3::hash(&[i]).as_bytes()).collect(),
        }),
        Frame::ResyncData(ResyncData::build(4096, &data, Compression::None).unwrap()),
        Frame::ResyncData(ResyncData::build(4096, &data, Compression::Zstd(3)).unwrap()),
        Frame::ResyncData(ResyncData {
            horizon_seq: 1234,
            ..ResyncData::build(0, &data, Compression::None).unwrap()
        }),
        Frame::Ack(Ack {
            durable_seq: 20,
            applied_seq: 10,
            spool_bytes: 1 << 20,
            spool_budget: 512 << 20,
        }),
        Frame::Heartbeat(Heartbeat { time_ns: u64::MAX }),
        Frame::Error(ErrorFrame {
            code: ErrorCode::GenerationMismatch,
            message: "generation 3 != 4".into(),
        }),
        Frame::Error(ErrorFrame {
            code: ErrorCode::Other(999),
            message: String::new(),
        }),
    ]
}

#[test]
fn every_frame_round_trips() {
    for f in samples() {
        let buf = f.encode(MAX).unwrap();
        assert_eq!(&buf[..4], b"RWND");
        assert_eq!(decode(&buf, MAX).unwrap(), f, "decode {:?}", f.frame_type());
        let mut cur = Cursor::new(buf.clone());
        assert_eq!(
            read_frame(&mut cur, MAX).unwrap(),
            f,
            "read_frame {:?}",
            f.frame_type()
        );
        let mut out = Vec::new();
        write_frame(&mut out, &f, MAX).unwrap();
        assert_eq!(out, buf);
    }
}

#[test]
fn stream_of_frames() {
    let mut out = Vec::new();
    for f in samples() {
        write_frame(&mut out, &f, MAX).unwrap();
    }
    let mut cur = Cursor::new(out);
    for f in samples() {
        assert_eq!(read_frame(&mut cur, MAX).unwrap(), f);
    }
    // Clean end of stream is an I/O error (UnexpectedEof), not Truncated.
    let e = read_frame(&mut cur, MAX).unwrap_err();
    assert!(e.is_io(), "{e}");
}

#[test]
fn chunk_data_and_split() {
    let data = sample_data();
    for c in [
        Compression::None,
        Compression::Zstd(1),
        Compression::Zstd(-5),
    ] {
        let chunk = Chunk::build(1, 2, 3, data_extents(), &data, c).unwrap();
        let got = chunk.data(MAX.into()).unwrap();
        assert_eq!(&got[..], &data[..]);
        let parts: Vec<_> = chunk.split(&got).collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].1.unwrap(), &data[..4096]);
        assert!(parts[1].1.is_none());
        assert_eq!(parts[2].1.unwrap(), &data[4096..]);
    }
}

#[test]
fn header_layout_is_documented_one() {
    let f = Frame::Heartbeat(Heartbeat {
        time_ns: 0x0102030405060708,
    });
    let b = f.encode(MAX).unwrap();
    assert_eq!(b.len(), HEADER_LEN + 8);
    assert_eq!(&b[0..4], b"RWND");
    assert_eq!(&b[4..6], &[2, 0]); // version 2, LE
    assert_eq!(b[6], 9); // Heartbeat
    assert_eq!(b[7], 0); // flags
    assert_eq!(&b[8..12], &[8, 0, 0, 0]); // payload length
    assert_eq!(&b[12..44], blake3::hash(&b[44..]).as_bytes());
    assert_eq!(&b[44..], &[8, 7, 6, 5, 4, 3, 2, 1]);
}

fn reseal(buf: &mut [u8]) {
    let h = blake3::hash(&buf[HEADER_LEN..]);
    buf[12..44].copy_from_slice(h.as_bytes());
}

#[test]
fn flipped_bits_are_checksum_errors() {
    for f in samples() {
        let buf = f.encode(MAX).unwrap();
        for i in [HEADER_LEN, buf.len() - 1, (HEADER_LEN + buf.len()) / 2] {
            if i >= buf.len() {
                continue;
            }
            for bit in [0, 7] {
                let mut b = buf.clone();
                b[i] ^= 1 << bit;
                assert!(
                    matches!(decode(&b, MAX), Err(WireError::Checksum)),
                    "{:?} byte {i}",
                    f.frame_type()
                );
            }
        }
        // A flipped bit in the checksum itself.
        let mut b = buf.clone();
        b[20] ^= 4;
        assert!(matches!(decode(&b, MAX), Err(WireError::Checksum)));
    }
}

#[test]
fn header_errors() {
    let buf = Frame::Heartbeat(Heartbeat { time_ns: 1 })
        .encode(MAX)
        .unwrap();
    let mut b = buf.clone();
    b[0] = b'X';
    assert!(matches!(decode(&b, MAX), Err(WireError::BadMagic(_))));
    for v in [PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1] {
        let mut b = buf.clone();
        b[4..6].copy_from_slice(&v.to_le_bytes());
        assert!(matches!(
            decode(&b, MAX),
            Err(WireError::UnsupportedVersion(x)) if x == v
        ));
    }
    let mut b = buf.clone();
    b[6] = 200;
    assert!(matches!(decode(&b, MAX), Err(WireError::UnknownType(200))));
    let mut b = buf.clone();
    b[6] = 0;
    assert!(matches!(decode(&b, MAX), Err(WireError::UnknownType(0))));
    let mut b = buf.clone();
    b[7] = 0x80;
    assert!(matches!(
        decode(&b, MAX),
        Err(WireError::UnknownFlags(0x80))
    ));
}

#[test]
fn truncated_frames() {
    for f in samples() {
        let buf = f.encode(MAX).unwrap();
        for cut in [0, 1, HEADER_LEN - 1, HEADER_LEN, buf.len() - 1] {
            if cut >= buf.len() {
                continue;
            }
            let e = decode(&buf[..cut], MAX).unwrap_err();
            assert!(matches!(e, WireError::Truncated(_)), "cut {cut}: {e}");
            let e = read_frame(&mut Cursor::new(&buf[..cut]), MAX).unwrap_err();
            if cut == 0 {
                assert!(e.is_io());
            } else {
                assert!(
                    matches!(e, WireError::Truncated(_)),
                    "stream cut {cut}: {e}"
                );
            }
        }
    }
}

#[test]
fn trailing_bytes() {
    let mut buf = Frame::Heartbeat(Heartbeat { time_ns: 1 })
        .encode(MAX)
        .unwrap();
    buf.push(0);
    assert!(matches!(
        decode(&buf, MAX),
        Err(WireError::TrailingBytes(1))
    ));
    // A payload longer than its fields (length and checksum fixed up).
    buf[8] = 9;
    reseal(&mut buf);
    assert!(matches!(
        decode(&buf, MAX),
        Err(WireError::TrailingBytes(1))
    ));
}

#[test]
fn oversized_frames() {
    let data = vec![0u8; 2 << 20];
    let ext = vec![Extent {
        offset: 0,
        len: data.len() as u32,
        kind: ExtentKind::Data,
    }];
    let f = Frame::Chunk(Chunk::build(1, 1, 0, ext, &data, Compression::None).unwrap());
    // Encoder refuses over the maximum.
    assert!(matches!(f.encode(1 << 20), Err(WireError::TooLong { .. })));
    let buf = f.encode(MAX).unwrap();
    // Decoder refuses over the negotiated maximum, from the header alone.
    assert!(matches!(
        decode(&buf, 1 << 20),
        Err(WireError::TooLong { .. })
    ));
    assert!(matches!(
        read_frame(&mut Cursor::new(&buf[..HEADER_LEN]), 1 << 20),
        Err(WireError::TooLong { .. })
    ));
    // A header announcing 4 GiB with nothing behind it: TooLong, no allocation.
    let mut h = buf[..HEADER_LEN].to_vec();
    h[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        read_frame(&mut Cursor::new(&h), MAX),
        Err(WireError::TooLong { .. })
    ));
    // Announcing the maximum but sending 10 bytes: truncated.
    h[8..12].copy_from_slice(&MAX.to_le_bytes());
    h.extend_from_slice(&[0; 10]);
    assert!(matches!(
        read_frame(&mut Cursor::new(&h), MAX),
        Err(WireError::Truncated(_))
    ));
}

fn raw_chunk(extents: &[(u64, u32, u8)], comp: [u8; 2], payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&1u64.to_le_bytes());
    p.extend_from_slice(&1u64.to_le_bytes());
    p.extend_from_slice(&0u64.to_le_bytes()); // source_time_ns
    p.extend_from_slice(&0u64.to_le_bytes()); // horizon_seq
    p.extend_from_slice(&comp);
    p.extend_from_slice(&(extents.len() as u32).to_le_bytes());
    for (o, l, k) in extents {
        p.extend_from_slice(&o.to_le_bytes());
        p.extend_from_slice(&l.to_le_bytes());
        p.push(*k);
    }
    p.extend_from_slice(payload);
    let mut b = vec![0u8; HEADER_LEN];
    b[0..4].copy_from_slice(b"RWND");
    b[4] = 2;
    b[6] = FrameType::Chunk as u8;
    b[8..12].copy_from_slice(&(p.len() as u32).to_le_bytes());
    b.extend_from_slice(&p);
    reseal(&mut b);
    b
}

#[test]
fn inconsistent_extents() {
    let ok = raw_chunk(&[(0, 4, 0), (4, 4, 1)], [0, 0], &[1, 2, 3, 4]);
    assert!(decode(&ok, MAX).is_ok());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "overlap",
            raw_chunk(&[(0, 4, 0), (2, 4, 0)], [0, 0], &[0; 8]),
        ),
        (
            "out of order",
            raw_chunk(&[(8, 4, 0), (0, 4, 0)], [0, 0], &[0; 8]),
        ),
        ("empty extent", raw_chunk(&[(0, 0, 0)], [0, 0], &[])),
        ("payload short", raw_chunk(&[(0, 4, 0)], [0, 0], &[0; 3])),
        ("payload long", raw_chunk(&[(0, 4, 0)], [0, 0], &[0; 5])),
        (
            "zero extent has no data",
            raw_chunk(&[(0, 4, 1)], [0, 0], &[0; 4]),
        ),
        ("unknown kind", raw_chunk(&[(0, 4, 7)], [0, 0], &[0; 4])),
        ("wraps", raw_chunk(&[(u64::MAX - 1, 4, 1)], [0, 0], &[])),
    ];
    for (what, b) in cases {
        let e = decode(&b, MAX).unwrap_err();
        assert!(matches!(e, WireError::Extents(_)), "{what}: {e}");
    }
    // Extent count claiming more than the bytes present: truncated, and the
    // Vec is never sized from the claim.
    let mut b = raw_chunk(&[], [0, 0], &[]);
    let at = HEADER_LEN + 34; // seqs, time, horizon (8 each), compression (2)
    b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    reseal(&mut b);
    assert!(matches!(decode(&b, MAX), Err(WireError::Truncated(_))));
    // Data extents summing over the bound.
    let b = raw_chunk(&[(0, u32::MAX, 0)], [1, 1], &[]);
    assert!(matches!(
        decode(&b, MAX),
        Err(WireError::DecompressedTooLarge(_))
    ));
    // Bad sequence pair.
    let mut b = raw_chunk(&[], [0, 0], &[]);
    b[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&5u64.to_le_bytes());
    reseal(&mut b);
    assert!(matches!(decode(&b, MAX), Err(WireError::Invalid { .. })));
    // A horizon below last_seq (the raw chunk covers 1..=1).
    let mut b = raw_chunk(&[], [0, 0], &[]);
    b[HEADER_LEN + 24..HEADER_LEN + 32].copy_from_slice(&7u64.to_le_bytes());
    reseal(&mut b);
    assert!(decode(&b, MAX).is_ok(), "horizon above last_seq is valid");
    b[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&9u64.to_le_bytes());
    b[HEADER_LEN + 8..HEADER_LEN + 16].copy_from_slice(&9u64.to_le_bytes());
    reseal(&mut b);
    assert!(matches!(decode(&b, MAX), Err(WireError::Invalid { .. })));
    // Encoder refuses the same inconsistencies.
    let bad = Chunk {
        first_seq: 1,
        last_seq: 1,
        source_time_ns: 0,
        horizon_seq: 0,
        compression: Compression::None,
        extents: vec![Extent {
            offset: 0,
            len: 4,
            kind: ExtentKind::Data,
        }],
        payload: vec![0; 3],
    };
    assert!(Frame::Chunk(bad).encode(MAX).is_err());
    assert!(Chunk::build(
        1,
        1,
        0,
        vec![
            Extent {
                offset: 4,
                len: 4,
                kind: ExtentKind::Data
            },
            Extent {
                offset: 0,
                len: 4,
                kind: ExtentKind::Data
            }
        ],
        &[0; 8],
        Compression::None
    )
    .is_err());
}

#[test]
fn decompression_bomb_is_bounded() {
    // 32 MiB of zeroes compress to a few KiB; declared extents say 4 KiB.
    let big = vec![0u8; 32 << 20];
    let z = compress(&big, Compression::Zstd(1)).unwrap();
    assert!(z.len() < 64 << 10);
    // The frame header of the zstd stream declares 32 MiB: caught at decode.
    let b = raw_chunk(&[(0, 4096, 0)], [1, 1], &z);
    let e = decode(&b, MAX).unwrap_err();
    assert!(matches!(e, WireError::Extents(_)), "{e}");
    // Without a declared size (streaming encoder), caught at decompression.
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
    std::io::Write::write_all(&mut enc, &big).unwrap();
    let z = enc.finish().unwrap();
    let b = raw_chunk(&[(0, 4096, 0)], [1, 1], &z);
    let Frame::Chunk(c) = decode(&b, MAX).unwrap() else {
        panic!("not a chunk")
    };
    let e = c.data(MAX.into()).unwrap_err();
    assert!(
        matches!(
            e,
            WireError::DecompressedTooLarge(_) | WireError::Decompress(_)
        ),
        "{e}"
    );
    // Short output is an error too.
    let z = compress(&[1, 2, 3], Compression::Zstd(1)).unwrap();
    assert!(decompress(&z, Compression::Zstd(1), 4, 100).is_err());
    assert!(decompress(&z, Compression::Zstd(1), 3, 2).is_err());
    assert_eq!(
        &decompress(&z, Compression::Zstd(1), 3, 3).unwrap()[..],
        &[1, 2, 3]
    );
    // Garbage is an error, not a panic.
    assert!(decompress(
        &[0xde, 0xad, 0xbe, 0xef, 0, 0, 0],
        Compression::Zstd(1),
        10,
        100
    )
    .is_err());
}

#[test]
fn field_domains() {
    let mut h = match &samples()[0] {
        Frame::Hello(h) => h.clone(),
        _ => unreachable!(),
    };
    h.volume_name = String::new();
    assert!(Frame::Hello(h.clone()).encode(MAX).is_err());
    h.volume_name = "x".repeat(MAX_NAME + 1);
    assert!(Frame::Hello(h.clone()).encode(MAX).is_err());
    // Error messages are truncated, never refused.
    let e = Frame::Error(ErrorFrame {
        code: ErrorCode::Internal,
        message: "é".repeat(MAX_MESSAGE),
    });
    let Frame::Error(got) = decode(&e.encode(MAX).unwrap(), MAX).unwrap() else {
        panic!()
    };
    assert!(got.message.len() <= MAX_MESSAGE);
    // Invalid UTF-8 in a string.
    let f = Frame::Tag(Tag {
        seq: 1,
        name: "ab".into(),
        kind: TagKind::Fs,
        uuid: [0; 16],
        source_time_ns: 0,
    });
    let mut b = f.encode(MAX).unwrap();
    let n = b.len();
    b[n - 1] = 0xff;
    reseal(&mut b);
    assert!(matches!(decode(&b, MAX), Err(WireError::Invalid { .. })));
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    let n = samples().len();
    (
        0..n,
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(move |(i, a, b, bytes)| match samples().swap_remove(i) {
            Frame::Ack(_) => Frame::Ack(Ack {
                durable_seq: a,
                applied_seq: b,
                spool_bytes: a ^ b,
                spool_budget: b,
            }),
            Frame::Heartbeat(_) => Frame::Heartbeat(Heartbeat { time_ns: a }),
            Frame::Error(_) => Frame::Error(ErrorFrame {
                code: ErrorCode::from_u16(a as u16),
                message: String::from_utf8_lossy(&bytes).into_owned(),
            }),
            Frame::Chunk(_) if !bytes.is_empty() => {
                let ext = vec![Extent {
                    offset: a >> 1,
                    len: bytes.len() as u32,
                    kind: ExtentKind::Data,
                }];
                let (f, l) = if a % 2 == 0 {
                    (0, 0)
                } else {
                    (1 + (b >> 2), 1 + (b >> 2) + (a >> 60))
                };
                let comp = if b % 2 == 0 {
                    Compression::None
                } else {
                    Compression::Zstd(1)
                };
                Frame::Chunk(Chunk::build(f, l, a, ext, &bytes, comp).unwrap())
            }
            other => other,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn generated_frames_round_trip(f in arb_frame()) {
        let b = f.encode(MAX).unwrap();
        prop_assert_eq!(decode(&b, MAX).unwrap(), f);
    }

    /// Random bytes: always an error or a frame, never a panic. Bytes after
    /// a valid magic/version header exercise the payload decoders too.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), ty in 0u8..12, seal in any::<bool>()) {
        let peak = largest_alloc(|| { let _ = decode(&bytes, MAX); let _ = read_frame(&mut Cursor::new(&bytes), MAX); });
        prop_assert!(peak <= ALLOC_CAP, "allocated {} bytes at once", peak);
        let _ = read_frame(&mut Cursor::new(&bytes), MAX);
        let mut b = vec![0u8; HEADER_LEN];
        b[0..4].copy_from_slice(b"RWND");
        b[4] = 1;
        b[6] = ty;
        b[8..12].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
        b.extend_from_slice(&bytes);
        if seal { reseal(&mut b); }
        let peak = largest_alloc(|| {
            if let Ok(Frame::Chunk(c)) = decode(&b, MAX) {
                let _ = c.data(MAX.into());
            }
            let _ = read_frame(&mut Cursor::new(&b), MAX);
        });
        prop_assert!(peak <= ALLOC_CAP, "allocated {} bytes at once", peak);
    }

    /// Valid frames mutated (byte flips, truncation, insertion), with the
    /// checksum recomputed so the payload decoders see the damage.
    #[test]
    fn mutated_frames_never_panic(f in arb_frame(), pos in any::<usize>(), val in any::<u8>(), op in 0u8..4) {
        let mut b = f.encode(MAX).unwrap();
        let i = pos % b.len();
        match op {
            0 => b[i] ^= val | 1,
            1 => b.truncate(i),
            2 => b.insert(i, val),
            _ => { if i >= HEADER_LEN { b[i] = val; } }
        }
        if b.len() >= HEADER_LEN {
            let plen = (b.len() - HEADER_LEN) as u32;
            if op >= 2 { b[8..12].copy_from_slice(&plen.to_le_bytes()); }
            let _ = decode(&b, MAX);
            reseal(&mut b);
        }
        let peak = largest_alloc(|| {
            match decode(&b, MAX) {
                Ok(Frame::Chunk(c)) => { let _ = c.data(MAX.into()); }
                Ok(Frame::ResyncData(d)) => { let _ = d.data(MAX.into()); }
                _ => {}
            }
            let _ = read_frame(&mut Cursor::new(&b), MAX);
        });
        prop_assert!(peak <= ALLOC_CAP, "allocated {} bytes at once", peak);
    }
}

/// A reader that fails the test if anyone reads far beyond what a bounded
/// decoder needs, and counts the bytes consumed.
struct Tracking<'a> {
    data: &'a [u8],
    consumed: usize,
}

impl std::io::Read for Tracking<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        self.consumed += n;
        Ok(n)
    }
}

#[test]
fn read_frame_reads_exactly_one_frame() {
    let mut all = Vec::new();
    let a = Frame::Heartbeat(Heartbeat { time_ns: 1 })
        .encode(MAX)
        .unwrap();
    all.extend_from_slice(&a);
    all.extend_from_slice(
        &Frame::Heartbeat(Heartbeat { time_ns: 2 })
            .encode(MAX)
            .unwrap(),
    );
    let mut t = Tracking {
        data: &all,
        consumed: 0,
    };
    read_frame(&mut t, MAX).unwrap();
    assert_eq!(t.consumed, a.len());
}

/// The target's by-value conversion of a chunk frame (whose data extents are
/// slices of the received payload, not copies) gives what the by-reference
/// one gives, and refuses what it refuses.
#[test]
fn store_chunk_by_value_equals_by_reference() {
    use replicator::target::{StoreChunk, StoreData};
    let mut data = vec![0u8; 3 * 4096];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    let d = |offset: u64, len: u32| Extent {
        offset,
        len,
        kind: ExtentKind::Data,
    };
    let z = |offset: u64, len: u32| Extent {
        offset,
        len,
        kind: ExtentKind::Zero,
    };
    let shapes: Vec<(Vec<Extent>, usize)> = vec![
        (vec![d(8192, 3 * 4096)], 3 * 4096),
        (vec![z(0, 8192), d(8192, 4096), z(65536, 4096)], 4096),
        (vec![d(0, 4096), d(65536, 8192)], 3 * 4096),
        (vec![z(0, 4096)], 0),
    ];
    for (extents, n) in shapes {
        for comp in [Compression::None, Compression::Zstd(1)] {
            let c = Chunk::build(5, 9, 77, extents.clone(), &data[..n], comp).unwrap();
            let payload = c.payload.as_ptr_range();
            let by_ref = StoreChunk::from_chunk(&c, 1 << 20).unwrap();
            let by_value = StoreChunk::from_chunk_owned(c, 1 << 20).unwrap();
            assert_eq!(by_ref, by_value, "{extents:?} {comp:?}");
            if comp == Compression::None {
                // No copy: every data extent lies in the received payload.
                for e in &by_value.extents {
                    if let StoreData::Data(b) = &e.data {
                        let r = b.as_ptr_range();
                        assert!(
                            payload.start <= r.start && r.end <= payload.end,
                            "extent at {} was copied out of the payload",
                            e.offset
                        );
                    }
                }
            }
        }
    }
    // A payload shorter than its data extent: refused both ways.
    let mut c = Chunk::build(5, 9, 77, vec![d(0, 8192)], &data[..8192], Compression::None).unwrap();
    c.payload.truncate(4096);
    assert!(StoreChunk::from_chunk(&c, 1 << 20).is_err());
    assert!(StoreChunk::from_chunk_owned(c, 1 << 20).is_err());
    // Over the decompression bound: refused both ways.
    let c = Chunk::build(
        5,
        9,
        77,
        vec![d(0, 8192)],
        &data[..8192],
        Compression::Zstd(1),
    )
    .unwrap();
    assert!(StoreChunk::from_chunk(&c, 4096).is_err());
    assert!(StoreChunk::from_chunk_owned(c, 4096).is_err());
}
