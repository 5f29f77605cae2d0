//! `--format jaeger`: the run's calls as traces in Jaeger's JSON model (the one its API returns
//! and its UI's "JSON File" upload reads), for people without a collector. Each call is a client
//! span of its caller (the process), linked `CHILD_OF` the call that brought the run there —
//! the same tree `runs show` draws.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;
use serde_json::{Value, json};

use crate::budget::{Decision, EdgeEvent, EdgeKind, RunDetail};

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    data: Vec<Trace>,
    total: usize,
    limit: usize,
    offset: usize,
    errors: Option<Vec<Value>>,
}

#[derive(Serialize)]
struct Trace {
    #[serde(rename = "traceID")]
    trace_id: String,
    spans: Vec<Span>,
    processes: BTreeMap<String, Process>,
    warnings: Option<Vec<String>>,
}

#[derive(Serialize)]
struct Span {
    #[serde(rename = "traceID")]
    trace_id: String,
    #[serde(rename = "spanID")]
    span_id: String,
    flags: u32,
    #[serde(rename = "operationName")]
    operation_name: String,
    references: Vec<Reference>,
    #[serde(rename = "startTime")]
    start_time: u64,
    duration: u64,
    tags: Vec<Value>,
    logs: Vec<Value>,
    #[serde(rename = "processID")]
    process_id: String,
    warnings: Option<Vec<String>>,
}

#[derive(Serialize)]
struct Reference {
    #[serde(rename = "refType")]
    ref_type: &'static str,
    #[serde(rename = "traceID")]
    trace_id: String,
    #[serde(rename = "spanID")]
    span_id: String,
}

#[derive(Serialize)]
struct Process {
    #[serde(rename = "serviceName")]
    service_name: String,
    tags: Vec<Value>,
}

/// The span name of a call, after the GenAI conventions.
pub fn operation_name(c: &EdgeEvent) -> String {
    let target = |fallback: &str| {
        c.operation.clone().unwrap_or_else(|| {
            fallback
                .trim_start_matches("tool:")
                .trim_start_matches("model:")
                .to_owned()
        })
    };
    match c.kind {
        EdgeKind::Agent => format!("invoke_agent {}", c.callee),
        EdgeKind::Tool => format!("execute_tool {}", target(&c.callee)),
        EdgeKind::Model => format!("chat {}", target(&c.callee)),
    }
}

fn tag(key: &str, value: impl Into<Value>) -> Value {
    let value = value.into();
    let kind = match &value {
        Value::Bool(_) => "bool",
        Value::Number(n) if n.is_f64() => "float64",
        Value::Number(_) => "int64",
        _ => "string",
    };
    json!({ "key": key, "type": kind, "value": value })
}

/// The run's calls as a Jaeger JSON document, one trace per trace id (one, for a run whose
/// agents all forwarded its context).
pub fn export(detail: &RunDetail) -> String {
    let run = &detail.summary.run;
    let mut traces: BTreeMap<&str, Vec<&EdgeEvent>> = BTreeMap::new();
    for c in &detail.calls {
        traces.entry(c.trace_id.as_str()).or_default().push(c);
    }
    let data = traces
        .into_iter()
        .map(|(trace_id, calls)| {
            let spans_here: HashSet<&str> = calls.iter().map(|c| c.span_id.as_str()).collect();
            let mut processes: BTreeMap<String, Process> = BTreeMap::new();
            let mut process_of: BTreeMap<&str, String> = BTreeMap::new();
            for c in &calls {
                let n = process_of.len() + 1;
                process_of.entry(c.caller.as_str()).or_insert_with(|| {
                    let id = format!("p{n}");
                    processes.insert(
                        id.clone(),
                        Process {
                            service_name: c.caller.clone(),
                            tags: vec![tag("ringfence.agent", c.caller.clone())],
                        },
                    );
                    id
                });
            }
            let spans = calls
                .iter()
                .map(|c| {
                    let mut tags = vec![
                        tag("span.kind", "client"),
                        tag(
                            "gen_ai.operation.name",
                            match c.kind {
                                EdgeKind::Agent => "invoke_agent",
                                EdgeKind::Tool => "execute_tool",
                                EdgeKind::Model => "chat",
                            },
                        ),
                        tag("ringfence.run.id", run.run_id.clone()),
                        tag("ringfence.caller", c.caller.clone()),
                        tag("ringfence.depth", c.depth),
                        tag("ringfence.tainted", c.tainted),
                        tag("ringfence.cost_usd", c.micros as f64 / 1_000_000.0),
                    ];
                    match c.kind {
                        EdgeKind::Agent => tags.push(tag("gen_ai.agent.name", c.callee.clone())),
                        EdgeKind::Tool => {
                            if let Some(tool) = &c.operation {
                                tags.push(tag("gen_ai.tool.name", tool.clone()));
                            }
                        }
                        EdgeKind::Model => {
                            if let Some(model) = &c.operation {
                                tags.push(tag("gen_ai.request.model", model.clone()));
                            }
                            tags.push(tag("gen_ai.usage.input_tokens", c.tokens_in));
                            tags.push(tag("gen_ai.usage.output_tokens", c.tokens_out));
                        }
                    }
                    match &c.decision {
                        Decision::Allowed => tags.push(tag("ringfence.decision", "allowed")),
                        Decision::Denied(reason) => {
                            tags.push(tag("ringfence.decision", reason.clone()));
                            tags.push(tag("error", true));
                        }
                    }
                    if let Some(rule) = &c.rule {
                        tags.push(tag("ringfence.rule", rule.clone()));
                    }
                    if c.cycle {
                        tags.push(tag("ringfence.cycle", true));
                    }
                    if let Some(status) = c.status {
                        tags.push(tag("http.response.status_code", status));
                    }
                    let references = c
                        .parent_call
                        .as_deref()
                        .filter(|p| spans_here.contains(p))
                        .map(|p| Reference {
                            ref_type: "CHILD_OF",
                            trace_id: trace_id.to_owned(),
                            span_id: p.to_owned(),
                        })
                        .into_iter()
                        .collect();
                    Span {
                        trace_id: trace_id.to_owned(),
                        span_id: c.span_id.clone(),
                        flags: 1,
                        operation_name: operation_name(c),
                        references,
                        start_time: c.at_ms.saturating_mul(1_000),
                        duration: c.latency_us,
                        tags,
                        logs: Vec::new(),
                        process_id: process_of
                            .get(c.caller.as_str())
                            .cloned()
                            .unwrap_or_default(),
                        warnings: None,
                    }
                })
                .collect();
            Trace {
                trace_id: trace_id.to_owned(),
                spans,
                processes,
                warnings: None,
            }
        })
        .collect::<Vec<_>>();
    let doc = Response {
        total: data.len(),
        data,
        limit: 0,
        offset: 0,
        errors: None,
    };
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}
