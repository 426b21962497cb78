//! `run`, `down` and `status`: the daemon's life around the proxy.

use crate::audit::{AuditLog, AuditThread, Sink};
use crate::capture::Capture;
use crate::cli::RunArgs;
use crate::config::Config;
use crate::control::rules::RuleSet;
use crate::control::socket::Peer;
use crate::control::state::{self, LoadedConfig, PolicyState};
use crate::control::{ControlServer, ReloadRequest};
use crate::instance;
use crate::notify;
use crate::procinfo::Attributor;
use crate::proxy::{Proxy, Runtime};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::sync::mpsc;

/// What the main thread waits for: a signal, or a reload asked over the API.
enum Message {
    Signal(i32),
    Reload(ReloadRequest),
}

pub fn run(args: &RunArgs) -> i32 {
    let loaded = match LoadedConfig::load(&args.config) {
        Ok(l) => l,
        Err(errors) => {
            log::error!("{}: {} error(s):", args.config.display(), errors.0.len());
            for e in &errors.0 {
                log::error!("  {e}");
            }
            return 1;
        }
    };
    let config = loaded.config.clone();
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
    // Runtime rules belong to the control API: without it the config alone
    // decides. With it, fail closed: rules that cannot be read or no longer
    // fit the config stop the start, rather than run without them.
    let rules = if config.control.enable {
        match RuleSet::load(&state::state_file(&config), &config) {
            Ok(r) => r,
            Err(e) => {
                log::error!("runtime rules: {e}");
                return 1;
            }
        }
    } else {
        RuleSet::default()
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
    let runtime = Runtime::with_rules(config, &rules.in_force(state::now_ms()));
    let proxy = match Proxy::start(runtime.clone(), audit.clone()) {
        Ok(p) => p,
        Err(e) => {
            log::error!("cannot start the proxy: {e}");
            return 1;
        }
    };
    let policy = PolicyState::start(loaded, rules, proxy.handle().clone(), audit.clone());
    let expiry = {
        let policy = policy.clone();
        std::thread::Builder::new()
            .name("rule-expiry".into())
            .spawn(move || policy.run_expiry())
    };
    let (tx, messages) = mpsc::channel();
    let control = if runtime.config.control.enable {
        let reloads = tx.clone();
        let started = ControlServer::start(
            &runtime.config,
            policy.clone(),
            proxy.handle().clone(),
            audit.clone(),
            Box::new(move |r| reloads.send(Message::Reload(r)).is_ok()),
        );
        match started {
            Ok(c) => Some(c),
            Err(e) => {
                log::error!("{e}");
                proxy.stop();
                stop_audit(audit_thread);
                return 1;
            }
        }
    } else {
        None
    };
    let capture = if runtime.config.interception.manage_kernel {
        match Capture::start(&runtime.config, proxy.shared().clone()) {
            Ok(c) => Some(c),
            Err(e) => {
                log::error!("{e}");
                if let Some(c) = control {
                    c.stop();
                }
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
    let forward = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if tx.send(Message::Signal(signal)).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = forward {
        log::error!("cannot start the signal thread: {e}");
    }
    for message in messages {
        let (by, reply) = match message {
            Message::Signal(SIGHUP) => {
                audit.reopen();
                (None, None)
            }
            Message::Signal(_) => break,
            Message::Reload(request) => (Some(request.by), Some(request.reply)),
        };
        let result = reload(&args.config, &proxy, &policy, by.as_ref());
        match &result {
            Ok(next) => {
                if let Some(c) = &capture {
                    c.update(&next.config);
                }
                log::info!("reloaded {}", args.config.display());
            }
            Err(errors) => {
                log::error!(
                    "reload refused, the running config stays: {} error(s):",
                    errors.len()
                );
                for e in errors {
                    log::error!("  {e}");
                }
            }
        }
        if let Some(reply) = reply {
            let _ = reply.send(result.map(|_| policy.config_hash()));
        }
    }
    log::info!("stopping");
    if let Some(c) = control {
        c.stop();
    }
    policy.stop();
    if let Ok(thread) = expiry {
        let _ = thread.join();
    }
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

/// The new runtime, or the reasons the old one must stay.
fn reload(
    path: &std::path::Path,
    proxy: &Proxy,
    policy: &PolicyState,
    by: Option<&Peer>,
) -> Result<std::sync::Arc<Runtime>, Vec<String>> {
    let strings = |errors: crate::config::ConfigErrors| -> Vec<String> {
        errors.0.iter().map(ToString::to_string).collect()
    };
    let next = LoadedConfig::load(path).map_err(strings)?;
    let current = proxy.shared().runtime();
    let old = &current.config;
    let new = &next.config;
    let fixed = [
        ("listen", old.listen != new.listen),
        (
            "interception.table",
            old.interception.table != new.interception.table,
        ),
        (
            "interception.mark",
            old.interception.mark != new.interception.mark,
        ),
        (
            "interception.route_table",
            old.interception.route_table != new.interception.route_table,
        ),
        (
            "interception.manage_kernel",
            old.interception.manage_kernel != new.interception.manage_kernel,
        ),
        ("audit", old.audit != new.audit),
        ("control", old.control != new.control),
        ("state_dir", old.state_dir != new.state_dir),
    ];
    let changed: Vec<&str> = fixed.iter().filter(|(_, c)| *c).map(|(k, _)| *k).collect();
    if !changed.is_empty() {
        return Err(vec![format!(
            "{} cannot change without a restart",
            changed.join(", ")
        )]);
    }
    policy.replace_config(next, by).map_err(strings)
}

pub fn start_audit(sink: Sink, config: &Config) -> Result<(AuditLog, AuditThread), String> {
    AuditLog::start(
        sink,
        config.audit.format,
        config.audit.queue,
        Some(Attributor::default()),
    )
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
