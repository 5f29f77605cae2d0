//! Windowed quotas: tokens and money an agent, a team, an environment or a workflow may spend
//! over an hour, a day or a month, across runs.
//!
//! A RunBudget bounds one run; its `quotas` bound the sum of many. The budget service holds the
//! counters with the same leases, durability and halt/alert machinery as run budgets: a sidecar
//! carries its agent's [`QuotaTerm`]s with every lease request, and a lease is granted only while
//! every quota it names has room.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::budget::{OnBreach, Usd};

/// One quota of a RunBudget.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Quota {
    /// Whose spending is counted together.
    pub per: QuotaScope,
    /// How long a window lasts.
    pub window: QuotaWindow,
    /// `false` (the default): calendar windows in UTC, reset at the top of the hour, at
    /// midnight, on the 1st of the month. `true`: the last hour, day or 30 days.
    #[serde(default)]
    pub sliding: bool,
    /// Tokens (input + output, all models) per window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_tokens: Option<u64>,
    /// US dollars per window, as a decimal string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<Usd>,
}

/// Whose spending a quota counts together.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum QuotaScope {
    /// Each selected agent on its own.
    Agent,
    /// The selected agents of each team together (`spec.team` of the Agent).
    Team,
    /// The selected agents of each environment together (`spec.environment`).
    Environment,
    /// Every selected agent together: the RunBudget is the workflow.
    Workflow,
}

impl QuotaScope {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaScope::Agent => "agent",
            QuotaScope::Team => "team",
            QuotaScope::Environment => "environment",
            QuotaScope::Workflow => "workflow",
        }
    }
}

/// How long a quota's window lasts.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum QuotaWindow {
    Hour,
    Day,
    /// A calendar month, or 30 days when sliding.
    Month,
}

impl QuotaWindow {
    pub fn as_str(self) -> &'static str {
        match self {
            QuotaWindow::Hour => "hour",
            QuotaWindow::Day => "day",
            QuotaWindow::Month => "month",
        }
    }
}

/// A quota as it applies to one agent, resolved by the compiler and carried in the bundle's
/// limits and in every lease request of that agent's sidecar.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct QuotaTerm {
    /// Which quota: `<namespace>/<RunBudget>#<index in spec.quotas>`.
    pub id: String,
    /// What it counts together: `agent:<name>`, `team:<team>`, `environment:<environment>` or
    /// `workflow:<RunBudget>`. One counter per (`id`, `key`, window).
    pub key: String,
    pub window: QuotaWindow,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sliding: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_micros: Option<u64>,
    #[serde(default)]
    pub on_breach: OnBreach,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_webhook: Option<String>,
}

/// How much of one quota's current window is spent, as a RunBudget's status shows it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuotaUsage {
    /// `<namespace>/<RunBudget>#<index>`.
    pub id: String,
    /// `team:search`, `agent:writer`, ...
    pub key: String,
    /// `hour`, `day` or `month`, with `sliding` when it is.
    pub window: String,
    /// When the current window began (RFC 3339, UTC).
    pub window_start: String,
    pub tokens: u64,
    /// US dollars spent in the window, as a decimal string.
    pub cost_usd: String,
    /// The quota is spent: its agents' metered calls are refused (402) until the window moves.
    #[serde(default)]
    pub exhausted: bool,
}
