//! AgentPolicy admission, pure: the compiler that builds bundles judges the policy at
//! `kubectl apply` time, so a Cedar error is shown to the person applying it instead of only in
//! the policy's status afterwards.

use std::collections::BTreeSet;

use ringfence_crds::AgentPolicy;

use crate::compile::ResourceRef;
use crate::compile::policies;

/// What the validating webhook answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// `None` admits; `Some` refuses with this message (every error, one per line).
    pub refusal: Option<String>,
    /// Warnings `kubectl` prints either way (e.g. a rule naming an Agent not applied yet).
    pub warnings: Vec<String>,
}

/// Compiles `policy` as the operator would, against the Agents `known_agents` of its namespace.
pub fn check(namespace: &str, policy: &AgentPolicy, known_agents: &BTreeSet<String>) -> Verdict {
    let resource = ResourceRef {
        kind: "AgentPolicy",
        namespace: namespace.to_owned(),
        name: policy.metadata.name.clone().unwrap_or_default(),
    };
    let outcome = policies::compile(&resource, &policy.spec, known_agents);
    let (errors, warnings): (Vec<_>, Vec<_>) =
        outcome.diagnostics.iter().partition(|d| d.is_error());
    let refusal = (!errors.is_empty()).then(|| {
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    });
    Verdict {
        refusal,
        warnings: warnings.iter().map(ToString::to_string).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(spec: serde_json::Value) -> AgentPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "ringfence.dev/v1alpha1", "kind": "AgentPolicy",
            "metadata": {"name": "no-loops", "namespace": "team-a"},
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn cedar_that_does_not_parse_is_refused_with_line_and_column() {
        let p = policy(
            serde_json::json!({"cedar": "permit(principal, action, resource)\nwhen { principal.team == };"}),
        );
        let v = check("team-a", &p, &BTreeSet::new());
        let msg = v.refusal.expect("refused");
        assert!(msg.contains("AgentPolicy team-a/no-loops"), "{msg}");
        assert!(msg.contains("spec.cedar line 2"), "{msg}");
    }

    #[test]
    fn cedar_that_parses_but_breaks_the_schema_is_refused() {
        let p = policy(
            serde_json::json!({"cedar": "permit(principal, action == Action::\"fly\", resource);"}),
        );
        let v = check("team-a", &p, &BTreeSet::new());
        assert!(v.refusal.is_some_and(|m| m.contains("fly")));
    }

    #[test]
    fn a_rule_naming_an_agent_not_applied_yet_is_admitted_with_a_warning() {
        let p = policy(
            serde_json::json!({"deny": [{"from": ["research"], "agents": ["orchestrator"]}]}),
        );
        let known: BTreeSet<String> = ["research".to_owned()].into();
        let v = check("team-a", &p, &known);
        assert_eq!(v.refusal, None);
        assert_eq!(v.warnings.len(), 1, "{:?}", v.warnings);
        assert!(v.warnings[0].contains("orchestrator"));
    }
}
