//! `GET /agents` on the outbound listener: the agent cards of exactly the agents this agent may
//! invoke, so an orchestrator discovers only permitted peers.
//!
//! Each peer of the bundle is decided as a call to it would be — Cedar `invoke` by this
//! sidecar's authorizer, then the depth and cycle limits — in the context of the calling run
//! when the request carries a `ringfence-context` header, else of a run the listing starts (as
//! any call without one does; the sealed context comes back on the answer). A run past its
//! deadline or halted is refused as a call would be. The cards of the
//! permitted peers are fetched through the mesh (mTLS to each peer's sidecar, which decides the
//! call again), concurrently ([`CONCURRENCY`]) with a bounded time per peer ([`PER_PEER`]), and
//! rewritten so their interface URLs point back through this sidecar.
//!
//! ```json
//! {"agents": [{"name": "writer", "card": {…the agent card, URLs through this sidecar…}}],
//!  "unavailable": [{"name": "critic", "reason": "no answer within 2s"}]}
//! ```
//!
//! Denied peers (by this sidecar or the peer's), and peers that answer that they have no card
//! (404), are simply absent. A peer that cannot be reached (its sidecar, or its sidecar its
//! app), does not answer in time, or answers with an error or a card that is not valid JSON is
//! absent from `agents` and named in `unavailable`: one peer never fails the listing. Fetched cards are cached per bundle version for [`CARD_TTL`]; the decisions are
//! never cached.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use ringfence_crds::agent::Trust;
use ringfence_crds::bundle::AgentEntry;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::authz::{Action, CallContext, CallRequest, Resource};
use crate::bundle::Snapshot;
use crate::context::{self, RunContext};
use crate::deny::{DENIED_HEADER, Denial, Kind};
use crate::forward::{Body, ForwardError, full};
use crate::limits;
use crate::protocol::a2a;
use crate::proxy::{MAX_CARD, Proxy, now_ms};
use crate::tracecontext::TraceParent;

/// Card fetches in flight at once.
pub const CONCURRENCY: usize = 32;
/// Longest one peer may take to answer with its card.
pub const PER_PEER: Duration = Duration::from_secs(2);
/// How long a fetched card is served from the cache.
pub const CARD_TTL: Duration = Duration::from_secs(10);
/// Where an A2A agent serves its card (v1.0), and where v0.3 agents did.
const CARD_PATHS: [&str; 2] = ["/.well-known/agent-card.json", "/.well-known/agent.json"];

/// Whether a request asks for the listing: `GET /agents` or `GET /agents/`, with any query.
pub fn is_listing(method: &http::Method, uri: &Uri) -> bool {
    method == http::Method::GET
        && uri.authority().is_none()
        && matches!(uri.path(), "/agents" | "/agents/")
}

/// The listing, or the refusal of it.
pub async fn serve(p: &Arc<Proxy>, headers: &http::HeaderMap) -> Response<Body> {
    match listing(p, headers).await {
        Ok(resp) => resp,
        Err(d) => {
            tracing::info!(agent = %p.agent, reason = d.kind.name(), rule = ?d.rule, run = ?d.run, "{}", d.message);
            d.into_response(None)
        }
    }
}

#[derive(Serialize)]
struct Listing {
    agents: Vec<Listed>,
    unavailable: Vec<Unavailable>,
}

#[derive(Serialize)]
struct Listed {
    name: String,
    card: Box<RawValue>,
}

#[derive(Serialize)]
struct Unavailable {
    name: String,
    reason: String,
}

/// What asking one peer for its card came to.
enum Fetched {
    Card(Bytes),
    /// The peer has no card, or its sidecar refused the call: not listed, not an outage.
    Absent,
    Unavailable(String),
}

async fn listing(p: &Arc<Proxy>, headers: &http::HeaderMap) -> Result<Response<Body>, Denial> {
    let snap = p.ready()?;
    let content = &snap.bundle.content;
    let me = content.agent.name.as_str();
    let (ctx, started) =
        crate::listen::outbound::restore_or_start(p, &snap, headers, "(discovery)")?;
    // A run past its deadline or halted may call no one: refused as a call would be.
    limits::check_deadline(ctx.deadline_ms, now_ms())
        .map_err(|b| Denial::breach(&b, me, "(discovery)", &ctx.run))?;
    if let Some(reason) = p.spend.halted(&ctx.run) {
        return Err(Denial::new(
            Kind::Budget,
            format!("run {} was halted: {reason}", ctx.run),
        )
        .rule("onBreach")
        .edge(me, "(discovery)")
        .run(&ctx.run));
    }
    let mut taint = ctx.taint.clone();
    p.taint.merge_into(&ctx.run, &ctx.path, &mut taint);

    let permitted: Vec<&AgentEntry> = content
        .peers
        .iter()
        .filter(|peer| may_invoke(&snap, &ctx, &taint, &peer.name))
        .collect();

    let trace = ctx
        .trace
        .or_else(|| {
            headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .and_then(|t| TraceParent::parse(t).ok())
        })
        .unwrap_or_else(TraceParent::new_root)
        .child();
    let run = ctx.run.clone();
    let path = ctx.path.clone();
    let sealed = started.then(|| p.sealer.seal(&ctx).ok()).flatten();
    let mut hop = ctx.hop();
    hop.taint = taint;
    hop.trace = Some(trace);
    let hop_header = hop.encode().map_err(|e| {
        Denial::new(
            Kind::BadRequest,
            format!("cannot pass the run's context on: {e}"),
        )
        .edge(me, "(discovery)")
        .run(&run)
    })?;

    let version = snap.bundle.version;
    // Each fetch owns what it uses, so the stream of them is `Send` for any borrow.
    let mut fetches = Vec::with_capacity(permitted.len());
    for peer in permitted {
        let (p, peer, hop_header) = (Arc::clone(p), peer.clone(), hop_header.clone());
        fetches.push(async move {
            let got = fetch_cached(&p, &peer, &hop_header, &trace, version).await;
            (peer, got)
        });
    }
    let fetched: Vec<(AgentEntry, Fetched)> = futures_util::stream::iter(fetches)
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;

    let mut listing = Listing {
        agents: Vec::new(),
        unavailable: Vec::new(),
    };
    for (peer, got) in fetched {
        match got {
            Fetched::Card(card) => {
                // Rewritten cards are JSON objects; a card is listed only as one.
                let Some(card) = std::str::from_utf8(&card)
                    .ok()
                    .and_then(|c| RawValue::from_string(c.to_owned()).ok())
                else {
                    continue;
                };
                // What an untrusted agent wrote reaches the app: its branch is tainted.
                if peer.trust == Trust::Untrusted {
                    let source = format!("agent:{}", peer.name);
                    p.taint.add(&run, &path, [source.as_str()]);
                }
                listing.agents.push(Listed {
                    name: peer.name,
                    card,
                });
            }
            Fetched::Absent => {}
            Fetched::Unavailable(reason) => listing.unavailable.push(Unavailable {
                name: peer.name,
                reason,
            }),
        }
    }
    listing.agents.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    listing
        .unavailable
        .sort_unstable_by(|a, b| a.name.cmp(&b.name));
    tracing::debug!(agent = %me, run = %run, listed = listing.agents.len(), unavailable = listing.unavailable.len(), "agents discovered");
    let body = serde_json::to_vec(&listing)
        .map_err(|e| Denial::new(Kind::Upstream, format!("cannot write the listing: {e}")))?;
    let mut resp = Response::new(full(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(v) = sealed.and_then(|s| HeaderValue::from_str(&s).ok()) {
        resp.headers_mut().insert(context::HEADER, v);
    }
    Ok(resp)
}

/// `peer`'s card from the cache, else from the peer within [`PER_PEER`].
async fn fetch_cached(
    p: &Proxy,
    peer: &AgentEntry,
    hop_header: &str,
    trace: &TraceParent,
    version: u64,
) -> Fetched {
    if let Some(card) = p.cards.get(&peer.name, version) {
        return Fetched::Card(card);
    }
    let got = tokio::time::timeout(PER_PEER, fetch(p, peer, hop_header, trace))
        .await
        .unwrap_or_else(|_| Fetched::Unavailable(no_answer()));
    if let Fetched::Card(card) = &got {
        p.cards.put(&peer.name, version, card.clone());
    }
    got
}

/// Whether a call from this agent to `peer` in `ctx` would pass policy and the depth and cycle
/// limits: what decides that `peer` is listed.
fn may_invoke(snap: &Snapshot, ctx: &RunContext, taint: &[String], peer: &str) -> bool {
    let content = &snap.bundle.content;
    let depth = u32::try_from(ctx.path.len()).unwrap_or(u32::MAX);
    let call = CallContext::of(ctx, taint.to_vec(), depth, ctx.revisits_of(peer));
    snap.authorizer
        .decide(&CallRequest {
            principal: &content.agent.name,
            action: Action::Invoke,
            resource: Resource::Agent(peer),
            context: &call,
        })
        .allowed
        && limits::check_hop(&content.limits, &ctx.path, peer).is_ok()
}

/// Asks `peer`'s sidecar for its card (the v0.3 path when the v1.0 one is not found), rewritten
/// through this sidecar.
async fn fetch(p: &Proxy, peer: &AgentEntry, hop_header: &str, trace: &TraceParent) -> Fetched {
    let Some(addr) = peer.inbound.as_deref() else {
        return Fetched::Unavailable("the bundle knows no inbound address for it".to_owned());
    };
    for path in CARD_PATHS {
        let resp = match send(p, peer, addr, path, hop_header, trace).await {
            Ok(resp) => resp,
            Err(reason) => return Fetched::Unavailable(reason),
        };
        if let Some(reason) = resp.headers().get(DENIED_HEADER) {
            // The peer's sidecar refused the call (policy, limits): not listed. It could not
            // reach its app, or is not ready: an outage, named.
            let reason = reason.to_str().unwrap_or_default();
            if !is_outage(reason) {
                return Fetched::Absent;
            }
            return Fetched::Unavailable(format!(
                "its sidecar answered {} ({reason})",
                resp.status()
            ));
        }
        match resp.status() {
            StatusCode::NOT_FOUND => continue,
            StatusCode::OK => return read_card(p, peer, resp).await,
            status => return Fetched::Unavailable(format!("its card answered {status}")),
        }
    }
    Fetched::Absent
}

/// Whether a refusal by a peer's sidecar (its `ringfence-denied` reason) means the peer is out
/// of reach rather than out of bounds.
fn is_outage(reason: &str) -> bool {
    [Kind::Upstream, Kind::Timeout, Kind::NotReady]
        .iter()
        .any(|k| k.name() == reason)
}

async fn send(
    p: &Proxy,
    peer: &AgentEntry,
    addr: &str,
    path: &str,
    hop_header: &str,
    trace: &TraceParent,
) -> Result<Response<Incoming>, String> {
    let req = Request::get(format!(
        "https://{}.{}.ringfence{path}",
        peer.name, peer.namespace
    ))
    .version(http::Version::HTTP_11)
    .header(context::HEADER, hop_header)
    .header("traceparent", trace.to_string())
    .header(header::ACCEPT, "application/json")
    .body(Bytes::new())
    .map_err(|e| format!("cannot build the request: {e}"))?;
    p.mesh
        .send(&peer.spiffe_id, addr, req, PER_PEER)
        .await
        .map_err(|e| match e {
            ForwardError::Timeout { .. } => no_answer(),
            e => format!("cannot reach it: {e}"),
        })
}

fn no_answer() -> String {
    format!("no answer within {}s", PER_PEER.as_secs())
}

async fn read_card(p: &Proxy, peer: &AgentEntry, resp: Response<Incoming>) -> Fetched {
    let body = resp.into_body();
    let bytes = match Limited::new(body, MAX_CARD).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Fetched::Unavailable(format!("cannot read its card: {e}")),
    };
    match a2a::rewrite_card(&bytes, |url| {
        a2a::mesh_url(url, &p.outbound_base, &peer.name)
    }) {
        Ok(card) => Fetched::Card(Bytes::from(card)),
        Err(e) => Fetched::Unavailable(format!("its card is not valid: {e}")),
    }
}

/// Rewritten cards of peers, for one bundle version at a time and [`CARD_TTL`] each. Bounded by
/// the bundle's peers; a new bundle version empties it. The lock is never held across an await.
#[derive(Default)]
pub struct CardCache {
    inner: Mutex<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    version: u64,
    cards: HashMap<String, (Instant, Bytes)>,
}

impl CardCache {
    /// `peer`'s card fetched under bundle `version`, if fetched less than [`CARD_TTL`] ago.
    pub fn get(&self, peer: &str, version: u64) -> Option<Bytes> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.version != version {
            return None;
        }
        inner
            .cards
            .get(peer)
            .filter(|(at, _)| at.elapsed() < CARD_TTL)
            .map(|(_, card)| card.clone())
    }

    pub fn put(&self, peer: &str, version: u64, card: Bytes) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.version != version {
            inner.cards.clear();
            inner.version = version;
        }
        inner.cards.insert(peer.to_owned(), (Instant::now(), card));
    }
}

#[cfg(test)]
mod tests;
