//! agent-egress: a Linux egress controller for AI agents.
pub mod audit;
pub mod capture;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dns;
pub mod exec;
pub mod names;
pub mod netfilter;
pub mod outbound;
pub mod policy;
pub mod presets;
pub mod procinfo;
pub mod proxy;
pub mod routing;
pub mod sniff;
