// SPDX-License-Identifier: GPL-3.0-or-later
//! The control API's routes: one table, which the server dispatches on and
//! the OpenAPI document (docs/control-api.json) is checked against.

use super::events::Watcher;
use super::questions;
use super::server::{json_body, Request};
use super::state::Refusal;
use super::Control;
use crate::policy::{Process, Query};
use serde_json::{json, Value};
use std::net::IpAddr;
use std::sync::atomic::Ordering;

/// What a handler answers.
pub enum Reply {
    Json {
        status: u16,
        body: Value,
        /// For a 405: the methods the path has.
        allow: Option<&'static str>,
    },
    /// Stream the event bus to the client.
    Events { sse: bool, watcher: Watcher },
}

impl Reply {
    pub fn ok(status: u16, body: Value) -> Reply {
        Reply::Json {
            status,
            body,
            allow: None,
        }
    }

    /// `{"error": message, "field": field}`; `field` names the part of the
    /// request that is wrong (a JSON path into the body, a header, a parameter).
    pub fn error(status: u16, field: &str, message: &str) -> Reply {
        Reply::ok(status, json!({"error": message, "field": field}))
    }

    pub fn status(&self) -> u16 {
        match self {
            Reply::Json { status, .. } => *status,
            Reply::Events { .. } => 200,
        }
    }

    /// The JSON body; none for a stream.
    pub fn body(&self) -> Option<&Value> {
        match self {
            Reply::Json { body, .. } => Some(body),
            Reply::Events { .. } => None,
        }
    }
}

type Handler = fn(&Control, &Request, &[&str]) -> Reply;

pub struct Route {
    pub method: &'static str,
    /// `{name}` is one path segment, handed to the handler in order.
    pub path: &'static str,
    handler: Handler,
}

pub const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "/v1/status",
        handler: status,
    },
    Route {
        method: "GET",
        path: "/v1/connections",
        handler: connections,
    },
    Route {
        method: "DELETE",
        path: "/v1/connections/{id}",
        handler: close_connection,
    },
    Route {
        method: "GET",
        path: "/v1/events",
        handler: events,
    },
    Route {
        method: "GET",
        path: "/v1/rules",
        handler: list_rules,
    },
    Route {
        method: "POST",
        path: "/v1/rules",
        handler: add_rule,
    },
    Route {
        method: "DELETE",
        path: "/v1/rules/{id}",
        handler: remove_rule,
    },
    Route {
        method: "POST",
        path: "/v1/reload",
        handler: reload,
    },
    Route {
        method: "GET",
        path: "/v1/denials",
        handler: denials,
    },
    Route {
        method: "POST",
        path: "/v1/explain",
        handler: explain,
    },
    Route {
        method: "GET",
        path: "/v1/questions",
        handler: questions::list,
    },
    Route {
        method: "GET",
        path: "/v1/questions/next",
        handler: questions::next,
    },
    Route {
        method: "POST",
        path: "/v1/questions/{id}/answer",
        handler: questions::answer,
    },
];

/// The segments `template` binds in `path`, if it matches.
fn bind<'a>(template: &str, path: &'a str) -> Option<Vec<&'a str>> {
    let mut params = Vec::new();
    let mut want = template.split('/');
    let mut have = path.split('/');
    loop {
        match (want.next(), have.next()) {
            (None, None) => return Some(params),
            (Some(w), Some(h)) if w.starts_with('{') && !h.is_empty() => params.push(h),
            (Some(w), Some(h)) if w == h => {}
            _ => return None,
        }
    }
}

pub fn dispatch(control: &Control, request: &Request) -> Reply {
    let mut allowed = Vec::new();
    for route in ROUTES {
        if let Some(params) = bind(route.path, &request.path) {
            if route.method == request.method {
                return (route.handler)(control, request, &params);
            }
            allowed.push(route.method);
        }
    }
    if allowed.is_empty() {
        return Reply::error(404, "path", &format!("no route {}", request.path));
    }
    let allow = match allowed.as_slice() {
        ["GET", "POST"] => "GET, POST",
        ["GET"] => "GET",
        ["POST"] => "POST",
        ["DELETE"] => "DELETE",
        _ => "GET, POST, DELETE",
    };
    Reply::Json {
        status: 405,
        body: json!({"error": format!("{} is not served on {}", request.method, request.path), "field": "method"}),
        allow: Some(allow),
    }
}

fn id_param(params: &[&str]) -> Result<u64, Reply> {
    params
        .first()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| Reply::error(400, "id", "expected a number"))
}

pub(super) fn refusal(r: Refusal) -> Reply {
    match r {
        Refusal::Invalid(errors) => {
            let first = errors.0.first();
            Reply::ok(
                422,
                json!({
                    "error": first.map(|e| e.reason.clone()).unwrap_or_default(),
                    "field": first.map(|e| e.path.clone()).unwrap_or_default(),
                    "errors": errors.0.iter().map(|e| json!({"field": e.path, "error": e.reason})).collect::<Vec<_>>(),
                }),
            )
        }
        Refusal::Full => Reply::error(409, "rules", "too many runtime rules"),
        Refusal::NotFound => Reply::error(404, "id", "no such runtime rule"),
        Refusal::Storage(e) => Reply::error(
            500,
            "state_dir",
            &format!("not saved, nothing changed: {e}"),
        ),
    }
}

fn status(control: &Control, _: &Request, _: &[&str]) -> Reply {
    let shared = control.proxy.shared();
    let stats = &shared.stats;
    let counters = &control.counters;
    let bus = control.audit.events().counters();
    Reply::ok(
        200,
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": control.started.elapsed().as_secs(),
            "config_hash": control.state.config_hash(),
            "connections": {
                "active": stats.active.load(Ordering::Relaxed),
                "accepted": stats.accepted.load(Ordering::Relaxed),
                "refused_over_limit": stats.refused_over_limit.load(Ordering::Relaxed),
            },
            "drops": {
                "audit_records": control.audit.dropped(),
                "agent_packets": bus.dropped_packets,
                "events_lost": bus.lost,
            },
            "events": bus,
            "runtime_rules": shared.runtime().policy.runtime_rules(),
            "questions": shared.questions.status(),
            "control": {
                "clients": counters.clients.load(Ordering::Relaxed),
                "requests": counters.requests.load(Ordering::Relaxed),
                "refused_busy": counters.refused_busy.load(Ordering::Relaxed),
                "timed_out": counters.timed_out.load(Ordering::Relaxed),
            },
        }),
    )
}

fn connections(control: &Control, _: &Request, _: &[&str]) -> Reply {
    Reply::ok(200, json!(control.proxy.connections()))
}

fn close_connection(control: &Control, request: &Request, params: &[&str]) -> Reply {
    let id = match id_param(params) {
        Ok(id) => id,
        Err(reply) => return reply,
    };
    let peer = &request.peer;
    let why = format!(
        "closed over the control API by uid {} pid {}",
        peer.uid, peer.pid
    );
    if control.proxy.close(id, &why) {
        control.state.note_closed(id, peer);
        Reply::ok(200, json!({"closed": id}))
    } else {
        Reply::error(404, "id", "no such open connection")
    }
}

fn events(control: &Control, request: &Request, _: &[&str]) -> Reply {
    let sse = request
        .accept
        .as_deref()
        .is_some_and(|a| a.contains("text/event-stream"));
    match control.audit.events().subscribe() {
        Some(watcher) => Reply::Events { sse, watcher },
        None => Reply::error(503, "events", "too many event watchers"),
    }
}

fn list_rules(control: &Control, _: &Request, _: &[&str]) -> Reply {
    Reply::ok(200, json!({"rules": control.state.rules_json()}))
}

fn add_rule(control: &Control, request: &Request, _: &[&str]) -> Reply {
    let body = match json_body(request) {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    match control.state.add_rule(&body, &request.peer) {
        Ok(rule) => Reply::ok(201, rule),
        Err(r) => refusal(r),
    }
}

fn remove_rule(control: &Control, request: &Request, params: &[&str]) -> Reply {
    let id = match id_param(params) {
        Ok(id) => id,
        Err(reply) => return reply,
    };
    match control.state.remove_rule(id, &request.peer) {
        Ok(rule) => Reply::ok(200, json!({"removed": rule})),
        Err(r) => refusal(r),
    }
}

fn denials(control: &Control, _: &Request, _: &[&str]) -> Reply {
    let records: Vec<Value> = control
        .audit
        .events()
        .recent_denials()
        .iter()
        .filter_map(|line| serde_json::from_slice(line).ok())
        .collect();
    Reply::ok(200, json!({"denials": records}))
}

/// What the running policy decides for a host (and port, and agent), and why.
fn explain(control: &Control, request: &Request, _: &[&str]) -> Reply {
    let body = match json_body(request) {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    if let Some(unknown) = body.as_object().and_then(|o| {
        o.keys()
            .find(|k| !["host", "port", "agent"].contains(&k.as_str()))
    }) {
        return Reply::error(
            422,
            unknown,
            "unknown field (host, port and agent are known)",
        );
    }
    let Some(target) = body.get("host").and_then(Value::as_str) else {
        return Reply::error(422, "host", "a host name or address is needed");
    };
    let port = match body.get("port") {
        None => 443,
        Some(p) => match p.as_u64().and_then(|p| u16::try_from(p).ok()) {
            Some(p) => p,
            None => return Reply::error(422, "port", "not a port number"),
        },
    };
    let agent = match body.get("agent") {
        None | Some(Value::Null) => None,
        Some(Value::String(a)) => Some(a.as_str()),
        Some(_) => return Reply::error(422, "agent", "not a string"),
    };
    let (name, ip) = match target.parse::<IpAddr>() {
        Ok(ip) => (None, ip),
        Err(_) => match crate::names::normalize_host(target) {
            Ok(name) => (Some(name), IpAddr::from([0, 0, 0, 0])),
            Err(e) => return Reply::error(422, "host", &e.to_string()),
        },
    };
    let runtime = control.proxy.shared().runtime();
    let query = Query {
        host: name.as_deref(),
        ip,
        port,
        agent,
        uid: None,
        process: Process::Unknown,
    };
    let decision = runtime.policy.decide(&query);
    Reply::ok(
        200,
        json!({
            "host": name.as_deref().unwrap_or(target),
            "port": port,
            "agent": agent,
            "outbound": decision.outbound,
            "rule": decision.rule_name,
            "runtime_rule": decision.runtime,
            "explanation": runtime.policy.explain(&query),
        }),
    )
}

fn reload(control: &Control, request: &Request, _: &[&str]) -> Reply {
    match control.reload(&request.peer) {
        Ok(hash) => Reply::ok(200, json!({"reloaded": true, "config_hash": hash})),
        Err(errors) => Reply::ok(
            422,
            json!({"error": "reload refused, the running config stays", "field": "config", "errors": errors}),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{bind, ROUTES};
    use std::collections::BTreeSet;

    /// docs/control-api.json describes exactly the routes served.
    #[test]
    fn the_openapi_document_names_every_route_and_no_other() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../docs/control-api.json")).unwrap();
        let mut documented = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
        let served: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.to_string(), r.path.to_string()))
            .collect();
        assert_eq!(documented, served);
        assert_eq!(served.len(), ROUTES.len(), "a route twice in the table");
    }

    #[test]
    fn templates_bind_one_segment_each() {
        assert_eq!(bind("/v1/rules", "/v1/rules"), Some(vec![]));
        assert_eq!(bind("/v1/rules/{id}", "/v1/rules/7"), Some(vec!["7"]));
        assert_eq!(bind("/v1/rules/{id}", "/v1/rules/"), None);
        assert_eq!(bind("/v1/rules/{id}", "/v1/rules/7/x"), None);
        assert_eq!(bind("/v1/rules", "/v1/rules/"), None);
        assert_eq!(bind("/v1/status", "/v2/status"), None);
    }
}
