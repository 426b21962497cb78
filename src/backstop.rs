//! The kernel backstop: a cgroup BPF program that lets an agent's packets
//! leave only through `lo`, as systemd's `RestrictNetworkInterfaces=lo` does.
//!
//! Captured traffic is routed to `lo` (policy routing + TPROXY), so the
//! program stops nothing the proxy handles; it stops everything else, and it
//! keeps doing so when the nftables table is deleted while the daemon is
//! frozen or dead: a `BPF_PROG_ATTACH` attachment belongs to the cgroup, not
//! to the file descriptor or the process that made it. It ends when it is
//! detached or the cgroup is removed. (Checked: tests/backstop.rs drops the
//! program fd and SIGKILLs the attaching process; the e2e scenario
//! `kernel_backstop` deletes the table under a frozen, then a killed daemon.)
//!
//! What a blocked agent sees: a UDP send fails with EPERM; a TCP connect
//! hangs until the client gives up (the SYN is dropped with EPERM, which TCP
//! ignores and retransmits). While the daemon runs, its table refuses at once.
//!
//! Consequences for the agents: DNS must go to a resolver on loopback (an
//! off-host resolver is unreachable), and `interception.bypass` destinations
//! that are not on `lo` are unreachable too.
//!
//! The program is five hand-assembled instructions, loaded and attached with
//! the bpf(2) syscall through libc; the attribute layouts below are written
//! from the kernel UAPI (`include/uapi/linux/bpf.h`). It is attached with
//! `BPF_F_ALLOW_MULTI`: it runs alongside systemd's own programs, and also for
//! every cgroup below the agent's, whatever they attach. (A cgroup that
//! already holds a program attached without that flag refuses it.)
//!
//! Privileges: loading and attaching need `CAP_BPF` and `CAP_NET_ADMIN` (or
//! `CAP_SYS_ADMIN`); finding copies an earlier daemon left, to replace or
//! detach them, needs `CAP_SYS_ADMIN` (`BPF_PROG_GET_FD_BY_ID`).

use std::ffi::CStr;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

// bpf(2) commands.
const BPF_PROG_LOAD: u32 = 5;
const BPF_PROG_ATTACH: u32 = 8;
const BPF_PROG_DETACH: u32 = 9;
const BPF_PROG_GET_FD_BY_ID: u32 = 13;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_PROG_QUERY: u32 = 16;

const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_CGROUP_INET_EGRESS: u32 = 1;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// How every copy of the program is recognised, also one an earlier daemon
/// left attached (BPF_OBJ_NAME_LEN is 16 with the NUL).
const PROG_NAME: &[u8; 15] = b"ae_backstop_lo\0";
const LICENSE: &CStr = c"GPL";
/// The kernel keeps at most 64 programs per cgroup and attach type.
const MAX_QUERIED_PROGS: usize = 64;
/// Room for the verifier's explanation when a load fails.
const VERIFIER_LOG_LEN: usize = 64 * 1024;
/// A load interrupted in the verifier (EAGAIN) is retried this often.
const LOAD_ATTEMPTS: usize = 5;

/// `offsetof(struct __sk_buff, ifindex)`: the device the packet leaves by.
const SKB_IFINDEX_OFFSET: i16 = 40;

/// One `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    /// `dst_reg:4, src_reg:4`, a bit-field: its order follows the byte order.
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        let regs = if cfg!(target_endian = "little") {
            dst | (src << 4)
        } else {
            (dst << 4) | src
        };
        Insn {
            code,
            regs,
            off,
            imm,
        }
    }
}

/// BPF_LDX | BPF_MEM | BPF_W
const LDX_MEM_W: u8 = 0x61;
/// BPF_ALU64 | BPF_MOV | BPF_K
const ALU64_MOV_K: u8 = 0xb7;
/// BPF_JMP | BPF_JEQ | BPF_K
const JMP_JEQ_K: u8 = 0x15;
/// BPF_JMP | BPF_EXIT
const JMP_EXIT: u8 = 0x95;

/// ```text
/// r2 = *(u32 *)(r1 + offsetof(struct __sk_buff, ifindex))
/// r0 = 1                     // allow
/// if r2 == LO goto +1
/// r0 = 0                     // drop: the sender gets EPERM
/// exit
/// ```
fn program(lo_ifindex: i32) -> [Insn; 5] {
    [
        Insn::new(LDX_MEM_W, 2, 1, SKB_IFINDEX_OFFSET, 0),
        Insn::new(ALU64_MOV_K, 0, 0, 0, 1),
        Insn::new(JMP_JEQ_K, 2, 0, 1, lo_ifindex),
        Insn::new(ALU64_MOV_K, 0, 0, 0, 0),
        Insn::new(JMP_EXIT, 0, 0, 0, 0),
    ]
}

/// The `BPF_PROG_LOAD` part of `union bpf_attr`, up to the last field we set.
#[repr(C, align(8))]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The `BPF_PROG_ATTACH` / `BPF_PROG_DETACH` part.
#[repr(C)]
#[derive(Default)]
struct AttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// The `BPF_PROG_QUERY` part.
#[repr(C, align(8))]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

/// The `BPF_PROG_GET_FD_BY_ID` part.
#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    prog_id: u32,
    next_id: u32,
    open_flags: u32,
}

/// The `BPF_OBJ_GET_INFO_BY_FD` part.
#[repr(C, align(8))]
#[derive(Default)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_prog_info` up to `name`.
#[repr(C, align(8))]
#[derive(Default)]
struct ProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
    name: [u8; 16],
}

// The layouts must be the kernel's to the byte, and without padding: the
// kernel refuses non-zero bytes it does not expect, and padding is undefined.
const _: () = {
    assert!(size_of::<Insn>() == 8);
    assert!(size_of::<ProgLoadAttr>() == 72);
    assert!(size_of::<AttachAttr>() == 20);
    assert!(size_of::<QueryAttr>() == 32);
    assert!(size_of::<GetFdByIdAttr>() == 12);
    assert!(size_of::<InfoByFdAttr>() == 16);
    assert!(size_of::<ProgInfo>() == 80);
    assert!(offset_of!(ProgLoadAttr, log_buf) == 32);
    assert!(offset_of!(ProgLoadAttr, prog_name) == 48);
    assert!(offset_of!(ProgLoadAttr, expected_attach_type) == 68);
    assert!(offset_of!(AttachAttr, replace_bpf_fd) == 16);
    assert!(offset_of!(QueryAttr, prog_ids) == 16);
    assert!(offset_of!(QueryAttr, prog_cnt) == 24);
    assert!(offset_of!(InfoByFdAttr, info) == 8);
    assert!(offset_of!(ProgInfo, map_ids) == 56);
    assert!(offset_of!(ProgInfo, name) == 64);
};

/// bpf(2) with one command's attributes.
///
/// # Safety
/// `attr` must be the attribute struct of `cmd`, and every address in it must
/// point to memory valid for what the kernel reads or writes there.
unsafe fn bpf<T>(cmd: u32, attr: &mut T) -> io::Result<libc::c_long> {
    let rc = libc::syscall(
        libc::SYS_bpf,
        libc::c_long::from(cmd),
        attr as *mut T,
        size_of::<T>(),
    );
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fd_arg(fd: RawFd) -> u32 {
    // Open file descriptors are never negative.
    fd as u32
}

/// What went wrong with the backstop.
#[derive(Debug)]
pub enum BackstopError {
    /// No `lo` in the daemon's network namespace.
    NoLoopback(io::Error),
    /// The kernel refused the program; `verifier_log` says why when it can.
    Load {
        source: io::Error,
        verifier_log: String,
    },
    /// The loaded program's id cannot be read.
    Inspect(io::Error),
    /// A bpf(2) or file call on one cgroup failed.
    Cgroup {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl fmt::Display for BackstopError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackstopError::NoLoopback(e) => {
                write!(f, "cannot find the ifindex of lo: {e}")
            }
            BackstopError::Load {
                source,
                verifier_log,
            } => {
                write!(
                    f,
                    "the kernel refused the backstop BPF program (cgroup_skb): {source}"
                )?;
                if source.raw_os_error() == Some(libc::EPERM) {
                    write!(f, " (needs CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)")?;
                }
                if !verifier_log.is_empty() {
                    write!(f, "; verifier log:\n{verifier_log}")?;
                }
                Ok(())
            }
            BackstopError::Inspect(e) => {
                write!(f, "cannot read the id of the loaded backstop program: {e}")
            }
            BackstopError::Cgroup {
                action,
                path,
                source,
            } => write!(f, "{action} cgroup {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for BackstopError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BackstopError::NoLoopback(source)
            | BackstopError::Inspect(source)
            | BackstopError::Load { source, .. }
            | BackstopError::Cgroup { source, .. } => Some(source),
        }
    }
}

fn cgroup_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> BackstopError + 'a {
    move |source| BackstopError::Cgroup {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// The loaded program, ready to attach to cgroups.
pub struct Backstop {
    prog: OwnedFd,
    prog_id: u32,
    lo_ifindex: u32,
}

impl Backstop {
    /// Loads the program for the `lo` of the calling thread's network namespace.
    pub fn load() -> Result<Backstop, BackstopError> {
        // SAFETY: a NUL-terminated name; if_nametoindex reads nothing else.
        let lo_ifindex = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        if lo_ifindex == 0 {
            return Err(BackstopError::NoLoopback(io::Error::last_os_error()));
        }
        let imm = i32::try_from(lo_ifindex).map_err(|_| {
            BackstopError::NoLoopback(io::Error::other(format!(
                "ifindex {lo_ifindex} does not fit the instruction"
            )))
        })?;
        let insns = program(imm);
        let prog = load_program(&insns).map_err(|source| BackstopError::Load {
            verifier_log: verifier_log(&insns),
            source,
        })?;
        let prog_id = prog_info(&prog).map_err(BackstopError::Inspect)?.id;
        Ok(Backstop {
            prog,
            prog_id,
            lo_ifindex,
        })
    }

    /// The ifindex the program lets packets out by.
    pub fn lo_ifindex(&self) -> u32 {
        self.lo_ifindex
    }

    /// Attaches the program to the cgroup directory `cgroup_dir` (idempotent),
    /// then detaches copies an earlier daemon left there, so restarts do not
    /// pile them up. The attachment outlives this `Backstop` and the process.
    pub fn attach(&self, cgroup_dir: &Path) -> Result<(), BackstopError> {
        let cgroup = open_cgroup(cgroup_dir)?;
        let mut others = attached_ids(&cgroup, cgroup_dir)?;
        let before = others.len();
        others.retain(|id| *id != self.prog_id);
        // The kernel refuses the same program twice on one cgroup (EINVAL).
        if others.len() == before {
            let mut attr = AttachAttr {
                target_fd: fd_arg(cgroup.as_raw_fd()),
                attach_bpf_fd: fd_arg(self.prog.as_raw_fd()),
                attach_type: BPF_CGROUP_INET_EGRESS,
                attach_flags: BPF_F_ALLOW_MULTI,
                ..AttachAttr::default()
            };
            // SAFETY: attach attributes; no addresses in them.
            unsafe { bpf(BPF_PROG_ATTACH, &mut attr) }
                .map_err(cgroup_error("attaching the backstop to", cgroup_dir))?;
        }
        // Earlier copies go once ours is in place: never a gap. Failing that
        // leaves a redundant copy, and the backstop in force: not an error.
        let removed = copies_among(&others, cgroup_dir).and_then(|copies| {
            copies
                .iter()
                .try_for_each(|fd| detach_prog(&cgroup, fd, cgroup_dir))
        });
        if let Err(e) = removed {
            log::warn!("kernel backstop attached, but an earlier copy stays: {e}");
        }
        Ok(())
    }
}

/// Detaches every copy of the backstop (this daemon's or an earlier one's)
/// from `cgroup_dir`; returns how many. A cgroup that no longer exists took
/// its programs with it: that is 0, not an error.
pub fn detach(cgroup_dir: &Path) -> Result<usize, BackstopError> {
    let cgroup = match open_cgroup(cgroup_dir) {
        Ok(c) => c,
        Err(BackstopError::Cgroup { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(0)
        }
        Err(e) => return Err(e),
    };
    let copies = copies_among(&attached_ids(&cgroup, cgroup_dir)?, cgroup_dir)?;
    for fd in &copies {
        detach_prog(&cgroup, fd, cgroup_dir)?;
    }
    Ok(copies.len())
}

/// How many copies of the backstop are attached to `cgroup_dir` itself.
pub fn attached_count(cgroup_dir: &Path) -> Result<usize, BackstopError> {
    let cgroup = open_cgroup(cgroup_dir)?;
    Ok(copies_among(&attached_ids(&cgroup, cgroup_dir)?, cgroup_dir)?.len())
}

fn open_cgroup(path: &Path) -> Result<File, BackstopError> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(path)
        .map_err(cgroup_error("opening", path))
}

fn detach_prog(cgroup: &File, prog: &OwnedFd, path: &Path) -> Result<(), BackstopError> {
    let mut attr = AttachAttr {
        target_fd: fd_arg(cgroup.as_raw_fd()),
        attach_bpf_fd: fd_arg(prog.as_raw_fd()),
        attach_type: BPF_CGROUP_INET_EGRESS,
        ..AttachAttr::default()
    };
    // SAFETY: detach attributes; no addresses in them.
    match unsafe { bpf(BPF_PROG_DETACH, &mut attr) } {
        // Gone meanwhile (another detach raced us): the goal is reached.
        Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
            Err(cgroup_error("detaching the backstop from", path)(e))
        }
        _ => Ok(()),
    }
}

/// The ids of the egress programs attached directly to `cgroup`.
fn attached_ids(cgroup: &File, path: &Path) -> Result<Vec<u32>, BackstopError> {
    let mut ids = [0u32; MAX_QUERIED_PROGS];
    let mut attr = QueryAttr {
        target_fd: fd_arg(cgroup.as_raw_fd()),
        attach_type: BPF_CGROUP_INET_EGRESS,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: MAX_QUERIED_PROGS as u32,
        ..QueryAttr::default()
    };
    // SAFETY: prog_ids points to prog_cnt writable u32s.
    unsafe { bpf(BPF_PROG_QUERY, &mut attr) }
        .map_err(cgroup_error("listing the BPF programs of", path))?;
    let count = (attr.prog_cnt as usize).min(MAX_QUERIED_PROGS);
    Ok(ids[..count].to_vec())
}

/// The copies of the backstop among the programs `ids` (of `path`), opened.
fn copies_among(ids: &[u32], path: &Path) -> Result<Vec<OwnedFd>, BackstopError> {
    let mut ours = Vec::new();
    for &id in ids {
        let mut by_id = GetFdByIdAttr {
            prog_id: id,
            ..GetFdByIdAttr::default()
        };
        // SAFETY: no addresses in these attributes.
        let fd = match unsafe { bpf(BPF_PROG_GET_FD_BY_ID, &mut by_id) } {
            // SAFETY: the kernel returned a new descriptor that nothing else owns.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
            // Unloaded since the query.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(cgroup_error("opening a BPF program attached to", path)(e)),
        };
        let info =
            prog_info(&fd).map_err(cgroup_error("reading a BPF program attached to", path))?;
        if info.prog_type == BPF_PROG_TYPE_CGROUP_SKB
            && info.name[..PROG_NAME.len()] == PROG_NAME[..]
        {
            ours.push(fd);
        }
    }
    Ok(ours)
}

fn prog_info(prog: &OwnedFd) -> io::Result<ProgInfo> {
    let mut info = ProgInfo::default();
    let mut attr = InfoByFdAttr {
        bpf_fd: fd_arg(prog.as_raw_fd()),
        info_len: size_of::<ProgInfo>() as u32,
        info: &mut info as *mut ProgInfo as u64,
    };
    // SAFETY: info points to info_len writable bytes.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info)
}

fn load_attr(insns: &[Insn; 5]) -> ProgLoadAttr {
    let mut prog_name = [0u8; 16];
    prog_name[..PROG_NAME.len()].copy_from_slice(PROG_NAME);
    ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_SKB,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        prog_name,
        expected_attach_type: BPF_CGROUP_INET_EGRESS,
        ..ProgLoadAttr::default()
    }
}

fn load_program(insns: &[Insn; 5]) -> io::Result<OwnedFd> {
    let mut attempt = 1;
    loop {
        let mut attr = load_attr(insns);
        // SAFETY: insns, license and prog_name are live for the call and
        // insn_cnt matches; no log buffer.
        match unsafe { bpf(BPF_PROG_LOAD, &mut attr) } {
            // SAFETY: the kernel returned a new descriptor that nothing else owns.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// After a failed load: load again with a log buffer, for the kernel's reason.
fn verifier_log(insns: &[Insn; 5]) -> String {
    let mut log = vec![0u8; VERIFIER_LOG_LEN];
    let mut attr = ProgLoadAttr {
        log_level: 1,
        log_size: VERIFIER_LOG_LEN as u32,
        log_buf: log.as_mut_ptr() as u64,
        ..load_attr(insns)
    };
    // SAFETY: as in load_program, and log_buf points to log_size writable bytes.
    if let Ok(fd) = unsafe { bpf(BPF_PROG_LOAD, &mut attr) } {
        // It loaded this time: nothing to explain; do not leak the program.
        // SAFETY: a new descriptor that nothing else owns.
        drop(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
        return String::new();
    }
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    String::from_utf8_lossy(&log[..end]).trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_encodes_as_the_kernel_reads_it() {
        let insns = program(1);
        // SAFETY: Insn is 8 plain bytes without padding.
        let bytes: &[u8] =
            unsafe { std::slice::from_raw_parts(insns.as_ptr().cast::<u8>(), insns.len() * 8) };
        if cfg!(target_endian = "little") {
            assert_eq!(
                bytes,
                [
                    0x61, 0x12, 40, 0, 0, 0, 0, 0, // r2 = *(u32 *)(r1 + 40)
                    0xb7, 0x00, 0, 0, 1, 0, 0, 0, // r0 = 1
                    0x15, 0x02, 1, 0, 1, 0, 0, 0, // if r2 == 1 goto +1
                    0xb7, 0x00, 0, 0, 0, 0, 0, 0, // r0 = 0
                    0x95, 0x00, 0, 0, 0, 0, 0, 0, // exit
                ]
            );
        }
    }
}
