//! Which processes changed: the kernel's process events connector
//! (NETLINK_CONNECTOR, CN_IDX_PROC) reports every fork, exec, exit and
//! rename on the host, synchronously from the task doing it. An exec is
//! queued here before the new program runs a single instruction, so a query
//! or connection that a process makes after an exec always finds the exec
//! queued ahead of it: what was read of the process before is known stale.
//! That lets attribution keep a process's description across its
//! connections instead of reading /proc for each.
//!
//! The kernel reports in pids of the initial pid namespace and only to a
//! listener there with CAP_NET_ADMIN; it ignores any other request without a
//! word, so a subscription counts only once the kernel has acknowledged it.

use crate::netlink::{self, u32_at, Monitor};
use crate::procinfo::{in_initial_namespace, InitialNamespace};
use netlink_sys::protocols::NETLINK_CONNECTOR;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// `CN_IDX_PROC`, `CN_VAL_PROC`: the connector's process events.
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
/// `enum proc_cn_mcast_op`.
const PROC_CN_MCAST_LISTEN: u32 = 1;
/// `enum proc_event.what`.
const PROC_EVENT_NONE: u32 = 0;
const PROC_EVENT_FORK: u32 = 1;
const PROC_EVENT_EXEC: u32 = 2;
const PROC_EVENT_COMM: u32 = 0x200;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
/// `struct cn_msg`: id (idx, val), seq, ack, len, flags.
const CN_MSG_LEN: usize = 20;
/// Where `struct proc_event`'s union starts (after what, cpu, timestamp_ns).
const EVENT_DATA: usize = 16;
/// Room for bursts of events between two drains (a build forking hundreds
/// of processes): some 7,000 events. Past it the kernel drops them and says
/// so (ENOBUFS), and the reader forgets everything.
const RECEIVE_BUFFER: usize = 1 << 20;
/// How long the kernel may take to acknowledge the subscription.
const ACK_WAIT: Duration = Duration::from_secs(1);

/// A live subscription to the process events.
pub struct ProcEvents {
    monitor: Monitor,
}

impl std::fmt::Debug for ProcEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProcEvents")
    }
}

/// What a drain learnt.
#[derive(Debug, PartialEq, Eq)]
pub enum Changes {
    /// Each process (tgid) that forked into existence, exec'd, exited or
    /// was renamed was named; every other one is as it was.
    Listed,
    /// Events were lost: any process may have changed.
    Unknown,
}

impl ProcEvents {
    /// Subscribes, and waits for the kernel to acknowledge it.
    pub fn subscribe() -> io::Result<ProcEvents> {
        // Elsewhere the kernel would not answer: no wait for that.
        for (ns, what) in [
            (
                InitialNamespace::Pid,
                "pid namespace, whose pids the kernel reports",
            ),
            (InitialNamespace::User, "user namespace"),
        ] {
            if !in_initial_namespace(ns)? {
                return Err(io::Error::other(format!("not in the initial {what}")));
            }
        }
        in_initial_netns(subscribe_here)
    }

    /// Reads what is queued and calls `changed` with each process an event
    /// names. `Changes::Unknown` when events were lost, or the socket failed
    /// (then every later drain says so too: the caller must stop trusting
    /// what it kept).
    pub fn drain(&mut self, mut changed: impl FnMut(u32)) -> Changes {
        let mut failed = false;
        let drained = self.monitor.drain(|datagram| {
            for event in events(datagram) {
                match event {
                    Event::Changed(tgid) => changed(tgid),
                    Event::Ack { .. } => {}
                    Event::Malformed => failed = true,
                }
            }
            false
        });
        match drained {
            Ok(false) if !failed => Changes::Listed,
            _ => Changes::Unknown,
        }
    }
}

/// The connector's kernel socket lives in the initial network namespace
/// only. A daemon in a namespace of its own (its agents') subscribes from a
/// thread that enters it for the call (CAP_SYS_ADMIN) and then ends: no
/// thread of the daemon's stays moved, and the socket stays where it was made.
/// The namespace is kthreadd's (pid 2, as every kernel thread in the
/// initial namespaces; pid 1 may be an init that hides its own).
fn in_initial_netns<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let own = std::fs::metadata("/proc/thread-self/ns/net")?.ino();
    let initial = std::fs::File::open("/proc/2/ns/net")?;
    if initial.metadata()?.ino() == own {
        return f();
    }
    std::thread::Builder::new()
        .name("proc-events".into())
        .spawn(move || {
            // SAFETY: a namespace fd open for the call; only this thread moves.
            if unsafe { libc::setns(initial.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("entering the initial network namespace: {e}"),
                ));
            }
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("the subscribing thread panicked"))?
}

/// Subscribes in this thread's network namespace, and waits for the kernel
/// to acknowledge it.
fn subscribe_here() -> io::Result<ProcEvents> {
    let mut monitor = Monitor::subscribe(NETLINK_CONNECTOR, &[CN_IDX_PROC], RECEIVE_BUFFER)?;
    // The kernel numbers its acknowledgement anew, but answers our ack
    // number plus one: a number of this subscription's own.
    static SUBSCRIPTIONS: AtomicU32 = AtomicU32::new(0);
    let ack = std::process::id() << 12 | SUBSCRIPTIONS.fetch_add(1, Ordering::Relaxed) & 0xfff;
    monitor.send(&listen_request(ack))?;
    let deadline = Instant::now() + ACK_WAIT;
    loop {
        let mut acked = None;
        let lost = monitor.drain(|datagram| {
            for event in events(datagram) {
                if let Event::Ack { answering, err } = event {
                    if answering == ack.wrapping_add(1) {
                        acked = Some(err);
                    }
                }
            }
            false
        })?;
        match acked {
            Some(0) => return Ok(ProcEvents { monitor }),
            Some(err) => return Err(io::Error::from_raw_os_error(err as i32)),
            None if lost => {
                return Err(io::Error::other("the acknowledgement was lost in a burst"))
            }
            None => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the kernel did not acknowledge the subscription",
            ));
        }
        wait_readable(&monitor, left)?;
    }
}

/// The connector message asking for every process event; `ack` numbers it.
fn listen_request(ack: u32) -> Vec<u8> {
    let payload = PROC_CN_MCAST_LISTEN.to_ne_bytes();
    let len = netlink::NLMSG_HDRLEN + CN_MSG_LEN + payload.len();
    let mut message = Vec::with_capacity(len);
    message.extend((len as u32).to_ne_bytes());
    message.extend(netlink::NLMSG_DONE.to_ne_bytes());
    message.extend(0u16.to_ne_bytes()); // flags
    message.extend(0u32.to_ne_bytes()); // seq
    message.extend(0u32.to_ne_bytes()); // port: the kernel's
    message.extend(CN_IDX_PROC.to_ne_bytes());
    message.extend(CN_VAL_PROC.to_ne_bytes());
    message.extend(0u32.to_ne_bytes()); // seq
    message.extend(ack.to_ne_bytes());
    message.extend((payload.len() as u16).to_ne_bytes());
    message.extend(0u16.to_ne_bytes()); // flags
    message.extend(payload);
    message
}

#[derive(Debug, PartialEq, Eq)]
enum Event {
    /// A process (tgid) that changed.
    Changed(u32),
    /// The kernel's answer to the request whose ack number is one less.
    Ack { answering: u32, err: u32 },
    /// A message that is not what the connector sends: nothing it says is known.
    Malformed,
}

/// The events in one datagram; those that change no description (uid, sid,
/// ptrace, coredump changes) are left out.
fn events(datagram: &[u8]) -> Vec<Event> {
    netlink::messages(datagram)
        .filter_map(|message| message.map_or(Some(Event::Malformed), |m| event(m.body)))
        .collect()
}

fn event(body: &[u8]) -> Option<Event> {
    let parse = || -> Option<Option<Event>> {
        if (u32_at(body, 0)?, u32_at(body, 4)?) != (CN_IDX_PROC, CN_VAL_PROC) {
            return Some(None);
        }
        let answering = u32_at(body, 12)?;
        let event = body.get(CN_MSG_LEN..)?;
        let data = |at: usize| u32_at(event, EVENT_DATA + at);
        Some(match u32_at(event, 0)? {
            PROC_EVENT_NONE => Some(Event::Ack {
                answering,
                err: data(0)?,
            }),
            // parent pid, parent tgid, child pid, child tgid
            PROC_EVENT_FORK => Some(Event::Changed(data(12)?)),
            // pid, tgid, ...
            PROC_EVENT_EXEC | PROC_EVENT_COMM | PROC_EVENT_EXIT => Some(Event::Changed(data(4)?)),
            _ => None,
        })
    };
    parse().unwrap_or(Some(Event::Malformed))
}

fn wait_readable(monitor: &Monitor, within: Duration) -> io::Result<()> {
    let mut poll = libc::pollfd {
        fd: monitor.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = within.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call.
    match unsafe { libc::poll(&mut poll, 1, millis) } {
        -1 => Err(io::Error::last_os_error()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connector_message(what: u32, data: &[u32]) -> Vec<u8> {
        let mut body = Vec::new();
        for word in [CN_IDX_PROC, CN_VAL_PROC, 0, 7] {
            body.extend(word.to_ne_bytes());
        }
        body.extend(40u16.to_ne_bytes());
        body.extend(0u16.to_ne_bytes());
        body.extend(what.to_ne_bytes());
        body.extend(0u32.to_ne_bytes()); // cpu
        body.extend(0u64.to_ne_bytes()); // timestamp
        for word in data {
            body.extend(word.to_ne_bytes());
        }
        let mut message = Vec::new();
        message.extend(((netlink::NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
        message.extend(netlink::NLMSG_DONE.to_ne_bytes());
        message.extend([0u8; 10]);
        message.extend(body);
        message
    }

    #[test]
    fn events_name_the_process_each_concerns() {
        let fork = connector_message(PROC_EVENT_FORK, &[10, 10, 12, 11]);
        assert_eq!(events(&fork), [Event::Changed(11)], "the child's tgid");
        let exec = connector_message(PROC_EVENT_EXEC, &[12, 11]);
        assert_eq!(
            events(&exec),
            [Event::Changed(11)],
            "the tgid, not the thread"
        );
        let exit = connector_message(PROC_EVENT_EXIT, &[11, 11, 0, 0, 10, 10]);
        assert_eq!(events(&exit), [Event::Changed(11)]);
        let comm = connector_message(PROC_EVENT_COMM, &[11, 11, 0x6c72_7563, 0, 0, 0]);
        assert_eq!(events(&comm), [Event::Changed(11)]);
        let uid = connector_message(4, &[11, 11, 0, 0]);
        assert_eq!(events(&uid), []);
        let ack = connector_message(PROC_EVENT_NONE, &[0]);
        assert_eq!(
            events(&ack),
            [Event::Ack {
                answering: 7,
                err: 0
            }]
        );
    }

    #[test]
    fn what_is_not_an_event_says_nothing_is_known() {
        let mut short = connector_message(PROC_EVENT_EXEC, &[12]);
        assert_eq!(events(&short), [Event::Malformed]);
        short.truncate(10);
        assert_eq!(events(&short), [Event::Malformed]);
    }
}
