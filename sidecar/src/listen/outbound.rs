//! The outbound path: this agent calling another agent, a tool, or (later) a model.
//!
//! Read top to bottom, a call goes: route → restore (or start) the run's context → check the
//! run's deadline, depth and cycles → read the protocol → decide with Cedar → rate limit →
//! forward → account (taint, metrics). Every refusal is a [`Denial`] naming rule, edge and run.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use ringfence_crds::agent::Trust;
use ringfence_crds::api::CallKind;
use ringfence_crds::bundle::{AgentEntry, BundleContent};

use crate::authz::{Action, CallContext, CallRequest, Resource};
use crate::bundle::Snapshot;
use crate::context::{self, RunContext};
use crate::deny::{Denial, Kind};
use crate::discovery::{agents, tools};
use crate::forward::{Body, ForwardError, full, stream};
use crate::limits;
use crate::protocol::{a2a, jsonrpc, mcp};
use crate::proxy::{
    DEFAULT_TIMEOUT, MAX_CARD, MAX_REQUEST_BODY, Proxy, USER_HEADER, now_ms, read_body,
    strip_hop_headers,
};
use crate::retry;
use crate::taint::{self, TAINT_HEADER};
use crate::telemetry::{CallSpan, Operation, Side};
use crate::tracecontext::TraceParent;

/// Where an outbound call goes.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Agent { name: String, rest: String },
    Tool { server: String, rest: String },
    Model { provider: String, rest: String },
}

/// Serves one outbound request.
pub async fn handle(p: Arc<Proxy>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    if agents::is_listing(req.method(), req.uri()) {
        let resp = agents::serve(&p, req.headers()).await;
        let label = decision(&resp);
        p.metrics
            .record_request("outbound", "discovery", "agents", label, started.elapsed());
        return resp;
    }
    let mut span = CallSpan::new(Side::Client, &p.agent.name);
    let ((kind, peer), resp) = match outbound(&p, req, &mut span).await {
        Ok(done) => done,
        Err((label, denial, rpc_id)) => {
            tracing::info!(agent = %p.agent, reason = denial.kind.name(), rule = ?denial.rule, edge = ?denial.edge, run = ?denial.run, "{}", denial.message);
            span.denied(denial.kind.name(), denial.rule.as_deref(), &denial.message);
            (label, denial.into_response(rpc_id.as_deref()))
        }
    };
    p.metrics
        .record_request("outbound", kind, &peer, decision(&resp), started.elapsed());
    span.answered(&resp);
    if span.trace.is_none() {
        // Refused before its run (and so its trace) was known: a trace of its own.
        span.root();
    }
    p.telemetry.finish_with(span, resp)
}

/// The metrics label of a response: `allowed`, or the kind of refusal.
pub fn decision(resp: &Response<Body>) -> &'static str {
    match resp
        .headers()
        .get(crate::deny::DENIED_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        None => "allowed",
        Some(kind) => crate::deny::Kind::ALL
            .iter()
            .find(|k| k.name() == kind)
            .map_or("denied", |k| k.name()),
    }
}

/// Metric labels of a call: its kind and the peer, one the bundle knows or `unknown` (labels
/// stay bounded whatever a request names).
type Label = (&'static str, String);
type Refusal = (Label, Denial, Option<String>);

fn unknown() -> Label {
    ("unknown", "unknown".to_owned())
}

async fn outbound(
    p: &Proxy,
    req: Request<Incoming>,
    span: &mut CallSpan,
) -> Result<(Label, Response<Body>), Refusal> {
    let snap = p.ready().map_err(|d| (unknown(), d, None))?;
    let content = &snap.bundle.content;
    let target = route(req.uri(), content).map_err(|d| (unknown(), d, None))?;
    let (kind, known) = match &target {
        Target::Agent { name, .. } => ("agent", snap.agent_named(name).map(|a| a.name.clone())),
        Target::Tool { server, .. } => (
            "tool",
            content
                .tool_servers
                .iter()
                .find(|t| &t.name == server)
                .map(|t| t.name.clone()),
        ),
        Target::Model { provider, .. } => (
            "model",
            content
                .model_providers
                .iter()
                .find(|m| &m.name == provider)
                .map(|m| m.name.clone()),
        ),
    };
    let label: Label = (kind, known.unwrap_or_else(|| "unknown".to_owned()));
    match &target {
        Target::Agent { name, .. } => {
            (span.operation, span.kind) = (Operation::InvokeAgent, CallKind::Agent);
            span.target = name.clone();
        }
        Target::Tool { server, .. } => {
            (span.operation, span.kind) = (Operation::ExecuteTool, CallKind::Tool);
            span.target = server.clone();
        }
        Target::Model { provider, .. } => {
            (span.operation, span.kind) = (Operation::Chat, CallKind::Model);
            span.target = provider.clone();
            span.provider = Some(provider.clone());
        }
    }
    let (parts, body) = req.into_parts();
    let body = read_body(body, MAX_REQUEST_BODY)
        .await
        .map_err(|d| (label.clone(), d, None))?;
    // Parsed once: for the id a refusal answers with, and for what an agent call is.
    let envelope = jsonrpc::parse_request(&body).ok();
    let rpc_id = envelope
        .as_ref()
        .and_then(|e| e.id.as_ref().map(|id| id.as_json().to_owned()));
    let fail = |d: Denial| (label.clone(), d, rpc_id.clone());

    let callee_name = match &target {
        Target::Agent { name, .. } => name.clone(),
        Target::Tool { server, .. } => format!("tool:{server}"),
        Target::Model { provider, .. } => format!("model:{provider}"),
    };
    span.callee = callee_name.clone();
    let (ctx, started_run) =
        restore_or_start(p, &snap, &parts.headers, &callee_name).map_err(fail)?;
    if started_run
        && let Some(trace) = ctx.trace
        && !parts.headers.contains_key("traceparent")
    {
        p.telemetry.finish(CallSpan::run_root(
            &content.agent.name,
            trace,
            &ctx.run,
            &ctx.user,
        ));
    }
    place_in_trace(span, &ctx, &parts.headers);
    limits::check_deadline(ctx.deadline_ms, now_ms())
        .map_err(|b| fail(breach(b, &content.agent.name, &callee_name, &ctx.run)))?;
    // A halted run stops here, whatever the call.
    if let Some(reason) = p.spend.halted(&ctx.run) {
        return Err(fail(
            Denial::new(
                Kind::Budget,
                format!("run {} was halted: {reason}", ctx.run),
            )
            .rule("onBreach")
            .edge(&content.agent.name, &callee_name)
            .run(&ctx.run),
        ));
    }
    let mut taint = ctx.taint.clone();
    p.taint.merge_into(&ctx.run, &ctx.path, &mut taint);
    span.tainted = !taint.is_empty();

    // A run that starts here is handed back to the app sealed, so its later calls join it.
    let sealed = started_run.then(|| p.sealer.seal(&ctx).ok()).flatten();
    let resp = match target {
        Target::Agent { name, rest } => {
            let call = AgentRequest {
                parts,
                body: body.clone(),
                envelope: envelope.as_ref(),
            };
            call_agent(p, &snap, ctx, taint, &name, &rest, call, span).await
        }
        Target::Tool { server, rest } => {
            call_tool(p, &snap, ctx, taint, &server, &rest, parts, body, span).await
        }
        Target::Model { provider, rest } => {
            let timeout = child_timeout(content, ctx.deadline_ms);
            super::models::call_model(
                p, &snap, ctx, taint, &provider, &rest, parts, body, timeout, span,
            )
            .await
        }
    };
    resp.map(|mut r| {
        if let Some(v) = sealed.and_then(|s| HeaderValue::from_str(&s).ok()) {
            r.headers_mut().insert(context::HEADER, v);
        }
        (label.clone(), r)
    })
    .map_err(fail)
}

/// `/agents/<name>/…`, `/tools/<server>/…`, or an absolute URI (forward proxy) whose host names
/// an agent or a tool server.
fn route(uri: &Uri, content: &BundleContent) -> Result<Target, Denial> {
    let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
    if let Some(authority) = uri.authority() {
        if uri.scheme_str() != Some("http") {
            return Err(Denial::new(
                Kind::BadRequest,
                "only plain http:// forward-proxy requests are routed; call https upstreams through /agents/<name>/ or /tools/<server>/",
            ));
        }
        let host = authority.host();
        let hostport = authority.as_str();
        for a in std::iter::once(&content.agent).chain(&content.peers) {
            let ns = &a.namespace;
            let names = [
                a.name.clone(),
                format!("{}.{ns}", a.name),
                format!("{}.{ns}.svc", a.name),
                format!("{}.{ns}.svc.cluster.local", a.name),
            ];
            if names.iter().any(|n| n == host) || a.app.as_deref() == Some(hostport) {
                return Ok(Target::Agent {
                    name: a.name.clone(),
                    rest: path_and_query.to_owned(),
                });
            }
        }
        for t in &content.tool_servers {
            if let Ok(u) = t.url.parse::<Uri>()
                && u.authority().map(|a| a.as_str()) == Some(hostport)
            {
                return Ok(Target::Tool {
                    server: t.name.clone(),
                    rest: path_and_query.to_owned(),
                });
            }
        }
        return Err(Denial::new(
            Kind::BadRequest,
            format!(
                "no agent or tool server of this namespace is at {hostport}: address agents as http://<name>/… or through /agents/<name>/"
            ),
        ));
    }
    let split = |prefix: &str| -> Option<(String, String)> {
        let rest = path_and_query.strip_prefix(prefix)?;
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (name, tail) = rest.split_at(end);
        if name.is_empty() {
            return None;
        }
        let tail = if tail.starts_with('/') {
            tail.to_owned()
        } else {
            format!("/{tail}")
        };
        Some((name.to_owned(), tail))
    };
    if let Some((name, rest)) = split("/agents/") {
        return Ok(Target::Agent { name, rest });
    }
    if let Some((server, rest)) = split("/tools/") {
        return Ok(Target::Tool { server, rest });
    }
    if let Some((provider, rest)) = split("/models/") {
        return Ok(Target::Model { provider, rest });
    }
    Err(Denial::new(
        Kind::BadRequest,
        format!(
            "{path_and_query} is not a route: call /agents/<name>/… for an agent, /tools/<server>/… for an MCP server"
        ),
    ))
}

/// The context the app forwarded (verified), or a new run when it forwarded none and this agent
/// may start runs (then `true`).
pub(crate) fn restore_or_start(
    p: &Proxy,
    snap: &Snapshot,
    headers: &http::HeaderMap,
    callee: &str,
) -> Result<(RunContext, bool), Denial> {
    let me = &snap.bundle.content.agent.name;
    if let Some(v) = headers.get(context::HEADER) {
        let text = v.to_str().map_err(|_| {
            Denial::new(
                Kind::Context,
                format!("the {} header is not text", context::HEADER),
            )
        })?;
        let ctx = p
            .sealer
            .open(text)
            .map_err(|e| Denial::new(Kind::Context, e.to_string()).edge(me, callee))?;
        return Ok((ctx, false));
    }
    let user = headers
        .get(USER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|u| !u.is_empty() && u.len() <= 256)
        .unwrap_or_default()
        .to_owned();
    let probe = CallContext {
        run: String::new(),
        user: user.clone(),
        depth: 0,
        path: vec![me.clone()],
        revisits: 0,
        taint: Vec::new(),
    };
    let d = snap.authorizer.decide(&CallRequest {
        principal: me,
        action: Action::StartRun,
        resource: Resource::Agent(me),
        context: &probe,
    });
    if !d.allowed {
        return Err(Denial::new(
            Kind::StartRun,
            format!(
                "{me} may not start a run, and this call carries no {h} header: forward the {h} header your agent received with the request that led to this call, exactly as received (as you forward traceparent)",
                h = context::HEADER
            ),
        )
        .rule(crate::deny::rule_names(&d, "start_run (no policy permits it)"))
        .edge(me, callee));
    }
    let deadline = limits::run_deadline(&snap.bundle.content.limits, now_ms());
    let trace = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| TraceParent::parse(t).ok())
        .unwrap_or_else(TraceParent::new_root);
    let ctx = RunContext::start(me, &user, deadline, Some(trace)).map_err(|e| {
        Denial::new(Kind::BadRequest, format!("cannot start a run: {e}")).edge(me, callee)
    })?;
    tracing::info!(agent = %me, run = %ctx.run, user = %user, "run started");
    Ok((ctx, true))
}

/// Puts the call's span in its run's trace: under the app's own span when the app forwarded a
/// `traceparent` of the run's trace, else under the span the run's context carries. The ledger
/// links the call to the one that brought the run to this agent.
fn place_in_trace(span: &mut CallSpan, ctx: &RunContext, headers: &http::HeaderMap) {
    span.run = Some(ctx.run.clone());
    span.root = ctx.path.first().cloned().unwrap_or_default();
    span.user.clone_from(&ctx.user);
    span.depth = u32::try_from(ctx.path.len()).unwrap_or(u32::MAX);
    span.parent_call = ctx
        .via
        .as_deref()
        .and_then(|v| crate::tracecontext::parse_span_id(v).ok());
    let app = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| TraceParent::parse(t).ok());
    let parent = match (app, ctx.trace) {
        (Some(app), Some(run)) if app.trace_id == run.trace_id => Some(app),
        (_, Some(run)) => Some(run),
        (app, None) => app,
    };
    match parent {
        Some(parent) => {
            span.child_of(parent);
        }
        None => {
            span.root();
        }
    }
}

fn breach(b: limits::Breach, caller: &str, callee: &str, run: &str) -> Denial {
    Denial::breach(&b, caller, callee, run)
}

/// How long a child may take: the budget's stall timeout, never past the run's deadline.
fn child_timeout(content: &BundleContent, deadline_ms: Option<u64>) -> Duration {
    limits::call_timeout(&content.limits, deadline_ms, now_ms())
        .unwrap_or(DEFAULT_TIMEOUT)
        .min(DEFAULT_TIMEOUT)
}

/// An agent call's request as the app sent it, its JSON-RPC envelope parsed when it has one.
struct AgentRequest<'b> {
    parts: http::request::Parts,
    body: Bytes,
    envelope: Option<&'b jsonrpc::Envelope<'b>>,
}

#[allow(clippy::too_many_arguments)]
async fn call_agent(
    p: &Proxy,
    snap: &Snapshot,
    ctx: RunContext,
    taint: Vec<String>,
    callee: &str,
    rest: &str,
    req: AgentRequest<'_>,
    span: &mut CallSpan,
) -> Result<Response<Body>, Denial> {
    let AgentRequest {
        parts,
        body,
        envelope,
    } = req;
    let content = &snap.bundle.content;
    let me = content.agent.name.as_str();
    let peer: &AgentEntry = snap.agent_named(callee).ok_or_else(|| {
        Denial::new(
            Kind::BadRequest,
            format!(
                "no agent named {callee:?} in namespace {}",
                content.agent.namespace
            ),
        )
        .edge(me, callee)
        .run(&ctx.run)
    })?;

    // What the call is, for the decision and the record.
    let well_known_card = parts.method == http::Method::GET
        && a2a::is_card_path(rest.split('?').next().unwrap_or(rest));
    let a2a_call = if well_known_card {
        None
    } else {
        envelope
            .map(a2a::inspect_envelope)
            .filter(|c| c.method.is_some())
            .or_else(|| a2a::inspect_http(&parts.method, rest, &body))
    };
    let method = a2a_call.as_ref().and_then(|c| c.method);
    span.a2a_method = method.map(|m| m.name());
    span.a2a_task = a2a_call.and_then(|c| c.task_id);
    span.cycle = ctx.revisits_of(callee) > 0;
    let card = answers_with_card(well_known_card, method);

    // Policy first: it is the control people wrote, and its refusal names their rule. Depth and
    // cycles are the safety net behind it.
    let depth = u32::try_from(ctx.path.len()).unwrap_or(u32::MAX);
    let call = CallContext::of(&ctx, taint.clone(), depth, ctx.revisits_of(callee));
    let d = snap.authorizer.decide(&CallRequest {
        principal: me,
        action: Action::Invoke,
        resource: Resource::Agent(callee),
        context: &call,
    });
    if !d.allowed {
        return Err(Denial::policy(
            &d,
            &format!("{me} may not invoke {callee}"),
            me,
            callee,
            &ctx.run,
        ));
    }
    limits::check_hop(&content.limits, &ctx.path, callee)
        .map_err(|b| breach(b, me, callee, &ctx.run))?;
    p.limiter
        .admit(&content.limits, me, Instant::now())
        .map_err(|b| breach(b, me, callee, &ctx.run))?;

    let addr = peer.inbound.as_deref().ok_or_else(|| {
        Denial::new(
            Kind::Upstream,
            format!("the bundle knows no inbound address for {callee}"),
        )
        .edge(me, callee)
        .run(&ctx.run)
    })?;
    let trace = span.trace.unwrap_or_else(|| span.root());
    let run = ctx.run.clone();
    let path = ctx.path.clone();
    let deadline_ms = ctx.deadline_ms;
    let mut hop_ctx = ctx.hop();
    hop_ctx.taint = taint;
    hop_ctx.trace = Some(trace);
    // Checked once here, under the call's span id, which the first attempt is sent with; a
    // retried attempt encodes the same context under its own span id.
    let encoded = hop_ctx.encode().map_err(|e| {
        Denial::new(
            Kind::BadRequest,
            format!("cannot pass the run's context on: {e}"),
        )
        .edge(me, callee)
        .run(&run)
    })?;

    let mut headers = parts.headers;
    strip_hop_headers(&mut headers);
    headers.remove(context::HEADER);
    headers.remove(USER_HEADER);
    headers.remove(header::CONTENT_LENGTH);
    let call = sender::AgentCall {
        snap,
        to: peer,
        addr,
        idempotent: retry::agent_call_idempotent(&parts.method, method),
        method: parts.method,
        rest,
        headers,
        body,
        hop: hop_ctx,
        encoded,
        timeout: child_timeout(content, deadline_ms),
    };
    let sent = sender::to_agent(p, call, span).await;
    let (peer, callee) = (sent.served_by, sent.served_by.name.as_str());
    let resp = match sent.last {
        Ok(mut resp) => {
            if let Some(v) = sent
                .fallback_refused
                .as_deref()
                .and_then(|n| HeaderValue::from_str(n).ok())
            {
                resp.headers_mut()
                    .insert(crate::fallback::FALLBACK_HEADER, v);
            }
            resp
        }
        Err(e) => {
            let mut d = forward_denial(e, me, callee, &run);
            if let Some(note) = sent.fallback_refused {
                // The refusal is this sidecar's own: the note goes in its message.
                d.message = format!("{}; the fallback was {note}", d.message);
            }
            return Err(d);
        }
    };
    tracing::debug!(agent = %me, callee, run = %run, method = ?method.map(|m| m.name()), status = %resp.status(), "invoked");

    let (mut parts, incoming) = resp.into_parts();
    // Untrusted content flows back with the answer.
    if let Some(v) = parts.headers.remove(TAINT_HEADER)
        && let Ok(v) = v.to_str()
    {
        p.taint.add(&run, &path, taint::parse_header(v));
    }
    if peer.trust == Trust::Untrusted {
        let source = format!("agent:{callee}");
        p.taint.add(&run, &path, [source.as_str()]);
    }
    strip_hop_headers(&mut parts.headers);
    if card && parts.status == StatusCode::OK {
        return rewrite_card(p, callee, parts, incoming).await;
    }
    Ok(Response::from_parts(parts, stream(incoming)))
}

/// Whether the answer is an agent card, whose interface URLs must point back through the mesh:
/// the well-known card, or the extended card asked for through the protocol
/// (`GetExtendedAgentCard` / `agent/getAuthenticatedExtendedCard` over JSON-RPC, `GET
/// …/extendedAgentCard` over HTTP+JSON). a2a-sdk's client hands the extended card back to the
/// app, and a client built from it would otherwise call the agent's own address.
fn answers_with_card(well_known_card: bool, method: Option<a2a::A2aMethod>) -> bool {
    well_known_card || method == Some(a2a::A2aMethod::GetExtendedAgentCard)
}

/// Points the card's interface URLs back through this sidecar, so a client that follows the
/// card stays in the mesh.
async fn rewrite_card(
    p: &Proxy,
    callee: &str,
    mut parts: http::response::Parts,
    body: Incoming,
) -> Result<Response<Body>, Denial> {
    let bytes = http_body_util::Limited::new(body, MAX_CARD)
        .collect()
        .await
        .map_err(|e| {
            Denial::new(
                Kind::Upstream,
                format!("cannot read {callee}'s agent card: {e}"),
            )
        })?
        .to_bytes();
    let rewritten = a2a::rewrite_card(&bytes, |url| a2a::mesh_url(url, &p.outbound_base, callee))
        .map_err(|e| {
        Denial::new(
            Kind::Upstream,
            format!("{callee}'s agent card is not valid: {e}"),
        )
    })?;
    parts.headers.remove(header::CONTENT_LENGTH);
    Ok(Response::from_parts(parts, full(rewritten)))
}

#[allow(clippy::too_many_arguments)]
async fn call_tool(
    p: &Proxy,
    snap: &Arc<Snapshot>,
    ctx: RunContext,
    taint: Vec<String>,
    server: &str,
    rest: &str,
    parts: http::request::Parts,
    body: Bytes,
    span: &mut CallSpan,
) -> Result<Response<Body>, Denial> {
    let content = &snap.bundle.content;
    let me = content.agent.name.as_str();
    let edge_to = format!("tool:{server}");
    let upstream = content
        .tool_servers
        .iter()
        .find(|t| t.name == server)
        .ok_or_else(|| {
            Denial::new(
                Kind::BadRequest,
                format!(
                    "{me} has no tool server named {server:?}: add it to spec.tools of Agent {me}"
                ),
            )
            .edge(me, &edge_to)
            .run(&ctx.run)
        })?;
    let call = if is_session_request(&parts.method, &body) {
        None
    } else {
        Some(mcp::inspect(&parts.headers, &body).map_err(|e| {
            Denial::new(Kind::BadRequest, e.to_string())
                .edge(me, &edge_to)
                .run(&ctx.run)
        })?)
    };

    span.mcp_method = call.as_ref().map(|c| c.method.clone());
    let mut untrusted = false;
    let mut source = String::new();
    if let Some(tool) = call.as_ref().and_then(|c| c.tool()) {
        span.tool = Some(tool.to_owned());
        span.target = tool.to_owned();
        let edge_to = format!("tool:{server}/{tool}");
        let decision_ctx = CallContext::of(&ctx, taint.clone(), ctx.depth, 0);
        let d = snap.authorizer.decide(&CallRequest {
            principal: me,
            action: Action::CallTool,
            resource: Resource::Tool { server, tool },
            context: &decision_ctx,
        });
        if !d.allowed {
            return Err(Denial::policy(
                &d,
                &format!("{me} may not call {server}/{tool}"),
                me,
                &edge_to,
                &ctx.run,
            ));
        }
        untrusted = tool_is_untrusted(content, server, tool);
        source = edge_to;
    }

    let url = format!(
        "{}{}",
        upstream.url.trim_end_matches('/'),
        if rest == "/" { "" } else { rest }
    );
    let uri: Uri = url
        .parse()
        .map_err(|_| Denial::new(Kind::BadRequest, format!("{url} is not a valid URL")))?;
    let http_method = parts.method.clone();
    let tool_call = sender::ToolCall {
        snap,
        server,
        idempotent: retry::tool_call_idempotent(
            &parts.method,
            call.as_ref().map(|c| c.method.as_str()),
        ),
        method: parts.method,
        uri,
        headers: parts.headers,
        body,
        timeout: child_timeout(content, ctx.deadline_ms),
    };
    let resp = sender::to_tool(p, tool_call, span)
        .await
        .map_err(|e| forward_denial(e, me, &edge_to, &ctx.run))?;
    if untrusted {
        p.taint.add(&ctx.run, &ctx.path, [source.as_str()]);
    }
    let (mut parts, incoming) = resp.into_parts();
    strip_hop_headers(&mut parts.headers);
    // A tool list shows only the tools this agent may call.
    let mcp_method = call.as_ref().map(|c| c.method.as_str());
    if tools::wants_filter(mcp_method, &http_method) {
        let policy = tools::ToolPolicy::new(
            snap.clone(),
            server,
            CallContext::of(&ctx, taint, ctx.depth, 0),
        );
        return tools::filter_answer(policy, parts, incoming, mcp_method.is_some())
            .await
            .map_err(|d| d.edge(me, &edge_to).run(&ctx.run));
    }
    Ok(Response::from_parts(parts, stream(incoming)))
}

/// A streamable HTTP request that carries no JSON-RPC message: the client's GET that opens the
/// server's own message stream, or its DELETE that ends a session (MCP before 2026-07-28; the
/// MCP Python SDK sends both). It calls no tool, so there is nothing to read or decide on.
fn is_session_request(method: &http::Method, body: &[u8]) -> bool {
    (method == http::Method::GET || method == http::Method::DELETE)
        && body.iter().all(u8::is_ascii_whitespace)
}

/// Whether a tool's output is untrusted: a tool-level rule wins over its server's.
fn tool_is_untrusted(content: &BundleContent, server: &str, tool: &str) -> bool {
    let exact = content
        .tools
        .iter()
        .find(|t| t.server == server && t.tool.as_deref() == Some(tool));
    let server_wide = content
        .tools
        .iter()
        .find(|t| t.server == server && t.tool.is_none());
    exact.or(server_wide).is_some_and(|t| t.untrusted)
}

fn forward_denial(e: ForwardError, caller: &str, callee: &str, run: &str) -> Denial {
    let d = match &e {
        ForwardError::Timeout { after, .. } => Denial::new(
            Kind::Timeout,
            format!(
                "{callee} stalled: no response within {}s",
                after.as_secs_f64().ceil()
            ),
        )
        .rule("perAgent.timeoutSeconds"),
        _ => Denial::new(Kind::Upstream, format!("cannot reach {callee}: {e}")),
    };
    d.edge(caller, callee).run(run)
}

mod sender;
#[cfg(test)]
mod tests;
