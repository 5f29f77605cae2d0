//! Where manifests come from: a folder on disk (local mode) or the Kubernetes API.

use std::collections::BTreeMap;

use ringfence_crds::{Agent, AgentPolicy, RunBudget};

use crate::compile::ResourceRef;

/// Every Ringfence resource the control plane knows, plus where each came from.
#[derive(Debug, Clone, Default)]
pub struct Manifests {
    pub agents: Vec<Agent>,
    pub policies: Vec<AgentPolicy>,
    pub budgets: Vec<RunBudget>,
    /// Where each resource was read from (a file and document number in local mode).
    pub origins: BTreeMap<ResourceRef, String>,
}
pub mod folder;
pub mod watch;
