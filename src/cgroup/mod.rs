//! cgroup v2: where the hierarchy is mounted, which directory a configured path names
//! and its id (the directory's inode, which nftables' `socket cgroupv2` compares),
//! watching configured cgroups come and go, and making cgroups for `exec`.
//!
//! Paths are relative to the cgroup2 root, as the configuration writes them.
//! Everything here does (cheap, in-memory kernfs) file-system calls; none of it waits on
//! the network.

mod delegation;
mod lifecycle;
mod parent;
mod watcher;

pub use delegation::{delegated_ancestor, Delegation, Writer};
pub use lifecycle::{command_in_cgroup, create, procs_recursive, remove};
pub use parent::agent_only_parent;
pub use watcher::{Change, Watcher};

use std::collections::VecDeque;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the mount table is read from: the calling process's view of mounts.
const MOUNTINFO: &str = "/proc/self/mountinfo";
/// Longest path we accept (PATH_MAX) and longest component (NAME_MAX).
const MAX_PATH_LEN: usize = 4096;
const MAX_COMPONENT_LEN: usize = 255;
/// Upper bound on directories visited by one walk of a subtree.
const MAX_WALK_DIRS: usize = 65_536;

/// A cgroup that exists now.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CgroupRef {
    /// Relative to the cgroup2 root, as configured (`agents.slice/claude.service`).
    pub path: String,
    /// The cgroup id: the inode number of its directory. Changes when it is recreated.
    pub id: u64,
    /// Depth below the root (number of path components), as `socket cgroupv2 level`.
    pub level: u32,
}

/// What went wrong finding or handling a cgroup.
#[derive(Debug)]
pub enum CgroupError {
    /// No cgroup2 file system (covering the whole hierarchy) is mounted.
    NoCgroup2Mount,
    /// A configured path is not acceptable.
    InvalidPath { path: String, reason: PathProblem },
    /// A file-system call failed.
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// `create` found the cgroup already there (it will not adopt someone else's).
    AlreadyExists(PathBuf),
    /// `remove` killed the processes but the cgroup did not empty in time.
    StillPopulated { path: PathBuf, waited: Duration },
    /// A subtree has more directories than we are willing to walk.
    TooManyDescendants { path: PathBuf, limit: usize },
}

impl fmt::Display for CgroupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CgroupError::NoCgroup2Mount => {
                write!(
                    f,
                    "no cgroup2 file system is mounted (looked in {MOUNTINFO})"
                )
            }
            CgroupError::InvalidPath { path, reason } => {
                write!(f, "invalid cgroup path {path:?}: {reason}")
            }
            CgroupError::Io {
                action,
                path,
                source,
            } => write!(f, "{action} {}: {source}", path.display()),
            CgroupError::AlreadyExists(path) => {
                write!(f, "cgroup {} already exists", path.display())
            }
            CgroupError::StillPopulated { path, waited } => write!(
                f,
                "cgroup {} still has processes {} ms after killing them",
                path.display(),
                waited.as_millis()
            ),
            CgroupError::TooManyDescendants { path, limit } => write!(
                f,
                "cgroup {} has more than {limit} descendants",
                path.display()
            ),
        }
    }
}

impl std::error::Error for CgroupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CgroupError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The mount point of the cgroup2 hierarchy, from the mount table.
pub fn cgroup2_root() -> Result<PathBuf, CgroupError> {
    let table = fs::read_to_string(MOUNTINFO).map_err(io_error("reading", Path::new(MOUNTINFO)))?;
    cgroup2_mount_in(&table).ok_or(CgroupError::NoCgroup2Mount)
}

/// First cgroup2 mount that shows the whole hierarchy (mount root `/`): a bind mount of
/// a subtree would shift every configured path.
fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let fields: Vec<&str> = line.split(' ').collect();
        let separator = fields.iter().position(|f| *f == "-")?;
        let fstype = fields.get(separator + 1)?;
        let (root, mount_point) = (fields.get(3)?, fields.get(4)?);
        (*fstype == "cgroup2" && *root == "/")
            .then(|| PathBuf::from(unescape_mount_field(mount_point)))
    })
}

/// mountinfo writes space, tab, newline and backslash as 3-digit octal escapes.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0')));
        match escaped.and_then(|n| u8::try_from(n).ok()) {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why a configured cgroup path is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathProblem {
    Empty,
    Absolute,
    TooLong,
    Nul,
    EmptyComponent,
    DotComponent(String),
    ComponentTooLong,
    /// It exists but is a file.
    NotADirectory,
}

impl fmt::Display for PathProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathProblem::Empty => write!(f, "is empty (the root cgroup cannot be an agent)"),
            PathProblem::Absolute => {
                write!(f, "must be relative to the cgroup2 root, not absolute")
            }
            PathProblem::TooLong => write!(f, "is longer than {MAX_PATH_LEN} bytes"),
            PathProblem::Nul => write!(f, "contains a NUL byte"),
            PathProblem::EmptyComponent => {
                write!(f, "has an empty component (doubled or trailing '/')")
            }
            PathProblem::DotComponent(c) => write!(f, "must not contain {c:?} components"),
            PathProblem::ComponentTooLong => {
                write!(f, "has a component longer than {MAX_COMPONENT_LEN} bytes")
            }
            PathProblem::NotADirectory => write!(f, "is not a cgroup directory"),
        }
    }
}

impl std::error::Error for PathProblem {}

/// A configured cgroup path must stay inside the hierarchy and name one directory:
/// relative, no `.`/`..`, no empty components, sane lengths.
pub fn validate_relative_path(rel: &str) -> Result<(), PathProblem> {
    if rel.is_empty() {
        return Err(PathProblem::Empty);
    }
    if rel.starts_with('/') {
        return Err(PathProblem::Absolute);
    }
    if rel.len() > MAX_PATH_LEN {
        return Err(PathProblem::TooLong);
    }
    if rel.contains('\0') {
        return Err(PathProblem::Nul);
    }
    for component in rel.split('/') {
        match component {
            "" => return Err(PathProblem::EmptyComponent),
            "." | ".." => return Err(PathProblem::DotComponent(component.to_string())),
            c if c.len() > MAX_COMPONENT_LEN => return Err(PathProblem::ComponentTooLong),
            _ => {}
        }
    }
    Ok(())
}

fn checked_path(root: &Path, rel: &str) -> Result<PathBuf, CgroupError> {
    validate_relative_path(rel).map_err(|reason| CgroupError::InvalidPath {
        path: rel.to_string(),
        reason,
    })?;
    Ok(root.join(rel))
}

fn level_of(rel: &str) -> u32 {
    u32::try_from(rel.split('/').count()).unwrap_or(u32::MAX)
}

/// The cgroup at `root/rel` with its current id, or `None` if it does not exist (yet).
pub fn resolve(root: &Path, rel: &str) -> Result<Option<CgroupRef>, CgroupError> {
    let path = checked_path(root, rel)?;
    let metadata = match fs::symlink_metadata(&path) {
        Ok(metadata) => metadata,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io_error("inspecting", &path)(e)),
    };
    if !metadata.is_dir() {
        return Err(CgroupError::InvalidPath {
            path: rel.to_string(),
            reason: PathProblem::NotADirectory,
        });
    }
    Ok(Some(CgroupRef {
        path: rel.to_string(),
        id: metadata.ino(),
        level: level_of(rel),
    }))
}

/// Which cgroup, at or below one of `under`, has id `id`; its path relative to `root`.
/// Used to map a socket's cgroup id to the agent it belongs to. Asks the kernel
/// first (three syscalls); without the capability for that, walks the subtrees
/// (bounded).
pub fn path_of_id(root: &Path, under: &[&str], id: u64) -> Option<String> {
    if let Ok(path) = path_by_handle(root, id) {
        let inside = under.iter().any(|rel| Path::new(&path).starts_with(rel));
        return inside.then_some(path);
    }
    under.iter().find_map(|rel| {
        let top = checked_path(root, rel).ok()?;
        let found = subtree(&top).ok()?.into_iter().find(|dir| dir.id == id)?;
        let relative = found.path.strip_prefix(root).ok()?;
        Some(relative.to_string_lossy().into_owned())
    })
}

/// The path of any cgroup `id` relative to `root`, if the kernel says (it
/// needs CAP_DAC_READ_SEARCH): used to name a listener's cgroup, which may
/// be anywhere on the host.
pub fn path_of_any_id(root: &Path, id: u64) -> Option<String> {
    path_by_handle(root, id)
        .map_err(|e| log::debug!("naming cgroup {id}: {e}"))
        .ok()
}

/// The configured cgroup that `path` is in: the innermost, when they nest.
pub fn innermost<'a>(agents: &'a [String], path: &str) -> Option<&'a str> {
    agents
        .iter()
        .filter(|agent| Path::new(path).starts_with(agent.as_str()))
        .max_by_key(|agent| agent.len())
        .map(String::as_str)
}

/// The path of cgroup `id` relative to `root`, from the kernel: on cgroup2 the id
/// is the directory's file handle (FILEID_KERNFS), which open_by_handle_at(2)
/// opens. Needs CAP_DAC_READ_SEARCH.
fn path_by_handle(root: &Path, id: u64) -> io::Result<String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    /// `struct file_handle` with room for a kernfs id.
    #[repr(C)]
    struct KernfsHandle {
        handle_bytes: libc::c_uint,
        handle_type: libc::c_int,
        id: [u8; 8],
    }
    const FILEID_KERNFS: libc::c_int = 0xfe;
    let mount = fs::File::open(root)?;
    let mut handle = KernfsHandle {
        handle_bytes: 8,
        handle_type: FILEID_KERNFS,
        id: id.to_ne_bytes(),
    };
    // SAFETY: `handle` is a file_handle followed by its handle_bytes bytes of
    // f_handle; the kernel only reads it.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount.as_raw_fd(),
            (&mut handle as *mut KernfsHandle).cast(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open_by_handle_at returned a new descriptor that nothing else owns.
    let dir = unsafe { OwnedFd::from_raw_fd(fd) };
    let path = fs::read_link(format!("/proc/self/fd/{}", dir.as_raw_fd()))?;
    let relative = path.strip_prefix(root).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "cgroup {id} is {}, not below {}",
                path.display(),
                root.display()
            ),
        )
    })?;
    Ok(relative.to_string_lossy().into_owned())
}

/// A directory met while walking a subtree.
struct Dir {
    path: PathBuf,
    id: u64,
}

/// `top` and every cgroup below it, parents before children. Directories that vanish
/// during the walk are skipped; a missing `top` gives an empty list.
fn subtree(top: &Path) -> Result<Vec<Dir>, CgroupError> {
    let id = match fs::symlink_metadata(top) {
        Ok(metadata) if metadata.is_dir() => metadata.ino(),
        Ok(_) => return Ok(Vec::new()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("inspecting", top)(e)),
    };
    let mut found = vec![Dir {
        path: top.to_path_buf(),
        id,
    }];
    let mut pending = VecDeque::from([top.to_path_buf()]);
    while let Some(dir) = pending.pop_front() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("listing", &dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_error("listing", &dir))?;
            // cgroupfs fills d_type and d_ino, so no stat per entry is needed.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if found.len() >= MAX_WALK_DIRS {
                return Err(CgroupError::TooManyDescendants {
                    path: top.to_path_buf(),
                    limit: MAX_WALK_DIRS,
                });
            }
            let path = entry.path();
            pending.push_back(path.clone());
            found.push(Dir {
                path,
                id: entry.ino(),
            });
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_full_cgroup2_mount() {
        let table = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
50 31 0:38 /sub /mnt/partial rw - cgroup2 cgroup2 rw
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
";
        assert_eq!(
            cgroup2_mount_in(table),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount_in("1 0 0:1 / / rw - ext4 /dev/sda rw\n"),
            None
        );
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(
            unescape_mount_field(r"/mnt/my\040cgroups\134x"),
            r"/mnt/my cgroups\x"
        );
        assert_eq!(unescape_mount_field(r"/odd\0"), r"/odd\0");
    }

    #[test]
    fn relative_paths_are_checked() {
        validate_relative_path("agents.slice/claude.service").unwrap();
        validate_relative_path("a").unwrap();
        for bad in ["", "/abs", "a//b", "a/", "../x", "a/./b", "a/..", "a\0b"] {
            assert!(validate_relative_path(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_relative_path(&"x".repeat(256)).is_err());
        let message = validate_relative_path("a/../b").unwrap_err().to_string();
        assert!(message.contains("\"..\""), "{message}");
    }

    #[test]
    fn level_counts_components() {
        assert_eq!(level_of("a"), 1);
        assert_eq!(level_of("a/b/c"), 3);
    }
}
