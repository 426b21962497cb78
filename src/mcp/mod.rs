// SPDX-License-Identifier: GPL-3.0-or-later
//! `agent-egress mcp`: the control API as Model Context Protocol tools, so an
//! AI supervisor can watch and steer a running daemon.
//!
//! stdio transport: one JSON-RPC 2.0 message per line in, one per line out;
//! diagnostics go to standard error. Dual-era, as the 2026-07-28 revision's
//! versioning page describes: a request whose `_meta` names a protocol
//! version is served statelessly by that revision (`server/discover`, every
//! result with `resultType`), and an `initialize` opens the handshake-based
//! revisions that clients of 2025 still speak (`initialize` →
//! `notifications/initialized` → `tools/list` → `tools/call`).

mod tools;

use crate::control::client::ControlClient;
use serde_json::{json, Map, Value};
use std::io::{self, BufRead, Read, Write};
use std::path::Path;

/// The stateless revision, served to requests that carry their version.
const MODERN: &str = "2026-07-28";
/// The handshake revisions `initialize` may agree on, newest first.
const LEGACY: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];
/// A message longer than this is refused (and the rest of its line skipped).
const MESSAGE_MAX: usize = 1 << 20;

const VERSION_KEY: &str = "io.modelcontextprotocol/protocolVersion";
const CAPABILITIES_KEY: &str = "io.modelcontextprotocol/clientCapabilities";

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const UNSUPPORTED_PROTOCOL_VERSION: i64 = -32022;

const INSTRUCTIONS: &str = "agent-egress decides every outbound connection and DNS query of the AI agents on this host and records each one. These tools read what it decided (recent denials, live connections, why a host is allowed or refused) and change what it allows at run time (runtime rules, asked before the configured ones, removable, optionally expiring; rules the config locks cannot be widened). wait_for_denial lets a supervisor sit in a loop until an agent is refused something.";

/// Serves MCP on standard input and output until input ends; 0 then.
pub fn run(socket: &Path) -> i32 {
    let client = ControlClient::new(socket);
    let stdin = io::stdin();
    let stdout = io::stdout();
    let mut server = Server {
        client,
        legacy: None,
    };
    match server.serve(stdin.lock(), &mut stdout.lock()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("agent-egress mcp: {e}");
            1
        }
    }
}

struct Server {
    client: ControlClient,
    /// The revision an `initialize` agreed on, for requests without `_meta`.
    legacy: Option<&'static str>,
}

/// What a request gets back: a result object or a JSON-RPC error.
enum Outcome {
    Result(Value),
    Error {
        code: i64,
        message: String,
        data: Option<Value>,
    },
}

fn error(code: i64, message: impl Into<String>) -> Outcome {
    Outcome::Error {
        code,
        message: message.into(),
        data: None,
    }
}

impl Server {
    fn serve(&mut self, mut input: impl BufRead, output: &mut impl Write) -> io::Result<()> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let read =
                Read::take(&mut input, MESSAGE_MAX as u64 + 1).read_until(b'\n', &mut line)?;
            if read == 0 {
                return Ok(());
            }
            if line.len() > MESSAGE_MAX && !line.ends_with(b"\n") {
                skip_rest_of_line(&mut input)?;
                reply_error(output, Value::Null, INVALID_REQUEST, "message over 1 MiB")?;
                continue;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Value>(&line) {
                Ok(message) => {
                    if let Some(reply) = self.handle(message) {
                        write_line(output, &reply)?;
                    }
                }
                Err(e) => reply_error(output, Value::Null, PARSE_ERROR, &format!("not JSON: {e}"))?,
            }
        }
    }

    /// The reply to one message; None for a notification (or a response).
    fn handle(&mut self, message: Value) -> Option<Value> {
        let Value::Object(message) = message else {
            return Some(reply(
                Value::Null,
                error(INVALID_REQUEST, "a message is one JSON object (no batches)"),
            ));
        };
        let id = message.get("id").cloned();
        let Some(method) = message.get("method").and_then(Value::as_str) else {
            // A response to nothing we asked, or garbage with an id.
            return id
                .filter(|_| !message.contains_key("result") && !message.contains_key("error"))
                .map(|id| reply(id, error(INVALID_REQUEST, "no method")));
        };
        let params = message.get("params").cloned().unwrap_or(Value::Null);
        let Some(id) = id.filter(|id| id.is_string() || id.is_number()) else {
            if message.contains_key("id") {
                return Some(reply(
                    Value::Null,
                    error(INVALID_REQUEST, "the id must be a string or a number"),
                ));
            }
            // Notifications: notifications/initialized, cancellations. Nothing to say.
            return None;
        };
        Some(reply(id, self.request(method, &params)))
    }

    fn request(&mut self, method: &str, params: &Value) -> Outcome {
        if method == "initialize" {
            return self.initialize(params);
        }
        let meta = params.get("_meta");
        let version = meta.and_then(|m| m.get(VERSION_KEY));
        let modern = match (version, self.legacy) {
            (Some(Value::String(v)), _) if v == MODERN => true,
            (Some(Value::String(v)), _) if LEGACY.contains(&v.as_str()) => {
                return error(
                    UNSUPPORTED_PROTOCOL_VERSION,
                    format!("{v} opens with initialize; per-request _meta is {MODERN}"),
                )
                .with_versions(v);
            }
            (Some(requested), _) => {
                let requested = requested.as_str().unwrap_or("(not a string)").to_string();
                return error(UNSUPPORTED_PROTOCOL_VERSION, "Unsupported protocol version")
                    .with_versions(&requested);
            }
            (None, Some(_)) => false,
            (None, None) => {
                return error(
                    INVALID_REQUEST,
                    format!("no protocol version: send {VERSION_KEY} in params._meta ({MODERN}), or initialize first"),
                )
            }
        };
        if modern && meta.and_then(|m| m.get(CAPABILITIES_KEY)).is_none() {
            return error(
                INVALID_PARAMS,
                format!("params._meta needs {CAPABILITIES_KEY} (an object, empty if none)"),
            );
        }
        let outcome = match method {
            "server/discover" if modern => Outcome::Result(json!({
                "supportedVersions": supported_versions(),
                "capabilities": capabilities(),
                "instructions": INSTRUCTIONS,
                "ttlMs": 0,
                "cacheScope": "private",
            })),
            "ping" if !modern => Outcome::Result(json!({})),
            "tools/list" => {
                let mut result = json!({"tools": tools::list()});
                if modern {
                    result["ttlMs"] = json!(0);
                    result["cacheScope"] = json!("private");
                }
                Outcome::Result(result)
            }
            "tools/call" => match tools::call(&self.client, params) {
                Ok(result) => Outcome::Result(result),
                Err(why) => error(INVALID_PARAMS, why.to_string()),
            },
            _ => error(METHOD_NOT_FOUND, format!("no method {method}")),
        };
        match (modern, outcome) {
            (true, Outcome::Result(mut result)) => {
                result["resultType"] = json!("complete");
                result["_meta"] = json!({"io.modelcontextprotocol/serverInfo": server_info()});
                Outcome::Result(result)
            }
            (_, outcome) => outcome,
        }
    }

    fn initialize(&mut self, params: &Value) -> Outcome {
        let asked = params.get("protocolVersion").and_then(Value::as_str);
        // The client's revision if we speak it, else our newest: the client
        // then decides whether it can go on.
        let agreed = LEGACY
            .iter()
            .find(|v| Some(**v) == asked)
            .copied()
            .unwrap_or(LEGACY[0]);
        self.legacy = Some(agreed);
        Outcome::Result(json!({
            "protocolVersion": agreed,
            "capabilities": capabilities(),
            "serverInfo": server_info(),
            "instructions": INSTRUCTIONS,
        }))
    }
}

impl Outcome {
    /// An UnsupportedProtocolVersionError's data: what we speak, what was asked.
    fn with_versions(self, requested: &str) -> Outcome {
        match self {
            Outcome::Error { code, message, .. } => Outcome::Error {
                code,
                message,
                data: Some(json!({"supported": supported_versions(), "requested": requested})),
            },
            result => result,
        }
    }
}

fn supported_versions() -> Vec<&'static str> {
    std::iter::once(MODERN)
        .chain(LEGACY.iter().copied())
        .collect()
}

fn capabilities() -> Value {
    json!({"tools": {"listChanged": false}})
}

fn server_info() -> Value {
    json!({"name": "agent-egress", "version": env!("CARGO_PKG_VERSION")})
}

fn reply(id: Value, outcome: Outcome) -> Value {
    match outcome {
        Outcome::Result(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Outcome::Error {
            code,
            message,
            data,
        } => {
            let mut error = Map::new();
            error.insert("code".into(), json!(code));
            error.insert("message".into(), json!(message));
            if let Some(data) = data {
                error.insert("data".into(), data);
            }
            json!({"jsonrpc": "2.0", "id": id, "error": error})
        }
    }
}

fn reply_error(output: &mut impl Write, id: Value, code: i64, message: &str) -> io::Result<()> {
    write_line(output, &reply(id, error(code, message)))
}

fn write_line(output: &mut impl Write, message: &Value) -> io::Result<()> {
    // serde_json escapes newlines inside strings: one message, one line.
    serde_json::to_writer(&mut *output, message)?;
    output.write_all(b"\n")?;
    output.flush()
}

fn skip_rest_of_line(input: &mut impl BufRead) -> io::Result<()> {
    loop {
        let buf = input.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        match buf.iter().position(|b| *b == b'\n') {
            Some(at) => {
                input.consume(at + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                input.consume(n);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(lines: &[Value]) -> Vec<Value> {
        let mut server = Server {
            client: ControlClient::new(Path::new("/nonexistent/control.sock")),
            legacy: None,
        };
        let input: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let mut output = Vec::new();
        server.serve(input.as_bytes(), &mut output).unwrap();
        output
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }

    fn modern(method: &str, id: u64) -> Value {
        json!({"jsonrpc": "2.0", "id": id, "method": method, "params": {"_meta": {
            VERSION_KEY: MODERN, CAPABILITIES_KEY: {}}}})
    }

    #[test]
    fn the_stateless_revision_discovers_and_lists_without_a_handshake() {
        let replies = session(&[modern("server/discover", 1), modern("tools/list", 2)]);
        assert_eq!(replies[0]["result"]["resultType"], "complete");
        assert_eq!(replies[0]["result"]["supportedVersions"][0], MODERN);
        assert_eq!(
            replies[0]["result"]["_meta"]["io.modelcontextprotocol/serverInfo"]["name"],
            "agent-egress"
        );
        assert_eq!(replies[1]["id"], 2);
        assert!(replies[1]["result"]["tools"].as_array().unwrap().len() >= 8);
        assert_eq!(replies[1]["result"]["cacheScope"], "private");
    }

    #[test]
    fn the_handshake_revisions_initialize_then_list() {
        let replies = session(&[
            json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
                "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}),
            json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
            json!({"jsonrpc": "2.0", "id": 3, "method": "ping"}),
        ]);
        // The notification gets no reply.
        assert_eq!(replies.len(), 3);
        assert_eq!(replies[0]["result"]["protocolVersion"], "2025-06-18");
        assert!(replies[0]["result"]["capabilities"]["tools"].is_object());
        assert!(replies[1]["result"].get("resultType").is_none());
        assert_eq!(replies[2]["result"], json!({}));
    }

    #[test]
    fn an_unknown_version_and_bad_messages_get_errors_naming_what_is_wrong() {
        let mut stale = modern("tools/list", 1);
        stale["params"]["_meta"][VERSION_KEY] = json!("1900-01-01");
        let replies = session(&[
            stale,
            json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
            json!([1, 2]),
            modern("no/such", 4),
            json!({"jsonrpc": "2.0", "id": 5, "method": "initialize", "params": {"protocolVersion": "2099-01-01"}}),
        ]);
        assert_eq!(replies[0]["error"]["code"], UNSUPPORTED_PROTOCOL_VERSION);
        assert_eq!(replies[0]["error"]["data"]["requested"], "1900-01-01");
        assert_eq!(replies[0]["error"]["data"]["supported"][0], MODERN);
        assert_eq!(replies[1]["error"]["code"], INVALID_REQUEST);
        assert_eq!(replies[2]["error"]["code"], INVALID_REQUEST);
        assert_eq!(replies[3]["error"]["code"], METHOD_NOT_FOUND);
        assert_eq!(replies[4]["result"]["protocolVersion"], LEGACY[0]);
        let garbage = {
            let mut server = Server {
                client: ControlClient::new(Path::new("/nonexistent")),
                legacy: None,
            };
            let mut output = Vec::new();
            server.serve(&b"{not json\n"[..], &mut output).unwrap();
            serde_json::from_slice::<Value>(output.trim_ascii_end()).unwrap()
        };
        assert_eq!(garbage["error"]["code"], PARSE_ERROR);
    }

    #[test]
    fn a_tool_that_cannot_reach_the_daemon_is_a_tool_error_not_a_crash() {
        let mut call = modern("tools/call", 1);
        call["params"]["name"] = json!("status");
        call["params"]["arguments"] = json!({});
        let replies = session(&[call]);
        assert_eq!(replies[0]["result"]["isError"], true);
        let text = replies[0]["result"]["content"][0]["text"].as_str().unwrap();
        assert!(text.contains("/nonexistent/control.sock"), "{text}");
    }
}
