//! The test world: an agent host and an internet in two network namespaces, real
//! servers in the internet, and a cgroup for the agent. Everything is torn down
//! when the `World` is dropped, also when the test panics.

use std::ffi::OsStr;
use std::fmt::Display;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::arrivals;
use super::cgroup::{self, cgroup2_root, Cgroup};
use super::dns::DnsmasqFiles;
use super::files::{self, ServedFile};
use super::leftovers;
use super::names::Names;
use super::netns::{self, in_netns};
use super::nginx::NginxFiles;
use super::process::{run, run_with_input, ChildGuard};
use super::tls::TestCa;
use super::topology::*;

/// How long nginx and dnsmasq may take to accept connections.
const SERVERS_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// curl's default `--max-time` in [`World::curl_agent`].
const CURL_MAX_TIME_SECS: u32 = 10;

pub struct World {
    teardown: Teardown,
    agent: Cgroup,
    ca: TestCa,
    nginx: NginxFiles,
    dnsmasq: DnsmasqFiles,
    /// Numbers the files the world writes on request (configs, logs, profiles).
    next_file: AtomicU32,
    /// Chromium's HOME, holding the NSS database that trusts the test CA.
    chromium_home: OnceLock<PathBuf>,
}

impl World {
    /// Builds a fresh world. Panics, naming the step and the error, when any step
    /// fails; what was built so far is removed first. Call
    /// [`super::require_root_and_tools`] before.
    pub fn new() -> World {
        let mut teardown = Teardown::claim().unwrap_or_else(|e| panic!("test world: {e}"));
        let names = teardown.names.clone();
        let net_ns = names.net_ns();
        let must = |what: &str, result: Result<(), String>| {
            if let Err(e) = result {
                panic!("test world {}: {what}: {e}", names.id);
            }
        };

        // openssl takes about as long as the network: do both at once.
        let (ca, network) = std::thread::scope(|scope| {
            let ca = scope.spawn(|| TestCa::generate(&teardown.dir));
            let network = build_network(&names)
                .and_then(|()| write_resolv_conf(&names))
                .and_then(|()| arrivals::install(enter_netns(&net_ns)));
            let ca = ca.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            (ca, network)
        });
        must("network", network);
        let ca = ca.unwrap_or_else(|e| panic!("test world {}: test CA: {e}", names.id));
        let agent = Cgroup::create(&teardown.cgroup_root, &names.dir_name())
            .and_then(|_| {
                let agent = format!("{}/agent", names.dir_name());
                Cgroup::create(&teardown.cgroup_root, &agent)
            })
            .unwrap_or_else(|e| panic!("test world {}: agent cgroup: {e}", names.id));

        let nginx = NginxFiles::new(&teardown.dir);
        let dnsmasq = DnsmasqFiles::new(&teardown.dir);
        must("nginx config", nginx.prepare(&ca));
        must("dnsmasq config", dnsmasq.prepare());
        for server in [
            nginx.spawn(enter_netns(&net_ns)),
            dnsmasq.spawn(enter_netns(&net_ns)),
        ] {
            match server {
                Ok(guard) => teardown.servers.push(guard),
                Err(e) => panic!("test world {}: {e}", names.id),
            }
        }
        must(
            "servers ready",
            wait_for_servers(&names, &mut teardown.servers),
        );

        World {
            teardown,
            agent,
            ca,
            nginx,
            dnsmasq,
            next_file: AtomicU32::new(0),
            chromium_home: OnceLock::new(),
        }
    }

    /// The random id in every name this world uses (8 hex digits).
    pub fn id(&self) -> &str {
        &self.teardown.names.id
    }

    /// The agent host's netns: run the agent (see [`World::agent_cmd`]) and the
    /// daemon (see [`World::host_cmd`]) here.
    pub fn agent_ns(&self) -> String {
        self.teardown.names.agent_ns()
    }

    /// The internet's netns, where the servers run.
    pub fn net_ns(&self) -> String {
        self.teardown.names.net_ns()
    }

    /// This world's temp dir (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.teardown.dir
    }

    /// The test CA certificate, for `curl --cacert` and the like.
    pub fn ca_cert(&self) -> &Path {
        &self.ca.ca_cert
    }

    /// The whole test PKI (CA, server certificate and key).
    pub fn tls(&self) -> &TestCa {
        &self.ca
    }

    /// The agent's cgroup `<cgroup2 root>/ae-test-<id>/agent`.
    pub fn agent(&self) -> &Cgroup {
        &self.agent
    }

    /// Makes another cgroup `ae-test-<id>/<name>` (e.g. a second agent); removed on drop.
    pub fn add_cgroup(&self, name: &str) -> Cgroup {
        let relative = format!("{}/{name}", self.teardown.names.dir_name());
        Cgroup::create(&self.teardown.cgroup_root, &relative).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A command that runs in the agent netns AND the agent cgroup from its first
    /// instruction on, with the agent netns' resolv.conf (`ip netns exec`). Add
    /// arguments, stdio, env as for any `Command`.
    pub fn agent_cmd<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&self, args: I) -> Command {
        self.cgroup_cmd(&self.agent, args)
    }

    /// Like [`World::agent_cmd`] for any cgroup (e.g. one from [`World::add_cgroup`]).
    pub fn cgroup_cmd<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(
        &self,
        cgroup: &Cgroup,
        args: I,
    ) -> Command {
        // The shell joins the cgroup first: inside `ip netns exec` the cgroup2 mount is
        // hidden by a fresh /sys.
        let mut cmd = joining(cgroup);
        cmd.args(["ip", "netns", "exec", &self.agent_ns()])
            .args(args);
        cmd
    }

    /// Like [`World::cgroup_cmd`], but only the netns changes (as for
    /// [`World::host_cmd`]): the command sees the cgroup2 mount (and the machine's
    /// resolv.conf: use addresses).
    pub fn cgroup_host_cmd<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(
        &self,
        cgroup: &Cgroup,
        args: I,
    ) -> Command {
        let mut cmd = joining(cgroup);
        cmd.arg("nsenter")
            .args(nsenter_args(&self.agent_ns()))
            .args(args);
        cmd
    }

    /// A command in the agent netns but NOT in the agent cgroup: the daemon's place.
    /// Only the netns changes (`nsenter --net`): it sees the machine's mounts,
    /// cgroup2 included, and the machine's /etc/resolv.conf (useless in there: use
    /// addresses).
    pub fn host_cmd<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&self, args: I) -> Command {
        let mut cmd = enter_netns(&self.agent_ns());
        cmd.args(args);
        cmd
    }

    /// A command in the internet netns (`nsenter --net`, as for [`World::host_cmd`]).
    pub fn net_cmd<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&self, args: I) -> Command {
        let mut cmd = enter_netns(&self.net_ns());
        cmd.args(args);
        cmd
    }

    /// Runs `curl -sS --max-time 10 --cacert CA ARGS...` as the agent and returns its
    /// output (check `status` yourself). Names resolve through the agent netns'
    /// resolv.conf (dnsmasq); pin them instead with `--resolve`, see
    /// [`TestHost::resolve_v4`].
    pub fn curl_agent<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&self, args: I) -> Output {
        let max_time = CURL_MAX_TIME_SECS.to_string();
        let mut cmd = self.agent_cmd([
            "curl",
            "-sS",
            "--noproxy",
            "*",
            "--max-time",
            &max_time,
            "--cacert",
        ]);
        cmd.arg(self.ca_cert()).args(args);
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run curl: {e}"))
    }

    /// Writes `json` (a `serde_json::Value`, a string, ...) to a new file in the temp
    /// dir and returns its path.
    pub fn write_config(&self, json: impl Display) -> PathBuf {
        let n = self.next_file.fetch_add(1, Ordering::Relaxed);
        let path = self.dir().join(format!("config-{n}.json"));
        std::fs::write(&path, json.to_string())
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// Starts `cmd` (from [`World::agent_cmd`], [`World::host_cmd`], [`World::net_cmd`]
    /// ...) with its output in a log file in the temp dir; it is stopped (SIGTERM,
    /// then SIGKILL) when the guard drops.
    pub fn spawn(&self, name: &str, cmd: Command) -> ChildGuard {
        let n = self.next_file.fetch_add(1, Ordering::Relaxed);
        let log = self.dir().join(format!("{name}-{n}.log"));
        ChildGuard::spawn(cmd, name, &log).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `args` in the agent netns, not in the agent cgroup: the daemon's way
    /// to run. See [`World::spawn`].
    pub fn spawn_host<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&self, args: I) -> ChildGuard {
        let cmd = self.host_cmd(args);
        // The program's base name, past `nsenter --net=... --`.
        let name = cmd
            .get_args()
            .nth(2)
            .and_then(|program| Path::new(program).file_name())
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.spawn(&name, cmd)
    }

    /// Headless Chromium as the agent, trusting the test CA, with a fresh profile,
    /// bounded to 60 s; add e.g. `--dump-dom URL` and
    /// `--host-resolver-rules=MAP allowed.test 198.51.100.10` (without rules it
    /// resolves through the agent netns' resolv.conf).
    pub fn chromium_agent<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(&self, args: I) -> Command {
        self.chromium_agent_with_profile(&self.chromium_profile(), args)
    }

    /// A new profile directory's path for [`World::chromium_agent_with_profile`].
    pub fn chromium_profile(&self) -> PathBuf {
        let n = self.next_file.fetch_add(1, Ordering::Relaxed);
        self.dir().join(format!("chromium-{n}"))
    }

    /// Like [`World::chromium_agent`] with the profile in `profile`: runs sharing it
    /// share what Chromium remembers (e.g. a server's `Alt-Svc`).
    pub fn chromium_agent_with_profile<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(
        &self,
        profile: &Path,
        args: I,
    ) -> Command {
        let home = self.chromium_home.get_or_init(|| {
            let home = self.dir().join("chromium-home");
            self.ca
                .trust_in_nss_db(&home)
                .unwrap_or_else(|e| panic!("{e}"));
            home
        });
        let mut cmd = self.agent_cmd(["timeout", "--kill-after=5", "60", "chromium"]);
        // Chromium on Linux trusts the roots in $HOME/.pki/nssdb.
        cmd.env("HOME", home)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
            ])
            .args([
                "--disable-background-networking",
                "--disable-component-update",
            ])
            .arg("--disable-sync")
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args);
        cmd
    }

    /// Makes a deterministic file of `size` bytes served at `/big/NAME` and
    /// `/slow/NAME` on every host.
    pub fn make_file(&self, name: &str, size: u64) -> ServedFile {
        files::make(&self.nginx.files_dir, name, size).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Packets that arrived in the internet from the agent host and matched
    /// counter `name`: one of the constants in `harness::arrivals`, a host's
    /// `TestHost::counter`, or one made with [`World::add_counter`].
    pub fn count_arrived(&self, name: &str) -> u64 {
        arrivals::read(enter_netns(&self.net_ns()), name).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Adds an arrival counter for the nft match `matches`, e.g.
    /// `("to_8080", "tcp dport 8080")`.
    pub fn add_counter(&self, name: &str, matches: &str) {
        arrivals::add(enter_netns(&self.net_ns()), name, matches).unwrap_or_else(|e| panic!("{e}"))
    }

    /// nginx's access log: one line per request, with server address, client
    /// address, request, Host, SNI and status.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(&self.nginx.access_log).unwrap_or_default()
    }

    /// dnsmasq's log of every query and its answer.
    pub fn dns_log(&self) -> String {
        std::fs::read_to_string(&self.dnsmasq.log).unwrap_or_default()
    }
}

/// A shell that moves itself into `cgroup`, then execs its arguments: the program
/// (and each program it execs in turn) keeps its pid and runs in the cgroup from
/// its first instruction.
fn joining(cgroup: &Cgroup) -> Command {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", r#"echo $$ > "$0" && exec "$@""#])
        .arg(cgroup.procs_file());
    cmd
}

/// `nsenter --net=/run/netns/NS --`, ready for the command to be appended. Unlike
/// `ip netns exec`, it leaves the mounts alone, so the cgroup2 mount stays visible.
/// nsenter execs the command in place: the guarded pid is the command's.
fn enter_netns(ns: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.args(nsenter_args(ns));
    cmd
}

fn nsenter_args(ns: &str) -> [String; 2] {
    [format!("--net={}", netns::path(ns).display()), "--".into()]
}

fn build_network(names: &Names) -> Result<(), String> {
    let (agent_ns, net_ns) = (names.agent_ns(), names.net_ns());
    netns::add(&agent_ns)?;
    netns::add(&net_ns)?;
    for ns in [&agent_ns, &net_ns] {
        // Without DAD, IPv6 addresses are usable the moment they are added.
        in_netns(ns, || {
            for conf in ["all", "default"] {
                let knob = format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad");
                std::fs::write(&knob, "0").map_err(|e| format!("cannot write {knob}: {e}"))?;
            }
            Ok::<(), String>(())
        })?;
    }
    // Created straight inside the namespaces: nothing appears in the root netns.
    run(Command::new("ip")
        .args([
            "link",
            "add",
            AGENT_IFACE,
            "netns",
            &agent_ns,
            "type",
            "veth",
        ])
        .args(["peer", "name", NET_IFACE, "netns", &net_ns]))?;
    // lo at an Ethernet MTU: what the agent sends is captured over lo, and a
    // 1500-byte MTU makes a large ClientHello (Chromium's ~2 KB) reach the
    // proxy in two TCP segments, as it would from a real network.
    let agent_side = format!(
        "link set lo up mtu 1500\n\
         link set {AGENT_IFACE} up\n\
         addr add {AGENT_LINK_V4}/24 dev {AGENT_IFACE}\n\
         addr add {AGENT_LINK_V6}/64 dev {AGENT_IFACE} nodad\n\
         route add default via {NET_LINK_V4}\n\
         route add default via {NET_LINK_V6}\n\
         route add {metadata}/32 via {NET_LINK_V4}\n",
        metadata = METADATA.v4,
    );
    let mut net_side = format!(
        "link set lo up\n\
         link set {NET_IFACE} up\n\
         addr add {NET_LINK_V4}/24 dev {NET_IFACE}\n\
         addr add {NET_LINK_V6}/64 dev {NET_IFACE} nodad\n\
         addr add {DNS_V4}/32 dev lo\n\
         addr add {FORBIDDEN_DNS_V4}/32 dev lo\n"
    );
    for host in ALL_HOSTS {
        net_side.push_str(&format!("addr add {}/32 dev lo\n", host.v4));
        if let Some(v6) = host.v6 {
            net_side.push_str(&format!("addr add {v6}/128 dev lo\n"));
        }
    }
    for (ns, batch) in [(&agent_ns, agent_side), (&net_ns, net_side)] {
        run_with_input(
            Command::new("ip").args(["-n", ns, "-batch", "-"]),
            batch.as_bytes(),
        )?;
    }
    Ok(())
}

/// Gives the agent netns its own resolv.conf pointing at the test resolver.
fn write_resolv_conf(names: &Names) -> Result<(), String> {
    let dir = Names::etc_netns(&names.agent_ns());
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let path = dir.join("resolv.conf");
    std::fs::write(
        &path,
        format!("nameserver {DNS_V4}\noptions timeout:2 attempts:2\n"),
    )
    .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Waits until nginx and dnsmasq accept TCP on the addresses they serve.
fn wait_for_servers(names: &Names, servers: &mut [ChildGuard]) -> Result<(), String> {
    let mut targets: Vec<SocketAddr> = ALL_HOSTS
        .iter()
        .map(|h| SocketAddr::from((h.v4, 80)))
        .collect();
    targets.push(SocketAddr::from((ALLOWED.v4, 443)));
    targets.push(SocketAddr::from((DNS_V4, 53)));
    targets.push(SocketAddr::from((FORBIDDEN_DNS_V4, 53)));
    let deadline = Instant::now() + SERVERS_READY_TIMEOUT;
    loop {
        let waiting: Vec<SocketAddr> = in_netns(&names.net_ns(), || {
            targets
                .iter()
                .copied()
                .filter(|addr| {
                    TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_err()
                })
                .collect()
        });
        if waiting.is_empty() {
            return Ok(());
        }
        for server in servers.iter_mut() {
            if let Some(status) = server.try_wait() {
                return Err(format!(
                    "{} exited ({status}): {}",
                    server.pid(),
                    server.log()
                ));
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "nothing listening on {waiting:?} after {SERVERS_READY_TIMEOUT:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Owns the world's names and removes everything they name on drop, whether the
/// world was fully built or not.
struct Teardown {
    names: Names,
    dir: PathBuf,
    cgroup_root: PathBuf,
    servers: Vec<ChildGuard>,
}

impl Teardown {
    /// Picks a random id and claims it by creating its temp dir.
    fn claim() -> Result<Teardown, String> {
        let cgroup_root = cgroup2_root().ok_or("no cgroup2 mount in /proc/self/mountinfo")?;
        let names = Names::random()?;
        let dir = names.temp_dir();
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        leftovers::mark_live(&names.id);
        let owner = names.owner_file();
        // From here on an early return drops the Teardown, which removes the dir.
        let teardown = Teardown {
            names,
            dir,
            cgroup_root,
            servers: Vec::new(),
        };
        std::fs::write(&owner, std::process::id().to_string())
            .map_err(|e| format!("cannot write {}: {e}", owner.display()))?;
        Ok(teardown)
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        // Order: our servers, the agents' cgroups, then whatever else still runs in
        // the namespaces, the namespaces, and last the files.
        self.servers.clear();
        let mut errors = Vec::new();
        let mut note = |result: Result<(), String>| {
            if let Err(e) = result {
                errors.push(e);
            }
        };
        note(cgroup::remove_tree(
            &self.cgroup_root.join(self.names.dir_name()),
        ));
        for ns in [self.names.agent_ns(), self.names.net_ns()] {
            note(netns::delete(&ns));
            let etc = Names::etc_netns(&ns);
            if etc.exists() {
                note(
                    std::fs::remove_dir_all(&etc)
                        .map_err(|e| format!("cannot remove {}: {e}", etc.display())),
                );
            }
        }
        note(
            std::fs::remove_dir_all(&self.dir)
                .map_err(|e| format!("cannot remove {}: {e}", self.dir.display())),
        );
        leftovers::mark_gone(&self.names.id);
        // Never panic in drop (a second panic aborts the test binary): report.
        for e in errors {
            eprintln!("test world {} teardown: {e}", self.names.id);
        }
    }
}
