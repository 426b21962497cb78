//! Our table as batches of messages: what `install`, `remove`, `add_cgroups`,
//! `remove_cgroups` and the kernel probe send.
//!
//! ```text
//! table inet agent_egress {
//!   set agents      { type cgroupsv2 }                      # members: agents' cgroup ids
//!   set dropped_v4  { type ipv4_addr . inet_service; size 4096; flags dynamic,timeout; timeout 1h }
//!   set dropped_v6  { type ipv6_addr . inet_service; ... }
//!   chain output { type route hook output priority mangle; policy accept;
//!     ct direction original ct mark MARK meta mark set MARK accept  # a captured flow's later packets
//!     socket cgroupv2 level L @agents udp dport 53 goto agent_traffic  # dns.capture, per level
//!     ip(6) daddr 127.0.0.0/8|::1 meta l4proto != tcp accept  # loopback: TCP is decided
//!     ip(6) daddr 127.0.0.0/8|::1 tcp dport 53 accept        # a loopback resolver (no dns.capture)
//!     ip(6) daddr 127.0.0.0/8|::1 ct direction reply accept  # an agent's listener answering
//!     ip(6) daddr <bypass CIDR> accept                      # one rule each
//!     ip(6) daddr <dns> udp|tcp dport 53 accept             # the resolvers, direct (no dns.capture)
//!     socket cgroupv2 level L @agents goto agent_traffic    # one rule per level in use
//!   }
//!   chain agent_traffic {
//!     meta l4proto tcp meta mark set MARK ct mark set meta mark accept  # to lo, then tproxy'd
//!     udp dport 53 meta mark set MARK ct mark set meta mark accept      # dns.capture
//!     meta nfproto ipv4 meta l4proto udp update @dropped_v4 { ip daddr . udp dport counter }
//!     meta nfproto ipv6 meta l4proto udp update @dropped_v6 { ip6 daddr . udp dport counter }
//!     counter drop                                          # everything else of agents
//!   }
//!   chain prerouting { type filter hook prerouting priority mangle; policy accept;
//!     meta l4proto tcp meta mark MARK socket transparent 1 accept
//!     meta l4proto tcp meta mark MARK tcp dport 53 tproxy to :DNS_PORT accept  # dns.capture
//!     meta l4proto tcp meta mark MARK tproxy to :PORT accept
//!     meta l4proto tcp meta mark MARK reject with tcp reset # proxy down: refuse, not hang
//!     meta l4proto udp meta mark MARK tproxy to :DNS_PORT accept  # dns.capture
//!     meta l4proto udp meta mark MARK counter reject        # handler down: never delivered
//!   }
//!   chain postrouting { type filter hook postrouting priority mangle; policy accept;
//!     meta mark MARK oif != lo counter drop                 # a socket bound to a device
//!   }
//! }
//! ```

use super::batch::Batch;
use super::decode;
use super::encode::{DynamicSet, Expr, Message, Rule, SetSpec, Verdict};
use super::{CgroupMatch, NetfilterError, TablePlan, AGENTS_SET};
use rustables::data_type::DataType;
use rustables::set::SetBuilder;
use rustables::sys;
use rustables::{Chain, ChainPolicy, ChainType, Hook, HookClass, MsgType, ProtocolFamily, Table};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub(crate) const OUTPUT_CHAIN: &str = "output";
pub(crate) const AGENT_CHAIN: &str = "agent_traffic";
pub(crate) const PREROUTING_CHAIN: &str = "prerouting";
pub(crate) const POSTROUTING_CHAIN: &str = "postrouting";
pub(crate) const DROPPED_V4_SET: &str = "dropped_v4";
pub(crate) const DROPPED_V6_SET: &str = "dropped_v6";

/// The kernel gives `lo` this ifindex in every network namespace (LOOPBACK_IFINDEX).
const LOOPBACK_IFINDEX: u32 = 1;
/// nft's `priority mangle`.
const PRIORITY_MANGLE: i32 = -150;
/// nft data type ids (src/datatype.h): concatenations are `(a << 6) | b`.
const TYPE_IPV4_ADDR: u32 = 7;
const TYPE_IPV6_ADDR: u32 = 8;
const TYPE_INET_SERVICE: u32 = 13;
const TYPE_CGROUPSV2: u32 = 46;
const CONCAT_SHIFT: u32 = 6;
/// Bounds the per-destination drop accounting.
const DROPPED_SET_SIZE: u32 = 4096;
const DROPPED_TIMEOUT_MS: u64 = 3_600_000;
/// rustables writes nest lengths as u16: 512 elements of 20 bytes stay well below.
const ELEMENTS_PER_MESSAGE: usize = 512;

const IPPROTO_TCP: u8 = libc::IPPROTO_TCP as u8;
/// `enum ip_conntrack_dir`: the direction of the flow's first packet.
const IP_CT_DIR_ORIGINAL: u8 = 0;
const IP_CT_DIR_REPLY: u8 = 1;
const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;
const DNS_PORT: u16 = 53;

const HINT_SOCKET: &str = "is nft_socket loaded? modprobe nft_socket";
const HINT_TPROXY: &str =
    "is nft_tproxy loaded? modprobe nft_tproxy (it pulls in nf_tproxy_ipv4 and nf_tproxy_ipv6)";
const HINT_REJECT: &str = "is nft_reject_inet loaded? modprobe nft_reject_inet";
const HINT_CT: &str = "is nft_ct loaded? modprobe nft_ct (it pulls in nf_conntrack)";

/// A cgroup v2 id as nft's `cgroupsv2` type: the cgroup directory's inode number, in
/// host byte order as `socket cgroupv2` loads it.
struct CgroupId(u64);

impl DataType for CgroupId {
    const TYPE: u32 = TYPE_CGROUPSV2;
    const LEN: u32 = 8;

    fn data(&self) -> Vec<u8> {
        self.0.to_ne_bytes().to_vec()
    }
}

/// Collects rustables objects and takes back their messages one by one: rustables can
/// only serialise a whole batch, which this module sends itself.
struct ViaRustables {
    batch: rustables::Batch,
    labels: Vec<String>,
}

impl ViaRustables {
    fn new() -> Self {
        ViaRustables {
            batch: rustables::Batch::new(),
            labels: Vec::new(),
        }
    }

    /// `fill` must add exactly one object to the rustables batch.
    fn add(&mut self, label: String, fill: impl FnOnce(&mut rustables::Batch)) {
        fill(&mut self.batch);
        self.labels.push(label);
    }

    fn finish(self) -> Result<Vec<Message>, NetfilterError> {
        let bytes = self.batch.finalize();
        let messages = decode::messages(&bytes)?;
        // rustables frames its messages with BATCH_BEGIN and BATCH_END; ours are made anew.
        let inner = messages
            .get(1..messages.len().saturating_sub(1))
            .unwrap_or(&[]);
        if inner.len() != self.labels.len() {
            return Err(NetfilterError::Protocol(format!(
                "rustables produced {} messages for {} objects",
                inner.len(),
                self.labels.len()
            )));
        }
        Ok(inner
            .iter()
            .zip(self.labels)
            .map(|(msg, label)| Message::new(msg.raw.to_vec(), label))
            .collect())
    }
}

fn inet_table(name: &str) -> Table {
    Table::new(ProtocolFamily::Inet).with_name(name)
}

/// Table (atomic replace: add, delete, add), chains, sets, initial agents, rules.
pub(crate) fn install_batch(plan: &TablePlan) -> Result<Batch, NetfilterError> {
    let table = inet_table(&plan.table);
    let mut objects = ViaRustables::new();
    // Adding first makes the delete succeed whether or not the table existed; the
    // second add starts the table afresh. All in one transaction.
    objects.add(format!("table inet {}", plan.table), |b| {
        b.add(&table, MsgType::Add)
    });
    objects.add(
        format!("deletion of the old table inet {}", plan.table),
        |b| b.add(&table, MsgType::Del),
    );
    objects.add(format!("table inet {}", plan.table), |b| {
        b.add(&table, MsgType::Add)
    });
    let chains = [
        Chain::new(&table)
            .with_name(OUTPUT_CHAIN)
            .with_hook(Hook::new(HookClass::Out, PRIORITY_MANGLE))
            .with_type(ChainType::Route)
            .with_policy(ChainPolicy::Accept),
        Chain::new(&table).with_name(AGENT_CHAIN),
        Chain::new(&table)
            .with_name(PREROUTING_CHAIN)
            .with_hook(Hook::new(HookClass::PreRouting, PRIORITY_MANGLE))
            .with_type(ChainType::Filter)
            .with_policy(ChainPolicy::Accept),
        Chain::new(&table)
            .with_name(POSTROUTING_CHAIN)
            .with_hook(Hook::new(HookClass::PostRouting, PRIORITY_MANGLE))
            .with_type(ChainType::Filter)
            .with_policy(ChainPolicy::Accept),
    ];
    for chain in &chains {
        let name = chain.get_name().cloned().unwrap_or_default();
        objects.add(format!("chain {name}"), |b| b.add(chain, MsgType::Add));
    }

    let mut batch = Batch::default();
    batch.messages.extend(objects.finish()?);
    for set in sets() {
        batch.push(set.message(&plan.table)?);
    }
    batch
        .messages
        .extend(element_messages(&plan.table, &plan.cgroups, MsgType::Add)?);
    for rule in rules(plan) {
        batch.push(rule.message(&plan.table)?);
    }
    Ok(batch)
}

/// Deletes the table; adding it first makes a missing table no error.
pub(crate) fn remove_batch(table_name: &str) -> Result<Batch, NetfilterError> {
    let table = inet_table(table_name);
    let mut objects = ViaRustables::new();
    objects.add(format!("table inet {table_name}"), |b| {
        b.add(&table, MsgType::Add)
    });
    objects.add(format!("deletion of table inet {table_name}"), |b| {
        b.add(&table, MsgType::Del)
    });
    Ok(Batch {
        messages: objects.finish()?,
    })
}

/// The whole install batch for `plan`, then two deletions of its table: the second must
/// be refused (the table is gone by then), so the kernel checks every message and then
/// aborts the batch. Used to find out whether the kernel supports the ruleset.
pub(crate) fn probe_batch(plan: &TablePlan) -> Result<Batch, NetfilterError> {
    let mut batch = install_batch(plan)?;
    let table = inet_table(&plan.table);
    let mut objects = ViaRustables::new();
    for _ in 0..2 {
        objects.add(
            format!("deletion of probe table inet {}", plan.table),
            |b| b.add(&table, MsgType::Del),
        );
    }
    batch.messages.extend(objects.finish()?);
    Ok(batch)
}

/// NEWSETELEM (or DELSETELEM) messages for the agents set, in chunks.
pub(crate) fn element_messages(
    table_name: &str,
    ids: &[CgroupMatch],
    op: MsgType,
) -> Result<Vec<Message>, NetfilterError> {
    let table = inet_table(table_name);
    let verb = match op {
        MsgType::Add => "addition",
        MsgType::Del => "deletion",
    };
    let mut objects = ViaRustables::new();
    for chunk in ids.chunks(ELEMENTS_PER_MESSAGE) {
        let mut builder = SetBuilder::<CgroupId>::new(AGENTS_SET, &table)
            .map_err(|e| NetfilterError::InvalidPlan(format!("set {AGENTS_SET}: {e:?}")))?;
        for id in chunk {
            builder.add(&CgroupId(id.id));
        }
        let (_, elements) = builder.finish();
        let first = chunk.first().map(|c| c.id).unwrap_or_default();
        objects.add(
            format!(
                "{verb} of {} cgroup id(s) (first {first}) in set {AGENTS_SET}",
                chunk.len()
            ),
            |b| b.add(&elements, op),
        );
    }
    objects.finish()
}

fn sets() -> [SetSpec; 3] {
    let dynamic = || {
        Some(DynamicSet {
            size: DROPPED_SET_SIZE,
            timeout_ms: DROPPED_TIMEOUT_MS,
        })
    };
    [
        SetSpec {
            name: AGENTS_SET,
            key_type: TYPE_CGROUPSV2,
            key_len: 8,
            key_host_order: true,
            id: 1,
            dynamic: None,
        },
        SetSpec {
            name: DROPPED_V4_SET,
            key_type: (TYPE_IPV4_ADDR << CONCAT_SHIFT) | TYPE_INET_SERVICE,
            // address, then the port padded to a 4-byte register
            key_len: 4 + 4,
            key_host_order: false,
            id: 2,
            dynamic: dynamic(),
        },
        SetSpec {
            name: DROPPED_V6_SET,
            key_type: (TYPE_IPV6_ADDR << CONCAT_SHIFT) | TYPE_INET_SERVICE,
            key_len: 16 + 4,
            key_host_order: false,
            id: 3,
            dynamic: dynamic(),
        },
    ]
}

/// Rule order within each chain matters; see the module comment.
fn rules(plan: &TablePlan) -> Vec<Rule> {
    // The kernel answers for a flow also without a full socket (a closed
    // socket's ACKs and resets come from its timewait or request socket),
    // which `socket cgroupv2` cannot match: the flow's conntrack mark,
    // saved at its first packet, keeps every later one captured. Only the
    // agent's direction: the proxy's replies to the agent are the same
    // flow's other direction, and marked they would be tproxy'd again.
    let mut captured_flow = Rule::new(
        OUTPUT_CHAIN,
        "captured flow",
        [
            vec![
                Expr::Ct(sys::NFT_CT_DIRECTION),
                Expr::Cmp(vec![IP_CT_DIR_ORIGINAL]),
                Expr::Ct(sys::NFT_CT_MARK),
                Expr::Cmp(plan.mark.to_ne_bytes().to_vec()),
            ],
            set_mark(plan.mark),
            accept(),
        ]
        .concat(),
    );
    captured_flow.hint = Some(HINT_CT.into());
    let mut rules = vec![captured_flow];
    let levels: BTreeSet<u32> = plan.cgroups.iter().map(|c| c.level).collect();
    // Before anything lets DNS through: a loopback resolver is no way around.
    if plan.dns_port.is_some() {
        rules.extend(levels.iter().map(|level| level_dns_rule(*level)));
    }
    rules.extend(loopback_rules(plan.dns_port.is_some()));
    for (net, prefix) in &plan.bypass {
        rules.push(Rule::new(
            OUTPUT_CHAIN,
            format!("bypass {net}/{prefix}"),
            [daddr_in(*net, *prefix), accept()].concat(),
        ));
    }
    let direct_dns = if plan.dns_port.is_some() {
        &[][..]
    } else {
        &plan.dns_servers[..]
    };
    for server in direct_dns {
        for (proto, proto_name) in [(IPPROTO_UDP, "udp"), (IPPROTO_TCP, "tcp")] {
            rules.push(Rule::new(
                OUTPUT_CHAIN,
                format!("dns {server} {proto_name}"),
                [
                    daddr_in(*server, full_prefix(*server)),
                    l4proto(proto),
                    dport(DNS_PORT),
                    accept(),
                ]
                .concat(),
            ));
        }
    }
    rules.extend(levels.into_iter().map(level_rule));

    let mut to_proxy = Rule::new(
        AGENT_CHAIN,
        "agent tcp to proxy",
        [
            l4proto(IPPROTO_TCP),
            set_mark(plan.mark),
            vec![Expr::SetCt(sys::NFT_CT_MARK)],
            accept(),
        ]
        .concat(),
    );
    to_proxy.hint = Some(HINT_CT.into());
    rules.push(to_proxy);
    if plan.dns_port.is_some() {
        rules.push(Rule::new(
            AGENT_CHAIN,
            "agent dns to the handler",
            [
                l4proto(IPPROTO_UDP),
                dport(DNS_PORT),
                set_mark(plan.mark),
                vec![Expr::SetCt(sys::NFT_CT_MARK)],
                accept(),
            ]
            .concat(),
        ));
    }
    rules.push(dropped_udp_rule(
        DROPPED_V4_SET,
        libc::NFPROTO_IPV4 as u8,
        16,
        4,
    ));
    rules.push(dropped_udp_rule(
        DROPPED_V6_SET,
        libc::NFPROTO_IPV6 as u8,
        24,
        16,
    ));
    rules.push(Rule::new(
        AGENT_CHAIN,
        "drop agent non-tcp",
        vec![Expr::Counter, Expr::Verdict(Verdict::Drop)],
    ));

    let mut established = Rule::new(
        PREROUTING_CHAIN,
        "established to proxy",
        [
            l4proto(IPPROTO_TCP),
            mark_is(plan.mark),
            vec![
                Expr::Socket {
                    key: sys::NFT_SOCKET_TRANSPARENT,
                    level: None,
                },
                Expr::Cmp(vec![1]),
            ],
            accept(),
        ]
        .concat(),
    );
    established.hint = Some(HINT_SOCKET.into());
    let tproxy = tproxy_rule(
        "tproxy to proxy",
        plan.mark,
        l4proto(IPPROTO_TCP),
        plan.port,
    );
    let mut refuse = Rule::new(
        PREROUTING_CHAIN,
        "refuse when proxy down",
        [
            l4proto(IPPROTO_TCP),
            mark_is(plan.mark),
            vec![Expr::RejectTcpReset],
        ]
        .concat(),
    );
    refuse.hint = Some(HINT_REJECT.into());
    rules.push(established);
    // The agents' DNS over TCP (a resolver retrying a truncated answer) goes
    // to the DNS handler, on the same port as their UDP queries.
    if let Some(dns_port) = plan.dns_port {
        rules.push(tproxy_rule(
            "tproxy dns over tcp to the handler",
            plan.mark,
            [l4proto(IPPROTO_TCP), dport(DNS_PORT)].concat(),
            dns_port,
        ));
    }
    rules.extend([tproxy, refuse]);
    if let Some(dns_port) = plan.dns_port {
        let to_handler = tproxy_rule(
            "tproxy dns to the handler",
            plan.mark,
            l4proto(IPPROTO_UDP),
            dns_port,
        );
        // Handler down: never delivered where the agent sent it (a loopback
        // resolver would answer). Refused with ICMP, which the kernel sends
        // only from a local address: a query to a loopback resolver fails at
        // once, one to an off-host resolver times out.
        let mut unhandled = Rule::new(
            PREROUTING_CHAIN,
            "refuse dns when the handler is down",
            [
                l4proto(IPPROTO_UDP),
                mark_is(plan.mark),
                vec![Expr::Counter, Expr::RejectPortUnreachable],
            ]
            .concat(),
        );
        unhandled.hint = Some(HINT_REJECT.into());
        rules.extend([to_handler, unhandled]);
    }
    // Marked packets are routed to lo by the fwmark rule, but a socket bound to
    // a device (SO_BINDTODEVICE, unprivileged since Linux 5.7, or a scoped
    // fe80::%dev address) keeps its device whatever the route says.
    rules.push(Rule::new(
        POSTROUTING_CHAIN,
        "marked agent traffic off lo",
        [
            mark_is(plan.mark),
            vec![
                Expr::Meta(sys::NFT_META_OIF),
                Expr::CmpNe(LOOPBACK_IFINDEX.to_ne_bytes().to_vec()),
                Expr::Counter,
                Expr::Verdict(Verdict::Drop),
            ],
        ]
        .concat(),
    ));
    rules
}

/// What of the agents' traffic to loopback needs no proxy. Their TCP to a
/// listener on loopback is captured like any other (the proxy decides it by
/// who listens); what passes here: their other protocols, DNS over TCP to a
/// loopback resolver, and the replies of an agent's own listener (the proxy
/// dialling it for another agent connection, or a local client outside the
/// agents), which are no connection the agent makes.
fn loopback_rules(dns_captured: bool) -> Vec<Rule> {
    let mut rules = Vec::new();
    for (net, prefix, family) in [
        (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8, "v4"),
        (IpAddr::V6(Ipv6Addr::LOCALHOST), 128, "v6"),
    ] {
        rules.push(Rule::new(
            OUTPUT_CHAIN,
            format!("loopback {family} not tcp"),
            [
                daddr_in(net, prefix),
                vec![
                    Expr::Meta(sys::NFT_META_L4PROTO),
                    Expr::CmpNe(vec![IPPROTO_TCP]),
                ],
                accept(),
            ]
            .concat(),
        ));
        // Captured, the agents' DNS over TCP goes to the DNS handler instead
        // (prerouting), a loopback resolver's too.
        if !dns_captured {
            rules.push(Rule::new(
                OUTPUT_CHAIN,
                format!("loopback {family} dns over tcp"),
                [
                    daddr_in(net, prefix),
                    l4proto(IPPROTO_TCP),
                    dport(DNS_PORT),
                    accept(),
                ]
                .concat(),
            ));
        }
        let mut replies = Rule::new(
            OUTPUT_CHAIN,
            format!("loopback {family} replies"),
            [
                daddr_in(net, prefix),
                vec![
                    Expr::Ct(sys::NFT_CT_DIRECTION),
                    Expr::Cmp(vec![IP_CT_DIR_REPLY]),
                ],
                accept(),
            ]
            .concat(),
        );
        replies.hint = Some(HINT_CT.into());
        rules.push(replies);
    }
    rules
}

/// `<matches> meta mark MARK tproxy to :PORT accept` in prerouting.
fn tproxy_rule(name: &str, mark: u32, matches: Vec<Expr>, port: u16) -> Rule {
    let mut rule = Rule::new(
        PREROUTING_CHAIN,
        name,
        [
            matches,
            mark_is(mark),
            vec![Expr::Immediate(port.to_be_bytes().to_vec()), Expr::Tproxy],
            accept(),
        ]
        .concat(),
    );
    rule.hint = Some(HINT_TPROXY.into());
    rule
}

/// `socket cgroupv2 level L @agents meta l4proto udp udp dport 53 goto agent_traffic`.
fn level_dns_rule(level: u32) -> Rule {
    let mut rule = level_rule(level);
    rule.name = format!("agents' dns at cgroup level {level}");
    let verdict = rule.exprs.pop();
    rule.exprs
        .extend([l4proto(IPPROTO_UDP), dport(DNS_PORT)].concat());
    rule.exprs.extend(verdict);
    rule
}

/// `socket cgroupv2 level L @agents goto agent_traffic`: sockets whose cgroup ancestor
/// at depth L is an agent.
pub(crate) fn level_rule(level: u32) -> Rule {
    let mut rule = Rule::new(
        OUTPUT_CHAIN,
        format!("agents at cgroup level {level}"),
        vec![
            Expr::Socket {
                key: sys::NFT_SOCKET_CGROUPV2,
                level: Some(level),
            },
            Expr::Lookup(AGENTS_SET.into()),
            Expr::Verdict(Verdict::Goto(AGENT_CHAIN.into())),
        ],
    );
    rule.hint = Some(format!(
        "the kernel takes cgroup levels up to 255; otherwise: {HINT_SOCKET}"
    ));
    rule
}

/// `meta nfproto F meta l4proto udp update @set { daddr . udp dport counter }`. A full
/// set makes the update fail and the rule end; the drop rule after it still counts.
fn dropped_udp_rule(set: &'static str, nfproto: u8, daddr_offset: u32, addr_len: u32) -> Rule {
    let key_start = sys::NFT_REG32_00;
    Rule::new(
        AGENT_CHAIN,
        format!("count dropped udp ({set})"),
        [
            vec![Expr::Meta(sys::NFT_META_NFPROTO), Expr::Cmp(vec![nfproto])],
            l4proto(IPPROTO_UDP),
            vec![
                Expr::Payload {
                    base: sys::NFT_PAYLOAD_NETWORK_HEADER,
                    offset: daddr_offset,
                    len: addr_len,
                    dreg: key_start,
                },
                // the port goes in the 32-bit register right after the address
                Expr::Payload {
                    base: sys::NFT_PAYLOAD_TRANSPORT_HEADER,
                    offset: 2,
                    len: 2,
                    dreg: key_start + addr_len / 4,
                },
                Expr::UpdateCounted {
                    set: set.into(),
                    sreg: key_start,
                },
            ],
        ]
        .concat(),
    )
}

pub(crate) fn full_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

fn accept() -> Vec<Expr> {
    vec![Expr::Verdict(Verdict::Accept)]
}

fn l4proto(proto: u8) -> Vec<Expr> {
    vec![Expr::Meta(sys::NFT_META_L4PROTO), Expr::Cmp(vec![proto])]
}

fn dport(port: u16) -> Vec<Expr> {
    vec![
        Expr::Payload {
            base: sys::NFT_PAYLOAD_TRANSPORT_HEADER,
            offset: 2,
            len: 2,
            dreg: sys::NFT_REG_1,
        },
        Expr::Cmp(port.to_be_bytes().to_vec()),
    ]
}

fn mark_is(mark: u32) -> Vec<Expr> {
    vec![
        Expr::Meta(sys::NFT_META_MARK),
        Expr::Cmp(mark.to_ne_bytes().to_vec()),
    ]
}

fn set_mark(mark: u32) -> Vec<Expr> {
    vec![
        Expr::Immediate(mark.to_ne_bytes().to_vec()),
        Expr::SetMeta(sys::NFT_META_MARK),
    ]
}

/// `ip daddr net/prefix` or `ip6 daddr net/prefix` (bits past the prefix are ignored).
/// The prefix must be valid for the family (checked by `TablePlan` validation).
fn daddr_in(net: IpAddr, prefix: u8) -> Vec<Expr> {
    let (nfproto, offset, bytes) = match net {
        IpAddr::V4(a) => (libc::NFPROTO_IPV4, 16, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::NFPROTO_IPV6, 24, a.octets().to_vec()),
    };
    let mask = prefix_mask(bytes.len(), prefix);
    let mut exprs = vec![
        Expr::Meta(sys::NFT_META_NFPROTO),
        Expr::Cmp(vec![nfproto as u8]),
        Expr::Payload {
            base: sys::NFT_PAYLOAD_NETWORK_HEADER,
            offset,
            len: bytes.len() as u32,
            dreg: sys::NFT_REG_1,
        },
    ];
    if mask.iter().any(|b| *b != 0xff) {
        exprs.push(Expr::Mask(mask.clone()));
    }
    exprs.push(Expr::Cmp(
        bytes.iter().zip(&mask).map(|(b, m)| b & m).collect(),
    ));
    exprs
}

fn prefix_mask(len: usize, prefix: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let bits = (usize::from(prefix)).saturating_sub(i * 8).min(8);
            // bits is 0..=8: shift in u16 so 8 does not overflow
            (0xff00u16 >> bits) as u8
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::decode::NftMessage;

    fn plan() -> TablePlan {
        TablePlan {
            table: "t".into(),
            mark: 0x100,
            port: 15001,
            cgroups: vec![
                CgroupMatch { id: 7, level: 2 },
                CgroupMatch { id: 8, level: 1 },
                CgroupMatch { id: 9, level: 2 },
            ],
            dns_servers: vec!["192.0.2.53".parse().unwrap()],
            bypass: vec![("2001:db8::".parse().unwrap(), 32)],
            dns_port: None,
        }
    }

    fn names(rules: &[Rule], chain: &str) -> Vec<String> {
        rules
            .iter()
            .filter(|r| r.chain == chain)
            .map(|r| r.name.clone())
            .collect()
    }

    #[test]
    fn output_chain_skips_before_matching_agents_once_per_level() {
        let rules = rules(&plan());
        assert_eq!(
            names(&rules, OUTPUT_CHAIN),
            [
                "captured flow",
                "loopback v4 not tcp",
                "loopback v4 dns over tcp",
                "loopback v4 replies",
                "loopback v6 not tcp",
                "loopback v6 dns over tcp",
                "loopback v6 replies",
                "bypass 2001:db8::/32",
                "dns 192.0.2.53 udp",
                "dns 192.0.2.53 tcp",
                "agents at cgroup level 1",
                "agents at cgroup level 2",
            ]
        );
        assert_eq!(
            names(&rules, PREROUTING_CHAIN),
            [
                "established to proxy",
                "tproxy to proxy",
                "refuse when proxy down"
            ]
        );
        assert_eq!(
            names(&rules, AGENT_CHAIN).last().map(String::as_str),
            Some("drop agent non-tcp")
        );
    }

    /// DNS captured: the agents' port 53 is taken before any rule lets DNS
    /// through, and handed to the handler over UDP and TCP.
    #[test]
    fn captured_dns_goes_to_the_handler_before_anything_lets_it_through() {
        let mut captured = plan();
        captured.dns_port = Some(15053);
        let rules = rules(&captured);
        let output = names(&rules, OUTPUT_CHAIN);
        assert_eq!(
            output[..3],
            [
                "captured flow",
                "agents' dns at cgroup level 1",
                "agents' dns at cgroup level 2"
            ]
        );
        assert!(
            !output
                .iter()
                .any(|n| n.starts_with("dns ") || n.contains("dns over tcp")),
            "{output:?}"
        );
        assert_eq!(
            names(&rules, PREROUTING_CHAIN),
            [
                "established to proxy",
                "tproxy dns over tcp to the handler",
                "tproxy to proxy",
                "refuse when proxy down",
                "tproxy dns to the handler",
                "refuse dns when the handler is down"
            ]
        );
        assert!(names(&rules, AGENT_CHAIN).contains(&"agent dns to the handler".to_string()));
    }

    /// An agent's TCP to loopback is not let through: only its other
    /// protocols, DNS, and its listeners' replies are.
    #[test]
    fn loopback_passes_only_what_is_not_an_agent_tcp_connection() {
        let rules = rules(&plan());
        let loopback: Vec<&Rule> = rules
            .iter()
            .filter(|r| r.name.starts_with("loopback"))
            .collect();
        for rule in &loopback {
            let tcp_excluded = rule.exprs.windows(2).any(|w| {
                w == [
                    Expr::Meta(sys::NFT_META_L4PROTO),
                    Expr::CmpNe(vec![IPPROTO_TCP]),
                ]
            });
            let dns = rule
                .exprs
                .contains(&Expr::Cmp(DNS_PORT.to_be_bytes().to_vec()));
            let replies = rule.exprs.windows(2).any(|w| {
                w == [
                    Expr::Ct(sys::NFT_CT_DIRECTION),
                    Expr::Cmp(vec![IP_CT_DIR_REPLY]),
                ]
            });
            assert!(
                [tcp_excluded, dns, replies].iter().filter(|b| **b).count() == 1,
                "{}: {:?}",
                rule.name,
                rule.exprs
            );
        }
        assert_eq!(loopback.len(), 6);
    }

    #[test]
    fn tproxy_rule_loads_port_big_endian_and_accepts() {
        let rules = rules(&plan());
        let tproxy = rules.iter().find(|r| r.name == "tproxy to proxy").unwrap();
        let at = tproxy
            .exprs
            .iter()
            .position(|e| *e == Expr::Tproxy)
            .unwrap();
        assert_eq!(tproxy.exprs[at - 1], Expr::Immediate(vec![0x3a, 0x99]));
        assert_eq!(tproxy.exprs.last(), Some(&Expr::Verdict(Verdict::Accept)));
        assert!(tproxy
            .exprs
            .contains(&Expr::Cmp(0x100u32.to_ne_bytes().to_vec())));
    }

    #[test]
    fn prefix_masks() {
        assert_eq!(prefix_mask(4, 8), [0xff, 0, 0, 0]);
        assert_eq!(prefix_mask(4, 12), [0xff, 0xf0, 0, 0]);
        assert_eq!(prefix_mask(4, 32), [0xff; 4]);
        assert_eq!(prefix_mask(4, 0), [0; 4]);
    }

    #[test]
    fn daddr_masks_host_bits_and_skips_mask_for_full_prefix() {
        let exprs = daddr_in("10.1.2.3".parse().unwrap(), 8);
        assert_eq!(exprs.last(), Some(&Expr::Cmp(vec![10, 0, 0, 0])));
        assert!(exprs.contains(&Expr::Mask(vec![0xff, 0, 0, 0])));
        let exprs = daddr_in("192.0.2.53".parse().unwrap(), 32);
        assert!(!exprs.iter().any(|e| matches!(e, Expr::Mask(_))));
    }

    #[test]
    fn marked_packets_leaving_by_another_device_than_lo_are_dropped() {
        let rules = rules(&plan());
        assert_eq!(
            names(&rules, POSTROUTING_CHAIN),
            ["marked agent traffic off lo"]
        );
        let drop = rules.iter().find(|r| r.chain == POSTROUTING_CHAIN).unwrap();
        assert_eq!(
            drop.exprs,
            [
                mark_is(plan().mark),
                vec![
                    Expr::Meta(sys::NFT_META_OIF),
                    Expr::CmpNe(1u32.to_ne_bytes().to_vec()),
                    Expr::Counter,
                    Expr::Verdict(Verdict::Drop),
                ],
            ]
            .concat()
        );
    }

    #[test]
    fn install_batch_replaces_table_then_builds_it() {
        let batch = install_batch(&plan()).unwrap();
        let labels: Vec<&str> = batch.messages.iter().map(|m| m.label.as_str()).collect();
        assert_eq!(
            &labels[..10],
            [
                "table inet t",
                "deletion of the old table inet t",
                "table inet t",
                "chain output",
                "chain agent_traffic",
                "chain prerouting",
                "chain postrouting",
                "set agents",
                "set dropped_v4",
                "set dropped_v6",
            ]
        );
        assert_eq!(
            labels[10],
            "addition of 3 cgroup id(s) (first 7) in set agents"
        );
        // Every message is a well-formed nf_tables message of the inet family.
        for m in &batch.messages {
            let parsed = decode::messages(&m.bytes).unwrap();
            assert_eq!(parsed.len(), 1, "{}", m.label);
            assert_eq!(parsed[0].kind >> 8, sys::NFNL_SUBSYS_NFTABLES as u16);
            assert_eq!(parsed[0].family(), Some(libc::NFPROTO_INET as u8));
        }
    }

    #[test]
    fn cgroup_elements_are_host_order_and_chunked() {
        let ids: Vec<CgroupMatch> = (0..1000).map(|id| CgroupMatch { id, level: 1 }).collect();
        let msgs = element_messages("t", &ids, MsgType::Del).unwrap();
        assert_eq!(msgs.len(), 2);
        assert!(msgs[1]
            .label
            .starts_with("deletion of 488 cgroup id(s) (first 512)"));
        let one = element_messages(
            "t",
            &[CgroupMatch {
                id: 0x0102_0304_0506_0708,
                level: 1,
            }],
            MsgType::Add,
        )
        .unwrap();
        let needle = 0x0102_0304_0506_0708u64.to_ne_bytes();
        assert!(one[0].bytes.windows(8).any(|w| w == needle));
    }
}
