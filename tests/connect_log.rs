//! The connect log against the real kernel: its programs on a cgroup this
//! test makes, processes in that cgroup connecting over loopback, and the
//! socket's cookie (from sock_diag, as the proxy learns it) giving back the
//! pid that called connect().

mod harness;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};

use agent_egress::connect_log::{self, ConnectLog};
use agent_egress::procinfo::{lookup_socket, SockDiag};
use harness::{cgroup2_root, remove_tree, Cgroup};

/// The test's cgroup tree (`<name>/leaf`), removed with whatever runs in it.
struct Tree {
    agent: Cgroup,
    leaf: Cgroup,
}

impl Tree {
    fn new(name: &str) -> Tree {
        let root = cgroup2_root().expect("cgroup2 mount");
        let agent = Cgroup::create(
            &root,
            &format!("ae-connect-log-{name}-{}", std::process::id()),
        )
        .unwrap();
        let leaf = Cgroup::create(&root, &format!("{}/leaf", agent.relative_path())).unwrap();
        Tree { agent, leaf }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.agent.path()) {
            eprintln!("{e}");
        }
    }
}

/// A bash in `cgroup` that runs `script` once told to, and says what it printed.
struct Agent {
    child: Child,
    lines: BufReader<std::process::ChildStdout>,
}

impl Agent {
    fn start(cgroup: &Cgroup, script: &str) -> Agent {
        let mut child = Command::new("bash")
            .args(["-c", &format!("read go; {script}"), "agent-under-test"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Into the cgroup before it makes any socket.
        std::fs::write(cgroup.procs_file(), child.id().to_string()).unwrap();
        child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap());
        Agent { child, lines }
    }

    /// A line on its stdin: what a script waiting in `read` goes on at.
    fn go_on(&mut self) {
        self.child.stdin.as_mut().unwrap().write_all(b"\n").unwrap();
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.lines.read_line(&mut line).unwrap();
        line.trim().to_string()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pid the connect log recorded for the connection `listener` accepts next.
fn connector_of_next(listener: &TcpListener, log: &ConnectLog) -> Option<u32> {
    let (_stream, client) = listener.accept().unwrap();
    let server = listener.local_addr().unwrap();
    let owner = lookup_socket(client, server)
        .unwrap()
        .expect("sock_diag knows the client socket");
    log.take(owner.cookie).unwrap()
}

fn connect_script(server: SocketAddr) -> String {
    let host = match server {
        SocketAddr::V4(a) => a.ip().to_string(),
        SocketAddr::V6(a) => a.ip().to_string(),
    };
    format!(
        "exec 3<>/dev/tcp/{host}/{}; echo $$; read wait",
        server.port()
    )
}

/// A new tree with a connect log attached; None (after a loud skip) when the
/// test cannot run here.
fn attached_to_new_tree(name: &str) -> Option<(Tree, ConnectLog)> {
    if !harness::require_root_and_tools(&["bash"]) {
        return None;
    }
    let tree = Tree::new(name);
    let log = ConnectLog::load().unwrap();
    log.attach(&tree.agent.path()).unwrap();
    Some((tree, log))
}

#[test]
fn names_the_process_that_connected_v4_and_v6_below_the_cgroup() {
    let Some((tree, log)) = attached_to_new_tree("names") else {
        return;
    };

    let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut agent = Agent::start(&tree.leaf, &connect_script(v4.local_addr().unwrap()));
    let pid = agent.child.id();
    assert_eq!(connector_of_next(&v4, &log), Some(pid));
    assert_eq!(agent.line(), pid.to_string());

    // A subshell connects: the log names it, not its parent.
    let script = format!(
        "( {} ) & wait",
        connect_script(v4.local_addr().unwrap()).replace("read wait", "sleep 30")
    );
    let mut forking = Agent::start(&tree.leaf, &script);
    let connector = connector_of_next(&v4, &log).expect("recorded");
    assert_eq!(
        forking.line(),
        forking.child.id().to_string(),
        "$$ is bash's own pid"
    );
    assert_ne!(connector, forking.child.id(), "the subshell connected");
    let parent = std::fs::read_to_string(format!("/proc/{connector}/stat")).unwrap();
    let ppid: u32 = parent
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ppid, forking.child.id());

    match TcpListener::bind("[::1]:0") {
        Ok(v6) => {
            let mut agent6 = Agent::start(&tree.leaf, &connect_script(v6.local_addr().unwrap()));
            assert_eq!(connector_of_next(&v6, &log), Some(agent6.child.id()));
            assert_eq!(agent6.line(), agent6.child.id().to_string());
        }
        Err(e) => eprintln!("no IPv6 on lo ({e}): the connect6 program is not exercised"),
    }
}

#[test]
fn an_entry_is_taken_once_and_outside_processes_are_not_logged() {
    let Some((tree, log)) = attached_to_new_tree("once") else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();

    let _agent = Agent::start(&tree.leaf, &connect_script(listener.local_addr().unwrap()));
    let (_stream, client) = listener.accept().unwrap();
    let owner = lookup_socket(client, listener.local_addr().unwrap())
        .unwrap()
        .unwrap();
    assert!(log.take(owner.cookie).unwrap().is_some());
    assert_eq!(log.take(owner.cookie).unwrap(), None, "taken once");

    // This test process is not in the cgroup: its connects are not logged.
    let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let owner = lookup_socket(ours.local_addr().unwrap(), listener.local_addr().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(log.take(owner.cookie).unwrap(), None);
}

/// A python in `cgroup` that sends a datagram to `server` from one
/// unconnected socket, then has a forked child send the next; each prints
/// its pid after sending.
fn sender_script(server: SocketAddr) -> String {
    let family = if server.is_ipv4() {
        "AF_INET"
    } else {
        "AF_INET6"
    };
    let program = format!(
        "import os, socket, sys\n\
         s = socket.socket(socket.{family}, socket.SOCK_DGRAM)\n\
         def send(): s.sendto(b'q', ('{}', {})); print(os.getpid(), flush=True); sys.stdin.readline()\n\
         send()\n\
         send() if os.fork() == 0 else os.wait()",
        server.ip(),
        server.port()
    );
    format!("exec python3 -c \"{program}\"")
}

#[test]
fn names_the_process_that_sent_the_latest_unconnected_datagram() {
    let Some((tree, log)) = attached_to_new_tree("sendto") else {
        return;
    };
    assert!(harness::require_root_and_tools(&["python3"]));
    let mut diag = SockDiag::open().unwrap();
    for bind in ["127.0.0.1:0", "[::1]:0"] {
        let server = match UdpSocket::bind(bind) {
            Ok(server) => server,
            Err(e) => {
                eprintln!("no {bind} ({e}): the sendmsg6 program is not exercised");
                continue;
            }
        };
        let at = server.local_addr().unwrap();
        let mut agent = Agent::start(&tree.leaf, &sender_script(at));
        let mut buf = [0u8; 16];
        let mut sent_by = |agent: &mut Agent| {
            let (_, from) = server.recv_from(&mut buf).unwrap();
            let pid: u32 = agent.line().parse().unwrap();
            let owner = diag
                .lookup_udp(from, at)
                .unwrap()
                .expect("sock_diag knows it");
            (pid, log.peek(owner.cookie).unwrap())
        };
        let (parent, logged) = sent_by(&mut agent);
        assert_eq!(logged, Some(parent), "{bind}: the sender");
        agent.go_on();
        let (child, logged) = sent_by(&mut agent);
        assert_ne!(child, parent);
        assert_eq!(
            logged,
            Some(child),
            "{bind}: the latest sender on the shared socket"
        );
        agent.go_on();
    }
}

/// The programs attached to `dir` once they number `want`, or after 5 s: the
/// kernel releases a closed link's attachment a moment later, not at close.
fn attached_soon(dir: &std::path::Path, want: usize) -> usize {
    let started = std::time::Instant::now();
    loop {
        let count = connect_log::attached_count(dir).unwrap();
        if count == want || started.elapsed() > std::time::Duration::from_secs(5) {
            return count;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn links_go_with_their_daemon_and_detach_stops_it() {
    if !harness::require_root_and_tools(&["bash"]) {
        return;
    }
    let tree = Tree::new("detach");
    let dir = tree.agent.path();
    let first = ConnectLog::load().unwrap();
    first.attach(&dir).unwrap();
    first.attach(&dir).unwrap();
    assert_eq!(
        connect_log::attached_count(&dir).unwrap(),
        connect_log::PROGRAMS_PER_CGROUP,
        "connects and sends, v4 + v6, once each"
    );
    // A daemon that ends (its descriptors closed) leaves nothing attached: a
    // restart never piles copies up, and removing them needs no CAP_SYS_ADMIN.
    drop(first);
    assert_eq!(attached_soon(&dir, 0), 0);
    let second = ConnectLog::load().unwrap();
    second.attach(&dir).unwrap();
    assert_eq!(
        connect_log::attached_count(&dir).unwrap(),
        connect_log::PROGRAMS_PER_CGROUP
    );

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let agent = Agent::start(&tree.leaf, &connect_script(listener.local_addr().unwrap()));
    assert_eq!(
        connector_of_next(&listener, &second),
        Some(agent.child.id())
    );
    drop(agent);

    assert!(second.detach(&dir));
    assert_eq!(attached_soon(&dir, 0), 0);
    let _agent = Agent::start(&tree.leaf, &connect_script(listener.local_addr().unwrap()));
    assert_eq!(
        connector_of_next(&listener, &second),
        None,
        "no longer logged"
    );
    assert!(!second.detach(&dir));
    assert_eq!(connect_log::detach_unlinked(&dir).unwrap(), 0);
}

#[test]
fn a_cgroup_made_anew_at_the_same_path_is_linked_anew() {
    if !harness::require_root_and_tools(&["bash"]) {
        return;
    }
    let tree = Tree::new("anew");
    let log = ConnectLog::load().unwrap();
    log.attach(&tree.leaf.path()).unwrap();
    tree.leaf.recreate().unwrap();
    assert_eq!(connect_log::attached_count(&tree.leaf.path()).unwrap(), 0);
    log.attach(&tree.leaf.path()).unwrap();
    assert_eq!(
        connect_log::attached_count(&tree.leaf.path()).unwrap(),
        connect_log::PROGRAMS_PER_CGROUP
    );
}
