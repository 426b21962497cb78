//! Who called connect() or sent a datagram: a cgroup BPF program on the
//! agents' cgroups writes the calling process's pid into a map, under the
//! socket's cookie, at the moment the agent connects, and at every datagram
//! it sends unconnected (sendto with an address: a stub resolver, dig,
//! dnsperf). The proxy and the DNS handler learn the client socket's cookie
//! from their sock_diag lookup and take the pid out of the map: attribution
//! in two syscalls, exact even when the process has exited since, instead of
//! a search through the fd tables of the agent's processes.
//!
//! It names the process that made the connection, or sent the socket's latest
//! datagram. A socket handed to another process later (fork, SCM_RIGHTS) is
//! still attributed to the one that connected. Connections the map does not
//! know (made before the program was attached, or evicted from the LRU map)
//! fall back to the /proc search.
//!
//! Pids are those of the initial pid namespace (bpf_get_current_pid_tgid), so
//! the log is only used by a daemon that sees that namespace.

use crate::bpf::{op, BpfError, Insn, Map, Program, ProgramKind, BPF_MAP_TYPE_LRU_HASH};
use crate::procinfo::{in_initial_namespace, InitialNamespace};
use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_CONNECT: u32 = 10;
const BPF_CGROUP_INET6_CONNECT: u32 = 11;
const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
const BPF_CGROUP_UDP6_SENDMSG: u32 = 15;

const WHAT: &str = "the connect log";

const fn kind(name: &'static std::ffi::CStr, attach_type: u32) -> ProgramKind {
    ProgramKind {
        what: WHAT,
        name,
        prog_type: BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        attach_type,
    }
}

/// The same program at each hook: connects (TCP, connected UDP) and
/// unconnected UDP sends, IPv4 and IPv6.
static KINDS: [ProgramKind; 4] = [
    kind(c"ae_connect4_pid", BPF_CGROUP_INET4_CONNECT),
    kind(c"ae_connect6_pid", BPF_CGROUP_INET6_CONNECT),
    kind(c"ae_sendmsg4_pid", BPF_CGROUP_UDP4_SENDMSG),
    kind(c"ae_sendmsg6_pid", BPF_CGROUP_UDP6_SENDMSG),
];

/// Entries live from connect() until the proxy accepts the connection
/// (microseconds to milliseconds). Connections that never reach the proxy
/// (bypassed destinations) and UDP sockets leave theirs behind for the LRU
/// to evict. Kernel memory: about 100 bytes per entry, allocated up front.
const MAP_ENTRIES: u32 = 16_384;

// Helper numbers (`enum bpf_func_id`).
const MAP_UPDATE_ELEM: i32 = 2;
const GET_CURRENT_PID_TGID: i32 = 14;
const GET_SOCKET_COOKIE: i32 = 46;

/// ```text
/// r6 = r1                          // struct bpf_sock_addr *
/// r0 = bpf_get_current_pid_tgid()  // tgid << 32 | tid
/// *(u64 *)(r10 - 8) = r0           // value
/// r1 = r6
/// r0 = bpf_get_socket_cookie(r1)
/// *(u64 *)(r10 - 16) = r0          // key
/// r1 = map
/// r2 = r10 - 16
/// r3 = r10 - 8
/// r4 = 0                           // BPF_ANY
/// bpf_map_update_elem(r1, r2, r3, r4)
/// r0 = 1                           // let the connect (or send) proceed
/// exit
/// ```
fn program(map: &Map) -> Vec<Insn> {
    let mut insns = vec![
        Insn::new(op::MOV64_REG, 6, 1, 0, 0),
        Insn::new(op::CALL, 0, 0, 0, GET_CURRENT_PID_TGID),
        Insn::new(op::STX_MEM_DW, 10, 0, -8, 0),
        Insn::new(op::MOV64_REG, 1, 6, 0, 0),
        Insn::new(op::CALL, 0, 0, 0, GET_SOCKET_COOKIE),
        Insn::new(op::STX_MEM_DW, 10, 0, -16, 0),
    ];
    insns.extend(Insn::load_map_fd(1, map));
    insns.extend([
        Insn::new(op::MOV64_REG, 2, 10, 0, 0),
        Insn::new(op::ADD64_IMM, 2, 0, 0, -16),
        Insn::new(op::MOV64_REG, 3, 10, 0, 0),
        Insn::new(op::ADD64_IMM, 3, 0, 0, -8),
        Insn::new(op::MOV64_IMM, 4, 0, 0, 0),
        Insn::new(op::CALL, 0, 0, 0, MAP_UPDATE_ELEM),
        Insn::new(op::MOV64_IMM, 0, 0, 0, 1),
        Insn::new(op::EXIT, 0, 0, 0, 0),
    ]);
    insns
}

/// The map and the programs (one per hook in [`KINDS`]) that fill it, and
/// their links to the cgroups they watch: closed with this process, so a
/// daemon leaves no copy behind.
pub struct ConnectLog {
    map: Map,
    programs: Vec<Program>,
    links: Mutex<HashMap<PathBuf, Linked>>,
}

/// Every program linked to one cgroup, known by its id: a cgroup made anew
/// at the same path (an agent restarted) needs new links.
struct Linked {
    cgroup_id: u64,
    _links: Vec<OwnedFd>,
}

impl ConnectLog {
    pub fn load() -> Result<ConnectLog, BpfError> {
        let initial =
            in_initial_namespace(InitialNamespace::Pid).map_err(|e| BpfError::Prepare {
                what: WHAT,
                reason: e.to_string(),
            })?;
        if !initial {
            return Err(BpfError::Prepare {
                what: WHAT,
                reason: "this process is not in the initial pid namespace, \
                         whose pids the kernel would record"
                    .into(),
            });
        }
        let map = Map::create(WHAT, c"ae_connect_pids", BPF_MAP_TYPE_LRU_HASH, MAP_ENTRIES)?;
        let insns = program(&map);
        let programs = KINDS
            .iter()
            .map(|kind| Program::load(kind, &insns))
            .collect::<Result<_, _>>()?;
        Ok(ConnectLog {
            map,
            programs,
            links: Mutex::new(HashMap::new()),
        })
    }

    /// Links every program to `cgroup_dir` (idempotent).
    pub fn attach(&self, cgroup_dir: &Path) -> Result<(), BpfError> {
        let cgroup_id = std::fs::metadata(cgroup_dir)
            .map_err(|source| BpfError::Cgroup {
                what: WHAT,
                action: "inspecting",
                path: cgroup_dir.to_path_buf(),
                source,
            })?
            .ino();
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        if links
            .get(cgroup_dir)
            .is_some_and(|l| l.cgroup_id == cgroup_id)
        {
            return Ok(());
        }
        let linked = Linked {
            cgroup_id,
            _links: self
                .programs
                .iter()
                .map(|program| program.link(cgroup_dir))
                .collect::<Result<_, _>>()?,
        };
        links.insert(cgroup_dir.to_path_buf(), linked);
        Ok(())
    }

    /// Unlinks the programs from `cgroup_dir`; whether they were linked.
    pub fn detach(&self, cgroup_dir: &Path) -> bool {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links.remove(cgroup_dir).is_some()
    }

    /// The pid of the process that connected the socket with this cookie,
    /// once: the entry is removed (a TCP socket connects once).
    pub fn take(&self, socket_cookie: u64) -> io::Result<Option<u32>> {
        Ok(self.map.take(socket_cookie)?.map(pid_of))
    }

    /// The pid that connected the UDP socket with this cookie or sent its
    /// latest datagram, the entry kept: a socket sends many queries (the LRU
    /// map forgets it in time).
    pub fn peek(&self, socket_cookie: u64) -> io::Result<Option<u32>> {
        Ok(self.map.get(socket_cookie)?.map(pid_of))
    }
}

/// bpf_get_current_pid_tgid() holds the process (tgid) in its upper half.
fn pid_of(pid_tgid: u64) -> u32 {
    (pid_tgid >> 32) as u32
}

/// Detaches every copy of the programs that was attached without a link
/// (by a daemon before links) from `cgroup_dir`; how many. Needs CAP_SYS_ADMIN.
pub fn detach_unlinked(cgroup_dir: &Path) -> Result<usize, BpfError> {
    KINDS.iter().map(|kind| kind.detach_all(cgroup_dir)).sum()
}

/// How many copies of the programs are attached to `cgroup_dir` itself.
pub fn attached_count(cgroup_dir: &Path) -> Result<usize, BpfError> {
    KINDS
        .iter()
        .map(|kind| kind.attached_count(cgroup_dir))
        .sum()
}

/// The programs one cgroup has when the log watches it.
pub const PROGRAMS_PER_CGROUP: usize = KINDS.len();
