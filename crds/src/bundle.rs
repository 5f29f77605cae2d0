//! The bundle: everything one sidecar needs to enforce policy for its agent.
//!
//! The control plane compiles manifests into one [`BundleContent`] per agent, holding only the
//! Cedar policies that can apply to that agent as caller or callee (Cedar evaluates every policy
//! in a set on every request). Content is hashed; the publisher gives each distinct content for
//! an agent the next version number. Sidecars check the hash, swap the bundle atomically and
//! acknowledge the version they enforce.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::agent::Trust;
use crate::budget::{InvokeRate, OnBreach, Usd};
use crate::policy::Sensitivity;
use crate::spiffe::SpiffeId;

/// Depth limit when no RunBudget sets one: deep enough for real workflows, shallow enough that
/// a loop trips it in seconds.
pub const DEFAULT_MAX_DEPTH: u32 = 10;

/// One version of one agent's bundle, as sent to its sidecars.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Bundle {
    /// Increases by one each time this agent's content changes.
    pub version: u64,
    /// `sha256:<hex>` of the canonical JSON of `content`.
    pub hash: String,
    pub content: BundleContent,
}

/// Why a received bundle cannot be enforced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("bundle version {version} claims hash {claimed} but its content hashes to {actual}")]
    Hash {
        version: u64,
        claimed: String,
        actual: String,
    },
}

impl Bundle {
    pub fn new(version: u64, content: BundleContent) -> Self {
        Self {
            version,
            hash: content.digest(),
            content,
        }
    }

    /// Checks that `hash` matches `content`.
    pub fn verify(&self) -> Result<(), BundleError> {
        let actual = self.content.digest();
        if actual == self.hash {
            Ok(())
        } else {
            Err(BundleError::Hash {
                version: self.version,
                claimed: self.hash.clone(),
                actual,
            })
        }
    }
}

/// What one agent's sidecar enforces.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BundleContent {
    pub trust_domain: String,
    /// The sidecar's own agent.
    pub agent: AgentEntry,
    /// The other agents of its namespace: how to reach them and which identity each must show.
    pub peers: Vec<AgentEntry>,
    /// MCP servers the agent reaches at `/tools/<name>/`.
    pub tool_servers: Vec<ToolServerEntry>,
    /// Attributes of tools (untrusted output, sensitivity).
    pub tools: Vec<ToolAttrs>,
    /// LLM providers the agent reaches at `/models/<name>/`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub model_providers: Vec<crate::agent::ModelProvider>,
    pub policy: PolicySlice,
    pub limits: Limits,
}

impl BundleContent {
    /// `sha256:<hex>` of the canonical JSON encoding.
    pub fn digest(&self) -> String {
        // Serialising plain structs, Vecs and string maps cannot fail.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
    }

    /// Finds a peer (or the agent itself) by name.
    pub fn agent_named(&self, name: &str) -> Option<&AgentEntry> {
        if self.agent.name == name {
            return Some(&self.agent);
        }
        self.peers.iter().find(|p| p.name == name)
    }
}

/// An agent as a sidecar sees it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AgentEntry {
    pub name: String,
    pub namespace: String,
    /// The identity its sidecar presents; a caller refuses any other.
    pub spiffe_id: SpiffeId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    pub trust: Trust,
    pub may_start_runs: bool,
    /// `host:port` of its sidecar's mTLS inbound listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<String>,
    /// Where its application listens (the sidecar forwards inbound calls there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// The agent that takes its calls when it fails (`spec.fallback`), if the caller's policy
    /// permits invoking that one too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

/// An MCP server reachable from the agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ToolServerEntry {
    pub name: String,
    pub url: String,
}

/// Attributes of one tool, or of every tool of a server (`tool: None`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ToolAttrs {
    pub server: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    pub untrusted: bool,
    pub sensitivity: Sensitivity,
}

/// The Cedar that can apply to this agent: schema, policies and entities.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PolicySlice {
    /// The Cedar schema (human-readable syntax) every policy was validated against.
    pub schema: String,
    pub policies: Vec<PolicyEntry>,
    /// Cedar entities in Cedar's JSON format (agents, tools, models).
    pub entities: serde_json::Value,
}

/// One Cedar policy.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PolicyEntry {
    /// Unique Cedar policy id.
    pub id: String,
    /// The rule a person wrote, named in denials: `<namespace>/<AgentPolicy>/<rule>`.
    pub rule: String,
    /// The policy in Cedar syntax.
    pub text: String,
}

/// The run limits in force for this agent: the strictest of every RunBudget selecting it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    pub max_delegation_depth: u32,
    pub max_revisits: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invoke_rate_limit: Option<InvokeRate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_wall_clock_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<Usd>,
    pub on_breach: OnBreach,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_webhook: Option<String>,
    /// Let metered calls through when the budget service cannot be reached.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fail_open: bool,
    /// The RunBudgets these limits come from (`<namespace>/<name>`); the workflow for attribution.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<String>,
    /// How this agent's sidecar retries its failed outbound calls; `None`: it does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<crate::retry::RetryPolicy>,
    /// Windowed quotas that count this agent's spending, from every RunBudget selecting it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quotas: Vec<crate::quota::QuotaTerm>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_delegation_depth: DEFAULT_MAX_DEPTH,
            max_revisits: 0,
            invoke_rate_limit: None,
            timeout_seconds: None,
            max_wall_clock_seconds: None,
            max_total_tokens: None,
            max_cost_usd: None,
            on_breach: OnBreach::default(),
            alert_webhook: None,
            fail_open: false,
            budgets: Vec::new(),
            retry: None,
            quotas: Vec::new(),
        }
    }
}
