//! What the outbound and inbound paths share: the current bundle and SVID, this sidecar's
//! context sealer, its rate limiter and taint table, and its clients.
//!
//! Policy (the bundle) and limiter state live apart: a new bundle swaps the snapshot; the
//! limiter and taint table carry on untouched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use ringfence_crds::AgentKey;
use tokio::sync::watch;

use crate::bundle::Snapshot;
use crate::context::Sealer;
use crate::deny::{Denial, Kind};
use crate::forward::{Mesh, Plain};
use crate::identity::Credentials;
use crate::limits::RateLimiter;
use crate::metrics::Metrics;
use crate::pricing::Pricing;
use crate::retry::RetryBudgets;
use crate::spend::Spend;
use crate::taint::TaintTable;
use crate::tls::MeshTls;

/// Largest request body the proxy reads (JSON-RPC messages, MCP calls).
pub const MAX_REQUEST_BODY: usize = 8 * 1024 * 1024;
/// Largest agent card it rewrites.
pub const MAX_CARD: usize = 1024 * 1024;
/// How long a child call may take when no RunBudget sets `perAgent.timeoutSeconds`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Header carrying the human principal when a run starts (trusted only from agents that may
/// start runs).
pub const USER_HEADER: &str = "ringfence-user";

/// Shared state of one sidecar's proxy.
pub struct Proxy {
    pub agent: AgentKey,
    pub snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    pub credentials: watch::Receiver<Option<Arc<Credentials>>>,
    pub sealer: Sealer,
    pub limiter: RateLimiter,
    /// Retry budgets per callee; like the limiter, they outlive bundle updates.
    pub retries: RetryBudgets,
    pub taint: TaintTable,
    pub tls: Arc<MeshTls>,
    pub mesh: Mesh,
    pub plain: Plain,
    pub metrics: Metrics,
    /// This sidecar's side of every run's token and cost budget.
    pub spend: Arc<Spend>,
    /// LLM prices, in pico-dollars per token.
    pub pricing: Arc<Pricing>,
    /// This agent's app.
    pub app: SocketAddr,
    /// `http://<outbound listener>`, the base of URLs rewritten into agent cards.
    pub outbound_base: String,
    /// Where finished calls go: spans and the run ledger.
    pub telemetry: crate::telemetry::Telemetry,
    /// Peers' agent cards fetched for `GET /agents`, briefly.
    pub cards: crate::discovery::agents::CardCache,
}

/// What a [`Proxy`] is built from.
pub struct Wiring {
    pub agent: AgentKey,
    pub snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    pub credentials: watch::Receiver<Option<Arc<Credentials>>>,
    pub metrics: Metrics,
    pub app: SocketAddr,
    /// The outbound listener's bound address.
    pub outbound: SocketAddr,
    pub spend: Arc<Spend>,
    pub pricing: Arc<Pricing>,
    pub telemetry: crate::telemetry::Telemetry,
    /// Calls in flight to one peer over HTTP/1.1 before more go over HTTP/2.
    pub mesh_http1_per_peer: usize,
}

impl Proxy {
    pub fn new(w: Wiring) -> Result<Self, crate::context::ContextError> {
        let Wiring {
            agent,
            snapshots,
            credentials,
            metrics,
            app,
            outbound,
            spend,
            pricing,
            telemetry,
            mesh_http1_per_peer,
        } = w;
        let tls = Arc::new(MeshTls::new(credentials.clone()));
        let host = if outbound.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], outbound.port()))
        } else {
            outbound
        };
        Ok(Self {
            sealer: Sealer::new(&agent.name)?,
            limiter: RateLimiter::new(std::time::Instant::now()),
            retries: RetryBudgets::new(std::time::Instant::now()),
            taint: TaintTable::default(),
            mesh: Mesh::new(tls.clone(), mesh_http1_per_peer),
            plain: Plain::default(),
            outbound_base: format!("http://{host}"),
            agent,
            snapshots,
            credentials,
            tls,
            metrics,
            spend,
            pricing,
            app,
            telemetry,
            cards: Default::default(),
        })
    }

    /// The bundle in force, once the sidecar holds both an SVID and a bundle.
    pub fn ready(&self) -> Result<Arc<Snapshot>, Denial> {
        if self.credentials.borrow().is_none() {
            return Err(Denial::new(
                Kind::NotReady,
                format!(
                    "the sidecar of {} has no SVID yet: it is still obtaining its certificate from the control plane (see its /readyz)",
                    self.agent
                ),
            ));
        }
        self.snapshots.borrow().clone().ok_or_else(|| {
            Denial::new(
                Kind::NotReady,
                format!(
                    "the sidecar of {} has no policy bundle yet: it is still connecting to the control plane (see its /readyz)",
                    self.agent
                ),
            )
        })
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Reads a request body, refusing one larger than `limit`.
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, Denial> {
    Limited::new(body, limit)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| {
            Denial::new(
                Kind::BadRequest,
                format!("cannot read the request body (at most {limit} bytes): {e}"),
            )
        })
}

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1), plus ours that
/// must not leak past the hop that uses them.
pub fn strip_hop_headers(headers: &mut HeaderMap) {
    let named_in_connection: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named_in_connection {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        header::HOST,
    ] {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
}

/// A request leaving the mesh, to a tool server or a model provider: connection headers and the
/// run's own headers stay behind (the run's context never leaves the mesh), the trace goes on
/// under `trace`, the call's span, and `Host` names the upstream.
pub fn egress_request(
    method: http::Method,
    mut headers: HeaderMap,
    uri: http::Uri,
    trace: Option<crate::tracecontext::TraceParent>,
    body: crate::forward::Body,
) -> Result<http::Request<crate::forward::Body>, Denial> {
    strip_hop_headers(&mut headers);
    headers.remove(crate::context::HEADER);
    headers.remove(USER_HEADER);
    if let Some(t) = trace
        && let Ok(v) = http::HeaderValue::from_str(&t.to_string())
    {
        headers.insert("traceparent", v);
    }
    if let Some(a) = uri.authority()
        && let Ok(v) = http::HeaderValue::from_str(a.as_str())
    {
        headers.insert(header::HOST, v);
    }
    let mut req = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(body)
        .map_err(|e| Denial::new(Kind::BadRequest, e.to_string()))?;
    *req.headers_mut() = headers;
    Ok(req)
}
