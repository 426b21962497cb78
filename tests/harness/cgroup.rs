//! cgroup v2 directories the harness creates, fills, kills and removes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a killed cgroup may take to become unpopulated.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// The cgroup2 mount, found as the daemon finds it.
pub fn cgroup2_root() -> Option<PathBuf> {
    agent_egress::cgroup::cgroup2_root().ok()
}

/// A cgroup directory made by the harness.
#[derive(Debug, Clone)]
pub struct Cgroup {
    root: PathBuf,
    relative: String,
}

impl Cgroup {
    /// Makes `<cgroup2 root>/<relative>` (its parent must exist).
    pub fn create(root: &Path, relative: &str) -> Result<Cgroup, String> {
        let cgroup = Cgroup {
            root: root.to_owned(),
            relative: relative.to_owned(),
        };
        std::fs::create_dir(cgroup.path())
            .map_err(|e| format!("cannot create cgroup {}: {e}", cgroup.path().display()))?;
        Ok(cgroup)
    }

    /// Absolute path in the cgroup2 mount.
    pub fn path(&self) -> PathBuf {
        self.root.join(&self.relative)
    }

    /// Path relative to the cgroup2 root, without a leading slash — the form the
    /// daemon's config takes (`interception.cgroups`).
    pub fn relative_path(&self) -> &str {
        &self.relative
    }

    /// The cgroup id (the directory's inode) that `socket cgroupv2` compares.
    /// Panics when the cgroup does not exist.
    pub fn id(&self) -> u64 {
        std::fs::metadata(self.path())
            .unwrap_or_else(|e| panic!("cgroup {} has no id: {e}", self.path().display()))
            .ino()
    }

    /// The `cgroup.procs` file; writing a pid to it moves that process here.
    pub fn procs_file(&self) -> PathBuf {
        self.path().join("cgroup.procs")
    }

    /// Pids currently in this cgroup (not its descendants).
    pub fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.procs_file())
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.trim().parse().ok())
            .collect()
    }

    /// Kills everything in the cgroup and makes the directory again, as systemd
    /// does when a unit restarts: same path, new id.
    pub fn recreate(&self) -> Result<(), String> {
        remove_tree(&self.path())?;
        std::fs::create_dir(self.path())
            .map_err(|e| format!("cannot recreate cgroup {}: {e}", self.path().display()))
    }
}

/// Kills every process in the cgroup tree at `path` (cgroup.kill), waits until it is
/// unpopulated, and removes its directories bottom-up. A missing tree is no error.
pub fn remove_tree(path: &Path) -> Result<(), String> {
    if !path.exists() {
        return Ok(());
    }
    std::fs::write(path.join("cgroup.kill"), "1")
        .map_err(|e| format!("cannot kill cgroup {}: {e}", path.display()))?;
    let deadline = Instant::now() + KILL_TIMEOUT;
    while populated(path) {
        if Instant::now() >= deadline {
            return Err(format!(
                "cgroup {} still populated {KILL_TIMEOUT:?} after cgroup.kill",
                path.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    remove_dirs(path)
}

fn populated(path: &Path) -> bool {
    std::fs::read_to_string(path.join("cgroup.events"))
        .map(|events| events.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

fn remove_dirs(path: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(path)
        .map_err(|e| format!("cannot list cgroup {}: {e}", path.display()))?;
    for entry in entries.flatten() {
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            remove_dirs(&entry.path())?;
        }
    }
    std::fs::remove_dir(path).map_err(|e| format!("cannot remove cgroup {}: {e}", path.display()))
}
