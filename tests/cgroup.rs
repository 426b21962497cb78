//! cgroup v2 handling against the real hierarchy, in cgroups these tests create and remove.

use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use agent_egress::cgroup::{self, CgroupError, Change, Watcher};

/// The cgroup2 root when we may make cgroups there; otherwise skip loudly (fail in CI).
fn writable_root() -> Option<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    let mount = cgroup::cgroup2_root();
    if let (true, Ok(mount)) = (root_user, &mount) {
        return Some(mount.clone());
    }
    let why =
        format!("cgroup tests need root and a cgroup2 mount (root={root_user}, mount={mount:?})");
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("SKIPPING: {why}");
    None
}

/// A uniquely named cgroup directly under the root, removed (processes killed) on drop.
struct TestCgroup {
    root: PathBuf,
    name: String,
}

impl TestCgroup {
    fn new(root: &Path) -> TestCgroup {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ae-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        fs::create_dir(root.join(&name)).unwrap();
        TestCgroup {
            root: root.to_path_buf(),
            name,
        }
    }

    /// `sub` below this test cgroup, relative to the root.
    fn rel(&self, sub: &str) -> String {
        format!("{}/{sub}", self.name)
    }

    fn dir(&self, sub: &str) -> PathBuf {
        self.root.join(self.rel(sub))
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = cgroup::remove(&self.root, &self.name) {
            eprintln!("cleaning up test cgroup {}: {e}", self.name);
        }
    }
}

fn inode(path: &Path) -> u64 {
    fs::metadata(path).unwrap().ino()
}

#[test]
fn discovered_root_is_a_cgroup2_mount() {
    let Some(root) = writable_root() else { return };
    let mut stats: libc::statfs = unsafe { std::mem::zeroed() };
    let path = std::ffi::CString::new(root.to_str().unwrap()).unwrap();
    // SAFETY: valid path and out-pointer.
    assert_eq!(unsafe { libc::statfs(path.as_ptr(), &mut stats) }, 0);
    assert_eq!(stats.f_type, libc::CGROUP2_SUPER_MAGIC);
    assert!(root.join("cgroup.procs").exists());
}

#[test]
fn resolve_gives_inode_and_level() {
    let Some(root) = writable_root() else { return };
    let test = TestCgroup::new(&root);
    let made = cgroup::create(&root, &test.rel("agent/worker")).unwrap();
    let found = cgroup::resolve(&root, &test.rel("agent/worker"))
        .unwrap()
        .unwrap();
    assert_eq!(made, found);
    assert_eq!(found.path, test.rel("agent/worker"));
    assert_eq!(found.id, inode(&test.dir("agent/worker")));
    assert_eq!(found.level, 3);
    let top = cgroup::resolve(&root, &test.name).unwrap().unwrap();
    assert_eq!((top.id, top.level), (inode(&root.join(&test.name)), 1));

    assert_eq!(cgroup::resolve(&root, &test.rel("absent")).unwrap(), None);
    assert!(matches!(
        cgroup::resolve(&root, "../etc"),
        Err(CgroupError::InvalidPath { .. })
    ));
    assert!(matches!(
        cgroup::resolve(&root, &test.rel("agent/cgroup.procs")),
        Err(CgroupError::InvalidPath { .. })
    ));
    assert!(matches!(
        cgroup::create(&root, &test.rel("agent/worker")),
        Err(CgroupError::AlreadyExists(_))
    ));
}

/// A subtree whose cgroup.procs (and directory) belong to a user, as systemd hands
/// `user@UID.service` over: found as the agent's topmost delegated ancestor, with
/// the user named; root-owned ancestors are not delegations.
#[test]
fn delegated_ancestor_is_found_by_ownership() {
    let Some(root) = writable_root() else { return };
    let test = TestCgroup::new(&root);
    cgroup::create(&root, &test.rel("user/app/agent")).unwrap();
    let agent = test.rel("user/app/agent");
    assert_eq!(cgroup::delegated_ancestor(&root, &agent).unwrap(), None);

    let chown = |dir: &Path, uid: u32, gid: u32| {
        for file in [
            "",
            "cgroup.procs",
            "cgroup.threads",
            "cgroup.subtree_control",
        ] {
            std::os::unix::fs::chown(dir.join(file), Some(uid), Some(gid)).unwrap();
        }
    };
    chown(&test.dir("user/app"), 65534, 65534);
    let found = cgroup::delegated_ancestor(&root, &agent).unwrap().unwrap();
    assert_eq!(found.ancestor.path, test.rel("user/app"));
    assert_eq!(found.ancestor.id, inode(&test.dir("user/app")));
    assert_eq!(found.ancestor.level, 3);
    assert_eq!(found.writer, cgroup::Writer::User(65534));

    // The topmost one counts: from there every cgroup below is reachable.
    chown(&test.dir("user"), 1000, 1000);
    let found = cgroup::delegated_ancestor(&root, &agent).unwrap().unwrap();
    assert_eq!(found.ancestor.path, test.rel("user"));
    assert_eq!(found.writer, cgroup::Writer::User(1000));
    // The agent cgroup's own files do not matter: moving within it is no escape.
    assert_eq!(
        cgroup::delegated_ancestor(&root, &test.rel("user")).unwrap(),
        None
    );

    // A group-writable cgroup.procs is a delegation to that group.
    chown(&test.dir("user"), 0, 0);
    chown(&test.dir("user/app"), 0, 0);
    let procs = test.dir("user").join("cgroup.procs");
    std::os::unix::fs::chown(&procs, Some(0), Some(100)).unwrap();
    fs::set_permissions(&procs, std::os::unix::fs::PermissionsExt::from_mode(0o664)).unwrap();
    let found = cgroup::delegated_ancestor(&root, &agent).unwrap().unwrap();
    assert_eq!(found.writer, cgroup::Writer::Group(100));
}

/// Collect changes until `done` says enough, waiting on the watcher's fd; returns the
/// changes and when the last batch arrived.
fn wait_for(watcher: &mut Watcher, done: impl Fn(&[Change]) -> bool) -> (Vec<Change>, Instant) {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut changes = Vec::new();
    while !done(&changes) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out; got {changes:?}");
        let mut poll_fd = libc::pollfd {
            fd: watcher.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut poll_fd, 1, left.as_millis() as libc::c_int) };
        changes.extend(watcher.poll_changes());
    }
    (changes, Instant::now())
}

/// Run `action` on another thread shortly after we start waiting; it returns when its
/// decisive step began.
fn soon(action: impl FnOnce() -> Instant + Send + 'static) -> std::thread::JoinHandle<Instant> {
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(30));
        action()
    })
}

/// Print a measured latency and insist it is well inside "milliseconds".
fn report(what: &str, elapsed: Duration) {
    eprintln!("{what}: {:.2} ms", elapsed.as_secs_f64() * 1e3);
    assert!(elapsed < Duration::from_millis(500), "{what} too slow");
}

#[test]
fn watcher_follows_late_creation_recreation_and_parent_removal() {
    let Some(root) = writable_root() else { return };
    let test = TestCgroup::new(&root);
    let target = test.rel("svc/agent");
    let mut watcher = Watcher::new(&root, [target.clone()]).unwrap();
    assert_eq!(watcher.poll_changes(), []);

    // Parents made one step at a time, later.
    let (parent, leaf) = (test.dir("svc"), test.dir("svc/agent"));
    let maker = soon(move || {
        fs::create_dir(&parent).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let started = Instant::now();
        fs::create_dir(&leaf).unwrap();
        started
    });
    let (changes, seen) = wait_for(&mut watcher, |c| !c.is_empty());
    let started = maker.join().unwrap();
    let first_id = inode(&test.dir("svc/agent"));
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(matches!(&changes[0], Change::Appeared(c) if c.id == first_id && c.level == 3));
    report(
        "late creation (parent, then leaf 5 ms later), seen after the leaf's mkdir",
        seen - started,
    );
    assert_eq!(watcher.current().len(), 1);

    // Removed and recreated: a new inode, reported as Gone then Appeared.
    let leaf = test.dir("svc/agent");
    let recreate = soon(move || {
        let started = Instant::now();
        fs::remove_dir(&leaf).unwrap();
        fs::create_dir(&leaf).unwrap();
        started
    });
    let (changes, seen) = wait_for(&mut watcher, |c| {
        c.iter().any(|c| matches!(c, Change::Appeared(_)))
    });
    let started = recreate.join().unwrap();
    let second_id = inode(&test.dir("svc/agent"));
    assert_ne!(first_id, second_id);
    assert_eq!(
        changes[0],
        Change::Gone {
            path: target.clone(),
            id: first_id
        }
    );
    assert!(matches!(&changes[1], Change::Appeared(c) if c.id == second_id));
    report("rmdir + mkdir, seen after the rmdir", seen - started);

    // The watched parent itself removed, then everything made again.
    let (parent, leaf) = (test.dir("svc"), test.dir("svc/agent"));
    let remover = soon(move || {
        let started = Instant::now();
        fs::remove_dir(&leaf).unwrap();
        fs::remove_dir(&parent).unwrap();
        started
    });
    let (changes, seen) = wait_for(&mut watcher, |c| !c.is_empty());
    let started = remover.join().unwrap();
    assert_eq!(
        changes,
        [Change::Gone {
            path: target.clone(),
            id: second_id
        }]
    );
    report("removal, seen after the rmdir", seen - started);
    assert!(watcher.current().is_empty());
    // Let the parent's removal settle so the watcher is back on the grandparent.
    assert_eq!(watcher.poll_changes(), []);

    let (parent, leaf) = (test.dir("svc"), test.dir("svc/agent"));
    let maker = soon(move || {
        let started = Instant::now();
        fs::create_dir(&parent).unwrap();
        fs::create_dir(&leaf).unwrap();
        started
    });
    let (changes, seen) = wait_for(&mut watcher, |c| !c.is_empty());
    let started = maker.join().unwrap();
    let third_id = inode(&test.dir("svc/agent"));
    assert!(matches!(&changes[..], [Change::Appeared(c)] if c.id == third_id));
    report(
        "parent + leaf re-created, seen after the first mkdir",
        seen - started,
    );
}

#[test]
fn command_starts_inside_the_cgroup_and_remove_kills_it() {
    let Some(root) = writable_root() else { return };
    let test = TestCgroup::new(&root);
    let child_rel = test.rel("agent/child");
    let child = cgroup::create(&root, &child_rel).unwrap();

    // The program sees the cgroup from its first instruction.
    let mut cat = Command::new("cat");
    cat.arg("/proc/self/cgroup");
    cgroup::command_in_cgroup(&mut cat, &root, &child_rel).unwrap();
    let output = cat.output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let v2_line = text.lines().find(|l| l.starts_with("0::")).unwrap();
    assert_eq!(v2_line, format!("0::/{child_rel}"));

    let mut sleep = Command::new("sleep");
    sleep.arg("30").stdin(Stdio::null());
    cgroup::command_in_cgroup(&mut sleep, &root, &child_rel).unwrap();
    let mut sleeper = sleep.spawn().unwrap();
    let pid = sleeper.id();
    assert_eq!(
        cgroup::procs_recursive(&root, &test.rel("agent")).unwrap(),
        [pid]
    );
    assert_eq!(cgroup::procs_recursive(&root, &test.name).unwrap(), [pid]);
    assert_eq!(
        cgroup::procs_recursive(&root, &test.rel("absent")).unwrap(),
        Vec::<u32>::new()
    );

    // Mapping the socket's cgroup id back to the agent's path.
    assert_eq!(
        cgroup::path_of_id(&root, &["elsewhere", &test.name], child.id),
        Some(child_rel.clone())
    );
    assert_eq!(cgroup::path_of_id(&root, &[&test.name], u64::MAX), None);

    let started = Instant::now();
    cgroup::remove(&root, &test.rel("agent")).unwrap();
    let took = started.elapsed();
    report("remove (kill 1 process, rmdir 2 cgroups)", took);
    assert!(!test.dir("agent").exists());
    let status = sleeper.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    // Already gone: fine.
    cgroup::remove(&root, &test.rel("agent")).unwrap();
}

#[test]
fn command_fails_for_a_missing_cgroup() {
    let Some(root) = writable_root() else { return };
    let test = TestCgroup::new(&root);
    let mut true_command = Command::new("true");
    let error =
        cgroup::command_in_cgroup(&mut true_command, &root, &test.rel("absent")).unwrap_err();
    assert!(error.to_string().contains("cgroup.procs"), "{error}");
}
