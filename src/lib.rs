//! agent-egress: a Linux egress controller for AI agents.
pub mod cgroup;
pub mod cli;
pub mod routing;
