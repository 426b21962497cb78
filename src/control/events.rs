// SPDX-License-Identifier: GPL-3.0-or-later
//! The live event stream: every audit record as it is written (connections
//! decided and ended, UDP dropped, DNS, policy changes), fanned out to the
//! control API's watchers. `watch` and the MCP server read the same stream.
//!
//! Only the audit writer publishes, never a proxy worker, and a publish never
//! waits: each watcher has a bounded queue, and one that falls behind by a
//! whole queue is cut off (and counted) rather than slowing the writer.

use crate::audit::{Event, Record, Verdict};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

/// Lines a watcher may fall behind before it is cut off.
pub const WATCHER_BUFFER: usize = 1024;
/// Watchers at once.
pub const MAX_WATCHERS: usize = 64;
/// The most recent refusals kept for `GET /v1/denials`.
pub const RECENT_DENIALS: usize = 256;

/// One encoded JSON line (with its newline), shared by every watcher.
pub type Line = Arc<[u8]>;

/// A watcher's id (to unsubscribe) and queue.
pub type Watcher = (u64, Receiver<Line>);

#[derive(Default)]
pub struct EventBus {
    watchers: Mutex<Vec<(u64, SyncSender<Line>)>>,
    next_id: AtomicU64,
    /// `watchers.len()`, read without the lock on every record.
    watching: AtomicUsize,
    cut_off: AtomicU64,
    published: AtomicU64,
    /// Stream-only events the audit queue had no room for.
    lost: AtomicU64,
    /// Agents' packets the kernel dropped (UDP and other non-TCP), as reported.
    dropped_packets: AtomicU64,
    /// The last [`RECENT_DENIALS`] records of something refused (or that
    /// enforce would refuse), oldest first: a supervisor that comes late
    /// still sees what was denied.
    denials: Mutex<VecDeque<Line>>,
}

/// Counters for the status route.
#[derive(serde::Serialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusCounters {
    pub watchers: usize,
    pub published: u64,
    pub watchers_cut_off: u64,
    pub lost: u64,
    pub dropped_packets: u64,
}

impl EventBus {
    /// A new watcher (its id and queue); None when `MAX_WATCHERS` watch already.
    pub fn subscribe(&self) -> Option<Watcher> {
        let mut watchers = self.watchers.lock().ok()?;
        if watchers.len() >= MAX_WATCHERS {
            return None;
        }
        let (tx, rx) = sync_channel(WATCHER_BUFFER);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        watchers.push((id, tx));
        self.watching.store(watchers.len(), Ordering::Release);
        Some((id, rx))
    }

    /// Anyone watching (one atomic load).
    pub fn watched(&self) -> bool {
        self.watching.load(Ordering::Acquire) > 0
    }

    /// Whether `record` is to be published with its JSON line: someone
    /// watches, or it is a denial (kept for `GET /v1/denials`).
    pub fn wants_line(&self, record: &Record) -> bool {
        is_denial(record) || self.watched()
    }

    pub fn note_lost(&self) {
        self.lost.fetch_add(1, Ordering::Relaxed);
    }

    /// Hand `line` (the JSON encoding of `record`; none when it was not made,
    /// nobody watching) to every watcher that has room; one that has none is
    /// dropped: its receiver ends after what it holds.
    pub fn publish(&self, record: &Record, line: Option<&[u8]>) {
        if record.event == Event::Drops {
            self.dropped_packets
                .fetch_add(record.dropped.unwrap_or(0), Ordering::Relaxed);
        }
        let denied = is_denial(record);
        let Some(line) = line.filter(|_| denied || self.watched()) else {
            return;
        };
        let line: Line = Arc::from(line);
        if denied {
            if let Ok(mut denials) = self.denials.lock() {
                if denials.len() == RECENT_DENIALS {
                    denials.pop_front();
                }
                denials.push_back(line.clone());
            }
        }
        if !self.watched() {
            return;
        }
        self.published.fetch_add(1, Ordering::Relaxed);
        let Ok(mut watchers) = self.watchers.lock() else {
            return;
        };
        watchers.retain(|(_, tx)| match tx.try_send(line.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.cut_off.fetch_add(1, Ordering::Relaxed);
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        });
        self.watching.store(watchers.len(), Ordering::Release);
    }

    /// The watcher's client went away: free its place at once.
    pub fn unsubscribe(&self, id: u64) {
        if let Ok(mut watchers) = self.watchers.lock() {
            watchers.retain(|(i, _)| *i != id);
            self.watching.store(watchers.len(), Ordering::Release);
        }
    }

    /// The most recent denials, oldest first.
    pub fn recent_denials(&self) -> Vec<Line> {
        self.denials
            .lock()
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default()
    }

    pub fn counters(&self) -> BusCounters {
        BusCounters {
            watchers: self.watching.load(Ordering::Acquire),
            published: self.published.load(Ordering::Relaxed),
            watchers_cut_off: self.cut_off.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
            dropped_packets: self.dropped_packets.load(Ordering::Relaxed),
        }
    }
}

/// Something refused (or that enforce would refuse): a connection's end or a DNS query.
fn is_denial(record: &Record) -> bool {
    matches!(record.verdict, Verdict::Block | Verdict::WouldBlock)
        && matches!(record.event, Event::End | Event::Dns)
}
