//! Our one nftables table (`inet agent_egress` by default), installed over netlink as
//! one atomic batch, kept current, read back and watched.
//!
//! What the table does: agents' sockets are recognised by `socket cgroupv2 level L`
//! against the set [`AGENTS_SET`]; their TCP gets the fwmark (policy routing, module
//! `routing`, sends it to `lo`) and prerouting hands it to the proxy with TPROXY, or
//! resets it when no proxy listens. Agents' other traffic is dropped and counted, except
//! DNS to the configured resolvers, loopback and the bypass CIDRs. The full ruleset is in
//! the `ruleset` submodule's documentation.
//!
//! rustables builds the table, chains and set elements; this module encodes the sets and
//! rules itself (rustables has no `socket`, `tproxy` or `dynset`, and one encoder for all
//! rules keeps each chain in order and lets errors name the refused expression), sends
//! each batch on its own NETLINK_NETFILTER socket and checks every ack. Every function
//! works in the network namespace of the calling thread.

mod batch;
mod decode;
mod encode;
mod error;
mod monitor;
mod query;
mod ruleset;

pub use error::NetfilterError;
pub use monitor::TableMonitor;

use batch::Batch;
use rustables::MsgType;
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

/// The agents' cgroup-id set. Stable: systemd units join with
/// `NFTSet=cgroup:inet:<table>:agents`.
pub const AGENTS_SET: &str = "agents";
/// The table's name unless configured otherwise.
pub const DEFAULT_TABLE: &str = "agent_egress";

/// Bounds on a plan (and on one `add_cgroups` / `remove_cgroups` call).
pub const MAX_CGROUPS: usize = 16_384;
pub const MAX_BYPASS: usize = 1024;
pub const MAX_DNS_SERVERS: usize = 64;

/// The table used by [`check_kernel_support`]'s probe, which is never committed.
const PROBE_TABLE: &str = "agent_egress_probe";

/// Everything the table is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePlan {
    /// Usually [`DEFAULT_TABLE`].
    pub table: String,
    /// fwmark put on agents' TCP; policy routing sends it to `lo`. Not 0.
    pub mark: u32,
    /// The proxy's TPROXY listener port (it listens on 127.0.0.1 and ::1). Not 0.
    pub port: u16,
    /// Initial members of the agents set.
    pub cgroups: Vec<CgroupMatch>,
    /// The only resolvers agents may reach (udp and tcp port 53), directly.
    pub dns_servers: Vec<IpAddr>,
    /// Networks agents reach directly, not proxied (loopback always is).
    pub bypass: Vec<(IpAddr, u8)>,
    /// The DNS handler's TPROXY port, when it captures the agents' UDP port 53
    /// to any address (then `dns_servers` are not reachable directly).
    pub dns_port: Option<u16>,
}

/// One agent cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CgroupMatch {
    /// The cgroup directory's inode number (what `socket cgroupv2` compares).
    pub id: u64,
    /// Its depth below the cgroup2 root (a child of the root is level 1).
    pub level: u32,
}

/// What agents had dropped (their non-TCP traffic other than DNS to the resolvers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropCounters {
    pub packets: u64,
    pub bytes: u64,
    /// Dropped UDP per destination, most packets first. Bounded (4096 per address
    /// family); a destination is forgotten after an hour without drops.
    pub by_udp_destination: Vec<DroppedDestination>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedDestination {
    pub addr: SocketAddr,
    pub packets: u64,
    pub bytes: u64,
}

impl TablePlan {
    fn validate(&self) -> Result<(), NetfilterError> {
        validate_table_name(&self.table)?;
        let invalid = |why: String| Err(NetfilterError::InvalidPlan(why));
        if self.mark == 0 {
            return invalid(
                "mark must not be 0 (prerouting would take every unmarked TCP packet)".into(),
            );
        }
        if self.port == 0 {
            return invalid("port must not be 0".into());
        }
        validate_cgroup_count(self.cgroups.len())?;
        if self.bypass.len() > MAX_BYPASS {
            return invalid(format!(
                "{} bypass networks, at most {MAX_BYPASS}",
                self.bypass.len()
            ));
        }
        if self.dns_servers.len() > MAX_DNS_SERVERS {
            return invalid(format!(
                "{} dns servers, at most {MAX_DNS_SERVERS}",
                self.dns_servers.len()
            ));
        }
        for (net, prefix) in &self.bypass {
            if *prefix > ruleset::full_prefix(*net) {
                return invalid(format!(
                    "bypass {net}/{prefix}: prefix longer than the address"
                ));
            }
        }
        Ok(())
    }
}

fn validate_table_name(name: &str) -> Result<(), NetfilterError> {
    // NFT_NAME_MAXLEN counts the terminating NUL.
    if name.is_empty()
        || name.len() >= rustables::sys::NFT_NAME_MAXLEN as usize
        || name.contains('\0')
    {
        return Err(NetfilterError::InvalidPlan(format!(
            "table name {name:?} must be 1 to 255 bytes without NUL"
        )));
    }
    Ok(())
}

fn validate_cgroup_count(count: usize) -> Result<(), NetfilterError> {
    if count > MAX_CGROUPS {
        return Err(NetfilterError::InvalidPlan(format!(
            "{count} cgroups, at most {MAX_CGROUPS}"
        )));
    }
    Ok(())
}

/// The ids once each (a set element can be deleted only once per batch).
fn unique_ids(ids: &[CgroupMatch]) -> Vec<CgroupMatch> {
    let mut seen = BTreeSet::new();
    ids.iter().filter(|c| seen.insert(c.id)).copied().collect()
}

/// Installs the table as one transaction: an existing table of that name is replaced
/// atomically (no moment without rules, no duplicated rules on re-install), and if the
/// kernel refuses any part, nothing changes — the old table, if any, stays.
///
/// The agents set then holds exactly `plan.cgroups`: members added since the last
/// install (by [`add_cgroups`] or by systemd's `NFTSet=`) are gone, so the plan must list
/// every agent cgroup.
pub fn install(plan: &TablePlan) -> Result<(), NetfilterError> {
    plan.validate()?;
    ruleset::install_batch(plan)?.commit()
}

/// Deletes the table. A missing table is no error.
pub fn remove(table: &str) -> Result<(), NetfilterError> {
    validate_table_name(table)?;
    ruleset::remove_batch(table)?.commit()
}

/// Adds cgroups to the agents set. A cgroup at a level no rule matches yet gets its
/// `socket cgroupv2 level L` rule in the same transaction (the installed levels are
/// read from the kernel first, so calls must not race each other on one table; a race
/// only duplicates a rule). Adding a member twice is no error.
pub fn add_cgroups(table: &str, ids: &[CgroupMatch]) -> Result<(), NetfilterError> {
    validate_table_name(table)?;
    validate_cgroup_count(ids.len())?;
    if ids.is_empty() {
        return Ok(());
    }
    let installed = query::installed_levels(table)?;
    let mut batch = Batch::default();
    batch.messages.extend(ruleset::element_messages(
        table,
        &unique_ids(ids),
        MsgType::Add,
    )?);
    let new_levels: BTreeSet<u32> = ids
        .iter()
        .map(|c| c.level)
        .filter(|level| !installed.contains(level))
        .collect();
    for level in new_levels {
        batch.push(ruleset::level_rule(level).message(table)?);
    }
    batch.commit()
}

/// Removes cgroups from the agents set. Removing a non-member is no error. Level rules
/// stay (without members they match nothing).
pub fn remove_cgroups(table: &str, ids: &[CgroupMatch]) -> Result<(), NetfilterError> {
    validate_table_name(table)?;
    validate_cgroup_count(ids.len())?;
    if ids.is_empty() {
        return Ok(());
    }
    let ids = unique_ids(ids);
    // Adding first makes every deletion find its element.
    let mut batch = Batch::default();
    batch
        .messages
        .extend(ruleset::element_messages(table, &ids, MsgType::Add)?);
    batch
        .messages
        .extend(ruleset::element_messages(table, &ids, MsgType::Del)?);
    batch.commit()
}

/// Checks that the kernel can run the table: IPv6 is on, and a probe batch holding the
/// whole ruleset (every expression type, `socket`, `tproxy`, `reject`, sets) is accepted.
/// The probe ends with a deliberately refused message, so it is never committed and
/// leaves nothing behind; it does make the kernel load missing modules it can load.
/// An error names what is missing and what to `modprobe`.
pub fn check_kernel_support() -> Result<(), NetfilterError> {
    if !Path::new("/proc/sys/net/ipv6").exists() {
        return Err(NetfilterError::Unsupported(
            "IPv6 is disabled (ipv6.disable=1 on the kernel command line?); the proxy listens \
             on ::1 and the table handles both families"
                .into(),
        ));
    }
    let plan = TablePlan {
        table: PROBE_TABLE.into(),
        mark: 1,
        port: 1,
        cgroups: vec![CgroupMatch { id: 1, level: 1 }],
        dns_servers: vec![IpAddr::from([127, 0, 0, 53])],
        bypass: vec![(IpAddr::from([192, 0, 2, 0]), 24)],
        // The DNS handler's rules are the ones a capture may add: probe them too.
        dns_port: Some(2),
    };
    let batch = ruleset::probe_batch(&plan)?;
    let last = batch.messages.len().checked_sub(1);
    let refusals = batch.transact()?;
    if let Some(refusal) = refusals.iter().find(|r| r.index != last) {
        return Err(batch.refusal_error(refusal, refusals.len() - 1));
    }
    if refusals.is_empty() {
        // Cannot happen (a table cannot be deleted twice); if it did, the probe table
        // was created and deleted in one transaction: still nothing left behind.
        return Err(NetfilterError::Protocol(
            "the kernel accepted a probe batch that deletes a table twice".into(),
        ));
    }
    Ok(())
}

/// Packets and bytes agents had dropped, in total and per UDP destination.
pub fn counters(table: &str) -> Result<DropCounters, NetfilterError> {
    validate_table_name(table)?;
    query::drop_counters(table)
}

/// The cgroup ids in the agents set, or None when the table is not installed.
pub fn agent_ids(table: &str) -> Result<Option<Vec<u64>>, NetfilterError> {
    validate_table_name(table)?;
    match query::agent_ids(table) {
        Ok(ids) => Ok(Some(ids)),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> TablePlan {
        TablePlan {
            table: DEFAULT_TABLE.into(),
            mark: 0x2a,
            port: 15001,
            cgroups: vec![],
            dns_servers: vec![],
            bypass: vec![],
            dns_port: None,
        }
    }

    #[test]
    fn valid_plan_passes() {
        assert!(plan().validate().is_ok());
    }

    #[test]
    fn invalid_plans_say_why() {
        type Breakage = fn(&mut TablePlan);
        let cases: [(Breakage, &str); 6] = [
            (|p| p.table.clear(), "table name"),
            (|p| p.table = "x".repeat(256), "1 to 255 bytes"),
            (|p| p.mark = 0, "mark must not be 0"),
            (|p| p.port = 0, "port must not be 0"),
            (
                |p| p.bypass = vec![(IpAddr::from([10, 0, 0, 0]), 33)],
                "10.0.0.0/33",
            ),
            (
                |p| p.cgroups = vec![CgroupMatch { id: 1, level: 1 }; MAX_CGROUPS + 1],
                "at most 16384",
            ),
        ];
        for (break_it, expected) in cases {
            let mut p = plan();
            break_it(&mut p);
            let err = p.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} lacks {expected:?}");
        }
    }

    #[test]
    fn unique_ids_keeps_first_of_each_id() {
        let ids = [
            CgroupMatch { id: 5, level: 1 },
            CgroupMatch { id: 6, level: 2 },
            CgroupMatch { id: 5, level: 1 },
        ];
        assert_eq!(unique_ids(&ids), ids[..2]);
    }
}
