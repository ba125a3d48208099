//! Verification after a replay: the source against the model, the replica
//! (after it drained) against the model and byte for byte against the
//! source, and the recovery points against the model's history.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use filter_nbd::client::{ConnectOptions, Connection, NbdUri};
use serde_json::{json, Value};

use super::block::BLOCK;
use super::model::{self, block_hash, Digest, Mismatch, Model};
use super::{PointRec, ReplayArgs};

/// Largest read issued by the checks.
const RUN: u64 = 256;
/// Mismatches listed per check (all are counted).
const LIST: usize = 50;

/// Something blocks can be read from.
pub trait BlockReader {
    /// Reads `len` bytes at `offset`.
    fn read(&mut self, offset: u64, len: u64) -> Result<Vec<u8>>;
    /// Size in bytes.
    fn size(&self) -> u64;
}

/// Reads over NBD.
pub struct NbdReader(pub Connection);

impl BlockReader for NbdReader {
    fn read(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        Ok(self.0.read(offset, len)?)
    }
    fn size(&self) -> u64 {
        self.0.info.size
    }
}

/// Reads a file or block device.
pub struct FileReader {
    file: File,
    size: u64,
}

impl FileReader {
    /// Opens `path` read-only.
    pub fn open(path: &std::path::Path) -> Result<FileReader> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = std::fs::metadata(path)?.len();
        let size = if size == 0 {
            // a block device: its size is where SEEK_END lands
            use std::io::Seek;
            let mut f = &file;
            f.seek(std::io::SeekFrom::End(0))?
        } else {
            size
        };
        Ok(FileReader { file, size })
    }
}

impl BlockReader for FileReader {
    fn read(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len as usize];
        self.file.read_exact_at(&mut v, offset)?;
        Ok(v)
    }
    fn size(&self) -> u64 {
        self.size
    }
}

/// Result of checking a set of blocks.
#[derive(Debug, Default)]
pub struct Check {
    /// Blocks read and checked.
    pub checked: u64,
    /// Mismatching blocks (all of them).
    pub mismatches: Vec<Mismatch>,
    /// Digest of what was read.
    pub digest: Digest,
}

impl Check {
    fn json(&self, expected_digest: &Digest) -> Value {
        json!({
            "blocks_checked": self.checked,
            "mismatches": self.mismatches.len(),
            "first_mismatches": &self.mismatches[..self.mismatches.len().min(LIST)],
            "digest": model::hex(&self.digest),
            "expected_digest": model::hex(expected_digest),
            "digest_match": &self.digest == expected_digest,
        })
    }
}

/// Checks `blocks` (sorted) of `r` against the model at `cutoff`.
pub fn check_blocks(
    r: &mut dyn BlockReader,
    m: &Model,
    cutoff: u64,
    blocks: &[u64],
) -> Result<Check> {
    let mut c = Check::default();
    scan_blocks(r, blocks, &mut c, |b, chunk, c| {
        c.mismatches.extend(m.check(b, cutoff, chunk));
    })?;
    Ok(c)
}

/// Reads `blocks` (sorted) in runs of up to `RUN` contiguous blocks, counts
/// and digests every block into `c`, then hands it to `each`.
fn scan_blocks(
    r: &mut dyn BlockReader,
    blocks: &[u64],
    c: &mut Check,
    mut each: impl FnMut(u64, &[u8], &mut Check),
) -> Result<()> {
    let mut i = 0;
    while i < blocks.len() {
        let first = blocks[i];
        let mut j = i + 1;
        while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 && blocks[j] - first < RUN {
            j += 1;
        }
        let n = blocks[j - 1] - first + 1;
        let data = r.read(first * BLOCK, n * BLOCK)?;
        for (k, chunk) in data.chunks(BLOCK as usize).enumerate() {
            let b = first + k as u64;
            c.checked += 1;
            let h = block_hash(b * BLOCK, chunk);
            for (x, y) in c.digest.iter_mut().zip(h.iter()) {
                *x ^= y;
            }
            each(b, chunk, c);
        }
        i = j;
    }
    Ok(())
}

/// Compares two volumes block by block; returns the differing blocks.
pub fn diff_volumes(a: &mut dyn BlockReader, b: &mut dyn BlockReader) -> Result<(u64, Vec<u64>)> {
    let size = a.size().min(b.size());
    let step = 1024 * BLOCK;
    let mut off = 0;
    let mut diffs = Vec::new();
    while off < size {
        let n = step.min(size - off);
        let x = a.read(off, n)?;
        let y = b.read(off, n)?;
        if x != y {
            for (i, (p, q)) in x
                .chunks(BLOCK as usize)
                .zip(y.chunks(BLOCK as usize))
                .enumerate()
            {
                if p != q {
                    diffs.push(off / BLOCK + i as u64);
                }
            }
        }
        off += n;
    }
    Ok((size.div_ceil(BLOCK), diffs))
}

/// What `verify_all` found.
pub struct Outcome {
    /// Total mismatches.
    pub mismatches: u64,
    /// The report section.
    pub json: Value,
}

fn connect(uri: &NbdUri) -> Result<NbdReader> {
    Ok(NbdReader(
        Connection::connect(uri, &ConnectOptions::default())
            .with_context(|| format!("connecting to {uri}"))?,
    ))
}

/// Waits until every touched block of `r` matches the model at `cutoff`
/// (the replica drained), re-checking only the failing blocks; returns the
/// final check of all touched blocks.
pub fn wait_drained(
    r: &mut dyn BlockReader,
    m: &Model,
    cutoff: u64,
    timeout: Duration,
) -> Result<(Check, f64)> {
    let t = Instant::now();
    let all = m.touched(cutoff);
    let mut failing = all.clone();
    loop {
        let c = check_blocks(r, m, cutoff, &failing)?;
        failing = c.mismatches.iter().map(|x| x.offset / BLOCK).collect();
        if failing.is_empty() || t.elapsed() >= timeout {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let waited = t.elapsed().as_secs_f64();
    Ok((check_blocks(r, m, cutoff, &all)?, waited))
}

/// The whole `--verify` sequence.
pub fn verify_all(
    args: &ReplayArgs,
    uri: &NbdUri,
    m: &Model,
    last: u64,
    points: &[PointRec],
    timeline: Option<&super::engine::Timeline>,
) -> Result<Outcome> {
    let mut total = 0u64;
    let expected = m.digest();
    let touched = m.touched(last);
    let mut src = connect(uri)?;
    let sc = check_blocks(&mut src, m, last, &touched)?;
    total += sc.mismatches.len() as u64;
    let mut out = json!({ "source": sc.json(&expected) });

    let mut replica: Option<Box<dyn BlockReader>> = match (&args.replica, &args.replica_uri) {
        (Some(p), _) => Some(Box::new(FileReader::open(p)?)),
        (None, Some(u)) => Some(Box::new(connect(&u.parse()?)?)),
        _ => None,
    };
    if let Some(rep) = replica.as_deref_mut() {
        let (rc, waited) = wait_drained(rep, m, last, args.drain_timeout)?;
        total += rc.mismatches.len() as u64;
        let mut j = rc.json(&expected);
        j["drain_wait_seconds"] = json!(waited);
        // then the whole volume against the source
        let (blocks, diffs) = diff_volumes(&mut src, rep)?;
        let named: Vec<Value> = diffs
            .iter()
            .take(LIST)
            .map(|&b| {
                let what = m
                    .check(b, last, &rep.read(b * BLOCK, BLOCK).unwrap_or_default())
                    .map_or_else(
                        || "differs from the source".to_string(),
                        |x| format!("{}; expected {}", x.found, x.expected),
                    );
                json!({"offset": b * BLOCK, "found": what})
            })
            .collect();
        total += diffs.len() as u64;
        j["compare_with_source"] = json!({
            "blocks_compared": blocks,
            "differing_blocks": diffs.len(),
            "first_differences": named,
        });
        out["replica"] = j;
    }
    // recovery points
    let mut pj = Vec::new();
    if let Some(dir) = &args.journal_dir {
        let mut checks: Vec<(String, &'static str, journal::RecoveryPoint, Option<u64>)> =
            Vec::new();
        for p in points {
            if p.bookmarked {
                checks.push((
                    p.name.clone(),
                    "bookmark",
                    journal::RecoveryPoint::Bookmark(p.name.clone()),
                    Some(p.seq),
                ));
            }
            checks.push((
                format!("{} (time)", p.name),
                "time",
                journal::RecoveryPoint::Time(p.time_ns),
                None,
            ));
        }
        if let Some(tl) = timeline {
            let (a, b) = (
                tl.issue.get(1).copied().unwrap_or(0),
                tl.done_prefix.last().copied().unwrap_or(0),
            );
            let n = args.time_points;
            for i in 0..n {
                let t = a + (b.saturating_sub(a)) / (2 * n) * (2 * i + 1);
                checks.push((
                    format!("sampled-{i}"),
                    "time",
                    journal::RecoveryPoint::Time(t),
                    None,
                ));
            }
        }
        for (name, kind, rp, exact) in checks {
            let r = verify_point(dir, &rp, m, last, exact, timeline);
            let (mm, j) = match r {
                Ok((c, lo, hi)) => {
                    let mut j = c.json(&m.digest_at(hi));
                    if lo != hi {
                        j["digest_match"] = Value::Null; // a window has no single expected digest
                    }
                    j["cutoff_from"] = json!(lo);
                    j["cutoff_to"] = json!(hi);
                    (c.mismatches.len() as u64, j)
                }
                // a time after the newest applied chunk's source time cannot be served
                // (the journal cannot know nothing else happened): not a mismatch
                Err(e)
                    if matches!(
                        e.downcast_ref::<journal::JournalError>(),
                        Some(journal::JournalError::InFuture { .. })
                    ) =>
                {
                    (0, json!({"skipped": format!("{e:#}"), "mismatches": 0}))
                }
                // a time inside a stretch the journal knows is not write-order
                // consistent (data read back in metadata/bitmap mode, resync) is
                // refused rather than served: correct, but reported apart so a
                // run where every time point is refused is visible. (A refused
                // bookmark stays an error: the replay asked for that exact point.)
                Err(e)
                    if kind == "time"
                        && matches!(
                            e.downcast_ref::<journal::JournalError>(),
                            Some(journal::JournalError::Inconsistent(_))
                        ) =>
                {
                    (
                        0,
                        json!({"refused_inconsistent": format!("{e:#}"), "mismatches": 0}),
                    )
                }
                Err(e) => (1, json!({"error": format!("{e:#}"), "mismatches": 1})),
            };
            total += mm;
            let mut j = j;
            j["name"] = json!(name);
            j["kind"] = json!(kind);
            pj.push(j);
        }
    }
    for (seq, src) in &args.point {
        let mut r: Box<dyn BlockReader> = open_reader(src)?;
        let c = check_blocks(r.as_mut(), m, *seq, &m.touched(last))?;
        total += c.mismatches.len() as u64;
        let mut j = c.json(&m.digest_at(*seq));
        j["name"] = json!(format!("{seq}={src}"));
        j["kind"] = json!("given");
        j["cutoff_from"] = json!(seq);
        j["cutoff_to"] = json!(seq);
        pj.push(j);
    }
    out["points"] = Value::Array(pj);
    Ok(Outcome {
        mismatches: total,
        json: out,
    })
}

/// Opens a file path or an NBD URI for reading.
pub fn open_reader(src: &str) -> Result<Box<dyn BlockReader>> {
    if src.starts_with("nbd") {
        Ok(Box::new(connect(&src.parse()?)?))
    } else {
        Ok(Box::new(FileReader::open(std::path::Path::new(src))?))
    }
}

/// Checks that `r` is a write-order-consistent state of the replay that
/// includes everything answered by `t`: every block holds a state of itself,
/// and some cutoff P explains all blocks at once, where P includes every
/// operation answered by `t` and every
/// operation answered before the newest operation the view shows was sent
/// (the change log records in completion order, so a point that includes a
/// write includes everything acknowledged before that write was issued).
/// A block whose state ends before that bound is STALE (a write the point
/// must contain is missing). Reports the cutoff window `[lower bound, newest]`.
pub fn check_prefix(
    r: &mut dyn BlockReader,
    m: &Model,
    blocks: &[u64],
    tl: &super::engine::Timeline,
    t: u64,
) -> Result<(Check, u64, u64)> {
    let mut c = Check::default();
    let mut spans: Vec<(u64, u64, u64)> = Vec::with_capacity(blocks.len());
    scan_blocks(r, blocks, &mut c, |b, chunk, c| {
        match m.interval(b, chunk) {
            Some((from, to)) => spans.push((b, from, to)),
            // matches no state at all: name it against the latest state
            None => c.mismatches.extend(m.check(b, u64::MAX, chunk)),
        }
    })?;
    let newest = spans.iter().map(|s| s.1).max().unwrap_or(0);
    let lower = tl
        .done_by(t)
        .max(tl.done_by(tl.issued_at(newest).saturating_sub(1)));
    for &(b, _, to) in &spans {
        if to <= lower {
            let content = r.read(b * BLOCK, BLOCK)?;
            c.mismatches
                .extend(m.check_window(b, lower, newest.max(lower), &content));
        }
    }
    c.mismatches.sort_by_key(|x| x.offset);
    Ok((c, lower, newest.max(lower)))
}

/// Reads through a journal snapshot view (another process's target directory).
struct ViewReader(journal::SnapshotView);

impl BlockReader for ViewReader {
    fn read(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len as usize];
        self.0.read_at(&mut v, offset)?;
        Ok(v)
    }
    fn size(&self) -> u64 {
        self.0.size()
    }
}

/// Checks one recovery point: `exact` = the model cutoff it must equal (a
/// bookmark); otherwise (a time) see [`check_prefix`].
fn verify_point(
    dir: &std::path::Path,
    rp: &journal::RecoveryPoint,
    m: &Model,
    last: u64,
    exact: Option<u64>,
    timeline: Option<&super::engine::Timeline>,
) -> Result<(Check, u64, u64)> {
    let view = journal::SnapshotView::open_dir(dir, rp)
        .with_context(|| format!("opening a snapshot view at {rp:?}"))?;
    let mut r = ViewReader(view);
    let blocks = m.touched(last);
    let Some(k) = exact else {
        let tl = timeline.context("a time point needs the replay's timeline")?;
        // A time resolves to a chunk boundary at or before it (a chunk straddling the
        // time is left out). A chunk carries its newest write's time, so the writes
        // answered before that time are in the point.
        let t = r.0.point().source_time_ns.saturating_sub(1);
        return check_prefix(&mut r, m, &blocks, tl, t);
    };
    Ok((check_blocks(&mut r, m, k, &blocks)?, k, k))
}

/// One-paragraph human summary of the verify section.
pub fn summary(v: &Value) -> String {
    let mut s = String::new();
    let one = |name: &str, x: &Value| {
        format!(
            "{name}: {} blocks checked, {} mismatches{}\n",
            x["blocks_checked"],
            x["mismatches"],
            x["first_mismatches"].as_array().map_or(String::new(), |a| a
                .iter()
                .take(10)
                .map(|m| format!(
                    "\n  at {}: found {}; expected {}",
                    m["offset"],
                    m["found"].as_str().unwrap_or("?"),
                    m["expected"].as_str().unwrap_or("?")
                ))
                .collect())
        )
    };
    s.push_str(&one("source", &v["source"]));
    if v["replica"].is_object() {
        s.push_str(&one("replica", &v["replica"]));
        let c = &v["replica"]["compare_with_source"];
        s.push_str(&format!(
            "replica vs source: {} blocks compared, {} differ\n",
            c["blocks_compared"], c["differing_blocks"]
        ));
    }
    for p in v["points"].as_array().into_iter().flatten() {
        if p["skipped"].is_string() {
            s.push_str(&format!("point {}: skipped: {}\n", p["name"], p["skipped"]));
        } else if p["refused_inconsistent"].is_string() {
            s.push_str(&format!(
                "point {}: refused by the journal (not write-order consistent): {}\n",
                p["name"], p["refused_inconsistent"]
            ));
        } else if p["error"].is_string() {
            s.push_str(&format!("point {}: ERROR {}\n", p["name"], p["error"]));
        } else {
            s.push_str(&one(
                &format!(
                    "point {} (after op {}..={})",
                    p["name"].as_str().unwrap_or("?"),
                    p["cutoff_from"],
                    p["cutoff_to"]
                ),
                p,
            ));
        }
    }
    s.trim_end().to_string()
}
