use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::fixtures::{RUN, TRACE, overnight_loop};
use super::*;

#[test]
fn the_tree_hangs_each_call_under_the_call_that_brought_the_run_to_its_caller() {
    let detail = overnight_loop();
    let roots = tree(&detail);
    let shape: Vec<(&str, Vec<&str>)> = roots
        .iter()
        .map(|n| {
            (
                n.call.callee.as_str(),
                n.children.iter().map(|c| c.call.callee.as_str()).collect(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("research", vec!["tool:web-search", "orchestrator"]),
            ("writer", vec!["model:openai"]),
        ]
    );
}

#[test]
fn a_call_whose_parent_the_ledger_lacks_is_drawn_at_the_top_not_lost() {
    let mut detail = overnight_loop();
    detail.calls[1].parent_call = Some("ffffffffffffffff".into());
    let roots = tree(&detail);
    assert_eq!(roots.len(), 3);
    let total: usize = roots.iter().map(|n| 1 + n.children.len()).sum();
    assert_eq!(total, detail.calls.len());
}

#[test]
fn show_names_the_agent_that_started_the_run_and_the_edge_where_the_cycle_formed() {
    let text = text::show(&overnight_loop());
    assert!(
        text.starts_with(&format!(
            "run {RUN} · completed · started by orchestrator for user:ada\n"
        )),
        "{text}"
    );
    assert!(text.contains(
        "│  └─ ✗ orchestrator  SendMessage  denied (policy) by default/no-loops/deny[0]  ↺ cycle\n"
    ), "{text}");
    assert!(
        text.contains("└─ model:openai  gpt-4o  12.0 ms  1200 tokens $0.0045"),
        "{text}"
    );
    assert!(
        text.contains("research → orchestrator     1      1       1× policy by default/no-loops/deny[0]; ↺ cycle ×1"),
        "{text}"
    );
    assert!(text.contains("writer  1200    $0.0045  1"), "{text}");
}

#[test]
fn a_huge_run_is_drawn_in_part_and_says_how_much_is_left_out() {
    let mut detail = overnight_loop();
    let template = detail.calls[0].clone();
    for i in 0..(text::MAX_TREE_LINES + 50) {
        let mut c = template.clone();
        c.span_id = format!("{:016x}", 0x1000 + i);
        c.event_id = format!("{TRACE}-{}", c.span_id);
        detail.calls.push(c);
    }
    let text = text::show(&detail);
    let drawn = text.lines().filter(|l| l.contains("─ ")).count();
    assert_eq!(drawn, text::MAX_TREE_LINES);
    assert!(text.contains("… 55 more calls not drawn"), "{text}");
}

#[test]
fn the_json_form_is_stable() {
    let v: Value = serde_json::from_str(&json::show(&overnight_loop())).unwrap();
    let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
    let mut top = keys(&v);
    top.sort();
    assert_eq!(
        top,
        [
            "agents",
            "completedAtMs",
            "edges",
            "haltReason",
            "haltedAtMs",
            "limits",
            "openedAtMs",
            "outstanding",
            "rootAgent",
            "runId",
            "spent",
            "status",
            "tree",
            "user",
        ]
    );
    assert_eq!(v["runId"], RUN);
    assert_eq!(v["rootAgent"], "orchestrator");
    let research = &v["tree"][0];
    assert_eq!(research["callee"], "research");
    let back = &research["children"][1];
    assert_eq!(
        (
            back["caller"].as_str(),
            back["callee"].as_str(),
            back["decision"].as_str()
        ),
        (Some("research"), Some("orchestrator"), Some("denied"))
    );
    assert_eq!(back["reason"], "policy");
    assert_eq!(back["rule"], "default/no-loops/deny[0]");
    assert_eq!(back["cycle"], true);
    assert_eq!(back["children"], Value::Array(vec![]));
    let mut call_keys = keys(back);
    call_keys.sort();
    assert_eq!(
        call_keys,
        [
            "atMs",
            "callee",
            "caller",
            "children",
            "cycle",
            "decision",
            "depth",
            "eventId",
            "kind",
            "latencyUs",
            "micros",
            "operation",
            "parentCall",
            "reason",
            "root",
            "rule",
            "runId",
            "spanId",
            "status",
            "tainted",
            "tokensIn",
            "tokensOut",
            "traceId",
            "user",
        ]
    );
    let edge = &v["edges"][2];
    assert_eq!(edge["cycles"], 1);
    assert_eq!(edge["denials"][0]["rule"], "default/no-loops/deny[0]");
}

#[test]
fn the_dot_form_marks_refusals_and_cycles() {
    let dot = dot::show(&overnight_loop());
    assert!(dot.starts_with("digraph run {"));
    assert!(dot.contains(
        "\"research\" -> \"orchestrator\" [label=\"1 calls\\n✗ 1 policy (default/no-loops/deny[0])\\n↺ cycle ×1\", color=red, fontcolor=red, style=dashed, penwidth=2.5];"
    ), "{dot}");
    assert!(dot.trim_end().ends_with('}'));
}

// Jaeger's JSON model (model/json/model.go), field for field; unknown fields are errors.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JResponse {
    data: Vec<JTrace>,
    total: usize,
    limit: usize,
    offset: usize,
    errors: Option<Vec<Value>>,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JTrace {
    #[serde(rename = "traceID")]
    trace_id: String,
    spans: Vec<JSpan>,
    processes: BTreeMap<String, JProcess>,
    warnings: Option<Vec<String>>,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JSpan {
    #[serde(rename = "traceID")]
    trace_id: String,
    #[serde(rename = "spanID")]
    span_id: String,
    flags: u32,
    #[serde(rename = "operationName")]
    operation_name: String,
    references: Vec<JReference>,
    #[serde(rename = "startTime")]
    start_time: u64,
    duration: u64,
    tags: Vec<JKeyValue>,
    logs: Vec<Value>,
    #[serde(rename = "processID")]
    process_id: String,
    warnings: Option<Vec<String>>,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JReference {
    #[serde(rename = "refType")]
    ref_type: String,
    #[serde(rename = "traceID")]
    trace_id: String,
    #[serde(rename = "spanID")]
    span_id: String,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JProcess {
    #[serde(rename = "serviceName")]
    service_name: String,
    tags: Vec<JKeyValue>,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JKeyValue {
    key: String,
    #[serde(rename = "type")]
    kind: String,
    value: Value,
}

#[test]
fn the_jaeger_export_is_valid_against_jaegers_json_model() {
    let doc: JResponse = serde_json::from_str(&jaeger::export(&overnight_loop())).unwrap();
    assert_eq!((doc.total, doc.limit, doc.offset), (1, 0, 0));
    assert!(doc.errors.is_none());
    let trace = &doc.data[0];
    assert_eq!(trace.trace_id, TRACE);
    assert!(trace.warnings.is_none());
    assert_eq!(trace.spans.len(), 5);
    let ids: Vec<&str> = trace.spans.iter().map(|s| s.span_id.as_str()).collect();
    for s in &trace.spans {
        assert_eq!(s.trace_id, TRACE);
        assert_eq!(s.flags, 1);
        assert!(s.logs.is_empty() && s.warnings.is_none());
        assert!(s.start_time > 0 && s.duration > 0);
        let process = &trace.processes[&s.process_id];
        assert!(!process.service_name.is_empty());
        assert!(process.tags.iter().all(|t| t.kind == "string"));
        for r in &s.references {
            assert_eq!(
                (r.ref_type.as_str(), r.trace_id.as_str()),
                ("CHILD_OF", TRACE)
            );
            assert!(
                ids.contains(&r.span_id.as_str()),
                "a reference to a span of the trace"
            );
        }
        for t in &s.tags {
            let ok = match t.kind.as_str() {
                "string" => t.value.is_string(),
                "bool" => t.value.is_boolean(),
                "int64" => t.value.is_i64() || t.value.is_u64(),
                "float64" => t.value.is_f64(),
                other => panic!("tag type {other} is not one of Jaeger's"),
            };
            assert!(
                ok,
                "tag {} has type {} but value {}",
                t.key, t.kind, t.value
            );
        }
    }
    let back = trace
        .spans
        .iter()
        .find(|s| s.span_id == "00000000000000b2")
        .unwrap();
    assert_eq!(back.operation_name, "invoke_agent orchestrator");
    assert_eq!(back.references[0].span_id, "00000000000000a1");
    assert_eq!(trace.processes[&back.process_id].service_name, "research");
    let tag = |k: &str| {
        back.tags
            .iter()
            .find(|t| t.key == k)
            .map(|t| t.value.clone())
    };
    assert_eq!(tag("error"), Some(Value::Bool(true)));
    assert_eq!(
        tag("ringfence.rule"),
        Some(Value::from("default/no-loops/deny[0]"))
    );
    let chat = trace
        .spans
        .iter()
        .find(|s| s.span_id == "00000000000000c1")
        .unwrap();
    assert_eq!(chat.operation_name, "chat gpt-4o");
}

#[test]
fn dollars_are_printed_without_rounding() {
    assert_eq!(usd(0), "$0.00");
    assert_eq!(usd(4_500), "$0.0045");
    assert_eq!(usd(1_250_000), "$1.25");
    assert_eq!(usd(3_000_000), "$3.00");
}
