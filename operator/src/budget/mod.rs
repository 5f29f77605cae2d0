//! The budget service's data: runs, leases, spend and the run ledger.
//!
//! A run's token and cost limits are global: the budget service holds them, and sidecars spend
//! against them through **leases**, slices of what is left. A lease is granted from
//! `limit - spent - outstanding`, where `outstanding` is what earlier leases granted and their
//! holders have neither reported as spent nor given back. So as long as sidecars spend no more
//! than they lease, `spent` can never pass the limit; spend that is reported without a lease
//! (an estimate, a call that used more than it reserved) can, and that is a **breach**.
//!
//! Sidecars report spend in batches of [`SpendEvent`]s, each with a unique `event_id`, so a
//! batch re-sent after a lost acknowledgement is not counted twice. A report covers the lease it
//! names; a breach halts the run when its `onBreach` says so, and each halt gets a sequence
//! number in the halt stream ([`Halt`]) that every budget service replica pushes to sidecars.
//!
//! Beside the money, the ledger keeps one aggregate per edge (caller → callee) of a run: calls,
//! denials by reason and rule, tokens, cost, deepest delegation, first and last seen — what
//! `ringfence runs show` draws.
//!
//! Money is integer micro-dollars throughout; times are milliseconds since the Unix epoch,
//! passed in by the caller (the store never reads a clock).
//!
//! [`store`] keeps all of it durably, in SQLite (one replica) or PostgreSQL (several);
//! [`service`] serves it to sidecars over mTLS.

use std::collections::BTreeMap;

use ringfence_crds::budget::OnBreach;
use serde::{Deserialize, Serialize};

pub mod alert;
pub mod quota;
pub mod service;
pub mod store;

/// Tokens and micro-dollars together: what a lease asks for, grants or gives back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Amount {
    pub tokens: u64,
    pub micros: u64,
}

/// A run's global limits, resolved from the RunBudgets that select its root agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunLimits {
    /// `maxTotalTokens`: input plus output tokens over the whole run.
    pub max_tokens: Option<u64>,
    /// `maxCostUsd`, in micro-dollars.
    pub max_cost_micros: Option<u64>,
    /// When the run must be over (`maxWallClockSeconds` after it opened). Stored for the service
    /// and the sidecars, which enforce it; the store does not.
    pub deadline_ms: Option<u64>,
    pub on_breach: OnBreach,
    /// Names of the RunBudgets these limits came from, for the operator reading a halt.
    pub budgets: Vec<String>,
}

/// Which limit a lease or a report ran into, named as in the RunBudget spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BudgetLimit {
    #[serde(rename = "maxTotalTokens")]
    MaxTotalTokens,
    #[serde(rename = "maxCostUsd")]
    MaxCostUsd,
}

impl BudgetLimit {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetLimit::MaxTotalTokens => "maxTotalTokens",
            BudgetLimit::MaxCostUsd => "maxCostUsd",
        }
    }
}

impl std::fmt::Display for BudgetLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Running,
    Halted,
    Completed,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Halted => "halted",
            RunStatus::Completed => "completed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(RunStatus::Running),
            "halted" => Some(RunStatus::Halted),
            "completed" => Some(RunStatus::Completed),
            _ => None,
        }
    }
}

/// A run as opened: who started it, for whom, under which limits, and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunRecord {
    pub run_id: String,
    pub root_agent: String,
    pub user: String,
    pub limits: RunLimits,
    pub status: RunStatus,
    pub opened_at_ms: u64,
    pub halted_at_ms: Option<u64>,
    pub halt_reason: Option<String>,
    pub completed_at_ms: Option<u64>,
}

/// What a lease request got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    rename_all = "camelCase",
    rename_all_fields = "camelCase",
    tag = "outcome"
)]
pub enum LeaseOutcome {
    /// Up to what was asked for, per dimension; never more than the run has left.
    Granted {
        lease_id: String,
        granted: Amount,
    },
    /// Nothing is left of `limit`: `spent` is reported, `outstanding` is leased to others.
    Exhausted {
        limit: BudgetLimit,
        spent: u64,
        outstanding: u64,
        limit_value: u64,
    },
    /// The run was halted (by a breach or an operator) and may spend nothing more.
    Halted {
        reason: String,
    },
    /// The run is over.
    Completed,
    UnknownRun,
    /// One of the lease's windowed quotas has nothing left in its window: `spent` of it is
    /// reported (`used`), `outstanding` is leased to others. `trip` is set when this lease found
    /// the quota spent first in its window (the breach to halt and alert on).
    QuotaExhausted {
        counter: quota::CounterId,
        limit: BudgetLimit,
        used: u64,
        outstanding: u64,
        limit_value: u64,
        /// The window's spend reached the limit (not only promised to outstanding leases).
        spent: bool,
        trip: Option<quota::QuotaTrip>,
    },
}

/// One call's actual usage, as a sidecar reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpendEvent {
    /// Unique per event, chosen by the sidecar: the idempotency key of a report.
    pub event_id: String,
    pub run_id: String,
    pub agent: String,
    /// The lease this spend came out of; `None` for spend outside any lease.
    pub lease_id: Option<String>,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub micros: u64,
    pub calls: u64,
    pub model: Option<String>,
    /// The sidecar could not read the usage and estimated it.
    pub estimated: bool,
    pub at_ms: u64,
    /// The spending agent's team, environment, and the RunBudget (workflow) it spends under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
}

/// What spend can be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attribution {
    Agent,
    Team,
    Environment,
    Workflow,
    Model,
}

impl Attribution {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "agent" => Self::Agent,
            "team" => Self::Team,
            "environment" => Self::Environment,
            "workflow" => Self::Workflow,
            "model" => Self::Model,
            _ => return None,
        })
    }

    /// The spend_events column (a constant: never text from a request).
    pub(crate) fn column(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Team => "team",
            Self::Environment => "environment",
            Self::Workflow => "workflow",
            Self::Model => "model",
        }
    }
}

/// The spend of one team, environment, workflow, agent or model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SpendLine {
    /// The team (etc.); empty for spend that named none.
    pub key: String,
    #[serde(flatten)]
    pub spent: Spend,
    /// Runs the spend belongs to.
    pub runs: u64,
}

/// A limit that reported spend went past.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Breach {
    pub run_id: String,
    pub limit: BudgetLimit,
    pub spent: u64,
    pub limit_value: u64,
    /// The run's `onBreach` halted it (the halt is in the halt stream).
    pub halted: bool,
}

/// What a report did. A breach is listed once, by the report that crossed the limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportOutcome {
    pub accepted: usize,
    /// Events already recorded by an earlier report (a re-sent batch).
    pub duplicates: usize,
    /// Events for a run this store does not know; dropped, not recorded.
    pub unknown_run: usize,
    pub breaches: Vec<Breach>,
    /// Quotas this report spent first in their window.
    #[serde(default)]
    pub quota_trips: Vec<quota::QuotaTrip>,
}

/// What giving back the unspent part of a lease did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "outcome")]
pub enum ReleaseOutcome {
    /// `returned` is what the run has back: the unused amount, capped by what the lease still
    /// held after the reports that covered it.
    Released {
        returned: Amount,
    },
    AlreadyReleased,
    UnknownLease,
}

/// One entry of the halt stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Halt {
    /// Increases with every halt, in commit order; the cursor of [`store::Store::halts_since`].
    pub seq: u64,
    pub run_id: String,
    pub reason: String,
    pub at_ms: u64,
}

/// What an explicit halt did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "outcome")]
pub enum HaltOutcome {
    Halted(Halt),
    /// The run had already stopped (halted or completed); nothing changed.
    AlreadyStopped {
        status: RunStatus,
    },
    UnknownRun,
}

pub use ringfence_crds::api::{CallEvent as EdgeEvent, CallKind as EdgeKind, Decision};

/// What a ledger report did.
pub use ringfence_crds::api::CallAck as EdgesOutcome;

/// Reported spend, summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spend {
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub micros: u64,
    pub calls: u64,
}

impl Spend {
    /// The number `maxTotalTokens` is compared with.
    pub fn tokens(&self) -> u64 {
        self.tokens_in.saturating_add(self.tokens_out)
    }
}

/// A run with its totals: one line of `ringfence runs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    #[serde(flatten)]
    pub run: RunRecord,
    pub spent: Spend,
    /// Leased and not yet reported or given back.
    pub outstanding: Amount,
}

/// One agent's spend in a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpend {
    pub agent: String,
    #[serde(flatten)]
    pub spent: Spend,
    pub first_at_ms: u64,
    pub last_at_ms: u64,
}

/// Denials of one edge for one reason (and rule).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DenialKey {
    pub reason: String,
    pub rule: Option<String>,
}

/// Everything that crossed one edge (caller → callee) of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EdgeAggregate {
    pub caller: String,
    pub callee: String,
    pub kind: EdgeKind,
    /// Every call, allowed or denied.
    pub calls: u64,
    #[serde(with = "denials_as_list")]
    pub denials: BTreeMap<DenialKey, u64>,
    pub tokens: u64,
    pub micros: u64,
    pub max_depth: u32,
    /// Calls across this edge whose callee was already on the run's path.
    pub cycles: u64,
    pub total_latency_us: u64,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
}

/// A run with its per-agent spend and its edges: what `ringfence runs show` draws.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunDetail {
    #[serde(flatten)]
    pub summary: RunSummary,
    pub agents: Vec<AgentSpend>,
    pub edges: Vec<EdgeAggregate>,
    /// Every call of the run, in the order they started: the run's tree, linked by
    /// [`EdgeEvent::parent_call`].
    pub calls: Vec<EdgeEvent>,
}

/// Which runs `list_runs` returns; every field that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunFilter {
    pub status: Option<RunStatus>,
    /// The run's root, or an agent that spent or called or was called in it.
    pub agent: Option<String>,
    pub user: Option<String>,
}

/// JSON objects need string keys; denials travel as a list of `{reason, rule, count}`.
mod denials_as_list {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::DenialKey;

    #[derive(Serialize, Deserialize)]
    struct Entry {
        #[serde(flatten)]
        key: DenialKey,
        count: u64,
    }

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<DenialKey, u64>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter().map(|(key, count)| Entry {
            key: key.clone(),
            count: *count,
        }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<DenialKey, u64>, D::Error> {
        let entries = Vec::<Entry>::deserialize(d)?;
        Ok(entries.into_iter().map(|e| (e.key, e.count)).collect())
    }
}
