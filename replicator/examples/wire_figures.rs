//! Prints codec and compression figures: frame encode/decode throughput and
//! zstd ratio/speed per level on sample data.
//!
//! `cargo run -p replicator --example wire_figures [FILE...]` (default
//! samples: system libraries, text documentation, random bytes).

use std::io::Cursor;
use std::time::Instant;

use replicator::wire::{self, Chunk, Compression, Extent, ExtentKind, Frame, DEFAULT_MAX_FRAME};

const SAMPLE: usize = 32 << 20;
const CHUNK: usize = 4 << 20;

fn collect(dir: &str, limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stack = vec![std::path::PathBuf::from(dir)];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = rd.filter_map(Result::ok).map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if out.len() >= limit {
                return out;
            }
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                out.extend_from_slice(&b[..b.len().min(limit - out.len())]);
            }
        }
    }
    out
}

fn random(n: usize) -> Vec<u8> {
    let mut x = 0x2545f4914f6cdd1du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn mbps(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut samples: Vec<(String, Vec<u8>)> = Vec::new();
    if args.is_empty() {
        samples.push((
            "libs (/usr/lib)".into(),
            collect("/usr/lib/x86_64-linux-gnu", SAMPLE),
        ));
        samples.push((
            "text (/usr/share/doc)".into(),
            collect("/usr/share/doc", SAMPLE),
        ));
        samples.push(("random".into(), random(SAMPLE)));
    } else {
        for a in args {
            samples.push((a.clone(), std::fs::read(&a)?));
        }
    }
    for (name, data) in &samples {
        let data = &data[..data.len() - data.len() % 4096];
        if data.is_empty() {
            continue;
        }
        println!("sample {name}: {} MiB", data.len() >> 20);
        for comp in [
            Compression::None,
            Compression::Zstd(1),
            Compression::Zstd(3),
        ] {
            let (mut wire_bytes, mut t_build, mut t_enc, mut t_dec, mut t_data) =
                (0usize, 0.0, 0.0, 0.0, 0.0);
            for (i, piece) in data.chunks(CHUNK).enumerate() {
                let ext = vec![Extent {
                    offset: (i * CHUNK) as u64,
                    len: piece.len() as u32,
                    kind: ExtentKind::Data,
                }];
                let t = Instant::now();
                let c = Chunk::build(1 + i as u64, 1 + i as u64, 0, ext, piece, comp)?;
                t_build += t.elapsed().as_secs_f64();
                let t = Instant::now();
                let buf = Frame::Chunk(c).encode(DEFAULT_MAX_FRAME)?;
                t_enc += t.elapsed().as_secs_f64();
                wire_bytes += buf.len();
                let t = Instant::now();
                let f = wire::read_frame(&mut Cursor::new(&buf), DEFAULT_MAX_FRAME)?;
                t_dec += t.elapsed().as_secs_f64();
                let t = Instant::now();
                if let Frame::Chunk(c) = f {
                    let d = c.data(DEFAULT_MAX_FRAME.into())?;
                    assert_eq!(&d[..], piece);
                }
                t_data += t.elapsed().as_secs_f64();
            }
            println!(
                "  {comp:?}: wire/raw {:.3}  compress {:.0} MB/s  encode(frame+blake3) {:.0} MB/s  \
                 read_frame(verify+decode) {:.0} MB/s  decompress {:.0} MB/s",
                wire_bytes as f64 / data.len() as f64,
                mbps(data.len(), t_build),
                mbps(data.len(), t_enc),
                mbps(data.len(), t_dec),
                mbps(data.len(), t_data),
            );
        }
    }
    Ok(())
}
