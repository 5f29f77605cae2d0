use http_body_util::BodyExt;
use opentelemetry::Value;
use opentelemetry::trace::{SpanKind, Status};

use super::*;
use crate::deny::{Denial, Kind};
use crate::forward::full;

const RUN: &str = "01JD0000000000000000000000";

fn parent() -> TraceParent {
    TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap()
}

/// orchestrator → research, in a run, one hop below the root.
fn client_call() -> CallSpan {
    let mut span = CallSpan::new(Side::Client, "orchestrator");
    span.caller = "orchestrator".into();
    span.callee = "research".into();
    span.target = "research".into();
    span.run = Some(RUN.into());
    span.depth = 1;
    span.a2a_method = Some("SendMessage");
    span.child_of(parent());
    span
}

fn telemetry(
    span_cap: usize,
) -> (
    Telemetry,
    mpsc::Receiver<Finished>,
    mpsc::Receiver<CallEvent>,
    Metrics,
) {
    let metrics = Metrics::new().unwrap();
    let (stx, srx) = mpsc::channel(span_cap);
    let (ltx, lrx) = mpsc::channel(16);
    (
        Telemetry::new(Some(stx), Some(ltx), metrics.clone()),
        srx,
        lrx,
        metrics,
    )
}

fn attr<'a>(data: &'a opentelemetry_sdk::trace::SpanData, key: &str) -> Option<&'a Value> {
    data.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

#[test]
fn a_call_this_agent_made_in_a_run_goes_to_the_ledger_linked_to_the_call_that_brought_the_run_here()
{
    let (t, mut spans, mut ledger, _) = telemetry(16);
    let mut span = client_call();
    span.parent_call = Some([7; 8]);
    span.cycle = true;
    span.status = Some(200);
    let me = span.trace.unwrap();
    t.finish(span);

    let call = ledger.try_recv().expect("a ledger call");
    assert_eq!(call.run_id, RUN);
    assert_eq!(
        (call.caller.as_str(), call.callee.as_str()),
        ("orchestrator", "research")
    );
    assert_eq!(call.trace_id, "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(call.span_id, me.parent_id_hex());
    assert_eq!(call.event_id, format!("{}-{}", call.trace_id, call.span_id));
    assert_eq!(call.parent_call.as_deref(), Some("0707070707070707"));
    assert_eq!(call.operation.as_deref(), Some("SendMessage"));
    assert_eq!(call.decision, Decision::Allowed);
    assert!(call.cycle);
    assert!(spans.try_recv().is_ok(), "the span is exported too");
}

#[test]
fn a_refusal_is_recorded_with_its_reason_and_rule() {
    let (t, mut spans, mut ledger, _) = telemetry(16);
    let mut span = client_call();
    let denial = Denial::new(Kind::Policy, "research may not invoke orchestrator")
        .rule("default/no-loops/deny[0]");
    span.denied(denial.kind.name(), denial.rule.as_deref(), &denial.message);
    span.answered(&denial.into_response(None));
    t.finish(span);

    let call = ledger.try_recv().unwrap();
    assert_eq!(call.decision, Decision::Denied("policy".into()));
    assert_eq!(call.rule.as_deref(), Some("default/no-loops/deny[0]"));
    assert_eq!(call.status, Some(403));
    let data = otlp::span_data(&spans.try_recv().unwrap(), &scope());
    assert_eq!(
        data.status,
        Status::error("research may not invoke orchestrator")
    );
    assert_eq!(
        attr(&data, "ringfence.decision"),
        Some(&Value::from("policy"))
    );
    assert_eq!(
        attr(&data, "ringfence.rule"),
        Some(&Value::from("default/no-loops/deny[0]"))
    );
}

#[test]
fn a_refusal_by_the_callees_sidecar_is_read_from_its_answer() {
    let mut span = client_call();
    let answer = Denial::new(Kind::Cycle, "orchestrator is already on the path")
        .rule("cycles.maxRevisits")
        .into_response(None);
    span.answered(&answer);
    let done = span.finish();
    let call = done.call_event().unwrap();
    assert_eq!(call.decision, Decision::Denied("cycle".into()));
    assert_eq!(call.rule.as_deref(), Some("cycles.maxRevisits"));
}

#[test]
fn server_spans_and_calls_outside_a_run_stay_out_of_the_ledger() {
    let (t, mut spans, mut ledger, _) = telemetry(16);
    let mut server = CallSpan::new(Side::Server, "research");
    server.run = Some(RUN.into());
    server.child_of(parent());
    t.finish(server);
    let mut no_run = CallSpan::new(Side::Client, "research");
    no_run.root();
    t.finish(no_run);
    assert!(ledger.try_recv().is_err());
    assert_eq!(spans.try_recv().unwrap().span.side, Side::Server);
    assert!(spans.try_recv().is_ok());
}

#[test]
fn a_full_span_queue_drops_and_counts_and_never_waits() {
    let (t, _spans, _ledger, metrics) = telemetry(1);
    for _ in 0..3 {
        t.finish(client_call());
    }
    let text = metrics.encode();
    assert!(
        text.contains("ringfence_telemetry_dropped_total{queue=\"spans\"} 2"),
        "{text}"
    );
}

#[test]
fn an_unsampled_trace_is_not_exported_but_still_reaches_the_ledger() {
    let (t, mut spans, mut ledger, _) = telemetry(16);
    let mut span = CallSpan::new(Side::Client, "orchestrator");
    span.run = Some(RUN.into());
    span.child_of(
        TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00").unwrap(),
    );
    t.finish(span);
    assert!(spans.try_recv().is_err());
    assert!(ledger.try_recv().is_ok());
}

fn scope() -> opentelemetry::InstrumentationScope {
    opentelemetry::InstrumentationScope::builder("test").build()
}

#[test]
fn spans_follow_the_genai_conventions() {
    let mut chat = CallSpan::new(Side::Client, "writer");
    chat.caller = "writer".into();
    chat.operation = Operation::Chat;
    chat.kind = CallKind::Model;
    chat.target = "gpt-4o".into();
    chat.model = Some("gpt-4o".into());
    chat.provider = Some("openai".into());
    chat.run = Some(RUN.into());
    chat.depth = 2;
    chat.tainted = true;
    let p = parent();
    chat.child_of(p);
    let slot = chat.usage_slot();
    slot.set(Usage {
        input_tokens: 12,
        output_tokens: 34,
        micros: 1_500,
    })
    .unwrap();
    let data = otlp::span_data(&chat.finish(), &scope());
    assert_eq!(data.name, "chat gpt-4o");
    assert_eq!(data.span_kind, SpanKind::Client);
    assert_eq!(data.parent_span_id.to_bytes(), p.parent_id);
    assert_eq!(data.span_context.trace_id().to_bytes(), p.trace_id);
    assert_eq!(data.status, Status::Unset);
    for (key, value) in [
        ("gen_ai.operation.name", Value::from("chat")),
        ("gen_ai.agent.name", Value::from("writer")),
        ("gen_ai.request.model", Value::from("gpt-4o")),
        ("gen_ai.provider.name", Value::from("openai")),
        ("gen_ai.usage.input_tokens", Value::I64(12)),
        ("gen_ai.usage.output_tokens", Value::I64(34)),
        ("ringfence.run.id", Value::from(RUN)),
        ("ringfence.depth", Value::I64(2)),
        ("ringfence.caller", Value::from("writer")),
        ("ringfence.decision", Value::from("allowed")),
        ("ringfence.cost_usd", Value::F64(0.0015)),
        ("ringfence.tainted", Value::Bool(true)),
    ] {
        assert_eq!(attr(&data, key), Some(&value), "{key}");
    }

    let mut tool = CallSpan::new(Side::Client, "research");
    tool.operation = Operation::ExecuteTool;
    tool.target = "web_search".into();
    tool.tool = Some("web_search".into());
    tool.mcp_method = Some("tools/call".into());
    assert_eq!(tool.name(), "execute_tool web_search");
    tool.mcp_method = Some("tools/list".into());
    tool.target = "web-search".into();
    assert_eq!(tool.name(), "tools/list web-search");
    let invoke = client_call();
    assert_eq!(invoke.name(), "invoke_agent research");
    let data = otlp::span_data(&invoke.finish(), &scope());
    assert_eq!(
        attr(&data, "a2a.method.name"),
        Some(&Value::from("SendMessage"))
    );
    assert_eq!(
        attr(&data, "gen_ai.agent.name"),
        Some(&Value::from("research"))
    );
}

#[tokio::test]
async fn a_span_ends_when_its_answer_has_been_passed_on() {
    let (t, mut spans, _ledger, _) = telemetry(16);
    let resp = t.finish_with(client_call(), Response::new(full("hello")));
    assert!(spans.try_recv().is_err(), "still streaming");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "hello");
    assert!(spans.try_recv().is_ok());

    let dropped = t.finish_with(client_call(), Response::new(full("never read")));
    drop(dropped);
    assert!(
        spans.try_recv().is_ok(),
        "a dropped answer still ends its span"
    );
}

#[test]
fn the_environment_decides_whether_and_how_spans_are_exported() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| (*v).to_owned())
        }
    };
    assert!(!otlp::wanted(&env(&[])));
    assert!(otlp::wanted(&env(&[(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "http://127.0.0.1:4318"
    )])));
    assert!(otlp::wanted(&env(&[(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "http://127.0.0.1:4318/v1/traces"
    )])));
    assert!(!otlp::wanted(&env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
        ("OTEL_SDK_DISABLED", "true"),
    ])));
    assert!(!otlp::wanted(&env(&[
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
        ("OTEL_TRACES_EXPORTER", "none"),
    ])));
    assert!(
        otlp::check_protocol(&env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")])).is_ok()
    );
    let err = otlp::check_protocol(&env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("http/protobuf") && err.contains("4318"),
        "{err}"
    );
}
