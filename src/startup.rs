//! What `run` and `exec` both start and stop around the proxy: the audit
//! writer, and the capture wired to the proxy's view of the agents.

use crate::audit::{AuditError, AuditLog, AuditThread, Sink};
use crate::capture::{Capture, CaptureError, Handles};
use crate::config::Config;
use crate::procinfo::Attributor;
use crate::proxy::Proxy;

pub fn start_audit(sink: Sink, config: &Config) -> Result<(AuditLog, AuditThread), AuditError> {
    AuditLog::start(
        sink,
        config.audit.format,
        config.audit.queue,
        Some(Attributor::default()),
    )
}

/// Write what is queued, then let the writer go.
pub fn stop_audit(thread: AuditThread) {
    if let Err(e) = thread.flush_and_stop() {
        log::error!("audit: {e}");
    }
}

/// The kernel capture, keeping `proxy`'s agent index and connect log current
/// and reporting drops to `audit`.
pub fn start_capture(
    config: &Config,
    proxy: &Proxy,
    audit: &AuditLog,
) -> Result<Capture, CaptureError> {
    let handles = Handles {
        agents: proxy.shared().agents.clone(),
        connect_log: proxy.shared().connect_log.clone(),
        audit: audit.clone(),
    };
    Capture::start(config, handles)
}
