// SPDX-License-Identifier: GPL-3.0-or-later
//! The MCP server's tools: each one a control API call, its input described
//! by a JSON Schema. A call the daemon refuses, or one that cannot reach it,
//! is a tool error (`isError`) the model can read, never a protocol failure.

use crate::control::client::{ClientError, ControlClient};
use serde_json::{json, Value};
use std::fmt;
use std::io::{BufRead, ErrorKind};
use std::time::{Duration, Instant};

/// wait_for_denial waits this long at most.
const WAIT_MAX_S: u64 = 600;
const DENIALS_KEPT: u64 = 256;

struct Tool {
    name: &'static str,
    description: &'static str,
    /// The properties of the input object, and which are required.
    input: fn() -> Value,
    call: fn(&ControlClient, &Value) -> Result<Value, ToolError>,
}

/// Why a `tools/call` names no call of ours: a protocol error, not a tool's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadCall {
    NoName,
    NoSuchTool(String),
    ArgumentsNotAnObject,
}

impl fmt::Display for BadCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadCall::NoName => f.write_str("params.name: the tool to call"),
            BadCall::NoSuchTool(name) => write!(f, "params.name: no tool {name:?}"),
            BadCall::ArgumentsNotAnObject => f.write_str("params.arguments: an object"),
        }
    }
}

/// Why a tool failed: the text the model reads (`isError`).
#[derive(Debug)]
enum ToolError {
    UnknownArgument(String),
    MissingArgument(String),
    /// An argument of the wrong kind: its name and what it must be.
    BadArgument {
        name: String,
        wants: String,
    },
    /// The control socket could not be reached, or its reply read.
    Client(ClientError),
    /// The control API answered with a 4xx or 5xx: as it said it.
    Refused {
        request: String,
        status: u16,
        field: String,
        message: String,
        details: String,
    },
    StreamEnded,
}

impl fmt::Display for ToolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ToolError::UnknownArgument(name) => write!(f, "{name}: no such argument"),
            ToolError::MissingArgument(name) => write!(f, "{name}: required"),
            ToolError::BadArgument { name, wants } => write!(f, "{name}: {wants}"),
            ToolError::Client(e) => write!(f, "{e}"),
            ToolError::Refused {
                request,
                status,
                field,
                message,
                details,
            } => write!(f, "{request}: {status}: {field}: {message}{details}"),
            ToolError::StreamEnded => f.write_str("the daemon ended the event stream"),
        }
    }
}

fn bad_argument(name: &str, wants: impl Into<String>) -> ToolError {
    ToolError::BadArgument {
        name: name.into(),
        wants: wants.into(),
    }
}

const TOOLS: &[Tool] = &[
    Tool {
        name: "status",
        description: "The daemon's state: version, uptime, config hash, connection counters, dropped records and packets, runtime rules in force.",
        input: no_input,
        call: |c, _| get(c, "/v1/status"),
    },
    Tool {
        name: "recent_denials",
        description: "The most recent connections and DNS queries agent-egress refused (or, in audit mode, would refuse), newest last: agent, process (pid, exe, cmdline), host, port, rule and why.",
        input: || {
            json!({"type": "object", "properties": {
                "limit": {"type": "integer", "minimum": 1, "maximum": DENIALS_KEPT, "default": 20},
                "agent": agent_property(),
            }, "additionalProperties": false})
        },
        call: recent_denials,
    },
    Tool {
        name: "wait_for_denial",
        description: "Wait until an agent is refused a connection or a DNS query, and return that record; returns with timed_out true if none comes in time. For a supervisor that sits in a loop.",
        input: || {
            json!({"type": "object", "properties": {
                "timeout_s": {"type": "integer", "minimum": 1, "maximum": WAIT_MAX_S, "default": 60},
                "agent": agent_property(),
            }, "additionalProperties": false})
        },
        call: wait_for_denial,
    },
    Tool {
        name: "list_connections",
        description: "The connections open now: id, agent, pid, exe, host, rule, outbound, bytes each way, age.",
        input: no_input,
        call: |c, _| get(c, "/v1/connections"),
    },
    Tool {
        name: "close_connection",
        description: "Close one open connection by its id (from list_connections); its audit record says who closed it.",
        input: || {
            json!({"type": "object", "properties": {
                "id": {"type": "integer", "minimum": 0}
            }, "required": ["id"], "additionalProperties": false})
        },
        call: |c, args| {
            let id = id_argument(args)?;
            send(c, "DELETE", &format!("/v1/connections/{id}"), None)
        },
    },
    Tool {
        name: "explain",
        description: "What the running policy decides for a host (and port, and agent) and why: the rule that matches and where the connection would go. Runtime rules are asked first.",
        input: || {
            json!({"type": "object", "properties": {
                "host": {"type": "string", "description": "A host name or an IP address."},
                "port": {"type": "integer", "minimum": 0, "maximum": 65535, "default": 443},
                "agent": {"type": "string", "description": "The agent's cgroup path, as configured."}
            }, "required": ["host"], "additionalProperties": false})
        },
        call: |c, args| send(c, "POST", "/v1/explain", Some(args)),
    },
    Tool {
        name: "list_rules",
        description: "The runtime rules in force (asked before the configured rules), with who added each and when it expires.",
        input: no_input,
        call: |c, _| get(c, "/v1/rules"),
    },
    Tool {
        name: "add_rule",
        description: "Add a runtime rule, in force at once and kept over restarts: domains (\"example.com\" is the name and its subdomains, \"=example.com\" the name only, \"*.example.com\" subdomains only) and/or ips (CIDR), optionally ports and agents, and the outbound (\"direct\" to allow, \"block\" to refuse, or a configured upstream). ttl makes it expire. Rules the config locks cannot be widened.",
        input: || {
            json!({"type": "object", "properties": {
                "name": {"type": "string"},
                "domains": {"type": "array", "items": {"type": "string"}},
                "ips": {"type": "array", "items": {"type": "string"}},
                "ports": {"type": "array", "items": {"type": ["integer", "string"]}, "description": "Ports or ranges (\"8000-8100\")."},
                "agents": {"type": "array", "items": {"type": "string"}},
                "outbound": {"type": "string"},
                "ttl": {"type": "integer", "minimum": 1, "description": "Seconds until it expires."}
            }, "required": ["outbound"], "additionalProperties": false})
        },
        call: |c, args| send(c, "POST", "/v1/rules", Some(args)),
    },
    Tool {
        name: "remove_rule",
        description: "Remove a runtime rule by its id (from list_rules or add_rule).",
        input: || {
            json!({"type": "object", "properties": {
                "id": {"type": "integer", "minimum": 1}
            }, "required": ["id"], "additionalProperties": false})
        },
        call: |c, args| {
            let id = id_argument(args)?;
            send(c, "DELETE", &format!("/v1/rules/{id}"), None)
        },
    },
    Tool {
        name: "pending_questions",
        description: "The connections held now for a supervisor's answer (rules that say \"ask\"), one question per agent, host and port: id, agent, host, ip, port, rule, process (pid, exe), asked_at and expires_at (unix ms), the fallback when no answer comes, and how many connections wait on it.",
        input: no_input,
        call: |c, _| get(c, "/v1/questions"),
    },
    Tool {
        name: "wait_for_question",
        description: "Wait until a question newer than `after` (the last id seen; 0 for any pending) is asked, and return it; returns with timed_out true if none comes in time. For a supervisor that sits in a loop: answer it with answer_question.",
        input: || {
            json!({"type": "object", "properties": {
                "timeout_s": {"type": "integer", "minimum": 1, "maximum": WAIT_MAX_S, "default": 60},
                "after": {"type": "integer", "minimum": 0, "default": 0, "description": "The last question id seen."}
            }, "additionalProperties": false})
        },
        call: wait_for_question,
    },
    Tool {
        name: "answer_question",
        description: "Answer a pending question by its id: every connection waiting on it goes on at once. allow-once and deny-once decide these connections only; allow-always and deny-always also add a runtime rule (kept over restarts) for the exact host (scope.host \"exact\", the default) or the domain and its subdomains (\"domain\"), on the question's port, for this agent (scope.agents \"this\", the default) or all, optionally for for_seconds only.",
        input: || {
            json!({"type": "object", "properties": {
                "id": {"type": "integer", "minimum": 1},
                "answer": {"enum": crate::ask::Answer::ALL},
                "scope": {"type": "object", "properties": {
                    "host": {"enum": ["exact", "domain"], "default": "exact"},
                    "agents": {"enum": ["this", "all"], "default": "this"}
                }, "additionalProperties": false},
                "for_seconds": {"type": "integer", "minimum": 1, "description": "allow-always, deny-always: the rule expires after this."}
            }, "required": ["id", "answer"], "additionalProperties": false})
        },
        call: answer_question,
    },
];

fn answer_question(client: &ControlClient, args: &Value) -> Result<Value, ToolError> {
    let id = id_argument(args)?;
    let mut body = args.clone();
    if let Some(map) = body.as_object_mut() {
        map.remove("id");
    }
    send(
        client,
        "POST",
        &format!("/v1/questions/{id}/answer"),
        Some(&body),
    )
}

fn wait_for_question(client: &ControlClient, args: &Value) -> Result<Value, ToolError> {
    let timeout = bounded(args, "timeout_s", 60, WAIT_MAX_S)?;
    let after = match args.get("after") {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_u64().ok_or_else(|| ToolError::BadArgument {
            name: "after".into(),
            wants: "a non-negative integer (the last question id seen)".into(),
        })?,
    };
    let path = format!(
        "/v1/questions/next?timeout_ms={}&after={after}",
        timeout * 1000
    );
    let reply = get(client, &path)?;
    let timed_out = reply["question"].is_null();
    Ok(json!({"question": reply["question"], "timed_out": timed_out}))
}

fn agent_property() -> Value {
    json!({"type": "string", "description": "Only this agent (its cgroup path)."})
}

fn no_input() -> Value {
    json!({"type": "object", "properties": {}, "additionalProperties": false})
}

/// `tools/list`'s tools, in a fixed order.
pub fn list() -> Vec<Value> {
    TOOLS
        .iter()
        .map(|t| {
            json!({
                "name": t.name,
                "description": t.description,
                "inputSchema": (t.input)(),
            })
        })
        .collect()
}

/// `tools/call`: Err for a call that names no tool of ours (a protocol
/// error); a tool that fails answers with `isError`.
pub fn call(client: &ControlClient, params: &Value) -> Result<Value, BadCall> {
    let name = params
        .get("name")
        .and_then(Value::as_str)
        .ok_or(BadCall::NoName)?;
    let tool = TOOLS
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| BadCall::NoSuchTool(name.into()))?;
    let arguments = match params.get("arguments") {
        None | Some(Value::Null) => json!({}),
        Some(a @ Value::Object(_)) => a.clone(),
        Some(_) => return Err(BadCall::ArgumentsNotAnObject),
    };
    Ok(
        match check_arguments(&(tool.input)(), &arguments)
            .and_then(|()| (tool.call)(client, &arguments))
        {
            Ok(body) => json!({
                "content": [{"type": "text", "text": pretty(&body)}],
                "structuredContent": body,
                "isError": false,
            }),
            Err(why) => json!({
                "content": [{"type": "text", "text": why.to_string()}],
                "isError": true,
            }),
        },
    )
}

/// The arguments' names against the schema: none unknown, none required missing.
fn check_arguments(schema: &Value, arguments: &Value) -> Result<(), ToolError> {
    let known = schema["properties"].as_object();
    for name in arguments.as_object().into_iter().flat_map(|a| a.keys()) {
        if !known.is_some_and(|k| k.contains_key(name)) {
            return Err(ToolError::UnknownArgument(name.clone()));
        }
    }
    for required in schema["required"].as_array().into_iter().flatten() {
        let name = required.as_str().unwrap_or_default();
        if arguments.get(name).is_none() {
            return Err(ToolError::MissingArgument(name.into()));
        }
    }
    Ok(())
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

fn get(client: &ControlClient, path: &str) -> Result<Value, ToolError> {
    send(client, "GET", path, None)
}

/// One control API call; a 4xx or 5xx is the API's error, as it said it.
fn send(
    client: &ControlClient,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, ToolError> {
    let (status, reply) = client.call(method, path, body).map_err(ToolError::Client)?;
    if status < 300 {
        return Ok(reply);
    }
    let text = |key: &str, default: &str| {
        reply
            .get(key)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    Err(ToolError::Refused {
        request: format!("{method} {path}"),
        status,
        field: text("field", ""),
        message: text("error", "refused"),
        details: reply
            .get("errors")
            .map(|e| format!(": {e}"))
            .unwrap_or_default(),
    })
}

fn id_argument(args: &Value) -> Result<u64, ToolError> {
    args.get("id")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad_argument("id", "a non-negative integer is needed"))
}

fn agent_argument(args: &Value) -> Result<Option<&str>, ToolError> {
    match args.get("agent") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(a)) => Ok(Some(a)),
        Some(_) => Err(bad_argument("agent", "a string")),
    }
}

fn bounded(args: &Value, name: &str, default: u64, max: u64) -> Result<u64, ToolError> {
    match args.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| bad_argument(name, format!("an integer from 1 to {max}"))),
    }
}

fn of_agent(record: &Value, agent: Option<&str>) -> bool {
    agent.is_none_or(|a| record.get("agent").and_then(Value::as_str) == Some(a))
}

fn recent_denials(client: &ControlClient, args: &Value) -> Result<Value, ToolError> {
    let limit = bounded(args, "limit", 20, DENIALS_KEPT)? as usize;
    let agent = agent_argument(args)?;
    let reply = get(client, "/v1/denials")?;
    let all = reply["denials"].as_array().cloned().unwrap_or_default();
    let mine: Vec<Value> = all.into_iter().filter(|r| of_agent(r, agent)).collect();
    let skip = mine.len().saturating_sub(limit);
    Ok(json!({"denials": mine[skip..]}))
}

fn is_denial(record: &Value) -> bool {
    matches!(record["verdict"].as_str(), Some("block" | "would_block"))
        && matches!(record["event"].as_str(), Some("end" | "dns"))
}

fn wait_for_denial(client: &ControlClient, args: &Value) -> Result<Value, ToolError> {
    let timeout = Duration::from_secs(bounded(args, "timeout_s", 60, WAIT_MAX_S)?);
    let agent = agent_argument(args)?;
    let deadline = Instant::now() + timeout;
    // Reads wake at least once a second, so the deadline is kept.
    let mut events = client
        .events(Some(Duration::from_secs(1)))
        .map_err(ToolError::Client)?;
    let mut line = String::new();
    while Instant::now() < deadline {
        line.clear();
        match events.read_line(&mut line) {
            Ok(0) => return Err(ToolError::StreamEnded),
            Ok(_) => {
                let Ok(record) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if is_denial(&record) && of_agent(&record, agent) {
                    return Ok(json!({"denial": record, "timed_out": false}));
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(ToolError::Client(ClientError::Io(e))),
        }
    }
    Ok(json!({"denial": null, "timed_out": true}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_has_an_object_schema_and_a_unique_name() {
        let tools = list();
        let mut names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
        for tool in &tools {
            assert_eq!(tool["inputSchema"]["type"], "object", "{tool}");
            assert!(!tool["description"].as_str().unwrap().is_empty());
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), tools.len());
    }

    #[test]
    fn bad_arguments_are_named() {
        let client = ControlClient::new(std::path::Path::new("/nonexistent"));
        let call = |name: &str, args: Value| {
            super::call(&client, &json!({"name": name, "arguments": args})).unwrap()
        };
        let r = call("close_connection", json!({"id": "seven"}));
        assert_eq!(r["isError"], true);
        assert_eq!(
            r["content"][0]["text"],
            "id: a non-negative integer is needed"
        );
        let r = call("recent_denials", json!({"limit": 0}));
        assert_eq!(r["content"][0]["text"], "limit: an integer from 1 to 256");
        let r = call("wait_for_denial", json!({"agent": 7}));
        assert_eq!(r["content"][0]["text"], "agent: a string");
        let r = call("explain", json!({"port": 443}));
        assert_eq!(r["content"][0]["text"], "host: required");
        let r = call("status", json!({"verbose": true}));
        assert_eq!(r["content"][0]["text"], "verbose: no such argument");
        let bad = |params: Value| super::call(&client, &params).err().map(|e| e.to_string());
        assert_eq!(
            bad(json!({})).as_deref(),
            Some("params.name: the tool to call")
        );
        assert_eq!(
            bad(json!({"name": "nope"})).as_deref(),
            Some("params.name: no tool \"nope\"")
        );
        assert_eq!(
            bad(json!({"name": "status", "arguments": [1]})).as_deref(),
            Some("params.arguments: an object")
        );
    }
}
