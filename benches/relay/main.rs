//! Bulk throughput and CPU of the two relays over loopback: the splice relay
//! (`Flow`, as a session drives it: edge-triggered epoll, both directions on
//! one thread) and the kernel relay (sockhash + sk_skb verdict redirect).
//!
//! client ⇄ A [relay] B ⇄ server, all on 127.0.0.1 in this process: the
//! server sends BYTES to the client and shuts down; then the client sends
//! BYTES to the server and shuts down. Per phase: MB/s, and CPU seconds per
//! GB: `ours` = this process (all threads) + all kworkers (the kernel relay
//! sends from a kworker, outside this process; softirq time is charged to
//! the task it interrupted, on loopback mostly the sending endpoint);
//! `machine` = all CPUs busy from /proc/stat, whatever else runs included;
//! and the kworkers, irq+softirq, the relay thread and the two endpoint
//! threads alone. Root only (the kernel relay needs CAP_BPF + CAP_NET_ADMIN).
//!
//! `cargo bench --bench relay` (RELAY_BENCH_MIB, default 2048; RELAY_BENCH_ROUNDS, default 3;
//! RELAY_BENCH_ONLY=splice|kernel). `RELAY_BENCH_CHECK=1`, or a run without
//! `--bench` (`cargo test --benches`), checks the kernel relay instead of
//! timing it: 1 GiB each way with every byte verified, a reset from either
//! side mid-stream, and bytes queued before the join.

mod kernel_relay;

use agent_egress::proxy::{Flow, Pump};
use kernel_relay::{relay_blocking, JoinRefused, KernelRelay};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Splice,
    Kernel,
}

/// A moment: wall time, the machine's busy ticks, and three threads' ticks.
#[derive(Clone, Copy)]
struct Snap {
    at: Instant,
    /// All CPUs busy (user, nice, system, irq, softirq): includes whatever
    /// else runs on the machine.
    busy: u64,
    /// irq + softirq of all CPUs.
    irq: u64,
    /// This process, all threads (also those ended).
    process: u64,
    /// All kworker threads (where sk_psock_backlog runs).
    kworkers: u64,
    relay: u64,
    endpoints: u64,
}

/// (busy, irq + softirq) of all CPUs.
fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu = stat.lines().next().unwrap();
    // cpu user nice system idle iowait irq softirq steal ...
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    (v[0] + v[1] + v[2] + v[5] + v[6], v[5] + v[6])
}

/// utime + stime of a /proc/.../stat line, and its comm.
fn stat_ticks(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    // fields 14 and 15 (utime, stime); f[0] is field 3.
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((&stat[open + 1..close], ticks))
}

fn kworker_ticks() -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if let Some((comm, ticks)) = stat_ticks(&stat) {
            if comm.starts_with("kworker") {
                total += ticks;
            }
        }
    }
    total
}

fn process_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    stat_ticks(&stat).map_or(0, |(_, t)| t)
}

/// The ticks of threads that ended, as they said last.
static FINAL_TICKS: std::sync::Mutex<Vec<(i32, u64)>> = std::sync::Mutex::new(Vec::new());

/// Called by a thread as it ends: its ticks stay known.
fn record_final_ticks() {
    let tid = gettid();
    let ticks = thread_ticks(tid);
    FINAL_TICKS.lock().unwrap().push((tid, ticks));
}

fn thread_ticks(tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
    match stat_ticks(&stat) {
        Some((_, ticks)) => ticks,
        None => {
            let finals = FINAL_TICKS.lock().unwrap();
            finals
                .iter()
                .find(|(t, _)| *t == tid)
                .map_or(0, |(_, n)| *n)
        }
    }
}

fn gettid() -> i32 {
    // SAFETY: no arguments.
    unsafe { libc::gettid() }
}

struct Tids {
    relay: i32,
    client: i32,
    server: i32,
}

fn snap(t: &Tids) -> Snap {
    let (busy, irq) = machine_ticks();
    Snap {
        at: Instant::now(),
        busy,
        irq,
        process: process_ticks(),
        kworkers: kworker_ticks(),
        relay: thread_ticks(t.relay),
        endpoints: thread_ticks(t.client) + thread_ticks(t.server),
    }
}

const CHUNK: usize = 256 * 1024;
/// The stream's byte at offset p is p % PERIOD (a prime: no chunk size is a
/// multiple of it, so a lost, repeated or reordered chunk shows).
const PERIOD: usize = 251;

fn pattern() -> Vec<u8> {
    (0..CHUNK + PERIOD).map(|i| (i % PERIOD) as u8).collect()
}

fn send_pattern(s: &mut TcpStream, total: u64) {
    let pat = pattern();
    let mut sent = 0u64;
    while sent < total {
        let n = (total - sent).min(CHUNK as u64) as usize;
        let start = (sent % PERIOD as u64) as usize;
        s.write_all(&pat[start..start + n]).unwrap();
        sent += n as u64;
    }
    s.shutdown(Shutdown::Write).unwrap();
}

/// Reads to the end; the count of bytes, each checked against the pattern.
fn recv_pattern(s: &mut TcpStream) -> u64 {
    let pat = pattern();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            return got;
        }
        let start = (got % PERIOD as u64) as usize;
        assert!(
            buf[..n] == pat[start..start + n],
            "bytes {got}..{} are not the ones sent",
            got + n as u64
        );
        got += n as u64;
    }
}

fn send_all(s: &mut TcpStream, total: u64) {
    let buf: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
    let mut left = total;
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        s.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write).unwrap();
}

fn recv_all(s: &mut TcpStream) -> u64 {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        match s.read(&mut buf).unwrap() {
            0 => return got,
            n => got += n as u64,
        }
    }
}

fn splice_relay(a: RawFd, b: RawFd) -> [u64; 2] {
    // SAFETY: plain syscalls on fds we hold; events is valid for its length.
    unsafe {
        let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        for (fd, token) in [(a, 0u64), (b, 1u64)] {
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
                u64: token,
            };
            libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev);
        }
        let mut up = Flow::new(Vec::new());
        let mut down = Flow::new(Vec::new());
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
        loop {
            let n = libc::epoll_wait(ep, events.as_mut_ptr(), 8, -1);
            for ev in &events[..n.max(0) as usize] {
                let closing =
                    ev.events & (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0;
                let (readable, writable) = (
                    closing || ev.events & libc::EPOLLIN as u32 != 0,
                    ev.events & (libc::EPOLLOUT | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0,
                );
                let (src_flow, dst_flow) = if ev.u64 == 0 {
                    (&mut up, &mut down)
                } else {
                    (&mut down, &mut up)
                };
                if readable {
                    src_flow.source_readable(closing);
                }
                if writable {
                    dst_flow.dest_writable();
                }
            }
            loop {
                let mut budget = 1 << 20;
                let dn = down.is_finished();
                let r1 = up.pump(a, b, &mut budget, dn).unwrap();
                let un = up.is_finished();
                let r2 = down.pump(b, a, &mut budget, un).unwrap();
                if r1 == Pump::Finished && r2 == Pump::Finished {
                    libc::close(ep);
                    return [up.delivered, down.delivered];
                }
                if r1 != Pump::Budget && r2 != Pump::Budget {
                    break;
                }
            }
        }
    }
}

struct Figures {
    down: Phase,
    up: Phase,
}

/// One phase's figures: MB/s, then CPU seconds per GB.
#[derive(Clone, Copy)]
struct Phase {
    mbs: f64,
    /// This process + kworkers: what the transfer cost. (Tick accounting
    /// charges irq/softirq time to the task it interrupted as well, so it
    /// is in here already, as long as that task was one of ours.)
    ours: f64,
    /// All CPUs busy, other load on the machine included.
    machine: f64,
    kworkers: f64,
    irq: f64,
    relay: f64,
    endpoints: f64,
}

fn figures(from: Snap, to: Snap, bytes: u64) -> Phase {
    // SAFETY: no arguments.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let secs = (to.at - from.at).as_secs_f64();
    let gb = bytes as f64 / 1e9;
    let per_gb = |a: u64, b: u64| b.saturating_sub(a) as f64 / hz / gb;
    let kworkers = per_gb(from.kworkers, to.kworkers);
    let irq = per_gb(from.irq, to.irq);
    Phase {
        mbs: bytes as f64 / 1e6 / secs,
        ours: per_gb(from.process, to.process) + kworkers,
        machine: per_gb(from.busy, to.busy),
        kworkers,
        irq,
        relay: per_gb(from.relay, to.relay),
        endpoints: per_gb(from.endpoints, to.endpoints),
    }
}

fn run(mode: Mode, kernel: &Arc<KernelRelay>, bytes: u64) -> Figures {
    let proxy_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(proxy_l.local_addr().unwrap()).unwrap();
    let (a, _) = proxy_l.accept().unwrap();
    let b = TcpStream::connect(server_l.local_addr().unwrap()).unwrap();
    let (mut server, _) = server_l.accept().unwrap();

    let start = Arc::new(Barrier::new(4));
    let (tid_tx, tid_rx) = mpsc::channel();
    let relay = {
        let (start, kernel, tid_tx) = (start.clone(), kernel.clone(), tid_tx.clone());
        std::thread::spawn(move || {
            tid_tx.send(("relay", gettid())).unwrap();
            let moved = match mode {
                Mode::Splice => {
                    start.wait();
                    a.set_nonblocking(true).unwrap();
                    b.set_nonblocking(true).unwrap();
                    splice_relay(a.as_raw_fd(), b.as_raw_fd())
                }
                Mode::Kernel => relay_blocking(&kernel, a.as_raw_fd(), b.as_raw_fd(), || {
                    start.wait();
                })
                .unwrap_or_else(|e| panic!("kernel relay: {e:?}")),
            };
            record_final_ticks();
            // The flow that finished last left its end to the close.
            drop((a, b));
            moved
        })
    };
    let (snap_tx, snap_rx) = mpsc::channel::<(&str, Snap)>();
    let tids = Arc::new(std::sync::OnceLock::<Tids>::new());
    let client_t = {
        let (start, tid_tx, snap_tx, tids) =
            (start.clone(), tid_tx.clone(), snap_tx.clone(), tids.clone());
        std::thread::spawn(move || {
            tid_tx.send(("client", gettid())).unwrap();
            start.wait();
            let got = recv_all(&mut client);
            snap_tx.send(("down", snap(tids.wait()))).unwrap();
            send_all(&mut client, bytes);
            assert_eq!(recv_all(&mut client), 0);
            record_final_ticks();
            got
        })
    };
    let server_t = {
        let (start, tid_tx, snap_tx, tids) = (start.clone(), tid_tx, snap_tx, tids.clone());
        std::thread::spawn(move || {
            tid_tx.send(("server", gettid())).unwrap();
            start.wait();
            send_all(&mut server, bytes);
            let got = recv_all(&mut server);
            record_final_ticks();
            snap_tx.send(("up", snap(tids.wait()))).unwrap();
            got
        })
    };
    let mut t = Tids {
        relay: 0,
        client: 0,
        server: 0,
    };
    for _ in 0..3 {
        let (who, tid) = tid_rx.recv().unwrap();
        match who {
            "relay" => t.relay = tid,
            "client" => t.client = tid,
            _ => t.server = tid,
        }
    }
    let s0 = snap(&t);
    let _ = tids.set(t);
    start.wait();
    let mut down = None;
    let mut up = None;
    for _ in 0..2 {
        let (phase, s) = snap_rx.recv().unwrap();
        if phase == "down" {
            down = Some(s);
        } else {
            up = Some(s);
        }
    }
    let (down, up) = (down.unwrap(), up.unwrap());
    assert_eq!(client_t.join().unwrap(), bytes);
    assert_eq!(server_t.join().unwrap(), bytes);
    let moved = relay.join().unwrap();
    assert_eq!(moved, [bytes, bytes], "{mode:?}: bytes moved up, down");
    Figures {
        down: figures(s0, down, bytes),
        up: figures(down, up, bytes),
    }
}

/// client ⇄ a, b ⇄ server: four connected sockets.
fn four() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
    let proxy_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(proxy_l.local_addr().unwrap()).unwrap();
    let (a, _) = proxy_l.accept().unwrap();
    let b = TcpStream::connect(server_l.local_addr().unwrap()).unwrap();
    let (server, _) = server_l.accept().unwrap();
    (client, a, b, server)
}

/// `a` and `b` relayed in the kernel on a thread of their own, once joined:
/// the thread ends with the bytes moved each way.
fn relayed_in_kernel(
    kernel: &Arc<KernelRelay>,
    a: TcpStream,
    b: TcpStream,
) -> std::thread::JoinHandle<Result<[u64; 2], JoinRefused>> {
    let kernel = kernel.clone();
    let (joined_tx, joined_rx) = mpsc::channel();
    let relay = std::thread::spawn(move || {
        let moved = relay_blocking(&kernel, a.as_raw_fd(), b.as_raw_fd(), || {
            joined_tx.send(()).unwrap()
        });
        drop((a, b));
        moved
    });
    joined_rx.recv().unwrap();
    relay
}

/// 1 GiB each way through the kernel relay, every byte checked; the
/// server's end passed on while the client still sends (half-close both ways).
fn check_bytes(kernel: &Arc<KernelRelay>) {
    const GIB: u64 = 1 << 30;
    let (mut client, a, b, mut server) = four();
    let relay = relayed_in_kernel(kernel, a, b);
    let up = std::thread::spawn(move || {
        send_pattern(&mut client, GIB);
        let got = recv_pattern(&mut client);
        (client, got)
    });
    send_pattern(&mut server, GIB);
    let server_got = recv_pattern(&mut server);
    let (_client, client_got) = up.join().unwrap();
    let moved = relay
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("kernel relay: {e:?}"));
    assert_eq!((server_got, client_got), (GIB, GIB));
    assert_eq!(moved, [GIB, GIB], "counted from TCP_INFO + SIOCOUTQ");
    println!("check bytes: 1 GiB each way at once, every byte as sent, counts {moved:?}: ok");
}

/// One side resets mid-stream: the relay must end, not wait.
fn check_reset(kernel: &Arc<KernelRelay>, server_resets: bool) {
    let (client, a, b, server) = four();
    let relay = relayed_in_kernel(kernel, a, b);
    let (mut sender, mut resetter) = if server_resets {
        (client, server)
    } else {
        (server, client)
    };
    let feeder = std::thread::spawn(move || {
        let buf = vec![7u8; CHUNK];
        // Until the relay gives up and its close reaches us.
        while sender.write_all(&buf).is_ok() {}
    });
    let mut buf = vec![0u8; 1 << 20];
    resetter.read_exact(&mut buf).unwrap();
    // Its close sends a reset.
    let _ = socket2::SockRef::from(&resetter).set_linger(Some(std::time::Duration::ZERO));
    let at = Instant::now();
    drop(resetter);
    let r = relay.join().unwrap();
    let took = at.elapsed();
    feeder.join().unwrap();
    assert!(r.is_err(), "a reset ends the relay with an error: {r:?}");
    assert!(took.as_secs() < 2, "took {took:?}");
    let who = if server_resets { "server" } else { "client" };
    println!("check reset by the {who}: relay ended in {took:?} ({r:?}); the other side's writes failed: ok");
}

/// Bytes queued on a socket before the join (joined without the kick): they
/// wait for the next sk_data_ready, and FIONREAD no longer shows them;
/// SO_RCVLOWAT relays them (tcp_set_rcvlowat calls tcp_data_ready).
fn check_queued(kernel: &Arc<KernelRelay>) {
    let (mut client, a, b, mut server) = four();
    client.write_all(&[1u8; 1000]).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(kernel_relay::inq(a.as_raw_fd()).unwrap(), 1000);
    let joined = kernel
        .join_unchecked(a.as_raw_fd(), b.as_raw_fd(), false)
        .unwrap();
    server
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    let mut got = [0u8; 1000];
    let before_kick = server.read_exact(&mut got).is_ok();
    let waiting = kernel_relay::inq(a.as_raw_fd()).unwrap();
    let mut after_kick = false;
    if !before_kick {
        let _ = kernel_relay::set_rcvlowat(a.as_raw_fd(), 1);
        after_kick = server.read_exact(&mut got).is_ok();
    }
    // Relayed or not, the next bytes must follow.
    client.write_all(&[2u8; 10]).unwrap();
    let mut next = [0u8; 10];
    let next_ok = server.read_exact(&mut next).is_ok() && next == [2u8; 10];
    kernel.part(&joined);
    println!(
        "check queued: 1000 bytes queued before the join: relayed by the join itself: {before_kick}; \
         left in the queue then: {waiting}; relayed after SO_RCVLOWAT: {after_kick}; next bytes follow: {next_ok}"
    );
    assert!((before_kick || after_kick) && next_ok && got == [1u8; 1000]);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `cargo test --benches` runs this without `--bench`: the checks, not
    // minutes of timing. They need root: in CI a failure, elsewhere a skip.
    let timing = std::env::args().any(|a| a == "--bench");
    if std::env::var_os("RELAY_BENCH_CHECK").is_some() || !timing {
        let kernel = match KernelRelay::load() {
            Ok(kernel) => Arc::new(kernel),
            Err(e) if std::env::var_os("CI").is_none() => {
                eprintln!(
                    "SKIPPED: the kernel relay's checks need root (CAP_BPF, CAP_NET_ADMIN): {e}"
                );
                return;
            }
            Err(e) => panic!("{e}"),
        };
        check_queued(&kernel);
        check_reset(&kernel, true);
        check_reset(&kernel, false);
        check_bytes(&kernel);
        return;
    }
    let mib: u64 = std::env::var("RELAY_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2048);
    let rounds: usize = std::env::var("RELAY_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let kernel = match KernelRelay::load() {
        Ok(k) => Arc::new(k),
        Err(e) => {
            eprintln!("relay bench skipped: {e}");
            return;
        }
    };
    let bytes = mib << 20;
    println!(
        "{mib} MiB each way; CPU in s per GB: ours = this process + kworkers, \
         machine = all CPUs busy (other load included)"
    );
    println!(
        "{:>5} {:>6} {:>5} {:>6} {:>6} {:>8} {:>8} {:>6} {:>6} {:>9}",
        "round", "relay", "dir", "MB/s", "ours", "machine", "kworker", "irq", "relay", "endpoints"
    );
    for round in 1..=rounds {
        let order = if round % 2 == 1 {
            [Mode::Splice, Mode::Kernel]
        } else {
            [Mode::Kernel, Mode::Splice]
        };
        for mode in order {
            if std::env::var("RELAY_BENCH_ONLY")
                .is_ok_and(|m| !format!("{mode:?}").eq_ignore_ascii_case(&m))
            {
                continue;
            }
            let f = run(mode, &kernel, bytes);
            for (dir, p) in [("down", f.down), ("up", f.up)] {
                println!(
                    "{round:>5} {:>6} {dir:>5} {:>6.0} {:>6.3} {:>8.3} {:>8.3} {:>6.3} {:>6.3} {:>9.3}",
                    format!("{mode:?}").to_lowercase(),
                    p.mbs,
                    p.ours,
                    p.machine,
                    p.kworkers,
                    p.irq,
                    p.relay,
                    p.endpoints
                );
            }
        }
    }
}
