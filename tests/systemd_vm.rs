// SPDX-License-Identifier: GPL-3.0-or-later
//! The NixOS module's generated units under a real systemd: a Debian 13 guest
//! (systemd 257) in QEMU (TCG: nested KVM is not available on these machines)
//! gets the units, drop-ins and files of `vm-tests/systemd/install.json` (rendered
//! from the module's evaluation by nix/eval-check.sh), the binary cargo built, and
//! the test's own agent unit, and runs `vm-tests/systemd/guest-test.sh`: one named
//! check per scenario, reported back over a 9p share and printed as a table here.
//! Then the same guest swaps in `dist/systemd/` (the units for distributions other
//! than NixOS) as its README installs them, and puts a system unit and a user's
//! `--user` unit (started by a login after the daemon) under capture with them.
//!
//! The image (`vm-tests/systemd/build-image.sh`) is built once and cached in the
//! build directory (`$CARGO_TARGET_DIR` or `target/`)`/systemd-vm/image-HASH`,
//! HASH the build script's: a changed recipe builds anew. The guest's disk is
//! opened with `snapshot=on`, so a run leaves the image as it was.

mod harness;

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use harness::ChildGuard;
use serde_json::Value;

/// The checks guest-test.sh runs, in its order; each must report.
const SCENARIOS: &[&str] = &[
    "units_load",
    "daemon_active",
    "nftset_before_agent",
    "curl_allowed_blocked",
    "restart_captured",
    "bindsto_stops_agents",
    "reload_not_restart",
    "rotation",
    "audit_names_agent",
    "bus_hidden",
    "doctor_probes_agents",
    "backstop_holds",
    "journal_audit",
    "learn_suggests",
    "supervisor_answers_questions",
    "dist_system_unit",
    "dist_user_unit_after_login",
    "no_unit_warnings",
    "sandbox_denials",
];

/// The cases of install.json the guest installs.
const CASES: &[&str] = &["file-audit", "journal-audit", "learn", "supervisor"];

/// Store paths in the evaluated units and files, and where the image has them.
/// A store path not listed here fails the test: it would not exist in the guest.
const STORE_PATHS: &[(&str, &str)] = &[
    ("/nix/store/eval-stub-agent-egress/bin/", "/usr/local/bin/"),
    ("/nix/store/eval-stub-coreutils/bin/", "/usr/bin/"),
    ("/nix/store/eval-stub-curl/bin/", "/usr/bin/"),
    ("/nix/store/eval-stub-jq/bin/", "/usr/bin/"),
    ("/nix/store/eval-stub-systemd/bin/", "/usr/bin/"),
    (
        "/nix/store/eval-generated/",
        "/usr/local/lib/agent-egress-eval/",
    ),
];

/// The whole guest run: boot (about 20 s under TCG) and every scenario.
const VM_TIMEOUT: Duration = Duration::from_secs(720);
/// debootstrap and all; about a minute here.
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);
/// How long QEMU or the build gets after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Lines of the serial console shown when the guest fails.
const CONSOLE_TAIL_LINES: usize = 60;

#[test]
fn module_units_under_real_systemd() {
    if !harness::require_root_and_tools(&[
        "qemu-system-x86_64",
        "debootstrap",
        "mkfs.ext4",
        "unshare",
        "chroot",
    ]) {
        return;
    }
    let install = read_install_json().unwrap_or_else(|e| panic!("{e}"));
    let image = match cached_image() {
        Ok(image) => image,
        Err(e) => {
            skip_or_fail(&format!("cannot build the guest image: {e}"));
            return;
        }
    };
    let share = Share::new().unwrap_or_else(|e| panic!("{e}"));
    share.fill(&install).unwrap_or_else(|e| panic!("{e}"));

    let started = Instant::now();
    let outcome = run_guest(&image, &share);
    let took = started.elapsed();
    keep_last_run(&share);
    let console = share.path.join("console.log");
    let results = match outcome.and_then(|()| read_results(&share.path.join("results"))) {
        Ok(results) => results,
        Err(e) => panic!(
            "the guest did not finish ({:.0} s): {e}\n---- serial console (tail) ----\n{}",
            took.as_secs_f64(),
            tail_lines(&console, CONSOLE_TAIL_LINES)
        ),
    };
    let failed = report(&results, took);
    assert!(
        failed.is_empty(),
        "systemd VM scenarios failed: {}\n(guest journal, console and results: {})",
        failed.join(", "),
        last_run_dir().display()
    );
}

// ---- skipping ---------------------------------------------------------------------

/// Like `harness::require_root_and_tools` for a need no tool check covers: fails
/// under CI, skips loudly elsewhere.
fn skip_or_fail(why: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    if ci {
        panic!("the systemd VM test cannot run in CI: {why}");
    }
    // Straight to stderr: the test harness would swallow eprintln! of a passing test.
    let _ = writeln!(
        std::io::stderr(),
        "\n######## SKIPPED ########\n# the systemd VM test did NOT run: {why}\n\
         # (with env CI set this is a failure)\n#########################\n"
    );
}

// ---- install.json ------------------------------------------------------------------

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read_install_json() -> Result<Value, String> {
    let path = manifest_dir().join("vm-tests/systemd/install.json");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// `text` with every store path replaced by the image's (see [`STORE_PATHS`]).
fn map_store_paths(text: &str, what: &str) -> Result<String, String> {
    const STORE: &str = "/nix/store/";
    let mut mapped = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(STORE) {
        mapped.push_str(&rest[..at]);
        let here = &rest[at..];
        let Some((from, to)) = STORE_PATHS.iter().find(|(from, _)| here.starts_with(from)) else {
            let path: String = here
                .chars()
                .take_while(|c| !c.is_whitespace() && !"\"'`;,)".contains(*c))
                .collect();
            return Err(format!(
                "{what}: store path {path} has no place in the image (tests/systemd_vm.rs STORE_PATHS)"
            ));
        };
        mapped.push_str(to);
        rest = &here[from.len()..];
    }
    mapped.push_str(rest);
    Ok(mapped)
}

/// A relative path without `..`, for names from install.json.
fn safe_relative(name: &str, what: &str) -> Result<PathBuf, String> {
    let path = Path::new(name);
    let plain = path
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if name.is_empty() || !plain {
        return Err(format!("{what}: {name:?} is not a plain relative path"));
    }
    Ok(path.to_owned())
}

fn write_file(path: &Path, text: &str) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Writes case `name` of install.json under `dir` as guest-test.sh installs it:
/// `units/NAME` (to /etc/systemd/system), `files/PATH` (to /PATH), `executables`,
/// `groups` (the groups NixOS would create).
fn render_case(name: &str, case: &Value, dir: &Path) -> Result<(), String> {
    let what = format!("install.json case {name}");
    let units = case["units"]
        .as_object()
        .ok_or_else(|| format!("{what}: no \"units\" object"))?;
    for (unit, text) in units {
        let text = text
            .as_str()
            .ok_or_else(|| format!("{what}: unit {unit} is not a string"))?;
        let relative = safe_relative(unit, &what)?;
        let text = map_store_paths(text, &format!("{what}: unit {unit}"))?;
        write_file(&dir.join("units").join(relative), &text)?;
    }
    let files = case["files"]
        .as_object()
        .ok_or_else(|| format!("{what}: no \"files\" object"))?;
    let mut written = Vec::new();
    for (path, text) in files {
        let text = text
            .as_str()
            .ok_or_else(|| format!("{what}: file {path} is not a string"))?;
        let target = map_store_paths(path, &format!("{what}: file name {path}"))?;
        let relative = target
            .strip_prefix('/')
            .ok_or_else(|| format!("{what}: file {path} is not absolute"))?;
        let relative = safe_relative(relative, &what)?;
        let text = map_store_paths(text, &format!("{what}: file {path}"))?;
        write_file(&dir.join("files").join(relative), &text)?;
        written.push(target);
    }
    let executables = case["executables"]
        .as_array()
        .ok_or_else(|| format!("{what}: no \"executables\" array"))?;
    let mut list = String::new();
    for exe in executables {
        let exe = exe
            .as_str()
            .ok_or_else(|| format!("{what}: an executable is not a string"))?;
        let target = map_store_paths(exe, &format!("{what}: executable {exe}"))?;
        if !written.contains(&target) {
            return Err(format!("{what}: executable {exe} is not among its files"));
        }
        list.push_str(&target);
        list.push('\n');
    }
    write_file(&dir.join("executables"), &list)?;
    let groups = case["groups"]
        .as_array()
        .ok_or_else(|| format!("{what}: no \"groups\" array"))?;
    let mut names = String::new();
    for group in groups {
        let group = group
            .as_str()
            .filter(|g| {
                !g.is_empty()
                    && g.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            })
            .ok_or_else(|| format!("{what}: a group is not a plain name: {group}"))?;
        names.push_str(group);
        names.push('\n');
    }
    write_file(&dir.join("groups"), &names)
}

// ---- the image ----------------------------------------------------------------------

struct Image {
    kernel: PathBuf,
    initrd: PathBuf,
    disk: PathBuf,
}

fn build_root() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target"));
    target.join("systemd-vm")
}

fn last_run_dir() -> PathBuf {
    build_root().join("last-run")
}

/// The image for the current build script, built first if need be. One build at
/// a time (a lock file), so parallel test runs share one build.
fn cached_image() -> Result<Image, String> {
    let script = manifest_dir().join("vm-tests/systemd/build-image.sh");
    let hash = harness::sha256_file(&script)?;
    let root = build_root();
    fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let lock_path = root.join("lock");
    let lock = fs::File::create(&lock_path)
        .map_err(|e| format!("cannot create {}: {e}", lock_path.display()))?;
    // SAFETY: flock(2) on a descriptor we own; it is released when `lock` closes.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "cannot lock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        ));
    }
    let dir = root.join(format!("image-{}", &hash[..16]));
    let image = Image {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        disk: dir.join("root.img"),
    };
    if image.disk.is_file() && image.kernel.is_file() && image.initrd.is_file() {
        return Ok(image);
    }
    // Under the lock nobody else builds: anything else here is stale (an older
    // recipe's image, a build that was killed).
    for entry in fs::read_dir(&root).map_err(|e| format!("{}: {e}", root.display()))? {
        let entry = entry.map_err(|e| format!("{}: {e}", root.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("image-") {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let log = root.join(format!("build-{}.log", &hash[..16]));
    let _ = fs::remove_file(&log);
    let started = Instant::now();
    let mut cmd = Command::new("bash");
    // Its own process group, so a timeout ends debootstrap and the chroot too.
    cmd.arg(&script).arg(&dir).process_group(0);
    let build = ChildGuard::spawn(cmd, "build-image.sh", &log)?;
    let status = wait_for(build, BUILD_TIMEOUT)
        .map_err(|e| format!("build-image.sh: {e}\n{}", tail_lines(&log, 30)))?;
    if !status.success() {
        return Err(format!(
            "build-image.sh failed ({status}); {}:\n{}",
            log.display(),
            tail_lines(&log, 30)
        ));
    }
    let _ = writeln!(
        std::io::stderr(),
        "systemd_vm: built the guest image in {:.0} s ({})",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(image)
}

/// Waits for `child` up to `limit`; past it the child (and its process group, if
/// it leads one) is killed and it is an error.
fn wait_for(mut child: ChildGuard, limit: Duration) -> Result<ExitStatus, String> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait() {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Ok(pid) = libc::pid_t::try_from(child.pid()) {
        // SAFETY: getpgid(2) and kill(2) take plain integers. Only a group this
        // child leads (process_group(0)) is signalled, never our own.
        unsafe {
            if libc::getpgid(pid) == pid {
                libc::kill(-pid, libc::SIGTERM);
            }
        }
    }
    child.stop(STOP_GRACE);
    Err(format!("still running after {} s: killed", limit.as_secs()))
}

// ---- the share ------------------------------------------------------------------------

/// The 9p share of one run (a temp dir, removed on drop): the guest's script, the
/// binary, the rendered cases; the guest writes results/ into it.
struct Share {
    path: PathBuf,
}

impl Share {
    fn new() -> Result<Share, String> {
        let path =
            std::env::temp_dir().join(format!("agent-egress-systemd-vm-{}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(path.join("results"))
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        Ok(Share { path })
    }

    fn fill(&self, install: &Value) -> Result<(), String> {
        let here = manifest_dir().join("vm-tests/systemd");
        for file in ["guest-test.sh", "agent-probe@.service"] {
            copy(&here.join(file), &self.path.join(file))?;
        }
        copy(
            Path::new(harness::daemon::binary()),
            &self.path.join("agent-egress"),
        )?;
        // dist/systemd/ as a user of another distribution copies it.
        let dist = manifest_dir().join("dist/systemd");
        let entries = fs::read_dir(&dist).map_err(|e| format!("{}: {e}", dist.display()))?;
        fs::create_dir_all(self.path.join("dist"))
            .map_err(|e| format!("cannot create the share's dist/: {e}"))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("{}: {e}", dist.display()))?;
            copy(
                &entry.path(),
                &self.path.join("dist").join(entry.file_name()),
            )?;
        }
        for case in CASES {
            let value = &install["cases"][case];
            if value.is_null() {
                return Err(format!(
                    "vm-tests/systemd/install.json has no case {case:?}"
                ));
            }
            render_case(case, value, &self.path.join("cases").join(case))?;
        }
        Ok(())
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("cannot copy {} to {}: {e}", from.display(), to.display()))
}

/// The guest's results, console log and journal, kept in the build directory for
/// a look after the run (the share itself is removed).
fn keep_last_run(share: &Share) {
    let keep = last_run_dir();
    let _ = fs::remove_dir_all(&keep);
    if fs::create_dir_all(&keep).is_err() {
        return;
    }
    let _ = fs::copy(share.path.join("console.log"), keep.join("console.log"));
    if let Ok(entries) = fs::read_dir(share.path.join("results")) {
        for entry in entries.flatten() {
            let _ = fs::copy(entry.path(), keep.join(entry.file_name()));
        }
    }
}

// ---- the guest ----------------------------------------------------------------------------

fn run_guest(image: &Image, share: &Share) -> Result<(), String> {
    let console = share.path.join("console.log");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-no-reboot", "-accel", "tcg", "-cpu", "max"])
        .args([
            "-smp", "2", "-m", "1024", "-display", "none", "-monitor", "none",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        // panic=-1: a kernel panic reboots, which -no-reboot turns into an exit.
        .args(["-append", "root=/dev/vda rw console=ttyS0 quiet panic=-1"])
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,snapshot=on",
            image.disk.display()
        ))
        .arg("-fsdev")
        .arg(format!(
            "local,id=test,path={},security_model=none",
            share.path.display()
        ))
        .args(["-device", "virtio-9p-pci,fsdev=test,mount_tag=test"]);
    let qemu = ChildGuard::spawn(cmd, "qemu", &share.path.join("qemu.log"))?;
    let status = wait_for(qemu, VM_TIMEOUT).map_err(|e| format!("QEMU {e}"))?;
    if !status.success() {
        return Err(format!(
            "QEMU exited with {status}: {}",
            fs::read_to_string(share.path.join("qemu.log")).unwrap_or_default()
        ));
    }
    if !share.path.join("results/finished").exists() {
        return Err("the guest powered off before guest-test.sh finished".to_owned());
    }
    Ok(())
}

struct Outcome {
    name: String,
    passed: bool,
    seconds: String,
    detail: String,
}

/// results.txt: one line per scenario, `NAME pass|FAIL SECONDS DETAIL`.
fn read_results(dir: &Path) -> Result<Vec<Outcome>, String> {
    let path = dir.join("results.txt");
    let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let mut fields = line.splitn(4, ' ');
            let (Some(name), Some(verdict), Some(seconds)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(format!("{}: bad line {line:?}", path.display()));
            };
            Ok(Outcome {
                name: name.to_owned(),
                passed: verdict == "pass",
                seconds: seconds.to_owned(),
                detail: fields.next().unwrap_or("").trim().to_owned(),
            })
        })
        .collect()
}

/// Prints the table (straight to stderr, so it shows for a passing test too) and
/// returns the names of the scenarios that failed or did not report.
fn report(results: &[Outcome], took: Duration) -> Vec<String> {
    let mut table =
        String::from("\n| scenario | result | time | detail |\n| --- | --- | --- | --- |\n");
    let mut failed = Vec::new();
    for outcome in results {
        let verdict = if outcome.passed { "pass" } else { "FAIL" };
        table.push_str(&format!(
            "| {} | {verdict} | {} s | {} |\n",
            outcome.name,
            outcome.seconds,
            outcome.detail.replace('|', "\\|")
        ));
        if !outcome.passed || !SCENARIOS.contains(&outcome.name.as_str()) {
            failed.push(outcome.name.clone());
        }
    }
    for name in SCENARIOS {
        if !results.iter().any(|o| o.name == *name) {
            table.push_str(&format!("| {name} | FAIL | | did not report |\n"));
            failed.push((*name).to_owned());
        }
    }
    let passed = results.iter().filter(|o| o.passed).count();
    table.push_str(&format!(
        "\n{passed} passed, {} failed; the guest ran {:.0} s\n",
        failed.len(),
        took.as_secs_f64()
    ));
    let _ = std::io::stderr().write_all(table.as_bytes());
    failed
}

fn tail_lines(path: &Path, lines: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---- rendering, checked without the VM -------------------------------------------------

#[test]
fn store_paths_map_to_the_image() {
    let unit = "ExecStart=/nix/store/eval-stub-agent-egress/bin/agent-egress run\n\
                ExecReload=/nix/store/eval-stub-coreutils/bin/kill -HUP $MAINPID\n\
                ExecStartPost=+/nix/store/eval-stub-agent-egress/bin/agent-egress doctor\n\
                X-Reload-Triggers=/nix/store/eval-generated/agent-egress-checked.json.out\n";
    assert_eq!(
        map_store_paths(unit, "unit").unwrap_or_else(|e| panic!("{e}")),
        "ExecStart=/usr/local/bin/agent-egress run\n\
         ExecReload=/usr/bin/kill -HUP $MAINPID\n\
         ExecStartPost=+/usr/local/bin/agent-egress doctor\n\
         X-Reload-Triggers=/usr/local/lib/agent-egress-eval/agent-egress-checked.json.out\n"
    );
    let err = map_store_paths("x /nix/store/abc-foo/bin/foo --y", "unit u").unwrap_err();
    assert!(err.contains("/nix/store/abc-foo/bin/foo"), "{err}");
}

#[test]
fn install_json_renders() {
    let install = read_install_json().unwrap_or_else(|e| panic!("{e}"));
    let dir = std::env::temp_dir().join(format!(
        "agent-egress-systemd-vm-render-{}",
        std::process::id()
    ));
    for case in CASES {
        render_case(case, &install["cases"][case], &dir.join(case))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let _ = fs::remove_dir_all(&dir);
}
