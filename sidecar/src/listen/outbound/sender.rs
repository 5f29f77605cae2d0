//! Sending an admitted outbound call: its attempts (retried as the RunBudget's `retry` says,
//! within the retry budget) and, for an agent that stays down, its fallback agent.
//!
//! The call was decided and counted (policy, depth, cycles, rate limit) before it gets here;
//! every attempt carries the same hop context, only its span id changes, so a retry never
//! resets depth nor counts twice. Each attempt that failed and was retried is finished as its
//! own client span, a sibling of the call's, with `ringfence.retry.attempt`.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use hyper::body::Incoming;
use ringfence_crds::bundle::AgentEntry;

use crate::bundle::Snapshot;
use crate::context::{self, RunContext};
use crate::fallback;
use crate::forward::{ForwardError, full};
use crate::proxy::{Proxy, egress_request};
use crate::retry::attempts::{self, Attempt, Outcome, Plan};
use crate::telemetry::CallSpan;
use crate::tracecontext::TraceParent;

/// The span ids and start of a call's attempts.
struct Spans<'a> {
    /// The call's span as it stood when the attempts began.
    call: &'a CallSpan,
    /// The call's own span id, used by the first attempt when `reuse` (a fallback's attempts
    /// all take new ones).
    base: TraceParent,
    reuse: bool,
    sent: Vec<TraceParent>,
    started: (SystemTime, Instant),
}

impl<'a> Spans<'a> {
    fn new(call: &'a CallSpan, base: TraceParent, reuse: bool) -> Self {
        Self {
            call,
            base,
            reuse,
            sent: Vec::new(),
            started: (SystemTime::now(), Instant::now()),
        }
    }

    /// The span id attempt `n` is sent as.
    fn next(&mut self, n: u32) -> TraceParent {
        let t = if n == 1 && self.reuse {
            self.base
        } else {
            self.base.child()
        };
        self.sent.push(t);
        self.started = (SystemTime::now(), Instant::now());
        t
    }

    /// Finishes attempt `n`'s span: it failed with `outcome` and was retried or superseded.
    fn failed<B>(&self, p: &Proxy, n: u32, outcome: &Outcome<B>) {
        let Some(trace) = self.sent.last().copied() else {
            return;
        };
        let mut s = self.call.attempt(trace, n, self.started);
        match outcome {
            Ok(r) => {
                s.answered(r);
                s.error = Some(format!("attempt {n} answered {}", r.status()));
            }
            Err(e) => s.error = Some(format!("attempt {n} failed: {e}")),
        }
        p.telemetry.finish(s);
    }
}

/// The attempts of one call to one agent's sidecar.
struct ToAgent<'a> {
    p: &'a Proxy,
    to: &'a AgentEntry,
    addr: &'a str,
    method: Method,
    rest: &'a str,
    headers: HeaderMap,
    body: Bytes,
    hop: RunContext,
    /// The hop context already encoded under one span id: the first attempt's, when it is sent
    /// under the call's own span.
    encoded: Option<(TraceParent, String)>,
    spans: Spans<'a>,
}

impl ToAgent<'_> {
    fn request(&mut self, n: u32) -> Result<Request<Bytes>, ForwardError> {
        let trace = self.spans.next(n);
        let failed = |reason: String| ForwardError::Upstream {
            target: self.to.name.clone(),
            reason,
        };
        self.hop.trace = Some(trace);
        let ctx = match self.encoded.take() {
            Some((t, ctx)) if t == trace => ctx,
            _ => self.hop.encode().map_err(|e| failed(e.to_string()))?,
        };
        let mut headers = self.headers.clone();
        insert(&mut headers, context::HEADER, &ctx);
        insert(&mut headers, "traceparent", &trace.to_string());
        let uri: Uri = format!(
            "https://{}.{}.ringfence{}",
            self.to.name, self.to.namespace, self.rest
        )
        .parse()
        .map_err(|_| failed(format!("{} is not a valid path", self.rest)))?;
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(uri)
            .version(http::Version::HTTP_11)
            .body(self.body.clone())
            .map_err(|e| failed(e.to_string()))?;
        *req.headers_mut() = headers;
        Ok(req)
    }
}

impl Attempt for ToAgent<'_> {
    type Body = Incoming;

    fn send(
        &mut self,
        n: u32,
        timeout: Duration,
    ) -> impl Future<Output = Outcome<Incoming>> + Send {
        let req = self.request(n);
        let (p, to, addr) = (self.p, self.to, self.addr);
        async move { p.mesh.send(&to.spiffe_id, addr, req?, timeout).await }
    }

    fn retried(&mut self, n: u32, outcome: &Outcome<Incoming>) {
        self.spans.failed(self.p, n, outcome);
    }
}

/// What an agent call came to.
pub(super) struct Sent<'a> {
    pub last: Outcome<Incoming>,
    /// The agent that answered: the callee, or its fallback.
    pub served_by: &'a AgentEntry,
    /// Why the call did not fall back, when it could not (`denied by <rule>`).
    pub fallback_refused: Option<String>,
}

/// An admitted agent call, ready to send.
pub(super) struct AgentCall<'a> {
    pub snap: &'a Snapshot,
    pub to: &'a AgentEntry,
    pub addr: &'a str,
    pub method: Method,
    pub rest: &'a str,
    /// Without the context and `traceparent`, which every attempt sets anew.
    pub headers: HeaderMap,
    pub body: Bytes,
    pub hop: RunContext,
    /// `hop` encoded as the caller checked it, under the call's own span id.
    pub encoded: String,
    pub idempotent: bool,
    /// The call's whole time, across attempts and a fallback.
    pub timeout: Duration,
}

/// Sends `call` with retries and, when its callee stays down, to its fallback; fills in the
/// call's span (the answering attempt's span id, the attempt count, the fallback).
pub(super) async fn to_agent<'a>(
    p: &'a Proxy,
    call: AgentCall<'a>,
    span: &mut CallSpan,
) -> Sent<'a> {
    let AgentCall {
        snap,
        to,
        addr,
        method,
        rest,
        headers,
        body,
        hop,
        encoded,
        idempotent,
        timeout,
    } = call;
    let policy = snap.bundle.content.limits.retry.as_ref();
    let deadline = tokio::time::Instant::now() + timeout;
    let plan = |callee: &'a str| Plan {
        policy,
        idempotent,
        budgets: &p.retries,
        callee,
        deadline,
        metrics: &p.metrics,
    };
    let Some(base) = span.trace else {
        return Sent {
            last: Err(ForwardError::Upstream {
                target: to.name.clone(),
                reason: "the call has no span to send under".into(),
            }),
            served_by: to,
            fallback_refused: None,
        };
    };
    let mut primary = ToAgent {
        p,
        to,
        addr,
        method,
        rest,
        headers,
        body,
        hop,
        encoded: Some((base, encoded)),
        spans: Spans::new(span, base, true),
    };
    let done = attempts::run(&plan(&to.name), &mut primary).await;
    let fallback = done
        .failure
        .filter(|f| fallback::eligible(policy, *f, idempotent))
        .and_then(|_| fallback::decide(snap, &primary.hop, &primary.hop.taint, to));
    let next = match fallback {
        None => None,
        Some(Err(refusal)) => {
            let target = to.fallback.as_deref().unwrap_or_default();
            p.metrics.fallback(&to.name, known(snap, target), "denied");
            tracing::info!(agent = %p.agent, callee = %to.name, fallback = target, rule = ?refusal.rule, "{}", refusal.message);
            let rule = refusal
                .rule
                .unwrap_or_else(|| refusal.kind.name().to_owned());
            let last_trace = primary.spans.sent.last().copied();
            span.trace = last_trace.or(span.trace);
            span.retry_attempt = done.attempts;
            return Sent {
                last: done.last,
                served_by: to,
                fallback_refused: Some(format!("denied by {rule}")),
            };
        }
        Some(Ok(next)) => Some(next),
    };
    let Some(next) = next else {
        span.trace = primary.spans.sent.last().copied().or(span.trace);
        span.retry_attempt = done.attempts;
        return Sent {
            last: done.last,
            served_by: to,
            fallback_refused: None,
        };
    };
    // The primary's last attempt is over: a span of its own, like a retried one.
    primary.retried(done.attempts, &done.last);
    drop(done);
    let ToAgent {
        method,
        headers,
        body,
        hop,
        ..
    } = primary;
    // `fallback::decide` admits only agents with an inbound address.
    let Some(next_addr) = next.inbound.as_deref() else {
        return Sent {
            last: Err(ForwardError::Upstream {
                target: next.name.clone(),
                reason: "the bundle knows no inbound address for it".into(),
            }),
            served_by: next,
            fallback_refused: None,
        };
    };
    span.fallback_from = Some(to.name.clone());
    span.callee.clone_from(&next.name);
    span.target.clone_from(&next.name);
    span.cycle = hop.revisits_of(&next.name) > 0;
    tracing::info!(agent = %p.agent, callee = %to.name, fallback = %next.name, "falling back");
    let mut second = ToAgent {
        p,
        to: next,
        addr: next_addr,
        method,
        rest,
        headers,
        body,
        hop,
        encoded: None,
        spans: Spans::new(span, base, false),
    };
    let done = attempts::run(&plan(&next.name), &mut second).await;
    let outcome = if done.failure.is_some() || done.last.is_err() {
        "failed"
    } else {
        "answered"
    };
    p.metrics.fallback(&to.name, &next.name, outcome);
    span.trace = second.spans.sent.last().copied().or(span.trace);
    span.retry_attempt = done.attempts;
    Sent {
        last: done.last,
        served_by: next,
        fallback_refused: None,
    }
}

/// `name` when the bundle knows it (a bounded metric label), else `unknown`.
fn known<'s>(snap: &'s Snapshot, name: &str) -> &'s str {
    snap.agent_named(name)
        .map_or("unknown", |a| a.name.as_str())
}

/// The attempts of one call to an MCP server.
struct ToTool<'a> {
    p: &'a Proxy,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    spans: Spans<'a>,
}

impl Attempt for ToTool<'_> {
    type Body = Incoming;

    fn send(
        &mut self,
        n: u32,
        timeout: Duration,
    ) -> impl Future<Output = Outcome<Incoming>> + Send {
        let trace = self.spans.next(n);
        let req = egress_request(
            self.method.clone(),
            self.headers.clone(),
            self.uri.clone(),
            Some(trace),
            full(self.body.clone()),
        )
        .map_err(|d| ForwardError::Upstream {
            target: self.uri.to_string(),
            reason: d.message,
        });
        let p = self.p;
        async move { p.plain.send(req?, Some(timeout)).await }
    }

    fn retried(&mut self, n: u32, outcome: &Outcome<Incoming>) {
        self.spans.failed(self.p, n, outcome);
    }
}

/// An admitted tool call, ready to send.
pub(super) struct ToolCall<'a> {
    pub snap: &'a Snapshot,
    pub server: &'a str,
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub idempotent: bool,
    pub timeout: Duration,
}

/// Sends `call` with retries; fills in the call's span as [`to_agent`] does.
pub(super) async fn to_tool(
    p: &Proxy,
    call: ToolCall<'_>,
    span: &mut CallSpan,
) -> Outcome<Incoming> {
    let base = span.trace.unwrap_or_else(|| span.root());
    let mut sender = ToTool {
        p,
        method: call.method,
        uri: call.uri,
        headers: call.headers,
        body: call.body,
        spans: Spans::new(span, base, true),
    };
    let plan = Plan {
        policy: call.snap.bundle.content.limits.retry.as_ref(),
        idempotent: call.idempotent,
        budgets: &p.retries,
        callee: call.server,
        deadline: tokio::time::Instant::now() + call.timeout,
        metrics: &p.metrics,
    };
    let done = attempts::run(&plan, &mut sender).await;
    span.trace = sender.spans.sent.last().copied().or(span.trace);
    span.retry_attempt = done.attempts;
    done.last
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}
