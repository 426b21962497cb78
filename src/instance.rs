//! One daemon per table and per port in a network namespace. A second
//! `agent-egress run` with the same config would bind the same port
//! (SO_REUSEPORT takes a share of the connections) and fight over the same
//! table. Each daemon holds an abstract Unix socket named after its table and
//! its port: abstract names live per network namespace, vanish with the
//! process however it ends, and a second claimant learns the holder's pid from
//! SO_PEERCRED by connecting to it.

use std::fmt;
use std::io;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};

/// Held for the daemon's life; dropping it releases the claims.
pub struct InstanceLock {
    _claims: Vec<UnixListener>,
}

#[derive(Debug)]
pub enum ClaimError {
    /// Another daemon holds it: `holder` says which, as far as it is known.
    Held {
        holder: String,
        what: String,
    },
    Io {
        what: String,
        source: io::Error,
    },
}

impl fmt::Display for ClaimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimError::Held { holder, what } => write!(
                f,
                "{holder} already runs with {what} in this network namespace: stop it first, \
                 or give this one another interception.table and listen.port"
            ),
            ClaimError::Io { what, source } => write!(f, "claiming {what}: {source}"),
        }
    }
}

impl std::error::Error for ClaimError {}

/// Claims `table` and `port`, or says which process holds them.
pub fn claim(table: &str, port: u16) -> Result<InstanceLock, ClaimError> {
    let claims = [
        (
            format!("agent-egress/table/{table}"),
            format!("table inet {table}"),
        ),
        (format!("agent-egress/port/{port}"), format!("port {port}")),
    ];
    let mut held = Vec::new();
    for (name, what) in claims {
        held.push(claim_one(&name, &what)?);
    }
    Ok(InstanceLock { _claims: held })
}

fn claim_one(name: &str, what: &str) -> Result<UnixListener, ClaimError> {
    let failed = |source| ClaimError::Io {
        what: what.to_string(),
        source,
    };
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(failed)?;
    match UnixListener::bind_addr(&addr) {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let holder = match UnixStream::connect_addr(&addr).and_then(|s| peer_pid(&s)) {
                Ok(pid) => format!("agent-egress pid {pid}"),
                Err(e) => format!("another agent-egress (its pid unknown: {e})"),
            };
            Err(ClaimError::Held {
                holder,
                what: what.to_string(),
            })
        }
        Err(e) => Err(failed(e)),
    }
}

fn peer_pid(stream: &UnixStream) -> io::Result<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes a struct ucred into `cred`, at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_claim_names_the_holder_and_a_released_one_is_free() {
        let table = format!("instance_test_{}", std::process::id());
        let first = claim(&table, 1).unwrap();
        let err = claim(&table, 2).err().unwrap().to_string();
        assert!(
            err.contains(&format!("pid {}", std::process::id()))
                && err.contains(&format!("table inet {table}")),
            "{err}"
        );
        drop(first);
        claim(&table, 1).unwrap();
    }
}
