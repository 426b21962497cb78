//! Audit writer (file sink, rotation, drops) and process attribution against the real
//! kernel. Socket tests use loopback only; the cgroup test creates and removes its own
//! cgroup.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use agent_egress::audit::{
    AttributionDone, AuditError, AuditLog, Event, PendingRecord, Proto, Record, Sink, Verdict,
};
use agent_egress::config::AuditFormat;
use agent_egress::proc_events::{Changes, ProcEvents};
use agent_egress::procinfo::{
    find_socket_holder, holds, lookup_socket, Attributor, OwnerQuery, ProcessNeeds, SockDiag,
    SocketHolder,
};
use serde_json::Value;

/// A fresh directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "agent-egress-audit-{tag}-{}-{n}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn read_records(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

fn wait_for_records(path: &Path, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let records = read_records(path);
        if records.len() >= count || Instant::now() > deadline {
            return records;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn connection(conn_id: u64, host: &str) -> Record {
    Record {
        ts: "2026-11-25T08:40:25.123Z".into(),
        event: Event::End,
        conn_id: Some(conn_id),
        src: "127.0.0.1:40000".into(),
        dst: "192.0.2.10:443".into(),
        proto: Proto::Tls,
        host: Some(host.into()),
        outbound: "direct".into(),
        verdict: Verdict::Allow,
        bytes_up: 10,
        bytes_down: 20,
        ..Record::default()
    }
}

#[test]
fn file_sink_writes_json_lines_promptly() {
    let dir = TempDir::new("sink");
    let path = dir.0.join("audit.jsonl");
    let (log, thread) =
        AuditLog::start(Sink::File(path.clone()), AuditFormat::Json, 64, None).unwrap();
    log.submit(connection(1, "a.example").into());
    log.submit(
        Record {
            ts: String::new(),
            ..connection(2, "b.example")
        }
        .into(),
    );
    // Visible without stopping: the writer flushes when its queue runs empty.
    let records = wait_for_records(&path, 2);
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["host"], "a.example");
    assert_eq!(records[0]["ts"], "2026-11-25T08:40:25.123Z");
    assert_eq!(records[0]["bytes_down"], 20);
    assert!(records[0]["pid"].is_null());
    let stamped = records[1]["ts"].as_str().unwrap();
    assert_eq!(stamped.len(), 24, "writer stamps an empty ts: {stamped}");
    assert!(stamped.ends_with('Z'));
    log.submit(connection(3, "c.example").into());
    thread.flush_and_stop().unwrap();
    assert_eq!(read_records(&path).len(), 3);
    assert_eq!(log.dropped(), 0);
    let mode = fs::metadata(&path).unwrap().mode() & 0o777;
    assert_eq!(mode & 0o007, 0, "audit log must not be world-readable");
}

/// `audit.format: "ocsf"`: the file gets OCSF events, a watcher of the event
/// stream still our JSON records (what `watch` and `mcp` read).
#[test]
fn ocsf_file_and_json_event_stream() {
    let dir = TempDir::new("ocsf");
    let path = dir.0.join("audit.jsonl");
    let (log, thread) =
        AuditLog::start(Sink::File(path.clone()), AuditFormat::Ocsf, 64, None).unwrap();
    let (_, watcher) = log.events().subscribe().expect("a watcher");
    log.submit(connection(1, "a.example").into());
    let streamed = watcher
        .recv_timeout(Duration::from_secs(5))
        .expect("a streamed record");
    let streamed: Value = serde_json::from_slice(&streamed).unwrap();
    assert_eq!(streamed["host"], "a.example");
    assert_eq!(streamed["ts"], "2026-11-25T08:40:25.123Z");
    thread.flush_and_stop().unwrap();
    let written = read_records(&path);
    assert_eq!(written.len(), 1);
    assert_eq!(written[0]["class_uid"], 4001);
    assert_eq!(written[0]["dst_endpoint"]["hostname"], "a.example");
    assert_eq!(written[0]["time"], 1_795_596_025_123_u64);
    assert!(written[0].get("host").is_none(), "{}", written[0]);
}

#[test]
fn unopenable_file_fails_at_start_naming_the_path() {
    let error = match AuditLog::start(
        Sink::File("/nonexistent-dir/audit.jsonl".into()),
        AuditFormat::Json,
        8,
        None,
    ) {
        Err(e) => e,
        Ok(_) => panic!("a log in a missing directory must not start"),
    };
    assert!(matches!(error, AuditError::Open { .. }));
    assert!(
        error.to_string().contains("/nonexistent-dir/audit.jsonl"),
        "{error}"
    );
}

#[test]
fn reopen_after_rename_writes_to_the_new_file() {
    let dir = TempDir::new("rotate");
    let path = dir.0.join("audit.jsonl");
    let rotated = dir.0.join("audit.jsonl.1");
    let (log, thread) =
        AuditLog::start(Sink::File(path.clone()), AuditFormat::Json, 64, None).unwrap();
    log.submit(connection(1, "before.example").into());
    assert_eq!(wait_for_records(&path, 1).len(), 1);
    fs::rename(&path, &rotated).unwrap();
    log.reopen();
    log.submit(connection(2, "after.example").into());
    thread.flush_and_stop().unwrap();
    let old = read_records(&rotated);
    let new = read_records(&path);
    assert_eq!(old.len(), 1);
    assert_eq!(old[0]["host"], "before.example");
    assert_eq!(new.len(), 1);
    assert_eq!(new[0]["host"], "after.example");
}

/// A rotator that cannot signal the daemon (NixOS's sandboxed logrotate.service): the
/// real logrotate renames the file while records keep coming, and the writer follows
/// the path by itself. Every record is in the rotated file or the new one, and those
/// written well after the rotation are in the new one.
#[test]
fn rotation_by_logrotate_is_followed_without_a_signal() {
    let found = Command::new("logrotate")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !require(found, "logrotate") {
        return;
    }
    let dir = TempDir::new("logrotate");
    let path = dir.0.join("audit.jsonl");
    let config = dir.0.join("logrotate.conf");
    // What nix/module.nix asks of NixOS's logrotate, without `su` (the test's own file).
    fs::write(
        &config,
        format!(
            "{} {{\n  rotate 8\n  compress\n  delaycompress\n  missingok\n  notifempty\n  create 0640\n}}\n",
            path.display()
        ),
    )
    .unwrap();
    let (log, thread) =
        AuditLog::start(Sink::File(path.clone()), AuditFormat::Json, 1024, None).unwrap();
    let mut submitted = 0u64;
    let mut submit_for = |duration: Duration, host: &str| {
        let until = Instant::now() + duration;
        while Instant::now() < until {
            submitted += 1;
            log.submit(connection(submitted, host).into());
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    submit_for(Duration::from_millis(300), "before.example");
    assert!(!wait_for_records(&path, 1).is_empty());
    let rotated = Command::new("logrotate")
        .arg("--force")
        .arg("--state")
        .arg(dir.0.join("state"))
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        rotated.status.success(),
        "logrotate failed: {}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    // Records submitted within ROTATION_CHECK of the rotation may still land in
    // the rotated file; past it they must be in the new one.
    submit_for(Duration::from_millis(1300), "around.example");
    submit_for(Duration::from_millis(300), "after.example");
    thread.flush_and_stop().unwrap();
    assert_eq!(log.dropped(), 0);

    let old = read_records(&dir.0.join("audit.jsonl.1"));
    let new = read_records(&path);
    assert!(!old.is_empty(), "logrotate rotated nothing");
    assert!(
        new.iter().any(|r| r["host"] == "after.example"),
        "no record reached the new file"
    );
    assert!(
        old.iter().all(|r| r["host"] != "after.example"),
        "records kept going to the rotated file"
    );
    let mut ids: Vec<u64> = old
        .iter()
        .chain(&new)
        .map(|r| r["conn_id"].as_u64().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (1..=submitted).collect::<Vec<_>>(),
        "every record is in exactly one of the two files"
    );
}

/// The writer is stuck on a FIFO nobody reads: submit must still return at once, count
/// every lost record, and the writer must report the loss once unstuck.
#[test]
fn full_queue_drops_and_never_blocks() {
    let dir = TempDir::new("fifo");
    let fifo = dir.0.join("audit.fifo");
    let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    // A reader must exist for the writer's open to succeed; it reads nothing yet.
    let mut reader = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let (log, thread) =
        AuditLog::start(Sink::File(fifo.clone()), AuditFormat::Json, 4, None).unwrap();

    const SUBMITTED: u64 = 100_000;
    let started = Instant::now();
    for i in 0..SUBMITTED {
        log.submit(connection(i, "flood.example").into());
    }
    let elapsed = started.elapsed();
    eprintln!("{SUBMITTED} submits into a stuck writer took {elapsed:?}");
    assert!(
        elapsed < Duration::from_secs(2),
        "submit blocked: {elapsed:?}"
    );
    // A 64 KiB pipe, a 64 KiB buffer and a 4-slot queue hold a few hundred records.
    assert!(
        log.dropped() > SUBMITTED - 1000,
        "dropped {}",
        log.dropped()
    );

    let flags = unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_GETFL) };
    assert_eq!(
        unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) },
        0
    );
    let drain = std::thread::spawn(move || {
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        text
    });
    thread.flush_and_stop().unwrap();
    let text = drain.join().unwrap();
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let written = records.iter().filter(|r| r["event"] == "end").count() as u64;
    let reported: u64 = records
        .iter()
        .filter(|r| r["event"] == "audit_drops")
        .map(|r| r["dropped"].as_u64().unwrap())
        .sum();
    assert!(reported > 0);
    assert_eq!(reported, log.dropped());
    assert_eq!(
        written + reported,
        SUBMITTED,
        "every record is written or counted"
    );
}

// ---- kernel-backed attribution ----

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// True when the test may run; a missing prerequisite fails under CI, else skips loudly.
fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{what} is required under CI"
    );
    eprintln!("SKIPPED: {what} is required");
    false
}

/// The cgroup2 mount; None, after `require` skipped loudly, when there is none.
fn required_cgroup2_root() -> Option<PathBuf> {
    let root = cgroup2_root();
    if require(root.is_some(), "a cgroup2 mount") {
        root
    } else {
        None
    }
}

fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (mount, fs_part) = line.split_once(" - ")?;
        let mount_point = mount.split_whitespace().nth(4)?;
        (fs_part.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

fn own_cgroup_dir(root: &Path) -> PathBuf {
    let cgroups = fs::read_to_string("/proc/self/cgroup").unwrap();
    let rel = cgroups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup v2 entry in /proc/self/cgroup");
    root.join(rel.trim_start_matches('/'))
}

fn socket_inode(fd: &impl AsRawFd) -> u64 {
    let link = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
    let text = link.to_str().unwrap();
    text.strip_prefix("socket:[")
        .and_then(|t| t.strip_suffix(']'))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn sock_diag_finds_own_sockets_v4_v6_and_mapped() {
    let Some(root) = required_cgroup2_root() else {
        return;
    };
    let own_cgroup_id = fs::metadata(own_cgroup_dir(&root)).unwrap().ino();
    let euid = unsafe { libc::geteuid() };
    let mut diag = SockDiag::open().unwrap();
    for (listen, connect_to) in [
        ("127.0.0.1:0", None),
        ("[::1]:0", None),
        ("127.0.0.1:0", Some("::ffff:127.0.0.1")),
    ] {
        let listener = TcpListener::bind(listen).unwrap();
        let server = listener.local_addr().unwrap();
        let target = match connect_to {
            Some(ip) => SocketAddr::new(ip.parse().unwrap(), server.port()),
            None => server,
        };
        let client = TcpStream::connect(target).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let client_addr = client.local_addr().unwrap();

        let owner = diag
            .lookup(client_addr, target)
            .unwrap()
            .unwrap_or_else(|| panic!("no socket found for {client_addr} -> {target}"));
        assert_eq!(
            owner.inode,
            socket_inode(&client),
            "{client_addr} -> {target}"
        );
        assert_eq!(owner.uid, euid);
        assert_eq!(owner.cgroup_id, Some(own_cgroup_id));
        assert_eq!(lookup_socket(client_addr, target).unwrap(), Some(owner));

        // The other direction is the accepted socket, a different one.
        let server_side = diag
            .lookup(
                accepted.local_addr().unwrap(),
                accepted.peer_addr().unwrap(),
            )
            .unwrap()
            .unwrap();
        assert_eq!(server_side.inode, socket_inode(&accepted));

        let own_pid = std::process::id();
        let holder = find_socket_holder(owner.inode, &[own_pid]).unwrap();
        assert_eq!(
            holder,
            SocketHolder {
                pid: own_pid,
                fd: client.as_raw_fd() as u32
            }
        );
        assert_eq!(
            find_socket_holder(owner.inode + 1_000_000, &[own_pid]),
            None
        );
        assert!(holds(holder, owner.inode));
        drop(client);
        assert!(!holds(holder, owner.inode), "the fd is closed");
    }
    let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let nothing: SocketAddr = "127.0.0.2:2".parse().unwrap();
    assert_eq!(diag.lookup(nobody, nothing).unwrap(), None);
}

/// A cgroup made for one test, removed on drop (after its processes are gone).
struct TestCgroup(PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove test cgroup {}", self.0.display());
    }
}

/// Kills and reaps the child on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A bash in its own cgroup connects to us, then exits: early attribution still names
/// it in the end record, late attribution of a dead process cannot.
#[test]
fn attribution_of_a_short_lived_process_in_an_agent_cgroup() {
    if !require(is_root(), "root (to create a cgroup)") {
        return;
    }
    let Some(root) = required_cgroup2_root() else {
        return;
    };
    let agent_dir = root.join(format!("agent-egress-audit-test-{}", std::process::id()));
    fs::create_dir(&agent_dir).unwrap();
    let cgroup = TestCgroup(agent_dir.clone());
    // The process goes one level below the configured agent cgroup, like a systemd
    // service below its slice.
    let leaf = agent_dir.join("leaf");
    fs::create_dir(&leaf).unwrap();
    let leaf_cgroup = TestCgroup(leaf.clone());
    let leaf_id = fs::metadata(&leaf).unwrap().ino();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server = listener.local_addr().unwrap();
    let script = format!(
        "read go; exec 3<>/dev/tcp/127.0.0.1/{}; echo connected; read wait_forever",
        server.port()
    );
    let mut child = ChildGuard(
        Command::new("bash")
            .args(["-c", &script, "agent-under-test"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child_pid = child.0.id();
    fs::write(leaf.join("cgroup.procs"), child_pid.to_string()).unwrap();
    let mut child_in = child.0.stdin.take().unwrap();
    child_in.write_all(b"go\n").unwrap();
    let (accepted, client_addr) = listener.accept().unwrap();
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "connected\n");

    let owner = lookup_socket(client_addr, server).unwrap().unwrap();
    assert_eq!(owner.cgroup_id, Some(leaf_id));
    let attributor = Attributor::default();
    let candidates = attributor.candidate_pids(&agent_dir, owner.cgroup_id);
    assert_eq!(candidates, vec![child_pid]);
    // No connect log here: the /proc search finds the process.
    let query = OwnerQuery {
        owner,
        scope: agent_dir
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .into_owned(),
        connector: None,
        needs: ProcessNeeds {
            exe_sha256: true,
            cgroup: true,
        },
    };
    let mut attributor = attributor;
    let info = attributor.resolve(&query).unwrap();
    assert_eq!(info.pid, child_pid);
    // The socket's next query looks where it was found: no search, so a
    // scope with no processes at all still finds it.
    let elsewhere = OwnerQuery {
        scope: "agent-egress-no-such-cgroup".into(),
        ..query.clone()
    };
    assert_eq!(
        attributor.resolve(&elsewhere).map(|i| i.pid),
        Some(child_pid)
    );
    assert!(
        info.exe.as_deref().unwrap().ends_with("/bash"),
        "{:?}",
        info.exe
    );
    let cmdline = info.cmdline.clone().unwrap();
    assert_eq!(cmdline[0], "bash");
    assert_eq!(cmdline.last().unwrap(), "agent-under-test");
    assert_eq!(info.comm.as_deref(), Some("bash"));
    let sha256sum = Command::new("sha256sum")
        .arg(info.exe.as_deref().unwrap())
        .output()
        .unwrap();
    let want = String::from_utf8(sha256sum.stdout).unwrap();
    assert_eq!(
        info.exe_sha256.as_deref(),
        want.split_whitespace().next(),
        "the hash of the file bash runs"
    );
    assert_eq!(
        info.cgroup.as_deref(),
        leaf.strip_prefix(&root).unwrap().to_str()
    );
    assert!(
        info.ancestry.is_empty(),
        "its parent, this test, is outside the agent's cgroup: {:?}",
        info.ancestry
    );

    let dir = TempDir::new("attribution");
    let path = dir.0.join("audit.jsonl");
    let (log, thread) = AuditLog::start(
        Sink::File(path.clone()),
        AuditFormat::Json,
        64,
        Some(attributor),
    )
    .unwrap();
    let early_id = log.next_conn_id();
    let late_alive_id = log.next_conn_id();
    let late_dead_id = log.next_conn_id();
    let pending = |id| PendingRecord {
        record: connection(id, "agent.example"),
        owner: Some(query.clone()),
    };
    let poll = mio::Poll::new().unwrap();
    let waker = std::sync::Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
    let done = AttributionDone::new(waker);
    log.attribute_early(early_id, query.clone(), done.clone());
    log.wake_for_early();
    let asked = std::time::Instant::now();
    while !done.is_done() {
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(5),
            "never attributed"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    log.submit(pending(late_alive_id));
    assert_eq!(wait_for_records(&path, 1).len(), 1);

    drop(child_in);
    drop(child); // kill and reap: the agent is gone before its connection's end
    drop(accepted);
    log.submit(pending(early_id));
    log.submit(pending(late_dead_id));
    thread.flush_and_stop().unwrap();

    let records = read_records(&path);
    let by_id = |id: u64| {
        records
            .iter()
            .find(|r| r["conn_id"] == id)
            .unwrap_or_else(|| panic!("no record for conn {id}: {records:?}"))
    };
    for id in [late_alive_id, early_id] {
        let record = by_id(id);
        assert_eq!(record["pid"], child_pid, "conn {id}: {record}");
        assert!(record["exe"].as_str().unwrap().ends_with("/bash"));
        assert_eq!(record["cmdline"][0], "bash");
        assert_eq!(record["ancestry"], serde_json::json!([]), "{record}");
        assert_eq!(record["exe_sha256"].as_str(), info.exe_sha256.as_deref());
        assert_eq!(record["uid"], 0);
        assert_eq!(record["cgroup_id"], leaf_id);
    }
    let dead = by_id(late_dead_id);
    assert!(
        dead["pid"].is_null(),
        "a dead process cannot be found late: {dead}"
    );
    assert_eq!(dead["cgroup_id"], leaf_id, "the kernel's facts are kept");
    drop(leaf_cgroup);
    drop(cgroup);
}

/// Read system calls this thread has made so far (`syscr`).
fn reads_so_far() -> u64 {
    let io = fs::read_to_string("/proc/thread-self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("syscr: "))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn process_events_name_a_process_that_forks_execs_and_exits() {
    if !require(is_root(), "root (the process events need CAP_NET_ADMIN)") {
        return;
    }
    let mut events = ProcEvents::subscribe().expect("subscribed");
    let mut named = Vec::new();
    assert_eq!(events.drain(|pid| named.push(pid)), Changes::Listed);
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    // Fork, exec and exit each name it; other processes' events may interleave.
    while named.iter().filter(|&&p| p == pid).count() < 3 && Instant::now() < deadline {
        assert_eq!(events.drain(|p| named.push(p)), Changes::Listed);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(named.iter().filter(|&&p| p == pid).count(), 3, "{named:?}");
}

/// With the process events, a process's description is read once and then
/// stands until the process changes: an exec shows at the very next look.
#[test]
fn a_description_stands_until_its_process_execs() {
    if !require(is_root(), "root (the process events need CAP_NET_ADMIN)") {
        return;
    }
    let mut child = ChildGuard(
        Command::new("bash")
            .args([
                "-c",
                "echo ready; read go; exec sleep 30",
                "agent-under-test",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    // Running its script: its exec (reported as the parent may already run
    // again) is behind it, and comes before the events are subscribed to.
    let mut ready = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready, "ready\n");
    let query = OwnerQuery {
        owner: agent_egress::procinfo::SocketOwner {
            inode: 0,
            uid: 0,
            cookie: 0,
            cgroup_id: None,
        },
        scope: "agent-egress-no-such-cgroup".into(),
        connector: Some(pid),
        needs: ProcessNeeds::default(),
    };
    let mut attributor = Attributor::default();
    let first = attributor.resolve(&query).unwrap();
    assert!(first.exe.as_deref().unwrap().ends_with("/bash"));
    let counting = reads_so_far().abs_diff(reads_so_far());
    let before = reads_so_far();
    let again = attributor.resolve(&query).unwrap();
    let reads = reads_so_far() - before - counting;
    assert!(
        std::sync::Arc::ptr_eq(&first, &again),
        "the same description"
    );
    assert_eq!(reads, 0, "nothing read for an unchanged process");

    child.0.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fs::read_link(format!("/proc/{pid}/exe"))
        .unwrap()
        .ends_with("sleep")
    {
        assert!(Instant::now() < deadline, "bash never exec'd sleep");
        std::thread::sleep(Duration::from_millis(1));
    }
    let execd = attributor.resolve(&query).unwrap();
    assert!(
        execd.exe.as_deref().unwrap().ends_with("/sleep"),
        "{:?}",
        execd.exe
    );
    assert_eq!(execd.cmdline, Some(vec!["sleep".into(), "30".into()]));
}
