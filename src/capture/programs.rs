//! The BPF programs the capture attaches to the captured cgroups: the kernel
//! backstop and the connect log, and their detaching.

use super::{CaptureError, Members};
use crate::backstop::{self, Backstop};
use crate::bpf::BpfError;
use crate::config::{BackstopMode, Config};
use crate::connect_log::{self, ConnectLog};
use std::path::Path;
use std::sync::OnceLock;

/// The backstop program if the config wants it: `true` requires it, `auto`
/// does without it where the kernel (or our capabilities) refuse, and says so.
pub(super) fn load_backstop(config: &Config) -> Result<Option<Backstop>, CaptureError> {
    match config.backstop_wanted() {
        Ok(false) => Ok(None),
        Err(why) => {
            log::warn!(
                "kernel backstop off (interception.backstop \"auto\"): {why}, which the agents could not reach through lo only; while the table is repaired (tens of ms) their packets are not captured"
            );
            Ok(None)
        }
        Ok(true) => match (Backstop::load(), config.interception.backstop) {
            (Ok(b), _) => Ok(Some(b)),
            (Err(e), BackstopMode::On) => Err(CaptureError::Backstop(e)),
            (Err(e), _) => {
                log::warn!("kernel backstop off (interception.backstop \"auto\"): {e}");
                Ok(None)
            }
        },
    }
}

/// Attach the backstop to every member, or to none and an error.
pub(super) fn attach_everywhere(
    b: &Backstop,
    root: &Path,
    members: &Members,
) -> Result<(), CaptureError> {
    for (path, _) in members.values() {
        if let Err(e) = b.attach(&root.join(path)) {
            let _ = detach_everywhere(root, members.values().map(|(p, _)| p));
            return Err(CaptureError::Backstop(e));
        }
    }
    if !members.is_empty() {
        log::info!(
            "kernel backstop on {} cgroup(s): their packets leave only through lo (ifindex {})",
            members.len(),
            b.lo_ifindex()
        );
    }
    Ok(())
}

/// Load the connect log into `slot` (once per process) and attach it to
/// every member. Without it, attribution falls back to searching /proc.
pub(super) fn start_connect_log(slot: &OnceLock<ConnectLog>, root: &Path, members: &Members) {
    if slot.get().is_none() {
        match ConnectLog::load() {
            Ok(connects) => {
                let _ = slot.set(connects);
            }
            Err(e) => {
                log::warn!("{e}; audit records find processes by searching /proc instead");
                return;
            }
        }
    }
    for (path, _) in members.values() {
        attach_connect_log(slot, &root.join(path));
    }
}

pub(super) fn attach_connect_log(slot: &OnceLock<ConnectLog>, dir: &Path) {
    if let Some(connects) = slot.get() {
        if let Err(e) = connects.attach(dir) {
            log::warn!("{e}; audit records find its processes by searching /proc instead");
        }
    }
}

/// Detach from these cgroups the connect log a daemon attached before it used
/// links (a running daemon's links go when it exits), as many as can be.
pub(super) fn detach_unlinked_connect_log<'a>(
    root: &Path,
    paths: impl Iterator<Item = &'a String>,
) -> Result<(), CaptureError> {
    detach_from_all(root, paths, connect_log::detach_unlinked)
}

/// Detach the backstop from these configured cgroups, as many as can be.
pub(super) fn detach_everywhere<'a>(
    root: &Path,
    paths: impl Iterator<Item = &'a String>,
) -> Result<(), CaptureError> {
    detach_from_all(root, paths, backstop::detach)
}

/// `detach` on every cgroup, going on past failures; every failure said.
fn detach_from_all<'a>(
    root: &Path,
    paths: impl Iterator<Item = &'a String>,
    detach: fn(&Path) -> Result<usize, BpfError>,
) -> Result<(), CaptureError> {
    let errors: Vec<BpfError> = paths.filter_map(|p| detach(&root.join(p)).err()).collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(CaptureError::Detach(errors))
    }
}
