//! A minimal SQLite catalogue of journal segments by chunk id, sequence number and
//! source time (`<dir>/catalogue.sqlite`, table `segments`).
//!
//! The segments are the source of truth; the catalogue is **derived data**: it is
//! rebuilt from the segment scan at every open and updated when a segment is
//! sealed (rotation), so it can never disagree with the journal after an open,
//! and losing or corrupting it loses nothing (it is recreated). Why SQLite: the
//! retention and recovery-point queries that come next ("segments entirely older
//! than T", "recovery time range", bookmarks at or before T) are one indexed
//! query each, updates are transactional, and admins can inspect it with the
//! `sqlite3` CLI. Writes use WAL with `synchronous=NORMAL` (no fsync per commit),
//! which is enough for derived data.

use crate::bookmark::StoredBookmark;
use crate::{JournalError, Result, SegmentInfo};
use rusqlite::{params, Connection};
use std::path::Path;
use tracing::warn;

pub(crate) struct Catalogue {
    conn: Connection,
}

fn cerr(e: rusqlite::Error) -> JournalError {
    JournalError::Catalogue(e.to_string())
}

const SCHEMA: &str = "
PRAGMA journal_mode=WAL;
PRAGMA synchronous=NORMAL;
CREATE TABLE IF NOT EXISTS segments (
    idx INTEGER PRIMARY KEY,
    first_chunk_id INTEGER NOT NULL,
    last_chunk_id INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    first_time_ns INTEGER NOT NULL,
    last_time_ns INTEGER NOT NULL,
    undo_records INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    sealed INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS segments_by_time ON segments(last_time_ns);
CREATE INDEX IF NOT EXISTS segments_by_seq ON segments(last_seq);
CREATE TABLE IF NOT EXISTS bookmarks (
    uuid BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    kind INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    time_ns INTEGER NOT NULL,
    chunk_id INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS bookmarks_by_time ON bookmarks(time_ns);
CREATE INDEX IF NOT EXISTS bookmarks_by_name ON bookmarks(name);
";

/// Schema version (`PRAGMA user_version`). 1: segments; 2: + bookmarks.
/// Another version is not migrated: the catalogue is derived data, so it is
/// deleted and rebuilt from the segments and the bookmark log.
pub(crate) const CATALOGUE_VERSION: i64 = 2;

impl Catalogue {
    /// Open (or recreate, if unreadable) the catalogue at `path`.
    pub(crate) fn open(path: &Path) -> Result<Catalogue> {
        match Self::try_open(path) {
            Ok(c) => Ok(c),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "catalogue unreadable: recreating it from the segments");
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.as_os_str().to_owned();
                    p.push(suffix);
                    let _ = std::fs::remove_file(&p);
                }
                Self::try_open(path)
            }
        }
    }

    fn try_open(path: &Path) -> Result<Catalogue> {
        let conn = Connection::open(path).map_err(cerr)?;
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(cerr)?;
        let has_tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(cerr)?;
        if has_tables > 0 && v != CATALOGUE_VERSION {
            return Err(JournalError::Catalogue(format!(
                "catalogue version {v}, expected {CATALOGUE_VERSION}"
            )));
        }
        conn.execute_batch(SCHEMA).map_err(cerr)?;
        conn.execute_batch(&format!("PRAGMA user_version={CATALOGUE_VERSION};"))
            .map_err(cerr)?;
        Ok(Catalogue { conn })
    }

    /// Replace all bookmark rows by `bms` in one transaction.
    pub(crate) fn rebuild_bookmarks(&mut self, bms: &[StoredBookmark]) -> Result<()> {
        let tx = self.conn.transaction().map_err(cerr)?;
        tx.execute("DELETE FROM bookmarks", []).map_err(cerr)?;
        for b in bms {
            upsert_bookmark(&tx, b)?;
        }
        tx.commit().map_err(cerr)
    }

    /// Insert or replace one bookmark row.
    pub(crate) fn upsert_bookmark(&mut self, b: &StoredBookmark) -> Result<()> {
        upsert_bookmark(&self.conn, b)
    }

    /// Replace all rows by `segs` in one transaction.
    pub(crate) fn rebuild(&mut self, segs: &[SegmentInfo]) -> Result<()> {
        let tx = self.conn.transaction().map_err(cerr)?;
        tx.execute("DELETE FROM segments", []).map_err(cerr)?;
        for s in segs {
            upsert(&tx, s)?;
        }
        tx.commit().map_err(cerr)
    }

    /// Insert or replace the rows of `segs` in one transaction.
    pub(crate) fn update(&mut self, segs: &[SegmentInfo]) -> Result<()> {
        let tx = self.conn.transaction().map_err(cerr)?;
        for s in segs {
            upsert(&tx, s)?;
        }
        tx.commit().map_err(cerr)
    }

    /// Segments whose newest record is at or before `time_ns` (retention candidates).
    pub(crate) fn sealed_before(&self, time_ns: u64) -> Result<Vec<u64>> {
        let mut st = self
            .conn
            .prepare("SELECT idx FROM segments WHERE sealed = 1 AND undo_records > 0 AND last_time_ns <= ?1 ORDER BY idx")
            .map_err(cerr)?;
        let rows = st
            .query_map(params![time_ns as i64], |r| r.get::<_, i64>(0))
            .map_err(cerr)?;
        let mut v = Vec::new();
        for r in rows {
            v.push(r.map_err(cerr)? as u64);
        }
        Ok(v)
    }
}

fn upsert(c: &Connection, s: &SegmentInfo) -> Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO segments VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            s.index as i64,
            s.first_chunk_id as i64,
            s.last_chunk_id as i64,
            s.first_seq as i64,
            s.last_seq as i64,
            s.first_time_ns as i64,
            s.last_time_ns as i64,
            s.undo_records as i64,
            s.bytes as i64,
            s.sealed as i64,
        ],
    )
    .map_err(cerr)?;
    Ok(())
}

fn upsert_bookmark(c: &Connection, b: &StoredBookmark) -> Result<()> {
    c.execute(
        "INSERT OR REPLACE INTO bookmarks VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            &b.bookmark.uuid[..],
            b.bookmark.name,
            b.bookmark.kind.code() as i64,
            b.bookmark.seq as i64,
            b.bookmark.source_time_ns as i64,
            b.chunk_id as i64,
        ],
    )
    .map_err(cerr)?;
    Ok(())
}
