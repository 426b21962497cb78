//! Policy routing against the real kernel, inside network namespaces these tests create.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use agent_egress::routing::{self, RoutePlan, RoutingError, RuleMonitor};

const PLAN: RoutePlan = RoutePlan {
    mark: 0x1e9,
    table: 489,
    priority: 100,
};

/// Root and `ip` are needed; without them skip loudly, or fail under CI.
fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if root && ip {
        return true;
    }
    let why = format!("routing tests need root and iproute2 (root={root}, ip={ip})");
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("SKIPPING: {why}");
    false
}

/// A network namespace that exists for the life of the value.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ae-rt-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        run(&["ip", "netns", "add", &name]);
        let netns = Netns { name };
        netns.ip(&["link", "set", "lo", "up"]);
        netns
    }

    /// Run `ip ARGS` inside the namespace and return its stdout.
    fn ip(&self, args: &[&str]) -> String {
        let mut command = vec!["ip", "netns", "exec", &self.name, "ip"];
        command.extend_from_slice(args);
        run(&command)
    }

    /// Run `f` on a thread that has joined this namespace (other threads stay put).
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            join_netns(&path);
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn join_netns(path: &str) {
    let file = File::open(path).unwrap();
    // SAFETY: a valid namespace fd; only this thread changes namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

fn run(command: &[&str]) -> String {
    let output = Command::new(command[0])
        .args(&command[1..])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn count_lines(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

/// (v4 rules, v6 rules, v4 routes, v6 routes) of PLAN as `ip` lists them.
fn listed(netns: &Netns) -> (usize, usize, usize, usize) {
    let rule = "from all fwmark 0x1e9 lookup 489";
    let route = "local default dev lo";
    (
        count_lines(&netns.ip(&["rule"]), rule),
        count_lines(&netns.ip(&["-6", "rule"]), rule),
        count_lines(&netns.ip(&["route", "show", "table", "489"]), route),
        count_lines(&netns.ip(&["-6", "route", "show", "table", "489"]), route),
    )
}

#[test]
fn install_is_idempotent_and_remove_tolerates_absence() {
    if !can_run() {
        return;
    }
    let netns = Netns::new();
    assert!(!netns.enter(|| routing::is_installed(&PLAN).unwrap()));

    let took = netns.enter(|| {
        let started = Instant::now();
        routing::install(&PLAN).unwrap();
        let installed = started.elapsed();
        let started = Instant::now();
        assert!(routing::is_installed(&PLAN).unwrap());
        (installed, started.elapsed())
    });
    eprintln!(
        "install (2 routes + 2 rules) {:.2} ms, is_installed {:.2} ms",
        took.0.as_secs_f64() * 1e3,
        took.1.as_secs_f64() * 1e3
    );
    assert_eq!(listed(&netns), (1, 1, 1, 1));
    let rules = netns.ip(&["rule"]);
    assert!(
        rules.contains("100:\tfrom all fwmark 0x1e9 lookup 489"),
        "{rules}"
    );
    let routes = netns.ip(&["-6", "route", "show", "table", "489"]);
    assert!(routes.contains("local default dev lo"), "{routes}");
    assert!(netns.enter(|| routing::is_installed(&PLAN).unwrap()));

    netns.enter(|| routing::install(&PLAN).unwrap());
    assert_eq!(listed(&netns), (1, 1, 1, 1), "second install duplicated");

    netns.enter(|| routing::remove(&PLAN).unwrap());
    assert_eq!(listed(&netns), (0, 0, 0, 0));
    assert!(!netns.enter(|| routing::is_installed(&PLAN).unwrap()));
    netns.enter(|| routing::remove(&PLAN).unwrap());
}

#[test]
fn missing_half_is_noticed_and_reinstalled() {
    if !can_run() {
        return;
    }
    let netns = Netns::new();
    netns.enter(|| routing::install(&PLAN).unwrap());
    netns.ip(&[
        "-6", "route", "del", "local", "::/0", "dev", "lo", "table", "489",
    ]);
    assert!(!netns.enter(|| routing::is_installed(&PLAN).unwrap()));
    netns.enter(|| routing::install(&PLAN).unwrap());
    assert_eq!(listed(&netns), (1, 1, 1, 1));
    assert!(netns.enter(|| routing::is_installed(&PLAN).unwrap()));
}

#[test]
fn ipv6_disabled_on_lo_is_reported_distinctly() {
    if !can_run() {
        return;
    }
    let netns = Netns::new();
    run(&[
        "ip",
        "netns",
        "exec",
        &netns.name,
        "sysctl",
        "-qw",
        "net.ipv6.conf.lo.disable_ipv6=1",
    ]);
    let error = netns.enter(|| routing::install(&PLAN).unwrap_err());
    let text = error.to_string();
    assert!(
        matches!(error, RoutingError::Ipv6Unavailable { .. }),
        "{text}"
    );
    assert!(
        text.starts_with("replacing ip -6 route local ::/0 dev lo table 489:"),
        "{text}"
    );
    assert!(text.ends_with("(IPv6 disabled?)"), "{text}");
    eprintln!("IPv6 off reads: {text}");
    // IPv4 stays installed, and no IPv6 half is left behind.
    assert_eq!(listed(&netns), (1, 0, 1, 0));
    let checked = netns.enter(|| routing::is_installed(&PLAN));
    assert!(
        matches!(checked, Err(RoutingError::Ipv6Unavailable { .. })),
        "{checked:?}"
    );
    netns.enter(|| routing::remove(&PLAN).unwrap());
    assert_eq!(listed(&netns), (0, 0, 0, 0));
}

/// Wait for the monitor's fd, then ask whether ours was hit; returns (verdict, waited).
fn wait_for_event(monitor: &mut RuleMonitor, timeout: Duration) -> (bool, Duration) {
    let start = Instant::now();
    let mut poll_fd = libc::pollfd {
        fd: monitor.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let ready = unsafe { libc::poll(&mut poll_fd, 1, timeout.as_millis() as libc::c_int) };
    assert!(ready >= 0);
    (monitor.read_events().unwrap(), start.elapsed())
}

#[test]
fn monitor_reports_deletions_of_ours_only() {
    if !can_run() {
        return;
    }
    let netns = Netns::new();
    let path = format!("/run/netns/{}", netns.name);
    let (ready_tx, ready_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<Instant>();
    let watcher = std::thread::spawn(move || {
        join_netns(&path);
        routing::install(&PLAN).unwrap();
        let mut monitor = RuleMonitor::new(&PLAN).unwrap();
        let mut results = Vec::new();
        for _ in 0..4 {
            ready_tx.send(()).unwrap();
            let started = go_rx.recv().unwrap();
            let (ours, _) = wait_for_event(&mut monitor, Duration::from_secs(2));
            results.push((ours, started.elapsed()));
            // Let stragglers of the same change arrive, and put things back.
            std::thread::sleep(Duration::from_millis(20));
            monitor.read_events().unwrap();
            routing::install(&PLAN).unwrap();
            monitor.read_events().unwrap();
        }
        // Without a process to start: a deletion by another thread of this namespace.
        let remover_path = path.clone();
        let remover = std::thread::spawn(move || {
            join_netns(&remover_path);
            std::thread::sleep(Duration::from_millis(20));
            let started = Instant::now();
            routing::remove(&PLAN).unwrap();
            started
        });
        let (ours, _) = wait_for_event(&mut monitor, Duration::from_secs(2));
        let seen = Instant::now();
        let in_process = seen - remover.join().unwrap();
        assert!(ours);
        routing::install(&PLAN).unwrap();
        (results, in_process)
    });

    let steps: [&[&str]; 4] = [
        &[
            "rule", "add", "fwmark", "0x99", "lookup", "77", "pref", "200",
        ],
        &[
            "rule", "del", "fwmark", "0x1e9", "lookup", "489", "pref", "100",
        ],
        &["-6", "rule", "del", "pref", "100"],
        &["route", "flush", "table", "489"],
    ];
    for step in steps {
        ready_rx.recv().unwrap();
        let started = Instant::now();
        go_tx.send(started).unwrap();
        netns.ip(step);
    }
    let (results, in_process) = watcher.join().unwrap();
    eprintln!(
        "monitor noticed an in-process remove() {:.2} ms after it started",
        in_process.as_secs_f64() * 1e3
    );
    assert!(in_process < Duration::from_millis(500));
    let verdicts: Vec<bool> = results.iter().map(|(ours, _)| *ours).collect();
    assert_eq!(verdicts, [false, true, true, true]);
    for ((_, elapsed), step) in results.iter().zip(steps).skip(1) {
        eprintln!(
            "monitor noticed `ip {}` {:.1} ms after the command was started",
            step.join(" "),
            elapsed.as_secs_f64() * 1e3
        );
        assert!(*elapsed < Duration::from_millis(500));
    }
    assert!(netns.enter(|| routing::is_installed(&PLAN).unwrap()));
}

#[test]
fn invalid_plan_is_refused_before_touching_the_kernel() {
    let error = routing::install(&RoutePlan { mark: 0, ..PLAN }).unwrap_err();
    assert!(matches!(error, RoutingError::InvalidPlan(_)));
    assert!(error.to_string().contains("mark 0"), "{error}");
}
