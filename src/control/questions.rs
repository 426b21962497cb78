// SPDX-License-Identifier: GPL-3.0-or-later
//! The control API's questions (`ask`): list the pending ones, wait for the
//! next, answer one. An "always" answer becomes a runtime rule (the state
//! file, an audit record `policy` naming the peer) before the held
//! connections are released, so the next connection finds it in force.

use super::routes::Reply;
use super::server::{json_body, Request};
use super::socket::Peer;
use super::state::PolicyState;
use super::Control;
use crate::ask::questions::{NotPending, QuestionInfo};
use crate::ask::Answer;
use crate::audit::AuditLog;
use crate::proxy::ProxyHandle;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The longest a long poll waits, and how long when not told.
const NEXT_MAX_MS: u64 = 600_000;
const NEXT_DEFAULT_MS: u64 = 30_000;
/// How long the audit writer is given to name the questions' processes.
const PROCESS_WAIT: Duration = Duration::from_millis(500);
/// The longest an "always" answer may be limited to: a year.
const FOR_SECONDS_MAX: u64 = 366 * 24 * 3600;

/// `GET /v1/questions`: the unanswered questions, oldest first.
pub fn list(control: &Control, _: &Request, _: &[&str]) -> Reply {
    let pending = control.proxy.shared().questions.pending();
    let pending = with_processes(&control.audit, pending);
    Reply::ok(200, json!({"questions": pending}))
}

/// `GET /v1/questions/next?timeout_ms=N&after=ID`: the oldest unanswered
/// question newer than `after`, waiting up to `timeout_ms` for one.
pub fn next(control: &Control, request: &Request, _: &[&str]) -> Reply {
    let mut timeout_ms = NEXT_DEFAULT_MS;
    let mut after = 0;
    for pair in request.query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let slot = match name {
            "timeout_ms" => &mut timeout_ms,
            "after" => &mut after,
            _ => {
                return Reply::error(
                    422,
                    name,
                    "unknown parameter (timeout_ms and after are known)",
                )
            }
        };
        match value.parse::<u64>() {
            Ok(n) if name != "timeout_ms" || n <= NEXT_MAX_MS => *slot = n,
            _ => {
                return Reply::error(
                    422,
                    name,
                    &format!("expected a number (timeout_ms: 0 to {NEXT_MAX_MS})"),
                )
            }
        }
    }
    let questions = &control.proxy.shared().questions;
    let found = questions.next(after, Duration::from_millis(timeout_ms));
    let found = with_processes(&control.audit, found.into_iter().collect());
    Reply::ok(200, json!({"question": found.into_iter().next()}))
}

/// `POST /v1/questions/{id}/answer`.
pub fn answer(control: &Control, request: &Request, params: &[&str]) -> Reply {
    let Some(id) = params.first().and_then(|p| p.parse::<u64>().ok()) else {
        return Reply::error(400, "id", "expected a number");
    };
    let body = match json_body(request) {
        Ok(b) => b,
        Err(reply) => return reply,
    };
    answer_for(&control.state, &control.proxy, id, &body, &request.peer)
}

/// Answer question `id` as `by`, with `body` as the route takes it (`answer`,
/// `scope`, `for_seconds`): the route's work, and what `exec --ask` calls in
/// its own process for a key pressed on its terminal.
pub fn answer_for(
    state: &PolicyState,
    proxy: &ProxyHandle,
    id: u64,
    body: &Value,
    by: &Peer,
) -> Reply {
    let questions = &proxy.shared().questions;
    let outbound = proxy.shared().runtime().config.ask.outbound.clone();
    let request_for = |q: &QuestionInfo| AnswerRequest::parse(body, q, &outbound);
    let Some(question) = questions.get(id) else {
        // The body's own errors first: they do not depend on the question.
        if let Err(reply) = AnswerRequest::check_alone(body) {
            return reply;
        }
        return Reply::error(
            404,
            "id",
            "no such pending question (answered, timed out, or no connection waits on it)",
        );
    };
    let asked = match request_for(&question) {
        Ok(a) => a,
        Err(reply) => return reply,
    };
    let mut rule = None;
    if let Some(spec) = &asked.rule {
        match state.add_rule(spec, by) {
            Ok(added) => rule = Some(added),
            Err(refusal) => return super::routes::refusal(refusal),
        }
    }
    let rule_id = rule.as_ref().and_then(|r| r["id"].as_u64());
    match questions.answer(id, asked.answer, by, rule_id, Instant::now()) {
        Ok(workers) => {
            proxy.deliver_answer(id, &workers);
            Reply::ok(
                200,
                json!({"answered": id, "answer": asked.answer, "held": question.held, "rule": rule}),
            )
        }
        Err(NotPending::Unknown) => Reply::ok(
            404,
            json!({
                "error": "the question timed out or lost its connections while being answered",
                "field": "id",
                "rule": rule,
            }),
        ),
    }
}

/// An answer's body, checked.
struct AnswerRequest {
    answer: Answer,
    /// The runtime rule an "always" answer adds, as `POST /v1/rules` takes it.
    rule: Option<Value>,
}

impl AnswerRequest {
    /// What can be checked without the question.
    fn check_alone(body: &Value) -> Result<(Answer, &Map<String, Value>), Reply> {
        let Some(map) = body.as_object() else {
            return Err(Reply::error(422, "body", "expected a JSON object"));
        };
        if let Some(unknown) = map
            .keys()
            .find(|k| !["answer", "scope", "for_seconds"].contains(&k.as_str()))
        {
            return Err(Reply::error(
                422,
                unknown,
                "unknown field (answer, scope and for_seconds are known)",
            ));
        }
        let expected = format!("expected one of: {}", Answer::ALL.join(", "));
        let answer = match map.get("answer") {
            None => {
                return Err(Reply::error(
                    422,
                    "answer",
                    &format!("missing ({expected})"),
                ))
            }
            Some(v) => match v.as_str().and_then(Answer::parse) {
                Some(a) => a,
                None => {
                    return Err(Reply::error(
                        422,
                        "answer",
                        &format!("{v} is not known ({expected})"),
                    ))
                }
            },
        };
        let once = !answer.always();
        for key in ["scope", "for_seconds"] {
            if once && map.contains_key(key) {
                return Err(Reply::error(
                    422,
                    key,
                    "only for allow-always and deny-always (a once answer makes no rule)",
                ));
            }
        }
        if let Some(scope) = map.get("scope") {
            let Some(scope) = scope.as_object() else {
                return Err(Reply::error(422, "scope", "expected an object"));
            };
            if let Some(unknown) = scope
                .keys()
                .find(|k| !["host", "agents"].contains(&k.as_str()))
            {
                return Err(Reply::error(
                    422,
                    &format!("scope.{unknown}"),
                    "unknown field (host and agents are known)",
                ));
            }
            let choices = [("host", ["exact", "domain"]), ("agents", ["this", "all"])];
            for (key, allowed) in choices {
                if let Some(v) = scope.get(key) {
                    if !v.as_str().is_some_and(|s| allowed.contains(&s)) {
                        return Err(Reply::error(
                            422,
                            &format!("scope.{key}"),
                            &format!("{v} is not {:?} or {:?}", allowed[0], allowed[1]),
                        ));
                    }
                }
            }
        }
        if let Some(v) = map.get("for_seconds") {
            if !v
                .as_u64()
                .is_some_and(|n| (1..=FOR_SECONDS_MAX).contains(&n))
            {
                return Err(Reply::error(
                    422,
                    "for_seconds",
                    "expected seconds, 1 to a year",
                ));
            }
        }
        Ok((answer, map))
    }

    /// `outbound`: where an allowed answer's rule sends its connections.
    fn parse(body: &Value, q: &QuestionInfo, outbound: &str) -> Result<AnswerRequest, Reply> {
        let (answer, map) = Self::check_alone(body)?;
        if !answer.always() {
            return Ok(AnswerRequest { answer, rule: None });
        }
        let scope = |key: &str, default: &'static str| {
            map.get("scope")
                .and_then(|s| s.get(key))
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_string()
        };
        let mut rule = Map::new();
        rule.insert("name".into(), json!(format!("asked-{}", q.id)));
        match (q.host.as_deref(), scope("host", "exact").as_str()) {
            (Some(host), "exact") => {
                rule.insert("domains".into(), json!([format!("={host}")]));
            }
            (Some(host), _) => {
                rule.insert("domains".into(), json!([host]));
            }
            (None, "exact") => {
                let bits = if q.ip.contains(':') { 128 } else { 32 };
                rule.insert("ips".into(), json!([format!("{}/{bits}", q.ip)]));
            }
            (None, _) => {
                return Err(Reply::error(
                    422,
                    "scope.host",
                    "the connection named no host (only its address): exact is the only scope",
                ))
            }
        }
        rule.insert("ports".into(), json!([q.port]));
        if scope("agents", "this") == "this" {
            let Some(agent) = &q.agent else {
                return Err(Reply::error(
                    422,
                    "scope.agents",
                    "the connection belongs to no single agent: answer for all",
                ));
            };
            rule.insert("agents".into(), json!([agent]));
        }
        let outbound = if answer.allows() { outbound } else { "block" };
        rule.insert("outbound".into(), json!(outbound));
        if let Some(seconds) = map.get("for_seconds") {
            rule.insert("ttl".into(), seconds.clone());
        }
        Ok(AnswerRequest {
            answer,
            rule: Some(Value::Object(rule)),
        })
    }
}

/// The questions, with the processes the audit writer found for their first
/// connections where they were not known when asked.
pub fn with_processes(audit: &AuditLog, mut questions: Vec<QuestionInfo>) -> Vec<QuestionInfo> {
    let ids: Vec<u64> = questions
        .iter()
        .filter(|q| q.pid.is_none())
        .filter_map(|q| q.conn_id)
        .collect();
    if ids.is_empty() {
        return questions;
    }
    let found: HashMap<u64, crate::procinfo::ProcessInfo> =
        audit.processes(ids, PROCESS_WAIT).into_iter().collect();
    for q in &mut questions {
        if let Some(p) = q.conn_id.and_then(|id| found.get(&id)) {
            q.pid = Some(p.pid);
            q.exe.clone_from(&p.exe);
        }
    }
    questions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_always_answer_adds_a_rule_out_through_ask_outbound_or_blocking() {
        let q = QuestionInfo::example();
        let parse = |answer: &str| {
            AnswerRequest::parse(&json!({ "answer": answer }), &q, "corp")
                .unwrap_or_else(|_| panic!("{answer} refused"))
                .rule
        };
        let allow = parse("allow-always").expect("a rule");
        assert_eq!(
            (&allow["name"], &allow["domains"], &allow["outbound"]),
            (&json!("asked-3"), &json!(["=blocked.test"]), &json!("corp"))
        );
        assert_eq!(allow["agents"], json!(["agent-egress-exec-1"]));
        assert_eq!(parse("deny-always").expect("a rule")["outbound"], "block");
        assert_eq!(parse("allow-once"), None, "a once answer adds no rule");
    }
}
