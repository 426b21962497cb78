//! Dialing and the upstream handshakes against real servers from Debian
//! (microsocks, danted, tinyproxy) on loopback, each in front of a small TCP
//! server the test runs; and the block responses as curl sees them.

mod local_servers;

use agent_egress::config::Credentials;
use agent_egress::outbound::{
    connect_outcome, dial, http_forbidden, tls_access_denied_alert, DialOptions, Handshake,
    HttpConnectHandshake, Progress, Socks5Handshake, Target,
};
use local_servers::{free_port, tool, Scratch, Server};
use mio::{Events, Interest, Poll, Token};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

const BANNER: &[u8] = b"hello from the target\n";

/// A target that greets first (so the tunnel's first bytes may arrive with
/// the proxy's reply) and then echoes. It listens on 127.0.0.1 and ::1 on one
/// port, so "localhost" reaches it whichever address the upstream picks.
fn greeting_echo_server() -> u16 {
    loop {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        let listeners = match TcpListener::bind(("::1", port)) {
            Ok(v6) => vec![v4, v6],
            Err(e) if e.kind() == ErrorKind::AddrInUse => continue,
            Err(_) => vec![v4], // no IPv6 loopback here
        };
        for listener in listeners {
            std::thread::spawn(move || {
                for conn in listener.incoming().flatten() {
                    std::thread::spawn(move || greet_and_echo(conn));
                }
            });
        }
        return port;
    }
}

fn greet_and_echo(mut conn: TcpStream) {
    if conn.write_all(BANNER).is_err() {
        return;
    }
    let mut buf = [0u8; 1024];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 || conn.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// A loopback port nothing listens on.
fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn creds(user: &str, pass: &str) -> Credentials {
    Credentials {
        username: user.into(),
        password: pass.into(),
    }
}

fn wait_for_listener(server: &mut Server, port: u16) {
    server.wait_until(|| TcpStream::connect(("127.0.0.1", port)).is_ok());
}

fn microsocks(test: &str, auth: Option<(&str, &str)>) -> Option<(Server, SocketAddr, Scratch)> {
    let microsocks = tool("microsocks")?;
    let scratch = Scratch::new(test);
    let port = free_port();
    let mut cmd = Command::new(microsocks);
    cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
    if let Some((user, pass)) = auth {
        cmd.args(["-u", user, "-P", pass]);
    }
    let mut server = Server::spawn(cmd, &scratch.path("microsocks.log"));
    wait_for_listener(&mut server, port);
    Some((
        server,
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        scratch,
    ))
}

/// danted without authentication, refusing connections to `blocked_port`.
fn danted(test: &str, blocked_port: u16) -> Option<(Server, SocketAddr, Scratch)> {
    let danted = tool("danted")?;
    let scratch = Scratch::new(test);
    let port = free_port();
    let conf = scratch.path("danted.conf");
    std::fs::write(
        &conf,
        format!(
            "logoutput: {log}\n\
             internal: 127.0.0.1 port = {port}\n\
             external: 127.0.0.1\n\
             socksmethod: none\n\
             clientmethod: none\n\
             user.privileged: root\n\
             user.unprivileged: nobody\n\
             client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}\n\
             socks block {{ from: 0.0.0.0/0 to: 127.0.0.1/32 port = {blocked_port} }}\n\
             socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 command: connect }}\n",
            log = scratch.path("danted.log").display(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(danted);
    cmd.arg("-f")
        .arg(&conf)
        .arg("-p")
        .arg(scratch.path("danted.pid"));
    let mut server = Server::spawn(cmd, &scratch.path("danted.out"));
    wait_for_listener(&mut server, port);
    Some((
        server,
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        scratch,
    ))
}

fn tinyproxy(test: &str, auth: Option<(&str, &str)>) -> Option<(Server, SocketAddr, Scratch)> {
    let tinyproxy = tool("tinyproxy")?;
    let scratch = Scratch::new(test);
    let port = free_port();
    let conf = scratch.path("tinyproxy.conf");
    let mut text = format!(
        "Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 30\nLogLevel Info\n\
         DisableViaHeader Yes\nPidFile \"{}\"\n",
        scratch.path("tinyproxy.pid").display()
    );
    // No ConnectPort line: CONNECT may go to any port.
    if let Some((user, pass)) = auth {
        text.push_str(&format!("BasicAuth {user} {pass}\n"));
    }
    std::fs::write(&conf, text).unwrap();
    let mut cmd = Command::new(tinyproxy);
    cmd.arg("-d").arg("-c").arg(&conf);
    let mut server = Server::spawn(cmd, &scratch.path("tinyproxy.log"));
    wait_for_listener(&mut server, port);
    Some((
        server,
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        scratch,
    ))
}

/// Runs a handshake over a blocking stream: the tunnel's first bytes, or why
/// it failed.
fn handshake(stream: &mut TcpStream, h: &mut dyn Handshake) -> Result<Vec<u8>, String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        let out = h.bytes_to_send().to_vec();
        if !out.is_empty() {
            stream.write_all(&out).unwrap();
            h.sent(out.len());
        }
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            return Err(h.closed());
        }
        match h.received(&buf[..n]) {
            Progress::Send | Progress::NeedMore => {}
            Progress::Open { leftover } => return Ok(leftover),
            Progress::Failed(reason) => return Err(reason),
        }
    }
}

fn through(proxy: SocketAddr, h: &mut dyn Handshake) -> Result<(TcpStream, Vec<u8>), String> {
    let mut stream = TcpStream::connect(proxy).unwrap();
    let leftover = handshake(&mut stream, h)?;
    Ok((stream, leftover))
}

/// The target's greeting arrives whole (part of it perhaps with the
/// handshake's last read) and bytes go both ways.
fn assert_tunnel_works(mut stream: TcpStream, leftover: Vec<u8>) {
    let mut greeting = leftover;
    let mut buf = [0u8; 256];
    while greeting.len() < BANNER.len() {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "tunnel closed after {greeting:?}");
        greeting.extend_from_slice(&buf[..n]);
    }
    assert_eq!(greeting, BANNER);
    stream.write_all(b"ping through the tunnel").unwrap();
    let mut echo = [0u8; 23];
    stream.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"ping through the tunnel");
}

#[test]
fn socks5_microsocks_resolves_the_name_itself() {
    let Some((_server, proxy, _scratch)) = microsocks("socks-name", None) else {
        return;
    };
    let port = greeting_echo_server();
    let mut h = Socks5Handshake::new(Target::Name("localhost".into(), port), None).unwrap();
    let (stream, leftover) = through(proxy, &mut h).unwrap();
    assert_tunnel_works(stream, leftover);
}

#[test]
fn socks5_microsocks_username_password() {
    let Some((_server, proxy, _scratch)) = microsocks("socks-auth", Some(("agent", "s3cret")))
    else {
        return;
    };
    credentials_are_checked(
        proxy,
        |t, c| Box::new(Socks5Handshake::new(t, c).unwrap()),
        "socks5: upstream refused our username/password",
        "none of our authentication methods",
    );
}

/// agent/s3cret opens a tunnel; a wrong password is refused (the error
/// starting `wrong`), and so is no password (the error containing `none`).
fn credentials_are_checked(
    proxy: SocketAddr,
    handshake: impl Fn(Target, Option<&Credentials>) -> Box<dyn Handshake>,
    wrong: &str,
    none: &str,
) {
    let port = greeting_echo_server();
    let target = || Target::Addr(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    let mut h = handshake(target(), Some(&creds("agent", "s3cret")));
    let (stream, leftover) = through(proxy, &mut *h).unwrap();
    assert_tunnel_works(stream, leftover);
    let mut h = handshake(target(), Some(&creds("agent", "wrong")));
    let err = through(proxy, &mut *h).unwrap_err();
    assert!(err.starts_with(wrong), "{err}");
    let mut h = handshake(target(), None);
    let err = through(proxy, &mut *h).unwrap_err();
    assert!(err.contains(none), "{err}");
}

#[test]
fn socks5_target_refused_is_named() {
    let Some((_server, proxy, _scratch)) = microsocks("socks-refused", None) else {
        return;
    };
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, closed_port()));
    let mut h = Socks5Handshake::new(Target::Addr(target), None).unwrap();
    let err = through(proxy, &mut h).unwrap_err();
    assert_eq!(
        err,
        format!("socks5: upstream could not connect to {target}: connection refused (reply 5)")
    );
}

#[test]
fn socks5_danted_by_name_and_its_ruleset() {
    let blocked = closed_port();
    let Some((_server, proxy, _scratch)) = danted("socks-dante", blocked) else {
        return;
    };
    let port = greeting_echo_server();
    let mut h = Socks5Handshake::new(Target::Name("localhost".into(), port), None).unwrap();
    let (stream, leftover) = through(proxy, &mut h).unwrap();
    assert_tunnel_works(stream, leftover);

    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, blocked));
    let mut h = Socks5Handshake::new(Target::Addr(target), None).unwrap();
    let err = through(proxy, &mut h).unwrap_err();
    assert!(
        err.contains(&format!(
            "could not connect to {target}: connection not allowed by its ruleset (reply 2)"
        )),
        "{err}"
    );
}

#[test]
fn http_connect_tinyproxy_by_name() {
    let Some((_server, proxy, _scratch)) = tinyproxy("http-name", None) else {
        return;
    };
    let port = greeting_echo_server();
    let mut h = HttpConnectHandshake::new(Target::Name("localhost".into(), port), None).unwrap();
    let (stream, leftover) = through(proxy, &mut h).unwrap();
    assert_tunnel_works(stream, leftover);

    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, closed_port()));
    let mut h = HttpConnectHandshake::new(Target::Addr(target), None).unwrap();
    let err = through(proxy, &mut h).unwrap_err();
    assert!(
        err.starts_with(&format!(
            "http connect: upstream refused CONNECT to {target}: HTTP/1."
        )),
        "{err}"
    );
    assert!(err.contains("Unable to connect"), "{err}");
}

#[test]
fn http_connect_tinyproxy_basic_auth() {
    let Some((_server, proxy, _scratch)) = tinyproxy("http-auth", Some(("agent", "s3cret"))) else {
        return;
    };
    credentials_are_checked(
        proxy,
        |t, c| Box::new(HttpConnectHandshake::new(t, c).unwrap()),
        "http connect: upstream refused our proxy credentials (HTTP/1.",
        "none are configured",
    );
}

const STREAM: Token = Token(1);

/// Waits for readiness of the registered stream, at most 5 s.
fn wait_for(poll: &mut Poll, events: &mut Events) {
    poll.poll(events, Some(Duration::from_secs(5))).unwrap();
    assert!(!events.is_empty(), "no readiness within 5 s");
}

/// Dials, then runs a SOCKS5 handshake the way the event loop will: a
/// non-blocking socket, writes and reads as readiness allows.
#[test]
fn dial_and_handshake_without_blocking() {
    let Some((_server, proxy, _scratch)) = microsocks("dial-socks", None) else {
        return;
    };
    let port = greeting_echo_server();
    let mut stream = dial(proxy, &DialOptions::default()).unwrap();
    let mut poll = Poll::new().unwrap();
    let mut events = Events::with_capacity(4);
    poll.registry()
        .register(&mut stream, STREAM, Interest::READABLE | Interest::WRITABLE)
        .unwrap();
    while !connect_outcome(&stream).unwrap() {
        wait_for(&mut poll, &mut events);
    }
    let mut h = Socks5Handshake::new(Target::Name("localhost".into(), port), None).unwrap();
    let mut buf = [0u8; 4096];
    let leftover = 'handshake: loop {
        while !h.bytes_to_send().is_empty() {
            match stream.write(h.bytes_to_send()) {
                Ok(n) => h.sent(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => wait_for(&mut poll, &mut events),
                Err(e) => panic!("write: {e}"),
            }
        }
        match stream.read(&mut buf) {
            Ok(0) => panic!("{}", h.closed()),
            Ok(n) => match h.received(&buf[..n]) {
                Progress::Open { leftover } => break 'handshake leftover,
                Progress::Failed(reason) => panic!("{reason}"),
                Progress::Send | Progress::NeedMore => {}
            },
            Err(e) if e.kind() == ErrorKind::WouldBlock => wait_for(&mut poll, &mut events),
            Err(e) => panic!("read: {e}"),
        }
    };
    let mut greeting = leftover;
    let give_up = Instant::now() + Duration::from_secs(5);
    while greeting.len() < BANNER.len() && Instant::now() < give_up {
        match stream.read(&mut buf) {
            Ok(n) => greeting.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => wait_for(&mut poll, &mut events),
            Err(e) => panic!("read: {e}"),
        }
    }
    assert_eq!(greeting, BANNER);
}

/// Upstream not listening: the connection is refused at once, not after a
/// timeout.
#[test]
fn dial_to_a_closed_port_is_refused_fast() {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, closed_port()));
    let start = Instant::now();
    let refused = match dial(addr, &DialOptions::default()) {
        Err(e) => e,
        Ok(mut stream) => {
            let mut poll = Poll::new().unwrap();
            let mut events = Events::with_capacity(4);
            poll.registry()
                .register(&mut stream, STREAM, Interest::WRITABLE)
                .unwrap();
            loop {
                match connect_outcome(&stream) {
                    Ok(true) => panic!("connected to a closed port"),
                    Ok(false) => wait_for(&mut poll, &mut events),
                    Err(e) => break e,
                }
            }
        }
    };
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused, "{refused}");
    assert!(start.elapsed() < Duration::from_secs(1));
}

fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "this test needs root (SO_MARK, SO_BINDTODEVICE)"
        );
        eprintln!("SKIPPED: needs root (SO_MARK, SO_BINDTODEVICE)");
    }
    root
}

fn socket_mark(stream: &mio::net::TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    let mut mark: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: mark and len are valid for writes for the whole call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&raw mut mark).cast(),
            &mut len,
        )
    };
    assert_eq!(
        rc,
        0,
        "getsockopt SO_MARK: {}",
        std::io::Error::last_os_error()
    );
    mark
}

#[test]
fn dial_options_mark_and_interface() {
    if !running_as_root() {
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();

    let plain = dial(addr, &DialOptions::default()).unwrap();
    assert_eq!(socket_mark(&plain), 0);
    assert!(plain.nodelay().unwrap());

    let opts = DialOptions {
        interface: Some("lo".into()),
        mark: Some(0x5ea1),
    };
    let marked = dial(addr, &opts).unwrap();
    assert_eq!(socket_mark(&marked), 0x5ea1);
    let (_accepted, peer) = listener.accept().unwrap();
    let (_accepted, peer2) = listener.accept().unwrap();
    assert!([peer, peer2].contains(&marked.local_addr().unwrap()));

    let opts = DialOptions {
        interface: Some("nosuchif0".into()),
        mark: None,
    };
    let err = dial(addr, &opts).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("dial {addr}: SO_BINDTODEVICE \"nosuchif0\": no such network interface")
    );
}

/// Serves one connection: reads what the client sends first, answers with
/// `response`, closes.
fn one_shot_server(response: Vec<u8>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(&response);
        }
    });
    port
}

#[test]
fn curl_reports_the_tls_alert_as_access_denied() {
    let Some(curl) = tool("curl") else {
        return;
    };
    let port = one_shot_server(tls_access_denied_alert().to_vec());
    let out = Command::new(curl)
        .args(["-sS", "--max-time", "5"])
        .arg(format!("https://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(35), "{stderr}");
    assert!(stderr.contains("access denied"), "{stderr}");
}

#[test]
fn curl_shows_the_403_page() {
    let Some(curl) = tool("curl") else {
        return;
    };
    let port = one_shot_server(http_forbidden("no-pastebins", "paste.example"));
    let out = Command::new(curl)
        .args(["-sS", "--max-time", "5", "-i"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{stdout}");
    assert!(
        stdout.ends_with(
            "\r\n\r\nagent-egress: the connection to paste.example was blocked by rule no-pastebins.\n"
        ),
        "{stdout}"
    );
}
