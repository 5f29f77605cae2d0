//! `Agent`: one agent of a multi-agent system, the unit of identity.
// kube's `printcolumn(...)` repeats `type_ = "string"`, which this lint takes for a duplicate.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::budget::InvokeRate;

/// Annotations that say where an agent and its sidecar listen when the control plane runs on one
/// machine (`ringfence local`). Kubernetes ignores them, so the same manifests serve both.
pub mod local {
    /// The agent's own address, e.g. `127.0.0.1:9001`: where its sidecar forwards inbound calls.
    pub const APP: &str = "ringfence.dev/local-app";
    /// The sidecar's outbound listener (the agent calls out through it).
    pub const OUTBOUND: &str = "ringfence.dev/local-outbound";
    /// The sidecar's mTLS inbound listener (other sidecars call this agent through it).
    pub const INBOUND: &str = "ringfence.dev/local-inbound";
    /// The sidecar's admin listener (`/metrics`, `/healthz`, `/readyz`, `/debug/bundle`).
    pub const ADMIN: &str = "ringfence.dev/local-admin";
}

/// An agent: who it is (its SPIFFE identity derives from namespace and name), which pods run it,
/// and the attributes policies can test.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ringfence.dev",
    version = "v1alpha1",
    kind = "Agent",
    namespaced,
    status = "AgentStatus",
    shortname = "ag",
    category = "ringfence",
    doc = "An agent of a multi-agent system: its identity, its pods and the attributes policy can test.",
    printcolumn(name = "SPIFFE ID", type_ = "string", json_path = ".status.spiffeId"),
    printcolumn(name = "Team", type_ = "string", json_path = ".spec.team"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// Pods that run this agent. Pods may also name their agent with the
    /// `ringfence.dev/agent` annotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// The port the agent's application listens on inside its pod; the sidecar forwards
    /// authorized inbound calls there.
    #[serde(default = "default_app_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub app_port: u16,
    /// The team that owns the agent (Cedar: `principal.team`), used for cost attribution too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// The environment the agent runs in, e.g. `prod` (Cedar: `principal.environment`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// `Untrusted` marks an agent whose answers may carry injected instructions (an external
    /// agent): calls that reach it taint the caller's branch of the run.
    #[serde(default)]
    pub trust: Trust,
    /// Whether this agent may start a run: make an outbound call without a Ringfence context
    /// (Cedar action `start_run`). Entrypoint agents only.
    #[serde(default)]
    pub may_start_runs: bool,
    /// How often this agent may invoke other agents, e.g. `60/min`. Overrides the RunBudget's
    /// `perAgent.invokeRateLimit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoke_rate_limit: Option<InvokeRate>,
    /// MCP servers this agent reaches through its sidecar at `/tools/<name>/`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<ToolServer>,
    /// LLM providers this agent reaches through its sidecar at `/models/<name>/`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelProvider>,
    /// Another agent of this namespace that takes this agent's calls when this one fails: it
    /// cannot be reached, or a call ends (after its retries) in a failure the caller's RunBudget
    /// `retry.retryOn` names (503, 429, 502/504, a per-try timeout). A 500 never falls back. A
    /// caller's sidecar falls back only when the caller's policy permits invoking the fallback
    /// too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// What the agent does, for people reading `kubectl describe`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

fn default_app_port() -> u16 {
    8080
}

/// Whether an agent's answers are trusted.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Trust {
    #[default]
    Trusted,
    Untrusted,
}

impl Trust {
    pub fn as_str(self) -> &'static str {
        match self {
            Trust::Trusted => "Trusted",
            Trust::Untrusted => "Untrusted",
        }
    }
}

/// An MCP server the agent may call through its sidecar.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ToolServer {
    /// The server's name: the path segment in `/tools/<name>/` and the `server` of its tools.
    pub name: String,
    /// Where the MCP server's streamable-HTTP endpoint is, e.g. `http://search-mcp:8000/mcp`.
    pub url: String,
}

/// An LLM provider the agent may call through its sidecar. The sidecar adds the API key, so
/// the agent never holds it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelProvider {
    /// The provider's name: the path segment in `/models/<name>/` and the `provider` of its
    /// models in policies (`openai/gpt-4o-mini`).
    pub name: String,
    /// The API's base URL, e.g. `https://api.openai.com` or a local mock.
    pub url: String,
    /// Which wire format the provider speaks.
    #[serde(default)]
    pub api: ModelApi,
    /// The environment variable of the sidecar that holds the API key (in Kubernetes, set from
    /// a Secret). Absent: no key is added.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// How long to wait for this provider's answer headers before trying the first fallback.
    /// Absent: only a 5xx or 429 answer falls back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Routes tried in order when this provider answers 5xx or 429, cannot be reached, or
    /// outlives `timeoutSeconds`. Each names another provider of this agent with the same `api`;
    /// the call is charged at the price of whichever route answered, and each route's model
    /// must be permitted by policy (`call_model`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<ModelRoute>,
}

/// One fallback route for model calls.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelRoute {
    /// The provider (an entry of this agent's `models`) to send the call to.
    pub provider: String,
    /// The model to ask that provider for, replacing the request's `model`. Absent: the
    /// request's model is kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// The wire format of an LLM provider.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ModelApi {
    /// OpenAI-compatible: `/v1/chat/completions`, `/v1/responses`; `Authorization: Bearer`.
    #[default]
    OpenAI,
    /// Anthropic-style: `/v1/messages`; `x-api-key`.
    Anthropic,
}

/// What the control plane observed about an agent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The agent's identity: `spiffe://<trust-domain>/ns/<namespace>/agent/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    /// The bundle version last built for this agent's sidecars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_version: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
