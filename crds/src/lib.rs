//! The Ringfence API contract.
//!
//! Three Kubernetes kinds in group `ringfence.dev/v1alpha1` describe a multi-agent system:
//!
//! - [`Agent`]: one agent and the pods that run it. Its identity is the SPIFFE ID
//!   `spiffe://<trust-domain>/ns/<namespace>/agent/<name>` ([`spiffe`]).
//! - [`AgentPolicy`]: which agent may invoke which agent, tool or model — Cedar text, or
//!   structured edges that compile to Cedar.
//! - [`RunBudget`]: the limits of a run through the selected agents — depth, cycles, rate,
//!   timeouts, tokens, money; retries ([`retry`]) and quotas over hours, days and months
//!   ([`quota`]).
//!
//! The control plane compiles them into one [`bundle::Bundle`] per agent, which travels to that
//! agent's sidecars over the messages in [`api`].
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod budget;
pub mod bundle;
pub mod condition;
pub mod policy;
pub mod quota;
pub mod retry;
pub mod selector;
pub mod spiffe;
#[cfg(feature = "tls")]
pub mod svid;

pub use agent::{Agent, AgentSpec, AgentStatus};
pub use budget::{RunBudget, RunBudgetSpec, RunBudgetStatus};
pub use policy::{AgentPolicy, AgentPolicySpec, AgentPolicyStatus};
pub use spiffe::{AgentKey, SpiffeId, TrustDomain};

/// The API group of every Ringfence kind.
pub const GROUP: &str = "ringfence.dev";
/// The API version of every Ringfence kind.
pub const API_VERSION: &str = "ringfence.dev/v1alpha1";

/// The CustomResourceDefinitions of every kind, as one multi-document YAML stream.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let mut out = String::new();
    for crd in [Agent::crd(), AgentPolicy::crd(), RunBudget::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    /// The checked-in YAML is what `kubectl apply` and the chart use; it must match the types.
    #[test]
    fn checked_in_crd_yaml_matches_the_types() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/yaml/ringfence.dev.yaml");
        let generated = super::crd_yaml().unwrap();
        if std::env::var_os("RINGFENCE_BLESS").is_some() {
            std::fs::write(path, &generated).unwrap();
        }
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == generated,
            "{path} is out of date with the CRD types: run `RINGFENCE_BLESS=1 cargo test -p ringfence-crds` \
             (or `cargo run -p ringfence -- crds > {path}`) and commit the result"
        );
    }

    /// `helm install` applies the chart's copy; it must be the generated one, byte for byte.
    #[test]
    fn the_helm_chart_ships_the_generated_crds() {
        let chart = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../charts/ringfence/crds/ringfence.dev.yaml"
        );
        let generated = super::crd_yaml().unwrap();
        if std::env::var_os("RINGFENCE_BLESS").is_some() {
            std::fs::write(chart, &generated).unwrap();
        }
        let shipped = std::fs::read_to_string(chart).unwrap_or_default();
        assert!(
            shipped == generated,
            "{chart} differs from the CRD types: run `RINGFENCE_BLESS=1 cargo test -p ringfence-crds` \
             (or `cp crds/yaml/ringfence.dev.yaml charts/ringfence/crds/`) and commit the result"
        );
    }
}
