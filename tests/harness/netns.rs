//! Named network namespaces: create, enter from a thread, empty and delete.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use super::process::{run, signal};

/// Where `ip netns add` mounts a namespace.
const NETNS_DIR: &str = "/run/netns";
/// How long a killed process may take to leave a namespace being deleted.
const EMPTY_TIMEOUT: Duration = Duration::from_secs(3);

pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// Runs `f` on a fresh thread that has entered the named netns and returns its
/// result (a panic in `f` is re-raised here). Only that thread changes netns, so
/// the rest of the test is unaffected; sockets it creates stay in that netns, and
/// processes it spawns start there.
pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(name: &str, f: F) -> T {
    let ns_path = path(name);
    std::thread::scope(|scope| {
        let worker = scope.spawn(|| {
            let ns = File::open(&ns_path)
                .unwrap_or_else(|e| panic!("cannot open netns {}: {e}", ns_path.display()));
            // SAFETY: setns(2) with a valid fd only changes this thread's namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                panic!(
                    "setns into {} failed: {}",
                    ns_path.display(),
                    std::io::Error::last_os_error()
                );
            }
            f()
        });
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// `ip netns add NAME`.
pub fn add(name: &str) -> Result<(), String> {
    run(Command::new("ip").args(["netns", "add", name])).map(drop)
}

/// Kills every process in the netns, waits until they are gone, then deletes it.
/// Tolerates a netns that does not exist; returns what went wrong otherwise.
pub fn delete(name: &str) -> Result<(), String> {
    if !path(name).exists() {
        return Ok(());
    }
    let stragglers = kill_all_in(name);
    run(Command::new("ip").args(["netns", "delete", name])).map(drop)?;
    if stragglers.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "processes still in netns {name} after SIGKILL: {stragglers:?}"
        ))
    }
}

/// SIGKILLs every process whose netns is `name` (never this process) and returns
/// those still there after [`EMPTY_TIMEOUT`].
fn kill_all_in(name: &str) -> Vec<u32> {
    let Ok(ns) = std::fs::metadata(path(name)) else {
        return Vec::new();
    };
    let deadline = Instant::now() + EMPTY_TIMEOUT;
    loop {
        let pids = pids_in(ns.dev(), ns.ino());
        if pids.is_empty() || Instant::now() >= deadline {
            return pids;
        }
        for &pid in &pids {
            signal(pid, libc::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Processes whose network namespace is the nsfs inode (`dev`, `ino`). A zombie has
/// no namespace link any more, so it no longer counts.
fn pids_in(dev: u64, ino: u64) -> Vec<u32> {
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .map(|m| m.dev() == dev && m.ino() == ino)
                .unwrap_or(false)
        })
        .collect()
}

/// Names of all named network namespaces.
pub fn list() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect()
}
