//! Relaying in the kernel: the two sockets of a decided connection go into a
//! sockhash whose `sk_skb` verdict program sends what each socket receives
//! out of the other one (`bpf_sk_redirect_hash`, egress), so no byte of the
//! stream passes through this process.
//!
//! How the kernel does it (net/core/skmsg.c, net/core/sock_map.c,
//! net/ipv4/tcp_bpf.c, kernel 6.x):
//! - inserting a socket replaces its `sk_data_ready` with
//!   `sk_psock_verdict_data_ready` (`sk_psock_start_verdict`), which reads
//!   whole skbs off the receive queue (`tcp_read_skb`) and runs the verdict
//!   on each. Bytes queued before the insertion wait for the next
//!   `sk_data_ready`, and once inserted FIONREAD no longer shows them
//!   (`tcp_bpf_ioctl` answers SIOCINQ with the psock's own queue,
//!   `sk_psock_msg_inq`). So the join looks at FIONREAD before inserting and
//!   sets SO_RCVLOWAT after: `tcp_set_rcvlowat` calls `tcp_data_ready`, which
//!   runs the verdict on whatever came in between.
//! - a redirect (`sk_psock_skb_redirect`) queues the skb on the *peer's*
//!   psock (`ingress_skb`) and schedules its work item; `sk_psock_backlog`
//!   then sends it with `skb_send_sock` from a kworker. So the bytes leave the
//!   other socket later than they were received: the end of one side may be
//!   passed on only once all of its bytes were sent on the other
//!   ([`Joined::drained`]).
//! - removing a socket from the map (or closing it) purges its psock's
//!   `ingress_skb`: bytes redirected to it and not yet sent are lost. A pair
//!   is only taken apart once both directions are drained.
//! - a verdict that does not redirect (`SK_PASS` without a target) queues the
//!   skb on the socket's own psock (`ingress_msg`), where `recvmsg` finds it.
//!
//! The program: the socket's cookie → its peer's cookie (a hash map this
//! process fills) → redirect to the peer in the sockhash. A socket whose peer
//! is unknown passes its bytes to its own reader.

use agent_egress::bpf::{op, BpfError, Insn, Map, Program, ProgramKind};
use agent_egress::bpf::{BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_SOCKHASH};
use agent_egress::proxy::shutdown_write;
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::RawFd;

const BPF_PROG_TYPE_SK_SKB: u32 = 14;
/// `BPF_SK_SKB_VERDICT`: a verdict per skb, without a stream parser.
const BPF_SK_SKB_VERDICT: u32 = 38;

const WHAT: &str = "the kernel relay";

static KIND: ProgramKind = ProgramKind {
    what: WHAT,
    name: c"ae_relay_verdict",
    prog_type: BPF_PROG_TYPE_SK_SKB,
    attach_type: BPF_SK_SKB_VERDICT,
};

// Helper numbers (`enum bpf_func_id`).
const MAP_LOOKUP_ELEM: i32 = 1;
const GET_SOCKET_COOKIE: i32 = 46;
const SK_REDIRECT_HASH: i32 = 72;
/// `enum sk_action`.
const SK_DROP: i32 = 0;
const SK_PASS: i32 = 1;
/// `offsetof(struct __sk_buff, len)`.
const SKB_LEN_OFFSET: i16 = 0;

/// Sockets in the kernel relay at once (two per connection).
const MAX_SOCKETS: u32 = 65_536;

/// ```text
/// r2 = *(u32 *)(r1 + 0)              // skb->len
/// if r2 != 0 goto data
/// r0 = SK_DROP                       // a bare FIN: nothing to send (see below)
/// exit
/// data:
/// r6 = r1                            // struct __sk_buff *
/// r0 = bpf_get_socket_cookie(r1)
/// *(u64 *)(r10 - 8) = r0
/// r1 = peers
/// r2 = r10 - 8
/// r0 = bpf_map_lookup_elem(r1, r2)   // &peer cookie, or NULL
/// if r0 == 0 goto pass
/// r1 = *(u64 *)(r0 + 0)
/// *(u64 *)(r10 - 16) = r1
/// r3 = r10 - 16
/// r1 = r6
/// r2 = sockets
/// r4 = 0                             // egress of the peer
/// bpf_sk_redirect_hash(r1, r2, r3, r4)
/// pass:
/// r0 = SK_PASS                       // redirected if the helper found the peer
/// exit
/// ```
///
/// A bare FIN comes to the verdict as an skb of length 0 (`tcp_read_skb`
/// hands it on like any other). Redirected, the peer's `sk_psock_backlog`
/// sends 0 bytes of it, takes that for a broken pipe
/// (`sk_psock_report_error(psock, EPIPE)`) and stops sending: the peer
/// socket shows EPIPE, and all later redirects to it are dropped. Dropping
/// it loses nothing: the end is passed on by this process, once drained.
fn program(peers: &Map, sockets: &Map) -> Vec<Insn> {
    let mut insns = vec![
        Insn::new(op::LDX_MEM_W, 2, 1, SKB_LEN_OFFSET, 0),
        Insn::new(op::JNE_IMM, 2, 0, 2, 0),
        Insn::new(op::MOV64_IMM, 0, 0, 0, SK_DROP),
        Insn::new(op::EXIT, 0, 0, 0, 0),
        Insn::new(op::MOV64_REG, 6, 1, 0, 0),
        Insn::new(op::CALL, 0, 0, 0, GET_SOCKET_COOKIE),
        Insn::new(op::STX_MEM_DW, 10, 0, -8, 0),
    ];
    insns.extend(Insn::load_map_fd(1, peers));
    insns.extend([
        Insn::new(op::MOV64_REG, 2, 10, 0, 0),
        Insn::new(op::ADD64_IMM, 2, 0, 0, -8),
        Insn::new(op::CALL, 0, 0, 0, MAP_LOOKUP_ELEM),
        // Over the 9 instructions of the redirect.
        Insn::new(op::JEQ_IMM, 0, 0, 9, 0),
        Insn::new(op::LDX_MEM_DW, 1, 0, 0, 0),
        Insn::new(op::STX_MEM_DW, 10, 1, -16, 0),
        Insn::new(op::MOV64_REG, 3, 10, 0, 0),
        Insn::new(op::ADD64_IMM, 3, 0, 0, -16),
        Insn::new(op::MOV64_REG, 1, 6, 0, 0),
    ]);
    insns.extend(Insn::load_map_fd(2, sockets));
    insns.extend([
        Insn::new(op::MOV64_IMM, 4, 0, 0, 0),
        Insn::new(op::CALL, 0, 0, 0, SK_REDIRECT_HASH),
        Insn::new(op::MOV64_IMM, 0, 0, 0, SK_PASS),
        Insn::new(op::EXIT, 0, 0, 0, 0),
    ]);
    insns
}

/// The program and its two maps: sockets by cookie, and each socket's peer.
pub struct KernelRelay {
    peers: Map,
    sockets: Map,
    _program: Program,
}

/// Why a pair was not joined; the connection stays with the splice relay.
#[derive(Debug)]
#[allow(dead_code)] // read through Debug
pub enum JoinRefused {
    /// A receive queue held bytes: the verdict would not see them until more came.
    Pending,
    Io(io::Error),
}

impl From<io::Error> for JoinRefused {
    fn from(e: io::Error) -> JoinRefused {
        JoinRefused::Io(e)
    }
}

impl KernelRelay {
    pub fn load() -> Result<KernelRelay, BpfError> {
        let peers = Map::create(WHAT, c"ae_relay_peers", BPF_MAP_TYPE_HASH, MAX_SOCKETS)?;
        let sockets = Map::create(WHAT, c"ae_relay_socks", BPF_MAP_TYPE_SOCKHASH, MAX_SOCKETS)?;
        let program = Program::load(&KIND, &program(&peers, &sockets))?;
        program.attach_to_map(&sockets)?;
        Ok(KernelRelay {
            peers,
            sockets,
            _program: program,
        })
    }

    /// Hands the connected TCP sockets `a` and `b` to the kernel: from now on
    /// what one receives is sent out of the other. Both receive queues must
    /// be empty, and all bytes read from either so far already passed on.
    pub fn join(&self, a: RawFd, b: RawFd) -> Result<Joined, JoinRefused> {
        if inq(a)? != 0 || inq(b)? != 0 {
            return Err(JoinRefused::Pending);
        }
        self.join_unchecked(a, b, true)
    }

    /// [`KernelRelay::join`] without looking at the receive queues, and
    /// without the SO_RCVLOWAT kick unless `kick` (to see what becomes of
    /// bytes queued before the join).
    pub fn join_unchecked(&self, a: RawFd, b: RawFd, kick: bool) -> Result<Joined, JoinRefused> {
        let ends = [End::of(a)?, End::of(b)?];
        let joined = Joined { ends };
        self.peers.insert(ends[0].cookie, ends[1].cookie)?;
        self.peers.insert(ends[1].cookie, ends[0].cookie)?;
        let inserted = self
            .sockets
            .insert(ends[0].cookie, a as u64)
            .and_then(|()| self.sockets.insert(ends[1].cookie, b as u64));
        if let Err(e) = inserted {
            self.part(&joined);
            return Err(e.into());
        }
        if kick {
            for fd in [a, b] {
                set_rcvlowat(fd, 1)?;
            }
        }
        Ok(joined)
    }

    /// Takes the pair out of the maps. Bytes redirected and not yet sent are
    /// lost: only for drained pairs, or ones being torn down.
    pub fn part(&self, joined: &Joined) {
        for end in &joined.ends {
            let _ = self.sockets.remove(end.cookie);
            let _ = self.peers.remove(end.cookie);
        }
    }
}

/// One socket of a joined pair, and where its counters stood at the join.
#[derive(Debug, Clone, Copy)]
struct End {
    fd: RawFd,
    cookie: u64,
    /// `tcpi_bytes_received` at the join.
    received_at_join: u64,
    /// Bytes written into the socket (acked + still queued) at the join.
    written_at_join: u64,
}

impl End {
    fn of(fd: RawFd) -> io::Result<End> {
        let info = tcp_info(fd)?;
        Ok(End {
            fd,
            cookie: socket_cookie(fd)?,
            received_at_join: info.bytes_received,
            written_at_join: info.bytes_acked + outq(fd)?,
        })
    }
}

/// A joined pair: `a` and `b` as given to [`KernelRelay::join`].
#[derive(Debug)]
pub struct Joined {
    ends: [End; 2],
}

/// Where one direction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes the source received since the join (its FIN not counted).
    pub received: u64,
    /// Bytes the destination took to send since the join.
    pub sent: u64,
}

impl Progress {
    pub fn drained(&self) -> bool {
        self.sent >= self.received
    }
}

impl Joined {
    /// The direction from end `from` (0: `a`, 1: `b`) to the other;
    /// `source_ended`: its FIN arrived (read 0 / EPOLLRDHUP), which counts
    /// one in `tcpi_bytes_received`.
    pub fn progress(&self, from: usize, source_ended: bool) -> io::Result<Progress> {
        let (src, dst) = (&self.ends[from], &self.ends[1 - from]);
        let received = tcp_info(src.fd)?
            .bytes_received
            .saturating_sub(src.received_at_join + u64::from(source_ended));
        let info = tcp_info(dst.fd)?;
        let sent = (info.bytes_acked + outq(dst.fd)?).saturating_sub(dst.written_at_join);
        Ok(Progress { received, sent })
    }
}

/// `struct tcp_info` up to `tcpi_bytes_received` (include/uapi/linux/tcp.h).
#[repr(C)]
#[derive(Default)]
struct TcpInfo {
    state: u8,
    ca_state: u8,
    retransmits: u8,
    probes: u8,
    backoff: u8,
    options: u8,
    /// `snd_wscale:4, rcv_wscale:4`
    wscale: u8,
    /// `delivery_rate_app_limited:1, fastopen_client_fail:2`
    flags: u8,
    rto: u32,
    ato: u32,
    snd_mss: u32,
    rcv_mss: u32,
    unacked: u32,
    sacked: u32,
    lost: u32,
    retrans: u32,
    fackets: u32,
    last_data_sent: u32,
    last_ack_sent: u32,
    last_data_recv: u32,
    last_ack_recv: u32,
    pmtu: u32,
    rcv_ssthresh: u32,
    rtt: u32,
    rttvar: u32,
    snd_ssthresh: u32,
    snd_cwnd: u32,
    advmss: u32,
    reordering: u32,
    rcv_rtt: u32,
    rcv_space: u32,
    total_retrans: u32,
    pacing_rate: u64,
    max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
}

const _: () = {
    assert!(offset_of!(TcpInfo, rto) == 8);
    assert!(offset_of!(TcpInfo, last_data_recv) == 52);
    assert!(offset_of!(TcpInfo, total_retrans) == 100);
    assert!(offset_of!(TcpInfo, pacing_rate) == 104);
    assert!(offset_of!(TcpInfo, bytes_acked) == 120);
    assert!(offset_of!(TcpInfo, bytes_received) == 128);
    assert!(size_of::<TcpInfo>() == 136);
};

fn tcp_info(fd: RawFd) -> io::Result<TcpInfo> {
    let mut info = TcpInfo::default();
    let mut len = size_of::<TcpInfo>() as libc::socklen_t;
    // SAFETY: info is valid for len bytes; the kernel writes at most len.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut TcpInfo).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < size_of::<TcpInfo>() {
        return Err(io::Error::other(
            "TCP_INFO too short for tcpi_bytes_received",
        ));
    }
    Ok(info)
}

fn socket_cookie(fd: RawFd) -> io::Result<u64> {
    let mut cookie = 0u64;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie is valid for len bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

fn ioctl_int(fd: RawFd, request: libc::Ioctl) -> io::Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: both requests write one int.
    let rc = unsafe { libc::ioctl(fd, request, &mut n) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as u64)
}

/// SO_RCVLOWAT; for TCP it also runs `sk_data_ready` if bytes wait.
pub fn set_rcvlowat(fd: RawFd, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: bytes is valid for its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&bytes as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes in the receive queue not yet read (`SIOCINQ`); for a socket in a
/// sockmap only those its verdict passed to itself.
pub fn inq(fd: RawFd) -> io::Result<u64> {
    ioctl_int(fd, libc::FIONREAD)
}

/// Bytes written and not yet acknowledged (`SIOCOUTQ`).
fn outq(fd: RawFd) -> io::Result<u64> {
    ioctl_int(fd, libc::TIOCOUTQ)
}

/// Relays between `a` and `b` in the kernel until both directions ended,
/// blocking the calling thread: each end passed on once its bytes were all
/// sent (re-checked every millisecond). The bytes moved a→b and b→a.
/// `joined` is called once the pair is in the kernel.
pub fn relay_blocking(
    relay: &KernelRelay,
    a: RawFd,
    b: RawFd,
    joined_now: impl FnOnce(),
) -> Result<[u64; 2], JoinRefused> {
    let joined = relay.join(a, b)?;
    joined_now();
    let fds = [a, b];
    let mut ended = [false; 2];
    let mut passed_on = [false; 2];
    let mut moved = [0u64; 2];
    let result = (|| loop {
        for from in 0..2 {
            if ended[from] && !passed_on[from] {
                let p = joined.progress(from, true)?;
                if p.drained() {
                    moved[from] = p.sent;
                    shutdown_write(fds[1 - from])?;
                    passed_on[from] = true;
                }
            }
        }
        if passed_on == [true, true] {
            return Ok(moved);
        }
        let mut polled: Vec<libc::pollfd> = (0..2)
            .map(|i| libc::pollfd {
                fd: if ended[i] { -1 } else { fds[i] },
                events: libc::POLLRDHUP,
                revents: 0,
            })
            .collect();
        let waiting = (0..2).any(|i| ended[i] && !passed_on[i]);
        // SAFETY: polled is valid for its length.
        let n = unsafe { libc::poll(polled.as_mut_ptr(), 2, if waiting { 1 } else { -1 }) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for i in 0..2 {
            let r = polled[i].revents;
            if r & libc::POLLERR != 0 {
                let e = socket_error(fds[i]);
                let p = [joined.progress(0, ended[0]), joined.progress(1, ended[1])];
                return Err(io::Error::new(
                    e.kind(),
                    format!("end {i}: {e} (ended {ended:?}, progress {p:?})"),
                ));
            }
            if r & (libc::POLLRDHUP | libc::POLLHUP) != 0 {
                ended[i] = true;
            }
        }
    })();
    relay.part(&joined);
    result.map_err(JoinRefused::Io)
}

fn socket_error(fd: RawFd) -> io::Error {
    let mut err: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: err is valid for len bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return io::Error::last_os_error();
    }
    io::Error::from_raw_os_error(err)
}
