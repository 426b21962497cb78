//! Smoke tests of the test harness itself: the world it builds behaves as
//! documented and leaves nothing behind.

mod harness;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use harness::{arrivals, World, ALLOWED, BLOCKED, FORBIDDEN_DNS_V4, METADATA, OTHER};

fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "command failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn timed_world() -> World {
    let started = Instant::now();
    let world = World::new();
    eprintln!(
        "world {} set up in {} ms",
        world.id(),
        started.elapsed().as_millis()
    );
    world
}

#[test]
fn hosts_answer_https_and_http_on_v4_and_v6() {
    if !harness::require_root_and_tools(&["curl"]) {
        return;
    }
    let world = timed_world();
    for host in [ALLOWED, BLOCKED, OTHER] {
        let url = format!("https://{}/", host.name);
        let v4 = world.curl_agent(["--resolve", &host.resolve_v4(443), &url]);
        assert_eq!(stdout(&v4), host.body(), "{url} over IPv4");
        let http = world.curl_agent([
            "--resolve",
            &host.resolve_v4(80),
            &format!("http://{}/x", host.name),
        ]);
        assert_eq!(stdout(&http), host.body(), "{} over plain HTTP", host.name);
        if host.v6.is_some() {
            let v6 = world.curl_agent(["--resolve", &host.resolve_v6(443), &url]);
            assert_eq!(stdout(&v6), host.body(), "{url} over IPv6");
        }
    }
    let metadata = world.curl_agent([format!("http://{}/latest/meta-data/", METADATA.v4)]);
    assert_eq!(stdout(&metadata), METADATA.body());

    // The body names the host whose address was reached, not the SNI: what a test of
    // "do not trust the SNI's IP" needs.
    let spoofed = world.curl_agent([
        "--resolve",
        &format!("allowed.test:443:{}", OTHER.v4),
        "https://allowed.test/",
    ]);
    assert_eq!(stdout(&spoofed), OTHER.body());

    let headers = world.curl_agent([
        "-D",
        "-",
        "-o",
        "/dev/null",
        "--resolve",
        &ALLOWED.resolve_v4(443),
        "https://allowed.test/",
    ]);
    assert!(
        stdout(&headers).contains("alt-svc: h3=\":443\""),
        "{}",
        stdout(&headers)
    );

    let log = world.access_log();
    assert!(
        log.contains("198.51.100.10:443 192.0.2.1 \"GET / HTTP/2.0\" host=allowed.test sni=allowed.test status=200"),
        "{log}"
    );
}

#[test]
fn dns_answers_test_names_through_the_agent_resolv_conf() {
    if !harness::require_root_and_tools(&["curl", "dig"]) {
        return;
    }
    let world = timed_world();
    let dig = |args: &[&str]| {
        stdout(
            &world
                .agent_cmd(["dig", "+tries=1", "+time=2"])
                .args(args)
                .output()
                .unwrap(),
        )
    };
    let dns_before = world.count_arrived(arrivals::DNS);

    assert_eq!(
        dig(&["+short", "allowed.test", "A"]).trim(),
        "198.51.100.10"
    );
    assert_eq!(
        dig(&["+short", "api.allowed.test", "AAAA"]).trim(),
        "2001:db8:100::10"
    );
    assert_eq!(dig(&["+short", "other.test", "A"]).trim(), "203.0.113.30");
    let no_v6 = dig(&["other.test", "AAAA"]);
    assert!(
        no_v6.contains("status: NOERROR") && no_v6.contains("ANSWER: 0"),
        "{no_v6}"
    );
    assert!(dig(&["example.com", "A"]).contains("status: NXDOMAIN"));
    assert!(world.count_arrived(arrivals::DNS) >= dns_before + 5);

    // curl resolves through glibc, the bind-mounted resolv.conf and dnsmasq.
    let via_dns = world.curl_agent(["https://allowed.test/"]);
    assert_eq!(stdout(&via_dns), ALLOWED.body());
    assert!(world
        .dns_log()
        .contains("query[A] allowed.test from 192.0.2.1"));

    assert_eq!(world.count_arrived(arrivals::FORBIDDEN_DNS), 0);
    let forbidden = dig(&[&format!("@{FORBIDDEN_DNS_V4}"), "+short", "blocked.test"]);
    assert_eq!(forbidden.trim(), "198.51.100.20");
    assert_eq!(world.count_arrived(arrivals::FORBIDDEN_DNS), 1);
}

#[test]
fn arrival_counters_count_packets_that_reach_the_internet() {
    if !harness::require_root_and_tools(&["socat", "bash"]) {
        return;
    }
    let world = timed_world();
    assert_eq!(world.count_arrived(arrivals::QUIC), 0);
    let udp_before = world.count_arrived(arrivals::UDP);
    let allowed_before = world.count_arrived(ALLOWED.counter);

    let socat = world
        .agent_cmd(["socat", "-u", "STDIN", &format!("UDP:{}:443", ALLOWED.v4)])
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(b"not really quic")?;
            child.wait()
        })
        .unwrap();
    assert!(socat.success());
    let bash = world
        .agent_cmd([
            "bash",
            "-c",
            &format!("echo quic >/dev/udp/{}/443", BLOCKED.v6.unwrap()),
        ])
        .status()
        .unwrap();
    assert!(bash.success());

    assert_eq!(world.count_arrived(arrivals::QUIC), 2);
    assert_eq!(world.count_arrived(arrivals::UDP), udp_before + 2);
    assert_eq!(world.count_arrived(ALLOWED.counter), allowed_before + 1);
    assert_eq!(world.count_arrived(BLOCKED.counter), 1);

    world.add_counter("udp_9", "udp dport 9");
    let status = world
        .agent_cmd(["bash", "-c", "echo x >/dev/udp/203.0.113.30/9"])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(world.count_arrived("udp_9"), 1);
    assert_eq!(world.count_arrived(OTHER.counter), 1);
}

#[test]
fn agent_cmd_runs_in_the_agent_cgroup_and_netns() {
    if !harness::require_root_and_tools(&[]) {
        return;
    }
    let world = timed_world();
    let agent = world.agent();
    assert_eq!(
        agent.relative_path(),
        format!("ae-test-{}/agent", world.id())
    );
    assert_eq!(
        agent.path(),
        harness::cgroup2_root().unwrap().join(agent.relative_path())
    );

    let cgroup = stdout(
        &world
            .agent_cmd(["cat", "/proc/self/cgroup"])
            .output()
            .unwrap(),
    );
    assert!(
        cgroup
            .lines()
            .any(|l| l == format!("0::/{}", agent.relative_path())),
        "{cgroup}"
    );
    let host = stdout(
        &world
            .host_cmd(["cat", "/proc/self/cgroup"])
            .output()
            .unwrap(),
    );
    assert!(
        !host.contains(world.id()),
        "host_cmd must not be in the agent cgroup: {host}"
    );

    let addrs = stdout(
        &world
            .agent_cmd(["ip", "-o", "addr", "show", "dev", "to-net"])
            .output()
            .unwrap(),
    );
    assert!(
        addrs.contains("192.0.2.1/24") && addrs.contains("2001:db8:1::1/64"),
        "{addrs}"
    );
    let dad = stdout(
        &world
            .host_cmd(["sysctl", "-n", "net.ipv6.conf.all.accept_dad"])
            .output()
            .unwrap(),
    );
    assert_eq!(dad.trim(), "0", "IPv6 DAD is off in the agent netns");
    let internet = stdout(
        &world
            .net_cmd(["ip", "-o", "addr", "show", "dev", "lo"])
            .output()
            .unwrap(),
    );
    assert!(
        internet.contains("198.51.100.10/32") && internet.contains("2001:db8:100::10/128"),
        "{internet}"
    );
    let routes = stdout(
        &world
            .host_cmd(["ip", "route", "get", "169.254.169.254"])
            .output()
            .unwrap(),
    );
    assert!(routes.contains("via 192.0.2.2 dev to-net"), "{routes}");

    let mut sleeper = world.agent_cmd(["sleep", "60"]).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    // spawn() returns before the wrapper shell has joined the cgroup.
    while !agent.pids().contains(&sleeper.id()) {
        assert!(
            Instant::now() < deadline,
            "{} never joined the agent cgroup",
            sleeper.id()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();

    let second = world.add_cgroup("second");
    let in_second = stdout(
        &world
            .cgroup_cmd(&second, ["cat", "/proc/self/cgroup"])
            .output()
            .unwrap(),
    );
    assert!(
        in_second.contains(&format!("/ae-test-{}/second", world.id())),
        "{in_second}"
    );

    let old_id = agent.id();
    agent.recreate().unwrap();
    assert_ne!(agent.id(), old_id, "a recreated cgroup gets a new id");
}

#[test]
fn files_download_whole_and_slowly() {
    if !harness::require_root_and_tools(&["curl"]) {
        return;
    }
    let world = timed_world();
    let big = world.make_file("big.bin", 3 * 1024 * 1024 + 5);
    assert_eq!(
        big,
        world.make_file("big.bin", 3 * 1024 * 1024 + 5),
        "deterministic"
    );
    let url = format!("https://allowed.test{}", big.big_path);
    let download = world.curl_agent(["--resolve", &ALLOWED.resolve_v4(443), &url]);
    assert_eq!(download.stdout.len() as u64, big.size);
    assert_eq!(
        harness::sha256_bytes(&stdout_bytes(&download)).unwrap(),
        big.sha256
    );

    let small = world.make_file("small.bin", 24 * 1024);
    let started = Instant::now();
    let slow_url = format!("http://other.test{}?rate=8k", small.slow_path);
    let slow = world.curl_agent(["--resolve", &OTHER.resolve_v4(80), &slow_url]);
    let took = started.elapsed();
    assert_eq!(
        harness::sha256_bytes(&stdout_bytes(&slow)).unwrap(),
        small.sha256
    );
    assert!(
        took >= Duration::from_millis(1500),
        "24 KiB at 8 KiB/s took only {took:?}"
    );
}

fn stdout_bytes(output: &std::process::Output) -> Vec<u8> {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout.clone()
}

#[test]
fn in_process_code_and_spawned_processes_use_their_netns() {
    if !harness::require_root_and_tools(&["socat"]) {
        return;
    }
    let world = timed_world();
    let reply = harness::in_netns(&world.agent_ns(), || {
        let mut conn = TcpStream::connect((ALLOWED.v4, 80)).unwrap();
        conn.write_all(b"GET / HTTP/1.0\r\nHost: allowed.test\r\n\r\n")
            .unwrap();
        let mut reply = String::new();
        conn.read_to_string(&mut reply).unwrap();
        reply
    });
    assert!(reply.ends_with(&ALLOWED.body()), "{reply}");

    let config = world.write_config(serde_json::json!({ "default": "direct" }));
    let parsed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    assert_eq!(parsed["default"], "direct");

    let upstream = world.spawn(
        "socat",
        world.net_cmd([
            "socat",
            "TCP-LISTEN:8080,bind=198.51.100.20,fork",
            "SYSTEM:echo upstream",
        ]),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    let greeting = loop {
        let out = world
            .agent_cmd(["socat", "-u", "TCP:198.51.100.20:8080", "STDOUT"])
            .output()
            .unwrap();
        if out.status.success() || Instant::now() >= deadline {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(greeting, "upstream\n", "log: {}", upstream.log());

    let daemon = world.spawn_host(["sh", "-c", "echo started; exec sleep 60"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !daemon.log().contains("started") {
        assert!(Instant::now() < deadline, "no output from the host process");
        std::thread::sleep(Duration::from_millis(10));
    }
    let netns = std::fs::read_link(format!("/proc/{}/ns/net", daemon.pid())).unwrap();
    let agent_ns = stdout(
        &world
            .host_cmd(["readlink", "/proc/self/ns/net"])
            .output()
            .unwrap(),
    );
    assert_eq!(netns.to_string_lossy(), agent_ns.trim());
    let (status, in_time) = daemon.stop(Duration::from_secs(2));
    assert!(in_time && !status.success(), "SIGTERM ends it: {status}");
}

#[test]
fn teardown_removes_everything_even_when_a_test_panics() {
    if !harness::require_root_and_tools(&[]) {
        return;
    }
    let world = timed_world();
    let id = world.id().to_owned();
    // Left running on purpose: the world must kill them.
    let mut agent_process = world.agent_cmd(["sleep", "600"]).spawn().unwrap();
    let mut host_process = world.host_cmd(["sleep", "600"]).spawn().unwrap();
    let started = Instant::now();
    drop(world);
    eprintln!(
        "world {id} torn down in {} ms",
        started.elapsed().as_millis()
    );
    assert!(
        agent_process.try_wait().unwrap().is_some(),
        "agent process killed"
    );
    assert!(
        host_process.try_wait().unwrap().is_some(),
        "host process killed"
    );
    harness::assert_world_gone(&id);

    let (id_tx, id_rx) = std::sync::mpsc::channel();
    let panicked = std::panic::catch_unwind(move || {
        let world = World::new();
        id_tx.send(world.id().to_owned()).unwrap();
        panic!("a failing test");
    });
    assert!(panicked.is_err());
    harness::assert_world_gone(&id_rx.recv().unwrap());
    harness::assert_no_leftovers();
}

#[test]
fn worlds_side_by_side_are_independent() {
    if !harness::require_root_and_tools(&["curl"]) {
        return;
    }
    let (first, second) = std::thread::scope(|s| {
        let first = s.spawn(timed_world);
        let second = s.spawn(timed_world);
        (first.join().unwrap(), second.join().unwrap())
    });
    assert_ne!(first.agent_ns(), second.agent_ns());
    assert_ne!(first.agent().id(), second.agent().id());
    for world in [&first, &second] {
        let out = world.curl_agent([
            "--resolve",
            &ALLOWED.resolve_v4(443),
            "https://allowed.test/",
        ]);
        assert_eq!(stdout(&out), ALLOWED.body());
    }
    assert_eq!(
        second.count_arrived(arrivals::TCP_SYN),
        1,
        "one connection per world"
    );
}

#[test]
fn chromium_trusts_the_test_server() {
    if !harness::require_root_and_tools(&["chromium", "timeout", "certutil"]) {
        return;
    }
    let world = timed_world();
    let started = Instant::now();
    let output = world
        .chromium_agent(["--dump-dom", "https://allowed.test/"])
        .arg(format!(
            "--host-resolver-rules=MAP allowed.test {}",
            ALLOWED.v4
        ))
        .stderr(Stdio::null())
        .output()
        .unwrap();
    eprintln!(
        "chromium fetched the page in {} ms",
        started.elapsed().as_millis()
    );
    assert!(stdout(&output).contains("hello from allowed.test"));
}
