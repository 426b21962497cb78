//! Telling systemd the daemon is ready (`Type=notify`): `READY=1` on the
//! datagram socket named by `NOTIFY_SOCKET`, once the table, routes, BPF
//! programs and listeners are all in place, so units ordered after the daemon
//! start only then. Without `NOTIFY_SOCKET` (not started by systemd) nothing is sent.

use std::fmt;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// What could not be done to tell systemd, and why.
#[derive(Debug)]
pub struct NotifyError {
    doing: String,
    source: io::Error,
}

impl fmt::Display for NotifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.doing, self.source)
    }
}

impl std::error::Error for NotifyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Sends `READY=1` if systemd asked for it; an error names what failed.
pub fn ready() -> Result<(), NotifyError> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let bytes = path.as_encoded_bytes();
    // "@name" is an abstract socket; anything else a path.
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(&path),
    };
    let failed = |doing: String| move |source| NotifyError { doing, source };
    let addr = addr.map_err(failed(format!("NOTIFY_SOCKET {path:?}")))?;
    let socket = UnixDatagram::unbound().map_err(failed("notify socket".into()))?;
    socket
        .send_to_addr(b"READY=1", &addr)
        .map(|_| ())
        .map_err(failed(format!("telling systemd we are ready ({path:?})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_the_socket_systemd_names() {
        let dir = std::env::temp_dir().join(format!("agent-egress-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let systemd = UnixDatagram::bind(&path).unwrap();
        // SAFETY (of the test): no other test reads or writes NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        let sent = ready();
        let missing = dir.join("missing");
        unsafe { std::env::set_var("NOTIFY_SOCKET", &missing) };
        let unsent = ready();
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        sent.unwrap();
        let why = unsent.unwrap_err().to_string();
        assert!(
            why.starts_with(&format!("telling systemd we are ready ({missing:?}): ")),
            "{why}"
        );
        let mut buf = [0u8; 64];
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(ready().is_ok(), "nothing to do without NOTIFY_SOCKET");
    }
}
