//! The netfilter module against the running kernel: as root, each test in a network
//! namespace it creates (and deletes on drop, also when it fails). In-process code runs
//! in a thread that entered the namespace with setns(); `nft` and `ip` run through
//! `ip netns exec`.

use agent_egress::netfilter::{
    self, CgroupMatch, NetfilterError, TableMonitor, TablePlan, AGENTS_SET, DEFAULT_TABLE,
};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// True if the test can run; false (after saying so loudly) if it must be skipped.
/// With CI set, missing prerequisites fail the test instead.
fn prerequisites() -> bool {
    prerequisites_with(&[])
}

/// Root, nft, ip, and these further tools (each must run with `-V`).
fn prerequisites_with(tools: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<&str> = ["nft", "ip"]
        .iter()
        .chain(tools)
        .copied()
        .filter(|tool| {
            !Command::new(tool)
                .arg("-V")
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        })
        .collect();
    if root && missing.is_empty() {
        return true;
    }
    skip(&format!(
        "needs root (is root: {root}) and these missing tools: {missing:?}"
    ));
    false
}

fn skip(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{why}");
    }
    eprintln!("\n*** SKIPPED: {why} ***\n");
}

/// A network namespace of our own, deleted on drop.
struct NetNs {
    name: String,
}

impl NetNs {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ae-nf-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` in a thread inside the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let ns = File::open(format!("/run/netns/{}", self.name)).unwrap();
                    // SAFETY: a valid namespace fd; only this thread changes namespace.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap()
        })
    }

    fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", &self.name];
        all.extend_from_slice(args);
        Command::new("ip").args(&all).output().unwrap()
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// `nft [options] list ...` output, or None if nft failed (e.g. no such table).
    fn nft_list(&self, options: &[&str], what: &[&str]) -> Option<String> {
        let mut args = vec!["nft"];
        args.extend_from_slice(options);
        args.push("list");
        args.extend_from_slice(what);
        let out = self.exec(&args);
        out.status
            .success()
            .then(|| String::from_utf8(out.stdout).unwrap())
    }

    fn nft(&self, args: &[&str]) {
        let mut all = vec!["nft"];
        all.extend_from_slice(args);
        let out = self.exec(&all);
        assert!(out.status.success(), "nft {args:?}: {out:?}");
    }

    fn table(&self) -> Option<String> {
        self.nft_list(&[], &["table", "inet", DEFAULT_TABLE])
    }

    fn table_json(&self) -> Option<serde_json::Value> {
        self.nft_list(&["-j"], &["table", "inet", DEFAULT_TABLE])
            .map(|text| serde_json::from_str(&text).unwrap())
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
}

const MARK: u32 = 0x1234;
const PORT: u16 = 15001;

/// Ids far above any real inode here, so nft prints them as numbers.
fn fake_id(n: u64) -> u64 {
    (1 << 40) + n
}

fn plan(cgroups: Vec<CgroupMatch>) -> TablePlan {
    TablePlan {
        table: DEFAULT_TABLE.into(),
        mark: MARK,
        port: PORT,
        cgroups,
        dns_servers: vec![
            "192.0.2.53".parse().unwrap(),
            "2001:db8::53".parse().unwrap(),
        ],
        bypass: vec![("198.51.100.0".parse().unwrap(), 24)],
        dns_port: None,
    }
}

/// The kinds of objects in `nft -j` output with their names, e.g. ("chain", "output").
fn objects(json: &serde_json::Value) -> Vec<(String, serde_json::Value)> {
    json["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|item| {
            let (kind, body) = item.as_object()?.iter().next()?;
            Some((kind.clone(), body.clone()))
        })
        .collect()
}

/// The agents set's members (nft -j prints cgroupsv2 ids as strings).
fn set_members(json: &serde_json::Value) -> Vec<u64> {
    let set = objects(json)
        .into_iter()
        .find(|(kind, body)| kind == "set" && body["name"] == AGENTS_SET)
        .map(|(_, body)| body)
        .unwrap();
    let mut ids: Vec<u64> = set["elem"]
        .as_array()
        .map(|elems| {
            elems
                .iter()
                .map(|e| e.as_str().unwrap().parse().unwrap())
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

fn rules_in(json: &serde_json::Value, chain: &str) -> Vec<serde_json::Value> {
    objects(json)
        .into_iter()
        .filter(|(kind, body)| kind == "rule" && body["chain"] == chain)
        .map(|(_, body)| body)
        .collect()
}

#[test]
fn install_builds_the_table_and_reinstall_replaces_it() {
    if !prerequisites() {
        return;
    }
    let ns = NetNs::new();
    let cgroups = vec![
        CgroupMatch {
            id: fake_id(1),
            level: 1,
        },
        CgroupMatch {
            id: fake_id(2),
            level: 3,
        },
    ];
    let took = ns.run(|| {
        let start = Instant::now();
        netfilter::install(&plan(cgroups.clone())).unwrap();
        start.elapsed()
    });
    eprintln!("install (one batch) took {took:?}");

    let text = ns.table().expect("table installed");
    println!("{text}");
    let json = ns.table_json().unwrap();
    let chains: Vec<_> = objects(&json)
        .into_iter()
        .filter(|(kind, _)| kind == "chain")
        .map(|(_, body)| body)
        .collect();
    let output = chains.iter().find(|c| c["name"] == "output").unwrap();
    assert_eq!(
        (output["type"].as_str(), output["hook"].as_str()),
        (Some("route"), Some("output"))
    );
    assert_eq!(output["prio"], -150);
    let prerouting = chains.iter().find(|c| c["name"] == "prerouting").unwrap();
    assert_eq!(
        (prerouting["type"].as_str(), prerouting["hook"].as_str()),
        (Some("filter"), Some("prerouting"))
    );
    assert_eq!(prerouting["prio"], -150);
    let sets: Vec<_> = objects(&json)
        .into_iter()
        .filter(|(kind, _)| kind == "set")
        .map(|(_, body)| body)
        .collect();
    let agents = sets.iter().find(|s| s["name"] == AGENTS_SET).unwrap();
    assert_eq!(agents["type"], "cgroupsv2");
    // Host-order ids shown as the numbers they are.
    assert_eq!(set_members(&json), [fake_id(1), fake_id(2)]);

    // Rule content, as nft reads it back from the kernel.
    for expected in [
        "ip daddr 127.0.0.0/8 meta l4proto != tcp accept",
        "ip daddr 127.0.0.0/8 tcp dport 53 accept",
        "ip daddr 127.0.0.0/8 ct direction reply accept",
        "ip6 daddr ::1 meta l4proto != tcp accept",
        "ip6 daddr ::1 tcp dport 53 accept",
        "ip6 daddr ::1 ct direction reply accept",
        "ip daddr 198.51.100.0/24 accept",
        "ip daddr 192.0.2.53 udp dport 53 accept",
        "ip daddr 192.0.2.53 tcp dport 53 accept",
        "ip6 daddr 2001:db8::53 udp dport 53 accept",
        "ip6 daddr 2001:db8::53 tcp dport 53 accept",
        "socket cgroupv2 level 1 @agents goto agent_traffic",
        "socket cgroupv2 level 3 @agents goto agent_traffic",
        "ct direction original ct mark 0x00001234 meta mark set 0x00001234 accept",
        "meta l4proto tcp meta mark set 0x00001234 ct mark set 0x00001234 accept",
        "meta mark 0x00001234 oif != \"lo\" counter packets 0 bytes 0 drop",
        "update @dropped_v4 { ip daddr . udp dport counter }",
        "update @dropped_v6 { ip6 daddr . udp dport counter }",
        "counter packets 0 bytes 0 drop",
        "meta l4proto tcp meta mark 0x00001234 socket transparent 1 accept",
        "meta l4proto tcp meta mark 0x00001234 tproxy to :15001 accept",
        "meta l4proto tcp meta mark 0x00001234 reject with tcp reset",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    assert_eq!(rules_in(&json, "output").len(), 1 + 6 + 1 + 4 + 2);
    assert_eq!(rules_in(&json, "prerouting").len(), 3);
    assert_eq!(rules_in(&json, "postrouting").len(), 1);

    // Again: replaced, not appended to.
    ns.run(|| netfilter::install(&plan(cgroups.clone())).unwrap());
    assert_eq!(ns.table().unwrap(), text);

    ns.run(|| netfilter::remove(DEFAULT_TABLE).unwrap());
    assert_eq!(ns.table(), None);
    ns.run(|| netfilter::remove(DEFAULT_TABLE).unwrap());
}

#[test]
fn cgroup_members_and_their_level_rules_follow_add_and_remove() {
    if !prerequisites() {
        return;
    }
    let ns = NetNs::new();
    let level_rules = |level: u32| {
        let needle = format!("socket cgroupv2 level {level} @agents");
        ns.table().unwrap().matches(&needle).count()
    };
    let members = || set_members(&ns.table_json().unwrap());
    let (a, b, c, d) = (fake_id(1), fake_id(2), fake_id(3), fake_id(4));
    let matches = |ids: [(u64, u32); 2]| ids.map(|(id, level)| CgroupMatch { id, level });

    ns.run(|| netfilter::install(&plan(vec![])).unwrap());
    assert_eq!(members(), Vec::<u64>::new());
    assert_eq!(level_rules(2), 0);

    ns.run(|| netfilter::add_cgroups(DEFAULT_TABLE, &matches([(a, 2), (b, 2)])).unwrap());
    assert_eq!(members(), [a, b]);
    assert_eq!(level_rules(2), 1);

    // An existing member and a new level: the level gets its one rule.
    ns.run(|| netfilter::add_cgroups(DEFAULT_TABLE, &matches([(a, 2), (c, 4)])).unwrap());
    assert_eq!(members(), [a, b, c]);
    assert_eq!((level_rules(2), level_rules(4)), (1, 1));

    // Removing a non-member (d) is no error.
    ns.run(|| {
        netfilter::remove_cgroups(DEFAULT_TABLE, &matches([(a, 2), (d, 2)])).unwrap();
        netfilter::remove_cgroups(DEFAULT_TABLE, &[]).unwrap();
    });
    assert_eq!(members(), [b, c]);
    assert_eq!(level_rules(2), 1);
}

#[test]
fn refused_batch_names_the_rule_and_changes_nothing() {
    if !prerequisites() {
        return;
    }
    let ns = NetNs::new();
    // The kernel's socket expression takes cgroup levels up to 255.
    let bad = plan(vec![
        CgroupMatch {
            id: fake_id(1),
            level: 1,
        },
        CgroupMatch {
            id: fake_id(2),
            level: 300,
        },
    ]);

    let err = ns.run(|| netfilter::install(&bad).unwrap_err());
    let text = err.to_string();
    eprintln!("refusal: {text}");
    assert!(
        matches!(
            err,
            NetfilterError::Refused {
                also_refused: 0,
                ..
            }
        ),
        "{err:?}"
    );
    // ERANGE on current kernels, EOPNOTSUPP on older ones.
    assert!(
        [Some(libc::ERANGE), Some(libc::EOPNOTSUPP)].contains(&err.errno()),
        "{text}"
    );
    assert!(
        text.starts_with(
            "kernel refused rule 'agents at cgroup level 300' in chain output at expression 1 (socket): "
        ),
        "{text}"
    );
    assert!(text.contains("modprobe nft_socket"), "{text}");
    assert!(text.ends_with("nothing was changed"), "{text}");
    assert_eq!(ns.table(), None, "a refused install left a table behind");

    // Over a working table, a refused install keeps the old table as it was.
    ns.run(|| {
        netfilter::install(&plan(vec![CgroupMatch {
            id: fake_id(7),
            level: 1,
        }]))
        .unwrap()
    });
    let before = ns.table().unwrap();
    ns.run(|| netfilter::install(&bad).unwrap_err());
    assert_eq!(ns.table().unwrap(), before);

    // Same for add_cgroups needing a level rule the kernel refuses.
    let err = ns.run(|| {
        netfilter::add_cgroups(
            DEFAULT_TABLE,
            &[CgroupMatch {
                id: fake_id(8),
                level: 256,
            }],
        )
        .unwrap_err()
    });
    assert!(err.to_string().contains("level 256"), "{err}");
    assert_eq!(ns.table().unwrap(), before);

    // A missing table is named.
    ns.run(|| netfilter::remove(DEFAULT_TABLE).unwrap());
    let err = ns.run(|| {
        netfilter::add_cgroups(DEFAULT_TABLE, &[CgroupMatch { id: 1, level: 1 }]).unwrap_err()
    });
    assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
    assert!(
        err.to_string().contains("the table name \"agent_egress\""),
        "{err}"
    );
}

/// Waits until the fd is readable; returns how long that took, None on timeout.
fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pollfd, 1, timeout.as_millis() as libc::c_int) };
    (n == 1).then(|| start.elapsed())
}

#[test]
fn monitor_reports_other_processes_deleting_our_table() {
    if !prerequisites() {
        return;
    }
    let ns = NetNs::new();
    ns.run(|| {
        let mut monitor = TableMonitor::new(DEFAULT_TABLE).unwrap();

        // Our own changes (re-installs included) are not reported.
        netfilter::install(&plan(vec![])).unwrap();
        netfilter::install(&plan(vec![])).unwrap();
        netfilter::add_cgroups(
            DEFAULT_TABLE,
            &[CgroupMatch {
                id: fake_id(1),
                level: 2,
            }],
        )
        .unwrap();
        netfilter::remove_cgroups(
            DEFAULT_TABLE,
            &[CgroupMatch {
                id: fake_id(1),
                level: 2,
            }],
        )
        .unwrap();
        assert!(!monitor.read_events().unwrap(), "own changes reported");

        // Someone deletes the table: an interactive nft already running (so its
        // start-up is not timed) gets the command.
        let mut nft = Command::new("ip")
            .args(["netns", "exec", &ns.name, "nft", "-i"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let mut stdin = nft.stdin.take().unwrap();
        let start = Instant::now();
        writeln!(stdin, "delete table inet {DEFAULT_TABLE}").unwrap();
        let seen = wait_readable(&monitor, Duration::from_secs(5)).expect("no notification");
        eprintln!("deletion seen {seen:?} after handing `delete table` to a running nft");
        assert!(start.elapsed() < Duration::from_secs(1));
        drop(stdin);
        assert!(nft.wait().unwrap().success());
        assert!(monitor.read_events().unwrap(), "deletion not reported");
        assert!(!monitor.read_events().unwrap(), "reported twice");

        // Someone flushes the whole ruleset.
        netfilter::install(&plan(vec![])).unwrap();
        assert!(!monitor.read_events().unwrap());
        let start = Instant::now();
        ns.nft(&["flush", "ruleset"]);
        assert!(wait_readable(&monitor, Duration::from_secs(5)).is_some());
        assert!(monitor.read_events().unwrap(), "flush not reported");
        eprintln!("flush reported {:?} after starting nft", start.elapsed());

        // Someone adds a rule to our chain (e.g. an accept in front of ours).
        netfilter::install(&plan(vec![])).unwrap();
        ns.nft(&["insert", "rule", "inet", DEFAULT_TABLE, "output", "accept"]);
        assert!(monitor.read_events().unwrap(), "foreign rule not reported");

        // Other tables are none of our business.
        ns.nft(&["add", "table", "inet", "other"]);
        ns.nft(&["delete", "table", "inet", "other"]);
        assert!(!monitor.read_events().unwrap(), "other table reported");
    });
}

#[test]
fn kernel_support_probe_passes_and_leaves_nothing_behind() {
    if !prerequisites() {
        return;
    }
    let ns = NetNs::new();
    let took = ns.run(|| {
        let mut monitor = TableMonitor::new("agent_egress_probe").unwrap();
        let start = Instant::now();
        netfilter::check_kernel_support().unwrap();
        let took = start.elapsed();
        assert!(
            wait_readable(&monitor, Duration::from_millis(100)).is_none()
                || !monitor.read_events().unwrap()
        );
        took
    });
    eprintln!("check_kernel_support took {took:?}");
    assert_eq!(ns.nft_list(&[], &["ruleset"]).unwrap().trim(), "");
}

#[test]
fn counters_start_at_zero() {
    if !prerequisites() {
        return;
    }
    let ns = NetNs::new();
    let counters = ns.run(|| {
        netfilter::install(&plan(vec![])).unwrap();
        netfilter::counters(DEFAULT_TABLE).unwrap()
    });
    assert_eq!(counters, netfilter::DropCounters::default());
    let err = ns.run(|| netfilter::counters("absent").unwrap_err());
    assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
}

/// A cgroup v2 directory of our own right under the cgroup2 root (level 1), removed on
/// drop.
struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    fn new() -> Option<Self> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let root = mountinfo.lines().find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            if fs.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            mount.split_whitespace().nth(4).map(PathBuf::from)
        })?;
        let path = root.join(format!("ae-nf-test-{}", std::process::id()));
        std::fs::create_dir(&path).ok()?;
        Some(TestCgroup { path })
    }

    fn member(&self) -> CgroupMatch {
        CgroupMatch {
            id: std::fs::metadata(&self.path).unwrap().ino(),
            level: 1,
        }
    }

    /// Runs `args` in the cgroup and in the namespace.
    fn run(&self, ns: &NetNs, args: &[&str]) -> Output {
        let procs = self.path.join("cgroup.procs");
        Command::new("sh")
            .args([
                "-c",
                r#"echo $$ > "$1" && shift && exec ip netns exec "$@""#,
                "sh",
            ])
            .arg(&procs)
            .arg(&ns.name)
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The last member may take a moment to leave after exiting.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove {}", self.path.display());
    }
}

/// A listener like the proxy's: IP_TRANSPARENT, in the caller's network namespace.
fn transparent_listener(addr: SocketAddr) -> TcpListener {
    let (family, level, option) = match addr {
        SocketAddr::V4(_) => (libc::AF_INET, libc::SOL_IP, libc::IP_TRANSPARENT),
        SocketAddr::V6(_) => (libc::AF_INET6, libc::SOL_IPV6, libc::IPV6_TRANSPARENT),
    };
    // SAFETY: plain socket calls on a fresh fd, checked at each step; TcpListener owns the
    // fd from the start; the sockaddr passed matches its length.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let listener = TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let rc = libc::setsockopt(
            fd,
            level,
            option,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "transparent: {}", std::io::Error::last_os_error());
        let rc = match addr {
            SocketAddr::V4(a) => {
                let sa = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*a.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                libc::bind(
                    fd,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of_val(&sa) as libc::socklen_t,
                )
            }
            SocketAddr::V6(a) => {
                let sa = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                libc::bind(
                    fd,
                    (&sa as *const libc::sockaddr_in6).cast(),
                    std::mem::size_of_val(&sa) as libc::socklen_t,
                )
            }
        };
        assert_eq!(rc, 0, "bind {addr}: {}", std::io::Error::last_os_error());
        assert_eq!(libc::listen(fd, 16), 0);
        listener
    }
}

/// Accepts one connection (within 10 s), answers it with the destination the client
/// dialled (the accepted socket's local address), returns that destination.
fn serve_one(listener: TcpListener) -> SocketAddr {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("no connection reached the proxy: {e}"),
        }
    };
    stream.set_nonblocking(false).unwrap();
    let original = stream.local_addr().unwrap();
    let mut request = [0u8; 1024];
    let _ = stream.read(&mut request).unwrap();
    let body = format!("proxied {original}");
    write!(
        stream,
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    original
}

#[test]
fn agents_tcp_reaches_the_proxy_and_their_other_traffic_is_dropped() {
    if !prerequisites_with(&["curl", "socat"]) {
        return;
    }
    let Some(cgroup) = TestCgroup::new() else {
        skip("cannot create a cgroup under the cgroup2 mount");
        return;
    };
    let ns = NetNs::new();
    // A way out that leads nowhere (a veth pair inside the namespace, nothing answering
    // on the far end), and the routing module's part: marked packets are delivered
    // locally.
    for args in [
        "link add veth0 type veth peer name veth1",
        "link set veth0 up",
        "link set veth1 up",
        "addr add 192.0.2.1/24 dev veth0",
        "addr add 2001:db8::1/64 dev veth0 nodad",
        "route add default dev veth0",
        "-6 route add default dev veth0",
        "rule add fwmark 0x1234 lookup 100",
        "-6 rule add fwmark 0x1234 lookup 100",
        "route add local 0.0.0.0/0 dev lo table 100",
        "-6 route add local ::/0 dev lo table 100",
    ] {
        ns.ip(&args.split(' ').collect::<Vec<_>>());
    }
    let mut agent_plan = plan(vec![cgroup.member()]);
    agent_plan.bypass.clear();
    ns.run(|| netfilter::install(&agent_plan).unwrap());

    for (target, proxy_addr) in [
        ("203.0.113.5:8080", format!("127.0.0.1:{PORT}")),
        ("[2001:db8:1::5]:8080", format!("[::1]:{PORT}")),
    ] {
        let listener = ns.run(|| transparent_listener(proxy_addr.parse().unwrap()));
        let url = format!("http://{target}/");
        let curl = ["curl", "-sS", "--max-time", "5", &url];

        // The agent's connection lands on the proxy, which sees where it was going.
        let proxy = std::thread::spawn(move || serve_one(listener));
        let out = cgroup.run(&ns, &curl);
        let target: SocketAddr = target.parse().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("proxied {target}"),
            "{out:?}"
        );
        assert_eq!(proxy.join().unwrap(), target);

        // The proxy is gone (listener closed): refused at once, not left hanging.
        let start = Instant::now();
        let out = cgroup.run(&ns, &curl);
        let refused_in = start.elapsed();
        eprintln!(
            "with no proxy, the agent's connection to {target} was refused in {refused_in:?}"
        );
        assert_eq!(out.status.code(), Some(7), "curl: {out:?}"); // could not connect
        assert!(refused_in < Duration::from_secs(2));

        // Not an agent: not intercepted. It goes out by veth0 and gets no answer.
        let out = ns.exec(&["curl", "-sS", "--max-time", "1", &url]);
        assert_eq!(out.status.code(), Some(28), "curl: {out:?}"); // timed out
    }

    // The agent's UDP: dropped and counted, except DNS to the resolver.
    cgroup.run(
        &ns,
        &[
            "sh",
            "-c",
            "echo x | socat -u - UDP-SENDTO:203.0.113.5:443; \
             echo x | socat -u - UDP6-SENDTO:[2001:db8:1::5]:443; \
             echo x | socat -u - UDP-SENDTO:192.0.2.53:53",
        ],
    );
    // The host's UDP is none of our business.
    let out = ns.exec(&["sh", "-c", "echo x | socat -u - UDP-SENDTO:203.0.113.6:443"]);
    assert!(out.status.success(), "{out:?}");

    let counters = ns.run(|| netfilter::counters(DEFAULT_TABLE).unwrap());
    // IP header + UDP header + "x\n": 20 + 8 + 2 and 40 + 8 + 2 bytes.
    assert_eq!((counters.packets, counters.bytes), (2, 80), "{counters:?}");
    let mut dropped: Vec<_> = counters
        .by_udp_destination
        .iter()
        .map(|d| (d.addr.to_string(), d.packets, d.bytes))
        .collect();
    dropped.sort();
    assert_eq!(
        dropped,
        [
            ("203.0.113.5:443".to_string(), 1, 30),
            ("[2001:db8:1::5]:443".to_string(), 1, 50)
        ]
    );
}

#[test]
fn largest_plan_installs_in_one_batch() {
    if !prerequisites() {
        return;
    }
    let ns = NetNs::new();
    let big = TablePlan {
        table: DEFAULT_TABLE.into(),
        mark: MARK,
        port: PORT,
        cgroups: (0..netfilter::MAX_CGROUPS as u64)
            .map(|n| CgroupMatch {
                id: fake_id(n),
                level: 1 + (n % 8) as u32,
            })
            .collect(),
        dns_servers: (0..netfilter::MAX_DNS_SERVERS as u8)
            .map(|n| std::net::IpAddr::from([192, 0, 2, n]))
            .collect(),
        bypass: (0..netfilter::MAX_BYPASS as u32)
            .map(|n| {
                (
                    std::net::IpAddr::from((0x0a00_0000 + (n << 8)).to_be_bytes()),
                    24,
                )
            })
            .collect(),
        dns_port: None,
    };
    let took = ns.run(|| {
        let start = Instant::now();
        netfilter::install(&big).unwrap();
        start.elapsed()
    });
    eprintln!(
        "install of {} cgroups, {} bypass networks, {} resolvers took {took:?}",
        big.cgroups.len(),
        big.bypass.len(),
        big.dns_servers.len()
    );
    let json = ns.table_json().unwrap();
    assert_eq!(set_members(&json).len(), netfilter::MAX_CGROUPS);
    assert_eq!(
        rules_in(&json, "output").len(),
        1 + 6 + netfilter::MAX_BYPASS + 2 * netfilter::MAX_DNS_SERVERS + 8
    );
}
