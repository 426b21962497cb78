//! The TPROXY listening sockets.
//!
//! IP_TRANSPARENT lets the socket accept connections addressed to any IP (the
//! agent's original destination); SO_REUSEPORT gives each worker thread its
//! own socket on the same port so the kernel spreads connections over them.

use socket2::{Domain, Socket, Type};
use std::io;
use std::net::SocketAddr;

const BACKLOG: i32 = 4096;

pub fn transparent_listener(addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    let context = |what: &'static str| move |e: io::Error| annotate(e, what);
    socket
        .set_reuse_address(true)
        .map_err(context("setsockopt SO_REUSEADDR"))?;
    socket
        .set_reuse_port(true)
        .map_err(context("setsockopt SO_REUSEPORT"))?;
    match addr {
        SocketAddr::V4(_) => socket.set_ip_transparent_v4(true).map_err(need_net_admin)?,
        SocketAddr::V6(_) => {
            socket
                .set_only_v6(true)
                .map_err(context("setsockopt IPV6_V6ONLY"))?;
            socket.set_ip_transparent_v6(true).map_err(need_net_admin)?;
        }
    }
    socket
        .bind(&addr.into())
        .map_err(|e| annotate(e, &format!("bind {addr}")))?;
    socket
        .listen(BACKLOG)
        .map_err(|e| annotate(e, &format!("listen on {addr}")))?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

fn annotate(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// An IP_TRANSPARENT refusal, with what it takes.
pub fn need_net_admin(e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("{e} (transparent sockets need CAP_NET_ADMIN or CAP_NET_RAW)"),
    )
}
