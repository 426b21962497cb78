//! `agent-egress exec -- CMD`: one command under control on any distro.
//!
//! A fresh cgroup, kernel state under names no daemon or other `exec` uses,
//! the proxy in this process, CMD started inside the cgroup, and everything
//! torn down when CMD ends (or is killed, or we are interrupted). With
//! `--ask`, what the policy does not allow is asked on exec's own terminal
//! (`ask::tty`) instead of refused.

use crate::ask::tty::{self, Prompter};
use crate::audit::{AuditError, AuditLog, Sink};
use crate::capture::CaptureError;
use crate::cgroup::{self, CgroupError};
use crate::config::{Answerer, Config, ConfigErrors, DomainPattern, Outbound, PatternError, Rule};
use crate::confine::{self, ConfineError, RunAs};
use crate::control::state::{sha256_hex, LoadedConfig};
use crate::presets;
use crate::proxy::{Proxy, Runtime};
use crate::startup::{start_audit, start_capture, stop_audit};
use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM};
use signal_hook::iterator::Signals;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// How `exec` was asked to run CMD.
pub struct Options {
    /// A JSON config whose rules, outbounds and limits apply (its table,
    /// marks, port and cgroups are replaced by this run's own).
    pub config: Option<PathBuf>,
    /// Allow this domain pattern (repeatable): `example.com`, `=example.com`, `*.example.com`.
    pub allow: Vec<String>,
    /// Allow a preset's domains (repeatable); `--preset list` names them.
    pub presets: Vec<String>,
    /// Write audit records (JSON lines) to this file instead of standard error.
    pub audit: Option<PathBuf>,
    /// Record what the policy would do but let everything through.
    pub audit_only: bool,
    /// Run CMD as this user (default: the one who ran sudo or pkexec).
    pub user: Option<String>,
    /// Run CMD as root, which can undo the capture.
    pub as_root: bool,
    /// Leave systemd's and D-Bus's sockets visible to CMD (through them it can
    /// start processes outside its cgroup).
    pub allow_bus: bool,
    /// Ask on this terminal, instead of refusing, what the policy does not
    /// allow (and answer the config's `ask` rules there).
    pub ask: bool,
    /// With `ask`: how long a question waits for a key (else the config's
    /// `ask.timeout_ms`).
    pub ask_timeout_ms: Option<u64>,
    /// The command and its arguments (none with `--preset list`).
    pub command: Vec<String>,
}

/// Why CMD could not be run under control.
#[derive(Debug)]
pub enum ExecError {
    ReadStatus(io::Error),
    /// Without CAP_NET_ADMIN every step would fail with its own EPERM.
    NeedsRoot,
    Config {
        path: PathBuf,
        errors: ConfigErrors,
    },
    Allow {
        index: usize,
        error: PatternError,
    },
    NoPreset(String),
    Preset {
        name: String,
        error: PatternError,
    },
    /// `--allow` needs the "direct" outbound, which the config took away.
    NoDirect,
    /// `--ask` needs the "ask" outbound, which the config took away.
    NoAsk,
    /// `--ask` asks on the terminal, and there is none.
    NoTerminal(io::Error),
    Prompter(io::Error),
    Confine(ConfineError),
    Signals(io::Error),
    Cgroup(CgroupError),
    Audit(AuditError),
    FreePort(io::Error),
    Proxy(io::Error),
    Capture(CaptureError),
    Spawn {
        program: String,
        source: io::Error,
    },
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExecError::ReadStatus(e) => write!(f, "cannot read /proc/self/status: {e}"),
            ExecError::NeedsRoot => write!(
                f,
                "needs root (run it with sudo): CAP_NET_ADMIN for its nftables table, policy \
                 routing and transparent listener, write access to the cgroup tree for CMD's \
                 cgroup, and CAP_BPF for the connect log that names CMD's processes"
            ),
            ExecError::Config { path, errors } => write!(f, "{}:\n{errors}", path.display()),
            ExecError::Allow { index, error } => write!(f, "--allow[{index}]: {error}"),
            ExecError::NoPreset(name) => {
                write!(f, "no preset named {name:?} (`--preset list` names them)")
            }
            ExecError::Preset { name, error } => write!(f, "preset {name}: {error}"),
            ExecError::NoDirect => write!(
                f,
                "the config redefines away the \"direct\" outbound that --allow uses"
            ),
            ExecError::NoAsk => write!(
                f,
                "the config redefines away the \"ask\" outbound that --ask uses"
            ),
            ExecError::NoTerminal(e) => write!(
                f,
                "--ask asks on this terminal, and /dev/tty cannot be opened ({e}): run exec from \
                 a terminal, or without --ask"
            ),
            ExecError::Prompter(e) => write!(f, "cannot ask on the terminal: {e}"),
            ExecError::Confine(e) => write!(f, "{e}"),
            ExecError::Signals(e) => write!(f, "cannot handle signals: {e}"),
            ExecError::Cgroup(e) => write!(f, "{e}"),
            ExecError::Audit(e) => write!(f, "audit: {e}"),
            ExecError::FreePort(e) => write!(f, "cannot find a free port: {e}"),
            ExecError::Proxy(e) => write!(f, "cannot start the proxy: {e}"),
            ExecError::Capture(e) => write!(f, "{e}"),
            ExecError::Spawn { program, source } => write!(f, "cannot run {program:?}: {source}"),
        }
    }
}

impl std::error::Error for ExecError {}

/// Exit code when we fail before CMD runs (like `env` and `timeout`).
const SETUP_FAILED: i32 = 125;
/// Exit code of a command line without CMD, as clap's for other usage errors.
const USAGE: i32 = 2;
/// `CAP_NET_ADMIN`: nftables, policy routing, IP_TRANSPARENT.
const CAP_NET_ADMIN: u32 = 12;

/// Whether this process may set up the capture, before anything is touched:
/// without it every step would fail with its own EPERM.
fn may_capture() -> Result<(), ExecError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(ExecError::ReadStatus)?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    if effective & (1 << CAP_NET_ADMIN) == 0 {
        return Err(ExecError::NeedsRoot);
    }
    Ok(())
}

pub fn exec(args: Options) -> i32 {
    if args.presets.iter().any(|p| p == "list") {
        for (name, preset) in presets::all() {
            println!("{name:20} {}", preset.description);
        }
        return 0;
    }
    if args.command.is_empty() {
        eprintln!("agent-egress exec: no CMD: give it after `--`, e.g. `agent-egress exec --allow example.com -- curl https://example.com`");
        return USAGE;
    }
    let prepared = may_capture()
        .and_then(|()| {
            confine::run_as(args.user.as_deref(), args.as_root).map_err(ExecError::Confine)
        })
        .and_then(|run_as| Ok((run_as, exec_config(&args)?)))
        .and_then(|(run_as, loaded)| {
            let tty = args
                .ask
                .then(tty::open)
                .transpose()
                .map_err(ExecError::NoTerminal)?;
            Ok((run_as, loaded, tty))
        });
    let (run_as, loaded, tty) = match prepared {
        Ok(p) => p,
        Err(e) => {
            eprintln!("agent-egress exec: {e}");
            return SETUP_FAILED;
        }
    };
    if run_as == RunAs::Root {
        eprintln!(
            "agent-egress exec: CMD runs as root (--as-root): it can delete the capture's table \
             and routes, or leave its cgroup, and then reach the network unchecked"
        );
    }
    match run(&args, loaded, &run_as, tty) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("agent-egress exec: {e}");
            SETUP_FAILED
        }
    }
}

/// The policy: the given config (or block-all), plus --allow and --preset,
/// and with --ask what it refuses by default asked instead; the hash is the
/// config file's (of nothing without one).
fn exec_config(args: &Options) -> Result<LoadedConfig, ExecError> {
    let answerer = if args.ask {
        Answerer::Terminal
    } else {
        Answerer::Nobody
    };
    let LoadedConfig { mut config, hash } = match &args.config {
        Some(path) => {
            LoadedConfig::load_for(path, answerer).map_err(|errors| ExecError::Config {
                path: path.clone(),
                errors,
            })?
        }
        None => LoadedConfig {
            config: Config::default(),
            hash: sha256_hex(b""),
        },
    };
    let mut domains = Vec::new();
    for (i, d) in args.allow.iter().enumerate() {
        domains
            .push(DomainPattern::parse(d).map_err(|error| ExecError::Allow { index: i, error })?);
    }
    for name in &args.presets {
        let preset = presets::get(name).ok_or_else(|| ExecError::NoPreset(name.clone()))?;
        for d in &preset.domains {
            domains.push(DomainPattern::parse(d).map_err(|error| ExecError::Preset {
                name: name.clone(),
                error,
            })?);
        }
    }
    if !domains.is_empty() {
        // Ahead of the config's own rules: the command line is the user's latest word.
        config.rules.insert(
            0,
            Rule {
                name: "--allow".into(),
                domains,
                ips: Vec::new(),
                ports: Vec::new(),
                agents: Vec::new(),
                process: Default::default(),
                outbound: "direct".into(),
                locked: false,
            },
        );
        if !config.outbounds.contains_key("direct") {
            return Err(ExecError::NoDirect);
        }
    }
    if args.ask {
        if config.outbounds.get("ask") != Some(&Outbound::Ask) {
            return Err(ExecError::NoAsk);
        }
        if config.outbounds.get(&config.default) == Some(&Outbound::Block) {
            config.default = "ask".into();
        }
        if let Some(ms) = args.ask_timeout_ms {
            config.ask.timeout_ms = ms;
        }
    }
    if config.dns.servers.is_empty() {
        config.dns.servers = system_resolvers();
    }
    if args.audit_only {
        config.mode = crate::config::Mode::Audit;
    }
    // This run's own names: nothing a daemon or another exec uses.
    let id = std::process::id();
    let ic = &mut config.interception;
    ic.manage_kernel = true;
    ic.table = format!("agent_egress_exec_{id}");
    ic.mark = 0x0ae1_0000 | (id & 0xffff);
    ic.route_table = 0x0ae1_0000 | (id & 0xffff);
    ic.rule_priority = 2786;
    ic.cgroups = vec![format!("agent-egress-exec-{id}")];
    config.listen.workers = 1;
    config.audit.path = args.audit.clone();
    Ok(LoadedConfig { config, hash })
}

/// The nameservers of /etc/resolv.conf: the agent resolves through them, so
/// they are what it may reach and what we resolve with.
fn system_resolvers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

fn run(
    args: &Options,
    loaded: LoadedConfig,
    run_as: &RunAs,
    tty: Option<File>,
) -> Result<i32, ExecError> {
    let LoadedConfig { mut config, hash } = loaded;
    // Taken before any thread starts, so the helper threads never get them.
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT]).map_err(ExecError::Signals)?;
    let root = cgroup::cgroup2_root().map_err(ExecError::Cgroup)?;
    let cgroup_path = config.interception.cgroups[0].clone();
    let sink = match &config.audit.path {
        Some(p) => Sink::File(p.clone()),
        None => Sink::Stderr,
    };
    let (audit, audit_thread) = start_audit(sink, &config).map_err(ExecError::Audit)?;
    let proxy = start_proxy_on_free_port(&mut config, audit.clone())?;
    let prompter = match tty {
        // The policy as the proxy runs it (its port too), for always answers.
        Some(tty) => Some(
            Prompter::start(
                tty,
                LoadedConfig {
                    config: config.clone(),
                    hash,
                },
                proxy.handle(),
                &audit,
            )
            .map_err(ExecError::Prompter)?,
        ),
        None => None,
    };
    let runtime = proxy.shared().runtime();
    proxy.shared().enable_summary();
    let teardown = Teardown {
        root: root.clone(),
        cgroup: cgroup_path.clone(),
    };
    cgroup::create(&root, &cgroup_path).map_err(ExecError::Cgroup)?;
    let capture = match start_capture(&runtime.config, &proxy, &audit) {
        Ok(c) => c,
        Err(e) => {
            teardown.remove_cgroup();
            return Err(ExecError::Capture(e));
        }
    };
    let mut command = Command::new(&args.command[0]);
    command.args(&args.command[1..]);
    let hidden = confine::hidden_sockets(run_as, args.allow_bus);
    let child = cgroup::command_in_cgroup(&mut command, &root, &cgroup_path)
        .map_err(ExecError::Cgroup)
        .and_then(|()| confine::confine(&mut command, run_as, &hidden).map_err(ExecError::Confine))
        .and_then(|()| {
            command.spawn().map_err(|source| ExecError::Spawn {
                program: args.command[0].clone(),
                source,
            })
        });
    let code = match child {
        Ok(mut child) => wait_for(&mut child, &mut signals, &teardown),
        Err(e) => {
            eprintln!("agent-egress exec: {e}");
            SETUP_FAILED
        }
    };
    // The command is gone: so is every process it left in its cgroup.
    teardown.remove_cgroup();
    capture.remove();
    if let Some(p) = prompter {
        p.stop();
    }
    let summary = proxy.shared().summary();
    proxy.stop();
    stop_audit(audit_thread);
    eprint!("{}", summary.render());
    Ok(code)
}

/// The proxy on a port nobody uses; the port goes into the config the
/// kernel rules are made from.
fn start_proxy_on_free_port(config: &mut Config, audit: AuditLog) -> Result<Proxy, ExecError> {
    const ATTEMPTS: usize = 8;
    let mut attempt = 1;
    loop {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").map_err(ExecError::FreePort)?;
        config.listen.port = probe.local_addr().map_err(ExecError::FreePort)?.port();
        drop(probe);
        match Proxy::start(Runtime::new(config.clone()), audit.clone()) {
            Ok(p) => return Ok(p),
            Err(e) if attempt == ATTEMPTS => return Err(ExecError::Proxy(e)),
            Err(_) => attempt += 1,
        }
    }
}

/// Wait for CMD; on a signal, pass it on (Ctrl-C reaches CMD from the
/// terminal anyway), and on a second one kill the cgroup.
fn wait_for(child: &mut std::process::Child, signals: &mut Signals, teardown: &Teardown) -> i32 {
    let mut interrupted = 0;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return exit_code(status),
            Ok(None) => {}
            Err(e) => {
                eprintln!("agent-egress exec: waiting for the command: {e}");
                teardown.kill_all();
                return SETUP_FAILED;
            }
        }
        for signal in signals.pending() {
            interrupted += 1;
            if interrupted > 1 || signal == SIGQUIT {
                teardown.kill_all();
            } else {
                // SAFETY: kill(2) on our own child's pid.
                unsafe { libc::kill(child.id() as i32, signal) };
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

struct Teardown {
    root: PathBuf,
    cgroup: String,
}

impl Teardown {
    /// Kill every process of the command (removing the cgroup does that).
    fn kill_all(&self) {
        self.remove_cgroup();
    }

    fn remove_cgroup(&self) {
        if let Err(e) = cgroup::remove(&self.root, &self.cgroup) {
            eprintln!(
                "agent-egress exec: cannot remove cgroup {}: {e}",
                Path::new(&self.cgroup).display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(config: Option<PathBuf>, ask: bool, ask_timeout_ms: Option<u64>) -> Options {
        Options {
            config,
            allow: vec!["allowed.test".into()],
            presets: Vec::new(),
            audit: None,
            audit_only: false,
            user: None,
            as_root: false,
            allow_bus: false,
            ask,
            ask_timeout_ms,
            command: vec!["true".into()],
        }
    }

    /// A config file of its own per test, removed when dropped.
    struct ConfigFile(PathBuf);

    impl ConfigFile {
        fn new(json: &str) -> ConfigFile {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "agent-egress-exec-test-{}-{n}.json",
                std::process::id()
            ));
            std::fs::write(&path, json).expect("a temporary config");
            ConfigFile(path)
        }
    }

    impl Drop for ConfigFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn ask_asks_what_would_be_refused_by_default_and_keeps_what_is_allowed() {
        let plain = exec_config(&options(None, false, None)).unwrap().config;
        assert_eq!(plain.default, "block");
        let asking = exec_config(&options(None, true, None)).unwrap().config;
        assert_eq!(asking.default, "ask");
        assert_eq!(asking.ask.timeout_ms, Config::default().ask.timeout_ms);
        assert_eq!(asking.rules[0].name, "--allow", "--allow still allows");
        let short = exec_config(&options(None, true, Some(1500)))
            .unwrap()
            .config;
        assert_eq!(short.ask.timeout_ms, 1500);
    }

    #[test]
    fn a_config_that_asks_runs_only_with_ask_and_one_that_allows_by_default_keeps_it() {
        let asks = ConfigFile::new(
            r#"{"rules": [{"domains": ["blocked.test"], "outbound": "ask"}], "ask": {"timeout_ms": 9000}}"#,
        );
        let loaded = exec_config(&options(Some(asks.0.clone()), true, None)).unwrap();
        assert_eq!(loaded.config.ask.timeout_ms, 9000);
        assert_eq!(loaded.config.rules[1].outbound, "ask");
        let text = std::fs::read(&asks.0).unwrap();
        assert_eq!(loaded.hash, sha256_hex(&text), "the file's own hash");
        match exec_config(&options(Some(asks.0.clone()), false, None)) {
            Err(ExecError::Config { errors, .. }) => {
                assert!(errors.to_string().contains("only with --ask"), "{errors}")
            }
            other => panic!("a config that asks ran without --ask: {:?}", other.err()),
        }
        let open = ConfigFile::new(r#"{"default": "direct"}"#);
        let loaded = exec_config(&options(Some(open.0.clone()), true, None)).unwrap();
        assert_eq!(loaded.config.default, "direct");
        let no_ask = ConfigFile::new(r#"{"outbounds": {"ask": {"type": "block"}}}"#);
        assert!(matches!(
            exec_config(&options(Some(no_ask.0.clone()), true, None)),
            Err(ExecError::NoAsk)
        ));
    }
}
