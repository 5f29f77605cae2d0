//! The admission endpoints: AdmissionReview v1 in, AdmissionReview v1 out.
//!
//! - `POST /inject` — pods: the sidecar, as an RFC 6902 patch ([`super::inject`]).
//! - `POST /validate` — AgentPolicies: refused with the compiler's diagnostics
//!   ([`super::validate`]).
//! - `GET /healthz` — for the kubelet.
//!
//! A decision that cannot be made (the API unreadable, a pod naming no Agent) refuses the
//! object with the reason: the configurations say `failurePolicy: Fail`, so an opted-in pod
//! never starts without its sidecar.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use ringfence_crds::AgentPolicy;
use serde::de::DeserializeOwned;

use super::inject::{self, Decision};
use super::validate;
use super::view::{self, ClusterView};
use crate::distribute::server::Body;

/// The API server caps objects at 3 MiB; a review carries the object and its old version.
const MAX_REVIEW: usize = 8 * 1024 * 1024;

/// The admission webhook: how to inject, and where to read the cluster from.
pub struct Webhook<V> {
    pub settings: inject::Settings,
    pub view: V,
}

impl<V: ClusterView> Webhook<V> {
    /// Routes one HTTP request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body>
    where
        B: hyper::body::Body<Data = Bytes> + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
            (&Method::POST, "/inject") => match read::<Pod, _>(req).await {
                Ok(review) => reply(self.mutate(review).await),
                Err(resp) => resp,
            },
            (&Method::POST, "/validate") => match read::<AgentPolicy, _>(req).await {
                Ok(review) => reply(self.validate(review).await),
                Err(resp) => resp,
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "no such endpoint: POST /inject (pods) or /validate (AgentPolicies)",
            ),
        }
    }

    /// Answers a pod's review: allowed, with a patch when it gets the sidecar.
    pub async fn mutate(&self, review: AdmissionReview<Pod>) -> AdmissionResponse {
        let req: AdmissionRequest<Pod> = match review.try_into() {
            Ok(r) => r,
            Err(_) => return AdmissionResponse::invalid("the AdmissionReview has no request"),
        };
        let resp = AdmissionResponse::from(&req);
        let Some(pod) = req
            .object
            .as_ref()
            .filter(|_| req.operation == Operation::Create)
        else {
            return resp;
        };
        // Pods made by controllers have no name or namespace of their own yet.
        let namespace = req
            .namespace
            .clone()
            .or_else(|| pod.metadata.namespace.clone())
            .unwrap_or_else(|| "default".to_owned());
        let who = pod
            .metadata
            .name
            .clone()
            .or_else(|| pod.metadata.generate_name.clone())
            .unwrap_or_default();

        let decision = match self.decide(pod, &namespace).await {
            Ok(d) => d,
            Err(e) => return resp.deny(e),
        };
        let opt_in = match decision {
            Decision::Skip(reason) => {
                tracing::debug!(pod = %who, %namespace, reason, "not injected");
                return resp;
            }
            Decision::Inject(opt_in) => opt_in,
        };
        let agents = match self.view.agents(&namespace).await {
            Ok(a) => a,
            Err(e) => return resp.deny(e),
        };
        let patch = inject::resolve_agent(pod, &namespace, &agents)
            .and_then(|agent| inject::patch(pod, &namespace, agent, &self.settings));
        match patch {
            Ok(p) if p.0.is_empty() => resp,
            Ok(p) => {
                tracing::info!(pod = %who, %namespace, ?opt_in, operations = p.0.len(), "injecting the sidecar");
                resp.with_patch(p).unwrap_or_else(|e| {
                    AdmissionResponse::invalid(format!("cannot encode the injection patch: {e}"))
                })
            }
            Err(e @ inject::InjectError::NoAgent { .. }) if opt_in == inject::OptIn::Namespace => {
                tracing::debug!(pod = %who, %namespace, "namespace opted in, but the pod runs no Agent");
                let mut resp = resp;
                resp.warnings = Some(vec![format!("not injected with a Ringfence sidecar: {e}")]);
                resp
            }
            Err(e) => {
                tracing::info!(pod = %who, %namespace, error = %e, "refused an opted-in pod");
                resp.deny(e)
            }
        }
    }

    async fn decide(&self, pod: &Pod, namespace: &str) -> Result<Decision, view::ViewError> {
        let first = inject::decide(pod, namespace, None, &self.settings);
        // Only a pod that says nothing itself depends on its namespace's label.
        if first != Decision::Skip(inject::NOT_OPTED_IN) {
            return Ok(first);
        }
        let labels = self.view.namespace_labels(namespace).await?;
        Ok(inject::decide(
            pod,
            namespace,
            labels.as_ref(),
            &self.settings,
        ))
    }

    /// Answers an AgentPolicy's review: refused with every error the compiler finds.
    pub async fn validate(&self, review: AdmissionReview<AgentPolicy>) -> AdmissionResponse {
        let req: AdmissionRequest<AgentPolicy> = match review.try_into() {
            Ok(r) => r,
            Err(_) => return AdmissionResponse::invalid("the AdmissionReview has no request"),
        };
        let mut resp = AdmissionResponse::from(&req);
        // Status writes are the operator's own; only the spec is the user's to get wrong.
        if req.sub_resource.is_some() || req.operation == Operation::Delete {
            return resp;
        }
        let Some(policy) = &req.object else {
            return resp;
        };
        let namespace = req
            .namespace
            .clone()
            .or_else(|| policy.metadata.namespace.clone())
            .unwrap_or_else(|| "default".to_owned());
        // Unknown Agents are only warnings; without the list, warn about none rather than all.
        let known = self.view.agents(&namespace).await.ok();
        let verdict = validate::check(
            &namespace,
            policy,
            &known.as_deref().map(view::names).unwrap_or_default(),
        );
        if known.is_some() && !verdict.warnings.is_empty() {
            resp.warnings = Some(verdict.warnings);
        }
        match verdict.refusal {
            Some(message) => {
                tracing::info!(policy = %req.name, %namespace, "refused an invalid AgentPolicy");
                resp.deny(message)
            }
            None => resp,
        }
    }
}

async fn read<K, B>(req: Request<B>) -> Result<AdmissionReview<K>, Response<Body>>
where
    K: kube::Resource + DeserializeOwned,
    B: hyper::body::Body<Data = Bytes> + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let body = Limited::new(req.into_body(), MAX_REVIEW)
        .collect()
        .await
        .map_err(|e| {
            text(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request: {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| {
        text(
            StatusCode::BAD_REQUEST,
            &format!("not an admission.k8s.io/v1 AdmissionReview: {e}"),
        )
    })
}

fn reply(resp: AdmissionResponse) -> Response<Body> {
    let review: AdmissionReview<DynamicObject> = resp.into_review();
    match serde_json::to_vec(&review) {
        Ok(json) => Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(json))
            .unwrap_or_else(|_| {
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot build the response",
                )
            }),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot encode the AdmissionReview: {e}"),
        ),
    }
}

fn text(status: StatusCode, message: &str) -> Response<Body> {
    let mut resp = Response::new(full(format!("{message}\n").into_bytes()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn full(bytes: Vec<u8>) -> Body {
    Full::new(Bytes::from(bytes))
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}
