// SPDX-License-Identifier: GPL-3.0-or-later
//! `agent-egress mcp` through the real daemon in the test world: a scripted
//! MCP client opens a session both ways the protocol allows (the 2025
//! handshake and the stateless 2026-07-28 revision), sees a denial, waits for
//! the next one, opens a blocked host with a runtime rule and closes it again.

mod harness;

use harness::control::{config, curl_status, SocketDir};
use harness::daemon::{self, Daemon};
use harness::{World, ALLOWED, BLOCKED};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

const MODERN: &str = "2026-07-28";

/// An `agent-egress mcp` child and the lines it answers with.
struct Client {
    child: Child,
    stdin: ChildStdin,
    replies: Receiver<Value>,
    next_id: u64,
}

impl Client {
    fn start(socket: &std::path::Path) -> Client {
        let mut child = Command::new(daemon::binary())
            .args(["mcp", "--socket"])
            .arg(socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("agent-egress mcp");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, replies) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let value: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not one JSON message a line: {line:?}: {e}"));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        Client {
            child,
            stdin,
            replies,
            next_id: 1,
        }
    }

    fn send(&mut self, message: &Value) {
        writeln!(self.stdin, "{message}").unwrap();
    }

    /// A request; its reply (whose id must match).
    fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}));
        let reply = self
            .replies
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no reply to {method}"));
        assert_eq!(reply["id"], id, "{reply}");
        assert_eq!(reply["jsonrpc"], "2.0");
        reply
    }

    /// tools/call in the handshake revision; the result.
    fn call(&mut self, tool: &str, arguments: Value) -> Value {
        let reply = self.request("tools/call", json!({"name": tool, "arguments": arguments}));
        reply["result"].clone()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(result: &Value) -> &str {
    result["content"][0]["text"].as_str().unwrap_or_default()
}

#[test]
fn a_supervisor_over_mcp_sees_denials_and_opens_and_closes_a_host() {
    if !harness::require_root_and_tools(&["curl", "nft"]) {
        return;
    }
    let world = World::new();
    let dir = SocketDir::new(&world);
    let sock = dir.socket();
    let _daemon = Daemon::start(&world, config(&world, &sock));
    let mut mcp = Client::start(&sock);

    // The 2025 handshake.
    let init = mcp.request(
        "initialize",
        json!({"protocolVersion": "2025-11-25", "capabilities": {},
               "clientInfo": {"name": "scripted-supervisor", "version": "1"}}),
    );
    assert_eq!(init["result"]["protocolVersion"], "2025-11-25", "{init}");
    assert_eq!(init["result"]["serverInfo"]["name"], "agent-egress");
    mcp.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    let tools = mcp.request("tools/list", json!({}));
    let names: Vec<&str> = tools["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for want in [
        "recent_denials",
        "wait_for_denial",
        "list_connections",
        "close_connection",
        "explain",
        "list_rules",
        "add_rule",
        "remove_rule",
        "status",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }

    // Why blocked.test is refused, and the refusal itself.
    let why = mcp.call("explain", json!({"host": "blocked.test"}));
    assert_eq!(why["isError"], false, "{why}");
    assert_eq!(why["structuredContent"]["outbound"], "block", "{why}");
    assert!(!curl_status(&world, &BLOCKED).0);
    let mut denials = Value::Null;
    for _ in 0..50 {
        denials = mcp.call("recent_denials", json!({"limit": 5}));
        if !denials["structuredContent"]["denials"]
            .as_array()
            .unwrap()
            .is_empty()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let denial = &denials["structuredContent"]["denials"][0];
    assert_eq!(denial["host"], "blocked.test", "{denials}");
    assert_eq!(denial["verdict"], "block");
    assert!(
        denial["exe"]
            .as_str()
            .unwrap_or_default()
            .ends_with("/curl"),
        "{denial}"
    );

    // A supervisor in a loop: the wait returns with the next denial.
    let agent_world = &world;
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(500));
            assert!(!curl_status(agent_world, &BLOCKED).0);
        });
        let waited = mcp.call("wait_for_denial", json!({"timeout_s": 20}));
        assert_eq!(waited["structuredContent"]["timed_out"], false, "{waited}");
        assert_eq!(
            waited["structuredContent"]["denial"]["host"],
            "blocked.test"
        );
    });
    let quiet = mcp.call("wait_for_denial", json!({"timeout_s": 1}));
    assert_eq!(quiet["structuredContent"]["timed_out"], true, "{quiet}");

    // Open blocked.test for a while, then close it again.
    let added = mcp.call(
        "add_rule",
        json!({"domains": ["blocked.test"], "outbound": "direct", "ttl": 300}),
    );
    assert_eq!(added["isError"], false, "{added}");
    let id = added["structuredContent"]["id"]
        .as_u64()
        .expect("the rule's id");
    let (ok, page) = curl_status(&world, &BLOCKED);
    assert!(ok, "blocked.test not opened by the runtime rule: {page}");
    let listed = mcp.call("list_rules", json!({}));
    assert_eq!(
        listed["structuredContent"]["rules"][0]["id"], id,
        "{listed}"
    );
    let removed = mcp.call("remove_rule", json!({"id": id}));
    assert_eq!(removed["isError"], false, "{removed}");
    assert!(!curl_status(&world, &BLOCKED).0, "closed again");
    assert!(curl_status(&world, &ALLOWED).0);

    // Mistakes are tool errors naming what is wrong; the session goes on.
    let bad = mcp.call(
        "add_rule",
        json!({"domains": ["blocked.test"], "outbound": "nowhere"}),
    );
    assert_eq!(bad["isError"], true, "{bad}");
    assert!(text(&bad).contains("outbound"), "{bad}");
    let bad = mcp.call("close_connection", json!({"id": 999_999}));
    assert_eq!(bad["isError"], true, "{bad}");
    assert!(text(&bad).contains("404"), "{bad}");
    let unknown = mcp.request("tools/call", json!({"name": "rm_rf", "arguments": {}}));
    assert_eq!(unknown["error"]["code"], -32602, "{unknown}");

    // The stateless revision on the same process: discover, then a call.
    let meta = json!({"io.modelcontextprotocol/protocolVersion": MODERN,
                      "io.modelcontextprotocol/clientCapabilities": {}});
    let discovered = mcp.request("server/discover", json!({"_meta": meta}));
    assert_eq!(
        discovered["result"]["resultType"], "complete",
        "{discovered}"
    );
    assert!(discovered["result"]["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&json!(MODERN)));
    let status = mcp.request(
        "tools/call",
        json!({"_meta": meta, "name": "status", "arguments": {}}),
    );
    assert_eq!(status["result"]["resultType"], "complete", "{status}");
    assert_eq!(status["result"]["isError"], false);
    assert!(status["result"]["structuredContent"]["uptime_s"].is_u64());
    let stale = mcp.request(
        "tools/list",
        json!({"_meta": {"io.modelcontextprotocol/protocolVersion": "1999-01-01",
                         "io.modelcontextprotocol/clientCapabilities": {}}}),
    );
    assert_eq!(stale["error"]["code"], -32022, "{stale}");
}

#[test]
fn without_a_daemon_every_tool_says_what_it_cannot_reach() {
    let mut mcp = Client::start(std::path::Path::new("/nonexistent/agent-egress.sock"));
    mcp.request(
        "initialize",
        json!({"protocolVersion": "2025-06-18", "capabilities": {}}),
    );
    let result = mcp.call("list_connections", json!({}));
    assert_eq!(result["isError"], true, "{result}");
    assert!(
        text(&result).contains("/nonexistent/agent-egress.sock"),
        "{result}"
    );
}

#[test]
fn a_supervisor_over_mcp_waits_for_a_question_and_answers_it() {
    if !harness::require_root_and_tools(&["curl", "nft"]) {
        return;
    }
    let world = World::new();
    let dir = SocketDir::new(&world);
    let sock = dir.socket();
    let mut settings = config(&world, &sock);
    settings["rules"] =
        json!([{"name": "ask-blocked", "domains": ["blocked.test"], "outbound": "ask"}]);
    settings["ask"] = json!({"timeout_ms": 8000});
    let _daemon = Daemon::start(&world, settings);
    let mut mcp = Client::start(&sock);
    mcp.request(
        "initialize",
        json!({"protocolVersion": "2025-11-25", "capabilities": {},
               "clientInfo": {"name": "scripted-supervisor", "version": "1"}}),
    );
    mcp.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
    let tools = mcp.request("tools/list", json!({}));
    let schema_of = |name: &str| {
        tools["result"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("no tool {name}"))["inputSchema"]
            .clone()
    };
    assert_eq!(
        schema_of("answer_question")["required"],
        json!(["id", "answer"])
    );
    assert_eq!(schema_of("pending_questions")["type"], "object");

    let waited = mcp.call("wait_for_question", json!({"timeout_s": 1}));
    assert_eq!(waited["structuredContent"]["timed_out"], true, "{waited}");

    let agent = {
        let world = &world;
        std::thread::scope(|s| {
            let curl = s.spawn(|| curl_status(world, &BLOCKED));
            let waited = mcp.call("wait_for_question", json!({"timeout_s": 10}));
            assert_eq!(waited["isError"], false, "{waited}");
            let question = waited["structuredContent"]["question"].clone();
            assert_eq!(question["host"], "blocked.test", "{question}");
            let pending = mcp.call("pending_questions", json!({}));
            assert_eq!(
                pending["structuredContent"]["questions"][0]["id"],
                question["id"]
            );
            let bad = mcp.call(
                "answer_question",
                json!({"id": question["id"], "answer": "perhaps"}),
            );
            assert_eq!(bad["isError"], true);
            assert!(text(&bad).contains(": answer: "), "{bad}");
            let bad = mcp.call(
                "answer_question",
                json!({"id": 999_999, "answer": "allow-once"}),
            );
            assert!(text(&bad).contains("404: id: "), "{bad}");
            let answered = mcp.call(
                "answer_question",
                json!({"id": question["id"], "answer": "allow-once"}),
            );
            assert_eq!(answered["isError"], false, "{answered}");
            curl.join().unwrap()
        })
    };
    assert_eq!(agent, (true, BLOCKED.body()));
}
