//! `run`, `down` and `status`: the daemon's life around the proxy.

use crate::audit::{AuditLog, AuditThread, Sink};
use crate::capture::Capture;
use crate::cli::{load, RunArgs};
use crate::config::Config;
use crate::instance;
use crate::notify;
use crate::procinfo::Attributor;
use crate::proxy::{Proxy, Runtime};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

pub fn run(args: &RunArgs) -> i32 {
    let Some(config) = load(&args.config) else {
        return 1;
    };
    // Block the signals before any thread starts so none of them takes one.
    let mut signals = match Signals::new([SIGHUP, SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot handle signals: {e}");
            return 1;
        }
    };
    let _instance = match instance::claim(&config.interception.table, config.listen.port) {
        Ok(lock) => lock,
        Err(e) => {
            log::error!("{e}");
            return 1;
        }
    };
    raise_fd_limit();
    let (audit, audit_thread) =
        match start_audit(Sink::from_config(config.audit.path.as_deref()), &config) {
            Ok(a) => a,
            Err(e) => {
                log::error!("{e}");
                return 1;
            }
        };
    let runtime = Runtime::new(config);
    let proxy = match Proxy::start(runtime.clone(), audit.clone()) {
        Ok(p) => p,
        Err(e) => {
            log::error!("cannot start the proxy: {e}");
            return 1;
        }
    };
    let capture = if runtime.config.interception.manage_kernel {
        match Capture::start(&runtime.config, proxy.shared().clone()) {
            Ok(c) => Some(c),
            Err(e) => {
                log::error!("{e}");
                proxy.stop();
                stop_audit(audit_thread);
                return 1;
            }
        }
    } else {
        log::info!("interception.manage_kernel is false: proxy only, the kernel side is yours");
        None
    };
    log::info!(
        "agent-egress {} listening on port {} ({} workers), default outbound {:?}",
        env!("CARGO_PKG_VERSION"),
        runtime.config.listen.port,
        runtime.config.workers(),
        runtime.config.default
    );
    if let Err(e) = notify::ready() {
        log::warn!("{e}");
    }
    let mut current = runtime;
    for signal in signals.forever() {
        match signal {
            SIGHUP => {
                audit.reopen();
                if let Some(next) = reload(&args.config, &current) {
                    if let Some(c) = &capture {
                        c.update(&next.config);
                    }
                    proxy.reload(next.clone());
                    current = next;
                    log::info!("reloaded {}", args.config.display());
                }
            }
            _ => break,
        }
    }
    log::info!("stopping");
    proxy.stop();
    stop_audit(audit_thread);
    if let Some(c) = capture {
        if args.cleanup_on_exit {
            c.remove();
        } else {
            log::warn!(
                "leaving the agents locked out (their connections are refused); `agent-egress down --config {}` removes the lockdown",
                args.config.display()
            );
            c.leave_lockdown();
        }
    }
    0
}

/// The new runtime, or None (errors logged) when the old one must stay.
fn reload(path: &std::path::Path, current: &Runtime) -> Option<std::sync::Arc<Runtime>> {
    let next = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            log::error!(
                "reload refused, the running config stays: {} error(s):",
                errors.0.len()
            );
            for e in &errors.0 {
                log::error!("  {e}");
            }
            return None;
        }
    };
    let old = &current.config;
    let fixed = [
        ("listen", old.listen != next.listen),
        (
            "interception.table",
            old.interception.table != next.interception.table,
        ),
        (
            "interception.mark",
            old.interception.mark != next.interception.mark,
        ),
        (
            "interception.route_table",
            old.interception.route_table != next.interception.route_table,
        ),
        (
            "interception.manage_kernel",
            old.interception.manage_kernel != next.interception.manage_kernel,
        ),
        ("audit", old.audit != next.audit),
    ];
    let changed: Vec<&str> = fixed.iter().filter(|(_, c)| *c).map(|(k, _)| *k).collect();
    if !changed.is_empty() {
        log::error!(
            "reload refused, the running config stays: {} cannot change without a restart",
            changed.join(", ")
        );
        return None;
    }
    Some(Runtime::new(next))
}

pub fn start_audit(sink: Sink, config: &Config) -> Result<(AuditLog, AuditThread), String> {
    AuditLog::start(sink, config.audit.queue, Some(Attributor::default()))
        .map_err(|e| format!("audit: {e}"))
}

/// Write what is queued, then let the writer go.
pub fn stop_audit(thread: AuditThread) {
    if let Err(e) = thread.flush_and_stop() {
        log::error!("audit: {e}");
    }
}

/// Each connection holds two sockets and, while data flows, two pipes.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit fill and read a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                log::warn!("cannot raise the open-files limit");
            }
        }
    }
}

pub fn down(config: &Config) -> i32 {
    match Capture::remove_for(config) {
        Ok(()) => {
            println!(
                "removed table inet {}, its policy routing and any kernel backstop",
                config.interception.table
            );
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

pub fn status(config: &Config, json: bool) -> i32 {
    match Capture::status(config) {
        Ok(report) => {
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}
