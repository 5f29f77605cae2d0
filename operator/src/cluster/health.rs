//! `/healthz`, `/readyz` and `/metrics` on plain HTTP, for the kubelet and Prometheus.
//!
//! Ready once the first projection is published: before that, a sidecar would find no bundle.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::index::Outcome;

/// What the health endpoints report.
pub struct Health {
    outcome: watch::Receiver<Option<Arc<Outcome>>>,
    leading: watch::Receiver<bool>,
    projections: AtomicU64,
}

impl Health {
    pub fn new(
        outcome: watch::Receiver<Option<Arc<Outcome>>>,
        leading: watch::Receiver<bool>,
    ) -> Self {
        Self {
            outcome,
            leading,
            projections: AtomicU64::new(0),
        }
    }

    pub fn projected(&self) {
        self.projections.fetch_add(1, Ordering::Relaxed);
    }

    fn respond(&self, path: &str) -> (StatusCode, String) {
        let outcome = self.outcome.borrow().clone();
        match path {
            "/healthz" => (StatusCode::OK, "ok\n".to_owned()),
            "/readyz" if outcome.is_some() => (StatusCode::OK, "ready\n".to_owned()),
            "/readyz" => (
                StatusCode::SERVICE_UNAVAILABLE,
                "waiting for the first projection of Agents, AgentPolicies and RunBudgets\n"
                    .to_owned(),
            ),
            "/metrics" => {
                let (agents, errors, malformed) = outcome.map_or((0, 0, 0), |o| {
                    (
                        o.projected.snapshot.bundles.len(),
                        o.projected
                            .diagnostics
                            .iter()
                            .filter(|d| d.is_error())
                            .count(),
                        o.malformed.len(),
                    )
                });
                let leading = u8::from(*self.leading.borrow());
                let projections = self.projections.load(Ordering::Relaxed);
                (
                    StatusCode::OK,
                    format!(
                        "# HELP ringfence_operator_leader Whether this replica holds the leader Lease.\n\
                         # TYPE ringfence_operator_leader gauge\n\
                         ringfence_operator_leader {leading}\n\
                         # HELP ringfence_operator_projections_total Projections of the cluster's manifests into bundles.\n\
                         # TYPE ringfence_operator_projections_total counter\n\
                         ringfence_operator_projections_total {projections}\n\
                         # HELP ringfence_operator_agents Agents with a bundle served.\n\
                         # TYPE ringfence_operator_agents gauge\n\
                         ringfence_operator_agents {agents}\n\
                         # HELP ringfence_operator_manifest_errors Errors found in manifests by the last projection.\n\
                         # TYPE ringfence_operator_manifest_errors gauge\n\
                         ringfence_operator_manifest_errors {errors}\n\
                         # HELP ringfence_operator_malformed_objects Objects whose latest version does not parse.\n\
                         # TYPE ringfence_operator_malformed_objects gauge\n\
                         ringfence_operator_malformed_objects {malformed}\n"
                    ),
                )
            }
            _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
        }
    }
}

/// Serves the health endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, health: Arc<Health>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (status, body) = health.respond(req.uri().path());
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(body)))
                            .unwrap_or_default(),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}
