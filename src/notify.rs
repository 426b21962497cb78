//! Telling systemd the daemon is ready (`Type=notify`): `READY=1` on the
//! datagram socket named by `NOTIFY_SOCKET`, once the table, routes, BPF
//! programs and listeners are all in place, so units ordered after the daemon
//! start only then. Without `NOTIFY_SOCKET` (not started by systemd) nothing is sent.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `READY=1` if systemd asked for it; an error names what failed.
pub fn ready() -> Result<(), String> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let bytes = path.as_encoded_bytes();
    // "@name" is an abstract socket; anything else a path.
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(&path),
    }
    .map_err(|e| format!("NOTIFY_SOCKET {path:?}: {e}"))?;
    let socket = UnixDatagram::unbound().map_err(|e| format!("notify socket: {e}"))?;
    socket
        .send_to_addr(b"READY=1", &addr)
        .map(|_| ())
        .map_err(|e| format!("telling systemd we are ready ({path:?}): {e}"))
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
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        sent.unwrap();
        let mut buf = [0u8; 64];
        let n = systemd.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(ready(), Ok(()), "nothing to do without NOTIFY_SOCKET");
    }
}
