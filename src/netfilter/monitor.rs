//! Watching nf_tables change notifications for someone else touching our table.

use super::batch::is_own_port;
use super::decode::{messages, string, NftMessage, NlMsg};
use super::NetfilterError;
use crate::netlink::Monitor;
use netlink_sys::protocols::NETLINK_NETFILTER;
use rustables::sys;
use std::os::fd::{AsRawFd, RawFd};

/// Room for the notifications of a large ruleset flush; an overrun is still handled
/// (reported as a change).
const MONITOR_RCVBUF: usize = 4 * 1024 * 1024;

/// NFT_MSG_DESTROY* (kernel 6.3+) are past the end of rustables' headers.
const NFT_MSG_DESTROYTABLE: u16 = 26;
const NFT_MSG_DESTROYFLOWTABLE: u16 = 32;
const NFT_MSG_DESTROYSETELEM: u16 = 30;

/// Subscribed to NETLINK_NETFILTER's NFNLGRP_NFTABLES group in the network namespace of
/// the thread that created it. Poll its fd (e.g. with `mio::unix::SourceFd`, edge or level
/// triggered) and call [`TableMonitor::read_events`] when it is readable.
pub struct TableMonitor {
    monitor: Monitor,
    table: String,
}

impl TableMonitor {
    /// Watches table `inet <table>`.
    pub fn new(table: &str) -> Result<Self, NetfilterError> {
        let monitor =
            Monitor::subscribe(NETLINK_NETFILTER, &[sys::NFNLGRP_NFTABLES], MONITOR_RCVBUF)
                .map_err(|source| NetfilterError::Io {
                    action: "subscribe to NFNLGRP_NFTABLES",
                    source,
                })?;
        Ok(TableMonitor {
            monitor,
            table: table.to_string(),
        })
    }

    /// Reads every queued notification (until the socket would block). Returns true if
    /// another process changed our table: deleted it (also by flushing the ruleset),
    /// made it dormant, or added, deleted or replaced one of its chains, rules or sets.
    /// Changes of set elements are not reported (systemd's `NFTSet=` makes those), nor
    /// changes made by this process (its own re-installs). Lost notifications (receive
    /// buffer overrun) count as a change: re-install to be sure.
    pub fn read_events(&mut self) -> Result<bool, NetfilterError> {
        let table = &self.table;
        self.monitor
            .drain(|datagram| {
                // A notification we cannot parse could be a deletion: count it.
                messages(datagram)
                    .map(|msgs| msgs.iter().any(|m| is_foreign_change(table, m)))
                    .unwrap_or(true)
            })
            .map_err(|source| NetfilterError::Io {
                action: "recv notification",
                source,
            })
    }
}

/// Whether a notification says another process changed table `inet <table>` itself
/// (not merely its set elements).
fn is_foreign_change(table: &str, msg: &NlMsg<'_>) -> bool {
    if msg.kind >> 8 != sys::NFNL_SUBSYS_NFTABLES as u16
        || msg.family() != Some(libc::NFPROTO_INET as u8)
        || is_own_port(msg.port)
    {
        return false;
    }
    let op = msg.kind & 0xff;
    let structural = matches!(
        u32::from(op),
        sys::NFT_MSG_NEWTABLE
            | sys::NFT_MSG_DELTABLE
            | sys::NFT_MSG_NEWCHAIN
            | sys::NFT_MSG_DELCHAIN
            | sys::NFT_MSG_NEWRULE
            | sys::NFT_MSG_DELRULE
            | sys::NFT_MSG_NEWSET
            | sys::NFT_MSG_DELSET
            | sys::NFT_MSG_NEWOBJ
            | sys::NFT_MSG_DELOBJ
            | sys::NFT_MSG_NEWFLOWTABLE
            | sys::NFT_MSG_DELFLOWTABLE
    ) || ((NFT_MSG_DESTROYTABLE..=NFT_MSG_DESTROYFLOWTABLE).contains(&op)
        && op != NFT_MSG_DESTROYSETELEM);
    // Attribute 1 is the table's name in every one of these messages.
    structural
        && msg
            .attrs()
            .get(1)
            .is_some_and(|name| string(name) == table.as_bytes())
}

impl AsRawFd for TableMonitor {
    fn as_raw_fd(&self) -> RawFd {
        self.monitor.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::encode::{nft_type, MessageWriter};

    /// A notification as the kernel sends it: from `port`, about `table`.
    fn notification(op: u32, family: u8, port: u32, table: &str) -> Vec<u8> {
        let mut w = MessageWriter::nft(op, family, 0);
        w.put_str(1, table);
        let mut bytes = w.finish("test").unwrap();
        bytes[12..16].copy_from_slice(&port.to_ne_bytes());
        bytes
    }

    fn foreign(op: u32, family: u8, port: u32, table: &str) -> bool {
        let bytes = notification(op, family, port, table);
        is_foreign_change("agent_egress", &messages(&bytes).unwrap()[0])
    }

    const INET: u8 = libc::NFPROTO_INET as u8;
    /// A port id no socket of this process has.
    const OTHER: u32 = 0x7fff_fff0;

    #[test]
    fn deletions_and_additions_by_others_in_our_table_count() {
        for op in [
            sys::NFT_MSG_DELTABLE,
            sys::NFT_MSG_NEWTABLE,
            sys::NFT_MSG_DELCHAIN,
            sys::NFT_MSG_DELRULE,
            sys::NFT_MSG_NEWRULE,
            sys::NFT_MSG_DELSET,
            u32::from(NFT_MSG_DESTROYTABLE),
        ] {
            assert!(foreign(op, INET, OTHER, "agent_egress"), "op {op}");
        }
    }

    #[test]
    fn element_changes_other_tables_families_and_our_own_changes_do_not() {
        assert!(!foreign(
            sys::NFT_MSG_NEWSETELEM,
            INET,
            OTHER,
            "agent_egress"
        ));
        assert!(!foreign(
            sys::NFT_MSG_DELSETELEM,
            INET,
            OTHER,
            "agent_egress"
        ));
        assert!(!foreign(
            u32::from(NFT_MSG_DESTROYSETELEM),
            INET,
            OTHER,
            "agent_egress"
        ));
        assert!(!foreign(sys::NFT_MSG_NEWGEN, INET, OTHER, "agent_egress"));
        assert!(!foreign(
            sys::NFT_MSG_DELTABLE,
            INET,
            OTHER,
            "agent_egress_x"
        ));
        assert!(!foreign(
            sys::NFT_MSG_DELTABLE,
            libc::NFPROTO_IPV4 as u8,
            OTHER,
            "agent_egress"
        ));
        assert!(!foreign(
            sys::NFT_MSG_DELTABLE,
            INET,
            std::process::id(),
            "agent_egress"
        ));
        // Another subsystem's message with the same low type byte.
        let mut bytes = notification(sys::NFT_MSG_DELTABLE, INET, OTHER, "agent_egress");
        bytes[4..6].copy_from_slice(&(nft_type(sys::NFT_MSG_DELTABLE) & 0xff).to_ne_bytes());
        assert!(!is_foreign_change(
            "agent_egress",
            &messages(&bytes).unwrap()[0]
        ));
    }
}
