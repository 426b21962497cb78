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
//! The program is five hand-assembled instructions, loaded and attached
//! through [`crate::bpf`] (with `BPF_F_ALLOW_MULTI`: it also covers every
//! cgroup below the agent's, whatever they attach).

use crate::bpf::{op, BpfError, Insn, Program, ProgramKind};
use std::io;
use std::path::Path;

const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
const BPF_CGROUP_INET_EGRESS: u32 = 1;

static KIND: ProgramKind = ProgramKind {
    what: "the kernel backstop",
    name: c"ae_backstop_lo",
    prog_type: BPF_PROG_TYPE_CGROUP_SKB,
    attach_type: BPF_CGROUP_INET_EGRESS,
};

/// `offsetof(struct __sk_buff, ifindex)`: the device the packet leaves by.
const SKB_IFINDEX_OFFSET: i16 = 40;

/// ```text
/// r2 = *(u32 *)(r1 + offsetof(struct __sk_buff, ifindex))
/// r0 = 1                     // allow
/// if r2 == LO goto +1
/// r0 = 0                     // drop: the sender gets EPERM
/// exit
/// ```
fn program(lo_ifindex: i32) -> [Insn; 5] {
    [
        Insn::new(op::LDX_MEM_W, 2, 1, SKB_IFINDEX_OFFSET, 0),
        Insn::new(op::MOV64_IMM, 0, 0, 0, 1),
        Insn::new(op::JEQ_IMM, 2, 0, 1, lo_ifindex),
        Insn::new(op::MOV64_IMM, 0, 0, 0, 0),
        Insn::new(op::EXIT, 0, 0, 0, 0),
    ]
}

/// The loaded program, ready to attach to cgroups.
pub struct Backstop {
    program: Program,
    lo_ifindex: u32,
}

impl Backstop {
    /// Loads the program for the `lo` of the calling thread's network namespace.
    pub fn load() -> Result<Backstop, BpfError> {
        // SAFETY: a NUL-terminated name; if_nametoindex reads nothing else.
        let lo_ifindex = unsafe { libc::if_nametoindex(c"lo".as_ptr()) };
        if lo_ifindex == 0 {
            return Err(BpfError::Prepare {
                what: KIND.what,
                reason: format!(
                    "cannot find the ifindex of lo: {}",
                    io::Error::last_os_error()
                ),
            });
        }
        let imm = i32::try_from(lo_ifindex).map_err(|_| BpfError::Prepare {
            what: KIND.what,
            reason: format!("ifindex {lo_ifindex} of lo does not fit the instruction"),
        })?;
        Ok(Backstop {
            program: Program::load(&KIND, &program(imm))?,
            lo_ifindex,
        })
    }

    /// The ifindex the program lets packets out by.
    pub fn lo_ifindex(&self) -> u32 {
        self.lo_ifindex
    }

    /// Attaches the program to the cgroup directory `cgroup_dir` (idempotent),
    /// then detaches copies an earlier daemon left there. The attachment
    /// outlives this `Backstop` and the process.
    pub fn attach(&self, cgroup_dir: &Path) -> Result<(), BpfError> {
        self.program.attach(cgroup_dir)
    }
}

/// Detaches every copy of the backstop (this daemon's or an earlier one's)
/// from `cgroup_dir`; returns how many. A cgroup that no longer exists took
/// its programs with it: that is 0, not an error.
pub fn detach(cgroup_dir: &Path) -> Result<usize, BpfError> {
    KIND.detach_all(cgroup_dir)
}

/// How many copies of the backstop are attached to `cgroup_dir` itself.
pub fn attached_count(cgroup_dir: &Path) -> Result<usize, BpfError> {
    KIND.attached_count(cgroup_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_encodes_as_the_kernel_reads_it() {
        let bytes: Vec<u8> = program(1).iter().flat_map(Insn::bytes).collect();
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
