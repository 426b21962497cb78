//! Finding what worlds left behind: netns, cgroups, /etc/netns entries, temp dirs
//! and processes still running from a world's temp dir. scripts/leftovers.sh does
//! the same from the shell.

use std::collections::BTreeSet;
use std::sync::Mutex;

use super::cgroup::cgroup2_root;
use super::names::{id_of_dir, id_of_netns, Names, DIR_PREFIX, ID_LEN};
use super::netns;

/// Ids of the worlds alive in this process: theirs are not leftovers yet.
static LIVE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

pub fn mark_live(id: &str) {
    live().insert(id.to_owned());
}

pub fn mark_gone(id: &str) {
    live().remove(id);
}

fn live() -> std::sync::MutexGuard<'static, BTreeSet<String>> {
    // A test that panicked while holding the lock leaves the set itself intact.
    LIVE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One thing a world left behind.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Leftover {
    pub world_id: String,
    pub what: String,
}

/// Everything any world (alive or not) has on this machine right now.
pub fn find_all() -> Vec<Leftover> {
    let mut found = Vec::new();
    let mut add = |id: &str, what: String| {
        found.push(Leftover {
            world_id: id.to_owned(),
            what,
        })
    };
    for name in netns::list() {
        if let Some(id) = id_of_netns(&name) {
            add(id, format!("netns {name}"));
        }
    }
    for name in dir_names("/etc/netns") {
        if let Some(id) = id_of_netns(&name) {
            add(id, format!("/etc/netns/{name}"));
        }
    }
    if let Some(root) = cgroup2_root() {
        for name in dir_names(&root) {
            if let Some(id) = id_of_dir(&name) {
                add(id, format!("cgroup {}", root.join(&name).display()));
            }
        }
    }
    let tmp = std::env::temp_dir();
    for name in dir_names(&tmp) {
        if let Some(id) = id_of_dir(&name) {
            add(id, format!("temp dir {}", tmp.join(&name).display()));
        }
    }
    for (pid, cmdline) in processes() {
        let ids = cmdline
            .match_indices(DIR_PREFIX)
            .filter_map(|(at, _)| cmdline.get(at..at + DIR_PREFIX.len() + ID_LEN))
            .filter_map(id_of_dir);
        for id in ids {
            add(id, format!("process {pid}: {cmdline}"));
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Panics listing everything left behind by worlds whose test is over: not alive
/// in this process, and not built by another process that still runs (a test
/// binary running in parallel). Safe to call while other tests run.
pub fn assert_no_leftovers() {
    let live = live().clone();
    let stale: Vec<_> = find_all()
        .into_iter()
        .filter(|l| !live.contains(&l.world_id) && !owned_by_another_running_process(&l.world_id))
        .collect();
    assert!(stale.is_empty(), "test worlds left behind: {stale:#?}");
}

fn owned_by_another_running_process(id: &str) -> bool {
    let names = Names { id: id.to_owned() };
    let Some(owner) = std::fs::read_to_string(names.owner_file())
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok())
    else {
        return false;
    };
    owner != std::process::id() && std::path::Path::new(&format!("/proc/{owner}")).exists()
}

/// Panics listing whatever the world `id` left behind.
pub fn assert_world_gone(id: &str) {
    let left: Vec<_> = find_all()
        .into_iter()
        .filter(|l| l.world_id == id)
        .collect();
    assert!(left.is_empty(), "world {id} left behind: {left:#?}");
}

fn dir_names(dir: impl AsRef<std::path::Path>) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .collect()
}

/// (pid, command line with spaces for NULs) of every process but this one.
fn processes() -> Vec<(u32, String)> {
    let own = std::process::id();
    dir_names("/proc")
        .into_iter()
        .filter_map(|name| name.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let line = String::from_utf8_lossy(&raw).replace('\0', " ");
            Some((pid, line.trim_end().to_owned()))
        })
        .collect()
}
