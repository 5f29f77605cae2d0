//! Spans to any OpenTelemetry collector (Jaeger, the OTel Collector, …) over OTLP/HTTP with
//! protobuf, configured by the standard variables:
//!
//! - `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the full URL) or `OTEL_EXPORTER_OTLP_ENDPOINT` (its
//!   base; `/v1/traces` is added). Neither set: no spans are exported.
//! - `OTEL_EXPORTER_OTLP_PROTOCOL` / `…_TRACES_PROTOCOL`: `http/protobuf` (the default). `grpc`
//!   is refused at start with what to set instead: this build carries no gRPC stack.
//! - `OTEL_EXPORTER_OTLP_HEADERS`, `…_TIMEOUT`, `OTEL_SERVICE_NAME` (default: the agent's name),
//!   `OTEL_RESOURCE_ATTRIBUTES`; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn
//!   export off.
//!
//! Spans reach the exporter through a bounded queue ([`super::SPAN_QUEUE`]) and leave in
//! batches; a batch the collector refuses is dropped and counted, never retried past the OTLP
//! client's own retries, so a dead collector costs memory for one batch at most.

use std::borrow::Cow;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use ringfence_crds::AgentKey;
use tokio::sync::mpsc;

use super::{Finished, Operation, SPAN_QUEUE, Side};
use crate::forward::{Plain, full};
use crate::metrics::Metrics;

/// Spans per export request. Small: a batch is turned into protobuf in one go on the thread
/// that also serves calls, so its size is a stall every call waiting behind it pays (512 spans
/// put the everything-on rung's p99 at 1k RPS at 1.9 ms; docs/benchmarks.md).
pub const BATCH: usize = 64;
/// How long spans wait to be batched.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Longest a collector may take to answer one export.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest collector answer read.
const MAX_ANSWER: usize = 1024 * 1024;

/// Why spans cannot be exported as configured.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error(
        "{var}={value:?}: this sidecar exports OTLP over HTTP only; set {var}=http/protobuf and point OTEL_EXPORTER_OTLP_ENDPOINT at the collector's HTTP port (4318)"
    )]
    Protocol { var: &'static str, value: String },
    #[error("cannot set up the OTLP exporter: {0}; check OTEL_EXPORTER_OTLP_* ")]
    Build(String),
}

/// Whether the environment asks for span export (an endpoint is set and export is not off).
pub fn wanted(env: &dyn Fn(&str) -> Option<String>) -> bool {
    let set = |k: &str| env(k).is_some_and(|v| !v.trim().is_empty());
    let off = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
    !off && (set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT"))
}

/// Refuses a protocol this build cannot speak.
pub fn check_protocol(env: &dyn Fn(&str) -> Option<String>) -> Result<(), OtlpError> {
    for var in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(value) = env(var) {
            let v = value.trim();
            if v.is_empty() || v == "http/protobuf" {
                continue;
            }
            return Err(OtlpError::Protocol { var, value });
        }
    }
    Ok(())
}

/// The exporter, from the process environment; `None` when no endpoint is configured.
pub fn from_env(agent: &AgentKey) -> Result<Option<Exporter>, OtlpError> {
    let env = |k: &str| std::env::var(k).ok();
    if !wanted(&env) {
        return Ok(None);
    }
    check_protocol(&env)?;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(OtlpClient(Plain::default()))
        .build()
        .map_err(|e| OtlpError::Build(e.to_string()))?;
    let mut resource = Resource::builder().with_attributes([
        KeyValue::new("service.namespace", agent.namespace.to_string()),
        KeyValue::new("ringfence.agent", agent.name.to_string()),
    ]);
    if env("OTEL_SERVICE_NAME").is_none_or(|v| v.trim().is_empty()) {
        resource = resource.with_service_name(agent.name.to_string());
    }
    exporter.set_resource(&resource.build());
    Ok(Some(Exporter {
        inner: exporter,
        scope: InstrumentationScope::builder("ringfence-sidecar")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build(),
    }))
}

/// The queue the exporter reads.
pub fn queue() -> (mpsc::Sender<Finished>, mpsc::Receiver<Finished>) {
    mpsc::channel(SPAN_QUEUE)
}

/// Exports spans to an OTLP endpoint.
pub struct Exporter {
    inner: opentelemetry_otlp::SpanExporter,
    scope: InstrumentationScope,
}

impl Exporter {
    /// Exports queued spans in batches until the queue closes.
    pub async fn run(self, mut rx: mpsc::Receiver<Finished>, metrics: Metrics) {
        while let Some(batch) = crate::batch::next(&mut rx, BATCH, FLUSH_EVERY).await {
            let n = batch.len();
            let spans = batch.iter().map(|f| span_data(f, &self.scope)).collect();
            match self.inner.export(spans).await {
                Ok(()) => metrics.telemetry_sent("spans", n),
                Err(e) => {
                    metrics.telemetry_dropped_n("spans", n);
                    tracing::warn!(spans = n, error = %e, "cannot export spans to the OTLP endpoint; dropped");
                }
            }
        }
    }
}

/// The OTLP client: the sidecar's own HTTP(S) client (rustls, Mozilla's roots).
struct OtlpClient(Plain);

impl std::fmt::Debug for OtlpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OtlpClient")
    }
}

#[async_trait::async_trait]
impl HttpClient for OtlpClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let resp = self
            .0
            .send(Request::from_parts(parts, full(body)), Some(EXPORT_TIMEOUT))
            .await?;
        let (parts, body) = resp.into_parts();
        let bytes = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
        Ok(Response::from_parts(parts, bytes))
    }
}

/// One finished call as an OpenTelemetry span, named and attributed after the GenAI semantic
/// conventions plus `ringfence.*`.
pub fn span_data(f: &Finished, scope: &InstrumentationScope) -> SpanData {
    let s = &f.span;
    let trace = s
        .trace
        .unwrap_or_else(crate::tracecontext::TraceParent::new_root);
    let mut attrs = vec![KeyValue::new("gen_ai.operation.name", s.operation.name())];
    let agent_name = match s.operation {
        // The invoked agent, on both ends of the call.
        Operation::InvokeAgent => s.target.clone(),
        _ => s.caller.clone(),
    };
    attrs.push(KeyValue::new("gen_ai.agent.name", agent_name));
    if let Some(tool) = &s.tool {
        attrs.push(KeyValue::new("gen_ai.tool.name", tool.clone()));
    }
    if let Some(model) = &s.model {
        attrs.push(KeyValue::new("gen_ai.request.model", model.clone()));
    }
    if let Some(provider) = &s.provider {
        attrs.push(KeyValue::new("gen_ai.provider.name", provider.clone()));
    }
    if let Some(model) = &s.response_model {
        attrs.push(KeyValue::new("gen_ai.response.model", model.clone()));
    }
    if let Some(from) = &s.fallback_from {
        attrs.push(KeyValue::new("ringfence.fallback.from", from.clone()));
    }
    if let Some(trail) = &s.fallback_trail {
        attrs.push(KeyValue::new("ringfence.fallback.trail", trail.clone()));
    }
    if s.operation == Operation::Chat {
        attrs.push(usage("gen_ai.usage.input_tokens", f.usage.input_tokens));
        attrs.push(usage("gen_ai.usage.output_tokens", f.usage.output_tokens));
    }
    if let Some(m) = s.a2a_method {
        attrs.push(KeyValue::new("a2a.method.name", m));
    }
    if let Some(task) = &s.a2a_task {
        attrs.push(KeyValue::new("a2a.task.id", task.clone()));
    }
    if let Some(m) = &s.mcp_method {
        attrs.push(KeyValue::new("mcp.method.name", m.clone()));
    }
    if let Some(run) = &s.run {
        attrs.push(KeyValue::new("ringfence.run.id", run.clone()));
    }
    attrs.push(KeyValue::new("ringfence.depth", i64::from(s.depth)));
    attrs.push(KeyValue::new("ringfence.caller", s.caller.clone()));
    let (decision, rule, message) = s
        .decision
        .clone()
        .unwrap_or_else(|| ("allowed".to_owned(), None, String::new()));
    attrs.push(KeyValue::new("ringfence.decision", decision.clone()));
    if let Some(rule) = rule {
        attrs.push(KeyValue::new("ringfence.rule", rule));
    }
    // Micro-dollars are exact; the attribute is in dollars, as people read cost.
    attrs.push(KeyValue::new(
        "ringfence.cost_usd",
        f.usage.micros as f64 / 1_000_000.0,
    ));
    attrs.push(KeyValue::new("ringfence.tainted", s.tainted));
    if s.cycle {
        attrs.push(KeyValue::new("ringfence.cycle", true));
    }
    if s.retry_attempt > 1 {
        attrs.push(KeyValue::new(
            "ringfence.retry.attempt",
            i64::from(s.retry_attempt),
        ));
    }
    if let Some(code) = s.status {
        attrs.push(KeyValue::new("http.response.status_code", i64::from(code)));
    }
    let status = if decision != "allowed" {
        Status::error(if message.is_empty() {
            format!("refused: {decision}")
        } else {
            message
        })
    } else if let Some(e) = &s.error {
        Status::error(e.clone())
    } else if s.status.is_some_and(|c| c >= 500) {
        Status::error(format!("HTTP {}", s.status.unwrap_or_default()))
    } else {
        Status::Unset
    };
    SpanData {
        span_context: SpanContext::new(
            TraceId::from_bytes(trace.trace_id),
            SpanId::from_bytes(trace.parent_id),
            TraceFlags::new(trace.flags),
            false,
            TraceState::default(),
        ),
        parent_span_id: s.parent.map_or(SpanId::INVALID, SpanId::from_bytes),
        parent_span_is_remote: s.parent.is_some(),
        span_kind: match s.side {
            Side::Client => SpanKind::Client,
            Side::Server => SpanKind::Server,
        },
        name: Cow::Owned(s.name()),
        start_time: s.start,
        end_time: f.end,
        attributes: attrs,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope.clone(),
    }
}

fn usage(key: &'static str, n: u64) -> KeyValue {
    KeyValue::new(key, i64::try_from(n).unwrap_or(i64::MAX))
}
