//! The admin server: `/healthz`, `/readyz`, `/debug/bundle`, `/metrics`.
//!
//! Plain HTTP on a local address (default `127.0.0.1:15020`), for kubelet probes, Prometheus
//! and people. Everything it reports is read from the published snapshots; it holds no state.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ringfence_crds::spiffe::AgentKey;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::bundle::Snapshot;
use crate::identity::Credentials;
use crate::metrics::Metrics;

/// What the admin server reports on.
#[derive(Clone)]
pub struct AdminState {
    pub agent: AgentKey,
    pub credentials: watch::Receiver<Option<Arc<Credentials>>>,
    pub svid_problem: watch::Receiver<Option<String>>,
    pub snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    pub bundle_problem: watch::Receiver<Option<String>>,
    pub metrics: Metrics,
}

/// Serves until the task is dropped. Accept errors are logged and do not stop the server.
pub async fn serve(listener: TcpListener, state: AdminState) {
    let state = Arc::new(state);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, &req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => readyz(state),
        "/debug/bundle" => debug_bundle(state),
        "/metrics" => Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(state.metrics.encode())))
            .unwrap_or_default(),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz, /readyz, /debug/bundle or /metrics\n",
        ),
    }
}

/// Ready once the sidecar holds an SVID and enforces a bundle; otherwise 503 naming what is
/// missing and why.
pub fn readiness(state: &AdminState) -> (bool, serde_json::Value) {
    let creds = state.credentials.borrow().clone();
    let snapshot = state.snapshots.borrow().clone();
    let mut missing = Vec::new();
    let mut body = serde_json::Map::new();
    match &creds {
        Some(c) => {
            body.insert("spiffeId".into(), json!(c.spiffe_id.to_string()));
            body.insert("svidNotAfter".into(), json!(c.not_after_unix()));
        }
        None => {
            missing.push("svid");
            let why = state.svid_problem.borrow().clone();
            body.insert(
                "svid".into(),
                json!(why.unwrap_or_else(|| "no SVID yet".to_owned())),
            );
        }
    }
    match &snapshot {
        Some(s) => {
            body.insert("bundleVersion".into(), json!(s.bundle.version));
        }
        None => {
            missing.push("bundle");
            let why = state.bundle_problem.borrow().clone();
            body.insert(
                "bundle".into(),
                json!(why.unwrap_or_else(|| "no bundle enforced yet".to_owned())),
            );
        }
    }
    let ready = missing.is_empty();
    body.insert("ready".into(), json!(ready));
    if !ready {
        body.insert("missing".into(), json!(missing));
    }
    (ready, serde_json::Value::Object(body))
}

fn readyz(state: &AdminState) -> Response<Full<Bytes>> {
    let (ready, body) = readiness(state);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, &body)
}

fn debug_bundle(state: &AdminState) -> Response<Full<Bytes>> {
    let snapshot = state.snapshots.borrow().clone();
    let body = match snapshot {
        None => json!({
            "agent": state.agent.to_string(),
            "enforced": false,
            "reason": state.bundle_problem.borrow().clone(),
        }),
        Some(s) => {
            let content = &s.bundle.content;
            json!({
                "agent": state.agent.to_string(),
                "enforced": true,
                "version": s.bundle.version,
                "hash": s.bundle.hash,
                "trustDomain": content.trust_domain,
                "policies": s.authorizer.policy_count(),
                "peers": content.peers.len(),
                "toolServers": content.tool_servers.len(),
                "tools": content.tools.len(),
                "enforcedSince": s.enforced_since
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                "lastProblem": state.bundle_problem.borrow().clone(),
            })
        }
    };
    json_response(StatusCode::OK, &body)
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut bytes = serde_json::to_vec_pretty(body).unwrap_or_default();
    bytes.push(b'\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .unwrap_or_default()
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (AdminState, watch::Sender<Option<String>>) {
        let (_, credentials) = watch::channel(None);
        let (_, snapshots) = watch::channel(None);
        let (svid_tx, svid_problem) = watch::channel(None);
        let (_, bundle_problem) = watch::channel(Some("waiting for an SVID".to_owned()));
        let state = AdminState {
            agent: AgentKey::new("default", "research").unwrap(),
            credentials,
            svid_problem,
            snapshots,
            bundle_problem,
            metrics: Metrics::new().unwrap(),
        };
        (state, svid_tx)
    }

    #[test]
    fn not_ready_without_svid_and_bundle_says_why() {
        let (state, svid) = state();
        svid.send_replace(Some("cannot connect to the control plane".to_owned()));
        let (ready, body) = readiness(&state);
        assert!(!ready);
        assert_eq!(body["missing"], json!(["svid", "bundle"]));
        assert_eq!(body["svid"], json!("cannot connect to the control plane"));
        assert_eq!(body["bundle"], json!("waiting for an SVID"));
    }
}
