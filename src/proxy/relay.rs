//! Moving bytes one way between two non-blocking sockets.
//!
//! A young flow is copied through its thread's scratch buffer: a TLS
//! handshake or an API call moves a few KiB, and for that read(2) + send(2)
//! cost less than splice(2)'s pipe pages. Past [`SPLICE_AFTER`] bytes the flow
//! is bulk and goes through a pipe, which keeps the payload in the kernel; when
//! no pipe can be had (fd exhaustion) a small user-space buffer does the same
//! job. Bytes the destination did not take wait in a buffer of the flow's own.
//! All are
//! driven edge-triggered: every call drains until the kernel says EAGAIN, so the
//! next readiness edge is guaranteed to come. A side that said EAGAIN is not
//! tried again until the event loop reports it ready: an event on one socket
//! costs no probing syscall on the other.
//!
//! Empty pipes are kept for reuse by their worker thread: with short
//! connections, pipe2(2) and the closes of both pipes were six of the
//! proxy's ~45 syscalls per connection.

use crate::sniff::{Refusal, RequestStream};
use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A new pipe's capacity (the kernel's default): the most one splice moves.
const PIPE_DEFAULT: usize = 64 * 1024;
/// A flow that has moved this much is bulk: its pipe grows to [`PIPE_BULK`],
/// so each splice pair moves more (measured: proxy CPU per GB of raw TCP
/// 0.40 -> 0.32 s). Pages are only referenced while data is in flight.
const GROW_AFTER: u64 = 1 << 20;
const PIPE_BULK: usize = 1 << 20;
const FALLBACK_BUFFER: usize = 16 * 1024;
/// Bytes a flow copies through the scratch buffer before it splices.
const SPLICE_AFTER: u64 = 64 * 1024;
/// One read's most while copying: a TLS record (16 KiB) and then some.
const SCRATCH: usize = 32 * 1024;
/// Empty pipes a worker thread keeps for its next connections (two fds each).
const SPARE_PIPES_MAX: usize = 64;

thread_local! {
    static SPARE_PIPES: RefCell<Vec<((OwnedFd, OwnedFd), usize)>> = const { RefCell::new(Vec::new()) };
    static SCRATCH_BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// A pipe and how many bytes it holds. Dropped empty, it goes back to the
/// thread's spares; dropped holding bytes, it is closed (and they are lost,
/// as when the connection is torn down).
struct Pipe {
    /// (read end, write end); None only inside `drop`.
    ends: Option<(OwnedFd, OwnedFd)>,
    held: usize,
    capacity: usize,
}

impl Pipe {
    /// A spare pipe, or a new one; None when the process has no fds to spare.
    fn take() -> Option<Pipe> {
        let spare = SPARE_PIPES
            .try_with(|spares| spares.borrow_mut().pop())
            .ok()
            .flatten();
        let (ends, capacity) = match spare {
            Some(spare) => spare,
            None => (new_pipe()?, PIPE_DEFAULT),
        };
        Some(Pipe {
            ends: Some(ends),
            held: 0,
            capacity,
        })
    }

    /// Ask for [`PIPE_BULK`]; a refusal (the per-user pipe limit without
    /// CAP_SYS_RESOURCE) keeps the pipe as it is.
    fn grow(&mut self) {
        if self.capacity >= PIPE_BULK {
            return;
        }
        // SAFETY: fcntl on our own pipe fd; no pointers.
        let got = unsafe { libc::fcntl(self.write_fd(), libc::F_SETPIPE_SZ, PIPE_BULK as i32) };
        // Also on refusal: do not ask again for this pipe.
        self.capacity = usize::try_from(got).unwrap_or(PIPE_BULK).max(PIPE_DEFAULT);
    }

    fn read_fd(&self) -> RawFd {
        self.ends.as_ref().map_or(-1, |(r, _)| r.as_raw_fd())
    }

    fn write_fd(&self) -> RawFd {
        self.ends.as_ref().map_or(-1, |(_, w)| w.as_raw_fd())
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        let Some(ends) = self.ends.take() else {
            return;
        };
        if self.held != 0 {
            return;
        }
        // During thread exit the spares are gone: the ends just close.
        let _ = SPARE_PIPES.try_with(|spares| {
            let mut spares = spares.borrow_mut();
            if spares.len() < SPARE_PIPES_MAX {
                spares.push((ends, self.capacity));
            }
        });
    }
}

fn new_pipe() -> Option<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array we own.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if rc != 0 {
        return None;
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Some(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// What a flow waits for after a pump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pump {
    /// Drained the source: wait for it to be readable.
    WaitRead,
    /// The destination is full: wait for it to be writable.
    WaitWrite,
    /// The source ended and its end was passed on (shutdown of the destination's write side).
    Finished,
    /// The per-event byte budget ran out with work left: call again soon.
    Budget,
    /// The inspected source sent what must not pass (`Flow::refusal` says
    /// what); nothing of it was passed on.
    Refused,
}

enum Channel {
    /// Not needed yet: nothing has flowed (idle connections hold no pipe).
    Unset,
    /// Through the thread's scratch buffer; holds nothing between calls.
    Copy,
    Pipe(Pipe),
    Buffer {
        buf: Box<[u8]>,
        start: usize,
        end: usize,
        /// What a copy's destination did not take: the buffer goes once
        /// it is empty.
        leftover: bool,
    },
}

/// One direction of a relayed connection.
pub struct Flow {
    /// Bytes to deliver before anything read from the source: the client's
    /// sniffed bytes, or what an upstream proxy sent after its handshake.
    prefix: Vec<u8>,
    prefix_sent: usize,
    channel: Channel,
    source_ended: bool,
    finished: bool,
    /// The source may have bytes: no EAGAIN or short read from it since it
    /// was last reported readable.
    source_ready: bool,
    /// The source was reported closed or in error: a short read is no sign
    /// that it is drained (its end, or the error, is still to be read), and
    /// no later edge would say so.
    source_closing: bool,
    /// The destination may take bytes: no EAGAIN since it was last reported writable.
    dest_ready: bool,
    /// Payload bytes delivered to the destination.
    pub delivered: u64,
    /// Follows the requests of a plain-HTTP client: its bytes go through a
    /// buffer (not splice) to be read before they are passed on.
    inspect: Option<RequestStream>,
    /// Why an inspected flow was stopped.
    pub refusal: Option<String>,
}

impl Flow {
    pub fn new(prefix: Vec<u8>) -> Flow {
        Flow {
            prefix,
            prefix_sent: 0,
            channel: Channel::Unset,
            source_ended: false,
            finished: false,
            source_ready: true,
            source_closing: false,
            dest_ready: true,
            delivered: 0,
            inspect: None,
            refusal: None,
        }
    }

    /// A flow whose every byte `inspect` reads first, `prefix` included; an
    /// error if the prefix already must not pass.
    pub fn inspected(prefix: Vec<u8>, mut inspect: RequestStream) -> Result<Flow, Refusal> {
        inspect.feed(&prefix)?;
        Ok(Flow {
            inspect: Some(inspect),
            ..Flow::new(prefix)
        })
    }

    /// The event loop reported the source readable, or `closing`: closed
    /// for reading or in error.
    pub fn source_readable(&mut self, closing: bool) {
        self.source_ready = true;
        self.source_closing |= closing;
    }

    /// The source was read to its bottom before this flow took it over (by
    /// the sniffer): no read until it is reported readable again.
    pub fn source_drained(&mut self) {
        self.source_ready = false;
    }

    /// What `before`, which had the same source, knew of it.
    pub fn keep_source_state(&mut self, before: &Flow) {
        self.source_ready = before.source_ready;
        self.source_closing = before.source_closing;
    }

    /// The event loop reported the destination writable (or closed, or in error).
    pub fn dest_writable(&mut self) {
        self.dest_ready = true;
    }

    /// True when no byte is held between the two sockets.
    pub fn is_empty(&self) -> bool {
        self.prefix_sent == self.prefix.len()
            && match &self.channel {
                Channel::Unset | Channel::Copy => true,
                Channel::Pipe(pipe) => pipe.held == 0,
                Channel::Buffer { start, end, .. } => start == end,
            }
    }

    /// Give back the pipe or buffer of an idle flow; made again on next use.
    pub fn release_idle(&mut self) {
        if self.is_empty() {
            self.channel = Channel::Unset;
        }
    }

    /// True while bytes wait for the destination to take them.
    pub fn waits_to_write(&self) -> bool {
        !self.dest_ready && !self.finished
    }

    /// True once the source's end was passed on.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Move bytes from `src` to `dst` until one of them would block, the
    /// source ends, or `budget` bytes have moved. `closing_next`: the caller
    /// closes both sockets as soon as this flow finishes (the other direction
    /// is over), and the close passes the end on: no shutdown call needed.
    pub fn pump(
        &mut self,
        src: RawFd,
        dst: RawFd,
        budget: &mut usize,
        closing_next: bool,
    ) -> io::Result<Pump> {
        if self.finished {
            return Ok(Pump::Finished);
        }
        if !self.dest_ready {
            return Ok(Pump::WaitWrite);
        }
        while self.prefix_sent < self.prefix.len() {
            match write_fd(dst, &self.prefix[self.prefix_sent..]) {
                Ok(n) => {
                    self.prefix_sent += n;
                    self.delivered += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.dest_ready = false;
                    return Ok(Pump::WaitWrite);
                }
                Err(e) => return Err(e),
            }
        }
        if !self.prefix.is_empty() {
            self.prefix = Vec::new();
            self.prefix_sent = 0;
        }
        loop {
            if self.flush(dst)? {
                self.dest_ready = false;
                return Ok(Pump::WaitWrite);
            }
            if self.source_ended {
                if !closing_next {
                    shutdown_write(dst)?;
                }
                self.finished = true;
                self.channel = Channel::Unset;
                return Ok(Pump::Finished);
            }
            if *budget == 0 {
                return Ok(Pump::Budget);
            }
            if !self.source_ready {
                return Ok(Pump::WaitRead);
            }
            self.choose_channel();
            let mut short_read = false;
            let got = match &mut self.channel {
                Channel::Pipe(pipe) => {
                    if self.delivered >= GROW_AFTER {
                        pipe.grow();
                    }
                    let r = splice(src, pipe.write_fd(), pipe.capacity.min(*budget));
                    if let Ok(n) = r {
                        pipe.held += n;
                    }
                    r
                }
                Channel::Buffer {
                    buf, start, end, ..
                } => {
                    *start = 0;
                    let len = (*budget).min(buf.len());
                    let r = read_fd(src, &mut buf[..len]);
                    *end = *r.as_ref().unwrap_or(&0);
                    short_read = is_short(*r.as_ref().unwrap_or(&0), len);
                    if let Some(inspect) = &mut self.inspect {
                        if let Err(why) = inspect.feed(&buf[..*end]) {
                            *end = 0;
                            self.refusal = Some(why.to_string());
                            return Ok(Pump::Refused);
                        }
                    }
                    r
                }
                Channel::Copy => {
                    let len = (*budget).min(SCRATCH);
                    match self.copy(src, dst, len) {
                        Ok(Some(n)) => {
                            short_read = is_short(n, len);
                            Ok(n)
                        }
                        Ok(None) => {
                            self.dest_ready = false;
                            return Ok(Pump::WaitWrite);
                        }
                        Err(e) => Err(e),
                    }
                }
                Channel::Unset => Err(io::Error::other("relay channel missing")),
            };
            if short_read && !self.source_closing {
                self.source_ready = false;
            }
            match got {
                Ok(0) => self.source_ended = true,
                Ok(n) => *budget = budget.saturating_sub(n),
                // The channel was empty, so EAGAIN means the source is drained.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.source_ready = false;
                    return Ok(Pump::WaitRead);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The channel for the next read: a buffer for an inspected flow, the
    /// scratch buffer while the flow is young, then a pipe. A buffer that
    /// held what a young flow's destination did not take goes once it is empty.
    fn choose_channel(&mut self) {
        let young = self.delivered < SPLICE_AFTER;
        match &self.channel {
            Channel::Unset => {}
            Channel::Copy if young => return,
            Channel::Copy => {}
            Channel::Buffer {
                start,
                end,
                leftover: true,
                ..
            } if start == end => {}
            Channel::Buffer { .. } | Channel::Pipe(_) => return,
        }
        self.channel = match (&self.inspect, young) {
            (Some(_), _) => buffer_channel(),
            (None, true) => Channel::Copy,
            (None, false) => make_channel(),
        };
    }

    /// Read up to `len` bytes into the scratch buffer and send them on. What
    /// the destination does not take is kept in a buffer of the flow's own
    /// (None: the destination blocked). Ok(Some(0)) is the source's end.
    fn copy(&mut self, src: RawFd, dst: RawFd, len: usize) -> io::Result<Option<usize>> {
        SCRATCH_BUFFER.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let got = read_fd(src, &mut scratch[..len])?;
            let mut sent = 0;
            while sent < got {
                match write_fd(dst, &scratch[sent..got]) {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "destination accepted no bytes",
                        ))
                    }
                    Ok(n) => {
                        sent += n;
                        self.delivered += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        let rest = scratch[sent..got].to_vec().into_boxed_slice();
                        let end = rest.len();
                        self.channel = Channel::Buffer {
                            buf: rest,
                            start: 0,
                            end,
                            leftover: true,
                        };
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(Some(got))
        })
    }

    /// Write out what the channel holds; true if the destination blocked first.
    fn flush(&mut self, dst: RawFd) -> io::Result<bool> {
        loop {
            let sent = match &mut self.channel {
                Channel::Unset | Channel::Copy => return Ok(false),
                Channel::Pipe(pipe) => {
                    if pipe.held == 0 {
                        return Ok(false);
                    }
                    let r = splice(pipe.read_fd(), dst, pipe.held);
                    if let Ok(n) = r {
                        pipe.held -= n;
                    }
                    r
                }
                Channel::Buffer {
                    buf, start, end, ..
                } => {
                    if start == end {
                        return Ok(false);
                    }
                    let r = write_fd(dst, &buf[*start..*end]);
                    if let Ok(n) = r {
                        *start += n;
                    }
                    r
                }
            };
            match sent {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "destination accepted no bytes",
                    ))
                }
                Ok(n) => self.delivered += n as u64,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) => return Err(e),
            }
        }
    }
}

/// A pipe if the process has fds to spare, else a small buffer.
fn make_channel() -> Channel {
    match Pipe::take() {
        Some(pipe) => Channel::Pipe(pipe),
        None => buffer_channel(),
    }
}

fn buffer_channel() -> Channel {
    Channel::Buffer {
        buf: vec![0; FALLBACK_BUFFER].into_boxed_slice(),
        start: 0,
        end: 0,
        leftover: false,
    }
}

/// A read of fewer bytes than `asked` (not none: that is the end) took all
/// the socket held, and bytes that come later raise a new edge: no EAGAIN
/// probe is needed before waiting. (Not so for splice, which may stop short
/// when the pipe runs out of slots.)
fn is_short(got: usize, asked: usize) -> bool {
    got > 0 && got < asked
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: plain fds, null offsets (sockets and pipes have none).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for buf.len() bytes.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub fn write_fd(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for buf.len() bytes. MSG_NOSIGNAL: a closed peer
        // is an EPIPE error here, not a SIGPIPE that kills the daemon.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we hold.
    let rc = unsafe { libc::shutdown(fd, libc::SHUT_WR) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    // The peer may be gone already; its end is then no longer ours to signal.
    if e.raw_os_error() == Some(libc::ENOTCONN) {
        Ok(())
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    /// client -> [src ... dst] -> server: a flow's two sockets, non-blocking,
    /// and the ends that feed and drain them.
    fn relayed() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let (client, src) = pair();
        let (dst, server) = pair();
        src.set_nonblocking(true).unwrap();
        dst.set_nonblocking(true).unwrap();
        (client, src, dst, server)
    }

    /// What `server` reads to its end, read on a thread of its own.
    fn read_all(mut server: TcpStream) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            server.read_to_end(&mut out).unwrap();
            out
        })
    }

    /// Pumps `flow` from `src` to `dst` until it finishes, as if the event
    /// loop reported both sockets ready each time.
    fn pump_to_the_end(flow: &mut Flow, src: RawFd, dst: RawFd) {
        loop {
            flow.source_readable(false);
            flow.dest_writable();
            let mut budget = 1 << 20;
            if flow.pump(src, dst, &mut budget, false).unwrap() == Pump::Finished {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// client -> [src ... dst] -> server, with the flow in between.
    fn relay_all(prefix: &[u8], payload: &[u8], force_buffer: bool) -> Vec<u8> {
        let (mut client, src, dst, server) = relayed();
        let mut flow = Flow::new(prefix.to_vec());
        if force_buffer {
            flow.channel = buffer_channel();
        }
        let payload_owned = payload.to_vec();
        let writer = std::thread::spawn(move || {
            client.write_all(&payload_owned).unwrap();
            client.shutdown(std::net::Shutdown::Write).unwrap();
            client
        });
        let reader = read_all(server);
        pump_to_the_end(&mut flow, src.as_raw_fd(), dst.as_raw_fd());
        let _client = writer.join().unwrap();
        let out = reader.join().unwrap();
        assert_eq!(flow.delivered as usize, out.len());
        assert!(flow.finished);
        out
    }

    #[test]
    fn splices_prefix_then_stream_then_end() {
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let out = relay_all(b"HELLO", &payload, false);
        assert_eq!(&out[..5], b"HELLO");
        assert_eq!(&out[5..], &payload[..]);
        // Past GROW_AFTER the flow's pipe grew; finished, it went back empty.
        let sizes: Vec<i32> = SPARE_PIPES.with(|s| {
            s.borrow()
                .iter()
                // SAFETY: fcntl on a pipe fd the pool owns; no pointers.
                .map(|((_, w), _)| unsafe { libc::fcntl(w.as_raw_fd(), libc::F_GETPIPE_SZ) })
                .collect()
        });
        assert_eq!(sizes, vec![PIPE_BULK as i32]);
    }

    #[test]
    fn a_drained_source_is_not_read_again_until_reported_readable() {
        let (mut client, src, dst, mut server) = relayed();
        let (src, dst) = (src.as_raw_fd(), dst.as_raw_fd());
        let mut flow = Flow::new(Vec::new());
        let mut budget = 1 << 20;
        assert_eq!(
            flow.pump(src, dst, &mut budget, false).unwrap(),
            Pump::WaitRead
        );
        client.write_all(b"ping").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // No readiness reported: the bytes wait in the socket, untried.
        assert_eq!(
            flow.pump(src, dst, &mut budget, false).unwrap(),
            Pump::WaitRead
        );
        assert_eq!(flow.delivered, 0);
        flow.source_readable(false);
        assert_eq!(
            flow.pump(src, dst, &mut budget, false).unwrap(),
            Pump::WaitRead
        );
        assert_eq!(flow.delivered, 4);
        let mut got = [0u8; 4];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
    }

    /// Read system calls this thread has made (syscr of /proc/thread-self/io),
    /// and how many this very count adds.
    fn reads_so_far() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
        let line = io.lines().find_map(|l| l.strip_prefix("syscr: "));
        line.unwrap().parse().unwrap()
    }

    fn reads_made_by(f: impl FnOnce()) -> u64 {
        let counting = reads_so_far().abs_diff(reads_so_far());
        let before = reads_so_far();
        f();
        reads_so_far() - before - counting
    }

    #[test]
    fn a_short_read_waits_for_the_next_edge_unless_the_source_is_closing() {
        let (mut client, src, dst, mut server) = relayed();
        let (src, dst) = (src.as_raw_fd(), dst.as_raw_fd());
        let mut flow = Flow::new(Vec::new());
        let mut budget = 1 << 20;
        let mut pump_to = |flow: &mut Flow, want: Pump| {
            reads_made_by(|| assert_eq!(flow.pump(src, dst, &mut budget, false).unwrap(), want))
        };
        client.write_all(b"ping").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        flow.source_readable(false);
        // One read: four bytes of the scratch buffer's many took all there
        // was, so no second read to learn EAGAIN.
        let reads = pump_to(&mut flow, Pump::WaitRead);
        assert_eq!((reads, flow.delivered), (1, 4));
        // Bytes and the end together, reported closing: read to the end
        // although the first read is short.
        client.write_all(b"pong").unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        flow.source_readable(true);
        let reads = pump_to(&mut flow, Pump::Finished);
        assert_eq!((reads, flow.delivered), (2, 8));
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"pingpong");
    }

    #[test]
    fn a_flow_taking_over_a_drained_source_waits_for_its_next_edge() {
        let (mut client, src, dst, _server) = relayed();
        let (src, dst) = (src.as_raw_fd(), dst.as_raw_fd());
        let mut sniffer = Flow::new(Vec::new());
        sniffer.source_drained();
        let mut flow = Flow::new(b"sniffed".to_vec());
        flow.keep_source_state(&sniffer);
        let mut budget = 1 << 20;
        let reads = reads_made_by(|| {
            let pumped = flow.pump(src, dst, &mut budget, false).unwrap();
            assert_eq!(pumped, Pump::WaitRead);
        });
        assert_eq!((reads, flow.delivered), (0, 7), "the prefix only, no read");
        // Readable since, as the event loop said: the new flow knows.
        client.write_all(b"more").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        sniffer.source_readable(false);
        let mut flow = Flow::new(Vec::new());
        flow.keep_source_state(&sniffer);
        flow.pump(src, dst, &mut budget, false).unwrap();
        assert_eq!(flow.delivered, 4);
    }

    #[test]
    fn a_young_flow_copies_and_keeps_what_its_destination_did_not_take() {
        let (mut client, src) = pair();
        // A destination that takes little: small buffers on both of its ends.
        let small =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        small.set_recv_buffer_size(4096).unwrap();
        small
            .bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
        small.listen(1).unwrap();
        let listener = TcpListener::from(small);
        let dst = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        socket2::SockRef::from(&dst)
            .set_send_buffer_size(4096)
            .unwrap();
        src.set_nonblocking(true).unwrap();
        dst.set_nonblocking(true).unwrap();
        let payload: Vec<u8> = (0..60_000u32).map(|i| (i % 241) as u8).collect();
        client.write_all(&payload).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let (s, d) = (src.as_raw_fd(), dst.as_raw_fd());
        let mut flow = Flow::new(Vec::new());
        let mut budget = 1 << 20;
        // The server reads nothing yet: the destination fills up.
        assert_eq!(
            flow.pump(s, d, &mut budget, false).unwrap(),
            Pump::WaitWrite
        );
        assert!(matches!(
            flow.channel,
            Channel::Buffer { leftover: true, start, end, .. } if end > start
        ));
        assert_eq!(spare_count(), 0, "no pipe for a young flow");
        let reader = read_all(server);
        pump_to_the_end(&mut flow, s, d);
        assert_eq!(reader.join().unwrap(), payload);
        assert_eq!(flow.delivered, 60_000);
        assert_eq!(spare_count(), 0, "still young: no pipe was taken");
    }

    #[test]
    fn buffer_fallback_moves_the_same_bytes() {
        let payload: Vec<u8> = (0..500_000u32).map(|i| (i % 13) as u8).collect();
        let out = relay_all(b"", &payload, true);
        assert_eq!(out, payload);
    }

    #[test]
    fn idle_flow_holds_no_pipe() {
        let mut flow = Flow::new(Vec::new());
        assert!(matches!(flow.channel, Channel::Unset));
        flow.channel = make_channel();
        flow.release_idle();
        assert!(matches!(flow.channel, Channel::Unset));
    }

    fn spare_count() -> usize {
        SPARE_PIPES.with(|s| s.borrow().len())
    }

    #[test]
    fn empty_pipes_are_reused_and_full_ones_closed() {
        // Each test runs on its own thread: its spares start empty.
        assert_eq!(spare_count(), 0);
        let first = Pipe::take().unwrap();
        let fd = first.write_fd();
        drop(first);
        assert_eq!(spare_count(), 1);
        let again = Pipe::take().unwrap();
        assert_eq!(again.write_fd(), fd, "the spare pipe is handed out again");
        assert_eq!(spare_count(), 0);

        let mut holding = again;
        assert_eq!(write_pipe(holding.write_fd(), b"left over"), 9);
        holding.held = 9;
        drop(holding);
        assert_eq!(spare_count(), 0, "a pipe with bytes in it is not reused");

        let many: Vec<Pipe> = (0..SPARE_PIPES_MAX + 3)
            .filter_map(|_| Pipe::take())
            .collect();
        drop(many);
        assert_eq!(spare_count(), SPARE_PIPES_MAX);
    }

    fn write_pipe(fd: RawFd, bytes: &[u8]) -> isize {
        // SAFETY: bytes is valid for its length.
        unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) }
    }
}
