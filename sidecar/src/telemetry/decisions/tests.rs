//! Decision lines: JSON with every field, per level, and a full queue that drops and counts.

use http::Response;
use serde_json::Value;

use super::*;
use crate::forward::full;
use crate::telemetry::{CallSpan, Operation, Telemetry, Usage};
use crate::tracecontext::TraceParent;
use ringfence_crds::api::CallKind;

const RUN: &str = "01JD0000000000000000000000";
const FIELDS: [&str; 24] = [
    "time",
    "kind",
    "side",
    "trace_id",
    "span_id",
    "run",
    "user",
    "caller",
    "callee",
    "method",
    "tool",
    "model",
    "decision",
    "rule",
    "message",
    "status",
    "latency_us",
    "tokens_in",
    "tokens_out",
    "cost_usd_micros",
    "depth",
    "cycle",
    "tainted",
    "error",
];

fn in_run(mut span: CallSpan) -> CallSpan {
    span.run = Some(RUN.into());
    span.user = "user:tomas".into();
    span.depth = 1;
    span.child_of(
        TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap(),
    );
    span
}

/// research → orchestrator over A2A.
fn a2a_call() -> CallSpan {
    let mut span = CallSpan::new(Side::Client, "research");
    span.callee = "orchestrator".into();
    span.target = "orchestrator".into();
    span.a2a_method = Some("SendMessage");
    in_run(span)
}

fn answered(mut span: CallSpan, status: u16) -> CallSpan {
    let resp = Response::builder().status(status).body(()).unwrap();
    span.answered(&resp);
    span
}

/// The line a finished span writes, parsed; every field present.
fn line_of(span: CallSpan) -> Value {
    let text = line(&span.finish());
    assert!(
        text.ends_with('\n') && text.matches('\n').count() == 1,
        "{text}"
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    for f in FIELDS {
        assert!(v.get(f).is_some(), "no {f} in {v}");
    }
    v
}

#[test]
fn an_allowed_agent_call_is_one_json_line_with_every_field() {
    let v = line_of(answered(a2a_call(), 200));
    assert_eq!(v["kind"], "agent");
    assert_eq!(v["side"], "client");
    assert_eq!(v["run"], RUN);
    assert_eq!(v["user"], "user:tomas");
    assert_eq!(v["caller"], "research");
    assert_eq!(v["callee"], "orchestrator");
    assert_eq!(v["method"], "SendMessage");
    assert_eq!(v["decision"], "allowed");
    assert_eq!(v["rule"], Value::Null);
    assert_eq!(v["status"], 200);
    assert_eq!(v["depth"], 1);
    assert_eq!(v["tainted"], false);
    assert_eq!(v["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(v["span_id"].as_str().map(str::len), Some(16));
    // RFC 3339, UTC.
    let time = v["time"].as_str().unwrap();
    assert!(
        time.len() >= 20 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "{time}"
    );
}

#[test]
fn research_may_not_invoke_orchestrator_and_the_line_names_the_rule() {
    let mut span = a2a_call();
    span.tainted = true;
    span.denied(
        "policy",
        Some("default/incident/no-callbacks"),
        "research may not invoke orchestrator",
    );
    let v = line_of(answered(span, 403));
    assert_eq!(v["decision"], "policy");
    assert_eq!(v["rule"], "default/incident/no-callbacks");
    assert_eq!(v["message"], "research may not invoke orchestrator");
    assert_eq!(v["status"], 403);
    assert_eq!(v["tainted"], true);
}

#[test]
fn a_tool_call_names_its_tool_and_mcp_method() {
    let mut span = CallSpan::new(Side::Client, "research");
    (span.operation, span.kind) = (Operation::ExecuteTool, CallKind::Tool);
    span.callee = "tool:vault".into();
    span.mcp_method = Some("tools/call".into());
    span.tool = Some("list_secrets".into());
    let v = line_of(answered(in_run(span), 200));
    assert_eq!(v["kind"], "tool");
    assert_eq!(v["callee"], "tool:vault");
    assert_eq!(v["method"], "tools/call");
    assert_eq!(v["tool"], "list_secrets");
}

#[test]
fn a_model_call_carries_its_tokens_and_cost() {
    let mut span = CallSpan::new(Side::Client, "research");
    (span.operation, span.kind) = (Operation::Chat, CallKind::Model);
    span.callee = "model:openai".into();
    span.model = Some("gpt-4o".into());
    let slot = span.usage_slot();
    slot.set(Usage {
        input_tokens: 1200,
        output_tokens: 340,
        micros: 6_400,
    })
    .unwrap();
    let v = line_of(answered(in_run(span), 200));
    assert_eq!(v["kind"], "model");
    assert_eq!(v["model"], "gpt-4o");
    assert_eq!(v["tokens_in"], 1200);
    assert_eq!(v["tokens_out"], 340);
    assert_eq!(v["cost_usd_micros"], 6_400);
}

fn telemetry(level: Level, capacity: usize) -> (Telemetry, mpsc::Receiver<String>, Metrics) {
    let metrics = Metrics::new().unwrap();
    let (log, rx) = DecisionLog::new(level, capacity);
    (
        Telemetry::new(None, None, metrics.clone()).with_decisions(log),
        rx,
        metrics,
    )
}

fn denied_call() -> CallSpan {
    let mut span = a2a_call();
    span.denied("policy", Some("r"), "no");
    answered(span, 403)
}

#[test]
fn the_level_chooses_which_calls_get_a_line() {
    let (all, mut rx, _) = telemetry(Level::All, 16);
    all.finish(answered(a2a_call(), 200));
    all.finish(denied_call());
    assert_eq!(rx.try_recv().map(|l| l.contains("\"allowed\"")), Ok(true));
    assert_eq!(rx.try_recv().map(|l| l.contains("\"policy\"")), Ok(true));

    let (deny, mut rx, _) = telemetry(Level::Deny, 16);
    deny.finish(answered(a2a_call(), 200));
    deny.finish(denied_call());
    assert_eq!(rx.try_recv().map(|l| l.contains("\"policy\"")), Ok(true));
    assert!(rx.try_recv().is_err(), "deny logs no allowed call");

    let (off, mut rx, _) = telemetry(Level::Off, 16);
    off.finish(denied_call());
    assert!(rx.try_recv().is_err());
}

#[test]
fn the_synthetic_root_span_of_a_run_is_not_a_call() {
    let (t, mut rx, _) = telemetry(Level::All, 16);
    t.finish(CallSpan::run_root(
        "orchestrator",
        TraceParent::new_root(),
        RUN,
        "user:tomas",
    ));
    assert!(rx.try_recv().is_err());
}

#[test]
fn a_full_queue_drops_and_counts_and_never_waits() {
    let (t, mut rx, metrics) = telemetry(Level::All, 2);
    let started = std::time::Instant::now();
    for _ in 0..5 {
        t.finish(answered(a2a_call(), 200));
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    assert!(
        metrics
            .encode()
            .contains("ringfence_telemetry_dropped_total{queue=\"decisions\"} 3"),
        "{}",
        metrics.encode()
    );
    assert!(rx.try_recv().is_ok() && rx.try_recv().is_ok() && rx.try_recv().is_err());
}

#[tokio::test]
async fn the_writer_writes_whole_lines_and_counts_them() {
    let metrics = Metrics::new().unwrap();
    let (log, rx) = DecisionLog::new(Level::All, 16);
    let t = Telemetry::new(None, None, metrics.clone()).with_decisions(log);
    // A call whose answer is streamed is logged when its body ends.
    let resp = t.finish_with(answered(a2a_call(), 200), Response::new(full("ok")));
    drop(resp);
    t.finish(denied_call());
    drop(t);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("decisions.jsonl");
    let out = open(Some(&path)).await.unwrap();
    write(rx, out, metrics.clone()).await;
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["decision"], "allowed");
    assert_eq!(lines[1]["decision"], "policy");
    assert!(
        metrics
            .encode()
            .contains("ringfence_telemetry_sent_total{queue=\"decisions\"} 2")
    );
}

#[tokio::test]
async fn a_file_that_cannot_be_opened_says_which_flag_to_fix() {
    let err = open(Some(Path::new("/nonexistent-dir/decisions.jsonl")))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("--decision-log-file"), "{err}");
}

/// Counts the writes it is handed; each takes everything offered.
#[derive(Clone, Default)]
struct Writes(std::sync::Arc<std::sync::Mutex<Vec<usize>>>);

impl tokio::io::AsyncWrite for Writes {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.lock().unwrap().push(buf.len());
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test(start_paused = true)]
async fn lines_arriving_within_the_gather_window_cost_one_write() {
    let metrics = Metrics::new().unwrap();
    let (log, rx) = DecisionLog::new(Level::All, 1024);
    let t = Telemetry::new(None, None, metrics.clone()).with_decisions(log);
    let out = Writes::default();
    let writer = tokio::spawn(write(rx, out.clone(), metrics.clone()));
    // 100 calls over 40 ms (tokio's timer ticks in milliseconds): inside one window.
    for i in 0..100 {
        t.finish(denied_call());
        if i % 10 == 9 {
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    }
    tokio::time::sleep(GATHER).await;
    let writes = out.0.lock().unwrap().clone();
    assert_eq!(writes.len(), 1, "one write for the window: {writes:?}");
    // A call after the window is written on its own.
    t.finish(denied_call());
    drop(t);
    writer.await.unwrap();
    assert_eq!(out.0.lock().unwrap().len(), 2);
    assert!(
        metrics
            .encode()
            .contains("ringfence_telemetry_sent_total{queue=\"decisions\"} 101")
    );
}
