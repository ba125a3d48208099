//! Bookmarks (tags): named, typed points in the change stream.
//!
//! Durable in `<dir>/bookmarks.log` (append + fdatasync before
//! [`TargetVolume::record_bookmark`] returns; the source of truth) and mirrored in
//! the catalogue table `bookmarks` (derived: rebuilt from the log at every
//! open, so losing the catalogue loses nothing). Removing bookmarks (rollback,
//! retention) rewrites the log atomically (temporary file, fsync, rename,
//! directory fsync). Layout in `docs/journal-format.md`.

use crate::error::{corrupt, ioe, JournalError, Result};
use crate::format::*;
use crate::fsutil::*;
use crate::{TargetVolume, VolumeIdentity};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use tracing::warn;

pub(crate) const BOOKMARK_FILE: &str = "bookmarks.log";
const BOOKMARK_TMP: &str = "bookmarks.log.tmp";

/// Kind of a bookmark (the replicator's tag type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BookmarkKind {
    /// Application consistent (the application was quiesced).
    App,
    /// File-system consistent (the file system was frozen/synced).
    Fs,
    /// User defined.
    User,
}

impl BookmarkKind {
    /// Wire/disk code (1 app, 2 fs, 3 user), the replicator's `TagKind` numbering.
    pub fn code(self) -> u8 {
        match self {
            BookmarkKind::App => 1,
            BookmarkKind::Fs => 2,
            BookmarkKind::User => 3,
        }
    }

    /// Inverse of [`BookmarkKind::code`].
    pub fn from_code(c: u8) -> Option<BookmarkKind> {
        match c {
            1 => Some(BookmarkKind::App),
            2 => Some(BookmarkKind::Fs),
            3 => Some(BookmarkKind::User),
            _ => None,
        }
    }
}

/// A bookmark at ring sequence `seq`: the state containing every change with a
/// sequence number below `seq` and nothing after.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bookmark {
    /// Name (UTF-8, ≤ 1024 bytes). Names may repeat; lookups by name take the newest.
    pub name: String,
    /// Kind.
    pub kind: BookmarkKind,
    /// UUID (shared by the volumes of a group bookmark; the idempotence key).
    pub uuid: [u8; 16],
    /// Ring sequence number of the tag record.
    pub seq: u64,
    /// Source time, ns since the Unix epoch (UTC).
    pub source_time_ns: u64,
}

/// Result of [`TargetVolume::record_bookmark`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BookmarkOutcome {
    /// Recorded durably.
    Recorded,
    /// A bookmark with the same uuid (or the same name and seq) exists: nothing changed.
    Duplicate,
}

/// A bookmark and its position: the state after chunk `chunk_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredBookmark {
    pub(crate) bookmark: Bookmark,
    pub(crate) chunk_id: u64,
}

fn encode(b: &StoredBookmark, out: &mut Vec<u8>) {
    let start = out.len();
    let name = b.bookmark.name.as_bytes();
    encode_rec_header(
        &RecHeader {
            magic: REC_BOOKMARK,
            flags: b.bookmark.kind.code(),
            body_len: 16 + name.len() as u64,
            id: b.chunk_id,
            first_seq: 0,
            last_seq: b.bookmark.seq,
            time_ns: b.bookmark.source_time_ns,
            n_extents: 0,
            aux: 0,
        },
        out,
    );
    out.extend_from_slice(&b.bookmark.uuid);
    out.extend_from_slice(name);
    let h = hash32(&out[start..]);
    out.extend_from_slice(&h);
}

/// Parse one record at the start of `b`: the bookmark and the record length.
fn parse(b: &[u8]) -> std::result::Result<(StoredBookmark, usize), String> {
    if b.len() < REC_HDR {
        return Err("truncated record header".into());
    }
    let h = decode_rec_header(&b[..REC_HDR]);
    if h.magic != REC_BOOKMARK {
        return Err("bad record magic".into());
    }
    let total = record_len(&h).ok_or("record length overflow")?;
    if total > b.len() as u64 || h.body_len < 16 || h.body_len > 16 + 4096 {
        return Err("bad bookmark record length".into());
    }
    let total = total as usize;
    let body_end = REC_HDR + h.body_len as usize;
    if hash32(&b[..body_end]) != b[body_end..total] {
        return Err("bookmark checksum mismatch".into());
    }
    let kind = BookmarkKind::from_code(h.flags).ok_or("unknown bookmark kind")?;
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&b[REC_HDR..REC_HDR + 16]);
    let name = std::str::from_utf8(&b[REC_HDR + 16..body_end])
        .map_err(|_| "bookmark name not UTF-8")?
        .to_string();
    Ok((
        StoredBookmark {
            bookmark: Bookmark {
                name,
                kind,
                uuid,
                seq: h.last_seq,
                source_time_ns: h.time_ns,
            },
            chunk_id: h.id,
        },
        total,
    ))
}

/// Header of the bookmark log (the common file header, index 0).
fn file_header(uuid: [u8; 16], generation: u64) -> [u8; FILE_HDR] {
    encode_file_header(
        &BOOKMARK_MAGIC,
        &FileHeader {
            uuid,
            generation,
            index: 0,
            created_ns: now_ns(),
        },
    )
}

impl TargetVolume {
    /// Read `<dir>/bookmarks.log` (creating it if missing). A torn last record
    /// (crash during an append that was never acknowledged) is truncated; a bad
    /// record followed by a valid one is `Corrupt`.
    pub(crate) fn load_bookmarks(&mut self) -> Result<Vec<StoredBookmark>> {
        let path = self.dir.join(BOOKMARK_FILE);
        let _ = fs::remove_file(self.dir.join(BOOKMARK_TMP));
        if !path.exists() {
            self.rewrite_bookmarks(&[])?;
        }
        let buf = fs::read(&path).map_err(ioe(|| format!("read {}", path.display())))?;
        let Some(_) =
            self.check_file_header(&path, &buf, &BOOKMARK_MAGIC, 0, buf.len() <= FILE_HDR)?
        else {
            // Torn creation: start again with an empty log.
            self.rewrite_bookmarks(&[])?;
            return Ok(Vec::new());
        };
        let mut v = Vec::new();
        let mut pos = FILE_HDR;
        while pos < buf.len() {
            match parse(&buf[pos..]) {
                Ok((b, n)) => {
                    v.push(b);
                    pos += n;
                }
                Err(reason) => {
                    if later_valid(&buf[pos..], REC_BOOKMARK, |b| parse(b).is_ok()) {
                        return Err(corrupt(&path, pos as u64, reason));
                    }
                    warn!(path = %path.display(), offset = pos, %reason, "truncating torn bookmark record");
                    let f = OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .map_err(ioe(|| format!("open {}", path.display())))?;
                    f.set_len(pos as u64)
                        .and_then(|_| f.sync_all())
                        .map_err(ioe(|| format!("truncate {}", path.display())))?;
                    self.counters.torn_tails += 1;
                    break;
                }
            }
        }
        Ok(v)
    }

    /// Replace the bookmark log by `bms` atomically.
    pub(crate) fn rewrite_bookmarks(&self, bms: &[StoredBookmark]) -> Result<()> {
        write_log(&self.dir, &self.ident, bms)
    }

    /// Record a bookmark durably (fdatasync'ed before `Ok`), positioned in the
    /// stream: if `seq` is beyond everything spooled, after the last spooled chunk
    /// (tags arrive in stream order); otherwise after the last ordered chunk with
    /// `last_seq < seq`. Idempotent: a bookmark with the same uuid, or the same
    /// name and seq, is a [`BookmarkOutcome::Duplicate`].
    pub fn record_bookmark(&mut self, b: Bookmark) -> Result<BookmarkOutcome> {
        self.check()?;
        if b.name.len() > 1024 {
            return Err(JournalError::Invalid(
                "bookmark name longer than 1024 bytes".into(),
            ));
        }
        if b.seq == 0 {
            return Err(JournalError::Invalid("bookmark seq must be > 0".into()));
        }
        {
            let idx = self.index();
            if idx.bookmarks.iter().any(|x| {
                x.bookmark.uuid == b.uuid || (x.bookmark.name == b.name && x.bookmark.seq == b.seq)
            }) {
                return Ok(BookmarkOutcome::Duplicate);
            }
        }
        let chunk_id = self.bookmark_position(b.seq)?;
        let sb = StoredBookmark {
            bookmark: b,
            chunk_id,
        };
        let r = self.append_bookmark(&sb);
        self.guard(r)?;
        if let Some(c) = self.catalogue.as_mut() {
            if let Err(e) = c.upsert_bookmark(&sb) {
                warn!(error = %e, "catalogue bookmark insert failed (rebuilt at next open)");
            }
        }
        let mut idx = self.index_mut();
        let at = idx
            .bookmarks
            .partition_point(|x| (x.chunk_id, x.bookmark.seq) <= (sb.chunk_id, sb.bookmark.seq));
        idx.bookmarks.insert(at, sb);
        Ok(BookmarkOutcome::Recorded)
    }

    fn append_bookmark(&mut self, sb: &StoredBookmark) -> Result<()> {
        let path = self.dir.join(BOOKMARK_FILE);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(ioe(|| format!("open {}", path.display())))?;
        let len = f
            .metadata()
            .map_err(ioe(|| format!("stat {}", path.display())))?
            .len();
        let mut b = Vec::new();
        encode(sb, &mut b);
        f.write_all_at(&b, len)
            .and_then(|_| f.sync_data())
            .map_err(ioe(|| format!("append {}", path.display())))?;
        self.counters.fsyncs += 1;
        Ok(())
    }

    /// Chunk id after which a bookmark at `seq` lies.
    fn bookmark_position(&self, seq: u64) -> Result<u64> {
        if seq > self.durable_seq {
            return Ok(self.next_chunk_id - 1);
        }
        // A late tag: find the last ordered chunk before it (pending first, then applied).
        let mut next_first: Option<u64> = None;
        for p in self.pending.iter().rev() {
            if p.last_seq == 0 {
                continue;
            }
            if p.last_seq < seq {
                return self.check_not_inside(p.chunk_id, next_first, seq);
            }
            next_first = Some(p.first_seq);
        }
        let idx = self.index();
        for r in idx.records.iter().rev() {
            if r.last_seq == 0 {
                continue;
            }
            if r.last_seq < seq {
                return self.check_not_inside(r.chunk_id, next_first, seq);
            }
            next_first = Some(r.first_seq);
        }
        if seq > idx.base.seq {
            return Ok(idx.base.chunk_id);
        }
        Err(JournalError::BeforeWindow {
            requested: format!("bookmark at seq {seq}"),
            oldest_time_ns: idx.base.time_ns,
            oldest_seq: idx.base.seq,
        })
    }

    fn check_not_inside(&self, chunk: u64, next_first: Option<u64>, seq: u64) -> Result<u64> {
        match next_first {
            Some(f) if f < seq => Err(JournalError::Invalid(format!(
                "bookmark seq {seq} falls inside a coalesced chunk (seqs {f}..)"
            ))),
            _ => Ok(chunk),
        }
    }

    /// Every bookmark, oldest first, with its position and availability.
    pub fn bookmarks(&self) -> Result<Vec<crate::BookmarkInfo>> {
        Ok(self.index().bookmark_infos())
    }
}

/// Write `bytes` to `dir/tmp`, fsync, rename to `dir/name`, fsync the directory.
pub(crate) fn atomic_write(dir: &Path, tmp: &str, name: &str, bytes: &[u8]) -> Result<()> {
    let t = dir.join(tmp);
    let fin = dir.join(name);
    (|| -> std::io::Result<()> {
        let f = File::create(&t)?;
        f.write_all_at(bytes, 0)?;
        f.sync_all()?;
        fs::rename(&t, &fin)
    })()
    .map_err(ioe(|| format!("write {}", fin.display())))?;
    fsync_dir(dir)
}

/// Replace `<dir>/bookmarks.log` by `bms` atomically.
pub(crate) fn write_log(dir: &Path, ident: &VolumeIdentity, bms: &[StoredBookmark]) -> Result<()> {
    let mut b = file_header(ident.uuid, ident.generation).to_vec();
    for x in bms {
        encode(x, &mut b);
    }
    atomic_write(dir, BOOKMARK_TMP, BOOKMARK_FILE, &b)
}

/// The valid records of `<dir>/bookmarks.log` up to the first bad one (no repair;
/// used by rollback recovery, which rewrites the log anyway). Missing file: empty.
pub(crate) fn read_log_prefix(dir: &Path) -> Result<Vec<StoredBookmark>> {
    let path = dir.join(BOOKMARK_FILE);
    let buf = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(JournalError::Io {
                context: format!("read {}", path.display()),
                source: e,
            })
        }
    };
    let mut v = Vec::new();
    let mut pos = FILE_HDR;
    while pos < buf.len() {
        match parse(&buf[pos..]) {
            Ok((b, n)) => {
                v.push(b);
                pos += n;
            }
            Err(_) => break,
        }
    }
    Ok(v)
}
