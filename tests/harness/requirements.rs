//! The gate every kernel-level test passes first: root, a cgroup2 mount, tools.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::cgroup::cgroup2_root;

/// Tools the world itself runs; always checked.
pub const WORLD_TOOLS: &[&str] = &[
    "ip",
    "nft",
    "nginx",
    "dnsmasq",
    "openssl",
    "sh",
    "sha256sum",
];

/// True when the test can run: root, cgroup2 mounted, and every tool in `tools`
/// (plus [`WORLD_TOOLS`]) on PATH. Otherwise: with env `CI` set (and not `0` or
/// `false`) it panics, failing the test; without, it prints a loud SKIPPED banner
/// and returns false, and the test should return at once:
///
/// ```ignore
/// if !harness::require_root_and_tools(&["curl"]) { return; }
/// ```
pub fn require_root_and_tools(tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid(2) cannot fail and has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        missing.push(format!("root (running as uid {euid})"));
    }
    if cgroup2_root().is_none() {
        missing.push("a cgroup2 mount (none in /proc/self/mountinfo)".to_owned());
    }
    let mut wanted: Vec<&str> = WORLD_TOOLS.iter().chain(tools).copied().collect();
    wanted.sort_unstable();
    wanted.dedup();
    let absent: Vec<&str> = wanted.into_iter().filter(|t| !on_path(t)).collect();
    if !absent.is_empty() {
        missing.push(format!("tools on PATH: {}", absent.join(", ")));
    }
    satisfied(&missing)
}

/// Like [`require_root_and_tools`] for a test that needs neither root nor the
/// world: true when every tool in `tools` is on PATH, else a CI failure or a
/// loud skip.
pub fn require_tools(tools: &[&str]) -> bool {
    let absent: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    if absent.is_empty() {
        return true;
    }
    satisfied(&[format!("tools on PATH: {}", absent.join(", "))])
}

/// True when nothing is `missing`; otherwise panics under CI, or prints the
/// SKIPPED banner and returns false.
fn satisfied(missing: &[String]) -> bool {
    if missing.is_empty() {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed>")
        .to_owned();
    let why = missing.join("; ");
    if in_ci() {
        panic!("test {test} cannot run in CI: needs {why}");
    }
    eprintln!(
        "\n######## SKIPPED ########\n# test {test} did NOT run: needs {why}\n\
         # (with env CI set this is a failure)\n#########################\n"
    );
    false
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

fn on_path(tool: &str) -> bool {
    let Some(path) = std::env::var_os("PATH") else {
        return false;
    };
    std::env::split_paths(&path).any(|dir| is_executable(&dir.join(tool)))
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
