//! Agent-only parents: a parent cgroup that holds nothing but configured agent
//! cgroups (and no process of its own) is captured with them.
//!
//! An agent cgroup made again outside systemd (a script's `rmdir` + `mkdir`, a
//! supervisor restarting it) has a new id, which the watcher adds to the set within
//! milliseconds; a process that connects in those milliseconds would go out
//! uncaptured. With its parent in the set (`socket cgroupv2 level L-1`), the kernel
//! captures the new cgroup from its first instruction. systemd units need none of
//! this (`NFTSet=` adds the new id before the unit runs), and a parent with anything
//! else in it (`system.slice`) is never taken: a newcomer there would be captured
//! until the next look, which is the fail-closed way round, but not for a slice
//! full of other services.

use std::fs;
use std::io;
use std::path::Path;

use super::{checked_path, io_error, resolve, CgroupError, CgroupRef};

/// The parent of `root/rel` if it is not the root, exists, has no process of its
/// own and nothing below it but cgroups in `agents` (none at all counts: the
/// moment between an agent's `rmdir` and its `mkdir`).
pub fn agent_only_parent(
    root: &Path,
    rel: &str,
    agents: &[String],
) -> Result<Option<CgroupRef>, CgroupError> {
    checked_path(root, rel)?;
    let Some((parent, _)) = rel.rsplit_once('/') else {
        return Ok(None);
    };
    let dir = root.join(parent);
    let procs = dir.join("cgroup.procs");
    match fs::read_to_string(&procs) {
        Ok(pids) if !pids.trim().is_empty() => return Ok(None),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("reading", &procs)(e)),
    }
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("listing", &dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_error("listing", &dir))?;
        let is_dir = entry
            .file_type()
            .map_err(io_error("inspecting", &entry.path()))?
            .is_dir();
        let child = format!("{parent}/{}", entry.file_name().to_string_lossy());
        if is_dir && !agents.contains(&child) {
            return Ok(None);
        }
    }
    resolve(root, parent)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory tree shaped like a cgroup hierarchy (plain files stand for the
    /// interface files), removed on drop.
    struct Tree(std::path::PathBuf);

    impl Tree {
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tree(dirs: &[&str], procs: &[(&str, &str)]) -> Tree {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let root = Tree(std::env::temp_dir().join(format!(
            "ae-parent-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )));
        for d in dirs {
            fs::create_dir_all(root.path().join(d)).unwrap();
            for dir in Path::new(d)
                .ancestors()
                .filter(|a| !a.as_os_str().is_empty())
            {
                fs::write(root.path().join(dir).join("cgroup.procs"), "").unwrap();
            }
        }
        for (d, pids) in procs {
            fs::write(root.path().join(d).join("cgroup.procs"), pids).unwrap();
        }
        root
    }

    fn parent_of(root: &Path, rel: &str, agents: &[&str]) -> Option<String> {
        let agents: Vec<String> = agents.iter().map(|a| a.to_string()).collect();
        agent_only_parent(root, rel, &agents)
            .unwrap()
            .map(|c| c.path)
    }

    #[test]
    fn a_parent_of_agents_only_is_taken() {
        let t = tree(&["p/a", "p/b", "p/a/child"], &[]);
        assert_eq!(
            parent_of(t.path(), "p/a", &["p/a", "p/b"]),
            Some("p".into())
        );
        // Between an agent's rmdir and its mkdir.
        let t = tree(&["p"], &[]);
        assert_eq!(parent_of(t.path(), "p/a", &["p/a"]), Some("p".into()));
        assert_eq!(
            agent_only_parent(t.path(), "p/a", &["p/a".into()])
                .unwrap()
                .map(|c| c.level),
            Some(1)
        );
    }

    #[test]
    fn a_parent_with_anything_else_is_not() {
        let t = tree(&["p/a", "p/other"], &[]);
        assert_eq!(parent_of(t.path(), "p/a", &["p/a"]), None);
        let t = tree(&["p/a"], &[("p", "123\n")]);
        assert_eq!(parent_of(t.path(), "p/a", &["p/a"]), None);
        // The root holds everything; a missing parent holds nothing to capture.
        let t = tree(&["a"], &[]);
        assert_eq!(parent_of(t.path(), "a", &["a"]), None);
        assert_eq!(parent_of(t.path(), "q/a", &["q/a"]), None);
        assert!(agent_only_parent(t.path(), "../a", &[]).is_err());
    }
}
