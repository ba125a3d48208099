//! End-to-end tests of the replication engine on loopback: a real change log
//! (agent-core producer) and source file, a `Pair` shipping over TLS (certs
//! from `pki`), a `TargetServer`, and `MemStore`, an in-memory test double of
//! `TargetStore` (the production store is `journal::TargetVolume`, adapted in
//! `tools`). Only 127.0.0.1 is ever used.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_core::{ChangeLog, ChangeLogConfig, ChangeLogView, ChangeSink, TagType};
use rand::{Rng, SeedableRng};
use replicator::handshake::Refusal;
use replicator::pair::{PairState, PersistedPair};
use replicator::pki::{self, CertKind};
use replicator::source::{Pair, PairConfig};
use replicator::target::{
    ApplyReport, StoreChunk, StoreData, StoreError, StoreIdentity, TargetOptions, TargetServer,
    TargetStore,
};
use replicator::tls::{ClientTls, ServerTls};
use replicator::wire::{
    self, Compression, ErrorCode, Frame, Hello, ResyncReason, Tag, DEFAULT_MAX_FRAME,
};

// ---------------------------------------------------------------- test store

/// State of the in-memory test store (shared by clones, so a restarted
/// server finds the same "durable" state).
struct MemState {
    ident: StoreIdentity,
    replica: Vec<u8>,
    spool: VecDeque<StoreChunk>,
    spool_bytes: u64,
    budget: u64,
    durable_seq: u64,
    applied_seq: u64,
    tags: Vec<Tag>,
    resync: Option<ResyncReason>,
    spool_calls: u64,
    chunks_stored: u64,
    apply_delay: Duration,
    /// `apply_some` calls that applied something.
    apply_steps: u64,
    /// Slept in every `spool` call (a store that applies in place).
    spool_delay: Duration,
    /// The backlog flag the engine set before each `spool` call.
    backlog_seen: Vec<bool>,
    backlog: bool,
    fail_spools: u32,
    /// A full disk: spool and apply fail with `NoSpace` (apply only when
    /// `disk_full_apply_only`), which poisons the store like the journal.
    disk_full: bool,
    disk_full_apply_only: bool,
    /// Like a poisoned journal handle: every call fails until `recover`.
    poisoned: bool,
    recoveries: u64,
}

/// In-memory `TargetStore` test double: spool = a queue, replica = a Vec.
#[derive(Clone)]
struct MemStore(Arc<Mutex<MemState>>);

impl MemStore {
    fn new(ident: StoreIdentity, replica: Vec<u8>, resync: Option<ResyncReason>) -> Self {
        MemStore(Arc::new(Mutex::new(MemState {
            ident,
            replica,
            spool: VecDeque::new(),
            spool_bytes: 0,
            budget: 1 << 30,
            durable_seq: 0,
            applied_seq: 0,
            tags: Vec::new(),
            resync,
            spool_calls: 0,
            chunks_stored: 0,
            apply_delay: Duration::ZERO,
            apply_steps: 0,
            spool_delay: Duration::ZERO,
            backlog_seen: Vec::new(),
            backlog: false,
            fail_spools: 0,
            disk_full: false,
            disk_full_apply_only: false,
            poisoned: false,
            recoveries: 0,
        })))
    }
    fn st(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.0.lock().unwrap()
    }
}

fn apply_chunk(st: &mut MemState, c: &StoreChunk) -> u64 {
    let mut bytes = 0;
    for e in &c.extents {
        let o = e.offset as usize;
        match &e.data {
            StoreData::Data(d) => st.replica[o..o + d.len()].copy_from_slice(d),
            StoreData::Zero(n) => st.replica[o..o + *n as usize].fill(0),
        }
        bytes += e.data.len();
    }
    st.spool_bytes -= c.payload_bytes();
    if c.is_ordered() {
        st.applied_seq = st.applied_seq.max(c.last_seq);
    }
    bytes
}

impl TargetStore for MemStore {
    fn identity(&self) -> StoreIdentity {
        self.st().ident.clone()
    }
    fn durable_seq(&self) -> u64 {
        self.st().durable_seq
    }
    fn applied_seq(&self) -> u64 {
        self.st().applied_seq
    }
    fn spool_bytes(&self) -> u64 {
        self.st().spool_bytes
    }
    fn spool_budget(&self) -> u64 {
        self.st().budget
    }
    fn set_incoming_backlog(&mut self, backlog: bool) {
        self.st().backlog = backlog;
    }
    fn spool(&mut self, chunks: &[StoreChunk]) -> Result<u64, StoreError> {
        let delay = self.st().spool_delay;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let mut st = self.st();
        let b = st.backlog;
        st.backlog_seen.push(b);
        for c in chunks {
            for e in &c.extents {
                if e.offset + e.data.len() > st.ident.size {
                    return Err(StoreError::Invalid("extent outside the volume".into()));
                }
            }
        }
        if st.spool_bytes > st.budget && !st.spool.is_empty() {
            return Err(StoreError::SpoolFull);
        }
        if st.fail_spools > 0 {
            st.fail_spools -= 1;
            return Err(StoreError::Failed("injected I/O error".into()));
        }
        if st.poisoned {
            return Err(StoreError::Failed("poisoned".into()));
        }
        if st.disk_full && !st.disk_full_apply_only && !chunks.is_empty() {
            st.poisoned = true;
            return Err(StoreError::NoSpace(
                "write spool: No space left on device".into(),
            ));
        }
        st.spool_calls += 1;
        for c in chunks {
            if c.is_ordered() && c.last_seq <= st.durable_seq {
                continue; // duplicate (re-delivery)
            }
            if c.is_ordered() {
                st.durable_seq = c.last_seq;
            }
            st.spool_bytes += c.payload_bytes();
            st.chunks_stored += 1;
            st.spool.push_back(c.clone());
        }
        Ok(st.durable_seq)
    }
    fn apply_some(&mut self) -> Result<Option<ApplyReport>, StoreError> {
        let delay = self.st().apply_delay;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        let mut st = self.st();
        if st.poisoned {
            return Err(StoreError::Failed("poisoned".into()));
        }
        if st.disk_full && !st.spool.is_empty() {
            st.poisoned = true;
            return Err(StoreError::NoSpace(
                "append journal: No space left on device".into(),
            ));
        }
        let mut rep = ApplyReport::default();
        for _ in 0..8 {
            let Some(c) = st.spool.pop_front() else { break };
            rep.bytes += apply_chunk(&mut st, &c);
            rep.chunks += 1;
            rep.last_source_time_ns = c.source_time_ns;
        }
        rep.applied_seq = st.applied_seq;
        if rep.chunks > 0 {
            st.apply_steps += 1;
        }
        Ok((rep.chunks > 0).then_some(rep))
    }
    fn block_hashes(
        &mut self,
        offset: u64,
        len: u64,
        hb: u64,
    ) -> Result<Vec<[u8; 32]>, StoreError> {
        let mut st = self.st();
        while let Some(c) = st.spool.pop_front() {
            apply_chunk(&mut st, &c);
        }
        let r = &st.replica[offset as usize..(offset + len) as usize];
        Ok(r.chunks(hb as usize)
            .map(|b| *blake3::hash(b).as_bytes())
            .collect())
    }
    fn resize(&mut self, new_size: u64) -> Result<(), StoreError> {
        let mut st = self.st();
        while let Some(c) = st.spool.pop_front() {
            apply_chunk(&mut st, &c);
        }
        st.replica.resize(new_size as usize, 0);
        st.ident.size = new_size;
        Ok(())
    }
    fn tag(&mut self, tag: &Tag) -> Result<(), StoreError> {
        let mut st = self.st();
        if !st.tags.iter().any(|t| t.seq == tag.seq) {
            st.tags.push(tag.clone());
        }
        Ok(())
    }
    fn resync_reason(&self) -> Option<ResyncReason> {
        self.st().resync
    }
    fn resync_started(&mut self) {
        self.st().resync = None;
    }
    fn recover(&mut self) -> Result<bool, StoreError> {
        let mut st = self.st();
        if st.disk_full {
            return Err(StoreError::NoSpace(
                "reopen: No space left on device".into(),
            ));
        }
        if st.poisoned {
            st.poisoned = false;
            st.recoveries += 1;
        }
        Ok(true)
    }
}

/// Stores by volume name; unknown volumes get a new zero-filled replica that
/// asks for a full resync.
#[derive(Clone, Default)]
struct Stores(Arc<Mutex<HashMap<String, MemStore>>>);

impl Stores {
    /// The store of `name`, waiting for the first connection to create it.
    fn get(&self, name: &str) -> MemStore {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.0.lock().unwrap().get(name) {
                return s.clone();
            }
            assert!(Instant::now() < deadline, "no store for {name}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    fn put(&self, name: &str, s: MemStore) {
        self.0.lock().unwrap().insert(name.into(), s);
    }
    fn provider(&self) -> Arc<dyn replicator::target::StoreProvider> {
        let me = self.clone();
        Arc::new(
            move |h: &Hello, _peer: Option<&str>| -> Result<Box<dyn TargetStore>, Refusal> {
                let mut m = me.0.lock().unwrap();
                let s = m
                    .entry(h.volume_name.clone())
                    .or_insert_with(|| {
                        MemStore::new(
                            StoreIdentity {
                                name: h.volume_name.clone(),
                                uuid: h.volume_uuid,
                                generation: h.generation,
                                size: h.size,
                                block_size: h.block_size,
                            },
                            vec![0; h.size as usize],
                            Some(ResyncReason::NewReplica),
                        )
                    })
                    .clone();
                Ok(Box::new(s))
            },
        )
    }
}

// ---------------------------------------------------------------- harness

struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let p = dir.join("pki");
        pki::init_ca(&p, false).unwrap();
        pki::issue_with_names(
            &p,
            "localhost",
            &["127.0.0.1".into()],
            CertKind::Server,
            false,
        )
        .unwrap();
        pki::issue(&p, "src-01", CertKind::Client, false).unwrap();
        Env { _tmp: tmp, dir }
    }
    fn server_tls(&self) -> ServerTls {
        let p = self.dir.join("pki");
        ServerTls::from_pem(
            &p.join("ca.pem"),
            &p.join("localhost.pem"),
            &p.join("localhost.key"),
            vec!["src-01".into()],
        )
        .unwrap()
    }
    fn client_tls(&self) -> ClientTls {
        let p = self.dir.join("pki");
        ClientTls::from_pem(
            &p.join("ca.pem"),
            &p.join("src-01.pem"),
            &p.join("src-01.key"),
        )
        .unwrap()
    }
    fn server(&self, stores: &Stores, addr: &str) -> TargetServer {
        self.server_with(stores, addr, TargetOptions::default())
    }
    fn server_with(&self, stores: &Stores, addr: &str, opts: TargetOptions) -> TargetServer {
        TargetServer::bind(addr, self.server_tls(), stores.provider(), opts).unwrap()
    }
}

/// A protected volume: change log + backing file, written like a filter does.
struct Source {
    log: ChangeLog,
    file: File,
    path: PathBuf,
    size: u64,
    name: String,
}

impl Source {
    fn new(dir: &Path, name: &str, size: u64, ring_bytes: u64) -> Source {
        let mut cfg = ChangeLogConfig::new(name, size);
        cfg.shm_dir = dir.join("shm");
        cfg.state_dir = dir.join("agent-state");
        cfg.ring_bytes = ring_bytes;
        let log = ChangeLog::open_or_create(cfg).unwrap();
        let path = dir.join(format!("{name}.img"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .unwrap();
        file.set_len(size).unwrap();
        Source {
            log,
            file,
            path,
            size,
            name: name.into(),
        }
    }
    fn write(&self, off: u64, data: &[u8]) {
        let t = self.log.begin(off, data.len() as u64);
        self.file.write_all_at(data, off).unwrap();
        self.log.complete_write(t, data);
    }
    fn zero(&self, off: u64, len: u64) {
        let t = self.log.begin(off, len);
        self.file.write_all_at(&vec![0; len as usize], off).unwrap();
        self.log.complete_zero(t);
    }
    /// Writes directly to the file, bypassing the change log (pre-existing data).
    fn write_untracked(&self, off: u64, data: &[u8]) {
        self.file.write_all_at(data, off).unwrap();
    }
    fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
    fn uuid(&self) -> [u8; 16] {
        let s = &self.log.identity().uuid;
        let hex: Vec<u8> = s.bytes().filter(|c| c.is_ascii_hexdigit()).collect();
        let mut out = [0u8; 16];
        for i in 0..16 {
            let h = |c: u8| (c as char).to_digit(16).unwrap() as u8;
            out[i] = h(hex[2 * i]) << 4 | h(hex[2 * i + 1]);
        }
        out
    }
    fn identity(&self, size: u64) -> StoreIdentity {
        StoreIdentity {
            name: self.name.clone(),
            uuid: self.uuid(),
            generation: self.log.identity().generation,
            size,
            block_size: self.log.identity().block_size,
        }
    }
    fn pair_cfg(&self, env: &Env, addr: &str, comp: Compression) -> PairConfig {
        let mut c = PairConfig::new(
            self.name.clone(),
            self.log.path(),
            self.path.clone(),
            addr,
            "localhost",
            env.client_tls(),
            env.dir.join("pair-state"),
        );
        c.compression = comp;
        c.hash_block = 64 << 10;
        c.max_chunk_bytes = 1 << 20;
        c.heartbeat = Duration::from_millis(200);
        c.backoff_max = Duration::from_millis(500);
        c
    }
}

/// Compressible pseudo-random data (text-like: small alphabet).
fn data(rng: &mut impl Rng, len: usize, compressible: bool) -> Vec<u8> {
    if compressible {
        (0..len)
            .map(|_| b"abcdefgh  \n"[rng.gen_range(0..11)])
            .collect()
    } else {
        (0..len).map(|_| rng.gen()).collect()
    }
}

fn random_workload(src: &Source, rng: &mut impl Rng, ops: usize, compressible: bool) {
    for i in 0..ops {
        let len = 512 * rng.gen_range(1..=64u64);
        let off = rng.gen_range(0..(src.size - len) / 512) * 512;
        if i % 17 == 0 {
            src.zero(off, len);
        } else {
            src.write(off, &data(rng, len as usize, compressible));
        }
    }
}

fn wait_equal(src: &Source, store: &MemStore, pair: &Pair, what: &str) {
    assert!(
        pair.wait_drained(Duration::from_secs(60)),
        "{what}: not drained: {:#?}",
        pair.status()
    );
    // Drained = durable at the target; give apply a moment.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let done = {
            let st = store.st();
            st.spool.is_empty() && st.replica == src.contents()
        };
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: replica differs from the source"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts a fresh pair whose replica already equals the source (initial
/// sync done), so tests of the differential path start from a known state.
fn synced_pair(env: &Env, src: &Source, stores: &Stores, addr: &str, comp: Compression) -> Pair {
    let pair = Pair::start(src.pair_cfg(env, addr, comp)).unwrap();
    wait_equal(src, &stores.get(&src.name), &pair, "initial sync");
    pair
}

// ---------------------------------------------------------------- tests

/// Data mode with overlapping writes, zeroes and tags: the replica equals the
/// source after drain, with compression off and on; tags arrive in order.
#[test]
fn converges_over_tls_with_and_without_compression() {
    for comp in [Compression::None, Compression::Zstd(3)] {
        let env = Env::new();
        let stores = Stores::default();
        let server = env.server(&stores, "127.0.0.1:0");
        let addr = server.local_addr().to_string();
        let src = Source::new(&env.dir, "vol0", 16 << 20, 16 << 20);
        let pair = synced_pair(&env, &src, &stores, &addr, comp);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut tag_seqs = Vec::new();
        for round in 0..5 {
            random_workload(&src, &mut rng, 300, true);
            // Same range rewritten: the last write must win.
            src.write(4096, &[round as u8 + 1; 8192]);
            src.write(8192, &[0xEE; 512]);
            let uuid = [round as u8; 16];
            if let Ok(seq) = src
                .log
                .insert_tag(&format!("tag-{round}"), TagType::User, uuid)
            {
                tag_seqs.push(seq);
            }
        }
        let store = stores.get("vol0");
        wait_equal(&src, &store, &pair, "workload");
        let tags: Vec<u64> = store.st().tags.iter().map(|t| t.seq).collect();
        assert_eq!(tags, tag_seqs, "tags in stream order");
        assert!(!tags.is_empty());
        let st = pair.status();
        assert_eq!(st.state, PairState::DifferentialSync);
        assert_eq!(st.rpo_ns, 0);
        assert!(st.chunks_acked > 0 && st.tags_acked as usize == tag_seqs.len());
        match comp {
            Compression::None => assert!((st.compression_ratio - 1.0).abs() < 1e-6),
            Compression::Zstd(_) => assert!(st.compression_ratio > 2.0, "{st:#?}"),
        }
        let ts = server.status();
        assert_eq!(ts.len(), 1);
        assert_eq!(ts[0].durable_seq, st.target_durable_seq);
        pair.stop();
        server.shutdown();
    }
}

/// A tiny ring forces metadata and bitmap modes; the data is read back from
/// the source volume and the replica still converges.
#[test]
fn metadata_and_bitmap_modes_converge() {
    let env = Env::new();
    let stores = Stores::default();
    let server = env.server(&stores, "127.0.0.1:0");
    let addr = server.local_addr().to_string();
    let src = Source::new(&env.dir, "tiny", 8 << 20, 64 << 10);
    let pair = synced_pair(&env, &src, &stores, &addr, Compression::Zstd(1));
    pair.pause();
    std::thread::sleep(Duration::from_millis(300));
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    random_workload(&src, &mut rng, 2000, false);
    let stats = ChangeLogView::open(src.log.path()).unwrap().stats();
    assert!(stats.data_records > 0, "{stats:?}");
    assert!(stats.metadata_records > 0, "{stats:?}");
    assert!(stats.bitmap_writes > 0, "{stats:?}");
    pair.resume();
    // Keep writing while it drains.
    random_workload(&src, &mut rng, 500, false);
    wait_equal(&src, &stores.get("tiny"), &pair, "tiny ring");
    pair.stop();
    server.shutdown();
}

/// Initial sync of a volume with pre-existing (untracked) data goes through
/// step 1; a later resync where 1% of the blocks differ sends ≤ 3% of the
/// volume on the wire.
#[test]
fn initial_sync_and_sparse_resync_wire_bytes() {
    let env = Env::new();
    let stores = Stores::default();
    let server = env.server(&stores, "127.0.0.1:0");
    let addr = server.local_addr().to_string();
    let size = 32u64 << 20;
    let src = Source::new(&env.dir, "big", size, 4 << 20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for off in (0..size).step_by(1 << 20) {
        src.write_untracked(off, &data(&mut rng, 1 << 20, false));
    }
    let pair = Pair::start(src.pair_cfg(&env, &addr, Compression::None)).unwrap();
    wait_equal(&src, &stores.get("big"), &pair, "initial sync");
    let st = pair.status();
    assert!(
        st.wire_bytes >= size,
        "initial sync shipped the volume: {st:#?}"
    );
    assert_eq!(st.resync.unwrap().done_bytes, size);
    pair.stop();

    // A second target replica that differs from the source in 1% of the
    // 64 KiB blocks (a fresh pair: no state, the target asks for a resync).
    let blocks = size / (64 << 10);
    let stale = blocks / 100;
    let mut replica = src.contents();
    for i in 0..stale {
        let b = (i * 97) % blocks;
        let o = (b * (64 << 10)) as usize;
        replica[o..o + 100].fill(0x55);
    }
    let stores2 = Stores::default();
    stores2.put(
        "big",
        MemStore::new(src.identity(size), replica, Some(ResyncReason::Requested)),
    );
    let server2 = env.server(&stores2, "127.0.0.1:0");
    let mut cfg = src.pair_cfg(&env, &server2.local_addr().to_string(), Compression::None);
    cfg.state_dir = env.dir.join("pair-state-2");
    let pair2 = Pair::start(cfg).unwrap();
    wait_equal(&src, &stores2.get("big"), &pair2, "sparse resync");
    let st = pair2.status();
    let limit = size * 3 / 100;
    assert!(
        st.wire_bytes <= limit,
        "wire bytes {} > 3% of the volume ({limit})",
        st.wire_bytes
    );
    assert_eq!(st.resync.unwrap().sent_bytes, stale * (64 << 10));
    eprintln!(
        "sparse resync: {} of {} blocks differ, {} bytes on the wire ({:.2}% of the volume)",
        stale,
        blocks,
        st.wire_bytes,
        st.wire_bytes as f64 * 100.0 / size as f64
    );
    pair2.stop();
    server.shutdown();
    server2.shutdown();
}

/// Writes keep coming during step 1; step 2 ships them; the end is equal.
/// The pass is interrupted (pair stopped) and resumes from the persisted
/// offset.
#[test]
fn resync_under_concurrent_writes_and_resume() {
    let env = Env::new();
    let stores = Stores::default();
    let server = env.server(&stores, "127.0.0.1:0");
    let addr = server.local_addr().to_string();
    let size = 32u64 << 20;
    let src = Arc::new(Source::new(&env.dir, "busy", size, 1 << 20));
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    for off in (0..size).step_by(1 << 20) {
        src.write_untracked(off, &data(&mut rng, 1 << 20, true));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (src, stop) = (src.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            while !stop.load(Ordering::SeqCst) {
                random_workload(&src, &mut rng, 20, true);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    // Slow link: step 1 takes a while, so it is interrupted in the middle.
    let mut cfg = src.pair_cfg(&env, &addr, Compression::None);
    cfg.limiter = replicator::bandwidth::PairLimiter {
        pair: replicator::bandwidth::Limiter::new(replicator::bandwidth::Schedule::fixed(20 << 20)),
        target: None,
    };
    let pair = Pair::start(cfg.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = PersistedPair::load(&cfg.state_dir, "busy").unwrap();
        if p.is_some_and(|p| p.resync_offset > 0 && p.state == PairState::ResyncStep1) {
            break;
        }
        assert!(Instant::now() < deadline, "no step-1 progress persisted");
        std::thread::sleep(Duration::from_millis(10));
    }
    pair.stop();
    let p = PersistedPair::load(&cfg.state_dir, "busy")
        .unwrap()
        .unwrap();
    assert!(p.resync_offset > 0 && p.resync_offset < size, "{p:?}");
    let resumed_from = p.resync_offset;
    cfg.limiter = replicator::bandwidth::PairLimiter::unlimited();
    let pair = Pair::start(cfg).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    wait_equal(&src, &stores.get("busy"), &pair, "resync under writes");
    let st = pair.status();
    let r = st.resync.unwrap();
    // The second session only compared (and sent) blocks from the resume point.
    assert!(
        r.sent_bytes > 0 && r.sent_bytes <= size - resumed_from,
        "{r:?}, resumed at {resumed_from}"
    );
    assert_eq!(r.done_bytes, r.total_bytes);
    pair.stop();
    server.shutdown();
}

/// The target's connections are cut repeatedly and the server is restarted
/// on the same port while writes go on: the pair reconnects and converges,
/// nothing lost.
#[test]
fn reconnects_and_converges() {
    let env = Env::new();
    let stores = Stores::default();
    let server = env.server(&stores, "127.0.0.1:0");
    let addr = server.local_addr().to_string();
    let src = Arc::new(Source::new(&env.dir, "flaky", 16 << 20, 2 << 20));
    let pair = synced_pair(&env, &src, &stores, &addr, Compression::Zstd(1));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (src, stop) = (src.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(6);
            while !stop.load(Ordering::SeqCst) {
                random_workload(&src, &mut rng, 50, true);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let mut server = Some(server);
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(300));
        if i % 2 == 0 {
            server.as_ref().unwrap().drop_connections();
        } else {
            server.take().unwrap().shutdown();
            std::thread::sleep(Duration::from_millis(200));
            server = Some(env.server(&stores, &addr));
        }
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    wait_equal(&src, &stores.get("flaky"), &pair, "after reconnects");
    let st = pair.status();
    assert!(st.reconnects >= 3, "{st:#?}");
    pair.stop();
    server.unwrap().shutdown();
}

/// A target replica of another generation refuses the source; the store is
/// untouched and the error is visible in the status.
#[test]
fn wrong_generation_is_refused() {
    let env = Env::new();
    let stores = Stores::default();
    let src = Source::new(&env.dir, "gen", 4 << 20, 1 << 20);
    let mut ident = src.identity(4 << 20);
    ident.generation += 7;
    let before = vec![0xAB; 4 << 20];
    stores.put("gen", MemStore::new(ident, before.clone(), None));
    let server = env.server(&stores, "127.0.0.1:0");
    src.write(0, &[1; 4096]);
    let pair = Pair::start(src.pair_cfg(&env, &server.local_addr().to_string(), Compression::None))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = pair.status();
        if let Some(e) = s.last_error {
            assert!(e.contains("GenerationMismatch"), "{e}");
            break;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    pair.stop();
    let st = stores.get("gen");
    let st = st.st();
    assert_eq!(st.spool_calls, 0);
    assert_eq!(st.replica, before);
    drop(st);
    // The server counts the refusal itself (no log parsing needed).
    let r = server.refusals();
    assert!(r.count >= 1, "{r:?}");
    assert!(
        r.last.as_deref().is_some_and(|l| l.contains("generation")),
        "{r:?}"
    );
    server.shutdown();
}

/// Raw bad frames on an authenticated connection: a corrupted chunk and a
/// truncated one get an Error frame; the store is unchanged.
#[test]
fn corrupted_frame_gets_error_and_changes_nothing() {
    let env = Env::new();
    let stores = Stores::default();
    let src = Source::new(&env.dir, "bad", 4 << 20, 1 << 20);
    stores.put(
        "bad",
        MemStore::new(src.identity(4 << 20), vec![0; 4 << 20], None),
    );
    let server = env.server(&stores, "127.0.0.1:0");
    let addr = server.local_addr().to_string();
    let hello = Hello {
        protocol_version: wire::PROTOCOL_VERSION,
        max_frame: DEFAULT_MAX_FRAME,
        volume_name: "bad".into(),
        volume_uuid: src.uuid(),
        generation: src.log.identity().generation,
        size: 4 << 20,
        block_size: 4096,
        source_host: "test".into(),
    };
    let chunk = wire::Chunk::build(
        1,
        1,
        1,
        vec![wire::Extent {
            offset: 0,
            len: 4096,
            kind: wire::ExtentKind::Data,
        }],
        &[7u8; 4096],
        Compression::None,
    )
    .unwrap();
    let good = Frame::Chunk(chunk).encode(DEFAULT_MAX_FRAME).unwrap();
    // Flip a payload byte (checksum mismatch), then a truncated frame.
    let mut flipped = good.clone();
    let n = flipped.len();
    flipped[n - 1] ^= 0xFF;
    for (what, bytes, close_write) in [
        ("corrupted", flipped, false),
        ("truncated", good[..good.len() - 100].to_vec(), true),
    ] {
        let mut t = replicator::tls::connect(&addr, "localhost", &env.client_tls()).unwrap();
        replicator::handshake::client_hello(&mut t, &hello).unwrap();
        use std::io::Write;
        t.write_all(&bytes).unwrap();
        t.flush().unwrap();
        if close_write {
            // The target sees EOF in the middle of the frame.
            drop(t);
            std::thread::sleep(Duration::from_millis(300));
            continue;
        }
        match wire::read_frame(&mut t, DEFAULT_MAX_FRAME).unwrap() {
            Frame::Error(e) => {
                assert_eq!(e.code, ErrorCode::BadFrame, "{what}: {e:?}");
                assert!(
                    e.message.contains("checksum") || e.message.contains("Checksum"),
                    "{e:?}"
                );
            }
            other => panic!("{what}: expected an Error frame, got {other:?}"),
        }
    }
    let st = stores.get("bad");
    let st = st.st();
    assert_eq!(st.spool_calls, 0);
    assert_eq!(st.durable_seq, 0);
    assert!(st.replica.iter().all(|&b| b == 0));
    drop(st);
    server.shutdown();
}

/// The target replica is smaller than the source (the source volume grew):
/// the target is grown at the handshake and only the new extent is
/// resynchronised.
#[test]
fn volume_resized_syncs_only_the_new_extent() {
    let env = Env::new();
    let stores = Stores::default();
    let size = 16u64 << 20;
    let old = 8u64 << 20;
    let src = Source::new(&env.dir, "grow", size, 1 << 20);
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    for off in (0..size).step_by(1 << 20) {
        src.write_untracked(off, &data(&mut rng, 1 << 20, false));
    }
    // The replica holds the old extent already; the pair had finished its sync.
    let replica = src.contents()[..old as usize].to_vec();
    stores.put("grow", MemStore::new(src.identity(old), replica, None));
    let cfg = src.pair_cfg(&env, "127.0.0.1:1", Compression::None);
    let uuid: String = src.uuid().iter().map(|b| format!("{b:02x}")).collect();
    PersistedPair {
        version: 1,
        volume_uuid: uuid,
        generation: src.log.identity().generation,
        state: PairState::DifferentialSync,
        resync_offset: 0,
        resync_end: 0,
        resync_start: 0,
        synced_size: old,
        paused: false,
    }
    .store(&cfg.state_dir, "grow")
    .unwrap();
    let server = env.server(&stores, "127.0.0.1:0");
    let mut cfg = cfg;
    cfg.target_addr = server.local_addr().to_string();
    let pair = Pair::start(cfg).unwrap();
    wait_equal(&src, &stores.get("grow"), &pair, "grown volume");
    let st = pair.status();
    let r = st.resync.unwrap();
    assert_eq!(r.total_bytes, size - old);
    assert!(st.wire_bytes < (size - old) + (1 << 20), "{st:#?}");
    assert_eq!(stores.get("grow").st().ident.size, size);
    pair.stop();
    server.shutdown();
}

/// A target whose spool is over budget holds the source back (flow
/// controlled, visible in the status) and everything still converges.
#[test]
fn flow_control_holds_back_and_converges() {
    let env = Env::new();
    let stores = Stores::default();
    let server = env.server(&stores, "127.0.0.1:0");
    let addr = server.local_addr().to_string();
    let src = Source::new(&env.dir, "fc", 8 << 20, 4 << 20);
    let pair = synced_pair(&env, &src, &stores, &addr, Compression::None);
    let store = stores.get("fc");
    {
        let mut st = store.st();
        st.budget = 256 << 10;
        st.apply_delay = Duration::from_millis(30);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut seen_fc = false;
    for _ in 0..20 {
        random_workload(&src, &mut rng, 100, false);
        let s = pair.status();
        seen_fc |= s.state == PairState::FlowControlled;
        std::thread::sleep(Duration::from_millis(20));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen_fc && Instant::now() < deadline {
        seen_fc |=
            pair.status().state == PairState::FlowControlled || server.status()[0].flow_controlled;
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(seen_fc, "flow control never engaged");
    store.st().apply_delay = Duration::ZERO;
    wait_equal(&src, &store, &pair, "after flow control");
    pair.stop();
    server.shutdown();
}

/// A slow stream of small writes is applied in gathered steps (at most one
/// per `apply_gather` while less than `apply_gather_bytes` is spooled), not
/// one step per received chunk, and the replica still catches up right after.
#[test]
fn slow_stream_is_applied_in_gathered_steps() {
    let env = Env::new();
    let stores = Stores::default();
    let gather = Duration::from_millis(200);
    let opts = TargetOptions {
        apply_gather: gather,
        ..TargetOptions::default()
    };
    assert!(
        TargetOptions::default().apply_gather > Duration::ZERO,
        "gathering is on by default"
    );
    let server = env.server_with(&stores, "127.0.0.1:0", opts);
    let addr = server.local_addr().to_string();
    let src = Source::new(&env.dir, "gather", 8 << 20, 4 << 20);
    let pair = synced_pair(&env, &src, &stores, &addr, Compression::None);
    let store = stores.get("gather");
    let steps_before = store.st().apply_steps;
    let chunks_before = store.st().chunks_stored;
    let start = Instant::now();
    for i in 0..100u64 {
        src.write((i * 37 % 2000) * 4096, &[i as u8 + 1; 4096]);
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_equal(&src, &store, &pair, "slow stream");
    let elapsed = start.elapsed();
    let steps = store.st().apply_steps - steps_before;
    let chunks = store.st().chunks_stored - chunks_before;
    let bound = (elapsed.as_millis() / gather.as_millis()) as u64 + 2;
    assert!(
        steps <= bound,
        "{steps} apply steps for {chunks} chunks in {elapsed:?}: not gathered (at most {bound})"
    );
    assert!(chunks > steps, "{chunks} chunks, {steps} steps");
    pair.stop();
    server.shutdown();
}

/// The engine tells the store whether more input was waiting when it took a
/// batch: not for a slow stream (the store may then apply in place), yes
/// during a burst that a slow store falls behind (so it spools instead).
#[test]
fn store_hears_when_input_is_backlogged() {
    let env = Env::new();
    let stores = Stores::default();
    let server = env.server(&stores, "127.0.0.1:0");
    let addr = server.local_addr().to_string();
    let src = Source::new(&env.dir, "backlog", 8 << 20, 8 << 20);
    let pair = synced_pair(&env, &src, &stores, &addr, Compression::None);
    let store = stores.get("backlog");
    store.st().backlog_seen.clear();
    for i in 0..10u64 {
        src.write(i * 4096, &[i as u8 + 1; 4096]);
        std::thread::sleep(Duration::from_millis(60));
    }
    wait_equal(&src, &store, &pair, "slow stream");
    let slow = std::mem::take(&mut store.st().backlog_seen);
    assert!(
        slow.iter().any(|b| !b),
        "every batch of a slow stream reported a backlog: {slow:?}"
    );
    // A burst of 1 MiB chunks into a store that takes 40 ms per batch.
    store.st().spool_delay = Duration::from_millis(40);
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for i in 0..6u64 {
        src.write(i << 20, &data(&mut rng, 1 << 20, false));
    }
    wait_equal(&src, &store, &pair, "burst");
    let burst = store.st().backlog_seen.clone();
    assert!(
        burst.iter().any(|b| *b),
        "no batch of the burst reported a backlog: {burst:?}"
    );
    pair.stop();
    server.shutdown();
}

/// One server, two volumes routed by name to their own stores; the target
/// status lists both.
#[test]
fn one_server_routes_several_volumes() {
    let env = Env::new();
    let stores = Stores::default();
    let server = env.server(&stores, "127.0.0.1:0");
    let addr = server.local_addr().to_string();
    let a = Source::new(&env.dir, "vol-a", 4 << 20, 1 << 20);
    let b = Source::new(&env.dir, "vol-b", 8 << 20, 1 << 20);
    let pa = synced_pair(&env, &a, &stores, &addr, Compression::Zstd(1));
    let pb = synced_pair(&env, &b, &stores, &addr, Compression::None);
    let mut rng = rand::rngs::StdRng::seed_from_u64(10);
    random_workload(&a, &mut rng, 200, true);
    random_workload(&b, &mut rng, 200, false);
    wait_equal(&a, &stores.get("vol-a"), &pa, "vol-a");
    wait_equal(&b, &stores.get("vol-b"), &pb, "vol-b");
    let ts = server.status();
    let names: Vec<&str> = ts.iter().map(|t| t.volume.as_str()).collect();
    assert_eq!(names, ["vol-a", "vol-b"]);
    assert!(ts.iter().all(|t| t.connected && t.chunks_spooled > 0));
    pa.stop();
    pb.stop();
    server.shutdown();
}

/// The replicator is stopped and restarted (a new `Pair`, as after a crash
/// of the replicator process) repeatedly during a workload: nothing is lost,
/// no full resync is needed.
#[test]
fn replicator_restarts_lose_nothing() {
    let env = Env::new();
    let stores = Stores::default();
    let server = env.server(&stores, "127.0.0.1:0");
    let addr = server.local_addr().to_string();
    let src = Arc::new(Source::new(&env.dir, "restart", 8 << 20, 1 << 20));
    let mut pair = synced_pair(&env, &src, &stores, &addr, Compression::Zstd(1));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (src, stop) = (src.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(11);
            while !stop.load(Ordering::SeqCst) {
                random_workload(&src, &mut rng, 20, true);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(250));
        pair.stop();
        pair = Pair::start(src.pair_cfg(&env, &addr, Compression::Zstd(1))).unwrap();
    }
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    wait_equal(
        &src,
        &stores.get("restart"),
        &pair,
        "after replicator restarts",
    );
    // Still the first (empty-volume) pass only: no resync after restarts.
    assert_eq!(pair.status().resync, None);
    pair.stop();
    server.shutdown();
}

/// The pair's bandwidth limit holds within 10% over a few seconds.
#[test]
fn bandwidth_limit_holds() {
    use replicator::bandwidth::{Limiter, PairLimiter, Schedule};
    let env = Env::new();
    let stores = Stores::default();
    let server = env.server(&stores, "127.0.0.1:0");
    let addr = server.local_addr().to_string();
    let src = Source::new(&env.dir, "bw", 32 << 20, 32 << 20);
    let pair = synced_pair(&env, &src, &stores, &addr, Compression::None);
    pair.pause();
    std::thread::sleep(Duration::from_millis(300));
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    for off in (0..(12u64 << 20)).step_by(1 << 20) {
        src.write(off, &data(&mut rng, 1 << 20, false));
    }
    pair.stop();
    let rate = 4_000_000u64;
    let mut cfg = src.pair_cfg(&env, &addr, Compression::None);
    cfg.limiter = PairLimiter {
        pair: Limiter::new(Schedule::fixed(rate)),
        target: None,
    };
    let t = Instant::now();
    let pair = Pair::start(cfg).unwrap();
    // The pause was persisted with the pair state: it survives the restart.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(pair.status().state, PairState::Paused);
    pair.resume();
    assert!(pair.wait_drained(Duration::from_secs(30)));
    let el = t.elapsed().as_secs_f64();
    let wire = pair.status().wire_bytes as f64;
    let got = wire / el;
    eprintln!("limit {rate} B/s: {wire} bytes in {el:.2} s = {got:.0} B/s");
    assert!(got <= rate as f64 * 1.10, "{got} B/s over the limit");
    assert!(got >= rate as f64 * 0.80, "{got} B/s far below the limit");
    pair.stop();
    server.shutdown();
}

/// A store failure (I/O error) closes the connection; the next connection
/// reopens the store through the provider and the pair converges.
#[test]
fn store_failure_reopens_and_converges() {
    let env = Env::new();
    let stores = Stores::default();
    let server = env.server(&stores, "127.0.0.1:0");
    let addr = server.local_addr().to_string();
    let src = Source::new(&env.dir, "fail", 4 << 20, 1 << 20);
    let pair = synced_pair(&env, &src, &stores, &addr, Compression::None);
    let store = stores.get("fail");
    store.st().fail_spools = 2;
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    random_workload(&src, &mut rng, 200, false);
    wait_equal(&src, &store, &pair, "after store failures");
    let st = pair.status();
    assert!(st.reconnects >= 2, "{st:#?}");
    assert!(server.status()[0].connections >= 3);
    pair.stop();
    server.shutdown();
}

/// A full disk at the target. (1) Apply fails with `NoSpace` while the
/// source is idle (its one chunk was spooled and acknowledged): the status
/// says storage full, and when space is back the apply thread recovers the
/// store in place and applies, without any new connection. (2) Spooling
/// fails with `NoSpace`: the source hears `SpoolFull` naming the full disk,
/// keeps its data and retries; once space is back it converges.
#[test]
fn disk_full_is_reported_and_recovers_in_place() {
    let env = Env::new();
    let stores = Stores::default();
    let server = env.server(&stores, "127.0.0.1:0");
    let addr = server.local_addr().to_string();
    let src = Source::new(&env.dir, "full", 4 << 20, 1 << 20);
    let pair = synced_pair(&env, &src, &stores, &addr, Compression::None);
    let store = stores.get("full");
    let conns = server.status()[0].connections;
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(
                Instant::now() < deadline,
                "{what}: {:#?}\n{:#?}",
                server.status(),
                pair.status()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };

    // (1) apply hits the full disk; the source is idle afterwards.
    {
        let mut st = store.st();
        st.disk_full = true;
        st.disk_full_apply_only = true;
    }
    src.write(4096, &[7u8; 64 << 10]);
    wait("apply failure reported", &|| {
        server.status()[0]
            .storage_full
            .as_deref()
            .is_some_and(|m| m.contains("No space left"))
    });
    assert!(
        pair.wait_drained(Duration::from_secs(20)),
        "the chunk was acknowledged"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !store.st().spool.is_empty(),
        "nothing was applied while full"
    );
    assert!(server.status()[0].storage_full.is_some());
    store.st().disk_full = false;
    wait_equal(&src, &store, &pair, "after the apply failure");
    let ts = &server.status()[0];
    assert!(ts.storage_full.is_none(), "{ts:#?}");
    assert_eq!(
        ts.connections, conns,
        "recovered without a reconnect: {ts:#?}"
    );
    assert!(ts.store_recoveries >= 1, "{ts:#?}");
    assert_eq!(store.st().recoveries, 1);

    // (2) spool hits the full disk.
    {
        let mut st = store.st();
        st.disk_full = true;
        st.disk_full_apply_only = false;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    random_workload(&src, &mut rng, 100, false);
    wait("the source hears the full disk", &|| {
        pair.status()
            .last_error
            .is_some_and(|e| e.contains("SpoolFull") && e.contains("target storage full"))
    });
    assert!(server.status()[0].storage_full.is_some());
    std::thread::sleep(Duration::from_millis(500));
    store.st().disk_full = false;
    wait_equal(&src, &store, &pair, "after the spool failures");
    let ts = &server.status()[0];
    assert!(ts.storage_full.is_none(), "{ts:#?}");
    assert!(ts.connections > conns, "{ts:#?}");
    pair.stop();
    server.shutdown();
}

/// An administrator-requested resync repairs a replica that diverged behind
/// the engine's back (only the damaged blocks travel).
#[test]
fn requested_resync_repairs_divergence() {
    let env = Env::new();
    let stores = Stores::default();
    let server = env.server(&stores, "127.0.0.1:0");
    let addr = server.local_addr().to_string();
    let src = Source::new(&env.dir, "repair", 8 << 20, 1 << 20);
    let pair = synced_pair(&env, &src, &stores, &addr, Compression::None);
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    random_workload(&src, &mut rng, 100, false);
    let store = stores.get("repair");
    wait_equal(&src, &store, &pair, "before damage");
    store.st().replica[3 << 20..(3 << 20) + 10].fill(0x77);
    pair.request_resync();
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.st().replica != src.contents() {
        assert!(
            Instant::now() < deadline,
            "not repaired: {:#?}",
            pair.status()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_equal(&src, &store, &pair, "after resync");
    let r = pair.status().resync.unwrap();
    assert_eq!(r.sent_bytes, 64 << 10, "one hash block resent: {r:?}");
    pair.stop();
    server.shutdown();
}

/// Plaintext works on loopback only; a plaintext listener on another
/// address is refused before serving.
#[test]
fn insecure_mode_is_loopback_only() {
    let env = Env::new();
    let stores = Stores::default();
    let err = TargetServer::bind(
        "0.0.0.0:0",
        ServerTls::insecure(),
        stores.provider(),
        TargetOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");
    let server = TargetServer::bind(
        "127.0.0.1:0",
        ServerTls::insecure(),
        stores.provider(),
        TargetOptions::default(),
    )
    .unwrap();
    let src = Source::new(&env.dir, "plain", 4 << 20, 1 << 20);
    let mut cfg = src.pair_cfg(&env, &server.local_addr().to_string(), Compression::None);
    cfg.tls = ClientTls::insecure();
    let pair = Pair::start(cfg).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(15);
    random_workload(&src, &mut rng, 50, false);
    wait_equal(&src, &stores.get("plain"), &pair, "plaintext");
    pair.stop();
    server.shutdown();
}

/// A loopback TCP proxy that can pass, stall (hold bytes, keep the
/// connections open) or cut (close every current connection).
struct Proxy {
    addr: String,
    mode: Arc<std::sync::atomic::AtomicU8>,
    conns: Arc<Mutex<Vec<std::net::TcpStream>>>,
    stop: Arc<AtomicBool>,
}

const PASS: u8 = 0;
const STALL: u8 = 1;

impl Proxy {
    fn start(target: String) -> Proxy {
        use std::net::{TcpListener, TcpStream};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        l.set_nonblocking(true).unwrap();
        let mode = Arc::new(std::sync::atomic::AtomicU8::new(PASS));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (m, c, st) = (mode.clone(), conns.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let Ok((a, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                a.set_nonblocking(false).unwrap();
                let Ok(b) = TcpStream::connect(&target) else {
                    continue;
                };
                c.lock().unwrap().push(a.try_clone().unwrap());
                c.lock().unwrap().push(b.try_clone().unwrap());
                for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)]
                {
                    let m = m.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            while m.load(Ordering::SeqCst) == STALL {
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy {
            addr,
            mode,
            conns,
            stop,
        }
    }
    fn cut(&self) {
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.mode.store(PASS, Ordering::SeqCst);
        self.cut();
    }
}

/// Link faults through a proxy — cuts, and a stall long enough for the
/// source to give up on the connection and reconnect while the old one is
/// still open (its held bytes reach the target later and must be ignored):
/// the replica converges and the state changes are visible.
#[test]
fn link_faults_through_a_proxy() {
    let env = Env::new();
    let stores = Stores::default();
    let server = env.server(&stores, "127.0.0.1:0");
    let proxy = Proxy::start(server.local_addr().to_string());
    let src = Arc::new(Source::new(&env.dir, "link", 8 << 20, 1 << 20));
    let mut cfg = src.pair_cfg(&env, &proxy.addr, Compression::Zstd(1));
    cfg.response_timeout = Duration::from_millis(800);
    cfg.tls.timeouts.io = Duration::from_secs(1);
    cfg.tls.timeouts.connect = Duration::from_secs(1);
    let pair = Pair::start(cfg).unwrap();
    wait_equal(&src, &stores.get("link"), &pair, "initial");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (src, stop) = (src.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(16);
            while !stop.load(Ordering::SeqCst) {
                random_workload(&src, &mut rng, 20, true);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let mut states = std::collections::HashSet::new();
    let mut watch = |ms: u64| {
        let end = Instant::now() + Duration::from_millis(ms);
        while Instant::now() < end {
            states.insert(format!("{:?}", pair.status().state));
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    watch(300);
    proxy.cut();
    watch(500);
    proxy.mode.store(STALL, Ordering::SeqCst);
    watch(2500);
    proxy.mode.store(PASS, Ordering::SeqCst);
    watch(500);
    proxy.cut();
    watch(300);
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    wait_equal(&src, &stores.get("link"), &pair, "after link faults");
    let st = pair.status();
    assert!(st.reconnects >= 2, "{st:#?}");
    assert!(states.contains("Reconnecting"), "{states:?}");
    pair.stop();
    server.shutdown();
}

/// Loopback throughput (ignored by default; run with
/// `cargo test -p replicator --release --test engine loopback_throughput -- --ignored --nocapture`):
/// 192 MiB of 1 MiB compressible writes are captured in data mode while the
/// pair is paused, then the pair is resumed and timed until everything is
/// durable at the target (TLS 1.3, in-memory test store).
#[test]
#[ignore]
fn loopback_throughput() {
    let total: u64 = 192 << 20;
    for comp in [Compression::None, Compression::Zstd(1)] {
        let env = Env::new();
        let stores = Stores::default();
        let server = env.server(&stores, "127.0.0.1:0");
        let addr = server.local_addr().to_string();
        let src = Source::new(&env.dir, "bench", 256 << 20, 256 << 20);
        let mut cfg = src.pair_cfg(&env, &addr, comp);
        cfg.max_chunk_bytes = 4 << 20;
        let pair = Pair::start(cfg).unwrap();
        wait_equal(&src, &stores.get("bench"), &pair, "initial");
        pair.pause();
        std::thread::sleep(Duration::from_millis(300));
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut off = 0;
        while off < total {
            src.write(off, &data(&mut rng, 1 << 20, true));
            off += 1 << 20;
        }
        let before = pair.status();
        let t = Instant::now();
        pair.resume();
        assert!(pair.wait_drained(Duration::from_secs(300)));
        let el = t.elapsed().as_secs_f64();
        let st = pair.status();
        let raw = st.shipped_raw_bytes - before.shipped_raw_bytes;
        let wire = st.wire_bytes - before.wire_bytes;
        eprintln!(
            "{comp:?}: {:.1} MB in {el:.2} s = {:.0} MB/s shipped (raw), {:.1} MB on the wire, ratio {:.2}",
            raw as f64 / 1e6,
            raw as f64 / 1e6 / el,
            wire as f64 / 1e6,
            raw as f64 / wire as f64
        );
        pair.stop();
        server.shutdown();
    }
}
