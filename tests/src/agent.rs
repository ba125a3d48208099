//! A `rewind agent` under test: start from a configuration text, signal,
//! wait for log lines, query the admin socket, stop cleanly.

use crate::*;
use serde_json::Value;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);
/// Size of the volumes [`volume`] creates.
pub const SIZE: u64 = 8 * MIB;

/// A running `rewind agent` (killed on drop).
pub struct Agent {
    child: Option<Child>,
    pub config: PathBuf,
    pub log: PathBuf,
    pub admin: PathBuf,
}

impl Agent {
    /// Writes `config_text` to `s/agent.toml`, starts the agent, waits until it runs.
    pub fn start(s: &Scratch, config_text: &str) -> Agent {
        Self::start_with_env(s, config_text, &[])
    }

    /// As [`Agent::start`], with extra environment variables.
    pub fn start_with_env(s: &Scratch, config_text: &str, env: &[(&str, &str)]) -> Agent {
        let config = s.join("agent.toml");
        std::fs::write(&config, config_text).unwrap();
        let log = s.join("agent.log");
        let lf = File::create(&log).unwrap();
        let child = Command::new(rewind_bin("rewind"))
            .args(["agent", "--config"])
            .arg(&config)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(lf.try_clone().unwrap())
            .stderr(lf)
            .spawn()
            .expect("spawn rewind agent");
        let mut a = Agent {
            child: Some(child),
            config,
            log,
            admin: s.join("admin.sock"),
        };
        a.wait_for(|a| a.log_text().contains("agent running"), "agent running");
        a
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for(&mut self, mut f: impl FnMut(&Agent) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !f(self) {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "agent exited ({st}) waiting for {what}:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        run_ok(Command::new("kill").args([&format!("-{sig}"), &pid]), T);
    }

    pub fn stop(mut self) {
        self.signal("TERM");
        let mut c = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(st.success(), "agent exited with {st}:\n{}", self.log_text());
                return;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("agent did not stop within 15 s:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn volumes(&self) -> Value {
        let o = run_ok(
            Command::new("python3").args([
                "-c",
                "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\ns.sendall(b'{\"v\":1,\"request\":{\"cmd\":\"volumes\"}}\\n')\nprint(s.makefile().readline())",
                self.admin.to_str().unwrap(),
            ]),
            T,
        );
        let v: Value = serde_json::from_slice(&o.stdout).expect("admin answer");
        v["ok"].clone()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The top-level keys of a test agent.toml, all under `s`.
pub fn head(s: &Scratch) -> String {
    format!(
        "state_dir = \"{}\"\nshm_dir = \"{}\"\nadmin_socket = \"{}\"\nmemory_budget = \"16M\"\n",
        s.join("state").display(),
        s.join("shm").display(),
        s.join("admin.sock").display()
    )
}

/// A `[[volume]]` table for `name` (backing `s/NAME.img`, created sparse; socket `s/NAME.sock`).
pub fn volume(s: &Scratch, name: &str, group: Option<&str>) -> String {
    let backing = s.join(&format!("{name}.img"));
    if !backing.exists() {
        create_sparse(&backing, SIZE);
    }
    let mut t = format!(
        "\n[[volume]]\nname = \"{name}\"\nbacking = \"{}\"\nlisten = \"unix:{}\"\n",
        backing.display(),
        s.join(&format!("{name}.sock")).display()
    );
    if let Some(g) = group {
        t.push_str(&format!("group = \"{g}\"\n"));
    }
    t
}
