//! The agent-egress daemon in a world: started in the agent netns (not in the
//! agent cgroup), with its audit file in the world's temp dir.

use super::process::ChildGuard;
use super::topology::DNS_V4;
use super::world::World;
use serde_json::{json, Value};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub const PORT: u16 = 15001;
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// The binary under test (cargo builds it for integration tests).
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_agent-egress")
}

pub struct Daemon {
    pub guard: ChildGuard,
    pub config: PathBuf,
    pub audit: PathBuf,
    pub table: String,
}

/// A config for `world` allowing `allowed.test` by name, everything else
/// blocked; `extra` is merged over it (top-level keys replace).
pub fn config(world: &World, extra: Value) -> Value {
    let mut base = json!({
        "listen": {"port": PORT, "workers": 2},
        "interception": {"cgroups": [world.agent().relative_path()]},
        "dns": {"servers": [DNS_V4.to_string()], "timeout_ms": 1000},
        "rules": [{"name": "allowed", "domains": ["allowed.test"], "outbound": "direct"}],
        "default": "block",
        "audit": {"path": world.dir().join("audit.jsonl")},
        "limits": {"sniff_timeout_ms": 1000}
    });
    if let (Some(base), Some(extra)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    base
}

impl Daemon {
    /// Start `run --config` and wait until its table is installed and its
    /// listener accepts.
    pub fn start(world: &World, config: Value) -> Daemon {
        Daemon::start_with(world, config, &[])
    }

    /// Like `start`, with `wrapper` (e.g. `prlimit --nofile=64`) before the binary.
    pub fn start_with(world: &World, config: Value, wrapper: &[&str]) -> Daemon {
        let table = config["interception"]["table"]
            .as_str()
            .unwrap_or("agent_egress")
            .to_string();
        let audit = PathBuf::from(config["audit"]["path"].as_str().unwrap_or("/dev/null"));
        let path = world.write_config(&config);
        // As systemd does for Type=notify: the daemon says READY=1 once its
        // table, routes, BPF programs and listeners are all in place.
        let notify_path = path.with_extension("notify");
        let notify = UnixDatagram::bind(&notify_path)
            .and_then(|socket| socket.set_nonblocking(true).map(|()| socket))
            .unwrap_or_else(|e| panic!("{}: {e}", notify_path.display()));
        let mut cmd = world.host_cmd(wrapper.iter().copied().chain([binary(), "run", "--config"]));
        cmd.arg(&path);
        cmd.env("RUST_LOG", "debug")
            .env("NOTIFY_SOCKET", &notify_path);
        let guard = world.spawn("agent-egress", cmd);
        let mut daemon = Daemon {
            guard,
            config: path,
            audit,
            table,
        };
        daemon.wait_ready(&notify);
        daemon
    }

    fn wait_ready(&mut self, notify: &UnixDatagram) {
        let started = Instant::now();
        let mut message = [0u8; 64];
        loop {
            if let Some(status) = self.guard.try_wait() {
                panic!(
                    "agent-egress exited early ({status}):\n{}",
                    self.guard.log()
                );
            }
            if let Ok(n) = notify.recv(&mut message) {
                assert_eq!(&message[..n], b"READY=1", "{}", self.guard.log());
                return;
            }
            if started.elapsed() > READY_TIMEOUT {
                panic!(
                    "agent-egress not ready after {READY_TIMEOUT:?}:\n{}",
                    self.guard.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn table_installed(&self, world: &World) -> bool {
        world
            .host_cmd(["nft", "list", "table", "inet", &self.table])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// Every audit record written so far.
    pub fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits (up to 5 s) for an "end" record that `matches`.
    pub fn wait_record(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        self.wait_event("end", what, matches)
    }

    /// Waits (up to 5 s) for a record of `event` that `matches`.
    pub fn wait_event(&self, event: &str, what: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            if let Some(r) = self
                .records()
                .into_iter()
                .find(|r| r["event"] == event && matches(r))
            {
                return r;
            }
            if started.elapsed() > Duration::from_secs(5) {
                panic!(
                    "no audit record for {what}; records:\n{}\nlog:\n{}",
                    std::fs::read_to_string(&self.audit).unwrap_or_default(),
                    self.guard.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        super::process::signal(self.guard.pid(), sig);
    }
}
