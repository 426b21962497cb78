//! agent-egress: a Linux egress controller for AI agents.
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod exec;
pub mod names;
pub mod proxy;
pub mod routing;
