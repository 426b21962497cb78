//! `agent-egress exec` end to end, inside a test world's agent netns (never
//! on the machine's own tables): set up, run, tear down, exit code, summary.

mod harness;

use harness::control::wait_until;
use harness::daemon::binary;
use harness::{TestHost, Tmux, World, BLOCKED};
use serde_json::Value;
use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
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

fn curl_args(world: &World, url: &str, ip: &str, max_time_s: u32) -> Vec<String> {
    let host = url.split('/').nth(2).unwrap_or_default();
    vec![
        "curl".into(),
        "-sS".into(),
        "--max-time".into(),
        max_time_s.to_string(),
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
    let allowed = curl_args(&world, "https://allowed.test/", "198.51.100.10", 5);
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
    let blocked = curl_args(&world, "https://blocked.test/", "198.51.100.20", 5);
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

/// A word for the shell, quoted.
fn quoted(word: &OsStr) -> String {
    format!("'{}'", word.to_string_lossy().replace('\'', r"'\''"))
}

/// `cmd` as one shell line, its environment given through `env` (a tmux
/// session's commands get the tmux server's environment, not ours).
fn shell_line(cmd: &Command) -> String {
    let mut words = vec!["env".to_string()];
    for (name, value) in cmd.get_envs() {
        if let Some(value) = value {
            let mut pair = name.to_os_string();
            pair.push("=");
            pair.push(value);
            words.push(quoted(&pair));
        }
    }
    words.push(quoted(cmd.get_program()));
    words.extend(cmd.get_args().map(quoted));
    words.join(" ")
}

/// The agent's curl to `host` as a shell command, slow to give up (20 s), so
/// that a refusal by key is seen to come at once.
fn curl_line(world: &World, host: &TestHost) -> String {
    let url = format!("https://{}/", host.name);
    let words = curl_args(world, &url, &host.v4.to_string(), 20);
    let words: Vec<String> = words.iter().map(|w| quoted(OsStr::new(w))).collect();
    words.join(" ")
}

/// `exec --ask ... -- sh -c SCRIPT` in a terminal: its screen, its audit
/// file, and the line it leaves when it ends (`EXIT=` its exit code).
struct AskRun {
    tmux: Tmux,
    audit: PathBuf,
}

impl AskRun {
    fn start(world: &World, name: &str, args: &[&str], script: &str) -> AskRun {
        let audit = world.dir().join(format!("{name}-audit.jsonl"));
        let audit_arg = audit.to_string_lossy().into_owned();
        let mut all = vec!["--ask", "--allow", "allowed.test", "--audit", &audit_arg];
        all.extend(args);
        let line = shell_line(&exec(world, &all, &["sh", "-c", script]));
        let tmux = Tmux::start(
            format!("ae-exec-{name}-{}", world.id()),
            &format!("{line}; echo EXIT=$?; sleep 600"),
        );
        AskRun { tmux, audit }
    }

    /// The screen's lines that ask (one per question shown).
    fn prompts(&self) -> Vec<String> {
        self.tmux
            .screen()
            .lines()
            .filter(|l| l.contains("agent-egress exec: question") && l.contains(" connects to "))
            .map(str::to_string)
            .collect()
    }

    /// Waits for the question's line, and returns it.
    fn question(&self) -> String {
        wait_until(
            "the question on the screen",
            Duration::from_secs(15),
            || !self.prompts().is_empty(),
        );
        self.prompts().remove(0)
    }

    /// Waits for exec to end; the screen then.
    fn finished(&self, limit: Duration) -> String {
        wait_until("exec to end", limit, || {
            self.tmux.screen().contains("EXIT=")
        });
        self.tmux.screen()
    }

    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The pid of the exec that wrote the records (its cgroup is named after it).
    fn exec_pid(&self) -> u32 {
        self.records()
            .iter()
            .find_map(|r| {
                r["agent"]
                    .as_str()?
                    .strip_prefix("agent-egress-exec-")?
                    .parse()
                    .ok()
            })
            .expect("a record naming exec's cgroup")
    }

    /// The connections' records (not the questions' or the policy's).
    fn connections(&self) -> Vec<Value> {
        self.records()
            .into_iter()
            .filter(|r| r["event"].is_null() || r["event"] == "end")
            .filter(|r| r["host"] == BLOCKED.name)
            .collect()
    }

    fn event(&self, event: &str) -> Value {
        self.records()
            .into_iter()
            .find(|r| r["event"] == event)
            .unwrap_or_else(|| panic!("no {event} record in {}", self.audit.display()))
    }
}

#[test]
fn exec_ask_lets_through_by_key_once_for_merged_connections_and_always() {
    if !harness::require_root_and_tools(&["curl", "ss", "tmux"]) {
        return;
    }
    let world = World::new();
    let curl = curl_line(&world, &BLOCKED);

    // Two connections to the same place at once: one question, one key for both.
    let run = AskRun::start(
        &world,
        "ask-once",
        &[],
        &format!("{curl} & p=$!; {curl}; b=$?; wait $p; echo \"curls=$?,$b\""),
    );
    let prompt = run.question();
    assert!(
        prompt.contains("/usr/bin/curl (pid ")
            && prompt.contains("connects to blocked.test:443 (rule default)")
            && prompt.contains("a allow-once, A allow-always, d deny-once, D deny-always"),
        "{prompt}"
    );
    // Both connected, so the second one's ClientHello is on its way to be
    // held and merged into the question shown; then the key.
    wait_until("both curls connected", Duration::from_secs(10), || {
        let out = world
            .host_cmd(["ss", "-Htn", "state", "established", "( dport = :443 )"])
            .output()
            .expect("ss");
        text(&out).0.lines().count() == 2
    });
    std::thread::sleep(Duration::from_millis(300));
    run.tmux.send_keys("a");
    let screen = run.finished(Duration::from_secs(15));
    assert!(screen.contains("curls=0,0"), "{screen}");
    assert_eq!(screen.matches(&BLOCKED.body()).count(), 2, "{screen}");
    assert!(screen.contains("question 1: allow-once"), "{screen}");
    assert_eq!(run.prompts().len(), 1, "one question for both: {screen}");
    let pid = run.exec_pid();
    // Audited as a daemon's answer is, the answerer being exec itself.
    let answered = run.event("question_answered");
    let q = &answered["question"];
    assert_eq!(
        (q["answer"].clone(), q["held"].clone()),
        (Value::from("allow-once"), Value::from(2)),
        "{answered}"
    );
    assert_eq!(q["by"]["uid"], 0, "{answered}");
    assert_eq!(q["by"]["pid"], pid, "{answered}");
    let connections = run.connections();
    assert_eq!(connections.len(), 2, "{connections:?}");
    for c in &connections {
        assert_eq!(c["verdict"], "allow", "{c}");
        assert_eq!(c["asked"]["answer"], "allow-once", "{c}");
        assert_eq!(c["asked"]["by"]["pid"], pid, "{c}");
    }
    assert_clean(&world, pid);

    // Allow-always: the next connection finds the rule and is not asked.
    let run = AskRun::start(
        &world,
        "ask-always",
        &[],
        &format!("{curl}; a=$?; {curl}; echo \"curls=$a,$?\""),
    );
    run.question();
    run.tmux.send_keys("A");
    let screen = run.finished(Duration::from_secs(15));
    assert!(screen.contains("curls=0,0"), "{screen}");
    assert!(screen.contains("question 1: allow-always"), "{screen}");
    assert_eq!(run.prompts().len(), 1, "asked once: {screen}");
    let pid = run.exec_pid();
    let policy = run.event("policy");
    assert_eq!(policy["policy"]["action"], "rule_added", "{policy}");
    assert_eq!(policy["policy"]["rule"]["name"], "asked-1", "{policy}");
    assert_eq!(
        (policy["uid"].clone(), policy["pid"].clone()),
        (Value::from(0), Value::from(pid)),
        "{policy}"
    );
    let rules: Vec<Value> = run
        .connections()
        .iter()
        .map(|c| c["rule"].clone())
        .collect();
    assert_eq!(rules, [Value::from("default"), Value::from("asked-1")]);
    assert_clean(&world, pid);
}

#[test]
fn exec_ask_refuses_by_key_at_once_and_falls_back_when_nobody_answers() {
    if !harness::require_root_and_tools(&["curl", "tmux"]) {
        return;
    }
    let world = World::new();
    let curl = curl_line(&world, &BLOCKED);
    let script = format!("{curl}; echo \"curl=$?\"");

    let run = AskRun::start(&world, "ask-deny", &[], &script);
    run.question();
    let pressed = Instant::now();
    run.tmux.send_keys("d");
    wait_until("curl to fail", Duration::from_secs(15), || {
        run.tmux.screen().contains("curl=")
    });
    let refused_in = pressed.elapsed();
    let screen = run.finished(Duration::from_secs(15));
    assert!(screen.contains("curl=35"), "a TLS alert: {screen}");
    assert!(
        refused_in < Duration::from_secs(3),
        "refused {refused_in:?} after the key (curl gives up after 20 s)"
    );
    assert!(screen.contains("question 1: deny-once"), "{screen}");
    let pid = run.exec_pid();
    let connections = run.connections();
    assert_eq!(connections.len(), 1, "{connections:?}");
    let error = connections[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with(&format!("denied by the supervisor (uid 0, pid {pid})")),
        "{}",
        connections[0]
    );
    assert_clean(&world, pid);

    // No key: the question times out on the screen, and the fallback refuses.
    let run = AskRun::start(
        &world,
        "ask-timeout",
        &["--ask-timeout-ms", "1500"],
        &script,
    );
    let prompt = run.question();
    assert!(prompt.contains("(no answer in 1500 ms: block)"), "{prompt}");
    let screen = run.finished(Duration::from_secs(15));
    assert!(screen.contains("question 1: timed out: block"), "{screen}");
    assert!(screen.contains("curl=35"), "{screen}");
    let connections = run.connections();
    assert_eq!(connections.len(), 1, "{connections:?}");
    assert_eq!(
        connections[0]["asked"]["answer"], "timed-out",
        "{}",
        connections[0]
    );
    assert_eq!(connections[0]["verdict"], "block", "{}", connections[0]);
    assert_clean(&world, run.exec_pid());
}

#[test]
fn exec_ask_without_a_terminal_fails_before_anything_runs() {
    if !harness::require_root_and_tools(&[]) {
        return;
    }
    let marker = Path::new("/tmp/agent-egress-exec-ask-ran-without-a-terminal");
    let mut cmd = Command::new(binary());
    cmd.args(["exec", "--ask", "--", "touch"])
        .arg(marker)
        .env("SUDO_UID", NOBODY.to_string())
        .env("SUDO_GID", NOBODY.to_string())
        .stdin(Stdio::null());
    // SAFETY: setsid(2) is async-signal-safe; a session of its own has no
    // controlling terminal, whatever the test runs in.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let (out, pid) = run(cmd);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(
        stderr.contains("--ask asks on this terminal, and /dev/tty cannot be opened"),
        "{stderr}"
    );
    assert!(!marker.exists(), "CMD ran");
    let root = harness::cgroup2_root().expect("cgroup2");
    assert!(!root.join(format!("agent-egress-exec-{pid}")).exists());

    // The timeout goes with --ask only.
    let out = Command::new(binary())
        .args(["exec", "--ask-timeout-ms", "1500", "--", "true"])
        .output()
        .expect("run exec");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out).1);
}
