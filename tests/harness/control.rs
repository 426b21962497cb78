//! A daemon with its control API in the test world, and a client for it:
//! what tests/control.rs, tests/mcp.rs and tests/watch.rs share.

use super::daemon;
use super::{TestHost, World};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The socket's directory under /run, removed when the test ends.
pub struct SocketDir(PathBuf);

impl SocketDir {
    pub fn new(world: &World) -> SocketDir {
        SocketDir(PathBuf::from(format!("/run/ae-control-{}", world.id())))
    }

    pub fn socket(&self) -> PathBuf {
        self.0.join("control.sock")
    }
}

impl Drop for SocketDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Control on, allowed.test allowed, the metadata address locked out.
pub fn config(world: &World, socket: &Path) -> Value {
    config_with(
        world,
        socket,
        json!({"name": "metadata", "ips": ["169.254.169.254/32"], "outbound": "block", "locked": true}),
        json!({}),
    )
}

/// Control on with its state under the world, allowed.test allowed, then
/// `rule`; the keys of `extra` beside.
pub fn config_with(world: &World, socket: &Path, rule: Value, extra: Value) -> Value {
    let mut settings = json!({
        "control": {"enable": true, "socket": socket, "group": "root"},
        "state_dir": world.dir().join("state"),
        "rules": [
            {"name": "allowed", "domains": ["allowed.test"], "outbound": "direct"},
            rule
        ],
    });
    if let (Some(all), Value::Object(more)) = (settings.as_object_mut(), extra) {
        all.extend(more);
    }
    daemon::config(world, settings)
}

/// One request; the status and the JSON body (Null when there is none).
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let mut stream =
        UnixStream::connect(socket).unwrap_or_else(|e| panic!("{}: {e}", socket.display()));
    let body = body.unwrap_or("");
    // A refused body may be cut short by the server's answer (413): write
    // what it takes, then read the answer.
    let _ = write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: agent-egress\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    response(stream)
}

pub fn response(mut stream: UnixStream) -> (u16, Value) {
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Whether the agent's curl to `host` succeeded, and what it printed.
pub fn curl_status(world: &World, host: &TestHost) -> (bool, String) {
    let out = world.curl_agent([
        "--resolve",
        &host.resolve_v4(443),
        &format!("https://{}/", host.name),
    ]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
