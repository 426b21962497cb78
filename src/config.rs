//! The configuration: one JSON document, read into typed settings.
//!
//! Parsing walks a `serde_json::Value` by hand instead of deriving `Deserialize`,
//! because `check` must report every error with its JSON path, not stop at the
//! first one as serde does.

use crate::agent_dns::limits::RateLimits;
use crate::cgroup::validate_relative_path;
use crate::names::{normalize_host, NameError};
use hickory_proto::rr::RecordType;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

pub const DEFAULT_PORT: u16 = 15001;
pub const DEFAULT_TABLE: &str = "agent_egress";
/// Fwmark and routing table of captured traffic ("ae" = 0xae1); chosen to be
/// unlikely to meet other users of marks (WireGuard uses 0xca6c).
pub const DEFAULT_MARK: u32 = 0xae1;
pub const DEFAULT_ROUTE_TABLE: u32 = 0xae1;
pub const DEFAULT_RULE_PRIORITY: u32 = 2785;

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: Listen,
    pub interception: Interception,
    pub dns: Dns,
    pub outbounds: BTreeMap<String, Outbound>,
    pub rules: Vec<Rule>,
    pub default: String,
    pub audit: Audit,
    pub mode: Mode,
    pub limits: Limits,
    pub loopback: Loopback,
    pub control: Control,
    /// What an `ask` outbound does while, and when no, supervisor answers.
    pub ask: Ask,
    /// Where the daemon keeps what it must remember across restarts (the
    /// runtime rules).
    pub state_dir: PathBuf,
}

/// The supervisor's control API on a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Control {
    pub enable: bool,
    pub socket: PathBuf,
    /// The group whose members may connect (mode 0660, owner the daemon's
    /// user); None: the daemon's own group.
    pub group: Option<String>,
}

/// The `ask` verdict: a connection is held while a supervisor is asked over
/// the control API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    /// How long a question waits for its answer.
    pub timeout_ms: u64,
    /// What a connection gets when no answer comes in time, or when too many
    /// are held already.
    pub fallback: AskFallback,
    /// Connections held at once at the most (all questions, all workers).
    pub max_held: usize,
    /// Where an allowed answer sends its connections (and an always answer's
    /// runtime rule, the next ones): `direct` unless the agents' allowed
    /// traffic leaves through another egress, which an answer must not skip.
    pub outbound: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AskFallback {
    Allow,
    Block,
}

pub const DEFAULT_CONTROL_SOCKET: &str = "/run/agent-egress/control.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/agent-egress";

#[derive(Debug, Clone, PartialEq)]
pub struct Listen {
    pub port: u16,
    pub addresses: Vec<IpAddr>,
    /// Event-loop threads; 0 means one per core.
    pub workers: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Interception {
    /// Install and keep the nftables table and policy routing ourselves; false
    /// is "proxy only" for users who manage the kernel side.
    pub manage_kernel: bool,
    /// Cgroup paths relative to the cgroup2 mount whose sockets are captured.
    pub cgroups: Vec<String>,
    pub table: String,
    pub mark: u32,
    pub route_table: u32,
    pub rule_priority: u32,
    /// Destinations the agents reach without the proxy (loopback always).
    pub bypass: Vec<Cidr>,
    /// Whether each agent cgroup also gets a BPF program that lets packets
    /// out through `lo` only (systemd's `RestrictNetworkInterfaces=lo`).
    pub backstop: BackstopMode,
    pub delegated_subtrees: DelegatedSubtrees,
}

/// Captured traffic leaves through `lo`, so the backstop stops nothing the
/// proxy handles, and everything while the table is gone: deleted with the
/// daemon frozen, or in the tens of ms before the daemon repairs it. The
/// agents then reach no resolver off loopback and no bypassed network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackstopMode {
    Off,
    /// On, and the daemon refuses to start without it.
    On,
    /// On wherever nothing the agents may use lies off loopback (every
    /// `dns.servers` on loopback, no `bypass`) and the kernel takes it; else
    /// off, and the log says why.
    Auto,
}

/// Why `interception.backstop: "auto"` leaves the backstop off: something
/// the agents reach off loopback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackstopOff {
    Resolver(SocketAddr),
    Bypass(Cidr),
}

impl fmt::Display for BackstopOff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackstopOff::Resolver(server) => {
                write!(f, "the resolver {server} (dns.servers) is not on loopback")
            }
            BackstopOff::Bypass(net) => {
                write!(f, "{net} (interception.bypass) is reached off loopback")
            }
        }
    }
}

impl std::error::Error for BackstopOff {}

impl Config {
    /// Whether the backstop goes on; `Err` says why `auto` leaves it off.
    pub fn backstop_wanted(&self) -> Result<bool, BackstopOff> {
        match self.interception.backstop {
            BackstopMode::Off => Ok(false),
            BackstopMode::On => Ok(true),
            BackstopMode::Auto => {
                // Captured, the agents' DNS goes to our handler through lo.
                let off_loopback = self.dns.servers.iter().find(|s| !s.ip().is_loopback());
                if let Some(server) = off_loopback.filter(|_| !self.dns.capture) {
                    Err(BackstopOff::Resolver(*server))
                } else if let Some(net) = self.interception.bypass.first() {
                    Err(BackstopOff::Bypass(*net))
                } else {
                    Ok(true)
                }
            }
        }
    }
}

/// What to do with an agent cgroup inside a subtree delegated to a user, whose
/// processes may move themselves to any cgroup of that subtree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelegatedSubtrees {
    /// Capture the whole delegated subtree.
    Capture,
    /// Refuse to start with such an agent cgroup (and say so when one appears later).
    Refuse,
    /// Capture the agent cgroup only, and warn: an escape stays possible.
    Ignore,
}

impl DelegatedSubtrees {
    pub fn name(self) -> &'static str {
        match self {
            DelegatedSubtrees::Capture => "capture",
            DelegatedSubtrees::Refuse => "refuse",
            DelegatedSubtrees::Ignore => "ignore",
        }
    }
}

/// Agents' TCP connections to the host's own loopback (127.0.0.0/8, ::1):
/// what listens there (a local proxy, a database, a DevTools port) is no
/// exit unless allowed here.
#[derive(Debug, Clone, PartialEq)]
pub struct Loopback {
    /// A listener in the connecting agent's own cgroup (its dev server, its
    /// test database) is reachable.
    pub own_listeners: bool,
    /// Every other listener only through one of these; none matching: refused.
    pub allow: Vec<LoopbackRule>,
}

/// One allowed kind of loopback listener. Fields must all match; absent ones
/// match anything, but a rule names at least `ports` or `listeners`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopbackRule {
    /// The name audit records give; `loopback.allow[N]` when the config names none.
    pub name: String,
    pub ports: Vec<PortRange>,
    /// The listener's cgroup: a unit name (`postgresql.service`, any component
    /// of its cgroup path) or a cgroup path (at or below it).
    pub listeners: Vec<String>,
    /// The connecting agents (configured cgroups).
    pub agents: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Dns {
    /// The resolvers we use, and (without `capture`) the only ones the agents may reach.
    pub servers: Vec<SocketAddr>,
    pub timeout_ms: u64,
    pub domain_dial: DomainDial,
    /// Every DNS query of the agents over UDP, to any address (loopback
    /// resolvers too), goes to our handler, which answers it under the policy.
    pub capture: bool,
    /// The handler's TPROXY port (on 127.0.0.1 and ::1).
    pub port: u16,
    /// The answer to a name the policy refuses.
    pub refuse_with: RefuseWith,
    /// Query types forwarded; others are refused (TXT and NULL carry tunnels).
    pub query_types: Vec<RecordType>,
    /// A connection without a name of its own, to an address the agent never
    /// resolved through the handler, only by a rule by address (`ips`).
    pub require_dns: bool,
    /// Per agent: queries a second, and distinct names below one parent a minute.
    pub rate_limit: RateLimits,
    /// Names with a longer label, or longer in all, are refused: data rides
    /// in long labels (the protocol allows 63 and 255 bytes).
    pub max_label_length: usize,
    pub max_name_length: usize,
    /// Answers the handler keeps (by name and type, as long as their TTL
    /// says); 0: none.
    pub cache_entries: usize,
    /// Take the `ech` parameter out of HTTPS and SVCB answers, so clients
    /// send the name they connect to in the clear, where the policy sees it.
    pub strip_ech: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseWith {
    NxDomain,
    Refused,
}

/// What agents look up to connect: addresses, aliases, service bindings
/// (HTTPS/SVCB, SRV, MX) and the zone records resolvers walk. Not TXT, NULL,
/// ANY and the rest: free-form payloads are what DNS tunnels ride on.
pub const DEFAULT_QUERY_TYPES: [RecordType; 10] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::CNAME,
    RecordType::HTTPS,
    RecordType::SVCB,
    RecordType::SRV,
    RecordType::MX,
    RecordType::NS,
    RecordType::SOA,
    RecordType::PTR,
];

pub const DEFAULT_DNS_PORT: u16 = 15053;

/// How a connection routed by a domain rule picks the address it dials:
/// never simply the address the client chose, which an agent can point at
/// any host while naming an allowed one in the SNI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainDial {
    /// Dial the original destination if our resolver gives it for the name,
    /// else the first address our resolver gives.
    Resolve,
    /// Refuse unless the original destination is among the name's addresses.
    Verify,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    Direct {
        /// SO_BINDTODEVICE: leave through this interface.
        interface: Option<String>,
        /// SO_MARK: select a routing table ("the second internet").
        mark: Option<u32>,
    },
    Block,
    /// Hold the connection and ask a supervisor (`ask`).
    Ask,
    Socks5 {
        server: SocketAddr,
        auth: Option<Credentials>,
    },
    Http {
        server: SocketAddr,
        auth: Option<Credentials>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The name audit records give; `rules[N]` when the config names none.
    pub name: String,
    pub domains: Vec<DomainPattern>,
    pub ips: Vec<Cidr>,
    pub ports: Vec<PortRange>,
    pub agents: Vec<String>,
    /// What it asks of the connecting process; all empty: anything.
    pub process: ProcessSelectors,
    pub outbound: String,
    /// No runtime rule may widen what this rule decides (a supervisor may
    /// override only the rules not locked).
    pub locked: bool,
}

/// A rule's fields on the connecting process (each a list, values OR).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessSelectors {
    /// Globs on its executable's path (`*` crosses `/`).
    pub process: Vec<String>,
    /// Globs on its command name (`/proc/PID/comm`, at most 15 bytes).
    pub comm: Vec<String>,
    /// Who owns its socket.
    pub user: Vec<UserSpec>,
    /// Globs on the executables of its ancestors within the agent.
    pub ancestor: Vec<String>,
    /// Cgroup paths relative to the agent's: the process is in one or below.
    pub cgroup: Vec<String>,
    /// Lowercase hex SHA-256 digests its executable must have one of.
    pub exe_sha256: Vec<String>,
}

impl ProcessSelectors {
    pub fn is_empty(&self) -> bool {
        *self == ProcessSelectors::default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSpec {
    Uid(u32),
    /// Looked up in /etc/passwd when the policy is compiled.
    Name(String),
}

impl fmt::Display for UserSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserSpec::Uid(uid) => write!(f, "uid {uid}"),
            UserSpec::Name(name) => f.write_str(name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DomainPattern {
    /// `example.com`: the name and every subdomain.
    NameAndSubdomains(String),
    /// `=example.com`: that name only.
    Exact(String),
    /// `*.example.com`: subdomains only.
    SubdomainsOnly(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Audit {
    /// None: standard output (journald under systemd).
    pub path: Option<PathBuf>,
    /// Also write a record when a connection is decided, not only when it ends.
    pub start_events: bool,
    pub queue: usize,
    pub format: AuditFormat,
}

/// How audit records are written (`audit.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditFormat {
    /// Our own records, one JSON object per line (what `log` and `suggest` read).
    Json,
    /// The same records as OCSF events, for SIEMs (see `audit_ocsf`).
    Ocsf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    /// Everything goes out direct; records say what enforce would have done.
    Audit,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub connections: usize,
    pub sniff_bytes: usize,
    pub sniff_timeout_ms: u64,
    pub idle_timeout_s: u64,
    pub connect_timeout_ms: u64,
}

/// One problem in a config, at one JSON path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.path, self.reason)
        }
    }
}

/// Every problem found in a config, in document order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_bits_equal(&net.octets(), &ip.octets(), self.prefix)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_bits_equal(&net.octets(), &ip.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

fn prefix_bits_equal(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    let rest = prefix % 8;
    if a[..full] != b[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    a[full] & mask == b[full] & mask
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a domain pattern is refused; each names the pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternError {
    /// A '*' anywhere but a leading "*.".
    Wildcard(String),
    IpAddress(String),
    Name {
        pattern: String,
        source: NameError,
    },
}

impl fmt::Display for PatternError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PatternError::Wildcard(s) => write!(
                f,
                "{s:?}: '*' is only allowed as a leading \"*.\" (subdomains only)"
            ),
            PatternError::IpAddress(s) => write!(f, "{s:?} is an IP address: put it in \"ips\""),
            PatternError::Name { pattern, source } => write!(f, "{pattern:?}: {source}"),
        }
    }
}

impl std::error::Error for PatternError {}

impl DomainPattern {
    pub fn parse(s: &str) -> Result<DomainPattern, PatternError> {
        let (make, name): (fn(String) -> DomainPattern, &str) =
            if let Some(rest) = s.strip_prefix('=') {
                (DomainPattern::Exact, rest)
            } else if let Some(rest) = s.strip_prefix("*.") {
                (DomainPattern::SubdomainsOnly, rest)
            } else {
                (DomainPattern::NameAndSubdomains, s)
            };
        if name.contains('*') {
            return Err(PatternError::Wildcard(s.to_string()));
        }
        if name.parse::<IpAddr>().is_ok() {
            return Err(PatternError::IpAddress(s.to_string()));
        }
        normalize_host(name)
            .map(make)
            .map_err(|source| PatternError::Name {
                pattern: s.to_string(),
                source,
            })
    }

    pub fn name(&self) -> &str {
        match self {
            DomainPattern::NameAndSubdomains(n)
            | DomainPattern::Exact(n)
            | DomainPattern::SubdomainsOnly(n) => n,
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::NameAndSubdomains(n) => write!(f, "{n}"),
            DomainPattern::Exact(n) => write!(f, "={n}"),
            DomainPattern::SubdomainsOnly(n) => write!(f, "*.{n}"),
        }
    }
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl Outbound {
    pub fn type_name(&self) -> &'static str {
        match self {
            Outbound::Direct { .. } => "direct",
            Outbound::Block => "block",
            Outbound::Ask => "ask",
            Outbound::Socks5 { .. } => "socks5",
            Outbound::Http { .. } => "http",
        }
    }
}

impl Default for Config {
    /// The built-in policy of `exec`: everything blocked, no rules.
    fn default() -> Self {
        Config {
            listen: Listen {
                port: DEFAULT_PORT,
                addresses: vec![
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(Ipv6Addr::LOCALHOST),
                ],
                workers: 0,
            },
            interception: Interception {
                manage_kernel: true,
                cgroups: Vec::new(),
                table: DEFAULT_TABLE.into(),
                mark: DEFAULT_MARK,
                route_table: DEFAULT_ROUTE_TABLE,
                rule_priority: DEFAULT_RULE_PRIORITY,
                bypass: Vec::new(),
                backstop: BackstopMode::Auto,
                delegated_subtrees: DelegatedSubtrees::Capture,
            },
            dns: Dns {
                servers: Vec::new(),
                timeout_ms: 2000,
                domain_dial: DomainDial::Resolve,
                capture: true,
                port: DEFAULT_DNS_PORT,
                refuse_with: RefuseWith::NxDomain,
                query_types: DEFAULT_QUERY_TYPES.to_vec(),
                require_dns: false,
                rate_limit: RateLimits {
                    queries_per_second: 100,
                    burst: 500,
                    names_per_parent: 100,
                },
                max_label_length: 48,
                max_name_length: 180,
                cache_entries: 4096,
                strip_ech: true,
            },
            outbounds: builtin_outbounds(),
            rules: Vec::new(),
            default: "block".into(),
            audit: Audit {
                path: None,
                start_events: false,
                queue: 65536,
                format: AuditFormat::Json,
            },
            mode: Mode::Enforce,
            limits: Limits {
                connections: 8192,
                sniff_bytes: 16 * 1024,
                sniff_timeout_ms: 3000,
                idle_timeout_s: 300,
                connect_timeout_ms: 5000,
            },
            loopback: Loopback {
                own_listeners: true,
                allow: Vec::new(),
            },
            control: Control {
                enable: false,
                socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
                group: None,
            },
            ask: Ask {
                timeout_ms: 60_000,
                fallback: AskFallback::Block,
                max_held: 256,
                outbound: "direct".into(),
            },
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
        }
    }
}

/// `direct`, `block` and `ask` exist unless the config redefines them.
fn builtin_outbounds() -> BTreeMap<String, Outbound> {
    BTreeMap::from([
        (
            "direct".to_string(),
            Outbound::Direct {
                interface: None,
                mark: None,
            },
        ),
        ("block".to_string(), Outbound::Block),
        ("ask".to_string(), Outbound::Ask),
    ])
}

/// Whether loading a config reads the files it names for secrets
/// (`password_file`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SecretFiles {
    #[default]
    Read,
    /// Check their paths only: for `check` where the secrets are not (yet)
    /// present, such as a Nix build sandbox.
    Skip,
}

/// Who answers the questions of an `ask` outbound: a config that asks needs
/// someone to, or its connections would only ever fall back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Answerer {
    /// The control API, which the daemon serves with `control.enable`.
    #[default]
    ControlApi,
    /// `exec --ask`'s terminal, whatever `control` says.
    Terminal,
    /// Nobody: `exec` without `--ask` serves no control API.
    Nobody,
}

impl Config {
    pub fn load_with(path: &Path, secrets: SecretFiles) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                reason: format!("cannot read {}: {e}", path.display()),
            }])
        })?;
        Config::from_json_with(&text, secrets)
    }

    pub fn from_json(text: &str) -> Result<Config, ConfigErrors> {
        Config::from_json_with(text, SecretFiles::Read)
    }

    /// A config whose `ask` questions `answerer` answers (the daemon's
    /// control API for [`Config::from_json`]).
    pub fn from_json_for(text: &str, answerer: Answerer) -> Result<Config, ConfigErrors> {
        Config::read(
            text,
            Reader {
                answerer,
                ..Reader::default()
            },
        )
    }

    fn from_json_with(text: &str, secrets: SecretFiles) -> Result<Config, ConfigErrors> {
        Config::read(
            text,
            Reader {
                secrets,
                ..Reader::default()
            },
        )
    }

    fn read(text: &str, mut reader: Reader) -> Result<Config, ConfigErrors> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                reason: format!("not valid JSON: {e}"),
            }])
        })?;
        let config = reader.config(&value);
        if reader.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(reader.errors))
        }
    }

    /// The rule part of a runtime rule (`value`, at `path`), checked against
    /// this config's outbounds and agents; `extra` are the keys its caller
    /// reads itself. Every error names its JSON path.
    pub fn runtime_rule(
        &self,
        path: &str,
        value: &Value,
        extra: &[&str],
    ) -> Result<Rule, ConfigErrors> {
        let mut reader = Reader::default();
        let rule = reader.rule(
            path,
            value,
            &self.outbounds,
            &self.interception.cgroups,
            extra,
        );
        match rule {
            Some(rule) if reader.errors.is_empty() => Ok(rule),
            _ => Err(ConfigErrors(reader.errors)),
        }
    }

    /// The effective number of event-loop threads.
    pub fn workers(&self) -> usize {
        match self.listen.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// Walks the JSON, filling defaults and collecting every error with its path.
#[derive(Default)]
struct Reader {
    errors: Vec<ConfigError>,
    secrets: SecretFiles,
    answerer: Answerer,
}

impl Reader {
    fn error(&mut self, path: &str, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.to_string(),
            reason: reason.into(),
        });
    }

    /// The secret in the file at `path`'s value (an absolute path), without one
    /// trailing newline. Read at every load (start, SIGHUP), so a rotated secret
    /// is picked up by a reload; with [`SecretFiles::Skip`] only the path is checked.
    fn password_file(&mut self, path: &str, value: &Value) -> Option<String> {
        let file = self.string(path, value)?;
        if !file.starts_with('/') {
            self.error(path, format!("{file:?} is not an absolute path"));
            return None;
        }
        if self.secrets == SecretFiles::Skip {
            return Some(String::new());
        }
        let text = match std::fs::read_to_string(file) {
            Ok(text) => text,
            Err(e) => {
                self.error(path, format!("cannot read {file}: {e}"));
                return None;
            }
        };
        let secret = text
            .strip_suffix('\n')
            .map(|t| t.strip_suffix('\r').unwrap_or(t))
            .unwrap_or(&text);
        if secret.is_empty() {
            self.error(path, format!("{file} is empty"));
            return None;
        }
        Some(secret.to_string())
    }

    /// The object at `path`, after reporting any key not in `known`.
    fn object<'v>(
        &mut self,
        path: &str,
        value: &'v Value,
        known: &[&str],
    ) -> Option<&'v Map<String, Value>> {
        let Some(map) = value.as_object() else {
            self.error(path, format!("expected an object, found {}", kind(value)));
            return None;
        };
        for key in map.keys() {
            if !known.contains(&key.as_str()) {
                self.error(
                    &join(path, key),
                    format!("unknown key (expected one of: {})", known.join(", ")),
                );
            }
        }
        Some(map)
    }

    fn u64_in(&mut self, path: &str, value: &Value, min: u64, max: u64) -> Option<u64> {
        match value.as_u64() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            Some(n) => {
                self.error(path, format!("{n} is out of range ({min}..={max})"));
                None
            }
            None if value.is_number() => {
                self.error(path, format!("{value} is out of range ({min}..={max})"));
                None
            }
            None => {
                self.error(path, format!("expected a number, found {}", kind(value)));
                None
            }
        }
    }

    fn string<'v>(&mut self, path: &str, value: &'v Value) -> Option<&'v str> {
        let s = value.as_str();
        if s.is_none() {
            self.error(path, format!("expected a string, found {}", kind(value)));
        }
        s
    }

    fn bool(&mut self, path: &str, value: &Value) -> Option<bool> {
        let b = value.as_bool();
        if b.is_none() {
            self.error(
                path,
                format!("expected true or false, found {}", kind(value)),
            );
        }
        b
    }

    /// Each element of an array, parsed by `item`, with `path[i]` paths.
    fn array<T>(
        &mut self,
        path: &str,
        value: &Value,
        mut item: impl FnMut(&mut Self, &str, &Value) -> Option<T>,
    ) -> Option<Vec<T>> {
        let Some(items) = value.as_array() else {
            self.error(path, format!("expected an array, found {}", kind(value)));
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, v) in items.iter().enumerate() {
            if let Some(t) = item(self, &format!("{path}[{i}]"), v) {
                out.push(t);
            }
        }
        Some(out)
    }

    fn config(&mut self, value: &Value) -> Config {
        let mut config = Config::default();
        let Some(top) = self.object(
            "",
            value,
            &[
                "listen",
                "interception",
                "dns",
                "outbounds",
                "rules",
                "default",
                "audit",
                "mode",
                "limits",
                "loopback",
                "control",
                "state_dir",
                "ask",
            ],
        ) else {
            return config;
        };
        if let Some(v) = top.get("ask") {
            self.ask(v, &mut config.ask);
        }
        if let Some(v) = top.get("control") {
            self.control(v, &mut config.control);
        }
        if let Some(v) = top.get("state_dir") {
            if let Some(dir) = self.absolute_path("state_dir", v) {
                config.state_dir = dir;
            }
        }
        if let Some(v) = top.get("listen") {
            self.listen(v, &mut config.listen);
        }
        if let Some(v) = top.get("interception") {
            self.interception(v, &mut config.interception);
        }
        if let Some(v) = top.get("dns") {
            self.dns(v, &mut config.dns);
        }
        if let Some(v) = top.get("outbounds") {
            self.outbounds(v, &mut config.outbounds, config.interception.mark);
        }
        if let Some(v) = top.get("audit") {
            self.audit(v, &mut config.audit);
        }
        if let Some(v) = top.get("mode") {
            match v.as_str() {
                Some("enforce") => config.mode = Mode::Enforce,
                Some("audit") => config.mode = Mode::Audit,
                _ => self.error("mode", format!("{v} is not \"enforce\" or \"audit\"")),
            }
        }
        if let Some(v) = top.get("limits") {
            self.limits(v, &mut config.limits);
        }
        if let Some(v) = top.get("default") {
            if let Some(name) = self.string("default", v) {
                if !config.outbounds.contains_key(name) {
                    self.error("default", format!("no outbound named {name:?}"));
                }
                config.default = name.to_string();
            }
        }
        if let Some(v) = top.get("rules") {
            let outbounds = &config.outbounds;
            let cgroups = &config.interception.cgroups;
            config.rules = self
                .array("rules", v, |r, path, v| {
                    r.rule(path, v, outbounds, cgroups, &[])
                })
                .unwrap_or_default();
        }
        if let Some(v) = top.get("loopback") {
            self.loopback(v, &mut config.loopback, &config.interception.cgroups);
        }
        self.ask_is_answerable(&config);
        self.ask_outbound_lets_through(&config);
        config
    }

    /// An allowed answer goes out through `ask.outbound`: one that exists
    /// and lets traffic through.
    fn ask_outbound_lets_through(&mut self, config: &Config) {
        let name = &config.ask.outbound;
        match config.outbounds.get(name) {
            None => self.error("ask.outbound", format!("no outbound named {name:?}")),
            Some(Outbound::Block | Outbound::Ask) => self.error(
                "ask.outbound",
                format!(
                    "{name:?} lets nothing through: an allowed answer needs an outbound that does"
                ),
            ),
            Some(_) => {}
        }
    }

    fn ask(&mut self, value: &Value, ask: &mut Ask) {
        let Some(map) = self.object(
            "ask",
            value,
            &["timeout_ms", "fallback", "max_held", "outbound"],
        ) else {
            return;
        };
        if let Some(v) = map.get("outbound") {
            if let Some(name) = self.string("ask.outbound", v) {
                ask.outbound = name.to_string();
            }
        }
        if let Some(v) = map.get("timeout_ms") {
            if let Some(n) = self.u64_in("ask.timeout_ms", v, 100, 3_600_000) {
                ask.timeout_ms = n;
            }
        }
        if let Some(v) = map.get("max_held") {
            if let Some(n) = self.u64_in("ask.max_held", v, 1, 65_536) {
                ask.max_held = n as usize;
            }
        }
        if let Some(v) = map.get("fallback") {
            match v.as_str() {
                Some("allow") => ask.fallback = AskFallback::Allow,
                Some("block") => ask.fallback = AskFallback::Block,
                _ => self.error("ask.fallback", format!("{v} is not \"allow\" or \"block\"")),
            }
        }
    }

    /// An `ask` nobody can answer would only ever fall back.
    fn ask_is_answerable(&mut self, config: &Config) {
        let why = match self.answerer {
            Answerer::Terminal => return,
            Answerer::ControlApi if config.control.enable => return,
            Answerer::ControlApi => {
                "asks a supervisor, and without control.enable nobody can answer"
            }
            Answerer::Nobody => {
                "asks a supervisor, and exec answers questions only with --ask (on its terminal)"
            }
        };
        let asks = |name: &str| matches!(config.outbounds.get(name), Some(Outbound::Ask));
        if asks(&config.default) {
            self.error("default", why);
        }
        for (i, rule) in config.rules.iter().enumerate() {
            if asks(&rule.outbound) {
                self.error(&format!("rules[{i}].outbound"), why);
            }
        }
    }

    fn loopback(&mut self, value: &Value, loopback: &mut Loopback, cgroups: &[String]) {
        let Some(map) = self.object("loopback", value, &["own_listeners", "allow"]) else {
            return;
        };
        if let Some(v) = map.get("own_listeners") {
            if let Some(b) = self.bool("loopback.own_listeners", v) {
                loopback.own_listeners = b;
            }
        }
        if let Some(v) = map.get("allow") {
            loopback.allow = self
                .array("loopback.allow", v, |r, path, v| {
                    r.loopback_rule(path, v, cgroups)
                })
                .unwrap_or_default();
        }
    }

    fn loopback_rule(
        &mut self,
        path: &str,
        value: &Value,
        cgroups: &[String],
    ) -> Option<LoopbackRule> {
        let map = self.object(path, value, &["name", "ports", "listeners", "agents"])?;
        let name = match map.get("name") {
            Some(v) => self.string(&join(path, "name"), v)?.to_string(),
            None => path.to_string(),
        };
        let ports = map
            .get("ports")
            .and_then(|v| self.array(&join(path, "ports"), v, port_range))
            .unwrap_or_default();
        let listeners = map
            .get("listeners")
            .and_then(|v| {
                self.array(&join(path, "listeners"), v, |r, p, v| {
                    let s = r.string(p, v)?.trim_end_matches('/');
                    match validate_relative_path(s) {
                        Ok(()) => Some(s.to_string()),
                        Err(e) => {
                            r.error(p, format!("{s:?} {e}"));
                            None
                        }
                    }
                })
            })
            .unwrap_or_default();
        let agents = self.agents_field(path, map, cgroups);
        self.no_empty_lists(path, map, &["ports", "listeners", "agents"]);
        if !map.contains_key("ports") && !map.contains_key("listeners") {
            self.error(
                path,
                "name ports or listeners: a rule matching every listener opens the host's whole loopback",
            );
        }
        Some(LoopbackRule {
            name,
            ports,
            listeners,
            agents,
        })
    }

    /// A rule's `agents`: each one of the configured cgroups.
    fn agents_field(
        &mut self,
        path: &str,
        map: &Map<String, Value>,
        cgroups: &[String],
    ) -> Vec<String> {
        map.get("agents")
            .and_then(|v| {
                self.array(&join(path, "agents"), v, |r, p, v| {
                    let s = r.string(p, v)?.trim_end_matches('/');
                    if !cgroups.iter().any(|c| c == s) {
                        r.error(p, format!("{s:?} is not one of interception.cgroups"));
                        return None;
                    }
                    Some(s.to_string())
                })
            })
            .unwrap_or_default()
    }

    /// An empty list in a rule would match nothing, which is never what was meant.
    fn no_empty_lists(&mut self, path: &str, map: &Map<String, Value>, fields: &[&str]) {
        for field in fields {
            if map
                .get(*field)
                .and_then(Value::as_array)
                .is_some_and(Vec::is_empty)
            {
                self.error(
                    &join(path, field),
                    "an empty list matches nothing; leave the field out to match any",
                );
            }
        }
    }

    fn listen(&mut self, value: &Value, listen: &mut Listen) {
        let Some(map) = self.object("listen", value, &["port", "addresses", "workers"]) else {
            return;
        };
        if let Some(v) = map.get("port") {
            if let Some(p) = self.u64_in("listen.port", v, 1, 65535) {
                listen.port = p as u16;
            }
        }
        if let Some(v) = map.get("addresses") {
            if let Some(addrs) = self.array("listen.addresses", v, |r, path, v| {
                let s = r.string(path, v)?;
                let ip = s.parse::<IpAddr>().ok();
                if ip.is_none() {
                    r.error(path, format!("{s:?} is not an IP address"));
                }
                ip
            }) {
                if addrs.is_empty() {
                    self.error("listen.addresses", "at least one address is needed");
                }
                listen.addresses = addrs;
            }
        }
        if let Some(v) = map.get("workers") {
            if let Some(n) = self.u64_in("listen.workers", v, 0, 256) {
                listen.workers = n as usize;
            }
        }
    }

    fn interception(&mut self, value: &Value, ic: &mut Interception) {
        let Some(map) = self.object(
            "interception",
            value,
            &[
                "manage_kernel",
                "cgroups",
                "table",
                "mark",
                "route_table",
                "rule_priority",
                "bypass",
                "backstop",
                "delegated_subtrees",
            ],
        ) else {
            return;
        };
        if let Some(v) = map.get("manage_kernel") {
            if let Some(b) = self.bool("interception.manage_kernel", v) {
                ic.manage_kernel = b;
            }
        }
        if let Some(v) = map.get("backstop") {
            match v {
                Value::Bool(true) => ic.backstop = BackstopMode::On,
                Value::Bool(false) => ic.backstop = BackstopMode::Off,
                Value::String(s) if s == "auto" => ic.backstop = BackstopMode::Auto,
                _ => self.error(
                    "interception.backstop",
                    format!("{v} is not true, false or \"auto\""),
                ),
            }
        }
        if let Some(v) = map.get("cgroups") {
            ic.cgroups = self
                .array("interception.cgroups", v, |r, path, v| {
                    let s = r.string(path, v)?;
                    let trimmed = s.trim_end_matches('/');
                    match validate_relative_path(trimmed) {
                        Ok(()) => Some(trimmed.to_string()),
                        Err(e) => {
                            r.error(path, format!("{s:?} {e}"));
                            None
                        }
                    }
                })
                .unwrap_or_default();
        }
        if let Some(v) = map.get("table") {
            if let Some(s) = self.string("interception.table", v) {
                let valid = !s.is_empty()
                    && s.len() <= 64
                    && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if valid {
                    ic.table = s.to_string();
                } else {
                    self.error(
                        "interception.table",
                        format!("{s:?}: use 1 to 64 letters, digits or '_'"),
                    );
                }
            }
        }
        for (key, slot) in [
            ("mark", &mut ic.mark),
            ("route_table", &mut ic.route_table),
            ("rule_priority", &mut ic.rule_priority),
        ] {
            if let Some(v) = map.get(key) {
                // 0 means "none" to the kernel for marks and is the unspec table.
                if let Some(n) = self.u64_in(&join("interception", key), v, 1, u32::MAX.into()) {
                    *slot = n as u32;
                }
            }
        }
        if [253, 254, 255].contains(&ic.route_table) {
            self.error(
                "interception.route_table",
                format!(
                    "{} is a system table (default, main, local)",
                    ic.route_table
                ),
            );
        }
        if let Some(v) = map.get("bypass") {
            ic.bypass = self
                .array("interception.bypass", v, cidr)
                .unwrap_or_default();
        }
        if let Some(v) = map.get("delegated_subtrees") {
            match v.as_str() {
                Some("capture") => ic.delegated_subtrees = DelegatedSubtrees::Capture,
                Some("refuse") => ic.delegated_subtrees = DelegatedSubtrees::Refuse,
                Some("ignore") => ic.delegated_subtrees = DelegatedSubtrees::Ignore,
                _ => self.error(
                    "interception.delegated_subtrees",
                    format!("{v} is not \"capture\", \"refuse\" or \"ignore\""),
                ),
            }
        }
    }

    fn dns(&mut self, value: &Value, dns: &mut Dns) {
        let Some(map) = self.object(
            "dns",
            value,
            &[
                "servers",
                "timeout_ms",
                "domain_dial",
                "capture",
                "port",
                "refuse_with",
                "query_types",
                "require_dns",
                "rate_limit",
                "max_label_length",
                "max_name_length",
                "cache_entries",
                "strip_ech",
            ],
        ) else {
            return;
        };
        for (key, slot) in [
            ("capture", &mut dns.capture),
            ("require_dns", &mut dns.require_dns),
            ("strip_ech", &mut dns.strip_ech),
        ] {
            if let Some(v) = map.get(key) {
                if let Some(b) = self.bool(&join("dns", key), v) {
                    *slot = b;
                }
            }
        }
        if let Some(v) = map.get("port") {
            if let Some(p) = self.u64_in("dns.port", v, 1, 65535) {
                dns.port = p as u16;
            }
        }
        for (key, slot, least, most) in [
            ("max_label_length", &mut dns.max_label_length, 1, 63),
            ("max_name_length", &mut dns.max_name_length, 1, 253),
            ("cache_entries", &mut dns.cache_entries, 0, 1_000_000),
        ] {
            if let Some(v) = map.get(key) {
                if let Some(n) = self.u64_in(&join("dns", key), v, least, most) {
                    *slot = n as usize;
                }
            }
        }
        if let Some(v) = map.get("rate_limit") {
            self.rate_limit(v, &mut dns.rate_limit);
        }
        if let Some(v) = map.get("refuse_with") {
            match v.as_str() {
                Some("nxdomain") => dns.refuse_with = RefuseWith::NxDomain,
                Some("refused") => dns.refuse_with = RefuseWith::Refused,
                _ => self.error(
                    "dns.refuse_with",
                    format!("{v} is not \"nxdomain\" or \"refused\""),
                ),
            }
        }
        if let Some(v) = map.get("query_types") {
            if let Some(types) = self.array("dns.query_types", v, |r, path, v| {
                let s = r.string(path, v)?;
                match s.to_ascii_uppercase().parse::<RecordType>() {
                    Ok(RecordType::Unknown(_)) | Err(_) => {
                        r.error(
                            path,
                            format!("{s:?} is not a DNS record type (A, AAAA, HTTPS, ...)"),
                        );
                        None
                    }
                    Ok(t) => Some(t),
                }
            }) {
                dns.query_types = types;
            }
        }
        if let Some(v) = map.get("servers") {
            dns.servers = self
                .array("dns.servers", v, |r, path, v| {
                    let s = r.string(path, v)?;
                    let addr = parse_socket_addr(s, 53);
                    if addr.is_none() {
                        r.error(path, format!("{s:?} is not an IP address or IP:port"));
                    }
                    addr
                })
                .unwrap_or_default();
        }
        if let Some(v) = map.get("timeout_ms") {
            if let Some(n) = self.u64_in("dns.timeout_ms", v, 100, 60_000) {
                dns.timeout_ms = n;
            }
        }
        if let Some(v) = map.get("domain_dial") {
            match v.as_str() {
                Some("resolve") => dns.domain_dial = DomainDial::Resolve,
                Some("verify") => dns.domain_dial = DomainDial::Verify,
                _ => self.error(
                    "dns.domain_dial",
                    format!("{v} is not \"resolve\" or \"verify\""),
                ),
            }
        }
    }

    fn rate_limit(&mut self, value: &Value, limits: &mut RateLimits) {
        let Some(map) = self.object(
            "dns.rate_limit",
            value,
            &["queries_per_second", "burst", "names_per_parent"],
        ) else {
            return;
        };
        for (key, slot) in [
            ("queries_per_second", &mut limits.queries_per_second),
            ("burst", &mut limits.burst),
            ("names_per_parent", &mut limits.names_per_parent),
        ] {
            if let Some(v) = map.get(key) {
                if let Some(n) = self.u64_in(&join("dns.rate_limit", key), v, 1, 1_000_000) {
                    *slot = n as u32;
                }
            }
        }
    }

    fn outbounds(
        &mut self,
        value: &Value,
        outbounds: &mut BTreeMap<String, Outbound>,
        interception_mark: u32,
    ) {
        let Some(map) = value.as_object() else {
            self.error(
                "outbounds",
                format!("expected an object, found {}", kind(value)),
            );
            return;
        };
        for (name, v) in map {
            let path = join("outbounds", name);
            if name.is_empty() {
                self.error(&path, "an outbound needs a non-empty name");
                continue;
            }
            if let Some(o) = self.outbound(&path, v, interception_mark) {
                outbounds.insert(name.clone(), o);
            }
        }
    }

    fn outbound(&mut self, path: &str, value: &Value, interception_mark: u32) -> Option<Outbound> {
        let kind_path = join(path, "type");
        let ty = match value.get("type") {
            Some(v) => self.string(&kind_path, v)?,
            None => {
                self.error(
                    &kind_path,
                    "missing (one of: direct, block, ask, socks5, http)",
                );
                return None;
            }
        };
        match ty {
            "direct" => {
                let map = self.object(path, value, &["type", "interface", "mark"])?;
                let interface = map.get("interface").and_then(|v| {
                    let p = join(path, "interface");
                    let s = self.string(&p, v)?;
                    // IFNAMSIZ is 16 with the terminating NUL.
                    if s.is_empty() || s.len() > 15 || s.contains('/') {
                        self.error(&p, format!("{s:?} is not an interface name"));
                        return None;
                    }
                    Some(s.to_string())
                });
                let mark = map.get("mark").and_then(|v| {
                    let p = join(path, "mark");
                    let m = self.u64_in(&p, v, 1, u32::MAX.into())? as u32;
                    if m == interception_mark {
                        self.error(
                            &p,
                            format!("{m} is the interception mark: the proxy's own traffic would loop back into it"),
                        );
                        return None;
                    }
                    Some(m)
                });
                Some(Outbound::Direct { interface, mark })
            }
            "block" => {
                self.object(path, value, &["type"])?;
                Some(Outbound::Block)
            }
            "ask" => {
                self.object(path, value, &["type"])?;
                Some(Outbound::Ask)
            }
            "socks5" | "http" => {
                let map = self.object(
                    path,
                    value,
                    &["type", "server", "username", "password", "password_file"],
                )?;
                let server = match map.get("server") {
                    Some(v) => {
                        let p = join(path, "server");
                        let s = self.string(&p, v)?;
                        let addr = s.parse::<SocketAddr>().ok();
                        if addr.is_none() {
                            self.error(
                                &p,
                                format!("{s:?} is not IP:port (host names are not resolved here)"),
                            );
                        }
                        addr
                    }
                    None => {
                        self.error(
                            &join(path, "server"),
                            "missing (IP:port of the upstream proxy)",
                        );
                        None
                    }
                };
                let username = map
                    .get("username")
                    .and_then(|v| self.string(&join(path, "username"), v));
                let password = match (map.get("password"), map.get("password_file")) {
                    (Some(_), Some(_)) => {
                        self.error(path, "password and password_file exclude each other");
                        None
                    }
                    (Some(v), None) => self.string(&join(path, "password"), v).map(str::to_string),
                    (None, Some(v)) => self.password_file(&join(path, "password_file"), v),
                    (None, None) => None,
                };
                let auth = match (username, password) {
                    (Some(u), Some(p)) => {
                        // RFC 1929 carries each in one length byte.
                        if ty == "socks5" && (u.is_empty() || u.len() > 255 || p.len() > 255) {
                            self.error(path, "socks5 username and password must be 1 to 255 bytes");
                        }
                        Some(Credentials {
                            username: u.to_string(),
                            password: p,
                        })
                    }
                    (None, None) => None,
                    // A password that could not be read was reported already.
                    (Some(_), None)
                        if map.contains_key("password") || map.contains_key("password_file") =>
                    {
                        None
                    }
                    _ => {
                        self.error(path, "username and password go together");
                        None
                    }
                };
                let server = server?;
                Some(if ty == "socks5" {
                    Outbound::Socks5 { server, auth }
                } else {
                    Outbound::Http { server, auth }
                })
            }
            other => {
                self.error(
                    &kind_path,
                    format!("{other:?} is not one of: direct, block, ask, socks5, http"),
                );
                None
            }
        }
    }

    fn control(&mut self, value: &Value, control: &mut Control) {
        let Some(map) = self.object("control", value, &["enable", "socket", "group"]) else {
            return;
        };
        if let Some(v) = map.get("enable") {
            if let Some(b) = self.bool("control.enable", v) {
                control.enable = b;
            }
        }
        if let Some(v) = map.get("socket") {
            if let Some(path) = self.absolute_path("control.socket", v) {
                control.socket = path;
            }
        }
        match map.get("group") {
            None | Some(Value::Null) => {}
            Some(v) => {
                if let Some(name) = self.string("control.group", v) {
                    if crate::control::socket::valid_group_name(name) {
                        control.group = Some(name.to_string());
                    } else {
                        self.error(
                            "control.group",
                            format!("{name:?} is not a group name (letters, digits, ., _, -)"),
                        );
                    }
                }
            }
        }
    }

    fn absolute_path(&mut self, path: &str, value: &Value) -> Option<PathBuf> {
        let s = self.string(path, value)?;
        if !s.starts_with('/') || s.split('/').any(|part| part == "..") {
            self.error(
                path,
                format!("{s:?} is not an absolute path without \"..\""),
            );
            return None;
        }
        Some(PathBuf::from(s))
    }

    /// A rule of the config (`extra` empty) or a runtime rule, whose own
    /// keys (`id`, `ttl`, ...) its caller reads; a runtime rule cannot be
    /// `locked`.
    fn rule(
        &mut self,
        path: &str,
        value: &Value,
        outbounds: &BTreeMap<String, Outbound>,
        cgroups: &[String],
        extra: &[&str],
    ) -> Option<Rule> {
        let mut known = vec!["name", "domains", "ips", "ports", "agents", "outbound"];
        known.extend_from_slice(&PROCESS_FIELDS);
        if extra.is_empty() {
            known.push("locked");
        }
        known.extend_from_slice(extra);
        let map = self.object(path, value, &known)?;
        let locked = match map.get("locked") {
            Some(v) => self.bool(&join(path, "locked"), v).unwrap_or(true),
            None => false,
        };
        let name = match map.get("name") {
            Some(v) => self.string(&join(path, "name"), v)?.to_string(),
            None => path.to_string(),
        };
        let domains = map
            .get("domains")
            .and_then(|v| {
                self.array(&join(path, "domains"), v, |r, p, v| {
                    let s = r.string(p, v)?;
                    DomainPattern::parse(s)
                        .map_err(|e| r.error(p, e.to_string()))
                        .ok()
                })
            })
            .unwrap_or_default();
        let ips = map
            .get("ips")
            .and_then(|v| self.array(&join(path, "ips"), v, cidr))
            .unwrap_or_default();
        let ports = map
            .get("ports")
            .and_then(|v| self.array(&join(path, "ports"), v, port_range))
            .unwrap_or_default();
        let agents = self.agents_field(path, map, cgroups);
        let process = self.process_selectors(path, map);
        let outbound_path = join(path, "outbound");
        let outbound = match map.get("outbound") {
            Some(v) => {
                let o = self.string(&outbound_path, v)?;
                if !outbounds.contains_key(o) {
                    self.error(&outbound_path, format!("no outbound named {o:?}"));
                }
                o.to_string()
            }
            None => {
                self.error(&outbound_path, "missing (the name of an outbound)");
                return None;
            }
        };
        self.no_empty_lists(path, map, &["domains", "ips", "ports", "agents"]);
        self.no_empty_lists(path, map, &PROCESS_FIELDS);
        Some(Rule {
            name,
            domains,
            ips,
            ports,
            agents,
            process,
            outbound,
            locked,
        })
    }

    fn process_selectors(&mut self, path: &str, map: &Map<String, Value>) -> ProcessSelectors {
        let field =
            |r: &mut Self, key: &str, item: fn(&mut Self, &str, &Value) -> Option<String>| {
                map.get(key)
                    .and_then(|v| r.array(&join(path, key), v, item))
                    .unwrap_or_default()
            };
        ProcessSelectors {
            process: field(self, "process", exe_glob),
            comm: field(self, "comm", comm_glob),
            ancestor: field(self, "ancestor", exe_glob),
            cgroup: field(self, "cgroup", sub_cgroup),
            exe_sha256: field(self, "exe_sha256", sha256_hex),
            user: map
                .get("user")
                .and_then(|v| self.array(&join(path, "user"), v, user_spec))
                .unwrap_or_default(),
        }
    }

    fn audit(&mut self, value: &Value, audit: &mut Audit) {
        let Some(map) = self.object("audit", value, &["path", "start_events", "queue", "format"])
        else {
            return;
        };
        if let Some(v) = map.get("path") {
            if let Some(s) = self.string("audit.path", v) {
                match s {
                    "-" => audit.path = None,
                    "" => self.error("audit.path", "empty: use \"-\" for standard output"),
                    s if !s.starts_with('/') => self.error(
                        "audit.path",
                        format!("{s:?} is relative: give an absolute path, or \"-\""),
                    ),
                    s => audit.path = Some(PathBuf::from(s)),
                }
            }
        }
        if let Some(v) = map.get("start_events") {
            if let Some(b) = self.bool("audit.start_events", v) {
                audit.start_events = b;
            }
        }
        if let Some(v) = map.get("queue") {
            if let Some(n) = self.u64_in("audit.queue", v, 16, 1 << 24) {
                audit.queue = n as usize;
            }
        }
        if let Some(v) = map.get("format") {
            match v.as_str() {
                Some("json") => audit.format = AuditFormat::Json,
                Some("ocsf") => audit.format = AuditFormat::Ocsf,
                _ => self.error("audit.format", format!("{v} is not \"json\" or \"ocsf\"")),
            }
        }
    }

    fn limits(&mut self, value: &Value, limits: &mut Limits) {
        let Some(map) = self.object(
            "limits",
            value,
            &[
                "connections",
                "sniff_bytes",
                "sniff_timeout_ms",
                "idle_timeout_s",
                "connect_timeout_ms",
            ],
        ) else {
            return;
        };
        let fields: [(&str, u64, u64, &mut u64); 3] = [
            ("sniff_timeout_ms", 10, 60_000, &mut limits.sniff_timeout_ms),
            (
                "idle_timeout_s",
                1,
                7 * 24 * 3600,
                &mut limits.idle_timeout_s,
            ),
            (
                "connect_timeout_ms",
                10,
                120_000,
                &mut limits.connect_timeout_ms,
            ),
        ];
        for (key, min, max, slot) in fields {
            if let Some(v) = map.get(key) {
                if let Some(n) = self.u64_in(&join("limits", key), v, min, max) {
                    *slot = n;
                }
            }
        }
        if let Some(v) = map.get("connections") {
            if let Some(n) = self.u64_in("limits.connections", v, 1, 1_000_000) {
                limits.connections = n as usize;
            }
        }
        if let Some(v) = map.get("sniff_bytes") {
            // A TLS ClientHello with post-quantum key shares needs ~2 KB.
            if let Some(n) = self.u64_in("limits.sniff_bytes", v, 2048, 65536) {
                limits.sniff_bytes = n as usize;
            }
        }
    }
}

/// The rule fields on the connecting process.
const PROCESS_FIELDS: [&str; 6] = [
    "process",
    "comm",
    "user",
    "ancestor",
    "cgroup",
    "exe_sha256",
];

/// An executable's path, or a glob on it: `/usr/bin/curl`, `*/git`.
fn exe_glob(r: &mut Reader, path: &str, v: &Value) -> Option<String> {
    let s = r.string(path, v)?;
    if !(s.starts_with('/') || s.starts_with('*')) {
        r.error(
            path,
            format!("{s:?} is not an absolute path or a glob starting with * (\"*/git\")"),
        );
        return None;
    }
    Some(s.to_string())
}

/// The kernel keeps 15 bytes of a command name: a longer literal never matches.
fn comm_glob(r: &mut Reader, path: &str, v: &Value) -> Option<String> {
    let s = r.string(path, v)?;
    let glob = s.contains(['*', '?']);
    if s.is_empty() || (!glob && s.len() > 15) {
        r.error(
            path,
            format!("{s:?} is not a command name (1 to 15 bytes, as /proc/PID/comm has it)"),
        );
        return None;
    }
    Some(s.to_string())
}

/// `browser.scope`, `app.slice/chromium.scope`: below the agent's cgroup.
fn sub_cgroup(r: &mut Reader, path: &str, v: &Value) -> Option<String> {
    let s = r.string(path, v)?.trim_end_matches('/');
    if s.is_empty()
        || s.starts_with('/')
        || s.split('/').any(|c| c.is_empty() || c == "." || c == "..")
    {
        r.error(
            path,
            format!("{s:?} is not a cgroup path relative to the agent's (\"browser.scope\")"),
        );
        return None;
    }
    Some(s.to_string())
}

fn sha256_hex(r: &mut Reader, path: &str, v: &Value) -> Option<String> {
    let s = r.string(path, v)?;
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        r.error(
            path,
            format!("{s:?} is not a SHA-256 digest (64 hex digits)"),
        );
        return None;
    }
    Some(s.to_ascii_lowercase())
}

/// A uid, or a user name as /etc/passwd has it.
fn user_spec(r: &mut Reader, path: &str, v: &Value) -> Option<UserSpec> {
    if let Value::Number(n) = v {
        // (uid_t)-1 means "no uid" to the kernel.
        return match n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n != u32::MAX)
        {
            Some(uid) => Some(UserSpec::Uid(uid)),
            None => {
                r.error(path, format!("{n} is not a uid (0 to 4294967294)"));
                None
            }
        };
    }
    let s = r.string(path, v)?;
    let valid = !s.is_empty()
        && s.len() <= 32
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-$".contains(&b));
    if !valid {
        r.error(path, format!("{s:?} is not a user name or a uid"));
        return None;
    }
    Some(UserSpec::Name(s.to_string()))
}

fn cidr(r: &mut Reader, path: &str, v: &Value) -> Option<Cidr> {
    let s = r.string(path, v)?;
    let c = Cidr::parse(s);
    if c.is_none() {
        r.error(path, format!("{s:?} is not a CIDR"));
    }
    c
}

fn port_range(r: &mut Reader, path: &str, v: &Value) -> Option<PortRange> {
    let parsed = match v {
        Value::Number(_) => v
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .map(|p| (p, p)),
        Value::String(s) => s.split_once('-').and_then(|(a, b)| {
            Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?))
        }),
        _ => None,
    };
    match parsed {
        Some((first, last)) if first >= 1 && first <= last => Some(PortRange { first, last }),
        _ => {
            r.error(
                path,
                format!("{v} is not a port (1-65535) or a range \"first-last\""),
            );
            None
        }
    }
}

/// `1.2.3.4`, `1.2.3.4:53`, `::1`, `[::1]:53`.
fn parse_socket_addr(s: &str, default_port: u16) -> Option<SocketAddr> {
    s.parse::<SocketAddr>().ok().or_else(|| {
        s.parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, default_port))
    })
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(json: &str) -> Vec<String> {
        match Config::from_json(json) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn who_answers_decides_whether_a_config_may_ask() {
        let asks = r#"{"rules": [{"domains": ["a.test"], "outbound": "ask"}]}"#;
        let errors_for = |answerer| match Config::from_json_for(asks, answerer) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        };
        // exec --ask answers on its terminal, without a control API.
        assert_eq!(errors_for(Answerer::Terminal), Vec::<String>::new());
        assert_eq!(
            errors_for(Answerer::Nobody),
            vec!["rules[0].outbound: asks a supervisor, and exec answers questions only with --ask (on its terminal)"]
        );
        assert_eq!(errors_for(Answerer::ControlApi), errors(asks));
        let with_control = r#"{"control": {"enable": true}, "default": "ask"}"#;
        assert!(Config::from_json_for(with_control, Answerer::ControlApi).is_ok());
        assert!(
            Config::from_json_for(with_control, Answerer::Nobody).is_err(),
            "exec serves no control API, whatever the config says"
        );
    }

    #[test]
    fn ask_is_checked_by_path_and_needs_someone_to_answer() {
        let c = Config::from_json(
            r#"{"control": {"enable": true}, "default": "ask",
                "outbounds": {"corp": {"type": "socks5", "server": "192.0.2.9:1080"}},
                "ask": {"timeout_ms": 500, "fallback": "allow", "max_held": 3, "outbound": "corp"}}"#,
        )
        .unwrap();
        assert_eq!(
            c.ask,
            Ask {
                timeout_ms: 500,
                fallback: AskFallback::Allow,
                max_held: 3,
                outbound: "corp".into(),
            }
        );
        assert_eq!(
            errors(r#"{"ask": {"outbound": "nowhere"}}"#),
            vec!["ask.outbound: no outbound named \"nowhere\""]
        );
        assert_eq!(
            errors(r#"{"ask": {"outbound": "block"}}"#),
            vec!["ask.outbound: \"block\" lets nothing through: an allowed answer needs an outbound that does"]
        );
        assert_eq!(c.outbounds.get("ask"), Some(&Outbound::Ask));
        assert_eq!(
            errors(r#"{"default": "ask", "rules": [{"domains": ["a.test"], "outbound": "ask"}]}"#),
            vec![
                "default: asks a supervisor, and without control.enable nobody can answer",
                "rules[0].outbound: asks a supervisor, and without control.enable nobody can answer",
            ]
        );
        assert_eq!(
            errors(
                r#"{"ask": {"timeout_ms": 5, "fallback": "maybe", "max_held": 0, "colour": 1}}"#
            ),
            vec![
                "ask.colour: unknown key (expected one of: timeout_ms, fallback, max_held, outbound)",
                "ask.timeout_ms: 5 is out of range (100..=3600000)",
                "ask.max_held: 0 is out of range (1..=65536)",
                "ask.fallback: \"maybe\" is not \"allow\" or \"block\"",
            ]
        );
    }

    #[test]
    fn empty_object_is_the_default_policy() {
        let c = Config::from_json("{}").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.default, "block");
    }

    #[test]
    fn full_example_parses() {
        let c = Config::from_json(FULL_EXAMPLE).unwrap();
        assert_eq!(c.listen.port, 15001);
        assert_eq!(c.interception.cgroups, vec!["agents.slice"]);
        assert_eq!(c.interception.delegated_subtrees, DelegatedSubtrees::Refuse);
        assert_eq!(c.rules.len(), 3);
        assert_eq!(c.rules[0].name, "registries");
        assert_eq!(c.rules[2].name, "rules[2]");
        assert_eq!(
            c.rules[0].domains,
            vec![
                DomainPattern::NameAndSubdomains("crates.io".into()),
                DomainPattern::Exact("github.com".into()),
                DomainPattern::SubdomainsOnly("githubusercontent.com".into()),
            ]
        );
        assert_eq!(
            c.rules[1].ports,
            vec![
                PortRange {
                    first: 443,
                    last: 443
                },
                PortRange {
                    first: 8000,
                    last: 8100
                }
            ]
        );
        assert!(matches!(
            c.outbounds["tor"],
            Outbound::Socks5 { auth: None, .. }
        ));
        assert!(matches!(
            c.outbounds["corp"],
            Outbound::Http { auth: Some(_), .. }
        ));
        assert_eq!(c.dns.domain_dial, DomainDial::Verify);
        assert_eq!(c.mode, Mode::Enforce);
        assert_eq!(
            c.audit.path.as_deref(),
            Some(Path::new("/var/log/agent-egress/audit.jsonl"))
        );
        assert_eq!(c.audit.format, AuditFormat::Ocsf);
    }

    #[test]
    fn rules_by_process_parse() {
        let c = Config::from_json(&format!(
            r#"{{"rules": [{{"process": ["/usr/bin/curl", "*/git"], "comm": ["node"],
                "user": [1000, "agent"], "ancestor": ["*/git"], "cgroup": ["browser.scope/"],
                "exe_sha256": ["{}"], "outbound": "direct"}}]}}"#,
            "AB".repeat(32)
        ))
        .unwrap();
        let p = &c.rules[0].process;
        assert_eq!(p.process, ["/usr/bin/curl", "*/git"]);
        assert_eq!(p.comm, ["node"]);
        assert_eq!(
            p.user,
            [UserSpec::Uid(1000), UserSpec::Name("agent".into())]
        );
        assert_eq!(p.ancestor, ["*/git"]);
        assert_eq!(p.cgroup, ["browser.scope"]);
        assert_eq!(p.exe_sha256, ["ab".repeat(32)]);
        assert!(Config::from_json(r#"{"rules": [{"outbound": "direct"}]}"#)
            .unwrap()
            .rules[0]
            .process
            .is_empty());
    }

    #[test]
    fn errors_name_their_json_paths_all_at_once() {
        let e = errors(
            r#"{
              "listen": {"port": 70000},
              "outbounds": {"x": {"type": "ftp"}},
              "rules": [
                {"ips": ["10.0.0.300/8"], "outbound": "direct"},
                {"domains": ["a.com"], "outbound": "direct"},
                {"domains": ["b.com"], "outbound": "nowhere"}
              ],
              "bogus": 1
            }"#,
        );
        assert_eq!(
            e,
            vec![
                "bogus: unknown key (expected one of: listen, interception, dns, outbounds, rules, default, audit, mode, limits, loopback, control, state_dir, ask)",
                "listen.port: 70000 is out of range (1..=65535)",
                "outbounds.x.type: \"ftp\" is not one of: direct, block, ask, socks5, http",
                "rules[0].ips[0]: \"10.0.0.300/8\" is not a CIDR",
                "rules[2].outbound: no outbound named \"nowhere\"",
            ]
        );
    }

    #[test]
    fn bad_values_are_refused_with_reasons() {
        let cases = [
            (
                r#"{"default": "nope"}"#,
                "default: no outbound named \"nope\"",
            ),
            (
                r#"{"mode": "yolo"}"#,
                "mode: \"yolo\" is not \"enforce\" or \"audit\"",
            ),
            (
                r#"{"audit": {"format": "cef"}}"#,
                "audit.format: \"cef\" is not \"json\" or \"ocsf\"",
            ),
            (
                r#"{"control": {"socket": "control.sock"}}"#,
                "control.socket: \"control.sock\" is not an absolute path",
            ),
            (
                r#"{"control": {"group": "a:b"}}"#,
                "control.group: \"a:b\" is not a group name",
            ),
            (r#"{"control": {"enable": 1}}"#, "control.enable: expected true or false"),
            (r#"{"control": {"port": 1}}"#, "control.port: unknown key"),
            (r#"{"state_dir": "/var/../etc"}"#, "state_dir: \"/var/../etc\""),
            (
                r#"{"rules": [{"ips": ["10.0.0.0/8"], "outbound": "block", "locked": "yes"}]}"#,
                "rules[0].locked: expected true or false",
            ),
            (
                r#"{"rules": [{"domains": ["*.*.x.com"], "outbound": "direct"}]}"#,
                "rules[0].domains[0]",
            ),
            (
                r#"{"rules": [{"domains": ["1.2.3.4"], "outbound": "direct"}]}"#,
                "put it in \"ips\"",
            ),
            (
                r#"{"rules": [{"ports": ["9-1"], "outbound": "direct"}]}"#,
                "rules[0].ports[0]",
            ),
            (
                r#"{"rules": [{"ports": [0], "outbound": "direct"}]}"#,
                "rules[0].ports[0]",
            ),
            (
                r#"{"rules": [{"agents": ["x.slice"], "outbound": "direct"}]}"#,
                "rules[0].agents[0]: \"x.slice\" is not one of interception.cgroups",
            ),
            (
                r#"{"rules": [{"domains": [], "outbound": "direct"}]}"#,
                "rules[0].domains: an empty list matches nothing",
            ),
            (
                r#"{"rules": [{"domains": ["a.com"]}]}"#,
                "rules[0].outbound: missing",
            ),
            (
                r#"{"rules": [{"process": ["curl"], "outbound": "direct"}]}"#,
                "rules[0].process[0]: \"curl\" is not an absolute path or a glob starting with *",
            ),
            (
                r#"{"rules": [{"ancestor": "*/git", "outbound": "direct"}]}"#,
                "rules[0].ancestor: expected an array, found a string",
            ),
            (
                r#"{"rules": [{"comm": ["a-very-long-command-name"], "outbound": "direct"}]}"#,
                "rules[0].comm[0]: \"a-very-long-command-name\" is not a command name (1 to 15 bytes",
            ),
            (
                r#"{"rules": [{"user": [-1], "outbound": "direct"}]}"#,
                "rules[0].user[0]: -1 is not a uid",
            ),
            (
                r#"{"rules": [{"user": ["ro ot"], "outbound": "direct"}]}"#,
                "rules[0].user[0]: \"ro ot\" is not a user name or a uid",
            ),
            (
                r#"{"rules": [{"cgroup": ["../escape.scope"], "outbound": "direct"}]}"#,
                "rules[0].cgroup[0]: \"../escape.scope\" is not a cgroup path relative to the agent's",
            ),
            (
                r#"{"rules": [{"cgroup": ["/abs.scope"], "outbound": "direct"}]}"#,
                "rules[0].cgroup[0]",
            ),
            (
                r#"{"rules": [{"exe_sha256": ["abc"], "outbound": "direct"}]}"#,
                "rules[0].exe_sha256[0]: \"abc\" is not a SHA-256 digest (64 hex digits)",
            ),
            (
                r#"{"rules": [{"process": [], "outbound": "direct"}]}"#,
                "rules[0].process: an empty list matches nothing",
            ),
            (
                r#"{"interception": {"cgroups": ["../etc"]}}"#,
                "interception.cgroups[0]",
            ),
            (
                r#"{"interception": {"cgroups": ["/agents.slice"]}}"#,
                "not absolute",
            ),
            (r#"{"interception": {"route_table": 254}}"#, "system table"),
            (
                r#"{"interception": {"delegated_subtrees": "escape"}}"#,
                "interception.delegated_subtrees: \"escape\" is not \"capture\", \"refuse\" or \"ignore\"",
            ),
            (
                r#"{"interception": {"mark": 0}}"#,
                "interception.mark: 0 is out of range",
            ),
            (
                r#"{"outbounds": {"s": {"type": "socks5", "server": "proxy.example:1080"}}}"#,
                "outbounds.s.server",
            ),
            (
                r#"{"outbounds": {"s": {"type": "socks5", "server": "127.0.0.1:1080", "username": "u"}}}"#,
                "go together",
            ),
            (
                r#"{"outbounds": {"d": {"type": "direct", "mark": 2785}}}"#,
                "interception mark",
            ),
            (
                r#"{"outbounds": {"d": {"type": "direct", "interface": "a-very-long-interface-name"}}}"#,
                "outbounds.d.interface",
            ),
            (
                r#"{"audit": {"path": "audit.log"}}"#,
                "audit.path: \"audit.log\" is relative",
            ),
            (r#"{"dns": {"servers": ["resolver"]}}"#, "dns.servers[0]"),
            (
                r#"{"limits": {"sniff_bytes": 100}}"#,
                "limits.sniff_bytes: 100 is out of range",
            ),
            (
                r#"{"listen": {"addresses": []}}"#,
                "listen.addresses: at least one",
            ),
            (
                r#"{"listen": "x"}"#,
                "listen: expected an object, found a string",
            ),
            (r#"[1]"#, "expected an object, found an array"),
            (r#"{"#, "not valid JSON"),
        ];
        for (json, want) in cases {
            let e = errors(json);
            assert!(
                e.iter().any(|m| m.contains(want)),
                "{json}: expected an error containing {want:?}, got {e:?}"
            );
        }
    }

    #[test]
    fn password_file_is_read_at_load_and_checked_without_reading() {
        let dir = std::env::temp_dir().join(format!("ae-config-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("corp");
        std::fs::write(&secret, "s3cret\n").unwrap();
        let json = |file: &str| {
            format!(
                r#"{{"outbounds": {{"corp": {{"type": "http", "server": "127.0.0.1:3128",
                    "username": "agent", "password_file": "{file}"}}}}}}"#
            )
        };
        let config = Config::from_json(&json(secret.to_str().unwrap())).unwrap();
        let want = Some(Credentials {
            username: "agent".into(),
            password: "s3cret".into(),
        });
        assert!(
            matches!(config.outbounds.get("corp"), Some(Outbound::Http { auth, .. }) if *auth == want)
        );

        let missing = dir.join("missing");
        let missing = missing.to_str().unwrap();
        let errs = errors(&json(missing));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with(&format!(
                "outbounds.corp.password_file: cannot read {missing}: "
            )),
            "{errs:?}"
        );
        // `check --no-secret-files`: the path is checked, the file not read.
        assert!(Config::from_json_with(&json(missing), SecretFiles::Skip).is_ok());
        let relative = Config::from_json_with(&json("corp.pass"), SecretFiles::Skip).unwrap_err();
        assert!(
            relative.to_string().contains("is not an absolute path"),
            "{relative}"
        );

        std::fs::write(&secret, "\n").unwrap();
        let errs = errors(&json(secret.to_str().unwrap()));
        assert!(errs[0].ends_with("is empty"), "{errs:?}");

        let both = r#"{"outbounds": {"corp": {"type": "socks5", "server": "127.0.0.1:1080",
            "username": "agent", "password": "x", "password_file": "/run/x"}}}"#;
        assert_eq!(
            errors(both),
            vec!["outbounds.corp: password and password_file exclude each other"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn backstop_auto_goes_on_only_where_the_agents_need_nothing_off_loopback() {
        let wanted = |json: &str| Config::from_json(json).expect(json).backstop_wanted();
        assert_eq!(wanted("{}"), Ok(true));
        assert_eq!(
            wanted(r#"{"dns": {"servers": ["127.0.0.53", "[::1]:53"]}}"#),
            Ok(true)
        );
        // Captured (the default), the agents' DNS goes to the handler on lo.
        assert_eq!(wanted(r#"{"dns": {"servers": ["192.0.2.53"]}}"#), Ok(true));
        let uncaptured = r#"{"dns": {"servers": ["127.0.0.53", "192.0.2.53"], "capture": false}}"#;
        let off = wanted(uncaptured).unwrap_err().to_string();
        assert!(
            off.contains("192.0.2.53:53") && off.contains("dns.servers"),
            "{off}"
        );
        let off = wanted(r#"{"interception": {"bypass": ["10.0.0.0/8"]}}"#)
            .unwrap_err()
            .to_string();
        assert!(off.contains("10.0.0.0/8"), "{off}");
        // Said outright, it is what was said.
        let on = r#"{"dns": {"servers": ["192.0.2.53"]}, "interception": {"backstop": true}}"#;
        assert_eq!(wanted(on), Ok(true));
        assert_eq!(
            wanted(r#"{"interception": {"backstop": false}}"#),
            Ok(false)
        );
        let errors = Config::from_json(r#"{"interception": {"backstop": "yes"}}"#).unwrap_err();
        assert_eq!(errors.0[0].path, "interception.backstop", "{errors:?}");
    }

    #[test]
    fn cidr_contains() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains("10.1.255.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let c = Cidr::parse("2001:db8::/33").unwrap();
        assert!(c.contains("2001:db8:7fff::1".parse().unwrap()));
        assert!(!c.contains("2001:db8:8000::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert_eq!(Cidr::parse("1.2.3.4").unwrap().prefix, 32);
        assert!(Cidr::parse("1.2.3.4/33").is_none());
    }

    pub const FULL_EXAMPLE: &str = r#"{
      "listen": {"port": 15001, "addresses": ["127.0.0.1", "::1"], "workers": 0},
      "interception": {
        "manage_kernel": true,
        "cgroups": ["agents.slice"],
        "table": "agent_egress",
        "mark": 2785,
        "route_table": 2785,
        "bypass": ["192.168.1.0/24"],
        "delegated_subtrees": "refuse"
      },
      "dns": {"servers": ["127.0.0.53", "[::1]:53"], "timeout_ms": 2000, "domain_dial": "verify"},
      "outbounds": {
        "tor": {"type": "socks5", "server": "127.0.0.1:9050"},
        "corp": {"type": "http", "server": "[::1]:3128", "username": "agent", "password": "s3cret"},
        "wan2": {"type": "direct", "interface": "wg0", "mark": 100}
      },
      "rules": [
        {"name": "registries", "domains": ["crates.io", "=github.com", "*.githubusercontent.com"], "outbound": "direct"},
        {"name": "intranet", "ips": ["10.0.0.0/8", "fd00::/8"], "ports": [443, "8000-8100"], "outbound": "corp"},
        {"domains": ["onion.example"], "agents": ["agents.slice"], "outbound": "tor"}
      ],
      "default": "block",
      "audit": {"path": "/var/log/agent-egress/audit.jsonl", "start_events": false, "queue": 65536, "format": "ocsf"},
      "mode": "enforce",
      "limits": {"connections": 8192, "sniff_bytes": 16384, "sniff_timeout_ms": 3000, "idle_timeout_s": 300, "connect_timeout_ms": 5000}
    }"#;
}
