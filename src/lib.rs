//! agent-egress: a Linux egress controller for AI agents.
pub mod cli;
pub mod config;
pub mod dns;
pub mod names;
pub mod outbound;
