//! What each object's status should say, from the latest projection. Pure: the reconcilers
//! write the result only when it differs from what the object already says.
//!
//! Every kind has three conditions: `Accepted` (the spec is valid; the Cedar diagnostic when it
//! is not), `ResolvedRefs` (what it names exists) and `Ready` (it is in force for sidecars).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use ringfence_crds::condition::{self, ACCEPTED, READY, RESOLVED_REFS, Wanted};
use ringfence_crds::{AgentKey, SpiffeId, TrustDomain};
use serde_json::{Map, Value};

use super::index::Outcome;
use crate::compile::{Diagnostic, ResourceRef};

/// A status to write, and the conditions whose status or reason changed (for Events).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub status: Value,
    pub transitions: Vec<Wanted>,
}

/// Compares what `current` (the object's `.status`, or null) says with what it should say.
/// `None` when nothing changed: no write, no Event.
pub fn plan(
    current: &Value,
    wanted: &[Wanted],
    generation: Option<i64>,
    fields: &[(&'static str, Option<Value>)],
    now: Timestamp,
) -> Option<Plan> {
    let before: Vec<Condition> = current
        .get("conditions")
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default();
    let mut conditions = before.clone();
    let mut changed = false;
    let mut transitions = Vec::new();
    for w in wanted {
        let status = if w.ok { "True" } else { "False" };
        let flipped = before
            .iter()
            .find(|c| c.type_ == w.type_)
            .is_none_or(|c| c.status != status || c.reason != w.reason);
        if flipped {
            transitions.push(w.clone());
        }
        changed |= condition::upsert(&mut conditions, w, generation, now);
    }
    let mut status = Map::new();
    for (key, value) in fields {
        if current.get(*key) != value.as_ref() {
            changed = true;
        }
        if let Some(v) = value {
            status.insert((*key).to_owned(), v.clone());
        }
    }
    let generation = generation.map(Value::from);
    if current.get("observedGeneration") != generation.as_ref() {
        changed = true;
    }
    if !changed {
        return None;
    }
    if let Some(g) = generation {
        status.insert("observedGeneration".to_owned(), g);
    }
    status.insert(
        "conditions".to_owned(),
        serde_json::to_value(&conditions).unwrap_or_default(),
    );
    Some(Plan {
        status: Value::Object(status),
        transitions,
    })
}

/// Diagnostics as one condition message: `field (line L, column C): message; …`.
fn message(diags: &[&Diagnostic]) -> String {
    diags
        .iter()
        .map(|d| match d.location {
            Some(l) => format!(
                "{} (line {}, column {}): {}",
                d.field, l.line, l.column, d.message
            ),
            None => format!("{}: {}", d.field, d.message),
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `Accepted` and `ResolvedRefs` from the projection's diagnostics (or a parse failure).
fn checked(outcome: &Outcome, r: &ResourceRef, malformed: Option<&str>) -> (Wanted, Wanted) {
    let errors: Vec<&Diagnostic> = outcome.diagnostics_of(r).filter(|d| d.is_error()).collect();
    let unresolved: Vec<&Diagnostic> = outcome.diagnostics_of(r).filter(|d| d.unresolved).collect();
    let accepted = match malformed {
        Some(reason) => Wanted::failed(ACCEPTED, "Malformed", reason),
        None if !errors.is_empty() => Wanted::failed(ACCEPTED, "Invalid", message(&errors)),
        None => Wanted::ok(ACCEPTED, "Valid", "the spec is valid"),
    };
    let resolved = if unresolved.is_empty() {
        Wanted::ok(RESOLVED_REFS, "Resolved", "every reference resolves")
    } else {
        Wanted::failed(RESOLVED_REFS, "UnknownAgent", message(&unresolved))
    };
    (accepted, resolved)
}

/// The per-Agent Service as the reconciler found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceState {
    /// The Service exists as wanted; `selects` says how it finds the agent's pods.
    Ready { selects: String },
    /// A Service of that name exists and belongs to someone else; it is left alone.
    Conflict(String),
}

/// The conditions and fields of an Agent.
pub fn agent(
    outcome: &Outcome,
    r: &ResourceRef,
    malformed: Option<&str>,
    service: &ServiceState,
    trust_domain: &TrustDomain,
) -> (Vec<Wanted>, Vec<(&'static str, Option<Value>)>) {
    let (accepted, mut resolved) = checked(outcome, r, malformed);
    let key = AgentKey {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
    };
    let bundle = outcome.projected.snapshot.bundles.get(&key);
    match service {
        ServiceState::Conflict(why) => {
            resolved = Wanted::failed(RESOLVED_REFS, "ServiceConflict", why.clone());
        }
        ServiceState::Ready { selects } if resolved.ok => {
            resolved = Wanted::ok(
                RESOLVED_REFS,
                "Resolved",
                format!("Service {} selects {selects}", r.name),
            );
        }
        ServiceState::Ready { .. } => {}
    }
    let ready = match (bundle, service) {
        (None, _) => Wanted::failed(
            READY,
            "NoBundle",
            "no bundle is built for this agent: see Accepted",
        ),
        (Some(_), ServiceState::Conflict(_)) => Wanted::failed(
            READY,
            "ServiceConflict",
            "the bundle is served, but other agents cannot reach this one: see ResolvedRefs",
        ),
        (Some(p), ServiceState::Ready { .. }) => Wanted::ok(
            READY,
            "BundleServed",
            format!(
                "bundle version {} is served to the agent's sidecars",
                p.bundle.version
            ),
        ),
    };
    let spiffe = SpiffeId::new(trust_domain.clone(), key);
    let fields = vec![
        ("spiffeId", Some(Value::from(spiffe.to_string()))),
        (
            "bundleVersion",
            bundle.map(|p| Value::from(p.bundle.version)),
        ),
    ];
    (vec![accepted, resolved, ready], fields)
}

/// The conditions and fields of an AgentPolicy.
pub fn policy(
    outcome: &Outcome,
    r: &ResourceRef,
    malformed: Option<&str>,
) -> (Vec<Wanted>, Vec<(&'static str, Option<Value>)>) {
    let (accepted, resolved) = checked(outcome, r, malformed);
    let in_force = outcome.projected.accepted.get(r);
    let ready = match (accepted.ok, in_force) {
        (true, Some(n)) => Wanted::ok(READY, "InForce", format!("{n} Cedar policies are in force")),
        (false, Some(_)) => Wanted::failed(
            READY,
            "LastGoodInForce",
            "the last accepted version stays in force until the errors in Accepted are fixed",
        ),
        (_, None) => Wanted::failed(READY, "NotInForce", "no version of this policy is in force"),
    };
    let fields = vec![(
        "compiledPolicies",
        in_force.filter(|_| accepted.ok).map(|n| Value::from(*n)),
    )];
    (vec![accepted, resolved, ready], fields)
}

/// The conditions of a RunBudget.
pub fn budget(
    outcome: &Outcome,
    r: &ResourceRef,
    malformed: Option<&str>,
) -> (Vec<Wanted>, Vec<(&'static str, Option<Value>)>) {
    let (accepted, resolved) = checked(outcome, r, malformed);
    let ready = if accepted.ok {
        Wanted::ok(
            READY,
            "InForce",
            "the limits are in the bundles of the agents it selects",
        )
    } else if malformed.is_some() && outcome.generations.contains_key(r) {
        Wanted::failed(
            READY,
            "LastGoodInForce",
            "the last good version stays in force until Accepted is fixed",
        )
    } else {
        Wanted::failed(
            READY,
            "NotInForce",
            "these limits are not in force: see Accepted",
        )
    };
    (vec![accepted, resolved, ready], vec![])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unchanged_status_plans_no_write() {
        let now = Timestamp::from_second(1_000).unwrap();
        let wanted = [Wanted::ok(READY, "BundleServed", "v1")];
        let fields = [("bundleVersion", Some(Value::from(1)))];
        let first = plan(&Value::Null, &wanted, Some(3), &fields, now).unwrap();
        assert_eq!(first.transitions.len(), 1);
        assert_eq!(first.status["observedGeneration"], 3);
        let later = Timestamp::from_second(2_000).unwrap();
        assert_eq!(plan(&first.status, &wanted, Some(3), &fields, later), None);

        // A new generation with the same condition is a write but not a transition.
        let next = plan(&first.status, &wanted, Some(4), &fields, later).unwrap();
        assert!(next.transitions.is_empty());
        // A new bundle version is a write too.
        let fields = [("bundleVersion", Some(Value::from(2)))];
        assert!(plan(&next.status, &wanted, Some(4), &fields, later).is_some());
    }
}
