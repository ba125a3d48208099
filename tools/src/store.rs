//! The target's storage: [`replicator::target::TargetStore`] implemented over
//! [`journal::TargetVolume`] (tools is the only crate that depends on both),
//! and the [`StoreProvider`] that opens or creates one per volume.
//!
//! A replica created here has never been synchronised: a marker file
//! (`<journal_dir>/needs-initial-sync`) is written with it, so the target
//! asks the source for a full resync (`NewReplica`) until the source starts
//! one. Restarts of either side never recreate it, so a restart never causes
//! a full resync.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use journal::{
    ChunkExtent, ChunkIn, Counters, ExtentData, JournalError, TargetVolume, VolumeIdentity,
};
use replicator::handshake::Refusal;
use replicator::target::{
    ApplyReport, StoreChunk, StoreData, StoreError, StoreIdentity, StoreProvider, TargetStore,
};
use replicator::wire::{ErrorCode, Hello, ResyncReason, Tag};
use tracing::{info, warn};

/// Marker of a replica that was never completely synchronised.
pub const NEEDS_SYNC: &str = "needs-initial-sync";
/// Count of checksum-resync passes the sources started (from offset 0), kept
/// across restarts so an admin (and the tests) can see a full resync happened.
pub const RESYNC_PASSES: &str = "resync-passes";

/// Resync passes started on the volume whose journal is in `dir`.
pub fn resync_passes(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join(RESYNC_PASSES))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Journal counters of every open volume, for the status file.
pub type CounterBoard = Arc<Mutex<HashMap<String, Counters>>>;

/// One volume's journal behind the replication engine.
pub struct JournalStore {
    vol: TargetVolume,
    name: String,
    dir: PathBuf,
    board: CounterBoard,
}

impl JournalStore {
    /// Wraps an open volume.
    pub fn new(vol: TargetVolume, dir: PathBuf, board: CounterBoard) -> Self {
        let name = vol.identity().name.clone();
        let s = JournalStore {
            vol,
            name,
            dir,
            board,
        };
        s.publish();
        s
    }

    fn publish(&self) {
        if let Ok(mut b) = self.board.lock() {
            b.insert(self.name.clone(), self.vol.counters());
        }
    }
}

fn store_err(e: JournalError) -> StoreError {
    match e {
        JournalError::SpoolFull { .. } => StoreError::SpoolFull,
        JournalError::InvalidChunk(m) => StoreError::Invalid(m),
        JournalError::OutOfRange { .. } | JournalError::Invalid(_) => {
            StoreError::Invalid(e.to_string())
        }
        other => StoreError::Failed(other.to_string()),
    }
}

fn to_chunk(c: &StoreChunk) -> ChunkIn {
    ChunkIn {
        first_seq: c.first_seq,
        last_seq: c.last_seq,
        source_time_ns: c.source_time_ns,
        extents: c
            .extents
            .iter()
            .map(|e| ChunkExtent {
                offset: e.offset,
                data: match &e.data {
                    StoreData::Data(d) => ExtentData::Data(d.clone()),
                    StoreData::Zero(n) => ExtentData::Zero(*n),
                },
            })
            .collect(),
    }
}

impl TargetStore for JournalStore {
    fn identity(&self) -> StoreIdentity {
        let id = self.vol.identity();
        StoreIdentity {
            name: id.name.clone(),
            uuid: id.uuid,
            generation: id.generation,
            size: id.size,
            block_size: id.block_size,
        }
    }

    fn durable_seq(&self) -> u64 {
        self.vol.durable_seq()
    }

    fn applied_seq(&self) -> u64 {
        self.vol.applied_seq()
    }

    fn spool_bytes(&self) -> u64 {
        self.vol.spool_bytes()
    }

    fn spool_budget(&self) -> u64 {
        self.vol.spool_budget()
    }

    fn spool(&mut self, chunks: &[StoreChunk]) -> Result<u64, StoreError> {
        let owned: Vec<ChunkIn> = chunks.iter().map(to_chunk).collect();
        let r = self.vol.spool_many_owned(owned).map_err(store_err);
        self.publish();
        r?;
        crate::iopattern::record_chunks(&self.name, chunks);
        Ok(self.vol.durable_seq())
    }

    fn apply_some(&mut self) -> Result<Option<ApplyReport>, StoreError> {
        let r = self.vol.apply_batch().map_err(store_err);
        self.publish();
        Ok(r?.map(|a| ApplyReport {
            chunks: a.chunks,
            bytes: a.bytes,
            applied_seq: a.applied_seq,
            last_source_time_ns: a.last_source_time_ns,
        }))
    }

    fn block_hashes(
        &mut self,
        offset: u64,
        len: u64,
        hash_block: u64,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        let r = self
            .vol
            .block_hashes(offset, len, hash_block)
            .map_err(store_err);
        self.publish();
        r
    }

    fn resize(&mut self, new_size: u64) -> Result<(), StoreError> {
        let r = self.vol.resize(new_size).map_err(store_err);
        self.publish();
        r
    }

    fn tag(&mut self, tag: &Tag) -> Result<(), StoreError> {
        // Bookmarks are the journal issue's: recorded in the log for now.
        info!(volume = %self.name, seq = tag.seq, name = %tag.name, "tag received");
        Ok(())
    }

    fn resync_reason(&self) -> Option<ResyncReason> {
        self.dir
            .join(NEEDS_SYNC)
            .exists()
            .then_some(ResyncReason::NewReplica)
    }

    fn resync_started(&mut self) {
        let n = resync_passes(&self.dir) + 1;
        let tmp = self.dir.join(format!(".{RESYNC_PASSES}.tmp"));
        if let Err(e) = std::fs::write(&tmp, format!("{n}\n"))
            .and_then(|_| std::fs::rename(&tmp, self.dir.join(RESYNC_PASSES)))
        {
            warn!(volume = %self.name, error = %e, "cannot record the resync pass");
        }
        warn!(volume = %self.name, pass = n, "checksum resync pass started by the source");
        let m = self.dir.join(NEEDS_SYNC);
        if m.exists() {
            if let Err(e) = std::fs::remove_file(&m) {
                warn!(volume = %self.name, error = %e, "cannot remove {}", m.display());
            } else {
                info!(volume = %self.name, "initial synchronisation started by the source");
            }
        }
    }
}

/// Where a volume lives at the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumePlace {
    /// Replica file or device.
    pub replica: PathBuf,
    /// Journal directory.
    pub journal_dir: PathBuf,
    /// Spool budget (bytes), `None` for the journal's default.
    pub spool_budget: Option<u64>,
}

/// How the provider finds volumes.
#[derive(Debug, Clone)]
pub enum Layout {
    /// Only the configured volumes (target.toml); `auto_create` makes their
    /// journals on first contact.
    Configured {
        /// Volumes by name.
        volumes: HashMap<String, VolumePlace>,
        /// Create missing journals.
        auto_create: bool,
    },
    /// Every volume under one directory: `DIR/<name>/replica.img` and
    /// `DIR/<name>/journal` (created on first contact).
    Dir {
        /// The directory.
        dir: PathBuf,
        /// Spool budget of every volume.
        spool_budget: Option<u64>,
    },
}

impl Layout {
    /// Where `name` lives, and whether it may be created.
    pub fn place(&self, name: &str) -> Option<(VolumePlace, bool)> {
        match self {
            Layout::Configured {
                volumes,
                auto_create,
            } => volumes.get(name).map(|p| (p.clone(), *auto_create)),
            Layout::Dir { dir, spool_budget } => {
                crate::config::check_name(name).ok()?;
                let d = dir.join(name);
                Some((
                    VolumePlace {
                        replica: d.join("replica.img"),
                        journal_dir: d.join("journal"),
                        spool_budget: *spool_budget,
                    },
                    true,
                ))
            }
        }
    }

    /// Journal directories of the volumes known without any source having
    /// connected (for `cdpcli --listtargetvolumes`).
    pub fn known(&self) -> Vec<(String, VolumePlace)> {
        match self {
            Layout::Configured { volumes, .. } => {
                let mut v: Vec<_> = volumes
                    .iter()
                    .map(|(k, p)| (k.clone(), p.clone()))
                    .collect();
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            }
            Layout::Dir { dir, .. } => {
                let mut v = Vec::new();
                if let Ok(rd) = std::fs::read_dir(dir) {
                    for e in rd.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if let Some((p, _)) = self.place(&name) {
                            if p.journal_dir.join("identity").exists() {
                                v.push((name, p));
                            }
                        }
                    }
                }
                v.sort_by(|a, b| a.0.cmp(&b.0));
                v
            }
        }
    }
}

/// Opens (or creates) [`JournalStore`]s for the target server.
pub struct JournalProvider {
    /// Volume placement.
    pub layout: Layout,
    /// Counters of open volumes.
    pub board: CounterBoard,
}

fn journal_opts(place: &VolumePlace) -> journal::TargetOptions {
    let mut o = journal::TargetOptions::default();
    if let Some(b) = place.spool_budget {
        o.spool_budget_bytes = b;
    }
    o
}

impl JournalProvider {
    fn open_or_create(&self, hello: &Hello) -> Result<JournalStore, Refusal> {
        let name = &hello.volume_name;
        let Some((place, may_create)) = self.layout.place(name) else {
            return Err(Refusal::new(
                ErrorCode::Unauthorized,
                format!("volume {name:?} is not configured on this target"),
            ));
        };
        let dir = &place.journal_dir;
        let internal = |e: JournalError| {
            warn!(volume = %name, error = %e, "cannot open the target volume");
            match e {
                JournalError::Locked(_) => Refusal::new(ErrorCode::Busy, e.to_string()),
                _ => Refusal::new(ErrorCode::Internal, format!("volume {name:?}: {e}")),
            }
        };
        let vol = if dir.join("identity").exists() {
            TargetVolume::open_with(dir, journal_opts(&place)).map_err(internal)?
        } else if may_create {
            if let Some(parent) = place.replica.parent() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    Refusal::new(ErrorCode::Internal, format!("{}: {e}", parent.display()))
                })?;
            }
            std::fs::create_dir_all(dir).map_err(|e| {
                Refusal::new(ErrorCode::Internal, format!("{}: {e}", dir.display()))
            })?;
            // The marker first: a crash after create still asks for the initial sync.
            std::fs::write(dir.join(NEEDS_SYNC), b"").map_err(|e| {
                Refusal::new(ErrorCode::Internal, format!("{}: {e}", dir.display()))
            })?;
            let ident = VolumeIdentity {
                name: name.clone(),
                uuid: hello.volume_uuid,
                generation: hello.generation,
                size: hello.size,
                block_size: hello.block_size,
            };
            info!(volume = %name, replica = %place.replica.display(), journal = %dir.display(), size = hello.size, "creating the replica");
            TargetVolume::create_with(dir, ident, &place.replica, journal_opts(&place))
                .map_err(internal)?
        } else {
            return Err(Refusal::new(
                ErrorCode::Unauthorized,
                format!(
                    "volume {name:?} has no journal in {} and auto_create is off",
                    dir.display()
                ),
            ));
        };
        Ok(JournalStore::new(vol, dir.clone(), self.board.clone()))
    }
}

impl StoreProvider for JournalProvider {
    fn open(&self, hello: &Hello, peer: Option<&str>) -> Result<Box<dyn TargetStore>, Refusal> {
        info!(volume = %hello.volume_name, peer = peer.unwrap_or("(insecure)"), "opening the target volume");
        self.open_or_create(hello)
            .map(|s| Box::new(s) as Box<dyn TargetStore>)
    }
}

/// Counters of a volume read from its journal directory without the daemon
/// (opens it, which needs the daemon to be stopped: the directory is locked).
pub fn offline_counters(dir: &Path) -> Result<(VolumeIdentity, Counters), JournalError> {
    let v = TargetVolume::open(dir)?;
    Ok((v.identity().clone(), v.counters()))
}
