// SPDX-License-Identifier: GPL-3.0-or-later
//! The control API from the other side: what `mcp` and `watch` use to talk to
//! a running daemon over its Unix socket. One request per connection (the
//! server closes each after its answer), bounded in time and size.

use serde_json::Value;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A reply's body at most (the largest is a long list of connections).
const REPLY_MAX: u64 = 16 << 20;
/// A request that takes longer than this has failed (a reload takes seconds).
const REPLY_TIMEOUT: Duration = Duration::from_secs(40);
const HEADERS_MAX: usize = 32;

#[derive(Debug)]
pub enum ClientError {
    /// The socket could not be reached (no daemon, no control API, no permission).
    Connect(PathBuf, io::Error),
    Io(io::Error),
    /// The reply was not HTTP, or not JSON where JSON was due.
    Reply(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect(path, e) => write!(
                f,
                "cannot reach the control socket {}: {e} (is the daemon running with control.enable, and may this user open the socket?)",
                path.display()
            ),
            ClientError::Io(e) => write!(f, "control socket: {e}"),
            ClientError::Reply(why) => write!(f, "control socket: {why}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> ClientError {
        ClientError::Io(e)
    }
}

pub struct ControlClient {
    socket: PathBuf,
}

impl ControlClient {
    pub fn new(socket: &Path) -> ControlClient {
        ControlClient {
            socket: socket.to_path_buf(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// One request; the status and the JSON body (Null when there is none).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), ClientError> {
        let mut reader = self.send(method, path, body)?;
        let status = read_head(&mut reader)?;
        let mut text = Vec::new();
        reader.take(REPLY_MAX).read_to_end(&mut text)?;
        let body = if text.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            serde_json::from_slice(&text)
                .map_err(|e| ClientError::Reply(format!("{method} {path}: not JSON: {e}")))?
        };
        Ok((status, body))
    }

    /// The live event stream: one audit record per line, as long as the
    /// daemon keeps the connection open. `timeout`: how long a read may wait
    /// for the next line (None: for ever).
    pub fn events(&self, timeout: Option<Duration>) -> Result<impl BufRead + use<>, ClientError> {
        let mut reader = self.send("GET", "/v1/events", None)?;
        reader.get_ref().set_read_timeout(timeout)?;
        match read_head(&mut reader)? {
            200 => Ok(reader),
            status => {
                let mut text = String::new();
                let _ = reader.take(4096).read_to_string(&mut text);
                Err(ClientError::Reply(format!(
                    "GET /v1/events: status {status}: {}",
                    text.trim()
                )))
            }
        }
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<BufReader<UnixStream>, ClientError> {
        let mut stream = UnixStream::connect(&self.socket)
            .map_err(|e| ClientError::Connect(self.socket.clone(), e))?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        let body = body.map(Value::to_string).unwrap_or_default();
        let content_type = if body.is_empty() {
            ""
        } else {
            "Content-Type: application/json\r\n"
        };
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: agent-egress\r\n{content_type}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        Ok(BufReader::new(stream))
    }
}

/// Reads the status line and headers; the status code.
fn read_head(reader: &mut BufReader<UnixStream>) -> Result<u16, ClientError> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let before = head.len();
        reader.by_ref().take(8192).read_until(b'\n', &mut head)?;
        if head.len() == before || head.len() > 64 * 1024 {
            return Err(ClientError::Reply("no complete HTTP reply head".into()));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut reply = httparse::Response::new(&mut headers);
    match reply.parse(&head) {
        Ok(httparse::Status::Complete(_)) => reply
            .code
            .ok_or_else(|| ClientError::Reply("a reply without a status".into())),
        Ok(httparse::Status::Partial) => Err(ClientError::Reply("a reply cut short".into())),
        Err(e) => Err(ClientError::Reply(format!("not an HTTP reply: {e}"))),
    }
}
