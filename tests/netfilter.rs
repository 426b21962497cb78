//! The netfilter module against the running kernel: as root, each test in a network
//! namespace it creates (and deletes on drop, also when it fails). In-process code runs
//! in a thread that entered the namespace with setns(); `nft` and `ip` run through
//! `ip netns exec`.

use agent_egress::netfilter::{
    self, CgroupMatch, NetfilterError, TableMonitor, TablePlan, AGENTS_SET, DEFAULT_TABLE,
};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// True if the test can run; false (after saying so loudly) if it must be skipped.
/// With CI set, missing prerequisites fail the test instead.
fn prerequisites() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["nft", "ip"].iter().all(|tool| {
        Command::new(tool)
            .arg("-V")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    if root && tools {
        return true;
    }
    let why = format!("needs root (is root: {root}) and the nft and ip tools (found: {tools})");
    if std::env::var_os("CI").is_some() {
        panic!("{why}");
    }
    eprintln!("\n*** SKIPPED: {why} ***\n");
    false
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
        "ip daddr 127.0.0.0/8 accept",
        "ip6 daddr ::1 accept",
        "ip daddr 198.51.100.0/24 accept",
        "ip daddr 192.0.2.53 udp dport 53 accept",
        "ip daddr 192.0.2.53 tcp dport 53 accept",
        "ip6 daddr 2001:db8::53 udp dport 53 accept",
        "ip6 daddr 2001:db8::53 tcp dport 53 accept",
        "socket cgroupv2 level 1 @agents goto agent_traffic",
        "socket cgroupv2 level 3 @agents goto agent_traffic",
        "meta l4proto tcp meta mark set 0x00001234 accept",
        "update @dropped_v4 { ip daddr . udp dport counter }",
        "update @dropped_v6 { ip6 daddr . udp dport counter }",
        "counter packets 0 bytes 0 drop",
        "meta l4proto tcp meta mark 0x00001234 socket transparent 1 accept",
        "meta l4proto tcp meta mark 0x00001234 tproxy to :15001 accept",
        "meta l4proto tcp meta mark 0x00001234 reject with tcp reset",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    assert_eq!(rules_in(&json, "output").len(), 2 + 1 + 4 + 2);
    assert_eq!(rules_in(&json, "prerouting").len(), 3);

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

    ns.run(|| netfilter::install(&plan(vec![])).unwrap());
    assert_eq!(members(), Vec::<u64>::new());
    assert_eq!(level_rules(2), 0);

    ns.run(|| {
        netfilter::add_cgroups(
            DEFAULT_TABLE,
            &[
                CgroupMatch { id: a, level: 2 },
                CgroupMatch { id: b, level: 2 },
            ],
        )
        .unwrap()
    });
    assert_eq!(members(), [a, b]);
    assert_eq!(level_rules(2), 1);

    // An existing member and a new level: the level gets its one rule.
    ns.run(|| {
        netfilter::add_cgroups(
            DEFAULT_TABLE,
            &[
                CgroupMatch { id: a, level: 2 },
                CgroupMatch { id: c, level: 4 },
            ],
        )
        .unwrap()
    });
    assert_eq!(members(), [a, b, c]);
    assert_eq!((level_rules(2), level_rules(4)), (1, 1));

    // Removing a non-member (d) is no error.
    ns.run(|| {
        netfilter::remove_cgroups(
            DEFAULT_TABLE,
            &[
                CgroupMatch { id: a, level: 2 },
                CgroupMatch { id: d, level: 2 },
            ],
        )
        .unwrap();
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
        netfilter::add_cgroups(DEFAULT_TABLE, &[CgroupMatch { id: fake_id(1), level: 2 }])
            .unwrap();
        netfilter::remove_cgroups(DEFAULT_TABLE, &[CgroupMatch { id: fake_id(1), level: 2 }])
            .unwrap();
        assert!(!monitor.read_events().unwrap(), "own changes reported");

        // nft's own start-up time, for comparison.
        let start = Instant::now();
        let _ = ns.exec(&["nft", "list", "tables"]);
        let nft_runtime = start.elapsed();

        // Someone deletes the table.
        let start = Instant::now();
        let deleter = std::thread::scope(|s| {
            let deleter = s.spawn(|| ns.nft(&["delete", "table", "inet", DEFAULT_TABLE]));
            let seen = wait_readable(&monitor, Duration::from_secs(5)).expect("no notification");
            eprintln!(
                "deletion seen {seen:?} after starting `nft delete table` (a bare nft run takes {nft_runtime:?})"
            );
            deleter
                .join()
                .map(|()| start.elapsed())
        });
        assert!(deleter.is_ok());
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
