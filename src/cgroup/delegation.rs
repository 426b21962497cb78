//! Delegated subtrees: cgroups whose `cgroup.procs` a user other than root may write.
//!
//! The kernel lets a process move a process (itself included) between two cgroups when
//! it may write the `cgroup.procs` of their common ancestor and of the destination
//! (cgroup-v2.rst, "Delegation Containment"). systemd hands such a subtree to a user
//! for `Delegate=yes` units (`user@UID.service`): below it every sibling of an agent
//! cgroup is one write away, out of the capture. Only `cgroup.procs` decides this; a
//! writable directory only lets the user make new destinations, and an existing
//! sibling is enough.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{checked_path, io_error, resolve, CgroupError, CgroupRef};

/// Who besides root may write a cgroup's `cgroup.procs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    User(u32),
    Group(u32),
    Everyone,
}

impl std::fmt::Display for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Writer::User(uid) => write!(f, "uid {uid}"),
            Writer::Group(gid) => write!(f, "gid {gid}"),
            Writer::Everyone => write!(f, "every user"),
        }
    }
}

/// The outermost cgroup an agent cgroup's processes may move within.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delegation {
    pub ancestor: CgroupRef,
    pub writer: Writer,
}

/// The topmost proper ancestor of `root/rel` (the root itself excluded: only root
/// writes there) whose `cgroup.procs` someone besides root may write; `None` when
/// there is none, or when the path does not exist (any more).
pub fn delegated_ancestor(root: &Path, rel: &str) -> Result<Option<Delegation>, CgroupError> {
    checked_path(root, rel)?;
    let components: Vec<&str> = rel.split('/').collect();
    for depth in 1..components.len() {
        let ancestor = components[..depth].join("/");
        let procs = root.join(&ancestor).join("cgroup.procs");
        let metadata = match fs::metadata(&procs) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("inspecting", &procs)(e)),
        };
        if let Some(writer) = writer_of(metadata.uid(), metadata.gid(), metadata.mode()) {
            return Ok(resolve(root, &ancestor)?.map(|ancestor| Delegation { ancestor, writer }));
        }
    }
    Ok(None)
}

/// Who may write the file, root aside: its owner always (an owner may chmod the
/// file first), its group and everyone by the mode bits.
fn writer_of(uid: u32, gid: u32, mode: u32) -> Option<Writer> {
    if mode & 0o002 != 0 {
        Some(Writer::Everyone)
    } else if uid != 0 {
        Some(Writer::User(uid))
    } else if gid != 0 && mode & 0o020 != 0 {
        Some(Writer::Group(gid))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writers_from_owner_and_mode() {
        assert_eq!(writer_of(0, 0, 0o100644), None);
        // Root's group writing is root's business.
        assert_eq!(writer_of(0, 0, 0o100664), None);
        assert_eq!(writer_of(1000, 1000, 0o100644), Some(Writer::User(1000)));
        // Without the write bit its owner may still chmod it.
        assert_eq!(writer_of(1000, 0, 0o100444), Some(Writer::User(1000)));
        assert_eq!(writer_of(0, 100, 0o100664), Some(Writer::Group(100)));
        assert_eq!(writer_of(0, 0, 0o100666), Some(Writer::Everyone));
    }

    #[test]
    fn a_missing_path_has_no_delegation() {
        let dir = std::env::temp_dir();
        assert_eq!(
            delegated_ancestor(&dir, "ae-no-such-cgroup/agent").unwrap(),
            None
        );
        assert!(delegated_ancestor(&dir, "../x").is_err());
    }
}
