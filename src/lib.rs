//! agent-egress: a Linux egress controller for AI agents.
pub mod audit;
pub mod cli;
pub mod procinfo;
