//! Bookmarks (tags) taken by the agent: one volume or a consistency group,
//! crash-consistent across all of them, with optional pre/post hooks for
//! application- and file-system-consistent points; plus `rewind bookmark`.
//!
//! The procedure ([`take`]), all under one lock per process:
//! 1. check every volume can take an exact tag now (tracked, filtering on,
//!    data mode, no dirty bits) — otherwise fail before anything happens;
//! 2. run the pre hook (e.g. `fsfreeze -f /mnt`), bounded by the hook timeout;
//! 3. raise the write gate of every volume (sorted by name): new writes are
//!    held, in-flight writes are waited for (see [`crate::gate`]);
//! 4. insert the tag, with one uuid, in every volume's change log;
//! 5. lower the gates; the hold time (3–5) is measured and bounded by
//!    `max_hold`: past it the gates are lowered and the bookmark fails;
//! 6. run the post hook (e.g. `fsfreeze -u /mnt`) — always, once the pre
//!    hook was started, whatever happened in between.
//!
//! A failed bookmark leaves no tag when it fails before step 4 (the usual
//! case: hook failure, hold bound hit while waiting for in-flight writes).
//! If it fails during step 4 (the bound expired between two insertions, or a
//! log refused the tag), the volumes already tagged are listed in the error:
//! each of those tags is a valid point of its own volume, but not a group point.

use std::collections::VecDeque;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_core::{CaptureMode, TagType};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::volumes::{now_ns, AgentRequest, Volume, Volumes};

/// Default bound of the write hold of a bookmark.
pub const DEFAULT_MAX_HOLD_MS: u64 = 1000;
/// Default bound of each hook command.
pub const DEFAULT_HOOK_TIMEOUT_MS: u64 = 60_000;
/// Longest bookmark name, in bytes (the change log's limit).
pub const MAX_NAME: usize = 1024;
/// Bookmarks remembered by `bookmarks` (successful or not).
pub const HISTORY_LEN: usize = 256;

/// Bookmark type, as in the seed product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum BookmarkType {
    /// Application-consistent (the pre hook quiesced the application).
    App,
    /// File-system consistent (the pre hook froze the file system).
    Fs,
    /// User marker: crash-consistent.
    #[default]
    User,
}

impl BookmarkType {
    /// The change log's tag type.
    pub fn tag_type(self) -> TagType {
        match self {
            BookmarkType::App => TagType::App,
            BookmarkType::Fs => TagType::Fs,
            BookmarkType::User => TagType::User,
        }
    }
}

/// Arguments of the `bookmark` admin operation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BookmarkRequest {
    /// Bookmark name.
    pub name: String,
    /// Volumes to tag together (or use `group`; neither = the only volume).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// Consistency group to tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Type.
    #[serde(default, rename = "type")]
    pub kind: BookmarkType,
    /// Shell command run before the barrier (`sh -c`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre: Option<String>,
    /// Shell command run after the barrier, also after failures once `pre` ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post: Option<String>,
    /// Bound of the write hold, ms (default [`DEFAULT_MAX_HOLD_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_hold_ms: Option<u64>,
    /// Bound of each hook, ms (default [`DEFAULT_HOOK_TIMEOUT_MS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_timeout_ms: Option<u64>,
}

/// Where a tag went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagPlaced {
    /// Volume.
    pub volume: String,
    /// Sequence number of the tag record in the volume's change log.
    pub seq: u64,
}

/// What a hook did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookResult {
    /// The command.
    pub command: String,
    /// Exit code (`None`: killed by a signal or by the timeout).
    pub exit_code: Option<i32>,
    /// Killed after the hook timeout.
    pub timed_out: bool,
    /// Run time, ms.
    pub elapsed_ms: u64,
    /// The last bytes of its stdout and stderr.
    pub output: String,
}

impl HookResult {
    fn succeeded(&self) -> bool {
        !self.timed_out && self.exit_code == Some(0)
    }
}

/// A bookmark taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BookmarkOutcome {
    /// Name.
    pub name: String,
    /// Uuid shared by the tags of all volumes.
    pub uuid: String,
    /// Type.
    #[serde(rename = "type")]
    pub kind: BookmarkType,
    /// Group, when taken by group.
    pub group: Option<String>,
    /// One entry per volume.
    pub volumes: Vec<TagPlaced>,
    /// How long new writes were held, µs (gates raised to lowered).
    pub hold_us: u64,
    /// The bound of the hold, ms.
    pub max_hold_ms: u64,
    /// When the tags were inserted, ns since the Unix epoch.
    pub created_ns: u64,
    /// The pre hook, if any.
    pub pre_hook: Option<HookResult>,
    /// The post hook, if any.
    pub post_hook: Option<HookResult>,
}

/// One entry of the bookmark history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Name.
    pub name: String,
    /// Uuid (also for failed ones: tags listed in `volumes` carry it).
    pub uuid: String,
    /// Type.
    #[serde(rename = "type")]
    pub kind: BookmarkType,
    /// Whether it succeeded.
    pub ok: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// Volumes that got the tag.
    pub volumes: Vec<TagPlaced>,
    /// Volumes it was meant for.
    pub requested: Vec<String>,
    /// Hold time, µs (0 when no barrier was raised).
    pub hold_us: u64,
    /// When, ns since the Unix epoch.
    pub created_ns: u64,
    /// Taken by the periodic scheduler.
    pub periodic: bool,
}

/// The last [`HISTORY_LEN`] bookmarks of this process, oldest first.
#[derive(Debug, Default)]
pub struct History(Mutex<VecDeque<HistoryEntry>>);

impl History {
    fn push(&self, e: HistoryEntry) {
        let mut h = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if h.len() == HISTORY_LEN {
            h.pop_front();
        }
        h.push_back(e);
    }

    /// The entries, oldest first.
    pub fn list(&self) -> Vec<HistoryEntry> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }
}

/// A failed bookmark: the message, plus the stage (`check`, `pre_hook`,
/// `barrier`, `tag`) and the volumes that got a tag anyway, for the log.
fn failed(message: String, details: Value) -> String {
    tracing::debug!(%details, "bookmark failure details");
    message
}

/// Checks a bookmark name: 1..=1024 bytes, no control characters.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("a bookmark name has 1 to {MAX_NAME} bytes"));
    }
    if name.chars().any(char::is_control) {
        return Err("a bookmark name may not contain control characters".into());
    }
    Ok(())
}

/// Why `v` cannot take an exact tag now, if it cannot.
fn not_taggable(v: &Volume) -> Option<String> {
    let Some(log) = &v.log else {
        return Some(format!(
            "volume {} is served without change tracking",
            v.name
        ));
    };
    let s = log.stats();
    if !s.filtering {
        return Some(format!(
            "filtering is stopped on volume {} (drvutil --start-filtering)",
            v.name
        ));
    }
    if s.mode != CaptureMode::Data || s.dirty_blocks_active + s.dirty_blocks_pending > 0 {
        return Some(format!(
            "volume {} is in {:?} mode with {} dirty blocks: write order is not captured until the replicator drains them, so no exact point exists now",
            v.name,
            s.mode,
            s.dirty_blocks_active + s.dirty_blocks_pending
        ));
    }
    None
}

/// Takes a bookmark as described in the module docs.
pub fn take(vols: &Volumes, req: &BookmarkRequest) -> Result<BookmarkOutcome, String> {
    take_inner(vols, req, false)
}

/// As [`take`], marked as periodic in the history.
pub fn take_periodic(vols: &Volumes, req: &BookmarkRequest) -> Result<BookmarkOutcome, String> {
    take_inner(vols, req, true)
}

fn take_inner(
    vols: &Volumes,
    req: &BookmarkRequest,
    periodic: bool,
) -> Result<BookmarkOutcome, String> {
    check_name(&req.name).map_err(|e| format!("name: {e}"))?;
    let max_hold_ms = req.max_hold_ms.unwrap_or(DEFAULT_MAX_HOLD_MS);
    if max_hold_ms == 0 || max_hold_ms > 60_000 {
        return Err("max_hold_ms must be 1..=60000".into());
    }
    let hook_timeout =
        Duration::from_millis(req.hook_timeout_ms.unwrap_or(DEFAULT_HOOK_TIMEOUT_MS));
    let targets = vols.select(&req.volumes, req.group.as_deref())?;
    let _serial = vols.bookmark_lock.lock().unwrap_or_else(|e| e.into_inner());
    let uuid = uuid::Uuid::new_v4();
    let names: Vec<String> = targets.iter().map(|v| v.name.clone()).collect();
    let mut entry = HistoryEntry {
        name: req.name.clone(),
        uuid: uuid.to_string(),
        kind: req.kind,
        ok: false,
        error: None,
        volumes: Vec::new(),
        requested: names.clone(),
        hold_us: 0,
        created_ns: now_ns(),
        periodic,
    };
    let result = run_procedure(req, &targets, uuid, max_hold_ms, hook_timeout, &mut entry);
    match &result {
        Ok(o) => {
            entry.ok = true;
            tracing::info!(
                bookmark = req.name,
                uuid = %uuid,
                volumes = ?names,
                hold_us = o.hold_us,
                "bookmark taken"
            );
        }
        Err(e) => {
            entry.error = Some(e.clone());
            tracing::warn!(bookmark = req.name, volumes = ?names, error = %e, "bookmark failed");
        }
    }
    vols.history.push(entry);
    result
}

fn run_procedure(
    req: &BookmarkRequest,
    targets: &[Arc<Volume>],
    uuid: uuid::Uuid,
    max_hold_ms: u64,
    hook_timeout: Duration,
    entry: &mut HistoryEntry,
) -> Result<BookmarkOutcome, String> {
    let names: Vec<String> = targets.iter().map(|v| v.name.clone()).collect();
    for v in targets {
        if let Some(why) = not_taggable(v) {
            return Err(failed(
                format!("bookmark {:?} not taken: {why}", req.name),
                json!({"stage": "check", "tagged": []}),
            ));
        }
    }
    let env = [
        ("REWIND_BOOKMARK", req.name.clone()),
        ("REWIND_BOOKMARK_UUID", uuid.to_string()),
        ("REWIND_VOLUMES", names.join(" ")),
        (
            "REWIND_BOOKMARK_TYPE",
            format!("{:?}", req.kind).to_lowercase(),
        ),
    ];
    let pre_hook = match &req.pre {
        None => None,
        Some(cmd) => {
            let r = run_hook(cmd, "pre", &env, hook_timeout);
            if !r.succeeded() {
                let post = req
                    .post
                    .as_ref()
                    .map(|c| run_hook(c, "post", &env, hook_timeout));
                return Err(failed(
                    format!(
                        "bookmark {:?} not taken: pre hook {cmd:?} {}",
                        req.name,
                        describe_hook_failure(&r)
                    ),
                    json!({"stage": "pre_hook", "tagged": [], "pre_hook": r, "post_hook": post}),
                ));
            }
            Some(r)
        }
    };
    let barrier = hold_and_tag(req, targets, uuid, max_hold_ms);
    let post_hook = req
        .post
        .as_ref()
        .map(|c| run_hook(c, "post", &env, hook_timeout));
    let (placed, hold_us) = match barrier {
        Ok(x) => x,
        Err((msg, stage, placed, hold_us)) => {
            entry.volumes = placed.clone();
            entry.hold_us = hold_us;
            return Err(failed(
                format!("bookmark {:?} failed: {msg}", req.name),
                json!({"stage": stage, "tagged": placed, "hold_us": hold_us,
                       "max_hold_ms": max_hold_ms, "pre_hook": pre_hook, "post_hook": post_hook}),
            ));
        }
    };
    entry.volumes = placed.clone();
    entry.hold_us = hold_us;
    if let Some(p) = post_hook.as_ref().filter(|p| !p.succeeded()) {
        // The tags are in: the point exists. The admin must see the thaw failed.
        tracing::error!(
            bookmark = req.name,
            hook = p.command,
            "post hook failed after the bookmark was taken: check the application/file system is thawed"
        );
    }
    Ok(BookmarkOutcome {
        name: req.name.clone(),
        uuid: uuid.to_string(),
        kind: req.kind,
        group: req.group.clone(),
        volumes: placed,
        hold_us,
        max_hold_ms,
        created_ns: entry.created_ns,
        pre_hook,
        post_hook,
    })
}

type BarrierError = (String, &'static str, Vec<TagPlaced>, u64);

/// Steps 3–5: raise, tag, lower. Gates are always lowered on return.
fn hold_and_tag(
    req: &BookmarkRequest,
    targets: &[Arc<Volume>],
    uuid: uuid::Uuid,
    max_hold_ms: u64,
) -> Result<(Vec<TagPlaced>, u64), BarrierError> {
    let gates: Vec<_> = targets.iter().filter_map(|v| v.gate.clone()).collect();
    let start = Instant::now();
    let deadline = start + Duration::from_millis(max_hold_ms);
    let mut raised = 0;
    let mut failure: Option<(String, &'static str)> = None;
    for (v, g) in targets.iter().zip(&gates) {
        match g.raise(deadline) {
            Ok(()) => raised += 1,
            Err(e) => {
                failure = Some((
                    format!(
                        "writes held longer than the bound of {max_hold_ms} ms: {e} on volume {}; writes resumed, no tag inserted",
                        v.name
                    ),
                    "barrier",
                ));
                break;
            }
        }
    }
    let mut placed = Vec::new();
    let gap = tag_gap();
    if failure.is_none() {
        for (i, v) in targets.iter().enumerate() {
            if i > 0 && !gap.is_zero() {
                std::thread::sleep(gap);
            }
            if Instant::now() >= deadline {
                failure = Some((
                    format!("the hold bound of {max_hold_ms} ms expired while inserting tags"),
                    "tag",
                ));
                break;
            }
            let Some(log) = &v.log else { continue };
            match log.insert_tag(&req.name, req.kind.tag_type(), *uuid.as_bytes()) {
                Ok(seq) => placed.push(TagPlaced {
                    volume: v.name.clone(),
                    seq,
                }),
                Err(e) => {
                    failure = Some((format!("volume {} refused the tag: {e}", v.name), "tag"));
                    break;
                }
            }
        }
    }
    for g in gates.iter().take(raised) {
        g.lower();
    }
    let hold_us = start.elapsed().as_micros() as u64;
    match failure {
        None => Ok((placed, hold_us)),
        Some((msg, stage)) => {
            let msg = if placed.is_empty() {
                msg
            } else {
                format!(
                    "{msg}; tagged only {} (valid single-volume points, not a group point)",
                    placed
                        .iter()
                        .map(|p| p.volume.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            Err((msg, stage, placed, hold_us))
        }
    }
}

/// Fault injection for tests: `REWIND_TEST_TAG_GAP_US` stretches the time
/// between two tag insertions of one bookmark (writes stay held meanwhile),
/// so a consistency test sees what a missing barrier would let through.
fn tag_gap() -> Duration {
    std::env::var("REWIND_TEST_TAG_GAP_US")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(Duration::ZERO, Duration::from_micros)
}

fn describe_hook_failure(r: &HookResult) -> String {
    if r.timed_out {
        format!("timed out after {} ms and was killed", r.elapsed_ms)
    } else {
        match r.exit_code {
            Some(c) => format!("exited with status {c}: {}", r.output.trim()),
            None => format!("was killed by a signal: {}", r.output.trim()),
        }
    }
}

/// Keeps the last `KEEP` bytes of a hook's output.
const KEEP: usize = 4096;

/// Runs `sh -c cmd` with `env`, killing it after `timeout`.
pub fn run_hook(cmd: &str, stage: &str, env: &[(&str, String)], timeout: Duration) -> HookResult {
    let start = Instant::now();
    let mut c = Command::new("/bin/sh");
    // Its own process group, so a timeout kills what the hook started too
    // (a `sleep` holding the output pipes open would otherwise outlive it).
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    c.arg("-c")
        .arg(cmd)
        .env("REWIND_HOOK_STAGE", stage)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = match c.spawn() {
        Ok(ch) => ch,
        Err(e) => {
            return HookResult {
                command: cmd.to_owned(),
                exit_code: None,
                timed_out: false,
                elapsed_ms: 0,
                output: format!("cannot start /bin/sh: {e}"),
            }
        }
    };
    let collect = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut r) = r {
                let mut buf = [0u8; 4096];
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    out.extend_from_slice(&buf[..n]);
                    if out.len() > 2 * KEEP {
                        out.drain(..out.len() - KEEP);
                    }
                }
            }
            out
        })
    };
    let so = collect(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let se = collect(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if start.elapsed() >= timeout => {
                timed_out = true;
                let pg = i32::try_from(child.id()).map(nix::unistd::Pid::from_raw);
                match pg {
                    Ok(pg) => {
                        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
                    }
                    Err(_) => {
                        let _ = child.kill();
                    }
                }
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(_) => break None,
        }
    };
    let mut output = so.join().unwrap_or_default();
    output.extend(se.join().unwrap_or_default());
    if output.len() > KEEP {
        output.drain(..output.len() - KEEP);
    }
    let r = HookResult {
        command: cmd.to_owned(),
        exit_code: status.and_then(|s| s.code()),
        timed_out,
        elapsed_ms: start.elapsed().as_millis() as u64,
        output: String::from_utf8_lossy(&output).into_owned(),
    };
    tracing::info!(stage, command = cmd, exit = ?r.exit_code, timed_out, elapsed_ms = r.elapsed_ms, "bookmark hook ran");
    r
}

// ---------------------------------------------------------------------------
// The `rewind bookmark` command
// ---------------------------------------------------------------------------

/// Arguments of `rewind bookmark`.
#[derive(Debug, Args)]
pub struct BookmarkArgs {
    #[command(subcommand)]
    cmd: BookmarkCmd,
    /// Admin socket of the agent (default: $REWIND_ADMIN_SOCKET, else
    /// `<shm-dir>/<volume>.admin.sock` of a `rewind export` of the volume if
    /// present, else /run/rewind/agent.sock).
    #[arg(long, global = true, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// Change-log directory used to find a `rewind export`'s admin socket.
    #[arg(long, global = true, value_name = "DIR", default_value = agent_core::config::DEFAULT_SHM_DIR)]
    shm_dir: PathBuf,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum BookmarkCmd {
    /// Take a bookmark now: crash-consistent across the named volumes or group,
    /// app- or fs-consistent with --pre/--post hooks.
    #[command(after_help = "Examples:\n  \
        rewind bookmark create before-upgrade --volume vol0\n  \
        rewind bookmark create nightly --group db --type app \\\n      \
        --pre 'psql -c \"CHECKPOINT\"' --max-hold 500\n  \
        rewind bookmark create fs-point --volume data --type fs \\\n      \
        --pre 'fsfreeze -f /srv/data' --post 'fsfreeze -u /srv/data'")]
    Create {
        /// Bookmark name (1 to 1024 bytes).
        name: String,
        /// A volume to tag (repeat for several: they are tagged together).
        #[arg(long = "volume", value_name = "VOLUME", conflicts_with = "group")]
        volumes: Vec<String>,
        /// Tag every volume of this consistency group together.
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        /// Bookmark type.
        #[arg(long = "type", value_enum, default_value = "user")]
        kind: BookmarkType,
        /// Command run (sh -c) before writes are held, e.g. `fsfreeze -f /mnt`.
        #[arg(long, value_name = "CMD")]
        pre: Option<String>,
        /// Command run after the tags are in (and after any failure once --pre ran),
        /// e.g. `fsfreeze -u /mnt`.
        #[arg(long, value_name = "CMD")]
        post: Option<String>,
        /// Bound of the write hold in ms; past it writes resume and the bookmark fails.
        #[arg(long, value_name = "MS", default_value_t = DEFAULT_MAX_HOLD_MS)]
        max_hold: u64,
        /// Bound of each hook in seconds (the hook is killed after it).
        #[arg(long, value_name = "SECS", default_value_t = DEFAULT_HOOK_TIMEOUT_MS / 1000)]
        hook_timeout: u64,
    },
    /// List the bookmarks this agent took since it started (successful and failed).
    #[command(after_help = "Examples:\n  rewind bookmark list\n  rewind bookmark list --json")]
    List,
}

fn socket_for(args: &BookmarkArgs, volumes: &[String]) -> PathBuf {
    let one = match volumes {
        [v] => Some(v.as_str()),
        _ => None,
    };
    crate::volumes::resolve_socket(args.admin_socket.as_deref(), &args.shm_dir, one)
}

/// Runs `rewind bookmark` and returns what it prints.
pub fn run(args: BookmarkArgs) -> Result<String> {
    match &args.cmd {
        BookmarkCmd::Create {
            name,
            volumes,
            group,
            kind,
            pre,
            post,
            max_hold,
            hook_timeout,
        } => {
            check_name(name).map_err(|e| anyhow::anyhow!("NAME: {e}"))?;
            if *max_hold == 0 || *max_hold > 60_000 {
                bail!("--max-hold {max_hold}: must be 1..=60000 ms");
            }
            let req = BookmarkRequest {
                name: name.clone(),
                volumes: volumes.clone(),
                group: group.clone(),
                kind: *kind,
                pre: pre.clone(),
                post: post.clone(),
                max_hold_ms: Some(*max_hold),
                hook_timeout_ms: Some(hook_timeout.saturating_mul(1000)),
            };
            let socket = socket_for(&args, volumes);
            // Hooks run twice at most, plus the hold.
            let timeout = Duration::from_secs(hook_timeout.saturating_mul(2) + 30);
            let v: Value = crate::volumes::call(&socket, &AgentRequest::Bookmark(req), timeout)
                .with_context(|| format!("bookmark {name:?} via {}", socket.display()))?;
            if args.json {
                return Ok(serde_json::to_string_pretty(&v)? + "\n");
            }
            let o: BookmarkOutcome =
                serde_json::from_value(v).context("decoding the agent's answer")?;
            let where_ = o
                .volumes
                .iter()
                .map(|p| format!("{} (seq {})", p.volume, p.seq))
                .collect::<Vec<_>>()
                .join(", ");
            Ok(format!(
                "bookmark {:?} ({:?}, uuid {}) taken on {where_}; writes held {:.3} ms (bound {} ms)\n",
                o.name,
                o.kind,
                o.uuid,
                o.hold_us as f64 / 1000.0,
                o.max_hold_ms
            ))
        }
        BookmarkCmd::List => {
            let socket = socket_for(&args, &[]);
            let v: Value =
                crate::volumes::call(&socket, &AgentRequest::Bookmarks, Duration::from_secs(30))
                    .with_context(|| format!("listing bookmarks via {}", socket.display()))?;
            if args.json {
                return Ok(serde_json::to_string_pretty(&v)? + "\n");
            }
            let list: Vec<HistoryEntry> =
                serde_json::from_value(v).context("decoding the agent's answer")?;
            let mut out = format!(
                "{:<24} {:<5} {:<7} {:>10}  {:<36}  volumes\n",
                "name", "type", "result", "hold ms", "uuid"
            );
            for e in list {
                out.push_str(&format!(
                    "{:<24} {:<5} {:<7} {:>10.3}  {:<36}  {}{}\n",
                    e.name,
                    format!("{:?}", e.kind).to_lowercase(),
                    if e.ok { "ok" } else { "FAILED" },
                    e.hold_us as f64 / 1000.0,
                    e.uuid,
                    e.volumes
                        .iter()
                        .map(|p| p.volume.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    e.error.map(|m| format!("  ({m})")).unwrap_or_default()
                ));
            }
            Ok(out)
        }
    }
}
