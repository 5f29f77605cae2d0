//! The cluster as a source of manifests: Agents, AgentPolicies and RunBudgets from the API
//! server, parsed one object at a time and projected through the same compiler and publisher as
//! a local folder ([`crate::distribute::Projection`]).
//!
//! Objects are watched untyped ([`DynamicObject`]) and parsed here, one by one: an object the
//! Rust types refuse (a rate like `sixty/min`, a cost that is not a decimal) is reported and
//! skipped — its last good version stays in use, as with a file in local mode — and never fails
//! the list that carries every other object.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use kube::api::DynamicObject;
use kube::core::{ApiResource, Resource};
use ringfence_crds::{Agent, AgentPolicy, RunBudget};
use serde::de::DeserializeOwned;

use crate::compile::{Diagnostic, ResourceRef, resource_ref};
use crate::distribute::publish::PublishError;
use crate::distribute::{Projected, Projection};
use crate::identity::AgentDirectory;
use crate::source::Manifests;

/// The three kinds the operator watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Agent,
    AgentPolicy,
    RunBudget,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Agent, Kind::AgentPolicy, Kind::RunBudget];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Agent => "Agent",
            Kind::AgentPolicy => "AgentPolicy",
            Kind::RunBudget => "RunBudget",
        }
    }

    pub fn api_resource(self) -> ApiResource {
        match self {
            Kind::Agent => ApiResource::erase::<Agent>(&()),
            Kind::AgentPolicy => ApiResource::erase::<AgentPolicy>(&()),
            Kind::RunBudget => ApiResource::erase::<RunBudget>(&()),
        }
    }
}

/// The reference the compiler uses for an object of `kind`.
pub fn reference(kind: Kind, obj: &DynamicObject) -> ResourceRef {
    resource_ref(kind.name(), obj.meta())
}

/// Parses an untyped object into its Rust type; the error names the field at fault.
pub fn parse<T: DeserializeOwned>(kind: Kind, obj: &DynamicObject) -> Result<T, String> {
    let value = serde_json::to_value(obj).map_err(|e| e.to_string())?;
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let name = obj.metadata.name.as_deref().unwrap_or_default();
        if path == "." {
            format!("{} {name}: {}", kind.name(), e.inner())
        } else {
            format!("{} {name}: {path}: {}", kind.name(), e.inner())
        }
    })
}

#[derive(Debug, Clone)]
enum Typed {
    Agent(Agent),
    Policy(AgentPolicy),
    Budget(RunBudget),
}

impl Typed {
    fn parse(kind: Kind, obj: &DynamicObject) -> Result<Self, String> {
        Ok(match kind {
            Kind::Agent => Typed::Agent(parse(kind, obj)?),
            Kind::AgentPolicy => Typed::Policy(parse(kind, obj)?),
            Kind::RunBudget => Typed::Budget(parse(kind, obj)?),
        })
    }

    fn generation(&self) -> Option<i64> {
        match self {
            Typed::Agent(a) => a.metadata.generation,
            Typed::Policy(p) => p.metadata.generation,
            Typed::Budget(b) => b.metadata.generation,
        }
    }
}

/// The outcome of projecting the cluster once, for the status writers.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub projected: Projected,
    /// The generation of every object compiled, by reference. An object whose latest version
    /// did not parse appears with the generation of its last good version.
    pub generations: BTreeMap<ResourceRef, Option<i64>>,
    /// Objects whose latest version did not parse, and why.
    pub malformed: BTreeMap<ResourceRef, String>,
}

impl Outcome {
    /// The diagnostics about one resource.
    pub fn diagnostics_of<'a>(
        &'a self,
        r: &'a ResourceRef,
    ) -> impl Iterator<Item = &'a Diagnostic> {
        self.projected
            .diagnostics
            .iter()
            .filter(move |d| &d.resource == r)
    }
}

/// Every Ringfence object the cluster holds, as last parsed.
#[derive(Default)]
pub struct Index {
    /// Keyed by kind and reference; the value is the last version that parsed.
    objects: BTreeMap<(Kind, ResourceRef), Typed>,
    malformed: BTreeMap<ResourceRef, String>,
    /// The Agents, shared with the CSR path (pod → Agent mapping).
    agents: Arc<RwLock<Vec<Agent>>>,
}

impl Index {
    /// Replaces what is known of `kind` with `objects` (a watcher's whole current state).
    pub fn sync(&mut self, kind: Kind, objects: &[Arc<DynamicObject>]) {
        let mut seen = BTreeMap::new();
        self.malformed.retain(|r, _| r.kind != kind.name());
        for obj in objects {
            let r = reference(kind, obj);
            match Typed::parse(kind, obj) {
                Ok(t) => {
                    seen.insert((kind, r), t);
                }
                Err(reason) => {
                    tracing::error!(resource = %r, "{reason}; its last good version stays in use");
                    if let Some(last) = self.objects.get(&(kind, r.clone())) {
                        seen.insert((kind, r.clone()), last.clone());
                    }
                    self.malformed.insert(r, reason);
                }
            }
        }
        self.objects.retain(|(k, _), _| *k != kind);
        self.objects.extend(seen);
        if kind == Kind::Agent
            && let Ok(mut agents) = self.agents.write()
        {
            *agents = self
                .objects
                .values()
                .filter_map(|t| match t {
                    Typed::Agent(a) => Some(a.clone()),
                    _ => None,
                })
                .collect();
        }
    }

    /// The manifests to compile.
    pub fn manifests(&self) -> Manifests {
        let mut m = Manifests::default();
        for ((kind, r), t) in &self.objects {
            m.origins
                .insert(r.clone(), format!("{} in the cluster", kind.name()));
            match t {
                Typed::Agent(a) => m.agents.push(a.clone()),
                Typed::Policy(p) => m.policies.push(p.clone()),
                Typed::Budget(b) => m.budgets.push(b.clone()),
            }
        }
        m
    }

    /// Compiles and publishes what the index holds.
    pub fn project(&self, projection: &mut Projection) -> Result<Outcome, PublishError> {
        let projected = projection.project(&self.manifests())?;
        Ok(Outcome {
            projected,
            generations: self
                .objects
                .iter()
                .map(|((_, r), t)| (r.clone(), t.generation()))
                .collect(),
            malformed: self.malformed.clone(),
        })
    }

    /// The Agents, for the CSR path.
    pub fn directory(&self) -> SharedAgents {
        SharedAgents(self.agents.clone())
    }
}

/// The index's Agents, readable from the CSR path while the index updates them.
#[derive(Clone)]
pub struct SharedAgents(Arc<RwLock<Vec<Agent>>>);

impl AgentDirectory for SharedAgents {
    fn agents_in(&self, namespace: &str) -> Vec<Agent> {
        self.0
            .read()
            .map(|agents| agents.agents_in(namespace))
            .unwrap_or_default()
    }
}
