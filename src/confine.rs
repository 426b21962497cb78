//! Who CMD of `exec` runs as, and what it can reach besides the network.
//!
//! `exec` needs root to set up the capture; CMD must not keep it, or it could
//! undo the capture. CMD runs as the invoking user (SUDO_UID/SUDO_GID,
//! PKEXEC_UID, or `--user`), its supplementary groups those of that user, with
//! no capabilities and `PR_SET_NO_NEW_PRIVS` (so `sudo` or another setuid
//! program cannot give root back), in a mount namespace of its own where the
//! sockets that lead out of the cgroup are hidden: systemd's and D-Bus's (a
//! transient unit starts outside the caller's cgroup) unless `--allow-bus`,
//! the container engines', and the name services' (nscd, systemd-resolved's
//! varlink API), which would resolve names outside the DNS handler.

use std::ffi::{CStr, CString};
use std::fmt;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Whose identity CMD takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAs {
    User {
        name: String,
        uid: libc::uid_t,
        gid: libc::gid_t,
    },
    /// `--as-root`: CMD can undo the capture.
    Root,
}

/// Why CMD cannot be run as asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfineError {
    /// SUDO_UID or PKEXEC_UID holds no uid.
    NotAUid {
        var: &'static str,
        text: String,
    },
    /// CMD would run as root without `--as-root`.
    WouldBeRoot,
    NulInUser(String),
    NoSuchUser(String),
    NoPasswdEntry(libc::uid_t),
    NulInGroupUser(String),
    Groups(String),
    NulInHiddenPath,
}

impl fmt::Display for ConfineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfineError::NotAUid { var, text } => write!(f, "{var}={text:?} is not a uid"),
            ConfineError::WouldBeRoot => write!(
                f,
                "CMD would run as root, and root can undo the capture: give --user NAME \
                 (run through sudo, CMD runs as you), or --as-root to accept that"
            ),
            ConfineError::NulInUser(name) => write!(f, "--user {name:?}: a NUL in it"),
            ConfineError::NoSuchUser(name) => write!(f, "--user {name:?}: no such user"),
            ConfineError::NoPasswdEntry(uid) => {
                write!(f, "uid {uid} has no entry in the password database")
            }
            ConfineError::NulInGroupUser(name) => write!(f, "user {name:?}: a NUL in it"),
            ConfineError::Groups(name) => write!(f, "cannot list the groups of {name}"),
            ConfineError::NulInHiddenPath => write!(f, "a hidden path has a NUL in it"),
        }
    }
}

impl std::error::Error for ConfineError {}

/// What CMD is told of the sockets hidden from it, as [`hidden_sockets`] lists them.
const BUS_SOCKETS: &[&str] = &["/run/dbus/system_bus_socket", "/run/systemd/private"];
/// Name services that resolve outside the cgroup (nscd; systemd-resolved's
/// varlink API, which nss-resolve uses): hidden, glibc falls back to its own
/// `files` and `dns`, whose queries the DNS handler answers.
const RESOLVER_SOCKETS: &[&str] = &[
    "/run/nscd/socket",
    "/run/systemd/resolve/io.systemd.Resolve",
];
const ENGINE_SOCKETS: &[&str] = &[
    "/run/docker.sock",
    "/var/run/docker.sock",
    "/run/containerd/containerd.sock",
    "/run/podman/podman.sock",
];

/// The user CMD runs as: `--user`, else whoever ran sudo or pkexec. Plain root
/// without either must choose (`--user` or `--as-root`).
pub fn run_as(user: Option<&str>, as_root: bool) -> Result<RunAs, ConfineError> {
    if as_root {
        return Ok(RunAs::Root);
    }
    if let Some(name) = user {
        return not_root(lookup_name(name)?);
    }
    for var in ["SUDO_UID", "PKEXEC_UID"] {
        if let Ok(text) = std::env::var(var) {
            let uid: libc::uid_t = text.parse().map_err(|_| ConfineError::NotAUid {
                var,
                text: text.clone(),
            })?;
            if uid != 0 {
                return lookup_uid(uid);
            }
        }
    }
    // SAFETY: getuid(2) cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid != 0 {
        return lookup_uid(uid);
    }
    Err(ConfineError::WouldBeRoot)
}

fn not_root(run_as: RunAs) -> Result<RunAs, ConfineError> {
    match run_as {
        RunAs::User { uid: 0, .. } => Err(ConfineError::WouldBeRoot),
        other => Ok(other),
    }
}

/// The user's name and ids from the password database.
fn lookup_name(name: &str) -> Result<RunAs, ConfineError> {
    let c_name = CString::new(name).map_err(|_| ConfineError::NulInUser(name.to_string()))?;
    // SAFETY: getpwnam returns a pointer into static storage or NULL; it is
    // read at once, before any other passwd call (exec is single-threaded here).
    let entry = unsafe { libc::getpwnam(c_name.as_ptr()) };
    passwd_entry(entry).ok_or_else(|| ConfineError::NoSuchUser(name.to_string()))
}

fn lookup_uid(uid: libc::uid_t) -> Result<RunAs, ConfineError> {
    // SAFETY: as in lookup_name.
    let entry = unsafe { libc::getpwuid(uid) };
    passwd_entry(entry).ok_or(ConfineError::NoPasswdEntry(uid))
}

fn passwd_entry(entry: *const libc::passwd) -> Option<RunAs> {
    if entry.is_null() {
        return None;
    }
    // SAFETY: non-null entries point to a valid struct passwd with a NUL-terminated name.
    let (name, uid, gid) = unsafe {
        (
            CStr::from_ptr((*entry).pw_name)
                .to_string_lossy()
                .into_owned(),
            (*entry).pw_uid,
            (*entry).pw_gid,
        )
    };
    Some(RunAs::User { name, uid, gid })
}

/// The user's groups (primary included), from the group database.
fn groups_of(name: &str, gid: libc::gid_t) -> Result<Vec<libc::gid_t>, ConfineError> {
    let c_name = CString::new(name).map_err(|_| ConfineError::NulInGroupUser(name.to_string()))?;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut count = groups.len() as libc::c_int;
        // SAFETY: groups has room for count entries; getgrouplist writes at most that
        // many and sets count to the number it has.
        let rc =
            unsafe { libc::getgrouplist(c_name.as_ptr(), gid, groups.as_mut_ptr(), &mut count) };
        let count = usize::try_from(count).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(count);
            return Ok(groups);
        }
        if count <= groups.len() || groups.len() >= 65_536 {
            return Err(ConfineError::Groups(name.to_string()));
        }
        groups.resize(count, 0);
    }
}

/// The sockets hidden from CMD that exist here.
pub fn hidden_sockets(run_as: &RunAs, allow_bus: bool) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = ENGINE_SOCKETS
        .iter()
        .chain(RESOLVER_SOCKETS)
        .map(PathBuf::from)
        .collect();
    if let RunAs::User { uid, .. } = run_as {
        let runtime = PathBuf::from(format!("/run/user/{uid}"));
        paths.extend([
            runtime.join("docker.sock"),
            runtime.join("podman/podman.sock"),
        ]);
        if !allow_bus {
            paths.extend([runtime.join("bus"), runtime.join("systemd/private")]);
        }
    }
    if !allow_bus {
        paths.extend(BUS_SOCKETS.iter().map(PathBuf::from));
    }
    paths.retain(|p| Path::new(p).exists());
    paths
}

/// Makes `command` start as `run_as` in its own mount namespace with `hide`
/// covered. Runs after the cgroup move (an earlier `pre_exec`), still as root.
pub fn confine(
    command: &mut Command,
    run_as: &RunAs,
    hide: &[PathBuf],
) -> Result<(), ConfineError> {
    let ids = match run_as {
        RunAs::User { name, uid, gid } => Some((*uid, *gid, groups_of(name, *gid)?)),
        RunAs::Root => None,
    };
    let targets: Vec<CString> = hide
        .iter()
        .map(|p| CString::new(p.as_os_str().as_encoded_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|_| ConfineError::NulInHiddenPath)?;
    // SAFETY: the hook runs in the forked child between fork and exec and makes
    // only system calls on memory prepared here (no allocation, no locks).
    unsafe {
        command.pre_exec(move || {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Our mounts stay ours: nothing propagates back to the host.
            check(libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            for target in &targets {
                check(libc::mount(
                    c"/dev/null".as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
            }
            if let Some((uid, gid, groups)) = &ids {
                check(libc::setgroups(groups.len(), groups.as_ptr()))?;
                check(libc::setresgid(*gid, *gid, *gid))?;
                // From root to another uid: the kernel clears every capability.
                check(libc::setresuid(*uid, *uid, *uid))?;
            }
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            Ok(())
        });
    }
    Ok(())
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_user_is_looked_up_and_an_unknown_one_refused() {
        assert!(matches!(
            run_as(Some("nobody"), false),
            Ok(RunAs::User { .. })
        ));
        let err = run_as(Some("root"), false).unwrap_err().to_string();
        assert!(err.contains("--as-root"), "{err}");
        let err = run_as(Some("no-such-user-agent-egress"), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such user"), "{err}");
        assert_eq!(run_as(Some("root"), true), Ok(RunAs::Root));
    }
}
