//! Making and unmaking cgroups for `exec`, starting a command inside one, and listing
//! the processes of a subtree.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::{checked_path, io_error, resolve, subtree, CgroupError, CgroupRef};

/// How long `remove` waits for killed processes to leave.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest pause between checks while waiting.
const FIRST_PAUSE: Duration = Duration::from_millis(1);
const LONGEST_PAUSE: Duration = Duration::from_millis(50);

/// Make the cgroup `root/rel` (and missing parents). Refuses one that already exists:
/// `exec` must not adopt, and later destroy, a cgroup that is not its own.
pub fn create(root: &Path, rel: &str) -> Result<CgroupRef, CgroupError> {
    let path = checked_path(root, rel)?;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_error("creating", parent))?;
    }
    match fs::create_dir(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(CgroupError::AlreadyExists(path))
        }
        Err(e) => return Err(io_error("creating", &path)(e)),
    }
    resolve(root, rel)?.ok_or_else(|| {
        io_error("inspecting", &path)(io::Error::new(
            io::ErrorKind::NotFound,
            "removed right after it was created",
        ))
    })
}

/// Kill every process in `root/rel` and below, wait for them to leave, and remove the
/// cgroup with its descendants. A cgroup that does not exist is fine.
pub fn remove(root: &Path, rel: &str) -> Result<(), CgroupError> {
    let path = checked_path(root, rel)?;
    let started = Instant::now();
    let mut pause = FIRST_PAUSE;
    loop {
        match try_remove(&path) {
            Ok(()) => return Ok(()),
            Err(Busy) if started.elapsed() < REMOVE_TIMEOUT => {}
            Err(Busy) => {
                return Err(CgroupError::StillPopulated {
                    path,
                    waited: started.elapsed(),
                })
            }
            Err(Failed(e)) => return Err(e),
        }
        thread::sleep(pause);
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
}

enum RemoveOutcome {
    /// Processes (or a child cgroup being populated) still there: try again shortly.
    Busy,
    Failed(CgroupError),
}
use RemoveOutcome::{Busy, Failed};

fn try_remove(path: &Path) -> Result<(), RemoveOutcome> {
    kill_all(path).map_err(Failed)?;
    let dirs = subtree(path).map_err(Failed)?;
    // Children before parents.
    for dir in dirs.iter().rev() {
        match fs::remove_dir(&dir.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Err(Busy),
            Err(e) => return Err(Failed(io_error("removing", &dir.path)(e))),
        }
    }
    Ok(())
}

/// SIGKILL the whole subtree: `cgroup.kill` (Linux 5.14+) does it atomically, even to
/// processes forking meanwhile; older kernels get a signal per listed process.
fn kill_all(path: &Path) -> Result<(), CgroupError> {
    let kill_file = path.join("cgroup.kill");
    match fs::write(&kill_file, b"1") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if !path.exists() {
                return Ok(());
            }
            for pid in procs_in(path)? {
                let pid = libc::pid_t::try_from(pid).unwrap_or(0);
                if pid > 0 {
                    // SAFETY: kill has no memory effects; a pid that is gone gives ESRCH.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            Ok(())
        }
        Err(e) => Err(io_error("writing", &kill_file)(e)),
    }
}

/// Every process in `root/rel` and its descendants, sorted; empty if it does not exist.
pub fn procs_recursive(root: &Path, rel: &str) -> Result<Vec<u32>, CgroupError> {
    procs_in(&checked_path(root, rel)?)
}

fn procs_in(top: &Path) -> Result<Vec<u32>, CgroupError> {
    let mut pids = Vec::new();
    for dir in subtree(top)? {
        let procs = dir.path.join("cgroup.procs");
        match fs::read_to_string(&procs) {
            Ok(text) => pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok())),
            // Removed while we walked: it has no processes any more.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("reading", &procs)(e)),
        }
    }
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

/// Make `command` start inside `root/rel`: the child moves itself there between fork
/// and exec, so the program's first instruction already runs in the cgroup.
///
/// The `cgroup.procs` file is opened now, in the parent; the child only calls
/// `write(2)`, which is async-signal-safe. If the move fails, the spawn fails.
pub fn command_in_cgroup(command: &mut Command, root: &Path, rel: &str) -> Result<(), CgroupError> {
    let procs: PathBuf = checked_path(root, rel)?.join("cgroup.procs");
    let file = OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(io_error("opening", &procs))?;
    // Rust opens files close-on-exec: the program never inherits it.
    let fd = OwnedFd::from(file);
    // SAFETY: the hook runs in the forked child and only calls write(2) on an fd owned
    // by the closure, then reads errno: no allocation, no locks.
    unsafe {
        command.pre_exec(move || {
            // "0" means "the writing process".
            let written = libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1);
            if written == 1 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
    Ok(())
}
