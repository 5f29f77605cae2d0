//! What happened to each call, recorded once: a span for the trace and, for calls this agent
//! made in a run, a call for the run ledger.
//!
//! A [`CallSpan`] is opened when a request arrives, filled in along the request path (the run,
//! the depth, the method, the decision) and finished when the answer's body has been passed on
//! in full ([`Recorded`]), so a streamed answer's span lasts as long as the stream and a model
//! call's span carries the usage read from it. [`Telemetry::finish`] hands the result to two
//! bounded queues — the OTLP exporter ([`otlp`]) and the ledger reporter ([`ledger`]) — with
//! `try_send`: a full queue drops the record and counts it, it never slows a request. When the
//! decision log is on, the same record also becomes one JSON line ([`decisions`]).
//!
//! One trace per run: a call's span is a child of the app's `traceparent` when it belongs to the
//! run's trace, else of the span the run's context carries, so an app that forwards only the
//! `ringfence-context` header still lands in its run's trace.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Response;
use hyper::body::{Frame, SizeHint};
use ringfence_crds::api::{CallEvent, CallKind, Decision};
use tokio::sync::mpsc;

use crate::deny::DENIED_HEADER;
use crate::forward::{Body, BoxError};
use crate::metrics::Metrics;
use crate::tracecontext::{TraceParent, write_hex};

pub mod decisions;
pub mod ledger;
pub mod otlp;

/// Spans waiting for the exporter; beyond this they are dropped and counted.
pub const SPAN_QUEUE: usize = 8_192;
/// Calls waiting for the ledger reporter; beyond this they are dropped and counted.
pub const LEDGER_QUEUE: usize = 65_536;

/// The GenAI operation a span records (`gen_ai.operation.name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    InvokeAgent,
    ExecuteTool,
    Chat,
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Operation::InvokeAgent => "invoke_agent",
            Operation::ExecuteTool => "execute_tool",
            Operation::Chat => "chat",
        }
    }
}

/// Which end of the call this sidecar is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The caller's sidecar: the span of the call going out, and the ledger's record of it.
    Client,
    /// The callee's sidecar: the span of the call coming in.
    Server,
}

/// Tokens and cost of a model call, known once its answer has been read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub micros: u64,
}

/// A slot the model path fills with the usage it read; the span reads it when it finishes.
pub type UsageSlot = Arc<OnceLock<Usage>>;

/// One call in flight, as this sidecar sees it.
#[derive(Debug, Clone)]
pub struct CallSpan {
    pub side: Side,
    pub operation: Operation,
    pub kind: CallKind,
    /// The calling agent (this agent on the client side).
    pub caller: String,
    /// The ledger's name of what was called: an agent, `tool:<server>` or `model:<provider>`.
    pub callee: String,
    /// What the span is named after: the agent invoked, the tool, or the model.
    pub target: String,
    /// This span: the run's trace id and this span's id.
    pub trace: Option<TraceParent>,
    /// The parent span, when there is one.
    pub parent: Option<[u8; 8]>,
    /// The span of the call that brought the run to the caller (the ledger's tree link).
    pub parent_call: Option<[u8; 8]>,
    pub run: Option<String>,
    /// The run's root agent and user.
    pub root: String,
    pub user: String,
    pub depth: u32,
    pub cycle: bool,
    pub tainted: bool,
    pub a2a_method: Option<&'static str>,
    pub a2a_task: Option<String>,
    pub mcp_method: Option<String>,
    pub tool: Option<String>,
    pub model: Option<String>,
    pub provider: Option<String>,
    /// The model that answered, when a fallback route answered instead of the one asked.
    pub response_model: Option<String>,
    /// What the call was first meant for, when a fallback took it or was tried: the agent, or
    /// the model route (`provider/model`).
    pub fallback_from: Option<String>,
    /// Each route left behind and why (`openai/gpt-4o: 503 Service Unavailable; …`).
    pub fallback_trail: Option<String>,
    pub usage: Option<UsageSlot>,
    /// `allowed`, or the reason of the refusal, with the rule that decided and its message.
    pub decision: Option<(String, Option<String>, String)>,
    pub status: Option<u16>,
    /// What went wrong after the decision (an upstream failure, a broken stream).
    pub error: Option<String>,
    /// Which attempt of the call this span is (1 the first; 0 for calls never attempted).
    pub retry_attempt: u32,
    pub start: SystemTime,
    started: Instant,
}

impl CallSpan {
    /// A call from `caller` that starts now. What it is gets filled in as the request path
    /// learns it.
    pub fn new(side: Side, caller: &str) -> Self {
        CallSpan {
            side,
            operation: Operation::InvokeAgent,
            kind: CallKind::Agent,
            caller: caller.to_owned(),
            callee: String::new(),
            target: String::new(),
            trace: None,
            parent: None,
            parent_call: None,
            run: None,
            root: String::new(),
            user: String::new(),
            depth: 0,
            cycle: false,
            tainted: false,
            a2a_method: None,
            a2a_task: None,
            mcp_method: None,
            tool: None,
            model: None,
            provider: None,
            response_model: None,
            fallback_from: None,
            fallback_trail: None,
            usage: None,
            decision: None,
            status: None,
            error: None,
            retry_attempt: 0,
            start: SystemTime::now(),
            started: Instant::now(),
        }
    }

    /// The span a run starts with when its root agent's app sent no `traceparent`: the root of
    /// the run's trace (`trace` is the context's), ending as it starts, so every call of the
    /// run has a parent that exists.
    pub fn run_root(agent: &str, trace: TraceParent, run: &str, user: &str) -> Self {
        let mut span = CallSpan::new(Side::Server, user);
        span.target = agent.to_owned();
        span.trace = Some(trace);
        span.run = Some(run.to_owned());
        span
    }

    /// Places the span in its trace: a new span id, child of `parent`.
    pub fn child_of(&mut self, parent: TraceParent) -> TraceParent {
        let me = parent.child();
        self.trace = Some(me);
        self.parent = Some(parent.parent_id);
        me
    }

    /// Places the span at the root of a new trace.
    pub fn root(&mut self) -> TraceParent {
        let me = TraceParent::new_root();
        self.trace = Some(me);
        self.parent = None;
        me
    }

    /// The span of attempt `n` of this call, sent as `trace` (a span id of its own under the
    /// call's parent) and started `at`: a retried attempt is a span of its own.
    pub fn attempt(&self, trace: TraceParent, n: u32, at: (SystemTime, Instant)) -> Self {
        let mut s = self.clone();
        s.trace = Some(trace);
        s.retry_attempt = n;
        (s.start, s.started) = at;
        s
    }

    /// A slot for the model path to fill with the call's usage.
    pub fn usage_slot(&mut self) -> UsageSlot {
        self.usage.get_or_insert_with(UsageSlot::default).clone()
    }

    /// The span's name: `invoke_agent research`, `execute_tool web_search`, `chat gpt-4o`, or
    /// for MCP methods other than `tools/call`, `tools/list web-search`.
    pub fn name(&self) -> String {
        match (self.operation, &self.mcp_method) {
            (Operation::ExecuteTool, Some(m)) if m != "tools/call" => {
                format!("{m} {}", self.target)
            }
            (op, _) if self.target.is_empty() => op.name().to_owned(),
            (op, _) => format!("{} {}", op.name(), self.target),
        }
    }

    /// Records how the call ended from its response: allowed, or refused (here or by the
    /// callee's sidecar, whose refusal names its reason and rule in headers).
    pub fn answered<B>(&mut self, resp: &Response<B>) {
        self.status = Some(resp.status().as_u16());
        if self.decision.is_some() {
            return;
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        self.decision = Some(match header(DENIED_HEADER) {
            Some(reason) => (
                reason,
                header(crate::deny::RULE_HEADER),
                format!("refused by the sidecar of {}", self.target),
            ),
            None => ("allowed".to_owned(), None, String::new()),
        });
    }

    /// Records a refusal by this sidecar.
    pub fn denied(&mut self, reason: &str, rule: Option<&str>, message: &str) {
        self.decision = Some((
            reason.to_owned(),
            rule.map(str::to_owned),
            message.to_owned(),
        ));
    }

    fn finish(self) -> Finished {
        let elapsed = self.started.elapsed();
        let usage = self
            .usage
            .as_ref()
            .and_then(|slot| slot.get().copied())
            .unwrap_or_default();
        Finished {
            end: self.start + elapsed,
            latency_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            usage,
            span: self,
        }
    }
}

/// A call that is over.
#[derive(Debug, Clone)]
pub struct Finished {
    pub span: CallSpan,
    pub end: SystemTime,
    pub latency_us: u64,
    pub usage: Usage,
}

impl Finished {
    pub fn allowed(&self) -> bool {
        self.span
            .decision
            .as_ref()
            .is_none_or(|(reason, _, _)| reason == "allowed")
    }

    /// The ledger's record of a call this agent made in a run; `None` for anything else.
    pub fn call_event(&self) -> Option<CallEvent> {
        let s = &self.span;
        if s.side != Side::Client {
            return None;
        }
        let run = s.run.clone()?;
        let trace = s.trace?;
        let (decision, rule) = match &s.decision {
            Some((reason, rule, _)) if reason != "allowed" => {
                (Decision::Denied(reason.clone()), rule.clone())
            }
            _ => (Decision::Allowed, None),
        };
        let trace_id = hex(&trace.trace_id);
        let span_id = hex(&trace.parent_id);
        Some(CallEvent {
            event_id: format!("{trace_id}-{span_id}"),
            run_id: run,
            trace_id,
            span_id,
            parent_call: s.parent_call.as_ref().map(|p| hex(p)),
            root: s.root.clone(),
            user: s.user.clone(),
            caller: s.caller.clone(),
            callee: s.callee.clone(),
            kind: s.kind,
            operation: s
                .a2a_method
                .map(str::to_owned)
                .or_else(|| s.tool.clone())
                .or_else(|| s.response_model.clone())
                .or_else(|| s.model.clone())
                .or_else(|| s.mcp_method.clone()),
            decision,
            rule,
            depth: s.depth,
            cycle: s.cycle,
            tainted: s.tainted,
            latency_us: self.latency_us,
            tokens_in: self.usage.input_tokens,
            tokens_out: self.usage.output_tokens,
            micros: self.usage.micros,
            at_ms: unix_ms(s.start),
            status: s.status,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    // Writing to a String cannot fail.
    let _ = write_hex(&mut out, bytes);
    out
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where finished calls go. Cloning is cheap; every clone feeds the same queues.
#[derive(Clone)]
pub struct Telemetry {
    spans: Option<mpsc::Sender<Finished>>,
    ledger: Option<mpsc::Sender<CallEvent>>,
    decisions: Option<decisions::DecisionLog>,
    metrics: Metrics,
}

impl Telemetry {
    /// Sinks for spans (when traces are exported) and ledger calls (when a budget service
    /// keeps them); either may be absent.
    pub fn new(
        spans: Option<mpsc::Sender<Finished>>,
        ledger: Option<mpsc::Sender<CallEvent>>,
        metrics: Metrics,
    ) -> Self {
        Telemetry {
            spans,
            ledger,
            decisions: None,
            metrics,
        }
    }

    /// Also writes a decision line per finished call (see [`decisions`]).
    pub fn with_decisions(mut self, log: decisions::DecisionLog) -> Self {
        self.decisions = Some(log);
        self
    }

    /// Records a call that is over. Never waits: a full queue drops the record and counts it.
    pub fn finish(&self, span: CallSpan) {
        let done = span.finish();
        if let Some(ledger) = &self.ledger
            && let Some(event) = done.call_event()
            && ledger.try_send(event).is_err()
        {
            self.metrics.telemetry_dropped("ledger");
        }
        if let Some(log) = &self.decisions {
            log.record(&done, &self.metrics);
        }
        let sampled = done.span.trace.is_some_and(|t| t.sampled());
        if let Some(spans) = &self.spans
            && sampled
            && spans.try_send(done).is_err()
        {
            self.metrics.telemetry_dropped("spans");
        }
    }

    /// The response, its span finished when its body has been passed on in full (or dropped).
    pub fn finish_with(&self, span: CallSpan, resp: Response<Body>) -> Response<Body> {
        let (parts, body) = resp.into_parts();
        Response::from_parts(
            parts,
            Body::new(Recorded {
                inner: Some(body),
                span: Some(span),
                telemetry: self.clone(),
            }),
        )
    }
}

/// A response body that finishes its call's span at its end.
pub struct Recorded {
    inner: Option<Body>,
    span: Option<CallSpan>,
    telemetry: Telemetry,
}

impl Recorded {
    fn done(&mut self, error: Option<&BoxError>) {
        // The inner body first: a metered model answer settles its usage when it ends.
        self.inner = None;
        if let Some(mut span) = self.span.take() {
            if let Some(e) = error {
                span.error = Some(format!("the answer broke off: {e}"));
            }
            self.telemetry.finish(span);
        }
    }
}

impl hyper::body::Body for Recorded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.done(None);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.done(Some(&e));
                Poll::Ready(Some(Err(e)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for Recorded {
    // A client that hangs up mid-answer still gets its call recorded.
    fn drop(&mut self) {
        self.done(None);
    }
}

#[cfg(test)]
mod tests;
