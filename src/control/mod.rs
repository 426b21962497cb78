// SPDX-License-Identifier: GPL-3.0-or-later
//! The supervisor's seat: the control API on a Unix socket, the runtime
//! rules and the live event stream.
//!
//! - `socket`: binding the socket (owner, group, mode) and reading each peer;
//! - `server`: HTTP/1.1 on it, bounded in clients, sizes and time;
//! - `routes`: the `/v1/...` route table and its handlers;
//! - `events`: the audit records fanned out to watchers, never blocking;
//! - `rules`: runtime rules and their state file;
//! - `state`: the config and runtime rules in force, and every change to them;
//! - `questions`: the `ask` verdict's questions, listed, waited for, answered
//!   (`exec --ask`, which runs the proxy in its own process, answers keys
//!   from its terminal through the same `answer_for`).
//!
//! `watch` and the MCP server are to be clients of this socket, never a second
//! way into the proxy.

pub mod client;
pub mod events;
pub mod questions;
pub mod routes;
pub mod rules;
pub mod server;
pub mod socket;
pub mod state;

use crate::audit::AuditLog;
use crate::config::Config;
use crate::proxy::ProxyHandle;
use socket::{Peer, SocketError};
use state::PolicyState;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A reload asked over the API, done by the daemon's main thread (which owns
/// the kernel capture a reload may change); the answer is the new config's
/// hash or the reasons it was refused.
pub struct ReloadRequest {
    pub by: Peer,
    pub reply: mpsc::Sender<Result<String, Vec<String>>>,
}

/// What the handlers reach.
pub struct Control {
    pub state: Arc<PolicyState>,
    pub proxy: ProxyHandle,
    pub audit: AuditLog,
    pub started: Instant,
    pub counters: server::Counters,
    reloads: Reloads,
}

/// Hands a reload request to the daemon's main thread; false when it is gone.
pub type Reloads = Box<dyn Fn(ReloadRequest) -> bool + Send + Sync>;

impl Control {
    fn reload(&self, by: &Peer) -> Result<String, Vec<String>> {
        let (reply, answer) = mpsc::channel();
        let request = ReloadRequest {
            by: by.clone(),
            reply,
        };
        if !(self.reloads)(request) {
            return Err(vec!["the daemon is stopping".into()]);
        }
        answer
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| Err(vec!["the daemon did not answer in time".into()]))
    }
}

/// The running control socket; stop it to remove the socket.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl ControlServer {
    /// Bind `config.control.socket` and serve it on a thread of its own.
    pub fn start(
        config: &Config,
        state: Arc<PolicyState>,
        proxy: ProxyHandle,
        audit: AuditLog,
        reloads: Reloads,
    ) -> Result<ControlServer, SocketError> {
        let gid = match &config.control.group {
            Some(name) => Some(socket::group_id(name)?),
            None => None,
        };
        let path = config.control.socket.clone();
        let listener = socket::bind(&path, gid)?;
        let control = Arc::new(Control {
            state,
            proxy,
            audit,
            started: Instant::now(),
            counters: server::Counters::default(),
            reloads,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || server::serve(listener, control, stopping))
            .map_err(SocketError::Thread)?;
        log::info!(
            "control API on {} (group {})",
            path.display(),
            config.control.group.as_deref().unwrap_or("root")
        );
        Ok(ControlServer { path, stop, thread })
    }

    /// Stop accepting (a connection of our own wakes the accept) and remove
    /// the socket; clients still being served end with the process.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.path);
        if self.thread.join().is_err() {
            log::error!("the control thread panicked");
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
