//! Keeping configured cgroups' ids current: cgroups appear late (systemd makes them when
//! a unit starts, parents one by one), vanish, and come back with a new id.
//!
//! inotify watches every existing ancestor of every configured path; any event there
//! (or a lost one) triggers a re-check of all configured paths against the ids we last
//! reported. The events themselves are only a wake-up: the re-check is the truth, so
//! coalesced or overflowed events cannot make us miss a change.
//!
//! inotify is used through libc directly: libc is already a dependency, and since the
//! event contents are ignored a wrapper crate would add nothing.

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{checked_path, resolve, CgroupError, CgroupRef};

/// Changes in a directory that can make a configured path appear or disappear.
const WATCH_MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF
    | libc::IN_ONLYDIR;
/// Bytes read from inotify per call, and calls per drain (the contents are discarded).
const EVENT_BUFFER_LEN: usize = 16 * 1024;
const MAX_READS_PER_DRAIN: usize = 64;

/// A configured cgroup's change since the last [`Watcher::poll_changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// It exists now (first seen, or recreated: then after a `Gone` with the old id).
    Appeared(CgroupRef),
    /// The cgroup with this id is no longer at `path`.
    Gone { path: String, id: u64 },
}

struct Target {
    rel: String,
    /// The id last reported as `Appeared`, if any.
    reported: Option<u64>,
}

/// Watches a set of configured cgroup paths.
///
/// Call [`Watcher::poll_changes`] once after creating it (it reports the cgroups that
/// already exist as `Appeared`), then each time its fd becomes readable.
pub struct Watcher {
    root: PathBuf,
    targets: Vec<Target>,
    inotify: OwnedFd,
    /// Watch descriptors currently held.
    watches: HashSet<i32>,
}

impl Watcher {
    pub fn new<I, S>(root: &Path, paths: I) -> Result<Watcher, CgroupError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut targets: Vec<Target> = Vec::new();
        for rel in paths {
            let rel = rel.into();
            checked_path(root, &rel)?;
            if !targets.iter().any(|t| t.rel == rel) {
                targets.push(Target {
                    rel,
                    reported: None,
                });
            }
        }
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(CgroupError::Io {
                action: "starting inotify for",
                path: root.to_path_buf(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: fd was just returned by the kernel and is owned by nobody else.
        let inotify = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut watcher = Watcher {
            root: root.to_path_buf(),
            targets,
            inotify,
            watches: HashSet::new(),
        };
        watcher.update_watches()?;
        Ok(watcher)
    }

    /// Drain pending notifications, re-check every configured path and report what
    /// changed since the last call.
    pub fn poll_changes(&mut self) -> Vec<Change> {
        self.drain();
        if let Err(e) = self.update_watches() {
            // The re-check below still runs; the next event (or call) retries the watch.
            log::warn!("cgroup watcher: {e}");
        }
        let mut changes = Vec::new();
        for target in &mut self.targets {
            let now = match resolve(&self.root, &target.rel) {
                Ok(now) => now,
                Err(e) => {
                    log::warn!("cgroup watcher: {e}");
                    None
                }
            };
            let now_id = now.as_ref().map(|c| c.id);
            if now_id == target.reported {
                continue;
            }
            if let Some(id) = target.reported {
                changes.push(Change::Gone {
                    path: target.rel.clone(),
                    id,
                });
            }
            target.reported = now_id;
            changes.extend(now.map(Change::Appeared));
        }
        changes
    }

    /// The configured cgroups that exist, as last reported.
    pub fn current(&self) -> Vec<CgroupRef> {
        self.targets
            .iter()
            .filter_map(|t| {
                t.reported.map(|id| CgroupRef {
                    path: t.rel.clone(),
                    id,
                    level: super::level_of(&t.rel),
                })
            })
            .collect()
    }

    fn drain(&self) {
        let mut buffer = vec![0u8; EVENT_BUFFER_LEN];
        for _ in 0..MAX_READS_PER_DRAIN {
            // SAFETY: reading into a live buffer of the stated length.
            let n = unsafe {
                libc::read(
                    self.inotify.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                )
            };
            if n <= 0 {
                let error = io::Error::last_os_error();
                if n < 0 && error.kind() != io::ErrorKind::WouldBlock {
                    log::warn!("cgroup watcher: reading inotify: {error}");
                }
                return;
            }
        }
    }

    /// Watch every existing ancestor of every target (the root included). Repeats until
    /// nothing new turns up, so a directory made while we were adding watches is
    /// either watched or seen by the re-check.
    fn update_watches(&mut self) -> Result<(), CgroupError> {
        let mut previous = HashSet::new();
        // Each round can only find one level more, so depth + 1 rounds converge.
        let deepest = self.targets.iter().map(|t| super::level_of(&t.rel)).max();
        for _ in 0..=deepest.unwrap_or(0) {
            let wanted = self.existing_ancestors();
            if wanted == previous {
                break;
            }
            let mut held = HashSet::new();
            for dir in &wanted {
                match self.add_watch(dir) {
                    Ok(wd) => {
                        held.insert(wd);
                    }
                    // Vanished meanwhile: the next round (or event) sorts it out.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {}
                    Err(source) => {
                        return Err(CgroupError::Io {
                            action: "watching",
                            path: dir.clone(),
                            source,
                        })
                    }
                }
            }
            for stale in self.watches.difference(&held) {
                // SAFETY: plain syscall; EINVAL for a watch the kernel already dropped.
                unsafe { libc::inotify_rm_watch(self.inotify.as_raw_fd(), *stale) };
            }
            self.watches = held;
            previous = wanted;
        }
        Ok(())
    }

    /// The root and each existing proper ancestor of every target (not the targets:
    /// their creation and removal show up in their parent).
    fn existing_ancestors(&self) -> HashSet<PathBuf> {
        let mut dirs = HashSet::from([self.root.clone()]);
        for target in &self.targets {
            let mut dir = self.root.clone();
            let components: Vec<&str> = target.rel.split('/').collect();
            for component in &components[..components.len() - 1] {
                dir.push(component);
                if !dir.is_dir() {
                    break;
                }
                dirs.insert(dir.clone());
            }
        }
        dirs
    }

    fn add_watch(&self, dir: &Path) -> io::Result<i32> {
        let path = CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a NUL-terminated path that outlives the call.
        let wd =
            unsafe { libc::inotify_add_watch(self.inotify.as_raw_fd(), path.as_ptr(), WATCH_MASK) };
        if wd < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(wd)
        }
    }
}

impl AsRawFd for Watcher {
    fn as_raw_fd(&self) -> RawFd {
        self.inotify.as_raw_fd()
    }
}

impl AsFd for Watcher {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inotify.as_fd()
    }
}
