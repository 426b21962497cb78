//! `agent-egress exec` end to end, inside a test world's agent netns (never
//! on the machine's own tables): set up, run, tear down, exit code, summary.

mod harness;

use harness::daemon::binary;
use harness::World;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `exec` in the agent netns; the world's resolver for the proxy, and names
/// pinned for curl (the machine's resolv.conf is what `nsenter` leaves).
fn exec(world: &World, args: &[&str], cmd: &[&str]) -> Command {
    let config = world.write_config(r#"{"dns": {"servers": ["198.51.100.53"]}}"#);
    let mut c = world.host_cmd([binary(), "exec", "--config"]);
    c.arg(config).args(args).arg("--").args(cmd);
    // As `sudo agent-egress exec` by user nobody: CMD runs as nobody.
    c.env("SUDO_UID", NOBODY.to_string())
        .env("SUDO_GID", NOBODY.to_string());
    c
}

const NOBODY: u32 = 65534;

fn curl_args(world: &World, url: &str, ip: &str) -> Vec<String> {
    let host = url.split('/').nth(2).unwrap_or_default();
    vec![
        "curl".into(),
        "-sS".into(),
        "--max-time".into(),
        "5".into(),
        "--cacert".into(),
        world.ca_cert().to_string_lossy().into_owned(),
        "--resolve".into(),
        format!("{host}:443:{ip}"),
        url.into(),
    ]
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs an `exec` command to its end; its pid names its cgroup and table.
fn run(mut cmd: Command) -> (Output, u32) {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("exec");
    let pid = child.id();
    (child.wait_with_output().expect("exec"), pid)
}

/// Nothing of the exec with this pid is left in the agent netns or the
/// cgroup tree (other tests' execs may be running meanwhile).
fn assert_clean(world: &World, pid: u32) {
    let tables = world
        .host_cmd(["nft", "list", "tables"])
        .output()
        .expect("nft");
    assert!(
        !text(&tables).0.contains("agent_egress_exec"),
        "table left: {}",
        text(&tables).0
    );
    for family in ["-4", "-6"] {
        let rules = world.host_cmd(["ip", family, "rule"]).output().expect("ip");
        assert!(
            !text(&rules).0.contains("fwmark"),
            "ip rule left: {}",
            text(&rules).0
        );
    }
    let root = harness::cgroup2_root().expect("cgroup2");
    let left: Vec<_> = std::fs::read_dir(&root)
        .expect("cgroup root")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| *n == format!("agent-egress-exec-{pid}"))
        .collect();
    assert!(left.is_empty(), "cgroups left: {left:?}");
}

#[test]
fn exec_allows_blocks_summarises_and_cleans_up() {
    if !harness::require_root_and_tools(&["curl"]) {
        return;
    }
    let world = World::new();
    let audit = world.dir().join("exec-audit.jsonl");
    let audit_arg = audit.to_string_lossy().into_owned();
    let allowed = curl_args(&world, "https://allowed.test/", "198.51.100.10");
    let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
    let (out, pid) = run(exec(
        &world,
        &["--allow", "allowed.test", "--audit", &audit_arg],
        &allowed,
    ));
    let (stdout, stderr) = text(&out);
    eprintln!("exec printed:\n{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stdout, "hello from allowed.test\n");
    assert!(
        stderr.contains("allow") && stderr.contains("allowed.test"),
        "{stderr}"
    );
    let records = std::fs::read_to_string(&audit).expect("audit file");
    assert!(records.contains(r#""host":"allowed.test""#), "{records}");
    assert!(records.contains(r#""exe":"/usr/bin/curl""#), "{records}");
    assert!(records.contains(&format!(r#""uid":{NOBODY}"#)), "{records}");
    assert_clean(&world, pid);

    // Blocked: CMD's own exit code comes back (curl 35: TLS alert).
    let blocked = curl_args(&world, "https://blocked.test/", "198.51.100.20");
    let blocked: Vec<&str> = blocked.iter().map(String::as_str).collect();
    let (out, pid) = run(exec(&world, &["--allow", "allowed.test"], &blocked));
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(35), "{stderr}");
    assert!(
        stderr.contains("block") && stderr.contains("blocked.test"),
        "{stderr}"
    );
    assert_clean(&world, pid);
}

#[test]
fn exec_returns_the_signal_of_a_killed_command_and_cleans_up() {
    if !harness::require_root_and_tools(&["curl"]) {
        return;
    }
    let world = World::new();
    let (out, pid) = run(exec(&world, &[], &["sh", "-c", "kill -9 $$"]));
    assert_eq!(out.status.code(), Some(137), "{}", text(&out).1);
    assert_clean(&world, pid);
}

#[test]
fn exec_interrupted_tears_everything_down() {
    if !harness::require_root_and_tools(&["curl"]) {
        return;
    }
    let world = World::new();
    let mut child = exec(&world, &[], &["sleep", "30"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("exec");
    // Wait until the command runs in its cgroup, then Ctrl-C the exec.
    let started = Instant::now();
    let root = harness::cgroup2_root().expect("cgroup2");
    let cgroup = root.join(format!("agent-egress-exec-{}", child.id()));
    while !cgroup.join("cgroup.procs").exists()
        || std::fs::read_to_string(cgroup.join("cgroup.procs"))
            .unwrap_or_default()
            .trim()
            .is_empty()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "exec never ran its command"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait().expect("exec");
    assert_eq!(status.code(), Some(130));
    assert_clean(&world, child.id());
}

#[test]
fn preset_list_needs_no_cmd_and_a_user_without_root_is_told_what_it_needs() {
    if !harness::require_root_and_tools(&["setpriv"]) {
        return;
    }
    let out = Command::new(binary())
        .args(["exec", "--preset", "list"])
        .output()
        .expect("run exec");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.lines().any(|l| l.starts_with("npm ")), "{stdout}");

    let out = Command::new(binary())
        .args(["exec", "--allow", "example.com"])
        .output()
        .expect("run exec");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out).1.contains("no CMD"), "{}", text(&out).1);

    // As nobody: refused before anything is set up, and CMD never runs.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args([
            binary(),
            "exec",
            "--",
            "touch",
            "/tmp/agent-egress-exec-ran-as-nobody",
        ])
        .output()
        .expect("run setpriv");
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("needs root") && stderr.contains("CAP_NET_ADMIN"),
        "{stderr}"
    );
    assert!(!std::path::Path::new("/tmp/agent-egress-exec-ran-as-nobody").exists());
}

/// What CMD may do as the invoking user: no root, no capabilities, no way back
/// to root through a setuid program, no systemd or container-engine socket.
const PRIVILEGES_PROBE: &str = r#"
id -u; id -g
grep -E '^(CapEff|CapPrm|NoNewPrivs):' /proc/self/status
su -c true root </dev/null >/dev/null 2>&1; echo "su=$?"
python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1]); print("socket=reachable")
except OSError as e:
    print("socket=hidden", e.errno)
' "$0"
"#;

#[test]
fn cmd_runs_as_the_invoking_user_without_a_way_back_to_root() {
    if !harness::require_root_and_tools(&["python3", "su", "setpriv"]) {
        return;
    }
    let world = World::new();
    // A container engine's socket where exec looks for one; made here if the
    // machine has none, and removed after.
    let engine = std::path::Path::new("/run/docker.sock");
    let made = (!engine.exists()).then(|| {
        let listener =
            std::os::unix::net::UnixListener::bind(engine).expect("bind /run/docker.sock");
        std::fs::set_permissions(engine, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .expect("chmod");
        listener
    });
    // nscd's socket likewise: a name service that resolves outside the capture.
    let nscd = std::path::Path::new("/run/nscd/socket");
    let made_nscd_dir = !nscd.parent().is_some_and(|d| d.exists());
    if made_nscd_dir {
        std::fs::create_dir_all("/run/nscd").expect("mkdir /run/nscd");
    }
    let nscd_listener = (!nscd.exists()).then(|| {
        let listener = std::os::unix::net::UnixListener::bind(nscd).expect("bind nscd's socket");
        std::fs::set_permissions(nscd, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .expect("chmod");
        // Every glibc on the machine asks it now: hang up at once, so they
        // fall back to their own lookups instead of waiting on a silent nscd.
        let server = listener.try_clone().expect("clone the listener");
        std::thread::spawn(move || {
            for connection in server.incoming() {
                drop(connection);
            }
        });
        listener
    });
    let (nscd_out, _) = run(exec(
        &world,
        &[],
        &["sh", "-c", PRIVILEGES_PROBE, nscd.to_str().unwrap()],
    ));
    if nscd_listener.is_some() {
        let _ = std::fs::remove_file(nscd);
    }
    if made_nscd_dir {
        let _ = std::fs::remove_dir("/run/nscd");
    }
    assert!(
        text(&nscd_out).0.contains("socket=hidden"),
        "{}",
        text(&nscd_out).0
    );
    let (out, pid) = run(exec(
        &world,
        &[],
        &["sh", "-c", PRIVILEGES_PROBE, engine.to_str().unwrap()],
    ));
    // The same probe as root outside exec reaches the socket: the probe works.
    let control = Command::new("sh")
        .args(["-c", PRIVILEGES_PROBE, engine.to_str().unwrap()])
        .output()
        .expect("sh");
    if made.is_some() {
        let _ = std::fs::remove_file(engine);
    }
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[..2],
        [NOBODY.to_string(), NOBODY.to_string()],
        "{stdout}"
    );
    assert!(stdout.contains("CapEff:\t0000000000000000"), "{stdout}");
    assert!(stdout.contains("CapPrm:\t0000000000000000"), "{stdout}");
    assert!(stdout.contains("NoNewPrivs:\t1"), "{stdout}");
    assert!(!stdout.contains("su=0"), "su gave root back: {stdout}");
    assert!(stdout.contains("socket=hidden"), "{stdout}");
    assert!(
        text(&control).0.contains("socket=reachable"),
        "{}",
        text(&control).0
    );
    assert_clean(&world, pid);

    // Plain root without sudo must choose; --as-root says what it gives away.
    let mut plain = exec(&world, &[], &["true"]);
    plain.env_remove("SUDO_UID").env_remove("SUDO_GID");
    let (out, _) = run(plain);
    assert_eq!(out.status.code(), Some(125));
    assert!(text(&out).1.contains("--as-root"), "{}", text(&out).1);
    let mut as_root = exec(&world, &["--as-root"], &["id", "-u"]);
    as_root.env_remove("SUDO_UID");
    let (out, pid) = run(as_root);
    assert_eq!(text(&out).0, "0\n", "{}", text(&out).1);
    assert!(
        text(&out).1.contains("can delete the capture"),
        "{}",
        text(&out).1
    );
    assert_clean(&world, pid);
}
