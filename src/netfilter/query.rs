//! Reading our table back: which cgroup levels have a rule, which cgroups are
//! agents, and what agents had dropped.

use super::batch::dump;
use super::decode::{be32, be64, string, Attrs, NftMessage};
use super::encode::{nft_type, MessageWriter, FAMILY_INET, NLM_F_DUMP};
use super::ruleset::{AGENT_CHAIN, DROPPED_V4_SET, DROPPED_V6_SET, OUTPUT_CHAIN};
use super::{DropCounters, DroppedDestination, NetfilterError, AGENTS_SET};
use rustables::sys;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// What a listing asks for: `request` (a `get`), answered by messages of
/// `reply` type each with a list of nested attributes under `list`.
struct Listing {
    request: u32,
    reply: u32,
    /// The table and the chain or set, by their attribute types.
    names: [(u16, String); 2],
    list: u16,
    what: String,
}

/// Calls `each` for every nested attribute of every message the listing gets.
fn for_each_listed(listing: Listing, mut each: impl FnMut(&[u8])) -> Result<(), NetfilterError> {
    let mut request = MessageWriter::nft(listing.request, FAMILY_INET, NLM_F_DUMP);
    for (kind, name) in &listing.names {
        request.put_str(*kind, name);
    }
    dump(request, &listing.what, |msg| {
        if msg.kind != nft_type(listing.reply) {
            return Ok(());
        }
        let list = msg.attrs().get(listing.list).unwrap_or_default();
        for (_, item) in Attrs::new(list) {
            each(item);
        }
        Ok(())
    })
}

/// Calls `each(name, data)` for every expression of every rule of a chain.
fn for_each_rule_expr(
    table: &str,
    chain: &str,
    mut each: impl FnMut(&[u8], &[u8]),
) -> Result<(), NetfilterError> {
    let listing = Listing {
        request: sys::NFT_MSG_GETRULE,
        reply: sys::NFT_MSG_NEWRULE,
        names: [
            (sys::NFTA_RULE_TABLE, table.to_string()),
            (sys::NFTA_RULE_CHAIN, chain.to_string()),
        ],
        list: sys::NFTA_RULE_EXPRESSIONS,
        what: format!("listing of chain {chain} in table inet {table}"),
    };
    for_each_listed(listing, |expr| {
        let (name, data) = expr_parts(expr);
        each(name, data);
    })
}

/// An expression's name and data attributes.
fn expr_parts(expr: &[u8]) -> (&[u8], &[u8]) {
    let name = Attrs::new(expr)
        .get(sys::NFTA_EXPR_NAME)
        .map(string)
        .unwrap_or_default();
    let data = Attrs::new(expr)
        .get(sys::NFTA_EXPR_DATA)
        .unwrap_or_default();
    (name, data)
}

/// (packets, bytes) of a counter expression's data.
fn counter_values(data: &[u8]) -> (u64, u64) {
    let get = |kind| Attrs::new(data).get(kind).and_then(be64).unwrap_or(0);
    (get(sys::NFTA_COUNTER_PACKETS), get(sys::NFTA_COUNTER_BYTES))
}

/// The cgroup levels the output chain has a `socket cgroupv2 level L` rule for.
pub(crate) fn installed_levels(table: &str) -> Result<BTreeSet<u32>, NetfilterError> {
    let mut levels = BTreeSet::new();
    for_each_rule_expr(table, OUTPUT_CHAIN, |name, data| {
        let key = Attrs::new(data).get(sys::NFTA_SOCKET_KEY).and_then(be32);
        if name == b"socket" && key == Some(sys::NFT_SOCKET_CGROUPV2) {
            if let Some(level) = Attrs::new(data).get(sys::NFTA_SOCKET_LEVEL).and_then(be32) {
                levels.insert(level);
            }
        }
    })?;
    Ok(levels)
}

pub(crate) fn drop_counters(table: &str) -> Result<DropCounters, NetfilterError> {
    let mut counters = DropCounters::default();
    for_each_rule_expr(table, AGENT_CHAIN, |name, data| {
        if name == b"counter" {
            let (packets, bytes) = counter_values(data);
            counters.packets += packets;
            counters.bytes += bytes;
        }
    })?;
    for (set, addr_len) in [(DROPPED_V4_SET, 4), (DROPPED_V6_SET, 16)] {
        dropped_destinations(table, set, addr_len, &mut counters.by_udp_destination)?;
    }
    counters
        .by_udp_destination
        .sort_by(|a, b| b.packets.cmp(&a.packets).then(a.addr.cmp(&b.addr)));
    Ok(counters)
}

/// Calls `each(element)` for every element of a set.
fn for_each_set_element(
    table: &str,
    set: &str,
    each: impl FnMut(&[u8]),
) -> Result<(), NetfilterError> {
    let listing = Listing {
        request: sys::NFT_MSG_GETSETELEM,
        reply: sys::NFT_MSG_NEWSETELEM,
        names: [
            (sys::NFTA_SET_ELEM_LIST_TABLE, table.to_string()),
            (sys::NFTA_SET_ELEM_LIST_SET, set.to_string()),
        ],
        list: sys::NFTA_SET_ELEM_LIST_ELEMENTS,
        what: format!("listing of set {set} in table inet {table}"),
    };
    for_each_listed(listing, each)
}

fn dropped_destinations(
    table: &str,
    set: &str,
    addr_len: usize,
    out: &mut Vec<DroppedDestination>,
) -> Result<(), NetfilterError> {
    for_each_set_element(table, set, |element| {
        if let Some(entry) = dropped_destination(element, addr_len) {
            out.push(entry);
        }
    })
}

/// The cgroup ids in the agents set (host-order u64 keys).
pub(crate) fn agent_ids(table: &str) -> Result<Vec<u64>, NetfilterError> {
    let mut ids = Vec::new();
    for_each_set_element(table, AGENTS_SET, |element| {
        let id = Attrs::new(element)
            .get(sys::NFTA_SET_ELEM_KEY)
            .and_then(|key| Attrs::new(key).get(sys::NFTA_DATA_VALUE))
            .and_then(|v| <[u8; 8]>::try_from(v.get(..8)?).ok())
            .map(u64::from_ne_bytes);
        if let Some(id) = id {
            ids.push(id);
        }
    })?;
    Ok(ids)
}

/// One element of a dropped set: key `address . port` and its counter.
fn dropped_destination(element: &[u8], addr_len: usize) -> Option<DroppedDestination> {
    let key = Attrs::new(element).get(sys::NFTA_SET_ELEM_KEY)?;
    let key = Attrs::new(key).get(sys::NFTA_DATA_VALUE)?;
    let addr = match addr_len {
        4 => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(key.get(..4)?).ok()?)),
        _ => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(key.get(..16)?).ok()?)),
    };
    let port = u16::from_be_bytes(key.get(addr_len..addr_len + 2)?.try_into().ok()?);
    // One expression (NFTA_SET_ELEM_EXPR) or a list of them, depending on the kernel.
    let single = Attrs::new(element).get(sys::NFTA_SET_ELEM_EXPR);
    let listed = Attrs::new(element)
        .get(sys::NFTA_SET_ELEM_EXPRESSIONS)
        .into_iter()
        .flat_map(|list| Attrs::new(list).map(|(_, expr)| expr));
    let (packets, bytes) = single
        .into_iter()
        .chain(listed)
        .map(expr_parts)
        .find(|(name, _)| *name == b"counter")
        .map(|(_, data)| counter_values(data))
        .unwrap_or((0, 0));
    Some(DroppedDestination {
        addr: SocketAddr::new(addr, port),
        packets,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::encode::MessageWriter;

    /// Builds attribute bytes with the real encoder and strips the message headers.
    fn attrs(build: impl FnOnce(&mut MessageWriter)) -> Vec<u8> {
        let mut w = MessageWriter::nft(0, 0, 0);
        build(&mut w);
        w.finish("test").unwrap().split_off(20)
    }

    #[test]
    fn reads_a_dropped_v6_element_with_its_counter() {
        let addr: Ipv6Addr = "2001:db8::5".parse().unwrap();
        let element = attrs(|w| {
            w.nest(sys::NFTA_SET_ELEM_KEY, |w| {
                let mut key = addr.octets().to_vec();
                key.extend_from_slice(&[0x01, 0xbb, 0, 0]);
                w.put(sys::NFTA_DATA_VALUE, &key);
            });
            w.nest(sys::NFTA_SET_ELEM_EXPRESSIONS, |w| {
                w.nest(sys::NFTA_LIST_ELEM, |w| {
                    w.put_str(sys::NFTA_EXPR_NAME, "counter");
                    w.nest(sys::NFTA_EXPR_DATA, |w| {
                        w.put_u64(sys::NFTA_COUNTER_BYTES, 300);
                        w.put_u64(sys::NFTA_COUNTER_PACKETS, 3);
                    });
                });
            });
        });
        assert_eq!(
            dropped_destination(&element, 16),
            Some(DroppedDestination {
                addr: "[2001:db8::5]:443".parse().unwrap(),
                packets: 3,
                bytes: 300,
            })
        );
    }

    #[test]
    fn element_with_short_key_is_skipped() {
        let element = attrs(|w| w.put_data(sys::NFTA_SET_ELEM_KEY, &[1, 2, 3]));
        assert_eq!(dropped_destination(&element, 4), None);
    }
}
