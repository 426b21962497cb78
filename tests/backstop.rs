//! The kernel backstop against the real kernel: in two network namespaces
//! joined by a veth pair and cgroups these tests create and remove.
//!
//! ```text
//!  netns A (the agent host)                     netns B (the network)
//!  lo: 127.0.0.1 listeners     bs0 192.0.2.1 ── bs1 192.0.2.2 listeners
//! ```
//!
//! The probes (a TCP connect, a UDP send) run in a child process of this test
//! binary (`backstop __probe ...`): a socket belongs to the cgroup of the
//! process that made it, and a process, not a thread, joins a cgroup. Hence
//! `harness = false`; `main` runs the cases and prints one line per case.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agent_egress::backstop::{self, Backstop};
use agent_egress::cgroup;

const VETH_LOCAL: &str = "192.0.2.1";
const VETH_PEER: &str = "192.0.2.2";
const TCP_PORT: u16 = 7000;
const UDP_PORT: u16 = 7001;
/// TCP ignores the EPERM of a dropped SYN and retransmits it (after 1 s), so
/// a blocked connect hangs; a connection that is let through takes
/// microseconds here. The probe gives up after this.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1000);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("__probe") => probe_main(&args[2..]),
        Some("__attach") => attach_main(&args[2..]),
        _ => run_cases(&args[1..]),
    }
}

type Case = (&'static str, fn(&Fixture));

const CASES: &[Case] = &[
    ("only_loopback_leaves", only_loopback_leaves),
    (
        "descendant_cgroups_are_covered",
        descendant_cgroups_are_covered,
    ),
    ("detach_restores_the_network", detach_restores_the_network),
    (
        "survives_dropping_the_program_fd",
        survives_dropping_the_program_fd,
    ),
    (
        "survives_the_attaching_process_killed",
        survives_the_attaching_process_killed,
    ),
    (
        "a_restart_replaces_the_earlier_copy",
        a_restart_replaces_the_earlier_copy,
    ),
    (
        "detach_of_a_removed_cgroup_is_no_error",
        detach_of_a_removed_cgroup_is_no_error,
    ),
];

fn run_cases(filters: &[String]) {
    // SAFETY: geteuid has no preconditions.
    let root_user = unsafe { libc::geteuid() } == 0;
    let mount = cgroup::cgroup2_root();
    let have_ip = Command::new("ip").arg("-V").output().is_ok();
    if !(root_user && mount.is_ok() && have_ip) {
        let why = format!(
            "backstop tests need root, a cgroup2 mount and iproute2 (root={root_user}, mount={mount:?}, ip={have_ip})"
        );
        assert!(std::env::var_os("CI").is_none(), "{why}");
        eprintln!("\n######## SKIPPED ########\n# {why}\n#########################\n");
        return;
    }
    let filters: Vec<&String> = filters.iter().filter(|a| !a.starts_with('-')).collect();
    let mut failed = 0;
    let mut ran = 0;
    for (name, case) in CASES {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        ran += 1;
        let ok = catch_unwind(AssertUnwindSafe(|| case(&Fixture::new()))).is_ok();
        println!("test {name} ... {}", if ok { "ok" } else { "FAILED" });
        failed += usize::from(!ok);
    }
    println!("\n{} passed, {failed} failed", ran - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------
// The cases.

fn only_loopback_leaves(f: &Fixture) {
    f.assert_all_open(&f.agent);
    let b = Backstop::load().unwrap();
    assert_eq!(b.lo_ifindex(), 1, "lo is ifindex 1 in a fresh netns");
    b.attach(&f.agent.dir).unwrap();
    f.assert_blocked(&f.agent);
    // The netns' own veth address is local: it is reached over lo.
    assert_eq!(f.probe(&f.agent, Proto::Tcp, VETH_LOCAL), Outcome::Ok);
}

fn descendant_cgroups_are_covered(f: &Fixture) {
    let child = f.agent.child("worker");
    Backstop::load().unwrap().attach(&f.agent.dir).unwrap();
    f.assert_blocked(&child);
}

fn detach_restores_the_network(f: &Fixture) {
    let b = Backstop::load().unwrap();
    b.attach(&f.agent.dir).unwrap();
    f.assert_blocked(&f.agent);
    assert_eq!(backstop::detach(&f.agent.dir).unwrap(), 1);
    f.assert_all_open(&f.agent);
    assert_eq!(backstop::attached_count(&f.agent.dir).unwrap(), 0);
    // Detaching again finds nothing, and that is no error.
    assert_eq!(backstop::detach(&f.agent.dir).unwrap(), 0);
}

fn survives_dropping_the_program_fd(f: &Fixture) {
    let b = Backstop::load().unwrap();
    b.attach(&f.agent.dir).unwrap();
    drop(b);
    f.assert_blocked(&f.agent);
    assert_eq!(backstop::attached_count(&f.agent.dir).unwrap(), 1);
    // A process that never loaded it can detach it (`agent-egress down`).
    assert_eq!(backstop::detach(&f.agent.dir).unwrap(), 1);
    f.assert_all_open(&f.agent);
}

fn survives_the_attaching_process_killed(f: &Fixture) {
    let mut attacher = KillOnDrop(
        Command::new(std::env::current_exe().unwrap())
            .arg("__attach")
            .arg(&f.agent.dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(attacher.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "attached");
    f.assert_blocked(&f.agent);
    attacher.0.kill().unwrap();
    let status = attacher.0.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the attacher was not killed: {status}"
    );
    f.assert_blocked(&f.agent);
    assert_eq!(backstop::attached_count(&f.agent.dir).unwrap(), 1);
}

fn a_restart_replaces_the_earlier_copy(f: &Fixture) {
    let first = Backstop::load().unwrap();
    first.attach(&f.agent.dir).unwrap();
    // The same program again: already there.
    first.attach(&f.agent.dir).unwrap();
    assert_eq!(backstop::attached_count(&f.agent.dir).unwrap(), 1);
    drop(first);
    let second = Backstop::load().unwrap();
    second.attach(&f.agent.dir).unwrap();
    assert_eq!(backstop::attached_count(&f.agent.dir).unwrap(), 1);
    f.assert_blocked(&f.agent);
}

fn detach_of_a_removed_cgroup_is_no_error(f: &Fixture) {
    let gone = f.agent.child("gone");
    Backstop::load().unwrap().attach(&gone.dir).unwrap();
    fs::remove_dir(&gone.dir).unwrap();
    assert_eq!(backstop::detach(&gone.dir).unwrap(), 0);
}

// ---------------------------------------------------------------------------
// The fixture: two netns, a veth pair, listeners, an agent cgroup.

static NEXT: AtomicUsize = AtomicUsize::new(0);

struct Fixture {
    // Dropped in order: the cgroup (and its processes) before the netns.
    agent: TestCgroup,
    /// Sockets the probes reach; each lives in the netns it was made in.
    _local: Vec<(TcpListener, UdpSocket)>,
    peer: (TcpListener, UdpSocket),
    ns_agent: Netns,
    _ns_peer: Netns,
}

impl Fixture {
    fn new() -> Fixture {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("aebs{}x{n}", std::process::id());
        let ns_agent = Netns::add(&format!("{base}a"));
        let ns_peer = Netns::add(&format!("{base}b"));
        run(Command::new("ip").args([
            "link",
            "add",
            "bs0",
            "netns",
            &ns_agent.name,
            "type",
            "veth",
            "peer",
            "name",
            "bs1",
            "netns",
            &ns_peer.name,
        ]));
        for (ns, dev, addr) in [(&ns_agent, "bs0", VETH_LOCAL), (&ns_peer, "bs1", VETH_PEER)] {
            run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
            run(Command::new("ip").args(["-n", &ns.name, "link", "set", dev, "up"]));
            let cidr = format!("{addr}/24");
            run(Command::new("ip").args(["-n", &ns.name, "addr", "add", &cidr, "dev", dev]));
        }
        let bind = |ns: &Netns, addr: &'static str| {
            ns.run(|| {
                let tcp = TcpListener::bind((addr, TCP_PORT)).unwrap();
                let udp = UdpSocket::bind((addr, UDP_PORT)).unwrap();
                tcp.set_nonblocking(true).unwrap();
                udp.set_nonblocking(true).unwrap();
                (tcp, udp)
            })
        };
        let local = vec![bind(&ns_agent, "127.0.0.1"), bind(&ns_agent, VETH_LOCAL)];
        let peer = bind(&ns_peer, VETH_PEER);
        let agent = TestCgroup::new(&format!("ae-backstop-test-{base}"));
        Fixture {
            agent,
            _local: local,
            peer,
            ns_agent,
            _ns_peer: ns_peer,
        }
    }

    /// Connections and datagrams that reached the veth peer since last asked.
    fn arrived_at_peer(&self) -> (usize, usize) {
        let mut connections = 0;
        while self.peer.0.accept().is_ok() {
            connections += 1;
        }
        let mut datagrams = 0;
        let mut buf = [0u8; 64];
        while self.peer.1.recv(&mut buf).is_ok() {
            datagrams += 1;
        }
        (connections, datagrams)
    }

    fn probe(&self, cgroup: &TestCgroup, proto: Proto, addr: &str) -> Outcome {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.arg("__probe")
            .arg(self.ns_agent.path())
            .arg(proto.name())
            .arg(addr);
        cgroup::command_in_cgroup(&mut cmd, &cgroup.root, &cgroup.rel).unwrap();
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(out.status.success(), "probe {text}: {out:?}");
        Outcome::parse(&text)
    }

    fn assert_all_open(&self, cgroup: &TestCgroup) {
        self.arrived_at_peer();
        for proto in [Proto::Tcp, Proto::Udp] {
            for addr in ["127.0.0.1", VETH_PEER] {
                assert_eq!(
                    self.probe(cgroup, proto, addr),
                    Outcome::Ok,
                    "{proto:?} to {addr} without the backstop"
                );
            }
        }
        assert_eq!(self.arrived_at_peer(), (1, 1));
    }

    /// Loopback works; nothing reaches the veth peer: UDP fails with EPERM, a
    /// TCP connect hangs (its SYNs dropped with EPERM, which TCP ignores).
    fn assert_blocked(&self, cgroup: &TestCgroup) {
        self.arrived_at_peer();
        for proto in [Proto::Tcp, Proto::Udp] {
            assert_eq!(
                self.probe(cgroup, proto, "127.0.0.1"),
                Outcome::Ok,
                "{proto:?} over lo with the backstop"
            );
        }
        assert_eq!(
            self.probe(cgroup, Proto::Udp, VETH_PEER),
            Outcome::Errno(libc::EPERM),
            "UDP to the veth peer with the backstop"
        );
        assert_eq!(
            self.probe(cgroup, Proto::Tcp, VETH_PEER),
            Outcome::TimedOut,
            "TCP to the veth peer with the backstop"
        );
        assert_eq!(self.arrived_at_peer(), (0, 0), "something reached the peer");
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Ok,
    Errno(i32),
    TimedOut,
}

impl Outcome {
    fn parse(text: &str) -> Outcome {
        match text.split_once(' ') {
            _ if text == "ok" => Outcome::Ok,
            _ if text == "timeout" => Outcome::TimedOut,
            Some(("errno", n)) => Outcome::Errno(n.parse().unwrap()),
            _ => panic!("unexpected probe output {text:?}"),
        }
    }
}

/// `__probe NETNS tcp|udp ADDR`: from this process's cgroup and in NETNS,
/// connect (TCP) or send one datagram (UDP) and print the outcome.
fn probe_main(args: &[String]) {
    let [netns, proto, addr] = args else {
        panic!("usage: __probe NETNS tcp|udp ADDR");
    };
    let ns = fs::File::open(netns).unwrap();
    // SAFETY: setns on a valid netns fd; this process has one thread.
    assert_eq!(
        unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
        0
    );
    let ip: std::net::IpAddr = addr.parse().unwrap();
    let result = match proto.as_str() {
        "tcp" => {
            TcpStream::connect_timeout(&SocketAddr::new(ip, TCP_PORT), CONNECT_TIMEOUT).map(drop)
        }
        "udp" => UdpSocket::bind(("0.0.0.0", 0))
            .and_then(|s| s.send_to(b"probe", (ip, UDP_PORT)))
            .map(drop),
        other => panic!("unknown protocol {other}"),
    };
    match result {
        Ok(()) => println!("ok"),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => println!("timeout"),
        Err(e) => println!("errno {}", e.raw_os_error().unwrap_or(-1)),
    }
}

/// `__attach CGROUP_DIR`: load, attach, say so, and wait to be killed.
fn attach_main(args: &[String]) {
    let [dir] = args else {
        panic!("usage: __attach CGROUP_DIR");
    };
    let b = Backstop::load().unwrap();
    b.attach(Path::new(dir)).unwrap();
    println!("attached");
    // Holds the program fd until killed.
    loop {
        std::thread::park();
    }
}

struct Netns {
    name: String,
}

impl Netns {
    fn add(name: &str) -> Netns {
        run(Command::new("ip").args(["netns", "add", name]));
        Netns {
            name: name.to_string(),
        }
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread inside this netns.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = fs::File::open(&path).unwrap();
                // SAFETY: setns on a valid netns fd changes only this thread.
                assert_eq!(
                    unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                    0
                );
                f()
            })
            .join()
            .unwrap()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a netns also deletes the veth end inside it (and its peer).
        let out = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("cannot delete netns {}: {out:?}", self.name);
        }
    }
}

/// A cgroup under the cgroup2 root, removed with its processes and
/// descendants (the backstop goes with it) on drop.
struct TestCgroup {
    root: PathBuf,
    rel: String,
    dir: PathBuf,
    owned: bool,
}

impl TestCgroup {
    fn new(rel: &str) -> TestCgroup {
        let root = cgroup::cgroup2_root().unwrap();
        cgroup::create(&root, rel).unwrap();
        TestCgroup {
            dir: root.join(rel),
            root,
            rel: rel.to_string(),
            owned: true,
        }
    }

    /// A cgroup below this one, removed with it.
    fn child(&self, name: &str) -> TestCgroup {
        let rel = format!("{}/{name}", self.rel);
        cgroup::create(&self.root, &rel).unwrap();
        TestCgroup {
            dir: self.root.join(&rel),
            root: self.root.clone(),
            rel,
            owned: false,
        }
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if self.owned {
            if let Err(e) = cgroup::remove(&self.root, &self.rel) {
                eprintln!("cannot remove test cgroup {}: {e}", self.rel);
            }
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A child process killed (and reaped) when the test is done with it, also on panic.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
