//! Command-line interface: one binary, a subcommand per job.

use crate::audit::Verdict;
use crate::audit_log;
use crate::config::{Config, SecretFiles};
use crate::control::rules::RuleSet;
use crate::daemon;
use crate::doctor;
use crate::exec;
use crate::loopback::{self, Listener};
use crate::policy::{Process, Query};
use crate::procinfo::{Ancestor, ProcessInfo};
use crate::proxy::Runtime;
use crate::suggest;
use clap::{Args, Parser, Subcommand};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::SystemTime;

#[derive(Parser)]
#[command(
    name = "agent-egress",
    version,
    about = "Egress control for AI agents: capture an agent's connections, route them per domain, audit each one",
    long_about = None
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: install the kernel capture and serve the proxy.
    Run(RunArgs),
    /// Validate a config: exit 0, or print every error (with its JSON path) and exit 1.
    Check(CheckArgs),
    /// Say which rule and outbound a connection to HOST[:PORT] would get, and why.
    Explain(ExplainArgs),
    /// Run one command under control, with everything set up and torn down around it.
    Exec(ExecArgs),
    /// Remove the kernel state a daemon left behind (its lockdown).
    Down(ConfigArg),
    /// Show what is installed: table, agents set, rules, counters, listener.
    Status(StatusArgs),
    /// Test a running daemon: what status shows, and a probe in each agent
    /// cgroup whose TCP must reach the proxy and whose UDP must be dropped.
    Doctor(DoctorArgs),
    /// Learn a minimal allowlist per agent from audit records.
    Suggest(SuggestArgs),
    /// Print audit files as a table (rotated and gzip-compressed ones too).
    Log(LogArgs),
    /// Show a running daemon's live events as a table (or JSON lines).
    Watch(WatchArgs),
    /// Serve the control API as Model Context Protocol tools on standard
    /// input and output, for an AI supervisor.
    Mcp(McpArgs),
    /// Print the version.
    Version,
}

#[derive(Args)]
struct ConfigArg {
    /// The JSON config file.
    #[arg(long, short)]
    config: PathBuf,
}

#[derive(Args)]
struct CheckArgs {
    /// The JSON config file.
    #[arg(long, short)]
    config: PathBuf,
    /// Do not read the files that hold secrets (`password_file`), only check
    /// their paths: for checking where they are not present, such as a Nix build.
    #[arg(long)]
    no_secret_files: bool,
    /// Also check a runtime-rules state file against the config.
    #[arg(long)]
    state: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// The JSON config file.
    #[arg(long, short)]
    config: PathBuf,
    /// On a graceful stop, remove the kernel state instead of leaving the
    /// agents locked out.
    #[arg(long)]
    cleanup_on_exit: bool,
}

#[derive(Args)]
struct ExecArgs {
    /// A JSON config whose rules, outbounds and limits apply (its table,
    /// marks, port and cgroups are replaced by this run's own).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Allow this domain pattern (repeatable): `example.com`, `=example.com`, `*.example.com`.
    #[arg(long = "allow", value_name = "DOMAIN")]
    allow: Vec<String>,
    /// Allow a preset's domains (repeatable); `--preset list` names them.
    #[arg(long = "preset", value_name = "NAME")]
    presets: Vec<String>,
    /// Write audit records (JSON lines) to this file instead of standard error.
    #[arg(long)]
    audit: Option<PathBuf>,
    /// Record what the policy would do but let everything through.
    #[arg(long)]
    audit_only: bool,
    /// Run CMD as this user (default: the one who ran sudo or pkexec).
    #[arg(long, value_name = "NAME")]
    user: Option<String>,
    /// Run CMD as root, which can undo the capture.
    #[arg(long, conflicts_with = "user")]
    as_root: bool,
    /// Leave systemd's and D-Bus's sockets visible to CMD (through them it can
    /// start processes outside its cgroup).
    #[arg(long)]
    allow_bus: bool,
    /// Ask on this terminal, instead of refusing, for a connection the policy
    /// does not allow (and answer the config's `ask` rules there): a line
    /// names the process, host, port and rule, and a key answers (a
    /// allow-once, A allow-always, d deny-once, D deny-always; the always ones
    /// for the exact host, for the rest of this run). No key in time: the
    /// config's `ask.fallback` (block). Needs a terminal (/dev/tty).
    #[arg(long, conflicts_with = "audit_only")]
    ask: bool,
    /// With --ask: how long a question waits for a key [default: the config's
    /// `ask.timeout_ms`, 60000].
    #[arg(long, value_name = "MS", requires = "ask",
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    ask_timeout_ms: Option<u64>,
    /// The command and its arguments (none with `--preset list`).
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

#[derive(Args)]
struct ExplainArgs {
    /// The JSON config file.
    #[arg(long, short)]
    config: PathBuf,
    /// HOST or HOST:PORT (port 443 if omitted); HOST may be a name or an IP.
    target: String,
    /// The original destination IP, when HOST is a name (default: none known,
    /// so only domain, port and agent rules can match).
    #[arg(long)]
    ip: Option<IpAddr>,
    /// The agent (configured cgroup path) the connection comes from.
    #[arg(long)]
    agent: Option<String>,
    /// For a loopback address: the cgroup of the socket listening there
    /// (path relative to the cgroup2 root).
    #[arg(long)]
    listener: Option<String>,
    /// The connecting process's executable, for rules by `process`.
    #[arg(long, value_name = "EXE")]
    process: Option<String>,
    /// Its command name, for rules by `comm`.
    #[arg(long)]
    comm: Option<String>,
    /// Who owns its socket (a name in /etc/passwd, or a uid), for rules by `user`.
    #[arg(long)]
    user: Option<String>,
    /// The executable of an ancestor, nearest first (repeat for each), for
    /// rules by `ancestor`.
    #[arg(long, value_name = "EXE")]
    ancestor: Vec<String>,
    /// Its cgroup below the agent's (with --agent), for rules by `cgroup`.
    #[arg(long)]
    cgroup: Option<String>,
    /// The runtime-rules state file (default: the one in the config's
    /// `state_dir` when `control.enable`, as the daemon reads it).
    #[arg(long)]
    state: Option<PathBuf>,
}

#[derive(Args)]
struct DoctorArgs {
    /// The daemon's JSON config file.
    #[arg(long, short)]
    config: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SuggestArgs {
    /// Audit files (JSON lines; gzip-compressed ones too; `-` is standard input).
    #[arg(long, required = true, num_args = 1..)]
    audit: Vec<PathBuf>,
    /// `json`: a `rules` array for the config, with the evidence beside it;
    /// `nix`: values for `services.agentEgress.agents.<name>`.
    #[arg(long, value_enum, default_value = "json")]
    format: suggest::Format,
    /// Only this agent: its cgroup path as records give it, or its Nix name.
    #[arg(long)]
    agent: Option<String>,
    /// Leave out (and list apart) entries seen fewer times.
    #[arg(long, default_value_t = 1)]
    min_count: u64,
}

#[derive(Args)]
struct LogArgs {
    /// Audit files (JSON lines, gzip-compressed ones too), shown oldest first.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Then keep printing what is appended to the newest, across rotation.
    #[arg(long, short)]
    follow: bool,
    /// Only this agent: its cgroup path as records give it, or its Nix name.
    #[arg(long)]
    agent: Option<String>,
    /// Only records with this verdict (allow, block, would_block, error,
    /// undecided); repeat for several.
    #[arg(long, value_parser = audit_log::parse_verdict)]
    verdict: Vec<Verdict>,
    /// Only records from this UTC time on (2026-11-25, 2026-11-25T09:40) or of
    /// this age at most (90s, 30m, 2h, 7d).
    #[arg(long, value_parser = |s: &str| audit_log::parse_since(s, SystemTime::now()))]
    since: Option<String>,
}

/// The daemon's control socket (`control.socket` in its config).
#[derive(Args)]
struct SocketArg {
    #[arg(long, default_value = crate::config::DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
}

#[derive(Args)]
struct WatchArgs {
    #[command(flatten)]
    socket: SocketArg,
    /// The records as JSON lines, as the daemon sends them.
    #[arg(long)]
    json: bool,
    /// Only this agent: its cgroup path as records give it, or its Nix name.
    #[arg(long)]
    agent: Option<String>,
    /// Only records with this verdict; repeat for several.
    #[arg(long, value_parser = audit_log::parse_verdict)]
    verdict: Vec<Verdict>,
}

#[derive(Args)]
struct McpArgs {
    #[command(flatten)]
    socket: SocketArg,
}

#[derive(Args)]
struct StatusArgs {
    /// The JSON config file (for the table name and port).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

pub fn main() -> i32 {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => daemon::run(&daemon::Options {
            config: args.config,
            cleanup_on_exit: args.cleanup_on_exit,
        }),
        Command::Check(args) => check(&args),
        Command::Explain(args) => explain(&args),
        Command::Exec(args) => exec::exec(exec::Options {
            config: args.config,
            allow: args.allow,
            presets: args.presets,
            audit: args.audit,
            audit_only: args.audit_only,
            user: args.user,
            as_root: args.as_root,
            allow_bus: args.allow_bus,
            ask: args.ask,
            ask_timeout_ms: args.ask_timeout_ms,
            command: args.command,
        }),
        Command::Down(args) => match load(&args.config) {
            Some(config) => daemon::down(&config),
            None => 1,
        },
        Command::Status(args) => {
            let config = match &args.config {
                Some(path) => match load(path) {
                    Some(c) => c,
                    None => return 1,
                },
                None => Config::default(),
            };
            daemon::status(&config, args.json)
        }
        Command::Doctor(args) => match load(&args.config) {
            Some(config) => doctor(&config, args.json),
            None => 1,
        },
        Command::Suggest(args) => suggest::run(
            &args.audit,
            args.format,
            suggest::Options {
                agent: args.agent,
                min_count: args.min_count,
            },
        ),
        Command::Log(args) => audit_log::run(
            &args.files,
            audit_log::Filter {
                agent: args.agent,
                verdicts: args.verdict,
                since: args.since,
            },
            args.follow,
        ),
        Command::Watch(args) => crate::watch::run(
            &args.socket.socket,
            args.json,
            audit_log::Filter {
                agent: args.agent,
                verdicts: args.verdict,
                since: None,
            },
        ),
        Command::Mcp(args) => crate::mcp::run(&args.socket.socket),
        Command::Version => {
            println!("agent-egress {}", env!("CARGO_PKG_VERSION"));
            0
        }
    }
}

/// Load and validate, printing every error; None if it is not usable.
pub fn load(path: &std::path::Path) -> Option<Config> {
    load_with(path, SecretFiles::Read)
}

fn load_with(path: &std::path::Path, secrets: SecretFiles) -> Option<Config> {
    match Config::load_with(path, secrets) {
        Ok(c) => Some(c),
        Err(errors) => {
            eprintln!("{}: {} error(s):", path.display(), errors.0.len());
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            None
        }
    }
}

fn check(args: &CheckArgs) -> i32 {
    let secrets = if args.no_secret_files {
        SecretFiles::Skip
    } else {
        SecretFiles::Read
    };
    let Some(config) = load_with(&args.config, secrets) else {
        return 1;
    };
    println!("{}: ok", args.config.display());
    match &args.state {
        Some(state) => match RuleSet::load(state, &config) {
            Ok(rules) => {
                println!(
                    "{}: ok, {} runtime rule(s)",
                    state.display(),
                    rules.rules().len()
                );
                0
            }
            Err(e) => {
                eprintln!("{e}");
                1
            }
        },
        None => 0,
    }
}

fn explain(args: &ExplainArgs) -> i32 {
    let Some(config) = load(&args.config) else {
        return 1;
    };
    let (host, port) = match split_host_port(&args.target) {
        Ok(hp) => hp,
        Err(e) => {
            eprintln!("{}: {e}", args.target);
            return 2;
        }
    };
    let (name, ip) = match host.parse::<IpAddr>() {
        Ok(ip) => (None, ip),
        Err(_) => match crate::names::normalize_host(&host) {
            Ok(n) => (Some(n), args.ip.unwrap_or(IpAddr::from([0, 0, 0, 0]))),
            Err(e) => {
                eprintln!("{host}: {e}");
                return 2;
            }
        },
    };
    if ip.to_canonical().is_loopback() {
        let listener = args.listener.as_ref().map(|cgroup| Listener {
            agent: crate::cgroup::innermost(&config.interception.cgroups, cgroup).map(String::from),
            cgroup: Some(cgroup.clone()),
            ..Listener::default()
        });
        println!(
            "{}",
            loopback::explain(
                &config.loopback,
                port,
                args.agent.as_deref(),
                listener.as_ref()
            )
        );
        return 0;
    }
    // The daemon's runtime rules, where it keeps any (control.enable).
    let state = args.state.clone().or_else(|| {
        config
            .control
            .enable
            .then(|| crate::control::state::state_file(&config))
    });
    let rules = match state.as_deref().map(|s| RuleSet::load(s, &config)) {
        None => RuleSet::default(),
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            eprintln!("{e}");
            return 1;
        }
    };
    let in_force = rules.in_force(crate::control::state::now_ms());
    if let (false, Some(state)) = (in_force.is_empty(), &state) {
        println!(
            "{} runtime rule(s) from {}, asked first",
            in_force.len(),
            state.display()
        );
    }
    let uid = match args.user.as_deref().map(uid_of_user).transpose() {
        Ok(uid) => uid,
        Err(e) => {
            eprintln!("--user: {e}");
            return 2;
        }
    };
    let process = explained_process(args);
    let runtime = Runtime::with_rules(config, &in_force);
    let query = Query {
        host: name.as_deref(),
        ip,
        port,
        agent: args.agent.as_deref(),
        uid,
        process: process.as_ref().map_or(Process::Unknown, Process::Known),
    };
    println!("{}", runtime.policy.explain(&query));
    0
}

/// `--user`: a uid, or a name /etc/passwd knows.
fn uid_of_user(user: &str) -> Result<u32, UserError> {
    if let Ok(uid) = user.parse() {
        return Ok(uid);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| UserError::Passwd {
        user: user.into(),
        error: e,
    })?;
    crate::process_match::uid_in_passwd(&passwd, user)
        .ok_or_else(|| UserError::NoSuchUser(user.into()))
}

/// Why `--user` names no uid.
#[derive(Debug)]
enum UserError {
    /// /etc/passwd, where a name is looked up, could not be read.
    Passwd {
        user: String,
        error: std::io::Error,
    },
    NoSuchUser(String),
}

impl std::fmt::Display for UserError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserError::Passwd { user, error } => {
                write!(f, "cannot read /etc/passwd to look up {user:?}: {error}")
            }
            UserError::NoSuchUser(user) => write!(f, "no user named {user:?} in /etc/passwd"),
        }
    }
}

/// The process `explain` was told of, if any of its facts was given.
fn explained_process(args: &ExplainArgs) -> Option<ProcessInfo> {
    let given = args.process.is_some()
        || args.comm.is_some()
        || !args.ancestor.is_empty()
        || args.cgroup.is_some();
    let cgroup = match (&args.agent, &args.cgroup) {
        (Some(agent), Some(sub)) => Some(format!("{agent}/{}", sub.trim_matches('/'))),
        (None, Some(sub)) => Some(sub.trim_matches('/').to_string()),
        (_, None) => args.agent.clone(),
    };
    given.then(|| ProcessInfo {
        exe: args.process.clone(),
        comm: args.comm.clone(),
        cgroup,
        ancestry: args
            .ancestor
            .iter()
            .map(|exe| Ancestor {
                pid: 0,
                exe: Some(exe.clone()),
                cmdline: None,
                cmdline_truncated: false,
            })
            .collect(),
        ..ProcessInfo::default()
    })
}

/// What follows the last ':' of HOST:PORT, which is no port.
#[derive(Debug)]
struct NotAPort(String);

impl std::fmt::Display for NotAPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} is not a port", self.0)
    }
}

impl std::error::Error for NotAPort {}

/// `host`, `host:port`, `1.2.3.4:80`, `[::1]:443`, `::1`.
fn split_host_port(s: &str) -> Result<(String, u16), NotAPort> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok((addr.ip().to_string(), addr.port()));
    }
    if s.parse::<IpAddr>().is_ok() {
        return Ok((s.to_string(), 443));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => p
            .parse::<u16>()
            .map(|p| (h.to_string(), p))
            .map_err(|_| NotAPort(p.to_string())),
        None => Ok((s.to_string(), 443)),
    }
}

fn doctor(config: &Config, json: bool) -> i32 {
    let checks = doctor::run(config);
    if json {
        match serde_json::to_string_pretty(&checks) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("doctor: {e}"),
        }
    } else {
        print!("{}", doctor::to_text(&checks));
    }
    i32::from(checks.iter().any(|c| !c.ok))
}

#[cfg(test)]
mod tests {
    use super::split_host_port;

    #[test]
    fn host_port_forms() {
        assert_eq!(split_host_port("a.com").unwrap(), ("a.com".into(), 443));
        assert_eq!(split_host_port("a.com:80").unwrap(), ("a.com".into(), 80));
        assert_eq!(split_host_port("[::1]:8080").unwrap(), ("::1".into(), 8080));
        assert_eq!(split_host_port("::1").unwrap(), ("::1".into(), 443));
        assert!(split_host_port("a.com:http").is_err());
    }
}
