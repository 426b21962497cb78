//! Why the capture could not start, be read or be removed.

use crate::bpf::BpfError;
use crate::cgroup::CgroupError;
use crate::netfilter::NetfilterError;
use crate::routing::RoutingError;
use std::fmt;
use std::io;

#[derive(Debug)]
pub enum CaptureError {
    /// The kernel lacks what the table needs.
    KernelSupport(NetfilterError),
    /// `interception.backstop` could not be loaded or attached.
    Backstop(BpfError),
    Cgroup(CgroupError),
    WatchingCgroups(CgroupError),
    /// `interception.delegated_subtrees: "refuse"` met agents in delegated
    /// subtrees: why, for each.
    DelegatedRefused(Vec<String>),
    InstallTable(NetfilterError),
    InstallRouting(RoutingError),
    WatchingTable(NetfilterError),
    WatchingRules(RoutingError),
    WatchingKernel(io::Error),
    /// The keeper's poll, waker or thread.
    Keeper(io::Error),
    ReadingTable(NetfilterError),
    RemoveTable {
        table: String,
        source: Box<NetfilterError>,
    },
    RemoveRouting(RoutingError),
    /// No cgroup2 root to remove the backstop below.
    RemoveBackstop(CgroupError),
    /// Programs that could not be detached, as many as there were.
    Detach(Vec<BpfError>),
}

impl fmt::Display for CaptureError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CaptureError::KernelSupport(e) => write!(f, "kernel support: {e}"),
            CaptureError::Backstop(e) => write!(f, "interception.backstop: {e}"),
            CaptureError::Cgroup(e) => write!(f, "{e}"),
            CaptureError::WatchingCgroups(e) => write!(f, "watching cgroups: {e}"),
            CaptureError::DelegatedRefused(why) => write!(f, "{}", why.join("\n")),
            CaptureError::InstallTable(e) => write!(f, "installing nftables table: {e}"),
            CaptureError::InstallRouting(e) => write!(f, "installing policy routing: {e}"),
            CaptureError::WatchingTable(e) => write!(f, "watching the kernel state: {e}"),
            CaptureError::WatchingRules(e) => write!(f, "watching the kernel state: {e}"),
            CaptureError::WatchingKernel(e) => write!(f, "watching the kernel state: {e}"),
            CaptureError::Keeper(e) => write!(f, "{e}"),
            CaptureError::ReadingTable(e) => write!(f, "{e}"),
            CaptureError::RemoveTable { table, source } => {
                write!(f, "removing table inet {table}: {source}")
            }
            CaptureError::RemoveRouting(e) => write!(f, "removing policy routing: {e}"),
            CaptureError::RemoveBackstop(e) => write!(f, "removing the kernel backstop: {e}"),
            CaptureError::Detach(errors) => {
                for (i, e) in errors.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "; " };
                    write!(f, "{sep}removing {e}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for CaptureError {}
