//! Test builders and a fake API server on kube's tower-test mock: it answers GETs from the
//! objects it was given (404 otherwise), echoes writes, and records every request, so a test
//! can assert exactly which calls a reconcile made.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Method, Request, Response};
use kube::api::DynamicObject;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::index::{Index, Kind, Outcome};
use super::quotas::Known;
use super::reconcile::Ctx;
use crate::compile::{Placement, Settings};
use crate::distribute::{Projection, Publisher};

/// One request the fake API server saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub body: Value,
}

/// Requests, filtered.
pub trait SeenExt {
    fn writes(&self) -> Vec<&Seen>;
    fn to(&self, method: Method, path: &str) -> Option<&Seen>;
}

impl SeenExt for Vec<Seen> {
    fn writes(&self) -> Vec<&Seen> {
        self.iter().filter(|s| s.method != Method::GET).collect()
    }
    fn to(&self, method: Method, path: &str) -> Option<&Seen> {
        self.iter().find(|s| s.method == method && s.path == path)
    }
}

/// A fake API server: `objects` by path answer GETs; `answers` by (method, path) override.
pub struct FakeApi {
    pub objects: BTreeMap<String, Value>,
    pub answers: BTreeMap<(Method, String), (u16, Value)>,
}

impl FakeApi {
    pub fn new() -> Self {
        Self {
            objects: BTreeMap::new(),
            answers: BTreeMap::new(),
        }
    }

    pub fn with(mut self, path: &str, obj: Value) -> Self {
        self.objects.insert(path.to_owned(), obj);
        self
    }

    pub fn answer(mut self, method: Method, path: &str, status: u16, body: Value) -> Self {
        self.answers
            .insert((method, path.to_owned()), (status, body));
        self
    }

    /// A client talking to this fake, and the task that returns every request once every
    /// clone of the client is dropped.
    pub fn start(self) -> (kube::Client, tokio::task::JoinHandle<Vec<Seen>>) {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let method = req.method().clone();
                let path = req.uri().path().to_owned();
                let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let (status, answer) = match self.answers.get(&(method.clone(), path.clone())) {
                    Some(a) => a.clone(),
                    None if method == Method::GET => match self.objects.get(&path) {
                        Some(obj) => (200, obj.clone()),
                        None => (404, not_found(&path)),
                    },
                    None => (200, body.clone()),
                };
                seen.push(Seen { method, path, body });
                let resp = Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap();
                send.send_response(resp);
            }
            seen
        });
        (client, task)
    }
}

fn not_found(path: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
           "message": format!("{path} not found"), "reason": "NotFound", "code": 404})
}

/// Waits for the fake's requests (the test must have dropped every client).
pub async fn requests(task: tokio::task::JoinHandle<Vec<Seen>>) -> Vec<Seen> {
    tokio::time::timeout(std::time::Duration::from_secs(5), task)
        .await
        .expect("a client was not dropped")
        .unwrap()
}

fn object(kind: &str, name: &str, generation: i64, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "ringfence.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "generation": generation, "resourceVersion": "1"},
        "spec": spec,
    }))
    .unwrap()
}

/// An Agent selecting pods labelled `app: <name>`.
pub fn agent(name: &str, generation: i64) -> DynamicObject {
    object(
        "Agent",
        name,
        generation,
        json!({"selector": {"matchLabels": {"app": name}}, "appPort": 8080}),
    )
}

pub fn policy(name: &str, generation: i64, cedar: &str) -> DynamicObject {
    object("AgentPolicy", name, generation, json!({"cedar": cedar}))
}

pub fn budget(name: &str, generation: i64, spec: Value) -> DynamicObject {
    object("RunBudget", name, generation, spec)
}

/// An object with `status` set, as the API server would hold it after a status write.
pub fn with_status(mut obj: DynamicObject, status: Value) -> DynamicObject {
    obj.data["status"] = status;
    obj
}

/// The cluster as the projection loop sees it.
pub struct Cluster {
    pub index: Index,
    pub projection: Projection,
}

impl Cluster {
    pub fn new() -> Self {
        let settings = Settings {
            trust_domain: Default::default(),
            placement: Placement::Cluster {
                inbound_port: 15006,
                cluster_domain: "cluster.local".into(),
            },
        };
        Self {
            index: Index::default(),
            projection: Projection::new(settings, Publisher::new(None)),
        }
    }

    /// Syncs every kind to `objects` and projects.
    pub fn project(&mut self, objects: &[(Kind, DynamicObject)]) -> Arc<Outcome> {
        for kind in Kind::ALL {
            let of_kind: Vec<Arc<DynamicObject>> = objects
                .iter()
                .filter(|(k, _)| *k == kind)
                .map(|(_, o)| Arc::new(o.clone()))
                .collect();
            self.index.sync(kind, &of_kind);
        }
        Arc::new(self.index.project(&mut self.projection).unwrap())
    }
}

pub const TRUST_BUNDLE_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

/// A reconcile context on `client`, seeing `outcome`, with no quota counters read.
pub fn ctx(client: kube::Client, outcome: Arc<Outcome>) -> Arc<Ctx> {
    ctx_with_quotas(client, outcome, None)
}

/// A reconcile context on `client`, seeing `outcome` and the quota counters `known`.
pub fn ctx_with_quotas(client: kube::Client, outcome: Arc<Outcome>, known: Known) -> Arc<Ctx> {
    let (_tx, rx) = watch::channel(Some(outcome));
    let (_quotas_tx, quotas) = watch::channel(known);
    Arc::new(Ctx {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "ringfence-operator".into(),
                instance: Some("test".into()),
            },
        ),
        client,
        outcome: rx,
        trust_domain: Default::default(),
        trust_bundle_pem: TRUST_BUNDLE_PEM.to_owned(),
        quotas,
    })
}
