//! The shared integration-test harness: a throw-away "world" per test.
//!
//! ```text
//!  netns ae<id>a  "agent host"                 netns ae<id>n  "internet"
//!  ┌─────────────────────────────┐   veth    ┌──────────────────────────────────────┐
//!  │ cgroup ae-test-<id>/agent   │ to-net    │ to-agent 192.0.2.2  2001:db8:1::2    │
//!  │   agent_cmd(..) runs here   ├───────────┤ nginx :80 :443  allowed.test  198.51.100.10 / 2001:db8:100::10
//!  │ host_cmd(..): the daemon    │ 192.0.2.1 │                 blocked.test  198.51.100.20 / 2001:db8:100::20
//!  │ default routes v4+v6 ──────▶│ 2001:db8:1::1               other.test    203.0.113.30 (v4 only)
//!  │ resolv.conf → 198.51.100.53 │           │       :80       metadata      169.254.169.254
//!  └─────────────────────────────┘           │ dnsmasq :53  198.51.100.53 (allowed), 203.0.113.53 (forbidden)
//!                                            │ nft table ae_arrivals: counters of arriving packets
//!                                            └──────────────────────────────────────┘
//! ```
//!
//! Use it from a test file with `mod harness;`:
//!
//! ```ignore
//! mod harness;
//! use harness::{World, ALLOWED};
//!
//! #[test]
//! fn agent_reaches_allowed() {
//!     if !harness::require_root_and_tools(&["curl"]) {
//!         return;
//!     }
//!     let world = World::new();
//!     let out = world.curl_agent(["--resolve", &ALLOWED.resolve_v4(443), "https://allowed.test/"]);
//!     assert_eq!(String::from_utf8_lossy(&out.stdout), ALLOWED.body());
//!     // world drops here: processes killed, cgroups, netns, /etc/netns and temp dir removed
//! }
//! ```
//!
//! What the world offers, in short (see [`World`] for each method):
//! - commands: `agent_cmd` (agent netns + agent cgroup), `host_cmd` (agent netns,
//!   for the daemon), `net_cmd` (internet netns), `curl_agent`, `spawn_host`;
//!   in-process code: [`in_netns`]`(&world.agent_ns(), || ...)`.
//! - servers: every path on every host answers `hello from NAME\n`
//!   ([`TestHost::body`]) from the host whose ADDRESS was reached; `/big/NAME` and
//!   `/slow/NAME[?rate=8k]` serve files from `make_file`; `/page.html` is a page
//!   showing [`PAGE_CONTENT`] that fetches from blocked.test and loads
//!   `https://blocked.test/evil.js`, which would add [`EVIL_MARKER`]; every response
//!   carries `Alt-Svc: h3=":443"`. HTTPS certificates chain to `world.ca_cert()`,
//!   which `chromium_agent` trusts through an NSS database in its HOME.
//! - DNS: dnsmasq answers the three names (and their subdomains), NXDOMAIN for the
//!   rest; quirk: an AAAA query for a subdomain of the IPv4-only other.test is
//!   NXDOMAIN rather than empty.
//! - evidence: `count_arrived` (packets reaching the internet, see [`arrivals`]),
//!   `access_log`, `dns_log`.
//! - cgroups: `agent()` gives `relative_path()` (for the daemon's config) and `id()`.
//! - a terminal: [`Tmux`] runs a command in tmux, reads its screen, types keys.
//! - cleanup checks: [`assert_world_gone`], [`assert_no_leftovers`]; from the shell,
//!   `scripts/leftovers.sh`.

// Each test binary uses a different part of the harness; what one leaves unused is
// used by another (tests/world.rs exercises all of it).
#![allow(dead_code, unused_imports)]

pub mod arrivals;
mod cgroup;
pub mod control;
pub mod daemon;
mod dns;
pub use dns::{BIG_NAME, BIG_NAME_ADDRESSES, ECH_PUBLIC_NAME, SUPERVISED_NAMES};
mod files;
mod leftovers;
mod names;
mod netns;
mod nginx;
mod process;
mod requirements;
mod tls;
mod tmux;
mod topology;
mod world;

pub use cgroup::{cgroup2_root, remove_tree, Cgroup};
pub use files::{sha256_bytes, sha256_file, ServedFile};
pub use leftovers::{assert_no_leftovers, assert_world_gone};
pub use netns::in_netns;
pub use nginx::{EVIL_MARKER, PAGE_CONTENT};
pub use process::ChildGuard;
pub use requirements::{require_root_and_tools, require_tools};
pub use tls::TestCa;
pub use tmux::Tmux;
pub use topology::*;
pub use world::World;
