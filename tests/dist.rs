// SPDX-License-Identifier: GPL-3.0-or-later
//! dist/systemd/ — the units for systemd distributions other than NixOS — held to
//! the NixOS module's units as vm-tests/systemd/install.json renders them: the same
//! daemon sandbox, capabilities and readiness, the same NFTSet=, backstop and hidden
//! sockets on the agents' slice and drop-in, so the two cannot drift apart. And
//! `systemd-analyze verify` on every dist unit, the drop-ins on a unit of their kind
//! (system, `--user`). systemd_vm.rs runs them under a real systemd.

mod harness;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Where the module's store paths are on a distribution: the static binary in
/// /usr/local/bin (README), coreutils' and systemd's tools in /usr/bin.
const STORE_PATHS: &[(&str, &str)] = &[
    (
        "/nix/store/eval-stub-agent-egress/bin/agent-egress",
        "/usr/local/bin/agent-egress",
    ),
    ("/nix/store/eval-stub-coreutils/bin/", "/usr/bin/"),
];

/// The module's daemon unit is ordered after NixOS's own iptables firewall unit;
/// the distributions' firewall daemon in that place is firewalld.
const FIREWALL_UNITS: (&str, &str) = ("firewall.service", "firewalld.service");

/// Keys of the module's units that only NixOS has (switch-to-configuration's
/// reload and restart triggers): left out of the comparison.
const NIXOS_ONLY: &[&str] = &["X-Reload-Triggers", "X-Restart-Triggers"];

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn dist(name: &str) -> String {
    let path = root().join("dist/systemd").join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The module's rendering of `unit` in install.json's file-audit case, store paths
/// mapped to a distribution's.
fn module(unit: &str) -> String {
    let path = root().join("vm-tests/systemd/install.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let install: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
    let mut text: String = install["cases"]["file-audit"]["units"][unit]
        .as_str()
        .unwrap_or_else(|| panic!("install.json's file-audit case has no unit {unit}"))
        .lines()
        .filter(|line| {
            !NIXOS_ONLY
                .iter()
                .any(|key| line.starts_with(&format!("{key}=")))
        })
        .map(|line| format!("{line}\n"))
        .collect();
    for (from, to) in STORE_PATHS {
        text = text.replace(from, to);
    }
    assert!(
        !text.contains("/nix/store/"),
        "{unit}: a store path without a place on a distribution: {text}"
    );
    text
}

/// A unit file as `(section, key, words)` in file order, one per assignment; a
/// value is split on whitespace, so `K=a b` equals `K=a` then `K=b` (systemd
/// merges list settings that way).
type Settings = Vec<(String, String, Vec<String>)>;

fn parse(text: &str, what: &str) -> Settings {
    let mut section = String::new();
    let mut settings = Settings::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "{what}: a continued line, which this comparison does not read: {line}"
        );
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{what}: not a setting: {line}"));
        assert!(!section.is_empty(), "{what}: {line} before any section");
        settings.push((
            section.clone(),
            key.trim().to_owned(),
            value.split_whitespace().map(str::to_owned).collect(),
        ));
    }
    settings
}

/// Every assignment of `section`'s `key`, words joined in order.
fn values(settings: &Settings, section: &str, key: &str) -> Vec<String> {
    settings
        .iter()
        .filter(|(s, k, _)| s == section && k == key)
        .flat_map(|(_, _, words)| words.iter().cloned())
        .collect()
}

/// The `(section, key)` pairs, each once, in order of first appearance.
fn keys(settings: &Settings) -> Vec<(String, String)> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for (section, key, _) in settings {
        let pair = (section.clone(), key.clone());
        if !keys.contains(&pair) {
            keys.push(pair);
        }
    }
    keys
}

/// `dist` says what `module` says, key by key (every assignment, in order),
/// but for `differ`, which the caller checks itself.
fn assert_same(dist: &Settings, module: &Settings, what: &str, differ: &[(&str, &str)]) {
    let skip = |section: &str, key: &str| differ.iter().any(|(s, k)| *s == section && *k == key);
    let mut all = keys(module);
    for pair in keys(dist) {
        if !all.contains(&pair) {
            all.push(pair);
        }
    }
    let mut wrong = Vec::new();
    for (section, key) in all {
        if skip(&section, &key) {
            continue;
        }
        let (ours, theirs) = (values(dist, &section, &key), values(module, &section, &key));
        if ours != theirs {
            wrong.push(format!(
                "[{section}] {key}: dist {ours:?}, module {theirs:?}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{what} differs from the NixOS module's:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn daemon_unit_matches_the_module() {
    let ours = parse(&dist("agent-egress.service"), "dist agent-egress.service");
    let theirs = parse(
        &module("agent-egress.service"),
        "module agent-egress.service",
    );
    assert_same(&ours, &theirs, "agent-egress.service", &[("Unit", "After")]);
    let after = values(&theirs, "Unit", "After")
        .into_iter()
        .map(|u| {
            if u == FIREWALL_UNITS.0 {
                FIREWALL_UNITS.1.to_owned()
            } else {
                u
            }
        })
        .collect::<Vec<_>>();
    assert_eq!(values(&ours, "Unit", "After"), after, "[Unit] After");
    // What the rest of this file and the VM rely on, named so that a change of the
    // module's rendering cannot take it away from both files unnoticed.
    for (key, want) in [
        ("Type", "notify"),
        ("User", "agent-egress"),
        ("NoNewPrivileges", "true"),
        ("ProtectSystem", "strict"),
    ] {
        assert_eq!(values(&ours, "Service", key), [want], "[Service] {key}");
    }
    assert_eq!(
        values(&ours, "Service", "ExecStartPost"),
        [
            "+/usr/local/bin/agent-egress",
            "doctor",
            "--config",
            "/etc/agent-egress/config.json"
        ]
    );
    for cap in ["CAP_NET_ADMIN", "CAP_BPF"] {
        assert!(values(&ours, "Service", "AmbientCapabilities").contains(&cap.to_owned()));
    }
}

/// The slice every captured system unit lives in: its cgroup path is the one
/// config.json lists.
#[test]
fn agents_slice_matches_the_module() {
    let ours = parse(
        &dist("agent-egress-agents.slice"),
        "dist agent-egress-agents.slice",
    );
    let theirs = parse(
        &module("agent-egress-agents.slice"),
        "module agent-egress-agents.slice",
    );
    assert_same(&ours, &theirs, "agent-egress-agents.slice", &[]);
    assert_eq!(values(&ours, "Slice", "RestrictNetworkInterfaces"), ["lo"]);
    assert_eq!(values(&ours, "Slice", "NFTSet"), [nft_set(&dist_config())]);
}

/// The drop-in that puts a system unit under capture: the module's drop-in for an
/// agent unit, but into the shared agents' slice (the module makes one per agent).
#[test]
fn system_drop_in_matches_the_module() {
    let ours = parse(&dist("capture.conf"), "dist capture.conf");
    let theirs = parse(
        &module("agent-probe@.service.d/agent-egress.conf"),
        "module drop-in",
    );
    assert_same(&ours, &theirs, "capture.conf", &[("Service", "Slice")]);
    assert_eq!(
        values(&ours, "Service", "Slice"),
        ["agent-egress-agents.slice"]
    );
    assert_eq!(values(&ours, "Unit", "BindsTo"), ["agent-egress.service"]);
    let hidden = values(&ours, "Service", "InaccessiblePaths");
    for socket in [
        "-/run/user/%U/bus",
        "-/run/user/%U/systemd/private",
        "-/run/dbus/system_bus_socket",
        "-/run/docker.sock",
    ] {
        assert!(hidden.contains(&socket.to_owned()), "{socket} not hidden");
    }
}

/// The drop-in for a `--user` unit hides the same sockets and carries nothing a
/// user manager cannot apply: NFTSet= is for system services only, Slice= cannot
/// name a system slice, BindsTo= cannot name a system unit, and
/// RestrictNetworkInterfaces= needs a BPF program it cannot load.
#[test]
fn user_drop_in_hides_the_sockets_and_nothing_else() {
    let ours = parse(&dist("capture-user.conf"), "dist capture-user.conf");
    let theirs = parse(
        &module("agent-probe@.service.d/agent-egress.conf"),
        "module drop-in",
    );
    assert_eq!(
        keys(&ours),
        [("Service".to_owned(), "InaccessiblePaths".to_owned())],
        "capture-user.conf sets only InaccessiblePaths="
    );
    assert_eq!(
        values(&ours, "Service", "InaccessiblePaths"),
        values(&theirs, "Service", "InaccessiblePaths")
    );
}

#[test]
fn doctor_units_match_the_module() {
    for unit in ["agent-egress-doctor.service", "agent-egress-doctor.timer"] {
        let ours = parse(&dist(unit), unit);
        let theirs = parse(&module(unit), unit);
        assert_same(&ours, &theirs, unit, &[]);
    }
}

fn dist_config() -> Value {
    serde_json::from_str(&dist("config.json")).unwrap_or_else(|e| panic!("config.json: {e}"))
}

fn nft_set(config: &Value) -> String {
    let table = config["interception"]["table"]
        .as_str()
        .expect("config.json names its interception.table");
    format!("cgroup:inet:{table}:agents")
}

/// systemd nests slices by the dashes in their names: a-b-c.slice is
/// a.slice/a-b.slice/a-b-c.slice below the cgroup2 root.
fn slice_cgroup(slice: &str) -> String {
    let name = slice.strip_suffix(".slice").expect("a slice name");
    let parts: Vec<&str> = name.split('-').collect();
    (1..=parts.len())
        .map(|n| format!("{}.slice", parts[..n].join("-")))
        .collect::<Vec<_>>()
        .join("/")
}

/// The example config is valid, captures the agents' slice, writes its audit
/// where the unit's LogsDirectory= is, and has the descriptors LimitNOFILE= gives.
#[test]
fn config_fits_the_units() {
    let path = root().join("dist/systemd/config.json");
    let check = Command::new(harness::daemon::binary())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("agent-egress check: {e}"));
    assert!(
        check.status.success(),
        "agent-egress check refuses dist/systemd/config.json: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let config = dist_config();
    let cgroups: Vec<&str> = config["interception"]["cgroups"]
        .as_array()
        .expect("interception.cgroups")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        cgroups.contains(&slice_cgroup("agent-egress-agents.slice").as_str()),
        "config.json does not capture the agents' slice: {cgroups:?}"
    );
    let unit = parse(&dist("agent-egress.service"), "agent-egress.service");
    let logs = values(&unit, "Service", "LogsDirectory");
    let audit = config["audit"]["path"].as_str().expect("audit.path");
    assert_eq!(
        Path::new(audit).parent(),
        Some(Path::new("/var/log").join(&logs[0]).as_path()),
        "audit.path outside LogsDirectory={logs:?}: the sandbox cannot write it"
    );
    let connections = config["limits"]["connections"]
        .as_u64()
        .expect("limits.connections");
    // As the module: 8 descriptors per connection and 1024 for the daemon.
    assert_eq!(
        values(&unit, "Service", "LimitNOFILE"),
        [(8 * connections + 1024).to_string()]
    );
}

#[test]
fn slice_cgroup_nests_by_dashes() {
    assert_eq!(
        slice_cgroup("agent-egress-agents.slice"),
        "agent.slice/agent-egress.slice/agent-egress-agents.slice"
    );
}

// ---- systemd-analyze verify -----------------------------------------------------------

/// A temp dir removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let path =
            std::env::temp_dir().join(format!("agent-egress-dist-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `dist/systemd/NAME` at `to`, the installed binary's path replaced by the one
/// cargo built (verify refuses an ExecStart= that does not exist).
fn install(name: &str, to: &Path) {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    let text = dist(name).replace("/usr/local/bin/agent-egress", harness::daemon::binary());
    fs::write(to, text).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
}

fn systemd_version() -> u32 {
    let out = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze --version: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("systemd-analyze --version says {text:?}"))
}

/// What `systemd-analyze verify` says about `units` (in `dir`), but for what an
/// older systemd does not know: NFTSet= came with systemd 255 (Debian 12 has
/// 252), the rest of what the units use is older.
fn verify(dir: &Path, units: &[&str], user: bool) -> Vec<String> {
    let mut cmd = Command::new("systemd-analyze");
    if user {
        // A user manager's verify wants its runtime directory.
        let runtime = dir.join("runtime");
        fs::create_dir_all(&runtime).unwrap_or_else(|e| panic!("{e}"));
        cmd.arg("--user").env("XDG_RUNTIME_DIR", &runtime);
    }
    let out = cmd
        .args(["verify", "--man=no"])
        .args(units.iter().map(|u| dir.join(u)))
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze verify: {e}"));
    let old = systemd_version() < 255;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut complaints: Vec<String> = said
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !(old && l.contains("Unknown key 'NFTSet'")))
        .map(str::to_owned)
        .collect();
    if !out.status.success() && complaints.is_empty() {
        complaints.push(format!("exit status {}", out.status));
    }
    complaints
}

/// The system units, and capture.conf as the drop-in of a unit it is meant for.
#[test]
fn system_units_verify() {
    if !harness::require_tools(&["systemd-analyze"]) {
        return;
    }
    let dir = TempDir::new("system");
    let units = [
        "agent-egress.service",
        "agent-egress-agents.slice",
        "agent-egress-doctor.service",
        "agent-egress-doctor.timer",
    ];
    for unit in units {
        install(unit, &dir.0.join(unit));
    }
    fs::write(
        dir.0.join("some-agent.service"),
        "[Unit]\nDescription=an agent\n[Service]\nExecStart=/bin/sh -c 'exec sleep 1'\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    install(
        "capture.conf",
        &dir.0.join("some-agent.service.d/agent-egress.conf"),
    );
    let mut all = units.to_vec();
    all.push("some-agent.service");
    let complaints = verify(&dir.0, &all, false);
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify (systemd {}):\n{}",
        systemd_version(),
        complaints.join("\n")
    );
}

/// capture-user.conf as the drop-in of a `--user` unit, verified by a user manager.
#[test]
fn user_drop_in_verifies() {
    if !harness::require_tools(&["systemd-analyze"]) {
        return;
    }
    let dir = TempDir::new("user");
    fs::write(
        dir.0.join("openclaw-gateway.service"),
        "[Unit]\nDescription=an agent's gateway\n[Service]\nExecStart=/bin/sh -c 'exec sleep 1'\n\
         [Install]\nWantedBy=default.target\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    install(
        "capture-user.conf",
        &dir.0.join("openclaw-gateway.service.d/agent-egress.conf"),
    );
    let complaints = verify(&dir.0, &["openclaw-gateway.service"], true);
    assert!(
        complaints.is_empty(),
        "systemd-analyze --user verify:\n{}",
        complaints.join("\n")
    );
}
