// SPDX-License-Identifier: GPL-3.0-or-later
//! The control API's HTTP/1.1 server: one thread accepting on the Unix socket,
//! one short-lived thread per client (bounded), one request per connection.
//! httparse reads the request head: a small, widely used, fuzzed parser with
//! no runtime of its own, which fits a server that must not pull an async
//! runtime into a synchronous daemon.
//!
//! Bounds: `MAX_CLIENTS` at once (503 beyond), a request head of `HEAD_MAX`
//! (431), a body of `BODY_MAX` (413), the whole request within
//! `REQUEST_DEADLINE` (408: silent and slow clients), every write within
//! `WRITE_TIMEOUT`.

use super::routes::{self, Reply};
use super::socket::Peer;
use super::Control;
use serde_json::{json, Value};
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const MAX_CLIENTS: usize = 128;
pub const HEAD_MAX: usize = 16 * 1024;
pub const BODY_MAX: usize = 64 * 1024;
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a quiet event stream looks whether its client is still there.
const STREAM_PROBE: Duration = Duration::from_secs(5);
/// After an event, a watcher waits this long for more before it writes: a
/// busy proxy's events reach its client a few at a time, in one write and one
/// wake-up of the client, not one each (2,400 events a second are a dozen a
/// write), for at most this much delay.
const STREAM_LINGER: Duration = Duration::from_millis(5);
const MAX_HEADERS: usize = 64;
const CLIENT_STACK: usize = 256 * 1024;

/// A parsed request.
pub struct Request {
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// What follows the `?`, if anything (not decoded).
    pub query: String,
    pub accept: Option<String>,
    pub body: Vec<u8>,
    pub peer: Peer,
}

#[derive(Default)]
pub struct Counters {
    pub clients: AtomicUsize,
    pub requests: AtomicU64,
    pub refused_busy: AtomicU64,
    pub timed_out: AtomicU64,
}

/// Accept until `stop`; each client on a thread of its own.
pub fn serve(listener: UnixListener, control: Arc<Control>, stop: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                log::warn!("control socket: accept: {e}");
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let counters = &control.counters;
        if counters.clients.fetch_add(1, Ordering::AcqRel) >= MAX_CLIENTS {
            counters.clients.fetch_sub(1, Ordering::AcqRel);
            counters.refused_busy.fetch_add(1, Ordering::Relaxed);
            let mut stream = stream;
            let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
            let _ = write_reply(
                &mut stream,
                &Reply::error(503, "", "too many control clients at once"),
            );
            continue;
        }
        let serving = control.clone();
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .stack_size(CLIENT_STACK)
            .spawn(move || {
                client(stream, &serving);
                serving.counters.clients.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            control.counters.clients.fetch_sub(1, Ordering::AcqRel);
            log::warn!("control socket: cannot start a client thread: {e}");
        }
    }
}

fn client(mut stream: UnixStream, control: &Control) {
    let peer = match Peer::of(&stream) {
        Ok(p) => p,
        Err(e) => {
            log::warn!("control socket: no peer credentials: {e}");
            return;
        }
    };
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let reply = match read_request(&mut stream, peer.clone()) {
        Ok(request) => {
            control.counters.requests.fetch_add(1, Ordering::Relaxed);
            let reply = routes::dispatch(control, &request);
            log::info!(
                "control: {} {} by uid {} pid {} ({}): {}",
                request.method,
                request.path,
                peer.uid,
                peer.pid,
                peer.exe.as_deref().unwrap_or("?"),
                reply.status()
            );
            reply
        }
        Err(reply) => {
            if reply.status() == 408 {
                control.counters.timed_out.fetch_add(1, Ordering::Relaxed);
            }
            log::info!(
                "control: bad request by uid {} pid {}: {}",
                peer.uid,
                peer.pid,
                reply.status()
            );
            reply
        }
    };
    match reply {
        Reply::Events { sse, watcher } => stream_events(stream, control, sse, watcher),
        reply => {
            if write_reply(&mut stream, &reply).is_ok() {
                linger(&mut stream);
            }
        }
    }
}

/// Closing with unread bytes (a refused body) would make the kernel reset
/// the client before it reads the answer: end our side, then read and discard
/// what still comes, briefly and boundedly.
fn linger(stream: &mut UnixStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut sink = [0u8; 4096];
    let mut left = 4 * BODY_MAX;
    while left > 0 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// The request, or the error reply to send instead.
fn read_request(stream: &mut UnixStream, peer: Peer) -> Result<Request, Reply> {
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let (head_len, method, path, query, accept, length) = loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let header = |name: &str| {
                    parsed
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).into_owned())
                };
                if header("transfer-encoding").is_some() {
                    return Err(Reply::error(
                        411,
                        "transfer-encoding",
                        "send a Content-Length",
                    ));
                }
                let length = match header("content-length") {
                    None => 0,
                    Some(v) => v
                        .trim()
                        .parse::<usize>()
                        .map_err(|_| Reply::error(400, "content-length", "not a number"))?,
                };
                if length > BODY_MAX {
                    return Err(Reply::error(413, "body", &format!("over {BODY_MAX} bytes")));
                }
                let method = parsed.method.unwrap_or_default().to_string();
                let target = parsed.path.unwrap_or_default();
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                let (path, query) = (path.to_string(), query.to_string());
                // curl asks first for a body over 1 KiB, and would wait a second.
                let expect =
                    header("expect").is_some_and(|e| e.eq_ignore_ascii_case("100-continue"));
                if expect && length > 0 && buf.len() == n {
                    stream
                        .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                        .map_err(|e| Reply::error(400, "request", &e.to_string()))?;
                }
                break (n, method, path, query, header("accept"), length);
            }
            Ok(httparse::Status::Partial) if buf.len() >= HEAD_MAX => {
                return Err(Reply::error(
                    431,
                    "headers",
                    &format!("request head over {HEAD_MAX} bytes"),
                ));
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(Reply::error(400, "request", &format!("not HTTP/1.x: {e}"))),
        }
        let n = read_before(stream, &mut chunk, deadline)?;
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut body = buf.split_off(head_len);
    while body.len() < length {
        let n = read_before(stream, &mut chunk, deadline)?;
        body.extend_from_slice(&chunk[..n]);
    }
    if body.len() > length {
        return Err(Reply::error(
            400,
            "body",
            "longer than its Content-Length (one request per connection)",
        ));
    }
    Ok(Request {
        method,
        path,
        query,
        accept,
        body,
        peer,
    })
}

/// Some bytes, before `deadline`; EOF and errors end the request.
fn read_before(
    stream: &mut UnixStream,
    chunk: &mut [u8],
    deadline: Instant,
) -> Result<usize, Reply> {
    let timed_out = || {
        Reply::error(
            408,
            "request",
            &format!("not received within {REQUEST_DEADLINE:?}"),
        )
    };
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(timed_out());
    }
    let _ = stream.set_read_timeout(Some(left));
    match stream.read(chunk) {
        Ok(0) => Err(Reply::error(
            400,
            "request",
            "closed before the request was whole",
        )),
        Ok(n) => Ok(n),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(timed_out())
        }
        Err(e) => Err(Reply::error(400, "request", &e.to_string())),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

fn write_reply(stream: &mut UnixStream, reply: &Reply) -> io::Result<()> {
    let Reply::Json {
        status,
        body,
        allow,
    } = reply
    else {
        return Ok(());
    };
    let mut text = serde_json::to_vec_pretty(body).map_err(io::Error::other)?;
    text.push(b'\n');
    let allow = allow.map(|a| format!("Allow: {a}\r\n")).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        reason(*status),
        text.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(&text)?;
    stream.flush()
}

/// Lines as they come, until the client leaves or is cut off (its queue full).
fn stream_events(
    mut stream: UnixStream,
    control: &Control,
    sse: bool,
    watcher: super::events::Watcher,
) {
    let bus = control.audit.events();
    let (id, lines) = watcher;
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    );
    let mut ok = stream.write_all(head.as_bytes()).is_ok();
    let mut batch = Vec::new();
    while ok {
        match lines.recv_timeout(STREAM_PROBE) {
            Ok(line) => {
                // What queues meanwhile goes in the same write.
                batch.clear();
                frame_line(&mut batch, &line, sse);
                std::thread::sleep(STREAM_LINGER);
                for line in lines.try_iter().take(super::events::WATCHER_BUFFER) {
                    frame_line(&mut batch, &line, sse);
                }
                ok = stream.write_all(&batch).is_ok();
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                ok = client_still_there(&stream)
                    && (!sse || stream.write_all(b": keep-alive\n\n").is_ok());
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // The bus dropped this watcher: it fell a whole buffer behind.
                let notice = json!({"event": "cut_off", "reason": format!(
                    "this client fell {} events behind", super::events::WATCHER_BUFFER)});
                let mut line = notice.to_string().into_bytes();
                line.push(b'\n');
                batch.clear();
                frame_line(&mut batch, &line, sse);
                let _ = stream.write_all(&batch);
                break;
            }
        }
    }
    bus.unsubscribe(id);
}

/// One event as the stream frames it: a JSON line, or an SSE `data:` event.
fn frame_line(out: &mut Vec<u8>, line: &[u8], sse: bool) {
    if sse {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    } else {
        out.extend_from_slice(line);
    }
}

/// No EOF waiting on the socket (what the client sends is ignored).
fn client_still_there(stream: &UnixStream) -> bool {
    let mut byte = [0u8; 1];
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut reader: &UnixStream = stream;
    let there = match reader.read(&mut byte) {
        Ok(0) => false,
        Ok(_) => true,
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    };
    there && stream.set_nonblocking(false).is_ok()
}

/// A JSON body, or the error naming the field that is wrong.
pub fn json_body(request: &Request) -> Result<Value, Reply> {
    if request.body.is_empty() {
        return Err(Reply::error(400, "body", "expected a JSON object"));
    }
    serde_json::from_slice(&request.body)
        .map_err(|e| Reply::error(400, "body", &format!("not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// About the deepest JSON serde_json takes (it stops at 128 levels), parsed and
    /// checked as a rule on a client thread's stack.
    #[test]
    fn a_client_thread_survives_the_deepest_body() {
        let depth = 120;
        let body = format!(
            r#"{{"domains": {}{}, "outbound": "direct"}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let config = crate::config::Config::default();
        let worker = std::thread::Builder::new()
            .stack_size(CLIENT_STACK)
            .spawn(move || {
                let value: Result<Value, _> = serde_json::from_str(&body);
                let too_deep: Result<Value, _> =
                    serde_json::from_str(&format!("{}{}", "[".repeat(200), "]".repeat(200)));
                assert!(too_deep.is_err());
                value.map(|v| config.runtime_rule("", &v, &[]).is_err())
            })
            .unwrap();
        assert!(matches!(worker.join().unwrap(), Ok(true)));
    }
}
