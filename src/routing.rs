//! Policy routing that delivers marked traffic to the local stack, so TPROXY can hand it
//! to our listener: for IPv4 and IPv6,
//! `ip rule add fwmark MARK lookup TABLE pref PRIO` and
//! `ip route add local default dev lo table TABLE`.
//!
//! Spoken synchronously over a plain NETLINK_ROUTE socket with the netlink packet crates
//! (rtnetlink itself needs an async runtime). Every request asks for an ack and every ack
//! is read, so a refusal names the operation that failed. All sockets are opened in the
//! network namespace of the calling thread.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use crate::netlink::{self, Monitor, RequestSocket, Wait, NLMSG_DONE, NLMSG_ERROR, NLMSG_OVERRUN};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;

/// What to install: marked packets look up `table`, whose only route delivers locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutePlan {
    /// Firewall mark set by our nftables rules (matched with a full mask).
    pub mark: u32,
    /// Routing table holding the `local default dev lo` routes.
    pub table: u32,
    /// Preference of the `ip rule`; must come before the `main` table's 32766.
    pub priority: u32,
}

/// Why routing could not be installed, removed or checked.
#[derive(Debug)]
pub enum RoutingError {
    /// The plan would break the host's routing (say, mark 0 or the main table).
    InvalidPlan(String),
    /// IPv6 is not available (kernel without IPv6, or IPv6 disabled on `lo`). The IPv4 half
    /// of the request has been carried out; the caller may go on IPv4-only.
    Ipv6Unavailable {
        operation: String,
        source: io::Error,
        detail: Option<String>,
    },
    /// The kernel refused a request, or the socket failed.
    Failed {
        operation: String,
        source: io::Error,
        detail: Option<String>,
    },
}

impl fmt::Display for RoutingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoutingError::InvalidPlan(reason) => write!(f, "invalid routing plan: {reason}"),
            RoutingError::Ipv6Unavailable {
                operation,
                source,
                detail,
            } => {
                write!(f, "{operation}: {source}")?;
                if let Some(detail) = detail {
                    write!(f, ": {detail}")?;
                }
                write!(f, " (IPv6 disabled?)")
            }
            RoutingError::Failed {
                operation,
                source,
                detail,
            } => {
                write!(f, "{operation}: {source}")?;
                match detail {
                    Some(detail) => write!(f, ": {detail}"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl std::error::Error for RoutingError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RoutingError::InvalidPlan(_) => None,
            RoutingError::Ipv6Unavailable { source, .. } | RoutingError::Failed { source, .. } => {
                Some(source)
            }
        }
    }
}

/// The kernel gives the loopback device this index in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
/// Tables the system owns: unspec, compat header value excluded, default, main, local.
const RESERVED_TABLES: [u32; 4] = [0, 253, 254, 255];
/// Header value meaning "see the table attribute" for table ids above 255.
const RT_TABLE_COMPAT: u8 = 252;
/// Preference of the `main` table's rule; ours must come first to take effect.
const MAIN_RULE_PRIORITY: u32 = 32766;
/// How long to wait for the kernel's answer before giving up.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound on messages accepted from one dump; ours are filtered down to a handful.
const MAX_DUMP_MESSAGES: usize = 100_000;
/// Upper bound on identical copies removed by one `remove` (duplicates left by others).
const MAX_DELETES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    const BOTH: [Family; 2] = [Family::V4, Family::V6];

    fn address_family(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }

    /// The `ip` command prefix, so errors read like the command a human would type.
    fn ip_command(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip -6",
        }
    }

    fn default_destination(self) -> &'static str {
        match self {
            Family::V4 => "0.0.0.0/0",
            Family::V6 => "::/0",
        }
    }
}

impl RoutePlan {
    /// Refuse plans that would reroute unmarked traffic or overwrite system tables.
    pub fn validate(&self) -> Result<(), RoutingError> {
        if self.mark == 0 {
            return Err(RoutingError::InvalidPlan(
                "mark 0 would match every unmarked packet".into(),
            ));
        }
        if RESERVED_TABLES.contains(&self.table) {
            return Err(RoutingError::InvalidPlan(format!(
                "table {} is reserved (0 unspec, 253 default, 254 main, 255 local)",
                self.table
            )));
        }
        if self.priority == 0 || self.priority >= MAIN_RULE_PRIORITY {
            return Err(RoutingError::InvalidPlan(format!(
                "rule priority {} must be between 1 and {} (before the main table)",
                self.priority,
                MAIN_RULE_PRIORITY - 1
            )));
        }
        Ok(())
    }

    fn describe_rule(&self, family: Family) -> String {
        format!(
            "{} rule fwmark {:#x} lookup {} pref {}",
            family.ip_command(),
            self.mark,
            self.table,
            self.priority
        )
    }

    fn describe_route(&self, family: Family) -> String {
        format!(
            "{} route local {} dev lo table {}",
            family.ip_command(),
            family.default_destination(),
            self.table
        )
    }

    fn header_table(&self) -> u8 {
        u8::try_from(self.table).unwrap_or(RT_TABLE_COMPAT)
    }

    fn rule_message(&self, family: Family) -> RuleMessage {
        let mut rule = RuleMessage::default();
        rule.header.family = family.address_family();
        rule.header.table = self.header_table();
        // The kernel refuses a new rule whose action is left unspecified.
        rule.header.action = RuleAction::ToTable;
        rule.attributes = vec![
            RuleAttribute::Priority(self.priority),
            RuleAttribute::FwMark(self.mark),
            RuleAttribute::FwMask(u32::MAX),
            RuleAttribute::Table(self.table),
        ];
        rule
    }

    fn route_message(&self, family: Family, for_delete: bool) -> RouteMessage {
        let mut route = RouteMessage::default();
        route.header.address_family = family.address_family();
        route.header.destination_prefix_length = 0;
        route.header.table = self.header_table();
        route.header.kind = RouteType::Local;
        if for_delete {
            // Scope "nowhere" and protocol unspec make the kernel match any scope/protocol.
            route.header.scope = RouteScope::NoWhere;
            route.header.protocol = RouteProtocol::Unspec;
        } else {
            route.header.scope = RouteScope::Host;
            route.header.protocol = RouteProtocol::Boot;
        }
        route.attributes = vec![
            RouteAttribute::Table(self.table),
            RouteAttribute::Oif(LOOPBACK_IFINDEX),
        ];
        route
    }

    fn is_our_rule(&self, rule: &RuleMessage) -> bool {
        let mut priority = None;
        let mut mark = None;
        let mut mask = u32::MAX;
        let mut table = u32::from(rule.header.table);
        for attribute in &rule.attributes {
            match attribute {
                RuleAttribute::Priority(p) => priority = Some(*p),
                RuleAttribute::FwMark(m) => mark = Some(*m),
                RuleAttribute::FwMask(m) => mask = *m,
                RuleAttribute::Table(t) => table = *t,
                // Any further selector narrows the rule: it is not the one we install.
                RuleAttribute::Iifname(_)
                | RuleAttribute::Oifname(_)
                | RuleAttribute::Source(_)
                | RuleAttribute::Destination(_)
                | RuleAttribute::IpProtocol(_)
                | RuleAttribute::SourcePortRange(_)
                | RuleAttribute::DestinationPortRange(_)
                | RuleAttribute::UidRange(_) => return false,
                _ => {}
            }
        }
        rule.header.action == RuleAction::ToTable
            && rule.header.src_len == 0
            && rule.header.dst_len == 0
            && priority == Some(self.priority)
            && mark == Some(self.mark)
            && mask == u32::MAX
            && table == self.table
    }

    fn is_our_route(&self, route: &RouteMessage) -> bool {
        let mut table = u32::from(route.header.table);
        let mut oif = None;
        for attribute in &route.attributes {
            match attribute {
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Oif(o) => oif = Some(*o),
                _ => {}
            }
        }
        route.header.kind == RouteType::Local
            && route.header.destination_prefix_length == 0
            && table == self.table
            && oif == Some(LOOPBACK_IFINDEX)
    }

    /// A deletion notice of something we install (the output device is not checked:
    /// any local default route leaving our table is worth a re-check).
    fn is_our_deleted_route(&self, route: &RouteMessage) -> bool {
        let table = route
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(route.header.table));
        route.header.kind == RouteType::Local
            && route.header.destination_prefix_length == 0
            && table == self.table
    }
}

/// Install both families, route before rule so marked traffic never meets a rule that
/// points at an empty table. Re-running is harmless: the route is replaced and an
/// identical rule is left alone (found in a dump, or refused with EEXIST by an exclusive
/// add), so rules never duplicate and are never briefly absent.
///
/// When IPv6 is unavailable, IPv4 is installed, any half-made IPv6 part is taken back,
/// and [`RoutingError::Ipv6Unavailable`] is returned.
pub fn install(plan: &RoutePlan) -> Result<(), RoutingError> {
    plan.validate()?;
    let mut socket = RouteSocket::open()?;
    for family in Family::BOTH {
        let result = install_family(&mut socket, plan, family);
        if let Err(RoutingError::Ipv6Unavailable { .. }) = &result {
            // Best effort: the half we could make is useless without the other half.
            if let Err(e) = remove_family(&mut socket, plan, family) {
                log::debug!("taking back partial IPv6 routing: {e}");
            }
        }
        result?;
    }
    Ok(())
}

fn install_family(
    socket: &mut RouteSocket,
    plan: &RoutePlan,
    family: Family,
) -> Result<(), RoutingError> {
    let operation = || format!("replacing {}", plan.describe_route(family));
    socket
        .request(
            RouteNetlinkMessage::NewRoute(plan.route_message(family, false)),
            NLM_F_CREATE | NLM_F_REPLACE,
        )
        .map_err(|f| f.into_error(operation(), family))?;

    // Older kernels ignore NLM_F_EXCL on rules and would add a duplicate.
    if rule_present(socket, plan, family)? {
        return Ok(());
    }
    let operation = || format!("adding {}", plan.describe_rule(family));
    match socket.request(
        RouteNetlinkMessage::NewRule(plan.rule_message(family)),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Ok(()) => Ok(()),
        Err(f) if f.errno() == Some(libc::EEXIST) => Ok(()),
        Err(f) => Err(f.into_error(operation(), family)),
    }
}

/// Remove both families, rule before route. What is absent is fine; IPv6 being
/// unavailable means there is nothing to remove there.
pub fn remove(plan: &RoutePlan) -> Result<(), RoutingError> {
    plan.validate()?;
    let mut socket = RouteSocket::open()?;
    for family in Family::BOTH {
        match remove_family(&mut socket, plan, family) {
            Err(RoutingError::Ipv6Unavailable { .. }) => {}
            result => result?,
        }
    }
    Ok(())
}

fn remove_family(
    socket: &mut RouteSocket,
    plan: &RoutePlan,
    family: Family,
) -> Result<(), RoutingError> {
    delete_all(
        socket,
        || RouteNetlinkMessage::DelRule(plan.rule_message(family)),
        format!("deleting {}", plan.describe_rule(family)),
        family,
    )?;
    delete_all(
        socket,
        || RouteNetlinkMessage::DelRoute(plan.route_message(family, true)),
        format!("deleting {}", plan.describe_route(family)),
        family,
    )
}

/// Delete until the kernel says there is nothing left (also clears duplicates).
fn delete_all(
    socket: &mut RouteSocket,
    message: impl Fn() -> RouteNetlinkMessage,
    operation: String,
    family: Family,
) -> Result<(), RoutingError> {
    for _ in 0..MAX_DELETES {
        match socket.request(message(), 0) {
            Ok(()) => {}
            // Rules answer ENOENT, IPv4 routes ESRCH, IPv6 routes ENOENT.
            Err(f) if matches!(f.errno(), Some(libc::ENOENT | libc::ESRCH)) => return Ok(()),
            Err(f) => return Err(f.into_error(operation, family)),
        }
    }
    Err(RoutingError::Failed {
        operation,
        source: io::Error::other(format!("still present after {MAX_DELETES} deletions")),
        detail: None,
    })
}

/// Whether both rules and both routes are in place.
///
/// With IPv6 unavailable: `Ok(false)` if the IPv4 part is incomplete, otherwise
/// [`RoutingError::Ipv6Unavailable`] (meaning "IPv4 complete, IPv6 off").
pub fn is_installed(plan: &RoutePlan) -> Result<bool, RoutingError> {
    plan.validate()?;
    let mut socket = RouteSocket::open()?;
    if !family_installed(&mut socket, plan, Family::V4)? {
        return Ok(false);
    }
    if family_installed(&mut socket, plan, Family::V6)? {
        return Ok(true);
    }
    match ipv6_off_reason() {
        Some(reason) => Err(RoutingError::Ipv6Unavailable {
            operation: format!("checking {}", plan.describe_route(Family::V6)),
            source: io::Error::other(reason),
            detail: None,
        }),
        None => Ok(false),
    }
}

/// Why IPv6 cannot carry our routes in the calling thread's namespace, if it cannot.
/// (The kernel answers IPv6 queries even where IPv6 routes cannot be added, so
/// `is_installed` asks the namespace's sysctls, which /proc shows per thread.)
fn ipv6_off_reason() -> Option<String> {
    if !Path::new("/proc/sys/net/ipv4").exists() {
        return None; // no /proc to ask
    }
    match std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Some("the kernel has no IPv6".into()),
        Ok(value) if value.trim() == "1" => {
            Some("IPv6 is disabled on lo (net.ipv6.conf.lo.disable_ipv6 = 1)".into())
        }
        _ => None,
    }
}

fn family_installed(
    socket: &mut RouteSocket,
    plan: &RoutePlan,
    family: Family,
) -> Result<bool, RoutingError> {
    Ok(rule_present(socket, plan, family)? && route_present(socket, plan, family)?)
}

fn rule_present(
    socket: &mut RouteSocket,
    plan: &RoutePlan,
    family: Family,
) -> Result<bool, RoutingError> {
    let mut query = RuleMessage::default();
    query.header.family = family.address_family();
    let rules = socket
        .dump(RouteNetlinkMessage::GetRule(query))
        .map_err(|f| f.into_error(format!("listing {} rules", family.ip_command()), family))?;
    Ok(rules.iter().any(|m| match m {
        RouteNetlinkMessage::NewRule(rule) => plan.is_our_rule(rule),
        _ => false,
    }))
}

fn route_present(
    socket: &mut RouteSocket,
    plan: &RoutePlan,
    family: Family,
) -> Result<bool, RoutingError> {
    // The kernel filters the dump by table, type and device (strict checking).
    let mut query = RouteMessage::default();
    query.header.address_family = family.address_family();
    query.header.table = plan.header_table();
    query.header.kind = RouteType::Local;
    query.attributes = vec![
        RouteAttribute::Table(plan.table),
        RouteAttribute::Oif(LOOPBACK_IFINDEX),
    ];
    let routes = match socket.dump(RouteNetlinkMessage::GetRoute(query)) {
        Ok(routes) => routes,
        // A table that does not exist yet holds no routes.
        Err(f) if f.errno() == Some(libc::ENOENT) => Vec::new(),
        Err(f) => {
            let operation = format!(
                "listing {} routes of table {}",
                family.ip_command(),
                plan.table
            );
            return Err(f.into_error(operation, family));
        }
    };
    Ok(routes.iter().any(|m| match m {
        RouteNetlinkMessage::NewRoute(route) => plan.is_our_route(route),
        _ => false,
    }))
}

/// What went wrong talking to the kernel, before we know which operation to blame.
#[derive(Debug)]
struct Failure {
    source: io::Error,
    /// The kernel's extended-ack text, when it gave one.
    detail: Option<String>,
}

impl Failure {
    fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }

    fn into_error(self, operation: String, family: Family) -> RoutingError {
        // EAFNOSUPPORT: no IPv6 in the kernel; EACCES: IPv6 disabled on the device.
        let ipv6_off =
            family == Family::V6 && matches!(self.errno(), Some(libc::EAFNOSUPPORT | libc::EACCES));
        if ipv6_off {
            RoutingError::Ipv6Unavailable {
                operation,
                source: self.source,
                detail: self.detail,
            }
        } else {
            RoutingError::Failed {
                operation,
                source: self.source,
                detail: self.detail,
            }
        }
    }
}

impl From<io::Error> for Failure {
    fn from(source: io::Error) -> Self {
        Failure {
            source,
            detail: None,
        }
    }
}

fn malformed(what: impl Into<String>) -> Failure {
    Failure::from(io::Error::new(io::ErrorKind::InvalidData, what.into()))
}

fn malformed_netlink(e: netlink::Malformed) -> Failure {
    malformed(e.0)
}

/// The refusal an ack carries, if any.
fn refusal(ack: netlink::Ack) -> Result<(), Failure> {
    if ack.errno == 0 {
        return Ok(());
    }
    Err(Failure {
        source: io::Error::from_raw_os_error(ack.errno),
        detail: ack.message,
    })
}

/// One request/answer conversation with the kernel's routing netlink.
struct RouteSocket {
    socket: RequestSocket,
    buffer: Vec<u8>,
}

impl RouteSocket {
    fn open() -> Result<Self, RoutingError> {
        Self::try_open().map_err(|source| RoutingError::Failed {
            operation: "opening a NETLINK_ROUTE socket".into(),
            source,
            detail: None,
        })
    }

    fn try_open() -> io::Result<Self> {
        let mut socket = RequestSocket::open(NETLINK_ROUTE, Wait::Upto(REPLY_TIMEOUT))?;
        // Lets the kernel filter route dumps by table; older kernels just ignore filters.
        if let Err(e) = socket.socket_mut().set_netlink_get_strict_chk(true) {
            log::debug!("netlink strict checking unavailable: {e}");
        }
        Ok(RouteSocket {
            socket,
            buffer: Vec::new(),
        })
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<u32, Failure> {
        let sequence = self.socket.next_seq();
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = sequence;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.socket.send(&bytes)?;
        Ok(sequence)
    }

    /// Send one request and wait for its ack.
    fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<(), Failure> {
        let sequence = self.send(message, flags | NLM_F_ACK)?;
        let mut outcome = None;
        loop {
            self.receive(sequence, |reply| {
                if let Reply::Ack(result) = reply {
                    outcome = Some(result);
                }
                Ok(())
            })?;
            if let Some(result) = outcome.take() {
                return result;
            }
        }
    }

    /// Send a dump request and collect every message up to NLMSG_DONE.
    fn dump(&mut self, message: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>, Failure> {
        let sequence = self.send(message, NLM_F_DUMP)?;
        let mut messages = Vec::new();
        let mut done = None;
        loop {
            self.receive(sequence, |reply| {
                match reply {
                    Reply::Message(m) if messages.len() < MAX_DUMP_MESSAGES => messages.push(m),
                    Reply::Message(_) => {
                        return Err(malformed(format!(
                            "dump has more than {MAX_DUMP_MESSAGES} entries"
                        )))
                    }
                    Reply::Ack(result) | Reply::Done(result) => done = Some(result),
                }
                Ok(())
            })?;
            if let Some(result) = done.take() {
                return result.map(|()| messages);
            }
        }
    }

    /// Read one datagram and hand each message answering `sequence` to `handle`.
    fn receive(
        &mut self,
        sequence: u32,
        mut handle: impl FnMut(Reply) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        self.socket.recv(&mut self.buffer)?;
        for message in netlink::messages(&self.buffer) {
            let message = message.map_err(malformed_netlink)?;
            if message.seq != sequence {
                continue; // a late answer to an earlier, abandoned request
            }
            let reply = match message.kind {
                NLMSG_ERROR => {
                    Reply::Ack(refusal(netlink::ack(&message).map_err(malformed_netlink)?))
                }
                NLMSG_DONE => Reply::Done(match netlink::done_errno(&message) {
                    0 => Ok(()),
                    errno => Err(io::Error::from_raw_os_error(errno).into()),
                }),
                NLMSG_OVERRUN => return Err(malformed("netlink overrun")),
                _ => match NetlinkMessage::<RouteNetlinkMessage>::deserialize(message.raw) {
                    Ok(NetlinkMessage {
                        payload: NetlinkPayload::InnerMessage(m),
                        ..
                    }) => Reply::Message(m),
                    Ok(_) => continue,
                    // A message we cannot decode is not one of ours; skip it.
                    Err(e) => {
                        log::debug!("skipping undecodable routing message: {e}");
                        continue;
                    }
                },
            };
            handle(reply)?;
        }
        Ok(())
    }
}

enum Reply {
    Message(RouteNetlinkMessage),
    Ack(Result<(), Failure>),
    Done(Result<(), Failure>),
}

/// Room for bursts (a `ip route flush` of a big table) before the kernel drops events.
const MONITOR_RECV_BUFFER: usize = 1 << 20;

/// Watches rule and route deletions in the calling thread's network namespace.
///
/// Poll [`RuleMonitor::as_raw_fd`] for readability, then call
/// [`RuleMonitor::read_events`]; `true` means something of ours may be gone and the
/// caller should re-install (which is idempotent).
pub struct RuleMonitor {
    plan: RoutePlan,
    monitor: Monitor,
}

impl RuleMonitor {
    pub fn new(plan: &RoutePlan) -> Result<Self, RoutingError> {
        plan.validate()?;
        let groups = [
            libc::RTNLGRP_IPV4_RULE,
            libc::RTNLGRP_IPV6_RULE,
            libc::RTNLGRP_IPV4_ROUTE,
            libc::RTNLGRP_IPV6_ROUTE,
        ];
        Monitor::subscribe(NETLINK_ROUTE, &groups, MONITOR_RECV_BUFFER)
            .map(|monitor| RuleMonitor {
                plan: *plan,
                monitor,
            })
            .map_err(|source| RoutingError::Failed {
                operation: "subscribing to routing rule and route events".into(),
                source,
                detail: None,
            })
    }

    /// Drain pending events. `Ok(true)` if one of our rules or routes was deleted, or
    /// if events were lost (the kernel's queue overflowed) so that cannot be ruled out.
    pub fn read_events(&mut self) -> Result<bool, RoutingError> {
        let plan = self.plan;
        self.monitor
            .drain(|datagram| deletes_ours(&plan, datagram))
            .map_err(|source| RoutingError::Failed {
                operation: "reading routing events".into(),
                source,
                detail: None,
            })
    }
}

/// Whether a datagram of routing events deletes one of our rules or routes (or
/// cannot be read, so that it might).
fn deletes_ours(plan: &RoutePlan, datagram: &[u8]) -> bool {
    netlink::messages(datagram).any(|message| {
        let Ok(message) = message else { return true };
        let kind = message.kind;
        if kind != libc::RTM_DELRULE && kind != libc::RTM_DELROUTE {
            return false;
        }
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(message.raw) {
            Ok(message) => match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRule(rule)) => {
                    plan.is_our_rule(&rule)
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(route)) => {
                    plan.is_our_deleted_route(&route)
                }
                _ => false,
            },
            // Cannot tell what was deleted: assume the worst.
            Err(_) => true,
        }
    })
}

impl AsRawFd for RuleMonitor {
    fn as_raw_fd(&self) -> RawFd {
        self.monitor.as_raw_fd()
    }
}

impl AsFd for RuleMonitor {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.monitor.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> RoutePlan {
        RoutePlan {
            mark: 0x1e9,
            table: 489,
            priority: 100,
        }
    }

    #[test]
    fn refuses_plans_that_break_host_routing() {
        for bad in [
            RoutePlan { mark: 0, ..plan() },
            RoutePlan {
                table: 254,
                ..plan()
            },
            RoutePlan { table: 0, ..plan() },
            RoutePlan {
                priority: 0,
                ..plan()
            },
            RoutePlan {
                priority: 32766,
                ..plan()
            },
        ] {
            assert!(matches!(bad.validate(), Err(RoutingError::InvalidPlan(_))));
        }
        plan().validate().unwrap();
    }

    #[test]
    fn ipv6_refusals_are_told_apart() {
        let failure = || Failure {
            source: io::Error::from_raw_os_error(libc::EAFNOSUPPORT),
            detail: None,
        };
        let op = || format!("adding {}", plan().describe_rule(Family::V6));
        let error = failure().into_error(op(), Family::V6);
        assert!(matches!(error, RoutingError::Ipv6Unavailable { .. }));
        let text = error.to_string();
        assert!(
            text.starts_with(
                "adding ip -6 rule fwmark 0x1e9 lookup 489 pref 100: Address family not supported"
            ),
            "{text}"
        );
        assert!(text.ends_with("(IPv6 disabled?)"), "{text}");
        let v4 = failure().into_error("x".into(), Family::V4);
        assert!(matches!(v4, RoutingError::Failed { .. }));
    }

    #[test]
    fn ack_with_kernel_message_is_a_failure_with_its_text() {
        let ack = netlink::Ack {
            seq: 1,
            errno: libc::EACCES,
            message: Some("IPv6 is disabled".into()),
            offset: None,
        };
        let failure = refusal(ack.clone()).unwrap_err();
        assert_eq!(failure.errno(), Some(libc::EACCES));
        assert_eq!(failure.detail.as_deref(), Some("IPv6 is disabled"));
        assert!(refusal(netlink::Ack { errno: 0, ..ack }).is_ok());
    }
}
