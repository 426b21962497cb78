//! The fixed addresses and names of the test world (TEST-NET ranges only).

use std::net::{Ipv4Addr, Ipv6Addr};

/// Agent side of the veth link.
pub const AGENT_LINK_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const AGENT_LINK_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// Internet side of the veth link: the agent netns' default gateway.
pub const NET_LINK_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const NET_LINK_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
/// Interface names inside the two namespaces (private to each netns, so fixed).
pub const AGENT_IFACE: &str = "to-net";
pub const NET_IFACE: &str = "to-agent";

/// The resolver agents may use (written into the agent netns' resolv.conf).
pub const DNS_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
/// A second resolver that answers the same, but that agents must NOT reach.
pub const FORBIDDEN_DNS_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 53);

/// A web server in the internet netns. Its nginx server block is bound to its own
/// addresses, so the body names the host whose *address* was reached, whatever the
/// SNI or Host header said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestHost {
    pub name: &'static str,
    pub v4: Ipv4Addr,
    pub v6: Option<Ipv6Addr>,
    /// Serves HTTPS on 443 as well as HTTP on 80.
    pub https: bool,
    /// The arrival counter of packets to this host's addresses (see `World::count_arrived`).
    pub counter: &'static str,
}

pub const ALLOWED: TestHost = TestHost {
    name: "allowed.test",
    v4: Ipv4Addr::new(198, 51, 100, 10),
    v6: Some(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10)),
    https: true,
    counter: "to_allowed",
};

pub const BLOCKED: TestHost = TestHost {
    name: "blocked.test",
    v4: Ipv4Addr::new(198, 51, 100, 20),
    v6: Some(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x20)),
    https: true,
    counter: "to_blocked",
};

/// IPv4 only: its AAAA query gets an empty NOERROR answer.
pub const OTHER: TestHost = TestHost {
    name: "other.test",
    v4: Ipv4Addr::new(203, 0, 113, 30),
    v6: None,
    https: true,
    counter: "to_other",
};

/// A cloud-metadata look-alike on 169.254.169.254:80 (HTTP only, no DNS name).
pub const METADATA: TestHost = TestHost {
    name: "metadata",
    v4: Ipv4Addr::new(169, 254, 169, 254),
    v6: None,
    https: false,
    counter: "to_metadata",
};

/// The hosts with a DNS name: dnsmasq answers them, the server certificate names them.
pub const NAMED_HOSTS: [TestHost; 3] = [ALLOWED, BLOCKED, OTHER];

/// Every host nginx serves.
pub const ALL_HOSTS: [TestHost; 4] = [ALLOWED, BLOCKED, OTHER, METADATA];

/// Names below allowed.test that the test resolver answers with addresses a
/// name must not lead the proxy to (DNS rebinding), IPv4 and IPv6, and the
/// `dial` the audit record gives each when the proxy refuses it.
pub const REBINDS: [(&str, &str, &str, &str); 4] = [
    (
        "rebind-md.allowed.test",
        "169.254.169.254",
        "fd00:ec2::254",
        "refused_private",
    ),
    (
        "rebind-bl.allowed.test",
        "198.51.100.20",
        "2001:db8:100::20",
        "refused_ip_rule",
    ),
    (
        "rebind-lo.allowed.test",
        "127.0.0.1",
        "::1",
        "refused_private",
    ),
    (
        "rebind-pv.allowed.test",
        "10.1.2.3",
        "fd12::3",
        "refused_private",
    ),
];

impl TestHost {
    /// The body every path (but `/big/`, `/slow/`, `/page.html` and `/evil.js`)
    /// returns: `hello from NAME\n`.
    pub fn body(&self) -> String {
        format!("hello from {}\n", self.name)
    }

    /// A curl `--resolve` value pinning this name to its IPv4 address.
    pub fn resolve_v4(&self, port: u16) -> String {
        format!("{}:{port}:{}", self.name, self.v4)
    }

    /// A curl `--resolve` value pinning this name to its IPv6 address.
    /// Panics for an IPv4-only host.
    pub fn resolve_v6(&self, port: u16) -> String {
        let v6 = self
            .v6
            .unwrap_or_else(|| panic!("{} has no IPv6 address", self.name));
        format!("{}:{port}:[{v6}]", self.name)
    }
}
