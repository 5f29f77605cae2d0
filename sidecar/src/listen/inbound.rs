//! The inbound path: another agent's sidecar calling this agent, over mTLS.
//!
//! The caller is the agent named by its verified certificate — never a header. Read top to
//! bottom: identify the caller → restore the hop's context and check it against the caller →
//! deadline, depth and cycles (authoritative) → read the protocol → decide with Cedar
//! (authoritative) → hand the app its sealed context → forward → report the branch's taint back.

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Request, Response, Uri, header};
use hyper::body::Incoming;
use ringfence_crds::SpiffeId;

use crate::authz::{Action, CallContext, CallRequest, Resource};
use crate::context;
use crate::deny::{Denial, Kind};
use crate::forward::{Body, full, stream};
use crate::limits;
use crate::protocol::{a2a, jsonrpc};
use crate::proxy::{MAX_REQUEST_BODY, Proxy, USER_HEADER, now_ms, read_body, strip_hop_headers};
use crate::recheck;
use crate::taint::TAINT_HEADER;
use crate::telemetry::{CallSpan, Side};

/// Serves one inbound request from the sidecar of `peer`.
pub async fn handle(
    p: Arc<Proxy>,
    peer: Option<SpiffeId>,
    req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    // Bounded: an agent the bundle knows, or `unknown`.
    let peer_label = peer
        .as_ref()
        .and_then(|id| {
            let snap = p.snapshots.borrow().clone()?;
            snap.agent_named(id.name())
                .filter(|a| a.namespace == id.namespace())
                .map(|a| a.name.clone())
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let mut span = CallSpan::new(Side::Server, &peer_label);
    span.target = p.agent.name.to_string();
    let resp = match inbound(&p, peer, req, &mut span).await {
        Ok(resp) => resp,
        Err((denial, rpc_id)) => {
            tracing::info!(agent = %p.agent, reason = denial.kind.name(), rule = ?denial.rule, edge = ?denial.edge, run = ?denial.run, "{}", denial.message);
            span.denied(denial.kind.name(), denial.rule.as_deref(), &denial.message);
            denial.into_response(rpc_id.as_deref())
        }
    };
    p.metrics.record_request(
        "inbound",
        "agent",
        &peer_label,
        crate::listen::outbound::decision(&resp),
        started.elapsed(),
    );
    span.answered(&resp);
    if span.trace.is_none() {
        span.root();
    }
    p.telemetry.finish_with(span, resp)
}

async fn inbound(
    p: &Proxy,
    peer: Option<SpiffeId>,
    req: Request<Incoming>,
    span: &mut CallSpan,
) -> Result<Response<Body>, (Denial, Option<String>)> {
    let snap = p.ready().map_err(|d| (d, None))?;
    let content = &snap.bundle.content;
    let me = content.agent.name.as_str();
    // The TLS layer accepted only agents of our trust domain; policy is per namespace.
    let caller_id = peer.ok_or_else(|| {
        (
            Denial::new(Kind::Context, "the caller presented no certificate"),
            None,
        )
    })?;
    let caller = caller_id.name();
    if caller_id.namespace() != content.agent.namespace {
        return Err((
            Denial::new(
                Kind::Policy,
                format!(
                    "{caller_id} is in namespace {}; {me} accepts calls from its own namespace ({}) only",
                    caller_id.namespace(),
                    content.agent.namespace
                ),
            )
            .edge(caller, me),
            None,
        ));
    }

    let (parts, body) = req.into_parts();
    let body = read_body(body, MAX_REQUEST_BODY)
        .await
        .map_err(|d| (d, None))?;
    // Parsed once: for the id a refusal answers with, and for what the call is.
    let envelope = jsonrpc::parse_request(&body).ok();
    let rpc_id = envelope
        .as_ref()
        .and_then(|e| e.id.as_ref().map(|id| id.as_json().to_owned()));
    let fail = |d: Denial| (d, rpc_id.clone());

    let header_value = parts
        .headers
        .get(context::HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            fail(
                Denial::new(
                    Kind::Context,
                    format!(
                        "the call from {caller} carries no {} header; sidecars always send one",
                        context::HEADER
                    ),
                )
                .edge(caller, me),
            )
        })?;
    let ctx = context::decode(header_value)
        .map_err(|e| fail(Denial::new(Kind::Context, e.to_string()).edge(caller, me)))?;
    // This call's server span, a child of the caller's client span the hop carries.
    span.run = Some(ctx.run.clone());
    span.depth = ctx.depth;
    span.cycle = ctx.revisits_of(me) > 0;
    span.tainted = !ctx.taint.is_empty();
    let call_span = ctx.trace;
    let server_span = match call_span {
        Some(t) => span.child_of(t),
        None => span.root(),
    };
    if let Some(call) = envelope
        .as_ref()
        .map(a2a::inspect_envelope)
        .filter(|c| c.method.is_some())
        .or_else(|| a2a::inspect_http(&parts.method, parts.uri.path(), &body))
    {
        span.a2a_method = call.method.map(|m| m.name());
        span.a2a_task = call.task_id;
    }
    ctx.check_hop(caller).map_err(|e| {
        fail(
            Denial::new(Kind::Context, e.to_string())
                .edge(caller, me)
                .run(&ctx.run),
        )
    })?;
    let breach = |b: limits::Breach| fail(Denial::breach(&b, caller, me, &ctx.run));
    limits::check_deadline(ctx.deadline_ms, now_ms()).map_err(breach)?;

    // Policy first (its refusal names the rule people wrote); depth and cycles behind it.
    let call = CallContext::of(&ctx, ctx.taint.clone(), ctx.depth, ctx.revisits_of(me));
    let d = snap.authorizer.decide(&CallRequest {
        principal: caller,
        action: Action::Invoke,
        resource: Resource::Agent(me),
        context: &call,
    });
    if !d.allowed {
        return Err(fail(Denial::policy(
            &d,
            &format!("{caller} may not invoke {me}"),
            caller,
            me,
            &ctx.run,
        )));
    }

    limits::check_hop(&content.limits, &ctx.path, me).map_err(breach)?;

    // The app gets the context as it stands at this agent, sealed so it cannot be altered.
    let run = ctx.run.clone();
    let mut here = ctx.enter(me).map_err(|e| {
        fail(
            Denial::new(Kind::Depth, e.to_string())
                .edge(caller, me)
                .run(&run),
        )
    })?;
    // The app's calls hang under this server span; the ledger links them to the caller's call.
    here.trace = Some(server_span);
    here.via = call_span.map(|t| t.parent_id_hex());
    let sealed = p.sealer.seal(&here).map_err(|e| {
        fail(
            Denial::new(
                Kind::BadRequest,
                format!("cannot hand the context to the app: {e}"),
            )
            .edge(caller, me)
            .run(&run),
        )
    })?;
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let uri: Uri = format!("http://{}{path_and_query}", p.app)
        .parse()
        .map_err(|_| {
            fail(Denial::new(
                Kind::BadRequest,
                format!("{path_and_query} is not a valid path"),
            ))
        })?;
    let mut headers = parts.headers;
    strip_hop_headers(&mut headers);
    headers.remove(USER_HEADER);
    headers.remove(header::CONTENT_LENGTH);
    if let Ok(v) = HeaderValue::from_str(&sealed) {
        headers.insert(context::HEADER, v);
    }
    if let Some(t) = here.trace
        && let Ok(v) = HeaderValue::from_str(&t.to_string())
    {
        headers.insert("traceparent", v);
    }
    if let Ok(v) = HeaderValue::from_str(&p.app.to_string()) {
        headers.insert(header::HOST, v);
    }
    let mut req = Request::builder()
        .method(parts.method)
        .uri(uri)
        .body(full(body.clone()))
        .map_err(|e| fail(Denial::new(Kind::BadRequest, e.to_string())))?;
    *req.headers_mut() = headers;
    // No timeout here: the caller's sidecar times out its own call.
    let resp = p.plain.send(req, None).await.map_err(|e| {
        fail(
            Denial::new(
                Kind::Upstream,
                format!("{me}'s app at {} did not answer: {e}", p.app),
            )
            .edge(caller, me)
            .run(&run),
        )
    })?;

    let (mut parts, incoming) = resp.into_parts();
    strip_hop_headers(&mut parts.headers);
    parts.headers.remove(TAINT_HEADER);
    let mut taint = Vec::new();
    p.taint.merge_into(&here.run, &here.path, &mut taint);
    if !taint.is_empty()
        && let Ok(v) = HeaderValue::from_str(&taint.join(","))
    {
        parts.headers.insert(TAINT_HEADER, v);
    }
    let streaming = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("text/event-stream"));
    if !streaming {
        return Ok(Response::from_parts(parts, stream(incoming)));
    }
    // A stream outlives this decision: decide again with every new bundle.
    let (caller, me) = (caller.to_owned(), me.to_owned());
    let body = recheck::guard(incoming, p.snapshots.clone(), move |snap| {
        let d = snap.authorizer.decide(&CallRequest {
            principal: &caller,
            action: Action::Invoke,
            resource: Resource::Agent(&me),
            context: &call,
        });
        if d.allowed {
            Ok(())
        } else {
            Err(format!(
                "bundle version {} no longer allows {caller} → {me}: {d}",
                snap.bundle.version
            ))
        }
    });
    Ok(Response::from_parts(parts, body))
}
