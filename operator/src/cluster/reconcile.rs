//! The leader's reconcilers: for every Agent a Service and the namespace's trust bundle, and for
//! every object its status, from the latest projection ([`Outcome`]).
//!
//! Writes use server-side apply with one field manager ([`MANAGER`]) and happen only when what
//! the cluster holds differs from what it should: an unchanged status, Service or trust bundle
//! costs a read at most, never a write. Events accompany condition transitions.
//!
//! No finalizers: nothing outside the cluster holds state per object. A RunBudget's limits live
//! in bundles, which the projection rebuilds when it is deleted; the budget service keys its
//! state by run, and those runs are history the ledger keeps. A Service is owned by its Agent,
//! so Kubernetes' garbage collector removes it with the Agent.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource};
use ringfence_crds::condition::Wanted;
use ringfence_crds::{Agent, AgentPolicy, RunBudget, TrustDomain};
use serde_json::json;
use tokio::sync::watch;

use super::index::{self, Kind, Outcome};
use super::quotas;
use super::status::{self, ServiceState};

/// The field manager of every write the operator makes.
pub const MANAGER: &str = "ringfence-operator";
/// The ConfigMap holding the trust bundle (`ca.crt`) in every namespace with Agents.
pub const TRUST_BUNDLE: &str = "ringfence-trust-bundle";
/// The sidecar's mTLS inbound port, which every Agent's Service targets.
pub const INBOUND_PORT: u16 = 15006;
/// Labels the operator puts on what it creates.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "ringfence");
const AGENT_LABEL: &str = "ringfence.dev/agent";
/// Events carry at most 1 kB of note.
const NOTE_LIMIT: usize = 1000;

/// What the reconcilers share.
pub struct Ctx {
    pub client: Client,
    pub recorder: Recorder,
    /// The latest projection; `None` until the first one.
    pub outcome: watch::Receiver<Option<Arc<Outcome>>>,
    pub trust_domain: TrustDomain,
    pub trust_bundle_pem: String,
    /// The budget service's quota counters by RunBudget, for their `status.quotas`.
    pub quotas: watch::Receiver<quotas::Known>,
}

/// Why a reconcile failed; it is retried.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cannot {action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> ReconcileError {
    let action = action.into();
    move |source| ReconcileError::Kube { action, source }
}

/// Reconciles one object of `kind`.
pub async fn reconcile(
    kind: Kind,
    obj: Arc<DynamicObject>,
    ctx: Arc<Ctx>,
) -> Result<Action, ReconcileError> {
    // Nothing to clean up: no finalizers (see the module comment).
    if obj.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let Some(outcome) = ctx.outcome.borrow().clone() else {
        return Ok(Action::await_change());
    };
    let r = index::reference(kind, &obj);
    let parsed = match kind {
        Kind::Agent => index::parse::<Agent>(kind, &obj).map(Some),
        Kind::AgentPolicy => index::parse::<AgentPolicy>(kind, &obj).map(|_| None),
        Kind::RunBudget => index::parse::<RunBudget>(kind, &obj).map(|_| None),
    };
    let malformed = parsed.as_ref().err().map(String::as_str);
    // Status speaks of what is served: wait until the projection has compiled this version
    // (it triggers every reconciler when it has).
    if malformed.is_none() && outcome.generations.get(&r) != Some(&obj.metadata.generation) {
        return Ok(Action::await_change());
    }
    let current = obj.data.get("status").cloned().unwrap_or_default();
    let (wanted, fields) = match (kind, &parsed) {
        (Kind::Agent, Ok(Some(agent))) => {
            ensure_trust_bundle(&ctx, &r.namespace).await?;
            let service = ensure_service(&ctx, &obj, agent).await?;
            status::agent(&outcome, &r, None, &service, &ctx.trust_domain)
        }
        (Kind::Agent, _) => {
            let unchanged = ServiceState::Ready {
                selects: "the pods of its last good version".to_owned(),
            };
            status::agent(&outcome, &r, malformed, &unchanged, &ctx.trust_domain)
        }
        (Kind::AgentPolicy, _) => status::policy(&outcome, &r, malformed),
        (Kind::RunBudget, _) => {
            let (wanted, mut fields) = status::budget(&outcome, &r, malformed);
            let usages = quotas::field(&ctx.quotas.borrow(), &r, &current);
            fields.push(("quotas", usages));
            (wanted, fields)
        }
    };
    let generation = obj.metadata.generation;
    let Some(plan) = status::plan(&current, &wanted, generation, &fields, Timestamp::now()) else {
        return Ok(Action::await_change());
    };
    let ar = kind.api_resource();
    let api = Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &r.namespace, &ar);
    let patch = json!({
        "apiVersion": ar.api_version,
        "kind": ar.kind,
        "status": plan.status,
    });
    api.patch_status(
        &r.name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(kube_err(format!("write the status of {r}")))?;
    tracing::info!(resource = %r, "status updated");
    let reference = obj.object_ref(&ar);
    for t in &plan.transitions {
        publish(&ctx.recorder, t, &reference).await;
    }
    Ok(Action::await_change())
}

/// What to do when a reconcile failed: try again soon.
pub fn error_policy(kind: Kind, obj: &DynamicObject, err: &ReconcileError) -> Action {
    tracing::warn!(resource = %index::reference(kind, obj), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(15))
}

async fn publish(
    recorder: &Recorder,
    t: &Wanted,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
) {
    let mut note = format!("{}: {}", t.type_, t.message);
    if note.len() > NOTE_LIMIT {
        let mut cut = NOTE_LIMIT;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    let event = Event {
        type_: if t.ok {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: t.reason.clone(),
        note: Some(note),
        action: t.type_.to_owned(),
        secondary: None,
    };
    // An Event is a courtesy; the status already says it.
    if let Err(e) = recorder.publish(&event, reference).await {
        tracing::warn!(error = %e, reason = %t.reason, "cannot publish an Event");
    }
}

/// Writes the trust bundle ConfigMap into `namespace` unless it already holds this CA.
async fn ensure_trust_bundle(ctx: &Ctx, namespace: &str) -> Result<(), ReconcileError> {
    let api = Api::<ConfigMap>::namespaced(ctx.client.clone(), namespace);
    let current = api.get_opt(TRUST_BUNDLE).await.map_err(kube_err(format!(
        "read ConfigMap {namespace}/{TRUST_BUNDLE}"
    )))?;
    let holds = current
        .as_ref()
        .and_then(|cm| cm.data.as_ref())
        .and_then(|d| d.get("ca.crt"))
        .is_some_and(|pem| *pem == ctx.trust_bundle_pem);
    if holds {
        return Ok(());
    }
    let cm = trust_bundle(namespace, &ctx.trust_bundle_pem);
    api.patch(
        TRUST_BUNDLE,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .map_err(kube_err(format!(
        "write ConfigMap {namespace}/{TRUST_BUNDLE}"
    )))?;
    tracing::info!(%namespace, "trust bundle written");
    Ok(())
}

/// The trust bundle ConfigMap of a namespace.
pub fn trust_bundle(namespace: &str, pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(TRUST_BUNDLE.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some([(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned())].into()),
            ..Default::default()
        },
        data: Some([("ca.crt".to_owned(), pem.to_owned())].into()),
        ..Default::default()
    }
}

/// The Service through which other sidecars reach an Agent: named after it, owned by it,
/// selecting its pods, on the sidecar's inbound port.
pub fn service_for(obj: &DynamicObject, agent: &Agent) -> Service {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let ar = Kind::Agent.api_resource();
    let owner = OwnerReference {
        api_version: ar.api_version,
        kind: ar.kind,
        name: name.clone(),
        uid: obj.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        // Left unset: blocking the owner's deletion would need rights on agents/finalizers.
        block_owner_deletion: None,
    };
    Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: obj.metadata.namespace.clone(),
            labels: Some(
                [
                    (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
                    (AGENT_LABEL.to_owned(), name.clone()),
                ]
                .into(),
            ),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(pod_selector(&name, agent)),
            ports: Some(vec![ServicePort {
                name: Some("mesh".to_owned()),
                port: i32::from(INBOUND_PORT),
                target_port: Some(IntOrString::Int(i32::from(INBOUND_PORT))),
                protocol: Some("TCP".to_owned()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Service selects by labels only: the Agent's `matchLabels` when that is the whole selector,
/// else the `ringfence.dev/agent` label (which pods named by annotation should carry too).
pub fn pod_selector(name: &str, agent: &Agent) -> BTreeMap<String, String> {
    match &agent.spec.selector {
        Some(sel)
            if sel.match_expressions.as_ref().is_none_or(Vec::is_empty)
                && sel.match_labels.as_ref().is_some_and(|m| !m.is_empty()) =>
        {
            sel.match_labels.clone().unwrap_or_default()
        }
        _ => [(AGENT_LABEL.to_owned(), name.to_owned())].into(),
    }
}

fn describe(selector: &BTreeMap<String, String>) -> String {
    let labels: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("pods labelled {}", labels.join(","))
}

async fn ensure_service(
    ctx: &Ctx,
    obj: &DynamicObject,
    agent: &Agent,
) -> Result<ServiceState, ReconcileError> {
    let desired = service_for(obj, agent);
    let name = desired.metadata.name.clone().unwrap_or_default();
    let namespace = desired.metadata.namespace.clone().unwrap_or_default();
    let selects = describe(&pod_selector(&name, agent));
    let api = Api::<Service>::namespaced(ctx.client.clone(), &namespace);
    let current = api
        .get_opt(&name)
        .await
        .map_err(kube_err(format!("read Service {namespace}/{name}")))?;
    if let Some(current) = &current {
        let uid = obj.metadata.uid.as_deref();
        let ours = current
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid);
        if !ours {
            return Ok(ServiceState::Conflict(format!(
                "a Service {namespace}/{name} exists that this Agent does not own; rename or delete it so the operator can create the Agent's own Service (port {INBOUND_PORT})"
            )));
        }
        if same_service(current, &desired) {
            return Ok(ServiceState::Ready { selects });
        }
    }
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&desired),
    )
    .await
    .map_err(kube_err(format!("write Service {namespace}/{name}")))?;
    tracing::info!(service = %format!("{namespace}/{name}"), "Service applied");
    Ok(ServiceState::Ready { selects })
}

/// Whether `current` already says what `desired` says, in the fields the operator owns.
fn same_service(current: &Service, desired: &Service) -> bool {
    let spec = |s: &Service| s.spec.clone().unwrap_or_default();
    let ports = |s: &Service| -> Vec<(Option<String>, i32, Option<IntOrString>)> {
        spec(s)
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.name, p.port, p.target_port))
            .collect()
    };
    spec(current).selector == spec(desired).selector
        && ports(current) == ports(desired)
        && desired
            .metadata
            .labels
            .iter()
            .flatten()
            .all(|(k, v)| current.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v))
}
