//! Helpers of the trace-replay tests (`tests/tests/replay*.rs`): the
//! committed traces, `rewind replay` runs (with `--sync-at` positions driven
//! from the test: the replay drains, prints a `sync` line and waits for a line
//! on stdin), and report parsing.

use crate::{rewind_bin, text, workspace_root};
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The committed real-software traces (`tests/traces/*.iolog.zst`), sorted.
pub fn committed_traces() -> Vec<PathBuf> {
    let dir = workspace_root().join("tests").join("traces");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".iolog.zst"))
        .collect();
    v.sort();
    assert!(
        v.len() >= 3,
        "expected at least 3 committed traces in {}",
        dir.display()
    );
    v
}

/// `rewind replay ARGS... --json`, run to completion; returns (output, report).
/// The report is None when the command printed no JSON (an error).
pub fn replay(args: &[&str], timeout: Duration) -> (Output, Option<Value>) {
    let mut cmd = Command::new(rewind_bin("rewind"));
    cmd.arg("replay").args(args).args(["--json", "--quiet"]);
    let o = crate::run(&mut cmd, timeout);
    let v = serde_json::from_slice(&o.stdout).ok();
    (o, v)
}

/// Asserts a report shows zero mismatches and something was checked.
pub fn assert_clean(o: &Output, v: &Option<Value>, what: &str) -> Value {
    let v = v
        .clone()
        .unwrap_or_else(|| panic!("{what}: no JSON report\n{}", text(o)));
    assert!(
        o.status.success() && v["mismatches"] == 0,
        "{what}: mismatches\n{}\n{}",
        serde_json::to_string_pretty(&v["verify"]).unwrap_or_default(),
        text(o)
    );
    v
}

/// A running `rewind replay` with `--sync-at` positions.
pub struct SyncedReplay {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<BufReader<ChildStdout>>,
}

impl SyncedReplay {
    /// Spawns `rewind replay ARGS... --json --quiet` (ARGS include `--sync-at N`).
    pub fn start(args: &[&str]) -> SyncedReplay {
        let mut child = Command::new(rewind_bin("rewind"))
            .arg("replay")
            .args(args)
            .args(["--json", "--quiet"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn rewind replay");
        let stdin = child.stdin.take();
        let stdout = Some(BufReader::new(child.stdout.take().expect("piped")));
        SyncedReplay {
            child,
            stdin,
            stdout,
        }
    }

    /// Waits for the next `sync` line; returns its position (operations done).
    pub fn wait_sync(&mut self) -> u64 {
        let mut line = String::new();
        let n = self
            .stdout
            .as_mut()
            .expect("stdout")
            .read_line(&mut line)
            .expect("read replay stdout");
        assert!(n > 0, "replay exited before its sync point");
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad sync line {line:?}: {e}"));
        assert_eq!(v["event"], "sync", "{line}");
        v["position"].as_u64().expect("position")
    }

    /// Lets the replay continue past the sync point.
    pub fn resume(&mut self) {
        let w = self.stdin.as_mut().expect("stdin");
        w.write_all(b"go\n").expect("write replay stdin");
        w.flush().expect("flush");
    }

    /// Waits for the end; returns (success, report).
    pub fn finish(mut self, timeout: Duration) -> (bool, Value) {
        drop(self.stdin.take());
        let mut rest = String::new();
        let deadline = Instant::now() + timeout;
        let mut out = self.stdout.take().expect("stdout");
        let reader = std::thread::spawn(move || {
            let _ = std::io::Read::read_to_string(&mut out, &mut rest);
            rest
        });
        let st = loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "replay did not finish in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = reader.join().unwrap_or_default();
        let v: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("replay printed no JSON report ({e}): {out}"));
        (st.success(), v)
    }
}

impl Drop for SyncedReplay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// All mismatch descriptions of a report section (`found` + `expected`), for assertions.
pub fn mismatch_text(section: &Value) -> String {
    section["first_mismatches"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    format!(
                        "at {}: {}; expected {}\n",
                        m["offset"], m["found"], m["expected"]
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
