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
        const WATCHING: &str = "watching the kernel state";
        // Most say what failed, then the cause.
        let (context, cause): (&str, &dyn fmt::Display) = match self {
            CaptureError::KernelSupport(e) => ("kernel support", e),
            CaptureError::Backstop(e) => ("interception.backstop", e),
            CaptureError::Cgroup(e) => return write!(f, "{e}"),
            CaptureError::WatchingCgroups(e) => ("watching cgroups", e),
            CaptureError::DelegatedRefused(why) => return write!(f, "{}", why.join("\n")),
            CaptureError::InstallTable(e) => ("installing nftables table", e),
            CaptureError::InstallRouting(e) => ("installing policy routing", e),
            CaptureError::WatchingTable(e) => (WATCHING, e),
            CaptureError::WatchingRules(e) => (WATCHING, e),
            CaptureError::WatchingKernel(e) => (WATCHING, e),
            CaptureError::Keeper(e) => return write!(f, "{e}"),
            CaptureError::ReadingTable(e) => return write!(f, "{e}"),
            CaptureError::RemoveTable { table, source } => {
                return write!(f, "removing table inet {table}: {source}")
            }
            CaptureError::RemoveRouting(e) => ("removing policy routing", e),
            CaptureError::RemoveBackstop(e) => ("removing the kernel backstop", e),
            CaptureError::Detach(errors) => {
                for (i, e) in errors.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "; " };
                    write!(f, "{sep}removing {e}")?;
                }
                return Ok(());
            }
        };
        write!(f, "{context}: {cause}")
    }
}

impl std::error::Error for CaptureError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_says_what_failed_then_why() {
        let denied = || io::Error::from_raw_os_error(libc::EPERM);
        let no_mount = CgroupError::NoCgroup2Mount.to_string();
        assert_eq!(
            CaptureError::WatchingKernel(denied()).to_string(),
            format!("watching the kernel state: {}", denied())
        );
        assert_eq!(
            CaptureError::Cgroup(CgroupError::NoCgroup2Mount).to_string(),
            no_mount
        );
        assert_eq!(
            CaptureError::RemoveBackstop(CgroupError::NoCgroup2Mount).to_string(),
            format!("removing the kernel backstop: {no_mount}")
        );
        assert_eq!(
            CaptureError::DelegatedRefused(vec!["one".into(), "two".into()]).to_string(),
            "one\ntwo"
        );
        let failed = |what| BpfError::Prepare {
            what,
            reason: "gone".into(),
        };
        assert_eq!(
            CaptureError::Detach(vec![failed("the backstop"), failed("the connect log")])
                .to_string(),
            "removing the backstop: gone; removing the connect log: gone"
        );
    }
}
