//! The control plane's HTTPS endpoint: SVIDs for sidecars, their bundle streams and their acks,
//! and the budget service's routes when it runs here (`crate::budget::service`).
//!
//! TLS with client certificates optional: a sidecar's first CSR comes before it holds an SVID
//! and proves itself with a bootstrap token; everything else is mTLS, and the agent is the one
//! the verified client certificate names — never one a request claims.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use ringfence_crds::api::{self, BundleAck, CsrRequest, ErrorBody};
use ringfence_crds::svid::peer_spiffe_id;
use ringfence_crds::{AgentKey, SpiffeId};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use super::acks::Acks;
use super::publish::Snapshot;
use crate::budget::service::BudgetService;
use crate::identity::{Identity, PodAttestor, Proof};

/// The response body of every Ringfence HTTPS endpoint: whole JSON, or a stream of lines.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Largest request body accepted (CSRs and acks are a few KiB).
const MAX_REQUEST: usize = 64 * 1024;
/// How often an idle bundle stream sends a blank line, so dead peers are noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the endpoint serves from.
pub struct ControlPlane {
    pub identity: Arc<Identity>,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub acks: Arc<Acks>,
    /// The budget service, when this control plane runs one (`ringfence local` does; in
    /// Kubernetes it is `ringfence budget`, a Deployment of its own).
    pub budget: Option<Arc<BudgetService>>,
    /// Kubernetes: bearer tokens are projected ServiceAccount tokens, checked with TokenReview
    /// and mapped to the pod's Agent. Absent (local mode): they are bootstrap tokens.
    pub attestor: Option<Arc<PodAttestor>>,
}

/// Serves until `shutdown` completes; open connections are closed then.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    cp: Arc<ControlPlane>,
    shutdown: impl Future<Output = ()>,
) {
    let handler = move |peer: Option<SpiffeId>, req: Request<Incoming>| {
        let cp = cp.clone();
        async move { route(&cp, peer.as_ref(), req).await }
    };
    serve_tls(listener, tls, handler, shutdown).await;
}

/// The accept loop every Ringfence HTTPS endpoint shares: TLS handshake (bounded in time), the
/// client certificate's SPIFFE ID when one was presented and verified, then HTTP/1.1 — one
/// long-lived stream per sidecar needs nothing more. `handler` gets the peer identity with each
/// request; it never comes from the request itself. Serves until `shutdown` completes; open
/// connections are closed then.
pub async fn serve_tls<H, F>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Option<SpiffeId>, Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let acceptor = TlsAcceptor::from(tls);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        conns.spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%remote, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let peer = peer_spiffe_id(tls.get_ref().1);
            let svc = hyper::service::service_fn(move |req| {
                let handler = handler.clone();
                let peer = peer.clone();
                async move { Ok::<_, Infallible>(handler(peer, req).await) }
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), svc);
            if let Err(e) = conn.await {
                tracing::debug!(%remote, error = %e, "connection ended");
            }
        });
    }
    conns.shutdown().await;
}

async fn route(
    cp: &ControlPlane,
    peer: Option<&SpiffeId>,
    req: Request<Incoming>,
) -> Response<Body> {
    if BudgetService::serves(req.uri().path()) {
        return match &cp.budget {
            Some(budget) => budget
                .handle(peer, req)
                .await
                .unwrap_or_else(|| error(StatusCode::NOT_FOUND, "no such budget service endpoint")),
            None => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "this control plane runs no budget service: point the sidecar's budget URL at \
                 `ringfence budget`",
            ),
        };
    }
    let sidecar = req
        .headers()
        .get(api::SIDECAR_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.chars().take(128).collect::<String>());
    match (req.method(), req.uri().path()) {
        (&Method::POST, api::CSR_PATH) => csr(cp, peer, req).await,
        (&Method::GET, api::WATCH_PATH) => match peer {
            Some(id) => watch_bundles(cp, id.agent(), sidecar.unwrap_or_else(|| "unnamed".into())),
            None => error(
                StatusCode::UNAUTHORIZED,
                "the bundle stream needs mTLS: present the SVID issued by /v1/identity/csr",
            ),
        },
        (&Method::POST, api::ACK_PATH) => match peer {
            Some(id) => {
                ack(
                    cp,
                    id.agent(),
                    sidecar.unwrap_or_else(|| "unnamed".into()),
                    req,
                )
                .await
            }
            None => error(
                StatusCode::UNAUTHORIZED,
                "acks need mTLS: present the SVID issued by /v1/identity/csr",
            ),
        },
        (&Method::GET, api::STATUS_PATH) => json(StatusCode::OK, &status(cp)),
        (_, path) => error(
            StatusCode::NOT_FOUND,
            &format!("no endpoint {} {path}", req.method()),
        ),
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Response<Body>> {
    let body = Limited::new(req.into_body(), MAX_REQUEST)
        .collect()
        .await
        .map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request body (at most {MAX_REQUEST} bytes): {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("the request body is not the expected JSON: {e}"),
        )
    })
}

async fn csr(cp: &ControlPlane, peer: Option<&SpiffeId>, req: Request<Incoming>) -> Response<Body> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned());
    let body: CsrRequest = match read_json(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    if !cp.snapshots.borrow().bundles.contains_key(&body.agent) {
        return error(
            StatusCode::NOT_FOUND,
            &format!(
                "no Agent {} is defined: apply its Agent manifest first",
                body.agent
            ),
        );
    }
    let pod_agent;
    let proof = match (&token, peer) {
        (Some(t), _) => match &cp.attestor {
            None => Proof::BootstrapToken(t),
            Some(attestor) => match attestor.attest(t).await {
                Ok(agent) => {
                    pod_agent = agent;
                    Proof::Pod(&pod_agent)
                }
                Err(e) if e.is_refusal() => {
                    tracing::warn!(agent = %body.agent, error = %e, "refused CSR");
                    return error(
                        StatusCode::FORBIDDEN,
                        &format!("refused to issue an SVID for {}: {e}", body.agent),
                    );
                }
                Err(e) => {
                    tracing::error!(agent = %body.agent, error = %e, "cannot check the ServiceAccount token");
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &format!(
                            "the control plane cannot check ServiceAccount tokens right now: {e}"
                        ),
                    );
                }
            },
        },
        (None, Some(id)) => Proof::Svid(id),
        (None, None) => {
            return error(
                StatusCode::UNAUTHORIZED,
                "prove who you are: send the bootstrap token (local mode) or the pod's projected ServiceAccount token (Kubernetes) as `Authorization: Bearer <token>`, or renew over mTLS with your current SVID",
            );
        }
    };
    match cp.identity.issue(&body, proof) {
        Ok(resp) => {
            tracing::info!(agent = %body.agent, spiffe_id = %resp.spiffe_id, "issued SVID");
            json(StatusCode::OK, &resp)
        }
        Err(e) if e.is_refusal() => {
            tracing::warn!(agent = %body.agent, error = %e, "refused CSR");
            error(StatusCode::FORBIDDEN, &e.to_string())
        }
        Err(e) => {
            tracing::error!(agent = %body.agent, error = %e, "cannot issue SVID");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("the control plane cannot issue SVIDs right now: {e}"),
            )
        }
    }
}

fn watch_bundles(cp: &ControlPlane, agent: &AgentKey, sidecar: String) -> Response<Body> {
    if !cp.snapshots.borrow().bundles.contains_key(agent) {
        return error(
            StatusCode::NOT_FOUND,
            &format!("no Agent {agent} is defined: apply its Agent manifest first"),
        );
    }
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let mut snapshots = cp.snapshots.clone();
    let acks = cp.acks.clone();
    let agent = agent.clone();
    tokio::spawn(async move {
        acks.connected(&agent, &sidecar, true);
        tracing::info!(%agent, %sidecar, "sidecar connected to the bundle stream");
        let mut sent: Option<u64> = None;
        loop {
            let current = snapshots.borrow_and_update().bundles.get(&agent).cloned();
            let Some(published) = current else {
                tracing::info!(%agent, "agent removed; closing its bundle stream");
                break;
            };
            if sent != Some(published.bundle.version) {
                if tx.send(published.line.clone()).await.is_err() {
                    break;
                }
                tracing::info!(%agent, %sidecar, version = published.bundle.version, "pushed bundle");
                sent = Some(published.bundle.version);
            }
            tokio::select! {
                changed = snapshots.changed() => if changed.is_err() { break },
                _ = tokio::time::sleep(KEEPALIVE) => if tx.send(Bytes::from_static(b"\n")).await.is_err() { break },
            }
        }
        acks.connected(&agent, &sidecar, false);
        tracing::info!(%agent, %sidecar, "bundle stream closed");
    });
    ndjson(rx)
}

/// A never-ending `200 OK` of JSON lines: whatever the task feeding `rx` sends, until it stops.
pub(crate) fn ndjson(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let body = StreamBody::new(stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    }));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(UnsyncBoxBody::new(body))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "cannot build response"))
}

async fn ack(
    cp: &ControlPlane,
    agent: &AgentKey,
    sidecar: String,
    req: Request<Incoming>,
) -> Response<Body> {
    let body: BundleAck = match read_json(req).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    match &body.rejected {
        None => tracing::info!(%agent, %sidecar, version = body.version, "sidecar enforces bundle"),
        Some(reason) => {
            tracing::warn!(%agent, %sidecar, version = body.version, %reason, "sidecar rejected bundle")
        }
    }
    cp.acks.record(agent, &sidecar, &body);
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(UnsyncBoxBody::new(Full::new(Bytes::new())))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "cannot build response"))
}

/// The `/v1/status` report.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub generation: u64,
    pub agents: Vec<AgentStatus>,
    pub diagnostics: Vec<String>,
}

/// One agent in the status report.
#[derive(Debug, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    pub agent: String,
    pub version: u64,
    pub hash: String,
    pub sidecars: Vec<serde_json::Value>,
}

pub fn status(cp: &ControlPlane) -> Status {
    let snap = cp.snapshots.borrow().clone();
    let mut report = cp.acks.report();
    Status {
        generation: snap.generation,
        agents: snap
            .bundles
            .iter()
            .map(|(k, p)| AgentStatus {
                agent: k.to_string(),
                version: p.bundle.version,
                hash: p.bundle.hash.clone(),
                sidecars: report
                    .remove(k)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|s| serde_json::to_value(s).ok())
                    .collect(),
            })
            .collect(),
        diagnostics: snap.diagnostics.iter().map(ToString::to_string).collect(),
    }
}

/// A JSON response.
pub(crate) fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(UnsyncBoxBody::new(Full::new(Bytes::from(bytes))))
        .unwrap_or_else(|_| Response::new(UnsyncBoxBody::new(Full::new(Bytes::new()))))
}

/// An [`ErrorBody`] response.
pub(crate) fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(
        status,
        &ErrorBody {
            error: message.to_owned(),
        },
    )
}
