// SPDX-License-Identifier: GPL-3.0-or-later
//! The control socket: a Unix stream socket, mode 0660, owner the daemon's
//! user (root), group `control.group`; and who is on the other end of each connection
//! (SO_PEERCRED, and the peer's executable).
//!
//! The group is looked up in /etc/group by hand: the static binary must not
//! call NSS (getgrnam).

use serde::Serialize;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why the control socket could not be set up.
#[derive(Debug)]
pub enum SocketError {
    GroupFile(io::Error),
    NoGroup(String),
    /// A step on the socket's path failed: which, and why.
    Path {
        path: PathBuf,
        step: &'static str,
        source: io::Error,
    },
    NotASocket(PathBuf),
    Thread(io::Error),
}

impl fmt::Display for SocketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SocketError::GroupFile(e) => write!(f, "/etc/group: {e}"),
            SocketError::NoGroup(name) => {
                write!(f, "control.group: no group {name:?} in /etc/group")
            }
            SocketError::Path { path, step, source } => {
                write!(f, "control socket {}: {step}: {source}", path.display())
            }
            SocketError::NotASocket(path) => write!(
                f,
                "control socket {}: exists and is not a socket; not replacing it",
                path.display()
            ),
            SocketError::Thread(e) => write!(f, "control socket: {e}"),
        }
    }
}

impl std::error::Error for SocketError {}

/// Who sent a request, as the kernel tells it.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub exe: Option<String>,
}

impl Peer {
    pub fn of(stream: &UnixStream) -> io::Result<Peer> {
        let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(io::Error::from)?;
        let pid = u32::try_from(cred.pid()).unwrap_or(0);
        Ok(Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid,
            exe: crate::procinfo::exe_of(pid),
        })
    }

    /// This process, as SO_PEERCRED would name it to a server it connected
    /// to: what `exec --ask` answers as, with no socket between.
    pub fn this_process() -> Peer {
        // SAFETY: geteuid(2) and getegid(2) cannot fail.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let pid = std::process::id();
        Peer {
            uid,
            gid,
            pid,
            exe: crate::procinfo::exe_of(pid),
        }
    }
}

/// Letters, digits, `.`, `_`, `-` (and not starting with `-`), at most 32.
pub fn valid_group_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The gid of `name` in an /etc/group text.
fn gid_in(group_file: &str, name: &str) -> Option<u32> {
    group_file.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

pub fn group_id(name: &str) -> Result<u32, SocketError> {
    let text = fs::read_to_string("/etc/group").map_err(SocketError::GroupFile)?;
    gid_in(&text, name).ok_or_else(|| SocketError::NoGroup(name.to_string()))
}

/// Listen at `path`: its directory made if missing (0755), a stale socket
/// replaced (never another kind of file), then group `gid` and mode 0660. The
/// owner is the daemon's user (root, or the NixOS unit's `agent-egress`, which
/// may give the socket to a group it is a member of without CAP_CHOWN); with
/// no group the group stays the daemon's own. Until the chmod the socket has
/// the umask's mode, which gives no one but the owner write (connect)
/// permission.
pub fn bind(path: &Path, gid: Option<u32>) -> Result<UnixListener, SocketError> {
    let fail = |step, source| SocketError::Path {
        path: path.to_path_buf(),
        step,
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| fail("making its directory", e))?;
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            fs::remove_file(path).map_err(|e| fail("removing the stale socket", e))?
        }
        Ok(_) => return Err(SocketError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail("looking at it", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| fail("bind", e))?;
    if gid.is_some() {
        std::os::unix::fs::chown(path, None, gid).map_err(|e| fail("chgrp", e))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o660)).map_err(|e| fail("chmod", e))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_found_by_name_only() {
        let file = "root:x:0:\nagent-egress-control:x:991:alice,bob\nbad:x:notanumber:\n";
        assert_eq!(gid_in(file, "agent-egress-control"), Some(991));
        assert_eq!(gid_in(file, "root"), Some(0));
        assert_eq!(gid_in(file, "agent"), None);
        assert_eq!(gid_in(file, "bad"), None);
        assert!(valid_group_name("agent-egress_1.x"));
        assert!(!valid_group_name("-x") && !valid_group_name("a:b") && !valid_group_name(""));
    }

    #[test]
    fn the_peer_is_who_connected() {
        let (a, _b) = UnixStream::pair().unwrap();
        let peer = Peer::of(&a).unwrap();
        assert_eq!(peer.pid, std::process::id());
        assert_eq!(peer.uid, unsafe { libc::getuid() });
        assert!(peer.exe.is_some());
    }
}
