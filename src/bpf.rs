//! The bpf(2) syscall, as far as agent-egress uses it: load a hand-assembled
//! program, attach it to cgroups (replacing copies an earlier daemon left),
//! detach it, and keep a hash map the programs write and we read.
//!
//! The attribute layouts are written from the kernel UAPI
//! (`include/uapi/linux/bpf.h`), field by field, and checked for size and
//! offsets below; every call goes through libc's `syscall`.
//!
//! Programs are attached with `BPF_F_ALLOW_MULTI`: they run alongside
//! systemd's own programs, and also for every cgroup below the one they are
//! attached to. (A cgroup that already holds a program attached without that
//! flag refuses them.) An attachment belongs to the cgroup, not to a file
//! descriptor or process: it stays until it is detached or the cgroup is removed.
//!
//! Privileges: loading and attaching need `CAP_BPF` and `CAP_NET_ADMIN` (or
//! `CAP_SYS_ADMIN`); finding the copies an earlier daemon left, to replace or
//! detach them, needs `CAP_SYS_ADMIN` (`BPF_PROG_GET_FD_BY_ID`).

use std::ffi::CStr;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

// bpf(2) commands.
const BPF_MAP_CREATE: u32 = 0;
const BPF_MAP_LOOKUP_ELEM: u32 = 1;
const BPF_MAP_UPDATE_ELEM: u32 = 2;
const BPF_MAP_DELETE_ELEM: u32 = 3;
const BPF_PROG_LOAD: u32 = 5;
const BPF_PROG_ATTACH: u32 = 8;
const BPF_PROG_DETACH: u32 = 9;
const BPF_PROG_GET_FD_BY_ID: u32 = 13;
const BPF_OBJ_GET_INFO_BY_FD: u32 = 15;
const BPF_PROG_QUERY: u32 = 16;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: u32 = 21;
const BPF_LINK_CREATE: u32 = 28;

const BPF_F_ALLOW_MULTI: u32 = 2;
pub const BPF_MAP_TYPE_HASH: u32 = 1;
pub const BPF_MAP_TYPE_LRU_HASH: u32 = 9;
/// Sockets, keyed by 8 bytes, with a value of their fd on update (u64).
pub const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
/// `BPF_ANY` of the map update flags: create or replace.
const BPF_ANY: u64 = 0;

const LICENSE: &CStr = c"GPL";
/// The kernel keeps at most 64 programs per cgroup and attach type.
const MAX_QUERIED_PROGS: usize = 64;
/// Room for the verifier's explanation when a load fails.
const VERIFIER_LOG_LEN: usize = 64 * 1024;
/// A load interrupted in the verifier (EAGAIN) is retried this often.
const LOAD_ATTEMPTS: usize = 5;

/// One `struct bpf_insn`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    /// `dst_reg:4, src_reg:4`, a bit-field: its order follows the byte order.
    regs: u8,
    off: i16,
    imm: i32,
}

impl Insn {
    pub const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
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

    /// The instruction's 8 bytes, as the kernel reads them (for tests that
    /// check an encoding byte for byte).
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.code;
        b[1] = self.regs;
        b[2..4].copy_from_slice(&self.off.to_ne_bytes());
        b[4..8].copy_from_slice(&self.imm.to_ne_bytes());
        b
    }

    /// `dst = map` (a two-slot `BPF_LD | BPF_IMM | BPF_DW` with
    /// `BPF_PSEUDO_MAP_FD`): the kernel swaps the fd for the map at load.
    pub fn load_map_fd(dst: u8, map: &Map) -> [Insn; 2] {
        const LD_IMM64: u8 = 0x18;
        const BPF_PSEUDO_MAP_FD: u8 = 1;
        [
            Insn::new(LD_IMM64, dst, BPF_PSEUDO_MAP_FD, 0, map.fd.as_raw_fd()),
            Insn::new(0, 0, 0, 0, 0),
        ]
    }
}

/// The opcodes the hand-assembled programs use.
pub mod op {
    /// BPF_LDX | BPF_MEM | BPF_W: `dst = *(u32 *)(src + off)`
    pub const LDX_MEM_W: u8 = 0x61;
    /// BPF_STX | BPF_MEM | BPF_DW: `*(u64 *)(dst + off) = src`
    pub const STX_MEM_DW: u8 = 0x7b;
    /// BPF_ALU64 | BPF_MOV | BPF_K: `dst = imm`
    pub const MOV64_IMM: u8 = 0xb7;
    /// BPF_ALU64 | BPF_MOV | BPF_X: `dst = src`
    pub const MOV64_REG: u8 = 0xbf;
    /// BPF_ALU64 | BPF_ADD | BPF_K: `dst += imm`
    pub const ADD64_IMM: u8 = 0x07;
    /// BPF_LDX | BPF_MEM | BPF_DW: `dst = *(u64 *)(src + off)`
    pub const LDX_MEM_DW: u8 = 0x79;
    /// BPF_JMP | BPF_JEQ | BPF_K: `if dst == imm goto +off`
    pub const JEQ_IMM: u8 = 0x15;
    /// BPF_JMP | BPF_JNE | BPF_K: `if dst != imm goto +off`
    pub const JNE_IMM: u8 = 0x55;
    /// BPF_JMP | BPF_CALL: `r0 = helper imm (r1..r5)`
    pub const CALL: u8 = 0x85;
    /// BPF_JMP | BPF_EXIT: `return r0`
    pub const EXIT: u8 = 0x95;
}

/// The `BPF_MAP_CREATE` part of `union bpf_attr`, up to the name.
#[repr(C, align(8))]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    /// Written out: as padding its bytes were undefined, and the kernel read
    /// them as an ifindex to offload to (EINVAL when not 0).
    map_ifindex: u32,
}

/// The `BPF_MAP_*_ELEM` part.
#[repr(C, align(8))]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// The `BPF_PROG_LOAD` part, up to the last field we set.
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

/// The `BPF_LINK_CREATE` part, up to `flags`: all a cgroup link needs.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
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
    assert!(size_of::<MapCreateAttr>() == 48);
    assert!(offset_of!(MapCreateAttr, map_name) == 28);
    assert!(offset_of!(MapCreateAttr, map_ifindex) == 44);
    assert!(size_of::<MapElemAttr>() == 32);
    assert!(offset_of!(MapElemAttr, key) == 8);
    assert!(offset_of!(MapElemAttr, flags) == 24);
    assert!(size_of::<ProgLoadAttr>() == 72);
    assert!(size_of::<AttachAttr>() == 20);
    assert!(size_of::<LinkCreateAttr>() == 16);
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

/// A descriptor the kernel just returned, which nothing else owns.
fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: bpf(2) returned a new descriptor (a non-negative int).
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// What went wrong with one of our BPF programs or maps; `what` names it
/// in the user's terms ("the kernel backstop").
#[derive(Debug)]
pub enum BpfError {
    /// Something the program needs from the system is missing.
    Prepare { what: &'static str, reason: String },
    /// The kernel refused the program; `verifier_log` says why when it can.
    Load {
        what: &'static str,
        source: io::Error,
        verifier_log: String,
    },
    /// The kernel refused to make a map.
    Map {
        what: &'static str,
        source: io::Error,
    },
    /// The loaded program's id cannot be read.
    Inspect {
        what: &'static str,
        source: io::Error,
    },
    /// A bpf(2) or file call on one cgroup failed.
    Cgroup {
        what: &'static str,
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl fmt::Display for BpfError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BpfError::Prepare { what, reason } => write!(f, "{what}: {reason}"),
            BpfError::Load {
                what,
                source,
                verifier_log,
            } => {
                write!(f, "the kernel refused the BPF program of {what}: {source}")?;
                if source.raw_os_error() == Some(libc::EPERM) {
                    write!(f, " (needs CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)")?;
                }
                if !verifier_log.is_empty() {
                    write!(f, "; verifier log:\n{verifier_log}")?;
                }
                Ok(())
            }
            BpfError::Map { what, source } => {
                write!(f, "the kernel refused the BPF map of {what}: {source}")
            }
            BpfError::Inspect { what, source } => {
                write!(
                    f,
                    "cannot read the id of the loaded program of {what}: {source}"
                )
            }
            BpfError::Cgroup {
                what,
                action,
                path,
                source,
            } => write!(f, "{what}: {action} cgroup {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for BpfError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BpfError::Prepare { .. } => None,
            BpfError::Load { source, .. }
            | BpfError::Map { source, .. }
            | BpfError::Inspect { source, .. }
            | BpfError::Cgroup { source, .. } => Some(source),
        }
    }
}

/// What a kind of program is: how the kernel runs it, and how every copy of
/// it is recognised, also one an earlier daemon left attached.
#[derive(Debug)]
pub struct ProgramKind {
    /// In the user's terms, for errors ("the kernel backstop").
    pub what: &'static str,
    /// The program name (BPF_OBJ_NAME_LEN is 16 with the NUL).
    pub name: &'static CStr,
    pub prog_type: u32,
    pub attach_type: u32,
}

impl ProgramKind {
    fn cgroup_error<'a>(
        &self,
        action: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(io::Error) -> BpfError + 'a {
        let what = self.what;
        move |source| BpfError::Cgroup {
            what,
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    fn load_attr(&self, insns: &[Insn]) -> ProgLoadAttr {
        let mut prog_name = [0u8; 16];
        let name = self.name.to_bytes();
        let len = name.len().min(15);
        prog_name[..len].copy_from_slice(&name[..len]);
        ProgLoadAttr {
            prog_type: self.prog_type,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: LICENSE.as_ptr() as u64,
            prog_name,
            expected_attach_type: self.attach_type,
            ..ProgLoadAttr::default()
        }
    }

    fn is_copy(&self, info: &ProgInfo) -> bool {
        let name = self.name.to_bytes();
        let len = name.len().min(15);
        info.prog_type == self.prog_type && info.name[..len] == name[..len] && info.name[len] == 0
    }

    /// Detaches every copy of this kind of program (ours or an earlier
    /// daemon's) from `cgroup_dir`; returns how many. A cgroup that no longer
    /// exists took its programs with it: that is 0, not an error.
    pub fn detach_all(&self, cgroup_dir: &Path) -> Result<usize, BpfError> {
        let cgroup = match self.open_cgroup(cgroup_dir) {
            Ok(c) => c,
            Err(BpfError::Cgroup { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(0)
            }
            Err(e) => return Err(e),
        };
        let copies = self.copies_among(&self.attached_ids(&cgroup, cgroup_dir)?, cgroup_dir)?;
        for fd in &copies {
            self.detach_prog(&cgroup, fd, cgroup_dir)?;
        }
        Ok(copies.len())
    }

    /// How many copies of this kind of program are attached to `cgroup_dir` itself.
    pub fn attached_count(&self, cgroup_dir: &Path) -> Result<usize, BpfError> {
        let cgroup = self.open_cgroup(cgroup_dir)?;
        Ok(self
            .copies_among(&self.attached_ids(&cgroup, cgroup_dir)?, cgroup_dir)?
            .len())
    }

    fn open_cgroup(&self, path: &Path) -> Result<File, BpfError> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(path)
            .map_err(self.cgroup_error("opening", path))
    }

    fn detach_prog(&self, cgroup: &File, prog: &OwnedFd, path: &Path) -> Result<(), BpfError> {
        let mut attr = AttachAttr {
            target_fd: fd_arg(cgroup.as_raw_fd()),
            attach_bpf_fd: fd_arg(prog.as_raw_fd()),
            attach_type: self.attach_type,
            ..AttachAttr::default()
        };
        // SAFETY: detach attributes; no addresses in them.
        match unsafe { bpf(BPF_PROG_DETACH, &mut attr) } {
            // Gone meanwhile (another detach raced us): the goal is reached.
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                Err(self.cgroup_error("detaching from", path)(e))
            }
            _ => Ok(()),
        }
    }

    /// The ids of the programs of our attach type attached directly to `cgroup`.
    fn attached_ids(&self, cgroup: &File, path: &Path) -> Result<Vec<u32>, BpfError> {
        let mut ids = [0u32; MAX_QUERIED_PROGS];
        let mut attr = QueryAttr {
            target_fd: fd_arg(cgroup.as_raw_fd()),
            attach_type: self.attach_type,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: MAX_QUERIED_PROGS as u32,
            ..QueryAttr::default()
        };
        // SAFETY: prog_ids points to prog_cnt writable u32s.
        unsafe { bpf(BPF_PROG_QUERY, &mut attr) }
            .map_err(self.cgroup_error("listing the BPF programs of", path))?;
        let count = (attr.prog_cnt as usize).min(MAX_QUERIED_PROGS);
        Ok(ids[..count].to_vec())
    }

    /// The copies of this kind among the programs `ids` (of `path`), opened.
    fn copies_among(&self, ids: &[u32], path: &Path) -> Result<Vec<OwnedFd>, BpfError> {
        let mut ours = Vec::new();
        for &id in ids {
            let mut by_id = GetFdByIdAttr {
                prog_id: id,
                ..GetFdByIdAttr::default()
            };
            // SAFETY: no addresses in these attributes.
            let fd = match unsafe { bpf(BPF_PROG_GET_FD_BY_ID, &mut by_id) } {
                Ok(fd) => owned(fd),
                // Unloaded since the query.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => {
                    return Err(self.cgroup_error("opening a BPF program attached to", path)(e))
                }
            };
            let info = prog_info(&fd)
                .map_err(self.cgroup_error("reading a BPF program attached to", path))?;
            if self.is_copy(&info) {
                ours.push(fd);
            }
        }
        Ok(ours)
    }
}

/// A loaded program, ready to attach to cgroups.
pub struct Program {
    kind: &'static ProgramKind,
    fd: OwnedFd,
    id: u32,
}

impl Program {
    /// Loads `insns` as a program of `kind`; on refusal, the verifier's reason.
    pub fn load(kind: &'static ProgramKind, insns: &[Insn]) -> Result<Program, BpfError> {
        let fd = load_program(kind, insns).map_err(|source| BpfError::Load {
            what: kind.what,
            verifier_log: verifier_log(kind, insns),
            source,
        })?;
        let id = prog_info(&fd)
            .map_err(|source| BpfError::Inspect {
                what: kind.what,
                source,
            })?
            .id;
        Ok(Program { kind, fd, id })
    }

    /// Attaches the program to the cgroup directory `cgroup_dir` (idempotent),
    /// then detaches copies an earlier daemon left there, so restarts do not
    /// pile them up. The attachment outlives this `Program` and the process.
    pub fn attach(&self, cgroup_dir: &Path) -> Result<(), BpfError> {
        let kind = self.kind;
        let cgroup = kind.open_cgroup(cgroup_dir)?;
        let mut others = kind.attached_ids(&cgroup, cgroup_dir)?;
        let before = others.len();
        others.retain(|id| *id != self.id);
        // The kernel refuses the same program twice on one cgroup (EINVAL).
        if others.len() == before {
            let mut attr = AttachAttr {
                target_fd: fd_arg(cgroup.as_raw_fd()),
                attach_bpf_fd: fd_arg(self.fd.as_raw_fd()),
                attach_type: kind.attach_type,
                attach_flags: BPF_F_ALLOW_MULTI,
                ..AttachAttr::default()
            };
            // SAFETY: attach attributes; no addresses in them.
            unsafe { bpf(BPF_PROG_ATTACH, &mut attr) }
                .map_err(kind.cgroup_error("attaching to", cgroup_dir))?;
        }
        // Which of the others are copies an earlier daemon left takes opening
        // them by id, which needs CAP_SYS_ADMIN; a sandboxed daemon has not got
        // it, and trying would only earn EPERM. They stay, beside ours in force.
        if !others.is_empty() && !may_open_by_id() {
            log::info!(
                "{} attached to {}; {} other program(s) there left in place: telling an earlier daemon's copy from another program's needs CAP_SYS_ADMIN",
                kind.what,
                cgroup_dir.display(),
                others.len()
            );
            return Ok(());
        }
        // Earlier copies go once ours is in place: never a gap. Failing that
        // leaves a redundant copy, and ours in force: not an error.
        let removed = kind.copies_among(&others, cgroup_dir).and_then(|copies| {
            copies
                .iter()
                .try_for_each(|fd| kind.detach_prog(&cgroup, fd, cgroup_dir))
        });
        if let Err(e) = removed {
            log::warn!("{} attached, but an earlier copy stays: {e}", kind.what);
        }
        Ok(())
    }

    /// Attaches the program to the cgroup directory `cgroup_dir` through a BPF
    /// link: attached while the returned descriptor is open, and detached by
    /// the kernel when it closes, also when the process dies. Nothing to find
    /// and remove after a restart, which would need CAP_SYS_ADMIN
    /// (BPF_PROG_GET_FD_BY_ID) that a sandboxed daemon lacks.
    pub fn link(&self, cgroup_dir: &Path) -> Result<OwnedFd, BpfError> {
        let kind = self.kind;
        let cgroup = kind.open_cgroup(cgroup_dir)?;
        let mut attr = LinkCreateAttr {
            prog_fd: fd_arg(self.fd.as_raw_fd()),
            target_fd: fd_arg(cgroup.as_raw_fd()),
            attach_type: kind.attach_type,
            flags: 0,
        };
        // SAFETY: link attributes; no addresses in them.
        let fd = unsafe { bpf(BPF_LINK_CREATE, &mut attr) }
            .map_err(kind.cgroup_error("linking to", cgroup_dir))?;
        Ok(owned(fd))
    }
}

impl Program {
    /// Attaches the program to `map` (a sockmap or sockhash) as its
    /// `attach_type` program (`BPF_SK_SKB_VERDICT`, ...): every socket put
    /// in the map afterwards runs it. The map holds the program until the
    /// map is gone.
    pub fn attach_to_map(&self, map: &Map) -> Result<(), BpfError> {
        let mut attr = AttachAttr {
            target_fd: fd_arg(map.fd.as_raw_fd()),
            attach_bpf_fd: fd_arg(self.fd.as_raw_fd()),
            attach_type: self.kind.attach_type,
            ..AttachAttr::default()
        };
        // SAFETY: attach attributes; no addresses in them.
        unsafe { bpf(BPF_PROG_ATTACH, &mut attr) }.map_err(|source| BpfError::Map {
            what: self.kind.what,
            source,
        })?;
        Ok(())
    }
}

/// `CAP_SYS_ADMIN`, which `BPF_PROG_GET_FD_BY_ID` needs.
const CAP_SYS_ADMIN: u32 = 21;

/// Whether this process has `CAP_SYS_ADMIN` in effect (`CapEff` of
/// /proc/self/status; unreadable counts as no).
fn may_open_by_id() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|effective| effective & (1 << CAP_SYS_ADMIN) != 0)
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

fn load_program(kind: &ProgramKind, insns: &[Insn]) -> io::Result<OwnedFd> {
    let mut attempt = 1;
    loop {
        let mut attr = kind.load_attr(insns);
        // SAFETY: insns, license and prog_name are live for the call and
        // insn_cnt matches; no log buffer.
        match unsafe { bpf(BPF_PROG_LOAD, &mut attr) } {
            Ok(fd) => return Ok(owned(fd)),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS => {
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// After a failed load: load again with a log buffer, for the kernel's reason.
fn verifier_log(kind: &ProgramKind, insns: &[Insn]) -> String {
    let mut log = vec![0u8; VERIFIER_LOG_LEN];
    let mut attr = ProgLoadAttr {
        log_level: 1,
        log_size: VERIFIER_LOG_LEN as u32,
        log_buf: log.as_mut_ptr() as u64,
        ..kind.load_attr(insns)
    };
    // SAFETY: as in load_program, and log_buf points to log_size writable bytes.
    if let Ok(fd) = unsafe { bpf(BPF_PROG_LOAD, &mut attr) } {
        // It loaded this time: nothing to explain; do not leak the program.
        drop(owned(fd));
        return String::new();
    }
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    String::from_utf8_lossy(&log[..end]).trim_end().to_string()
}

/// Set once this kernel refused BPF_MAP_LOOKUP_AND_DELETE_ELEM on a hash map.
static LOOKUP_AND_DELETE_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// A BPF hash map with fixed-size keys and values of 8 bytes each, which
/// programs fill and this process takes entries out of.
pub struct Map {
    fd: OwnedFd,
}

impl Map {
    /// A map of `map_type` (a hash type) with u64 keys and u64 values.
    pub fn create(
        what: &'static str,
        name: &CStr,
        map_type: u32,
        max_entries: u32,
    ) -> Result<Map, BpfError> {
        let mut map_name = [0u8; 16];
        let bytes = name.to_bytes();
        let len = bytes.len().min(15);
        map_name[..len].copy_from_slice(&bytes[..len]);
        let mut attr = MapCreateAttr {
            map_type,
            key_size: 8,
            value_size: 8,
            max_entries,
            map_name,
            ..MapCreateAttr::default()
        };
        // SAFETY: map-create attributes; no addresses in them.
        let fd = unsafe { bpf(BPF_MAP_CREATE, &mut attr) }
            .map_err(|source| BpfError::Map { what, source })?;
        Ok(Map { fd: owned(fd) })
    }

    /// Stores `value` under `key` (created or replaced). For a sockhash the
    /// value is a socket's fd, and the kernel stores the socket.
    pub fn insert(&self, key: u64, value: u64) -> io::Result<()> {
        let mut attr = MapElemAttr {
            map_fd: fd_arg(self.fd.as_raw_fd()),
            key: &key as *const u64 as u64,
            value: &value as *const u64 as u64,
            flags: BPF_ANY,
            ..MapElemAttr::default()
        };
        // SAFETY: key and value point to 8 readable bytes each: the map's
        // key and value sizes.
        unsafe { bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }?;
        Ok(())
    }

    /// Removes the entry under `key`; whether there was one.
    pub fn remove(&self, key: u64) -> io::Result<bool> {
        let mut attr = MapElemAttr {
            map_fd: fd_arg(self.fd.as_raw_fd()),
            key: &key as *const u64 as u64,
            ..MapElemAttr::default()
        };
        // SAFETY: key points to 8 readable bytes.
        match unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr) } {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The value stored under `key`, removed from the map; `None` when absent.
    /// One system call where the kernel takes hash maps' entries out in one
    /// (Linux 5.14); a lookup and a delete before.
    pub fn take(&self, key: u64) -> io::Result<Option<u64>> {
        if !LOOKUP_AND_DELETE_UNSUPPORTED.load(Ordering::Relaxed) {
            match self.read_elem(BPF_MAP_LOOKUP_AND_DELETE_ELEM, key) {
                // The kernel's ENOTSUPP (524), or EINVAL: not for hash maps here.
                Err(e) if matches!(e.raw_os_error(), Some(524 | libc::EINVAL)) => {
                    LOOKUP_AND_DELETE_UNSUPPORTED.store(true, Ordering::Relaxed);
                }
                taken => return taken,
            }
        }
        let Some(value) = self.get(key)? else {
            return Ok(None);
        };
        let mut attr = MapElemAttr {
            map_fd: fd_arg(self.fd.as_raw_fd()),
            key: &key as *const u64 as u64,
            ..MapElemAttr::default()
        };
        // SAFETY: key points to 8 readable bytes. A concurrent delete (ENOENT)
        // changes nothing: the entry is gone either way.
        if let Err(e) = unsafe { bpf(BPF_MAP_DELETE_ELEM, &mut attr) } {
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
        }
        Ok(Some(value))
    }

    /// The value stored under `key`, left in the map; `None` when absent.
    pub fn get(&self, key: u64) -> io::Result<Option<u64>> {
        self.read_elem(BPF_MAP_LOOKUP_ELEM, key)
    }

    /// `command` (a lookup, or a lookup and delete) on `key`'s entry: its
    /// value, `None` when absent.
    fn read_elem(&self, command: u32, key: u64) -> io::Result<Option<u64>> {
        let mut value = 0u64;
        let mut attr = MapElemAttr {
            map_fd: fd_arg(self.fd.as_raw_fd()),
            key: &key as *const u64 as u64,
            value: &mut value as *mut u64 as u64,
            ..MapElemAttr::default()
        };
        // SAFETY: key points to 8 readable bytes, value to 8 writable ones:
        // the map's key and value sizes.
        match unsafe { bpf(command, &mut attr) } {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
