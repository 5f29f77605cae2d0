//! `AgentPolicy`: which agent may invoke which agent, tool or model.
//!
//! A policy is Cedar text, a structured form that compiles to Cedar, or both. Every policy in a
//! namespace is validated against one Cedar schema (see the operator's compiler); an invalid one
//! is reported in its status and never reaches a sidecar.
// kube's `printcolumn(...)` repeats `type_ = "string"`, which this lint takes for a duplicate.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Cedar policies and structured edges that govern calls between agents, tools and models.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "ringfence.dev",
    version = "v1alpha1",
    kind = "AgentPolicy",
    namespaced,
    status = "AgentPolicyStatus",
    shortname = "agpol",
    category = "ringfence",
    doc = "Which agent may invoke which agent, tool or model: Cedar text and/or structured edges.",
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AgentPolicySpec {
    /// Edges that are permitted. Anything not permitted is denied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<EdgeRule>,
    /// Edges that are forbidden, whatever else permits them (forbid beats permit).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<EdgeRule>,
    /// Attributes of MCP tools: whether their output is untrusted (it taints the run's branch)
    /// and how sensitive they are (`resource.sensitivity` in Cedar).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolRule>,
    /// Cedar policies, validated against the Ringfence schema (entities `Agent`, `Tool`,
    /// `Model`, `User`; actions `invoke`, `call_tool`, `call_model`, `start_run`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cedar: Option<String>,
}

/// One structured rule: callers (`from`) and what they may (or may not) reach.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EdgeRule {
    /// Calling agents, by name (this namespace) or `<namespace>/<name>`; `*` means any agent.
    pub from: Vec<String>,
    /// Agents that may be invoked (A2A), as above; `*` means any agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
    /// MCP tools, as `<server>/<tool>` or `<server>/*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// Models, as `<provider>/<model>` or `<provider>/*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Why the rule exists; shown beside the rule name in denials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Attributes of a tool, or of every tool of a server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolRule {
    /// The MCP server's name (as in an Agent's `tools`).
    pub server: String,
    /// The tool's name; absent means every tool of the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// Output from this tool may carry injected instructions: it taints the caller's branch.
    #[serde(default)]
    pub untrusted: bool,
    #[serde(default)]
    pub sensitivity: Sensitivity,
}

/// How sensitive a tool is; policies can keep tainted branches from sensitive tools.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Sensitivity {
    #[default]
    Low,
    Medium,
    High,
}

impl Sensitivity {
    pub fn as_str(self) -> &'static str {
        match self {
            Sensitivity::Low => "low",
            Sensitivity::Medium => "medium",
            Sensitivity::High => "high",
        }
    }
}

/// Whether the policy was accepted and, if not, Cedar's diagnostics.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentPolicyStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// How many Cedar policies the spec compiled to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compiled_policies: Option<u32>,
}
