//! Which process owns a connection.
//!
//! Two halves with different costs:
//! - [`SockDiag::lookup`] asks the kernel (NETLINK_SOCK_DIAG, one exact lookup, no dump)
//!   for the client socket's inode, uid and cgroup id. It never blocks and is cheap
//!   enough for the event loop.
//! - [`Attributor::resolve`], [`find_socket_holder`] and [`describe`] read /proc and cgroupfs.
//!   They belong on the audit writer thread, never on the event loop. They only look at
//!   the processes of the agent's cgroup subtree, never at all of /proc.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::exe_hash::ExeHashes;
use crate::netlink::{self, u32_at, u64_at, Attrs, RequestSocket, Wait, NLMSG_ERROR};
use crate::proc_events::{Changes, ProcEvents};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

/// What the kernel says about the socket at one end of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketOwner {
    pub inode: u64,
    pub uid: u32,
    /// The socket's cookie, the key of [`crate::connect_log`].
    pub cookie: u64,
    /// The cgroup v2 id (inode of the cgroup directory) the socket was created in.
    /// `None` on kernels built without socket cgroup data.
    pub cgroup_id: Option<u64>,
}

/// What could be learnt about a process from /proc.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub exe: Option<String>,
    pub cmdline: Option<Vec<String>>,
    /// `/proc/PID/comm`: the name the kernel shows (at most 15 bytes).
    pub comm: Option<String>,
    /// Its cgroup v2 path relative to the cgroup2 mount (`/proc/PID/cgroup`).
    pub cgroup: Option<String>,
    /// Its parent, grandparent, ... up to the agent's cgroup subtree's edge.
    pub ancestry: Vec<Ancestor>,
    /// Lowercase hex SHA-256 of its executable, when the policy pins hashes.
    pub exe_sha256: Option<String>,
}

/// One ancestor of a connecting process, as an audit record's `ancestry` has it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Ancestor {
    pub pid: u32,
    pub exe: Option<String>,
    pub cmdline: Option<Vec<String>>,
    /// Its command line was longer than [`MAX_ANCESTOR_CMDLINE_BYTES`] and is cut.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cmdline_truncated: bool,
}

#[derive(Debug)]
pub enum ProcInfoError {
    Open(io::Error),
    Send(io::Error),
    Receive(io::Error),
    /// The kernel queued no answer to a lookup it should answer synchronously.
    NoReply,
    /// The kernel answered with this errno.
    Kernel(i32),
    Malformed(&'static str),
    MixedFamilies {
        src: SocketAddr,
        dst: SocketAddr,
    },
}

impl fmt::Display for ProcInfoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open(e) => write!(f, "cannot open a NETLINK_SOCK_DIAG socket: {e}"),
            Self::Send(e) => write!(f, "cannot send a sock_diag lookup: {e}"),
            Self::Receive(e) => write!(f, "cannot read the sock_diag reply: {e}"),
            Self::NoReply => write!(f, "the kernel sent no reply to a sock_diag lookup"),
            Self::Kernel(errno) => write!(
                f,
                "the kernel refused the sock_diag lookup: {}",
                io::Error::from_raw_os_error(*errno)
            ),
            Self::Malformed(what) => write!(f, "malformed sock_diag reply: {what}"),
            Self::MixedFamilies { src, dst } => write!(
                f,
                "cannot look up a connection from {src} to {dst}: address families differ"
            ),
        }
    }
}

impl std::error::Error for ProcInfoError {}

// Kernel ABI numbers (linux/netlink.h, linux/sock_diag.h, linux/inet_diag.h).
const NLM_F_REQUEST: u16 = 1;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const INET_DIAG_REQ_V2_LEN: usize = 56;
const INET_DIAG_MSG_LEN: usize = 72;
const INET_DIAG_MSG_COOKIE: usize = 44;
const INET_DIAG_MSG_UID: usize = 64;
const INET_DIAG_MSG_INODE: usize = 68;
const INET_DIAG_CGROUP_ID: u16 = 21;
/// Any socket cookie is accepted only with this value; zero means "must be cookie 0".
const INET_DIAG_NOCOOKIE: [u8; 8] = [0xFF; 8];
/// How many unrelated datagrams a lookup skips before giving up (stale replies).
const MAX_STRAY_REPLIES: usize = 4;

/// A NETLINK_SOCK_DIAG socket for exact TCP socket lookups. Keep one per thread.
pub struct SockDiag {
    // The kernel answers inside send(); never waiting keeps a missing answer
    // from ever stalling the event loop.
    socket: RequestSocket,
    reply: Vec<u8>,
}

impl SockDiag {
    pub fn open() -> Result<Self, ProcInfoError> {
        let socket =
            RequestSocket::open(NETLINK_SOCK_DIAG, Wait::Never).map_err(ProcInfoError::Open)?;
        Ok(Self {
            socket,
            reply: Vec::with_capacity(8192),
        })
    }

    /// Find the TCP socket whose local address is `src` and remote address is `dst`:
    /// for an intercepted connection, `src` is the client's address and `dst` the
    /// original destination. `Ok(None)` when no such socket exists (any more).
    /// IPv4-mapped IPv6 addresses are looked up as IPv4, where the kernel hashes them.
    pub fn lookup(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Result<Option<SocketOwner>, ProcInfoError> {
        self.lookup_protocol(libc::IPPROTO_TCP as u8, src, dst)
    }

    /// As [`SockDiag::lookup`], for the UDP socket that sent a datagram from
    /// `src` to `dst` (connected to `dst`, or bound to `src` and unconnected).
    pub fn lookup_udp(
        &mut self,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Result<Option<SocketOwner>, ProcInfoError> {
        // The kernel's UDP lookup finds the socket that would receive a
        // datagram from the request's source to its destination: the
        // reverse of what TCP's lookup takes.
        self.lookup_protocol(libc::IPPROTO_UDP as u8, dst, src)
    }

    fn lookup_protocol(
        &mut self,
        protocol: u8,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Result<Option<SocketOwner>, ProcInfoError> {
        let seq = self.socket.next_seq();
        let request = encode_request(seq, protocol, src, dst)?;
        self.socket.send(&request).map_err(ProcInfoError::Send)?;
        for _ in 0..MAX_STRAY_REPLIES {
            if let Err(e) = self.socket.recv(&mut self.reply) {
                return Err(if e.kind() == io::ErrorKind::WouldBlock {
                    ProcInfoError::NoReply
                } else {
                    ProcInfoError::Receive(e)
                });
            }
            if let Some(answer) = parse_reply(&self.reply, seq)? {
                return Ok(answer);
            }
        }
        Err(ProcInfoError::NoReply)
    }
}

thread_local! {
    static THREAD_SOCK_DIAG: RefCell<Option<SockDiag>> = const { RefCell::new(None) };
}

/// [`SockDiag::lookup`] on this thread's own netlink socket, opened on first use and
/// reopened after a socket error.
pub fn lookup_socket(
    src: SocketAddr,
    dst: SocketAddr,
) -> Result<Option<SocketOwner>, ProcInfoError> {
    THREAD_SOCK_DIAG.with(|cell| {
        let mut slot = cell.borrow_mut();
        let diag = match slot.as_mut() {
            Some(diag) => diag,
            None => slot.insert(SockDiag::open()?),
        };
        let result = diag.lookup(src, dst);
        if matches!(
            result,
            Err(ProcInfoError::Send(_) | ProcInfoError::Receive(_) | ProcInfoError::NoReply)
        ) {
            *slot = None;
        }
        result
    })
}

fn encode_request(
    seq: u32,
    protocol: u8,
    src: SocketAddr,
    dst: SocketAddr,
) -> Result<Vec<u8>, ProcInfoError> {
    let (family, src_ip, dst_ip) = match (src.ip().to_canonical(), dst.ip().to_canonical()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut s16 = [0u8; 16];
            let mut d16 = [0u8; 16];
            s16[..4].copy_from_slice(&s.octets());
            d16[..4].copy_from_slice(&d.octets());
            (libc::AF_INET as u8, s16, d16)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => (libc::AF_INET6 as u8, s.octets(), d.octets()),
        _ => return Err(ProcInfoError::MixedFamilies { src, dst }),
    };
    let total = netlink::NLMSG_HDRLEN + INET_DIAG_REQ_V2_LEN;
    let mut msg = Vec::with_capacity(total);
    // struct nlmsghdr (host byte order)
    msg.extend_from_slice(&(total as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    msg.extend_from_slice(&seq.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    // struct inet_diag_req_v2: family, protocol, ext (the cgroup id attribute is sent
    // unconditionally: its number, 21, does not fit the 8-bit ext mask), pad, states
    msg.extend_from_slice(&[family, protocol, 0, 0]);
    msg.extend_from_slice(&u32::MAX.to_ne_bytes());
    // struct inet_diag_sockid: ports and addresses in network byte order
    msg.extend_from_slice(&src.port().to_be_bytes());
    msg.extend_from_slice(&dst.port().to_be_bytes());
    msg.extend_from_slice(&src_ip);
    msg.extend_from_slice(&dst_ip);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    msg.extend_from_slice(&INET_DIAG_NOCOOKIE);
    debug_assert_eq!(msg.len(), total);
    Ok(msg)
}

/// `Ok(None)`: the datagram holds no message for `seq`.
/// `Ok(Some(None))`: the kernel knows no such socket.
fn parse_reply(datagram: &[u8], seq: u32) -> Result<Option<Option<SocketOwner>>, ProcInfoError> {
    for message in netlink::messages(datagram) {
        let message =
            message.map_err(|_| ProcInfoError::Malformed("message length out of bounds"))?;
        if message.seq != seq {
            continue;
        }
        return match message.kind {
            NLMSG_ERROR => {
                let code = u32_at(message.body, 0)
                    .ok_or(ProcInfoError::Malformed("short error message"))?
                    as i32;
                match -code {
                    0 | libc::ENOENT => Ok(Some(None)),
                    errno => Err(ProcInfoError::Kernel(errno)),
                }
            }
            SOCK_DIAG_BY_FAMILY => parse_diag_msg(message.body).map(|owner| Some(Some(owner))),
            _ => Err(ProcInfoError::Malformed("unexpected message type")),
        };
    }
    Ok(None)
}

fn parse_diag_msg(body: &[u8]) -> Result<SocketOwner, ProcInfoError> {
    if body.len() < INET_DIAG_MSG_LEN {
        return Err(ProcInfoError::Malformed("inet_diag_msg too short"));
    }
    let uid = u32_at(body, INET_DIAG_MSG_UID).ok_or(ProcInfoError::Malformed("no uid"))?;
    let inode = u32_at(body, INET_DIAG_MSG_INODE).ok_or(ProcInfoError::Malformed("no inode"))?;
    // idiag_cookie[2]: the low half first, each in host byte order.
    let cookie_low =
        u32_at(body, INET_DIAG_MSG_COOKIE).ok_or(ProcInfoError::Malformed("no cookie"))?;
    let cookie_high =
        u32_at(body, INET_DIAG_MSG_COOKIE + 4).ok_or(ProcInfoError::Malformed("no cookie"))?;
    let mut cgroup_id = None;
    let mut attrs = Attrs::new(&body[INET_DIAG_MSG_LEN..]);
    for (kind, payload) in attrs.by_ref() {
        if kind == INET_DIAG_CGROUP_ID {
            cgroup_id =
                Some(u64_at(payload, 0).ok_or(ProcInfoError::Malformed("short cgroup id"))?);
        }
    }
    if attrs.malformed() {
        return Err(ProcInfoError::Malformed("attribute length out of bounds"));
    }
    Ok(SocketOwner {
        inode: u64::from(inode),
        uid,
        cookie: u64::from(cookie_low) | (u64::from(cookie_high) << 32),
        cgroup_id,
    })
}

/// How far attribution may look. Every /proc and cgroupfs walk is bounded by these.
#[derive(Debug)]
pub struct Attributor {
    /// cgroup directories visited under the agent's cgroup.
    pub max_cgroups: usize,
    /// processes whose fd tables are searched.
    pub max_candidates: usize,
    /// The executables hashed so far.
    pub exe_hashes: ExeHashes,
    /// Where command lines are read: one buffer, not 16 KiB zeroed per connection.
    cmdline_buffer: Vec<u8>,
    /// The cgroup2 mount, where an unrecorded connector's agent cgroup is searched.
    cgroup_root: Option<PathBuf>,
    /// The comm and ancestry of the processes read last, and their latest
    /// description, by pid.
    lineages: HashMap<u32, Lineage>,
    /// Where each socket searched for was found: its holder and that fd.
    holders: HashMap<u64, SocketHolder>,
    /// The kernel's process events, when subscribed: a lineage whose
    /// process has not changed since is its whole description.
    events: Option<ProcEvents>,
}

/// A process holding a socket, and the fd it holds it by: looked at first
/// for the socket's next connection or query (one readlink, where a search
/// reads the agent's cgroups and every fd of its processes; a client that
/// sends its queries unconnected, as dnsperf or a stub resolver may, is
/// searched for on each).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketHolder {
    pub pid: u32,
    pub fd: u32,
}

/// Sockets whose holders are kept at most; past this they are dropped all at once.
const HOLDERS_MAX: usize = 4096;

/// A process's comm and ancestry as read at `read_at`: a process opening
/// connections in a burst (wrk, a package manager, a crawler) has them read
/// once per [`LINEAGE_REUSE`], not for each connection (6 system calls and
/// more per ancestor). Its exe and command line are read every time, but
/// while the process events are subscribed: then a lineage is dropped as
/// soon as its process forks into existence, execs, exits or is renamed,
/// and until then its latest description stands whole (no /proc read at
/// all; a rewrite of its own argv, which has no event, shows once the
/// lineage is old).
#[derive(Clone, Debug)]
struct Lineage {
    read_at: Instant,
    /// What the reuse is checked against: an exec of another program reads anew.
    exe: Option<String>,
    scope: String,
    comm: Option<String>,
    ancestry: Vec<Ancestor>,
    /// The process's latest description, handed out again while what is read
    /// stays equal: a process holding thousands of connections is kept once
    /// in the audit writer's early attributions, not once per connection.
    described: Option<Arc<ProcessInfo>>,
    /// What the rules asked of that description.
    described_needs: ProcessNeeds,
}

/// How long a lineage read stands for its pid (same executable, same scope).
/// Short enough that no pid is reused meanwhile (wrapping even a 32,768-pid
/// space takes hundreds of thousands of forks a second); an ancestor's exec or
/// exit meanwhile shows from the next read on.
const LINEAGE_REUSE: Duration = Duration::from_millis(100);
/// Lineages kept at most; past this they are dropped all at once.
const LINEAGES_MAX: usize = 256;

impl Default for Attributor {
    fn default() -> Self {
        Self {
            max_cgroups: 1024,
            max_candidates: 4096,
            exe_hashes: ExeHashes::default(),
            cmdline_buffer: Vec::new(),
            cgroup_root: crate::cgroup::cgroup2_root().ok(),
            lineages: HashMap::new(),
            holders: HashMap::new(),
            events: ProcEvents::subscribe()
                .map_err(|e| {
                    log::info!(
                        "process events unavailable ({e}): each attribution reads /proc anew"
                    )
                })
                .ok(),
        }
    }
}

/// What a rule may ask of a process beyond what every record carries (pid,
/// exe, cmdline, comm, ancestry). Each costs reads for every connection, so
/// they are read only while some rule asks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessNeeds {
    /// The executable's SHA-256 (a rule pins hashes).
    pub exe_sha256: bool,
    /// Its cgroup (a rule names cgroups below the agent's).
    pub cgroup: bool,
}

impl ProcessNeeds {
    /// What either asks.
    pub fn or(self, other: ProcessNeeds) -> ProcessNeeds {
        ProcessNeeds {
            exe_sha256: self.exe_sha256 || other.exe_sha256,
            cgroup: self.cgroup || other.cgroup,
        }
    }
}

/// What the event loop knows cheaply about a connection's client, handed to the
/// writer thread so that it can find the owning process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnerQuery {
    pub owner: SocketOwner,
    /// The agent's cgroup directory (the configured one, which the socket's own
    /// cgroup may be below) relative to the cgroup2 mount: its processes are
    /// searched, and ancestors outside it are not listed.
    pub scope: String,
    /// The pid that connected the socket, when the kernel recorded it
    /// ([`crate::connect_log`]): no search needed.
    pub connector: Option<u32>,
    /// What rules ask beyond what every record carries.
    pub needs: ProcessNeeds,
}

impl Attributor {
    /// The process that connected the queried socket when the kernel recorded it;
    /// else the process holding it, searched among the processes of the agent's
    /// cgroup subtree (the socket's own cgroup first). With its exe, cmdline,
    /// comm and ancestry, and what `query.needs` asks; the same description as
    /// the last one of this process when nothing read differs.
    pub fn resolve(&mut self, query: &OwnerQuery) -> Option<Arc<ProcessInfo>> {
        let pid = match query.connector {
            Some(pid) => pid,
            None => self.holder_of(query)?,
        };
        self.forget_changed();
        if let Some(unchanged) = self.unchanged(pid, query) {
            return Some(unchanged);
        }
        let exe = exe_of(pid);
        let (cmdline, _) = read_cmdline(pid, MAX_CMDLINE_BYTES, &mut self.cmdline_buffer);
        let (comm, ancestry) = self.lineage(pid, &exe, &query.scope);
        let info = ProcessInfo {
            pid,
            exe,
            cmdline,
            comm,
            cgroup: query.needs.cgroup.then(|| cgroup_of(pid)).flatten(),
            ancestry,
            exe_sha256: query
                .needs
                .exe_sha256
                .then(|| self.exe_hashes.of_process(pid))
                .flatten(),
        };
        // lineage() has just kept this pid's entry.
        let Some(lineage) = self.lineages.get_mut(&pid) else {
            return Some(Arc::new(info));
        };
        lineage.described_needs = query.needs;
        match &lineage.described {
            Some(known) if **known == info => Some(Arc::clone(known)),
            _ => Some(lineage.described.insert(Arc::new(info)).clone()),
        }
    }

    /// Drops the lineages of the processes that changed since the last
    /// look; all of them when events were lost. Before any description is
    /// handed out: a process that asks after an exec has the exec queued.
    fn forget_changed(&mut self) {
        let Some(events) = self.events.as_mut() else {
            return;
        };
        let lineages = &mut self.lineages;
        let forget = |tgid| {
            lineages.remove(&tgid);
        };
        if events.drain(forget) == Changes::Unknown {
            lineages.clear();
        }
    }

    /// The latest description of `pid`, when the process events are
    /// subscribed, have not dropped its lineage, and it was read recently for
    /// the same scope and needs. Not when a rule asks for its cgroup: a move
    /// between cgroups has no event.
    fn unchanged(&self, pid: u32, query: &OwnerQuery) -> Option<Arc<ProcessInfo>> {
        self.events.as_ref()?;
        let known = self.lineages.get(&pid)?;
        let recent = known.read_at.elapsed() < LINEAGE_REUSE;
        let same = known.scope == query.scope && known.described_needs == query.needs;
        if !recent || !same || query.needs.cgroup {
            return None;
        }
        known.described.clone()
    }

    /// The process holding the queried socket: where it was found last if it
    /// still holds it there, else searched among the agent's processes.
    fn holder_of(&mut self, query: &OwnerQuery) -> Option<u32> {
        let inode = query.owner.inode;
        if let Some(&holder) = self.holders.get(&inode) {
            if holds(holder, inode) {
                return Some(holder.pid);
            }
            self.holders.remove(&inode);
        }
        let dir = self.cgroup_root.as_ref()?.join(&query.scope);
        let candidates = self.candidate_pids(&dir, query.owner.cgroup_id);
        let holder = find_socket_holder(inode, &candidates)?;
        if self.holders.len() >= HOLDERS_MAX {
            self.holders.clear();
        }
        self.holders.insert(inode, holder);
        Some(holder.pid)
    }

    /// The comm and ancestry of `pid`, running `exe`, as read within
    /// [`LINEAGE_REUSE`] or now.
    fn lineage(
        &mut self,
        pid: u32,
        exe: &Option<String>,
        scope: &str,
    ) -> (Option<String>, Vec<Ancestor>) {
        let now = Instant::now();
        if let Some(known) = self.lineages.get(&pid).filter(|known| {
            now.saturating_duration_since(known.read_at) < LINEAGE_REUSE
                && known.exe == *exe
                && known.scope == scope
        }) {
            return (known.comm.clone(), known.ancestry.clone());
        }
        let stat = stat_of(pid);
        let described = self.lineages.remove(&pid).and_then(|l| l.described);
        let lineage = Lineage {
            read_at: now,
            exe: exe.clone(),
            scope: scope.to_string(),
            ancestry: match &stat {
                Some(stat) => self.ancestry_from(stat.ppid, scope),
                None => Vec::new(),
            },
            comm: stat.map(|s| s.comm),
            described,
            described_needs: ProcessNeeds::default(),
        };
        if self.lineages.len() >= LINEAGES_MAX {
            self.lineages.clear();
        }
        let read = (lineage.comm.clone(), lineage.ancestry.clone());
        self.lineages.insert(pid, lineage);
        read
    }

    /// `parent` and its ancestors, nearest first, while they are in the cgroup
    /// subtree `scope` (relative to the mount) and not pid 1, at most
    /// [`MAX_ANCESTORS`]. Read as the process itself is: a parent that exits
    /// meanwhile ends the chain there.
    fn ancestry_from(&mut self, parent: u32, scope: &str) -> Vec<Ancestor> {
        let mut chain = Vec::new();
        let mut next = Some(parent);
        while let Some(parent) = next.filter(|&p| p > 1 && chain.len() < MAX_ANCESTORS) {
            let inside = cgroup_of(parent).is_some_and(|path| Path::new(&path).starts_with(scope));
            if !inside {
                break;
            }
            let (cmdline, cmdline_truncated) =
                read_cmdline(parent, MAX_ANCESTOR_CMDLINE_BYTES, &mut self.cmdline_buffer);
            chain.push(Ancestor {
                pid: parent,
                exe: exe_of(parent),
                cmdline,
                cmdline_truncated,
            });
            next = stat_of(parent).map(|s| s.ppid);
        }
        chain
    }

    /// The pids of every cgroup at or below `dir` (breadth first, bounded); those of
    /// the cgroup whose id is `preferred_cgroup_id` come first.
    pub fn candidate_pids(&self, dir: &Path, preferred_cgroup_id: Option<u64>) -> Vec<u32> {
        let mut preferred = Vec::new();
        let mut others = Vec::new();
        let mut queue = VecDeque::from([dir.to_path_buf()]);
        let mut visited = 0;
        while let Some(cgroup) = queue.pop_front() {
            if visited == self.max_cgroups {
                break;
            }
            visited += 1;
            let is_preferred = preferred_cgroup_id.is_some()
                && fs::metadata(&cgroup).ok().map(|m| m.ino()) == preferred_cgroup_id;
            let pids = read_cgroup_procs(&cgroup);
            if is_preferred {
                preferred.extend(pids);
            } else {
                others.extend(pids);
            }
            if let Ok(entries) = fs::read_dir(&cgroup) {
                queue.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path())
                        .take(self.max_cgroups.saturating_sub(visited + queue.len())),
                );
            }
        }
        preferred.extend(others);
        preferred.truncate(self.max_candidates);
        preferred
    }
}

fn read_cgroup_procs(cgroup: &Path) -> Vec<u32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .map(|text| text.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Upper bound on fd entries read per process (a process cannot exceed RLIMIT_NOFILE,
/// but that limit may be huge).
const MAX_FDS_PER_PROCESS: usize = 1 << 16;

/// The first of `candidate_pids` holding a file descriptor to socket `inode`, and that fd.
pub fn find_socket_holder(inode: u64, candidate_pids: &[u32]) -> Option<SocketHolder> {
    let target = socket_link(inode);
    candidate_pids.iter().copied().find_map(|pid| {
        // Gone, or not ours to read: not this one.
        let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        fds.flatten()
            .take(MAX_FDS_PER_PROCESS)
            .find(|fd| {
                fs::read_link(fd.path())
                    .is_ok_and(|l| l.as_os_str().as_bytes() == target.as_bytes())
            })
            .and_then(|fd| fd.file_name().to_str()?.parse().ok())
            .map(|fd| SocketHolder { pid, fd })
    })
}

/// Whether `holder` still holds socket `inode` by the same fd.
pub fn holds(holder: SocketHolder, inode: u64) -> bool {
    let SocketHolder { pid, fd } = holder;
    fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .is_ok_and(|l| l.as_os_str().as_bytes() == socket_link(inode).as_bytes())
}

/// What /proc/PID/fd/N links to for socket `inode`.
fn socket_link(inode: u64) -> String {
    format!("socket:[{inode}]")
}

/// Upper bound on the bytes of /proc/PID/cmdline read; longer command lines are cut.
const MAX_CMDLINE_BYTES: usize = 16 * 1024;
/// Ancestors listed at most: a deeper chain keeps the nearest ones.
pub const MAX_ANCESTORS: usize = 16;
/// Bytes of each ancestor's command line kept (16 ancestors: 16 KiB at most).
pub const MAX_ANCESTOR_CMDLINE_BYTES: usize = 1024;

/// The namespaces whose ids the kernel reports to BPF programs and in its
/// process events: the initial ones (`PROC_PID_INIT_INO`, `PROC_USER_INIT_INO`).
#[derive(Clone, Copy, Debug)]
pub enum InitialNamespace {
    Pid,
    User,
}

/// Whether this process is in `ns`; an error when /proc cannot tell.
pub fn in_initial_namespace(ns: InitialNamespace) -> io::Result<bool> {
    let (kind, inode) = match ns {
        InitialNamespace::Pid => ("pid", 0xEFFF_FFFC),
        InitialNamespace::User => ("user", 0xEFFF_FFFD),
    };
    let path = format!("/proc/self/ns/{kind}");
    let meta = fs::metadata(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot read {path}: {e}")))?;
    Ok(meta.ino() == inode)
}

/// The executable a process runs, when it still exists and is readable.
pub fn exe_of(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The first `max` bytes of the command line, and whether there were more.
/// Non-UTF-8 bytes are replaced (U+FFFD).
fn read_cmdline(pid: u32, max: usize, buffer: &mut Vec<u8>) -> (Option<Vec<String>>, bool) {
    // One byte more than kept tells a cut line from one of exactly `max`.
    if buffer.len() < max + 1 {
        buffer.resize(max + 1, 0);
    }
    // One read: the kernel copies the whole argument area up to the count asked
    // (proc_pid_cmdline_read loops page by page), so a short read is the end.
    let Some(n) = fs::File::open(format!("/proc/{pid}/cmdline"))
        .and_then(|mut f| f.read(&mut buffer[..=max]))
        .ok()
        .filter(|&n| n > 0)
    else {
        return (None, false);
    };
    let raw = &buffer[..n.min(max)];
    let args = raw
        .strip_suffix(&[0])
        .unwrap_or(raw)
        .split(|&b| b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    (Some(args), n > max)
}

/// A small /proc text file of one record (comm, stat, cgroup: single_open
/// seq_files) in one read where it fits a page: the kernel hands the whole
/// text to one read that has room, so a short read is the end (not so for
/// files of many records, such as maps). `fs::read_to_string` asks statx for a size /proc
/// does not know and reads again to see the end: two more system calls a
/// file, for every connection's record.
fn read_proc_text(path: &str) -> Option<String> {
    let mut file = fs::File::open(path).ok()?;
    let mut text = vec![0u8; 4096];
    let n = file.read(&mut text).ok()?;
    text.truncate(n);
    if n == 4096 {
        file.read_to_end(&mut text).ok()?;
    }
    String::from_utf8(text).ok()
}

/// The cgroup v2 path of a process relative to the mount (the `0::` line;
/// this daemon lives in the initial cgroup namespace, where paths are whole).
pub fn cgroup_of(pid: u32) -> Option<String> {
    let text = read_proc_text(&format!("/proc/{pid}/cgroup"))?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| path.trim_start_matches('/').to_string())
}

/// What `/proc/PID/stat` says of a process: its command name (the second
/// field, in parentheses, which may hold spaces and parentheses itself: the
/// same text as /proc/PID/comm, so one file read gives both) and its parent.
struct Stat {
    comm: String,
    ppid: u32,
}

fn stat_of(pid: u32) -> Option<Stat> {
    let stat = read_proc_text(&format!("/proc/{pid}/stat"))?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let ppid = stat[close + 1..].split_whitespace().nth(1)?.parse().ok()?;
    Some(Stat { comm, ppid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_matches_inet_diag_req_v2() {
        let src: SocketAddr = "192.0.2.1:40000".parse().unwrap();
        let dst: SocketAddr = "[::ffff:198.51.100.7]:443".parse().unwrap();
        let msg = encode_request(7, libc::IPPROTO_TCP as u8, src, dst).unwrap();
        assert_eq!(msg.len(), 72);
        assert_eq!(u32_at(&msg, 0), Some(72));
        assert_eq!(netlink::u16_at(&msg, 4), Some(SOCK_DIAG_BY_FAMILY));
        assert_eq!(u32_at(&msg, 8), Some(7));
        let req = &msg[netlink::NLMSG_HDRLEN..];
        assert_eq!(
            req[0],
            libc::AF_INET as u8,
            "v4-mapped destination is looked up as v4"
        );
        assert_eq!(req[1], libc::IPPROTO_TCP as u8);
        assert_eq!(&req[8..10], &40000u16.to_be_bytes());
        assert_eq!(&req[10..12], &443u16.to_be_bytes());
        assert_eq!(&req[12..16], &[192, 0, 2, 1]);
        assert_eq!(&req[28..32], &[198, 51, 100, 7]);
        assert_eq!(&req[48..56], &[0xFF; 8]);
    }

    #[test]
    fn mixed_families_are_refused() {
        let src: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::1]:2".parse().unwrap();
        assert!(matches!(
            encode_request(1, libc::IPPROTO_TCP as u8, src, dst),
            Err(ProcInfoError::MixedFamilies { .. })
        ));
    }

    fn nlmsg(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        netlink::frame(kind, 0, seq, body)
    }

    #[test]
    fn reply_parsing() {
        let mut body = vec![0u8; INET_DIAG_MSG_LEN];
        body[INET_DIAG_MSG_UID..INET_DIAG_MSG_UID + 4].copy_from_slice(&1000u32.to_ne_bytes());
        body[INET_DIAG_MSG_INODE..INET_DIAG_MSG_INODE + 4].copy_from_slice(&4242u32.to_ne_bytes());
        body[INET_DIAG_MSG_COOKIE..INET_DIAG_MSG_COOKIE + 4].copy_from_slice(&5u32.to_ne_bytes());
        body[INET_DIAG_MSG_COOKIE + 4..INET_DIAG_MSG_COOKIE + 8]
            .copy_from_slice(&1u32.to_ne_bytes());
        // a pad attribute, then the cgroup id
        body.extend_from_slice(&4u16.to_ne_bytes());
        body.extend_from_slice(&22u16.to_ne_bytes());
        body.extend_from_slice(&12u16.to_ne_bytes());
        body.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        body.extend_from_slice(&77u64.to_ne_bytes());
        let owner = SocketOwner {
            inode: 4242,
            uid: 1000,
            cookie: (1 << 32) | 5,
            cgroup_id: Some(77),
        };
        assert_eq!(
            parse_reply(&nlmsg(SOCK_DIAG_BY_FAMILY, 3, &body), 3).unwrap(),
            Some(Some(owner))
        );
        assert_eq!(
            parse_reply(&nlmsg(SOCK_DIAG_BY_FAMILY, 2, &body), 3).unwrap(),
            None
        );
        let enoent = (-libc::ENOENT).to_ne_bytes();
        assert_eq!(
            parse_reply(&nlmsg(NLMSG_ERROR, 3, &enoent), 3).unwrap(),
            Some(None)
        );
        let eperm = (-libc::EPERM).to_ne_bytes();
        assert!(matches!(
            parse_reply(&nlmsg(NLMSG_ERROR, 3, &eperm), 3),
            Err(ProcInfoError::Kernel(libc::EPERM))
        ));
        assert!(parse_reply(&nlmsg(SOCK_DIAG_BY_FAMILY, 3, &body[..10]), 3).is_err());
        let mut truncated = nlmsg(SOCK_DIAG_BY_FAMILY, 3, &body);
        truncated.truncate(40);
        assert!(parse_reply(&truncated, 3).is_err());
    }

    /// What the writer asks for a connection whose connector the kernel recorded.
    fn query_for(pid: u32, scope: &str, needs: ProcessNeeds) -> OwnerQuery {
        OwnerQuery {
            owner: SocketOwner {
                inode: 0,
                uid: 0,
                cookie: 0,
                cgroup_id: None,
            },
            scope: scope.to_string(),
            connector: Some(pid),
            needs,
        }
    }

    #[test]
    fn resolve_self_reads_what_the_rules_need_only() {
        let me = std::process::id();
        let mut attributor = Attributor::default();
        let plain = attributor
            .resolve(&query_for(me, "no-such-scope", ProcessNeeds::default()))
            .expect("this process");
        let own_exe = std::env::current_exe().unwrap();
        assert_eq!(plain.pid, me);
        assert_eq!(plain.exe.as_deref(), own_exe.to_str());
        let args: Vec<String> = std::env::args().collect();
        assert_eq!(plain.cmdline, Some(args));
        let comm = fs::read_to_string(format!("/proc/{me}/comm")).unwrap();
        assert_eq!(plain.comm.as_deref(), Some(comm.trim_end_matches('\n')));
        assert_eq!(plain.cgroup, None, "no rule asked for the cgroup");
        assert_eq!(plain.exe_sha256, None, "no rule pins a hash");
        let again = attributor
            .resolve(&query_for(me, "no-such-scope", ProcessNeeds::default()))
            .expect("this process");
        assert!(
            Arc::ptr_eq(&plain, &again),
            "an unchanged process is one description, shared"
        );
        let needs = ProcessNeeds {
            exe_sha256: true,
            cgroup: true,
        };
        let asked = attributor
            .resolve(&query_for(me, "no-such-scope", needs))
            .expect("this process");
        assert_eq!(asked.cgroup, cgroup_of(me));
        assert!(asked.cgroup.is_some());
        assert_eq!(asked.exe_sha256.as_ref().map(String::len), Some(64));
        assert_eq!(
            attributor
                .resolve(&query_for(u32::MAX, "", needs))
                .as_deref(),
            Some(&ProcessInfo {
                pid: u32::MAX,
                ..ProcessInfo::default()
            }),
            "a process gone leaves only its pid"
        );
    }

    #[test]
    fn a_lineage_is_read_again_after_its_time_or_an_exec() {
        let me = std::process::id();
        let scope = cgroup_of(me).expect("own cgroup");
        let query = query_for(me, &scope, ProcessNeeds::default());
        // Without the process events, which would hand out the whole
        // description (tests/audit.rs has that).
        let mut attributor = Attributor {
            events: None,
            ..Attributor::default()
        };
        let fresh = attributor
            .resolve(&query)
            .expect("this process")
            .comm
            .clone();
        assert!(fresh.is_some());
        let poke = |attributor: &mut Attributor, change: &dyn Fn(&mut Lineage)| {
            let lineage = attributor.lineages.get_mut(&me).expect("kept");
            lineage.comm = Some("stale".into());
            change(lineage);
        };
        let comm = |attributor: &mut Attributor| attributor.resolve(&query).unwrap().comm.clone();
        poke(&mut attributor, &|_| {});
        assert_eq!(comm(&mut attributor).as_deref(), Some("stale"), "reused");
        poke(&mut attributor, &|l| l.read_at -= LINEAGE_REUSE);
        assert_eq!(comm(&mut attributor), fresh, "read again once old");
        poke(&mut attributor, &|l| l.exe = Some("/usr/bin/other".into()));
        assert_eq!(comm(&mut attributor), fresh, "read again after an exec");
        poke(&mut attributor, &|l| l.scope = "elsewhere".into());
        assert_eq!(comm(&mut attributor), fresh, "read again for another agent");
    }

    #[test]
    fn stat_names_the_command_even_with_parentheses_and_spaces() {
        let me = std::process::id();
        let stat = stat_of(me).expect("own stat");
        assert_eq!(stat.ppid, std::os::unix::process::parent_id());
        // A thread of ours takes the odd name (as prctl PR_SET_NAME would);
        // /proc/TID/stat is read as a process's is.
        let renamed = std::thread::spawn(|| {
            fs::write("/proc/thread-self/comm", "a (b) c").expect("rename this thread");
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() } as u32;
            stat_of(tid).map(|s| s.comm)
        })
        .join()
        .expect("the thread");
        assert_eq!(renamed.as_deref(), Some("a (b) c"));
        assert!(stat_of(u32::MAX).is_none());
    }

    #[test]
    fn proc_text_reads_whole_files_small_and_past_a_page() {
        let me = std::process::id();
        for file in ["comm", "cgroup"] {
            let path = format!("/proc/{me}/{file}");
            assert_eq!(
                read_proc_text(&path),
                fs::read_to_string(&path).ok(),
                "{file}"
            );
        }
        assert_eq!(read_proc_text("/proc/4294967295/stat"), None);
        // Past the first read's page, the rest is read too.
        let long = std::env::temp_dir().join(format!("agent-egress-proc-text-{me}"));
        let text = "0123456789abcdef\n".repeat(1000);
        fs::write(&long, &text).unwrap();
        let read = read_proc_text(long.to_str().unwrap());
        fs::remove_file(&long).unwrap();
        assert_eq!(read.as_deref(), Some(text.as_str()));
    }

    /// `sh -c '…sleep…' <2 KB argument>`: the sleep's ancestry starts with the
    /// shell (its command line cut and marked so), then this test process.
    #[test]
    fn ancestry_lists_parents_inside_the_scope_nearest_first() {
        let scope = cgroup_of(std::process::id()).expect("own cgroup");
        let long = "x".repeat(2 * MAX_ANCESTOR_CMDLINE_BYTES);
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sleep 5; true", "sh", &long])
            .spawn()
            .expect("sh");
        let children = format!("/proc/{0}/task/{0}/children", shell.id());
        let started = std::time::Instant::now();
        let sleeper = loop {
            let text = fs::read_to_string(&children).unwrap_or_default();
            if let Some(pid) = text.split_whitespace().next() {
                break pid.parse::<u32>().expect("pid");
            }
            assert!(started.elapsed().as_secs() < 5, "sh started no child");
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        let mut attributor = Attributor::default();
        let info = attributor.resolve(&query_for(sleeper, &scope, ProcessNeeds::default()));
        let outside = attributor.resolve(&query_for(
            sleeper,
            "no-such-scope",
            ProcessNeeds::default(),
        ));
        let _ = shell.kill();
        let _ = shell.wait();
        let chain = info.expect("the sleeper").ancestry.clone();
        assert!(
            chain.len() >= 2 && chain.len() <= MAX_ANCESTORS,
            "{chain:?}"
        );
        assert_eq!(chain[0].pid, shell.id());
        assert!(chain[0].exe.as_deref().is_some_and(|e| e.ends_with("sh")));
        assert!(chain[0].cmdline_truncated);
        let kept: usize = chain[0].cmdline.iter().flatten().map(|a| a.len() + 1).sum();
        assert!(kept <= MAX_ANCESTOR_CMDLINE_BYTES + 1, "{kept} bytes kept");
        assert_eq!(chain[1].pid, std::process::id());
        assert!(!chain[1].cmdline_truncated);
        assert!(
            outside.expect("the sleeper").ancestry.is_empty(),
            "a parent outside the scope ends the chain"
        );
    }
}
