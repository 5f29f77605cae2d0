//! The model path: this agent calling an LLM at `/models/<provider>/…`.
//!
//! Read top to bottom: find the provider → read the request (API, model, stream, output cap)
//! → decide with Cedar (`call_model`) → reserve an estimate from the run's lease (402 when the
//! budget is spent or the run halted) → forward with the provider's API key, which the agent
//! never holds (OpenAI streams get `stream_options.include_usage`) → read the usage from the
//! answer, streamed or not → settle: the unspent reservation goes back to the lease and the
//! actual spend is reported.
//!
//! A provider with `fallbacks` is one route of several ([`fallback`]): when it answers 5xx or
//! 429, cannot be reached or outlives its `timeoutSeconds`, its reservation is settled at zero
//! and the next route permitted by policy is asked, with a reservation priced for that route's
//! model; the call is charged at the price of whichever route answered.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, Uri, header};
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming, SizeHint};
use ringfence_crds::agent::{ModelApi, ModelProvider};
use ringfence_crds::api::{RunTerms, SpendEvent};

use crate::authz::{Action, CallContext, CallRequest, Resource};
use crate::bundle::Snapshot;
use crate::context::RunContext;
use crate::deny::{Denial, Kind};
use crate::forward::{Body, BoxError, ForwardError, full};
use crate::pricing::Pricing;
use crate::protocol::llm::{self, Api, Estimate, Usage, UsageStream};
use crate::proxy::{Proxy, egress_request, now_ms, strip_hop_headers};
use crate::spend::{Refusal, Reservation, Spend};
use crate::telemetry::{CallSpan, UsageSlot};

use fallback::{Reason, Route, Trail};

/// Output tokens reserved when a request sets no cap.
pub const DEFAULT_OUTPUT_RESERVATION: u64 = 4096;
/// Largest non-streaming answer read for its usage.
const MAX_ANSWER: usize = 32 * 1024 * 1024;
/// Largest failed answer kept while a fallback route is asked.
const MAX_ERROR_ANSWER: usize = 1024 * 1024;

mod fallback;

#[allow(clippy::too_many_arguments)]
pub async fn call_model(
    p: &Proxy,
    snap: &Snapshot,
    ctx: RunContext,
    taint: Vec<String>,
    provider_name: &str,
    rest: &str,
    parts: http::request::Parts,
    body: Bytes,
    timeout: std::time::Duration,
    span: &mut CallSpan,
) -> Result<Response<Body>, Denial> {
    let content = &snap.bundle.content;
    let me = content.agent.name.as_str();
    let edge = format!("model:{provider_name}");
    let run = ctx.run.clone();
    let provider: &ModelProvider = content
        .model_providers
        .iter()
        .find(|m| m.name == provider_name)
        .ok_or_else(|| {
            Denial::new(
                Kind::BadRequest,
                format!("{me} has no model provider named {provider_name:?}: add it to spec.models of Agent {me}"),
            )
            .edge(me, &edge)
            .run(&run)
        })?;
    let api = Api::from_path(rest).ok_or_else(|| {
        Denial::new(
            Kind::BadRequest,
            format!("{rest} is not a metered LLM endpoint: call /v1/chat/completions, /v1/responses or /v1/messages"),
        )
        .edge(me, &edge)
        .run(&run)
    })?;
    let request = llm::inspect_request(api, &body).map_err(|e| {
        Denial::new(Kind::BadRequest, e.to_string())
            .edge(me, &edge)
            .run(&run)
    })?;
    let model = request.model.as_deref().map(str::to_owned).ok_or_else(|| {
        Denial::new(Kind::BadRequest, "the request names no model")
            .edge(me, &edge)
            .run(&run)
    })?;
    let edge = format!("model:{provider_name}/{model}");
    span.model = Some(model.clone());
    span.target = model.clone();

    let decision_ctx = CallContext::of(&ctx, taint, ctx.depth, 0);
    let d = snap.authorizer.decide(&CallRequest {
        principal: me,
        action: Action::CallModel,
        resource: Resource::Model {
            provider: provider_name,
            model: &model,
        },
        context: &decision_ctx,
    });
    if !d.allowed {
        return Err(Denial::policy(
            &d,
            &format!("{me} may not call {provider_name}/{model}"),
            me,
            &edge,
            &run,
        ));
    }

    // Reserve before each route is asked; settle after.
    let estimate = request.estimate();
    let reserve_usage = Usage {
        input_tokens: estimate.input_tokens,
        output_tokens: estimate
            .max_output_tokens
            .unwrap_or(DEFAULT_OUTPUT_RESERVATION),
        ..Usage::default()
    };
    let limits = &content.limits;
    // A windowed quota meters the call too, even in a run without limits of its own.
    let metered = limits.max_total_tokens.is_some()
        || limits.max_cost_usd.is_some()
        || !limits.quotas.is_empty();
    let terms = metered.then(|| RunTerms {
        root: ctx.path.first().cloned().unwrap_or_default(),
        user: ctx.user.clone(),
        max_total_tokens: limits.max_total_tokens,
        max_cost_micros: limits.max_cost_usd.map(|u| u.micros),
        deadline_ms: ctx.deadline_ms,
        on_breach: limits.on_breach,
        budgets: limits.budgets.clone(),
        alert_webhook: limits.alert_webhook.clone(),
        quotas: limits.quotas.clone(),
    });

    let rewritten = Bytes::from(
        request
            .with_stream_usage(&body)
            .map_err(|e| {
                Denial::new(Kind::BadRequest, e.to_string())
                    .edge(me, &edge)
                    .run(&run)
            })?
            .into_owned(),
    );
    let mut headers = parts.headers;
    headers.remove(header::CONTENT_LENGTH);
    // Usage is read from the answer as it passes, so it must come uncompressed.
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    // The key is the sidecar's: whatever the agent sent is replaced.
    headers.remove(header::AUTHORIZATION);
    headers.remove("x-api-key");

    // The primary first, then each fallback route in order, until one answers.
    let started = Instant::now();
    let routes = 1 + provider.fallbacks.len();
    let mut headers = Some(headers);
    let mut trail = Trail::default();
    let mut last_reason = Reason::ServerError;
    let mut last_failure: Option<Result<Response<Body>, Denial>> = None;
    for i in 0..routes {
        let route = match i.checked_sub(1).and_then(|f| provider.fallbacks.get(f)) {
            None => Route {
                provider,
                model: &model,
            },
            Some(entry) => {
                let Some(route) = Route::resolve(entry, &content.model_providers, &model) else {
                    continue;
                };
                let d = snap.authorizer.decide(&CallRequest {
                    principal: me,
                    action: Action::CallModel,
                    resource: Resource::Model {
                        provider: &route.provider.name,
                        model: route.model,
                    },
                    context: &decision_ctx,
                });
                if !d.allowed {
                    trail.skipped(&route);
                    p.metrics.model_fallback(
                        provider_name,
                        &route.provider.name,
                        Reason::Policy.label(),
                    );
                    continue;
                }
                p.metrics
                    .model_fallback(provider_name, &route.provider.name, last_reason.label());
                route
            }
        };
        let route_edge;
        let edge = if i == 0 {
            edge.as_str()
        } else {
            route_edge = format!("model:{}/{}", route.provider.name, route.model);
            route_edge.as_str()
        };
        let reservation = match &terms {
            Some(terms) => Some(
                reserve(
                    p,
                    &run,
                    terms,
                    route.model,
                    &reserve_usage,
                    limits.fail_open,
                )
                .await
                .map_err(|r| refusal(r, me, edge, &run))?,
            ),
            None => None,
        };
        let body = if route.model == model {
            rewritten.clone()
        } else {
            fallback::with_model(&rewritten, route.model).map_err(|e| {
                Denial::new(Kind::BadRequest, e.to_string())
                    .edge(me, edge)
                    .run(&run)
            })?
        };
        // Only a call that may still fall back keeps a copy of the headers.
        let headers = if i + 1 < routes {
            headers.clone().unwrap_or_default()
        } else {
            headers.take().unwrap_or_default()
        };
        let req = provider_request(&route, rest, parts.method.clone(), headers, span, body)?;
        let settle = Settle {
            team: content.agent.team.clone(),
            environment: content.agent.environment.clone(),
            workflow: limits.budgets.first().cloned(),
            spend: p.spend.clone(),
            pricing: p.pricing.clone(),
            metrics: p.metrics.clone(),
            reservation,
            run: run.clone(),
            root: ctx.path.first().cloned().unwrap_or_default(),
            user: ctx.user.clone(),
            provider: route.provider.name.clone(),
            model: route.model.to_owned(),
            usage: span.usage_slot(),
        };
        let (wait, own_timeout) = route.timeout(timeout.saturating_sub(started.elapsed()));
        let more = i + 1 < routes;
        let resp = match p.plain.send(req, Some(wait)).await {
            Ok(r) => r,
            Err(e) => {
                // Providers bill nothing for an answer they never gave.
                settle.done(Usage::default(), false);
                let reason = match e {
                    ForwardError::Timeout { .. } => own_timeout.then_some(Reason::Timeout),
                    _ => Some(Reason::Unreachable),
                };
                trail.failed(&route, &e.to_string());
                record_trail(span, &trail, provider_name, &model);
                let denial = Denial::new(
                    Kind::Upstream,
                    if trail.fell_back() {
                        format!(
                            "cannot reach {}: {e} (routes left: {})",
                            route.provider.name,
                            trail.summary()
                        )
                    } else {
                        format!("cannot reach {}: {e}", route.provider.name)
                    },
                )
                .edge(me, edge)
                .run(&run);
                match reason {
                    Some(reason) if more => {
                        last_reason = reason;
                        last_failure = Some(Err(denial));
                        continue;
                    }
                    _ => return Err(denial),
                }
            }
        };
        if more && let Some(reason) = Reason::of_status(resp.status()) {
            settle.done(Usage::default(), false);
            trail.failed(&route, &resp.status().to_string());
            last_reason = reason;
            last_failure = Some(Ok(failure(resp).await));
            continue;
        }
        if i > 0 {
            // A fallback answered: the span and the ledger name it.
            span.provider = Some(route.provider.name.clone());
            span.callee = format!("model:{}", route.provider.name);
            span.target = route.model.to_owned();
            span.response_model = Some(route.model.to_owned());
        }
        record_trail(span, &trail, provider_name, &model);
        let mut resp = answer(resp, api, &estimate, settle, &route, me, edge, &run).await?;
        if trail.fell_back()
            && let Ok(v) = HeaderValue::from_str(&trail.tried_header(Some(&route)))
        {
            resp.headers_mut().insert(fallback::ROUTES_HEADER, v);
        }
        return Ok(resp);
    }
    // Every route after the last failure was skipped: the app gets that failure.
    record_trail(span, &trail, provider_name, &model);
    let last = last_failure.unwrap_or_else(|| {
        Err(Denial::new(
            Kind::Upstream,
            format!(
                "no route of {provider_name} could be asked: {}",
                trail.summary()
            ),
        )
        .edge(me, &edge)
        .run(&run))
    });
    last.map(|mut resp| {
        if let Ok(v) = HeaderValue::from_str(&trail.tried_header(None)) {
            resp.headers_mut().insert(fallback::ROUTES_HEADER, v);
        }
        resp
    })
}

/// Reserves an estimate of the call priced for `model`, the model actually asked.
async fn reserve(
    p: &Proxy,
    run: &str,
    terms: &RunTerms,
    model: &str,
    usage: &Usage,
    fail_open: bool,
) -> Result<Reservation, Refusal> {
    // Reserve only what the run or a quota limits: a lease holds nothing of an unlimited
    // dimension.
    let tokens = if terms.tightest_tokens().is_some() {
        usage.total_tokens()
    } else {
        0
    };
    let micros = if terms.tightest_micros().is_some() {
        p.pricing.cost(model, usage).map_or(0, |u| u.micros)
    } else {
        0
    };
    p.spend.reserve(run, terms, tokens, micros, fail_open).await
}

/// The request to `route`'s provider, with its API key, which the agent never holds.
fn provider_request(
    route: &Route<'_>,
    rest: &str,
    method: http::Method,
    mut headers: HeaderMap,
    span: &CallSpan,
    body: Bytes,
) -> Result<http::Request<Body>, Denial> {
    let provider = route.provider;
    let url = format!("{}{rest}", provider.url.trim_end_matches('/'));
    let uri: Uri = url
        .parse()
        .map_err(|_| Denial::new(Kind::BadRequest, format!("{url} is not a valid URL")))?;
    if let Some(var) = &provider.api_key_env
        && let Ok(key) = std::env::var(var)
    {
        let (name, value) = match provider.api {
            ModelApi::OpenAI => (header::AUTHORIZATION.as_str(), format!("Bearer {key}")),
            ModelApi::Anthropic => ("x-api-key", key),
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
    egress_request(method, headers, uri, span.trace, full(body))
}

/// A failed answer (5xx, 429), read so it can be handed to the app if no later route answers.
async fn failure(resp: Response<Incoming>) -> Response<Body> {
    let (mut parts, incoming) = resp.into_parts();
    strip_hop_headers(&mut parts.headers);
    parts.headers.remove(header::CONTENT_LENGTH);
    let bytes = http_body_util::Limited::new(incoming, MAX_ERROR_ANSWER)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Response::from_parts(parts, full(bytes))
}

/// The span learns which routes were left behind, when any were.
fn record_trail(span: &mut CallSpan, trail: &Trail, provider: &str, model: &str) {
    if trail.fell_back() {
        span.fallback_from = Some(format!("{provider}/{model}"));
        span.fallback_trail = Some(trail.summary().to_owned());
    }
}

/// The answer of the route that answered, metered: streamed answers as they pass, others read
/// whole.
#[allow(clippy::too_many_arguments)]
async fn answer(
    resp: Response<Incoming>,
    api: Api,
    estimate: &Estimate,
    settle: Settle,
    route: &Route<'_>,
    me: &str,
    edge: &str,
    run: &str,
) -> Result<Response<Body>, Denial> {
    let (mut parts, incoming) = resp.into_parts();
    strip_hop_headers(&mut parts.headers);
    // Providers bill nothing for an error.
    if !parts.status.is_success() {
        settle.done(Usage::default(), false);
        let bytes = incoming
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        return Ok(Response::from_parts(parts, full(bytes)));
    }
    let streaming = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    if streaming {
        let metered = Metered {
            inner: incoming,
            usage: Some(UsageStream::new(api, *estimate)),
            settle: Some(settle),
        };
        return Ok(Response::from_parts(parts, metered.boxed()));
    }
    let bytes = http_body_util::Limited::new(incoming, MAX_ANSWER)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| {
            Denial::new(
                Kind::Upstream,
                format!("cannot read {}'s answer: {e}", route.provider.name),
            )
            .edge(me, edge)
            .run(run)
        })?;
    settle.done(llm::response_usage_or_estimate(api, &bytes, estimate), true);
    parts.headers.remove(header::CONTENT_LENGTH);
    Ok(Response::from_parts(parts, full(bytes)))
}

fn refusal(r: Refusal, me: &str, edge: &str, run: &str) -> Denial {
    let rule = match &r {
        Refusal::Exhausted { limit, .. } => limit.clone(),
        Refusal::Halted { .. } | Refusal::Completed { .. } => "onBreach".to_owned(),
        Refusal::Unavailable { .. } => "budget service".to_owned(),
    };
    Denial::new(Kind::Budget, r.to_string())
        .rule(rule)
        .edge(me, edge)
        .run(run)
}

/// Settles one call's reservation once its usage is known.
struct Settle {
    spend: Arc<Spend>,
    pricing: Arc<Pricing>,
    metrics: crate::metrics::Metrics,
    reservation: Option<Reservation>,
    run: String,
    root: String,
    user: String,
    provider: String,
    model: String,
    team: Option<String>,
    environment: Option<String>,
    workflow: Option<String>,
    /// Where the call's span reads the usage.
    usage: UsageSlot,
}

impl Settle {
    fn done(self, usage: Usage, called: bool) {
        let price = self.pricing.get(&self.model);
        let micros = price.map_or(0, |p| p.cost_micros(&usage));
        // Only an answer fills the span's slot (set once): a route that failed before a fallback
        // answered must not leave its zeros there. A call that never got an answer reads as zero.
        if called {
            let _ = self.usage.set(crate::telemetry::Usage {
                input_tokens: usage.input_tokens,
                output_tokens: usage.output_tokens,
                micros,
            });
        }
        let model_label = if price.is_some() {
            self.model.as_str()
        } else {
            "other"
        };
        if called {
            self.metrics.record_usage(
                &self.provider,
                model_label,
                usage.input_tokens,
                usage.output_tokens,
                micros,
                usage.estimate_reason,
            );
        }
        let event = SpendEvent {
            event_id: ulid::Ulid::new().to_string(),
            run: self.run.clone(),
            lease_id: None,
            tokens_in: usage.input_tokens,
            tokens_out: usage.output_tokens,
            micros,
            calls: u64::from(called),
            model: Some(self.model.clone()),
            estimated: usage.estimated,
            at_ms: now_ms(),
            team: self.team.clone(),
            environment: self.environment.clone(),
            workflow: self.workflow.clone(),
            root: self.root.clone(),
            user: self.user.clone(),
        };
        match self.reservation {
            Some(r) => self.spend.settle(r, event),
            None => self.spend.record(event),
        }
    }
}

/// A streamed answer, passed on unchanged while its usage is read.
struct Metered {
    inner: Incoming,
    usage: Option<UsageStream>,
    settle: Option<Settle>,
}

impl Metered {
    fn finish(&mut self) {
        if let (Some(stream), Some(settle)) = (self.usage.take(), self.settle.take()) {
            settle.done(stream.finish(), true);
        }
    }
}

impl hyper::body::Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(stream)) = (frame.data_ref(), this.usage.as_mut()) {
                    stream.feed(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish();
                Poll::Ready(Some(Err(BoxError::from(e))))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    // A client that hangs up mid-stream was still billed for what was generated.
    fn drop(&mut self) {
        self.finish();
    }
}
