//! Audit records: one JSON object per line, written by a dedicated thread.
//!
//! The relay never waits on disk: [`AuditLog::submit`] is a `try_send` into a bounded
//! queue and counts a drop when the queue is full. The writer thread also does the slow
//! half of process attribution (/proc reads), so the event loop only ever does the
//! kernel socket lookup.
//!
//! JSON shape: the fields of [`Record`] are present, `null` when unknown, so that
//! consumers see one fixed schema; the exceptions appear only where they apply:
//! `dropped` on drop summaries (`audit_drops`, kernel `drops`), `subtree` for a
//! connection captured through a delegated subtree, the DNS fields (`qtype`,
//! `rcode`, `answers`, `rate_limited`, `cached`) on queries, and `resolved`,
//! `resolved_name`, `name_mismatch` where DNS is captured.
//!
//! Early attribution: a short-lived client (curl) may be gone by the time its
//! connection ends. At accept time the proxy calls [`AuditLog::attribute_early`] with a
//! connection id from [`AuditLog::next_conn_id`]; the writer resolves the process as
//! soon as the proxy's loop has handled what its poll brought, and keeps the answer in
//! a bounded map until the record with that `conn_id` and `event: "end"` arrives.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::audit_ocsf::encode_ocsf_line;
use crate::config::AuditFormat;
use crate::control::events::EventBus;
use crate::procinfo::{Ancestor, Attributor, OwnerQuery, ProcessInfo};

/// What a record is about.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// A connection was decided (with `audit.start_events`).
    Start,
    /// A connection ended.
    #[default]
    End,
    /// Records the writer lost (a full queue), counted.
    AuditDrops,
    /// Agents' non-TCP packets the kernel dropped, per destination.
    Drops,
    /// A DNS query of an agent, answered.
    Dns,
    /// A change of the policy: `policy` says what, `uid`/`pid`/`exe` who.
    Policy,
    /// A connection was held and a supervisor asked (`question`).
    QuestionAsked,
    /// A question was answered, or timed out (`question.answer`, `by`).
    QuestionAnswered,
}

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Start => "start",
            Event::End => "end",
            Event::AuditDrops => "audit_drops",
            Event::Drops => "drops",
            Event::Dns => "dns",
            Event::Policy => "policy",
            Event::QuestionAsked => "question_asked",
            Event::QuestionAnswered => "question_answered",
        }
    }
}

/// What a supervisor (or the daemon itself) changed.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PolicyAction {
    RuleAdded,
    RuleRemoved,
    /// A runtime rule reached its `expires`.
    RuleExpired,
    /// The config was reloaded (SIGHUP or the control API).
    Reloaded,
    /// A live connection was closed over the control API (`conn_id`).
    ConnectionClosed,
}

/// The `policy` field of an `event: "policy"` record.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct PolicyChange {
    pub action: PolicyAction,
    /// The runtime rule added, removed or expired, as the control API shows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<serde_json::Value>,
    /// SHA-256 of the config file now running.
    pub config_hash: String,
    /// Runtime rules in force after the change.
    pub runtime_rules: usize,
}

/// What the connection or query carried, as far as the sniff could tell.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    Tls,
    Http,
    #[default]
    Tcp,
    Udp,
    Dns,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tls => "tls",
            Proto::Http => "http",
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Dns => "dns",
        }
    }
}

/// What the policy (or a failure) made of it.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash,
)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Ended before anything was decided (the client closed, the daemon stopped).
    #[default]
    Undecided,
    Allow,
    Block,
    /// Audit mode: let through, and enforce would have refused it.
    WouldBlock,
    /// Allowed, and then the upstream failed.
    Error,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Undecided => "undecided",
            Verdict::Allow => "allow",
            Verdict::Block => "block",
            Verdict::WouldBlock => "would_block",
            Verdict::Error => "error",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// How the upstream address was chosen, or why none was dialled.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Dial {
    /// The address the agent connected to.
    Original,
    /// The agent's address, which our resolver gives for the name too.
    OriginalVerified,
    /// An address our resolver gives for the name.
    Resolved,
    /// The upstream proxy resolves the name it is given.
    UpstreamResolves,
    RefusedMismatch,
    RefusedPrivate,
    RefusedIpRule,
    RefusedSelf,
    RefusedUnresolved,
}

#[derive(Serialize, Clone, Debug, Default, PartialEq)]
pub struct Record {
    /// RFC 3339 UTC with milliseconds. Left empty, the writer stamps it when writing.
    pub ts: String,
    /// What the record is about.
    pub event: Event,
    /// Links the records of one connection (from [`AuditLog::next_conn_id`]).
    pub conn_id: Option<u64>,
    /// The configured cgroup path the connection came from.
    pub agent: Option<String>,
    /// The delegated subtree the connection was captured through, when its cgroup
    /// is in no agent's: `agent` is then the one agent in that subtree, or null
    /// when there are several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subtree: Option<String>,
    pub cgroup_id: Option<u64>,
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub exe: Option<String>,
    pub cmdline: Option<Vec<String>>,
    /// The process's parent, its parent, ... within the agent's cgroup
    /// subtree (nearest first, bounded), read when the process was.
    pub ancestry: Option<Vec<Ancestor>>,
    /// The executable's SHA-256, when a rule pins hashes (`exe_sha256`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exe_sha256: Option<String>,
    /// Why a rule by process could not be asked: the process was not read
    /// in time, or not found; its selectors did not match.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution: Option<String>,
    /// "ip:port", "[v6]:port"
    pub src: String,
    pub dst: String,
    /// What the sniff found
    pub proto: Proto,
    /// The normalised name used for policy.
    pub host: Option<String>,
    pub sni: Option<String>,
    pub http_host: Option<String>,
    pub ech: bool,
    /// Rule name, "rules[3]" or "default".
    pub rule: Option<String>,
    pub outbound: String,
    /// What was made of it.
    pub verdict: Verdict,
    /// How the upstream was chosen, or why none was dialled.
    pub dial: Option<Dial>,
    /// The address actually dialed (a resolved address, or the upstream proxy).
    pub upstream: Option<String>,
    /// Why no name was learnt (not TLS/HTTP, malformed, sniff timeout...).
    pub sniff: Option<String>,
    /// For a connection to loopback: the cgroup of the socket listening there.
    pub listener: Option<String>,
    /// DNS queries (`event: "dns"`): the type asked, the answer's code and
    /// records (bounded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rcode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answers: Option<Vec<String>>,
    /// For a connection (DNS captured): whether the agent resolved its
    /// address through the handler, and the name it did (the most recent);
    /// a connection without a name of its own is decided under that name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolved_name: Option<String>,
    /// Its SNI or Host is none of the names its address was resolved for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_mismatch: Option<bool>,
    /// A DNS query over a per-agent limit (`dns.rate_limit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limited: Option<bool>,
    /// A DNS query answered from the handler's cache.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached: Option<bool>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    pub error: Option<String>,
    /// Number of records or packets lost, on drop-summary events only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
    /// On `event: "policy"` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyChange>,
    /// On `question_asked` and `question_answered` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub question: Option<Box<crate::ask::questions::QuestionRecord>>,
    /// A connection the policy sent to `ask`: how it was decided.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asked: Option<Box<crate::ask::Asked>>,
}

/// Set once an early attribution is finished (found or not). A refusal is held
/// until then (briefly), because a refused client may close its socket, and
/// with it the trace of its process, as soon as it reads the refusal. The
/// event loop is woken only when it watches (holds a refusal): most
/// connections are not refused, and their loops need no wake-up.
///
/// A connection that a rule by process decides also takes the process found
/// from it ([`AttributionDone::wanting_process`]).
#[derive(Clone)]
pub struct AttributionDone {
    state: Arc<AtomicU8>,
    waker: Arc<mio::Waker>,
    /// Set before the state says done, when wanted.
    process: Option<Arc<OnceLock<Arc<ProcessInfo>>>>,
}

const ATTRIBUTION_PENDING: u8 = 0;
const ATTRIBUTION_WATCHED: u8 = 1;
const ATTRIBUTION_DONE: u8 = 2;

impl AttributionDone {
    pub fn new(waker: Arc<mio::Waker>) -> AttributionDone {
        AttributionDone {
            state: Arc::new(AtomicU8::new(ATTRIBUTION_PENDING)),
            waker,
            process: None,
        }
    }

    /// One that also hands over the process it found.
    pub fn wanting_process(waker: Arc<mio::Waker>) -> AttributionDone {
        AttributionDone {
            process: Some(Arc::new(OnceLock::new())),
            ..AttributionDone::new(waker)
        }
    }

    /// The process found, once done (None: not found, or not wanted).
    pub fn process(&self) -> Option<&ProcessInfo> {
        if !self.is_done() {
            return None;
        }
        self.process.as_deref()?.get().map(|info| &**info)
    }

    fn offer(&self, info: &Arc<ProcessInfo>) {
        if let Some(slot) = &self.process {
            let _ = slot.set(Arc::clone(info));
        }
    }

    pub fn is_done(&self) -> bool {
        self.state.load(Ordering::Acquire) == ATTRIBUTION_DONE
    }

    /// True if done already; otherwise the loop is woken when it is.
    pub fn watch(&self) -> bool {
        match self.state.compare_exchange(
            ATTRIBUTION_PENDING,
            ATTRIBUTION_WATCHED,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => false,
            Err(state) => state == ATTRIBUTION_DONE,
        }
    }

    fn set(&self) {
        if self.state.swap(ATTRIBUTION_DONE, Ordering::AcqRel) == ATTRIBUTION_WATCHED {
            // A loop that cannot be woken finds the state at its next deadline.
            let _ = self.waker.wake();
        }
    }
}

impl fmt::Debug for AttributionDone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AttributionDone({})", self.is_done())
    }
}

/// A record on its way to the writer, with what the writer needs to attribute it.
#[derive(Clone, Debug, Default)]
pub struct PendingRecord {
    pub record: Record,
    /// Where to look for the owning process when the record's pid is unknown and no
    /// early attribution exists for its `conn_id`.
    pub owner: Option<OwnerQuery>,
}

impl From<Record> for PendingRecord {
    fn from(record: Record) -> Self {
        Self {
            record,
            owner: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sink {
    Stdout,
    /// For `exec`, whose standard output belongs to the command it runs.
    Stderr,
    File(PathBuf),
}

impl Sink {
    /// The config's `audit.path`: none is standard output (the journal).
    pub fn from_config(path: Option<&std::path::Path>) -> Self {
        match path {
            Some(p) => Self::File(p.to_path_buf()),
            None => Self::Stdout,
        }
    }
}

#[derive(Debug)]
pub enum AuditError {
    Open { path: PathBuf, source: io::Error },
    Spawn(io::Error),
    Encode(serde_json::Error),
    WriterPanicked,
}

impl fmt::Display for AuditError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open { path, source } => {
                write!(f, "cannot open audit log {}: {source}", path.display())
            }
            Self::Spawn(e) => write!(f, "cannot start the audit writer thread: {e}"),
            Self::Encode(e) => write!(f, "cannot encode an audit record: {e}"),
            Self::WriterPanicked => write!(f, "the audit writer thread panicked"),
        }
    }
}

impl std::error::Error for AuditError {}

/// Format a time as RFC 3339 UTC with milliseconds, e.g. `2026-11-25T08:40:25.123Z`.
/// Times before 1970 are clamped to the epoch.
pub fn format_timestamp(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let of_day = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since_epoch.subsec_millis()
    )
}

/// Milliseconds since the epoch of a [`format_timestamp`] string; None for any
/// other shape.
pub fn parse_timestamp(ts: &str) -> Option<u64> {
    let b = ts.as_bytes();
    if b.len() != 24 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || b[19] != b'.' || b[23] != b'Z' {
        return None;
    }
    let number = |from: usize, to: usize| -> Option<u64> {
        let digits = ts.get(from..to)?;
        if !digits.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    };
    let (year, month, day) = (number(0, 4)?, number(5, 7)?, number(8, 10)?);
    let (hour, minute, second) = (number(11, 13)?, number(14, 16)?, number(17, 19)?);
    if year < 1970 || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    Some(secs * 1000 + number(20, 23)?)
}

/// The inverse of [`civil_from_days`], from 1970 on.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year / 400;
    let year_of_era = year % 400;
    let month_from_march = if month > 2 { month - 3 } else { month + 9 };
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day), after Howard
/// Hinnant's `civil_from_days`, restricted to dates from the epoch on.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Append `record` as one JSON line (with its newline) to `out`.
pub fn encode_line(record: &Record, out: &mut Vec<u8>) -> Result<(), AuditError> {
    serde_json::to_writer(&mut *out, record).map_err(AuditError::Encode)?;
    out.push(b'\n');
    Ok(())
}

enum Message {
    Record(Box<PendingRecord>),
    /// For the event stream only, not the file (a connection decided while
    /// `audit.start_events` is off).
    Stream(Box<Record>),
    /// The processes found early for these connections, for the control API.
    Processes {
        conn_ids: Vec<u64>,
        reply: Sender<Vec<(u64, ProcessInfo)>>,
    },
    Attribute {
        conn_id: u64,
        query: OwnerQuery,
        done: AttributionDone,
    },
    Stop,
}

struct Shared {
    /// Messages sent and not yet taken by the writer; at most `capacity`.
    queued: AtomicUsize,
    capacity: usize,
    dropped: AtomicU64,
    reopen: AtomicBool,
    next_conn_id: AtomicU64,
    /// Early attributions queued since the writer was last woken for them.
    early_waiting: AtomicBool,
}

/// A cheap, clonable handle to the audit writer.
#[derive(Clone)]
pub struct AuditLog {
    queue: Sender<Message>,
    shared: Arc<Shared>,
    events: Arc<EventBus>,
    attributing: bool,
    writer: thread::Thread,
}

/// Owns the writer thread; stop it with [`AuditThread::flush_and_stop`].
pub struct AuditThread {
    queue: Sender<Message>,
    handle: JoinHandle<()>,
}

/// Most early attributions kept waiting for their connection's end record; past this
/// the oldest are forgotten (their end records fall back to late attribution).
const EARLY_ATTRIBUTIONS_MAX: usize = 8192;
/// Upper bound on the time a written record sits in the buffer.
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// After work, the writer sleeps this long and takes what queued up meanwhile,
/// instead of being woken (a futex call on each side) for every message. A
/// held refusal cuts the sleep short ([`AuditLog::hurry`]).
const LINGER: Duration = Duration::from_millis(1);
/// How long to wait before retrying a failed reopen.
const REOPEN_RETRY: Duration = Duration::from_secs(1);
/// How often the writer looks whether its file was rotated away (renamed,
/// removed or replaced). A rotator that cannot signal the daemon (NixOS's
/// logrotate.service has no network, so no `systemctl reload`) is then
/// followed within this time; records written meanwhile land in the rotated
/// file, none is lost.
const ROTATION_CHECK: Duration = Duration::from_secs(1);

impl AuditLog {
    /// Open the sink and spawn the writer thread, which writes records in
    /// `format`. `attributor: None` turns /proc attribution off (records keep
    /// whatever pid/exe they were submitted with).
    pub fn start(
        sink: Sink,
        format: AuditFormat,
        queue_capacity: usize,
        attributor: Option<Attributor>,
    ) -> Result<(AuditLog, AuditThread), AuditError> {
        let output = Output::open(sink)?;
        // An unbounded channel allocates as messages come and frees as they go
        // (a sync_channel of 65,536 preallocated 6.5 MB); `queued` bounds it.
        let (queue, receiver) = channel();
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            capacity: queue_capacity.max(1),
            dropped: AtomicU64::new(0),
            reopen: AtomicBool::new(false),
            next_conn_id: AtomicU64::new(1),
            early_waiting: AtomicBool::new(false),
        });
        let attributing = attributor.is_some();
        let events = Arc::new(EventBus::default());
        let writer = Writer {
            output,
            shared: Arc::clone(&shared),
            events: Arc::clone(&events),
            attributor,
            format,
            early: BTreeMap::new(),
            line: Vec::with_capacity(1024),
            ocsf_line: Vec::new(),
            reported_drops: 0,
            last_flush: Instant::now(),
            write_failing: false,
            reopen_retry_at: None,
            last_rotation_check: Instant::now(),
        };
        let capacity = queue_capacity.max(1);
        let handle = thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(receiver, capacity))
            .map_err(AuditError::Spawn)?;
        Ok((
            AuditLog {
                queue: queue.clone(),
                shared,
                events,
                attributing,
                writer: handle.thread().clone(),
            },
            AuditThread { queue, handle },
        ))
    }

    /// Queue a record; never blocks. A full queue (or a stopped writer) counts a drop.
    pub fn submit(&self, record: PendingRecord) {
        if !self.try_send(Message::Record(Box::new(record))) {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queue a record whose process is still to be found, and found soon
    /// (its asker may exit any moment): the writer is woken for it at the
    /// asking loop's [`AuditLog::wake_for_early`], without lingering.
    pub fn submit_soon(&self, record: PendingRecord) {
        let attributes = self.attributing && record.owner.is_some();
        self.submit(record);
        if attributes {
            self.shared.early_waiting.store(true, Ordering::Release);
        }
    }

    /// Show `record` on the event stream without writing it, if anyone watches.
    pub fn stream(&self, record: Record) {
        if self.events.watched() && !self.try_send(Message::Stream(Box::new(record))) {
            self.events.note_lost();
        }
    }

    /// Every record written, live: the control API's event stream.
    pub fn events(&self) -> &Arc<EventBus> {
        &self.events
    }

    /// The processes found for these open connections (by `conn_id`), asked
    /// of the writer; those it does not know, or all when it does not answer
    /// within `wait`, are left out.
    pub fn processes(&self, conn_ids: Vec<u64>, wait: Duration) -> Vec<(u64, ProcessInfo)> {
        let (reply, answer) = channel();
        if !self.try_send(Message::Processes { conn_ids, reply }) {
            return Vec::new();
        }
        self.writer.unpark();
        answer.recv_timeout(wait).unwrap_or_default()
    }

    /// Send unless `capacity` messages wait already or the writer is gone.
    fn try_send(&self, message: Message) -> bool {
        let shared = &self.shared;
        if shared.queued.fetch_add(1, Ordering::AcqRel) >= shared.capacity {
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        if self.queue.send(message).is_err() {
            shared.queued.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// A connection id unique within this log, for [`Record::conn_id`].
    pub fn next_conn_id(&self) -> u64 {
        self.shared.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Ask the writer to find the owning process soon, while it surely exists, and
    /// keep it for this connection's records. Never blocks; on a full queue the
    /// request is skipped and the end record falls back to late attribution.
    ///
    /// The writer is not woken here: the loop that asks calls
    /// [`AuditLog::wake_for_early`] once it has handled what one poll brought,
    /// so a batch of new connections or queries costs one wake-up, not one each.
    pub fn attribute_early(&self, conn_id: u64, query: OwnerQuery, done: AttributionDone) {
        if self.attributing {
            let message = Message::Attribute {
                conn_id,
                query,
                done: done.clone(),
            };
            if self.try_send(message) {
                self.shared.early_waiting.store(true, Ordering::Release);
                return;
            }
        }
        done.set();
    }

    /// End the writer's linger if early attributions wait: no linger for them,
    /// the process may exit any moment.
    pub fn wake_for_early(&self) {
        if self.shared.early_waiting.swap(false, Ordering::AcqRel) {
            self.writer.unpark();
        }
    }

    /// Someone waits for an early attribution: end the writer's linger now.
    pub fn hurry(&self) {
        self.writer.unpark();
    }

    /// Records dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Reopen the file sink (append mode) before the next write: for SIGHUP after a
    /// logrotate rename. No effect on stdout.
    pub fn reopen(&self) {
        self.shared.reopen.store(true, Ordering::Release);
    }
}

impl AuditThread {
    /// Write everything queued so far, flush and join the writer. Records submitted
    /// after this returns are counted as dropped.
    pub fn flush_and_stop(self) -> Result<(), AuditError> {
        // Past the bound: a stop is never dropped.
        let _ = self.queue.send(Message::Stop);
        self.handle.join().map_err(|_| AuditError::WriterPanicked)
    }
}

struct Output {
    writer: BufWriter<Box<dyn Write + Send>>,
    path: Option<PathBuf>,
    /// Device and inode of the open file, to tell when the path names another.
    identity: Option<(u64, u64)>,
}

impl Output {
    fn open(sink: Sink) -> Result<Self, AuditError> {
        match sink {
            Sink::Stdout => Ok(Self {
                writer: BufWriter::new(Box::new(io::stdout())),
                path: None,
                identity: None,
            }),
            Sink::Stderr => Ok(Self {
                writer: BufWriter::new(Box::new(io::stderr())),
                path: None,
                identity: None,
            }),
            Sink::File(path) => {
                let (file, identity) = open_append(&path)?;
                Ok(Self {
                    writer: BufWriter::with_capacity(64 * 1024, Box::new(file)),
                    path: Some(path),
                    identity,
                })
            }
        }
    }

    /// Whether the path no longer names the open file: rotated away.
    fn rotated(&self) -> bool {
        let (Some(path), Some(identity)) = (&self.path, self.identity) else {
            return false;
        };
        match fs::metadata(path) {
            Ok(meta) => (meta.dev(), meta.ino()) != identity,
            Err(e) => e.kind() == io::ErrorKind::NotFound,
        }
    }
}

/// The file, and its device and inode when fstat tells them.
fn open_append(path: &PathBuf) -> Result<(File, Option<(u64, u64)>), AuditError> {
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640) // command lines can be sensitive
        .open(path)
        .map_err(|source| AuditError::Open {
            path: path.clone(),
            source,
        })?;
    let identity = file.metadata().ok().map(|meta| (meta.dev(), meta.ino()));
    Ok((file, identity))
}

struct Writer {
    output: Output,
    shared: Arc<Shared>,
    events: Arc<EventBus>,
    attributor: Option<Attributor>,
    format: AuditFormat,
    /// Early attributions by connection id; ids grow, so the first entry is the oldest.
    /// Equal descriptions of one process are one (`Attributor::resolve`).
    early: BTreeMap<u64, Arc<ProcessInfo>>,
    line: Vec<u8>,
    /// The record as OCSF, with `audit.format: "ocsf"`.
    ocsf_line: Vec<u8>,
    reported_drops: u64,
    last_flush: Instant,
    write_failing: bool,
    reopen_retry_at: Option<Instant>,
    last_rotation_check: Instant,
}

impl Writer {
    fn run(mut self, queue: Receiver<Message>, capacity: usize) {
        let mut lingering = false;
        loop {
            // Busy: linger, then take the batch that queued up. Idle with
            // nothing buffered: sleep until work arrives. Drops cannot happen
            // meanwhile (they need a full queue). With bytes stuck after a
            // failed flush, wake up to retry.
            let received = if lingering {
                thread::park_timeout(LINGER);
                match queue.try_recv() {
                    Ok(message) => Ok(message),
                    Err(TryRecvError::Empty) => {
                        lingering = false;
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => Err(RecvTimeoutError::Disconnected),
                }
            } else if self.output.writer.buffer().is_empty() {
                queue.recv().map_err(|_| RecvTimeoutError::Disconnected)
            } else {
                queue.recv_timeout(FLUSH_INTERVAL)
            };
            let mut stop = match received {
                Ok(message) => {
                    lingering = true;
                    self.handle(message)
                }
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            while !stop {
                match queue.try_recv() {
                    Ok(message) => stop = self.handle(message),
                    Err(_) => break,
                }
                if self.last_flush.elapsed() >= FLUSH_INTERVAL {
                    self.tick();
                }
            }
            if stop {
                // Whatever raced in behind the stop message, bounded by the queue size.
                for message in queue.try_iter().take(capacity) {
                    self.handle(message);
                }
                self.tick();
                return;
            }
            self.tick();
        }
    }

    /// Returns true on a stop request.
    fn handle(&mut self, message: Message) -> bool {
        if !matches!(message, Message::Stop) {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        }
        match message {
            Message::Record(pending) => self.write_pending(*pending),
            Message::Stream(mut record) => {
                if let Some(info) = record.conn_id.and_then(|id| self.early.get(&id)) {
                    record.pid = Some(info.pid);
                    record.exe.clone_from(&info.exe);
                    record.cmdline.clone_from(&info.cmdline);
                    record.ancestry = Some(info.ancestry.clone());
                    record.exe_sha256.clone_from(&info.exe_sha256);
                }
                if record.ts.is_empty() {
                    record.ts = format_timestamp(SystemTime::now());
                }
                self.line.clear();
                match encode_line(&record, &mut self.line) {
                    Ok(()) => self.events.publish(&record, Some(&self.line)),
                    Err(e) => log::error!("{e}"),
                }
            }
            Message::Processes { conn_ids, reply } => {
                let found = conn_ids
                    .into_iter()
                    .filter_map(|id| Some((id, ProcessInfo::clone(self.early.get(&id)?))))
                    .collect();
                let _ = reply.send(found);
            }
            Message::Attribute {
                conn_id,
                query,
                done,
            } => {
                if let Some(info) = self.attribute_early(conn_id, &query) {
                    done.offer(info);
                }
                done.set();
            }
            Message::Stop => return true,
        }
        false
    }

    fn attribute_early(&mut self, conn_id: u64, query: &OwnerQuery) -> Option<&Arc<ProcessInfo>> {
        let info = self.attributor.as_mut()?.resolve(query)?;
        if self.early.len() >= EARLY_ATTRIBUTIONS_MAX {
            self.early.pop_first();
        }
        let slot = self.early.entry(conn_id).or_default();
        *slot = info;
        Some(slot)
    }

    fn write_pending(&mut self, pending: PendingRecord) {
        let PendingRecord { mut record, owner } = pending;
        if let Some(owner) = &owner {
            record.uid = record.uid.or(Some(owner.owner.uid));
            record.cgroup_id = record.cgroup_id.or(owner.owner.cgroup_id);
        }
        if record.pid.is_none() {
            // The last record of a connection, or a query's only one, takes it.
            let last = matches!(record.event, Event::End | Event::Dns);
            let early = record.conn_id.and_then(|id| {
                if last {
                    self.early.remove(&id)
                } else {
                    self.early.get(&id).cloned()
                }
            });
            let late = || {
                let attributor = self.attributor.as_mut()?;
                attributor.resolve(owner.as_ref()?)
            };
            if let Some(info) = early.or_else(late).map(Arc::unwrap_or_clone) {
                record.pid = Some(info.pid);
                record.exe = record.exe.or(info.exe);
                record.cmdline = record.cmdline.or(info.cmdline);
                record.ancestry = record.ancestry.or(Some(info.ancestry));
                record.exe_sha256 = record.exe_sha256.or(info.exe_sha256);
            }
        } else if matches!(record.event, Event::End | Event::Dns) {
            if let Some(id) = record.conn_id {
                self.early.remove(&id);
            }
        }
        self.write_record(&record);
    }

    fn write_record(&mut self, record: &Record) {
        self.reopen_if_requested();
        let stamped;
        let record = if record.ts.is_empty() {
            stamped = Record {
                ts: format_timestamp(SystemTime::now()),
                ..record.clone()
            };
            &stamped
        } else {
            record
        };
        // The event stream and the recent denials always carry our JSON
        // records; in OCSF they are encoded only when one of them takes it.
        let json = self.format == AuditFormat::Json || self.events.wants_line(record);
        self.line.clear();
        if json {
            if let Err(e) = encode_line(record, &mut self.line) {
                log::error!("{e}");
                return;
            }
        }
        self.events.publish(record, json.then_some(&self.line[..]));
        let line = match self.format {
            AuditFormat::Json => &self.line,
            AuditFormat::Ocsf => {
                self.ocsf_line.clear();
                if let Err(e) = encode_ocsf_line(record, &mut self.ocsf_line) {
                    log::error!("{e}");
                    return;
                }
                &self.ocsf_line
            }
        };
        let written = self.output.writer.write_all(line);
        self.note_write_result(written);
    }

    /// Logs the first failure of a run of failures, and the recovery.
    fn note_write_result(&mut self, result: io::Result<()>) {
        match (result, self.write_failing) {
            (Err(e), false) => {
                log::error!("cannot write the audit log: {e}; records are being lost");
                self.write_failing = true;
            }
            (Ok(()), true) => {
                log::warn!("audit log writable again");
                self.write_failing = false;
            }
            _ => {}
        }
    }

    fn reopen_if_requested(&mut self) {
        let now = Instant::now();
        if self.reopen_retry_at.is_some_and(|at| now >= at) {
            self.reopen_retry_at = None;
            self.shared.reopen.store(true, Ordering::Release);
        }
        if self.reopen_retry_at.is_none()
            && now.duration_since(self.last_rotation_check) >= ROTATION_CHECK
        {
            self.last_rotation_check = now;
            if self.output.rotated() {
                self.shared.reopen.store(true, Ordering::Release);
            }
        }
        if !self.shared.reopen.swap(false, Ordering::AcqRel) {
            return;
        }
        let Some(path) = self.output.path.clone() else {
            return;
        };
        let flushed = self.output.writer.flush();
        self.note_write_result(flushed);
        match open_append(&path) {
            Ok((file, identity)) => {
                self.output.writer = BufWriter::with_capacity(64 * 1024, Box::new(file));
                self.output.identity = identity;
            }
            Err(e) => {
                log::error!("{e}; still writing to the previous file");
                self.reopen_retry_at = Some(Instant::now() + REOPEN_RETRY);
            }
        }
    }

    /// Report new drops, then flush.
    fn tick(&mut self) {
        let dropped = self.shared.dropped.load(Ordering::Relaxed);
        if dropped > self.reported_drops {
            let lost = dropped - self.reported_drops;
            self.reported_drops = dropped;
            log::warn!("audit queue full: {lost} records dropped");
            self.write_record(&Record {
                event: Event::AuditDrops,
                dropped: Some(lost),
                ..Record::default()
            });
        }
        let flushed = self.output.writer.flush();
        self.note_write_result(flushed);
        self.last_flush = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis)
    }

    #[test]
    fn timestamps_are_rfc3339_utc_millis() {
        // Expected values from GNU date -u.
        for ((secs, millis), want) in [
            ((0, 0), "1970-01-01T00:00:00.000Z"),
            ((951_782_400, 7), "2000-02-29T00:00:00.007Z"),
            ((1_795_595_425, 123), "2026-11-25T08:30:25.123Z"),
            ((4_107_542_399, 999), "2100-02-28T23:59:59.999Z"),
            ((1_709_164_800, 0), "2024-02-29T00:00:00.000Z"),
        ] {
            assert_eq!(format_timestamp(at(secs, millis)), want);
        }
        assert_eq!(
            format_timestamp(UNIX_EPOCH - Duration::from_secs(5)),
            "1970-01-01T00:00:00.000Z"
        );
    }

    #[test]
    fn timestamps_parse_back_to_epoch_millis() {
        for millis in [0, 951_782_400_007, 1_795_595_425_123, 4_107_542_399_999] {
            let ts = format_timestamp(UNIX_EPOCH + Duration::from_millis(millis));
            assert_eq!(parse_timestamp(&ts), Some(millis), "{ts}");
        }
        for bad in [
            "",
            "2026-11-25T08:30:25Z",
            "2026-13-25T08:30:25.123Z",
            "2026-11-25 08:30:25.123Z",
            "2026-11-25T08:30:25.12xZ",
            "1969-12-31T23:59:59.999Z",
            "+026-11-25T08:30:25.123Z",
        ] {
            assert_eq!(parse_timestamp(bad), None, "{bad}");
        }
    }

    #[test]
    fn record_json_has_every_field() {
        let mut line = Vec::new();
        encode_line(&Record::default(), &mut line).unwrap();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        let object = value.as_object().unwrap();
        for field in [
            "ts",
            "event",
            "conn_id",
            "agent",
            "cgroup_id",
            "pid",
            "uid",
            "exe",
            "cmdline",
            "ancestry",
            "src",
            "dst",
            "proto",
            "host",
            "sni",
            "http_host",
            "ech",
            "rule",
            "outbound",
            "verdict",
            "dial",
            "upstream",
            "sniff",
            "listener",
            "bytes_up",
            "bytes_down",
            "duration_ms",
            "error",
        ] {
            assert!(object.contains_key(field), "missing {field}");
        }
        assert!(object["pid"].is_null());
        assert!(!object.contains_key("dropped"));
        assert_eq!(object.len(), 28);
    }

    /// The loop is woken only when it watches: a set before the watch is seen by
    /// the watch itself, a set after it wakes the loop.
    #[test]
    fn attribution_done_wakes_only_a_watching_loop() {
        let mut poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(7)).unwrap());
        let mut events = mio::Events::with_capacity(4);
        let woken = |poll: &mut mio::Poll, events: &mut mio::Events| {
            poll.poll(events, Some(Duration::from_millis(50))).unwrap();
            !events.is_empty()
        };

        let unwatched = AttributionDone::new(waker.clone());
        unwatched.set();
        assert!(unwatched.is_done());
        assert!(!woken(&mut poll, &mut events), "nobody watched: no wake-up");
        assert!(unwatched.watch(), "watching a finished one says so");

        let watched = AttributionDone::new(waker);
        assert!(!watched.watch());
        assert!(!watched.is_done());
        watched.set();
        assert!(watched.is_done());
        assert!(woken(&mut poll, &mut events), "the watching loop is woken");
    }

    #[test]
    fn sink_from_config() {
        assert_eq!(Sink::from_config(None), Sink::Stdout);
        assert_eq!(
            Sink::from_config(Some(std::path::Path::new("/var/log/a.jsonl"))),
            Sink::File(PathBuf::from("/var/log/a.jsonl"))
        );
    }

    #[test]
    fn record_json_escapes_hostile_strings() {
        let record = Record {
            cmdline: Some(vec!["a\nb".into(), "\"}{".into()]),
            error: Some("line\r\nbreak\u{0}".into()),
            dropped: Some(3),
            ..Record::default()
        };
        let mut line = Vec::new();
        encode_line(&record, &mut line).unwrap();
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["cmdline"][0], "a\nb");
        assert_eq!(value["dropped"], 3);
    }
}
