//! What the webhook reads from the cluster at admission time: a namespace's labels (namespace
//! opt-in) and its Agents (the pod's Agent; the names a policy may refer to).
//!
//! A trait so the admission logic is tested over real HTTPS without an API server.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::ListParams;
use ringfence_crds::Agent;

/// Why the cluster could not be read.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot read {what} from the Kubernetes API: {source}; check that the API server is reachable and the operator's ClusterRole allows it"
)]
pub struct ViewError {
    what: String,
    #[source]
    source: Box<kube::Error>,
}

/// Read access to the objects admission decisions depend on.
pub trait ClusterView: Send + Sync + 'static {
    /// The labels of namespace `ns`; `None` when it does not exist.
    fn namespace_labels(
        &self,
        ns: &str,
    ) -> impl Future<Output = Result<Option<BTreeMap<String, String>>, ViewError>> + Send;

    /// The Agents of namespace `ns`.
    fn agents(&self, ns: &str) -> impl Future<Output = Result<Vec<Agent>, ViewError>> + Send;
}

/// The live cluster, read per request (admission is rare next to the calls it governs, and a
/// fresh read never injects from a stale Agent).
#[derive(Clone)]
pub struct KubeView {
    client: kube::Client,
}

impl KubeView {
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

impl ClusterView for KubeView {
    async fn namespace_labels(
        &self,
        ns: &str,
    ) -> Result<Option<BTreeMap<String, String>>, ViewError> {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let found = api.get_opt(ns).await.map_err(|e| ViewError {
            what: format!("namespace {ns}"),
            source: Box::new(e),
        })?;
        Ok(found.map(|n| n.metadata.labels.unwrap_or_default()))
    }

    async fn agents(&self, ns: &str) -> Result<Vec<Agent>, ViewError> {
        let api: Api<Agent> = Api::namespaced(self.client.clone(), ns);
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|e| ViewError {
                what: format!("the Agents of namespace {ns}"),
                source: Box::new(e),
            })?;
        Ok(list.items)
    }
}

/// A fixed view, for tests.
#[cfg(test)]
#[derive(Debug, Clone, Default)]
pub struct StaticView {
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub agents: Vec<Agent>,
}

#[cfg(test)]
impl ClusterView for StaticView {
    async fn namespace_labels(
        &self,
        ns: &str,
    ) -> Result<Option<BTreeMap<String, String>>, ViewError> {
        Ok(self.namespaces.get(ns).cloned())
    }

    async fn agents(&self, ns: &str) -> Result<Vec<Agent>, ViewError> {
        Ok(self
            .agents
            .iter()
            .filter(|a| a.metadata.namespace.as_deref() == Some(ns))
            .cloned()
            .collect())
    }
}

/// The names of `agents`, for a policy's references.
pub fn names(agents: &[Agent]) -> BTreeSet<String> {
    agents
        .iter()
        .filter_map(|a| a.metadata.name.clone())
        .collect()
}
