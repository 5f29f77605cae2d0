//! Messages between sidecars and the control plane.
//!
//! - `POST /v1/identity/csr` — a CSR plus proof of identity (bootstrap token in local mode,
//!   ServiceAccount token in Kubernetes, or the current SVID for renewal) → an X.509-SVID.
//! - `GET /v1/bundles/watch` — mTLS; the agent is the one named by the client certificate. A
//!   stream of [`crate::bundle::Bundle`]s as JSON lines: the current one at once, then each new
//!   version as it is published.
//! - `POST /v1/bundles/ack` — mTLS; a [`BundleAck`].
//! - `GET /v1/status` — what each agent's sidecars enforce, and policy diagnostics.

use serde::{Deserialize, Serialize};

use crate::spiffe::AgentKey;

/// Path of the CSR endpoint.
pub const CSR_PATH: &str = "/v1/identity/csr";
/// Path of the bundle stream.
pub const WATCH_PATH: &str = "/v1/bundles/watch";
/// Path of bundle acknowledgements.
pub const ACK_PATH: &str = "/v1/bundles/ack";
/// Path of the status report.
pub const STATUS_PATH: &str = "/v1/status";
/// Header naming one sidecar instance (e.g. its pod or process), sent on the bundle stream and
/// on acks so the control plane can tell the sidecars of one agent apart.
pub const SIDECAR_HEADER: &str = "ringfence-sidecar";

/// A request for an X.509-SVID.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CsrRequest {
    /// The agent the sidecar speaks for.
    pub agent: AgentKey,
    /// A PKCS#10 CSR in PEM. Its key never leaves the sidecar.
    pub csr: String,
}

/// An issued X.509-SVID.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CsrResponse {
    pub spiffe_id: String,
    /// The SVID, leaf first, in PEM.
    pub certificate_chain: String,
    /// The trust domain's CA certificates in PEM.
    pub trust_bundle: String,
    /// Expiry, seconds since the Unix epoch.
    pub not_after: i64,
}

/// A sidecar's answer to a bundle version.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct BundleAck {
    pub version: u64,
    pub hash: String,
    /// `None` when the sidecar enforces the version; otherwise why it rejected it (and it keeps
    /// enforcing the version it had).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<String>,
}

/// The error body of every control-plane endpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
}

/// Budget service: lease a slice of a run's remaining budget (mTLS; the agent is the client
/// certificate's). The first lease of a run opens it with the leasing sidecar's terms.
pub const LEASE_PATH: &str = "/v1/budget/leases";
/// Budget service: give back what a lease did not spend.
pub const RELEASE_PATH: &str = "/v1/budget/leases/release";
/// Budget service: report actual spend, batched, idempotent by event id.
pub const SPEND_PATH: &str = "/v1/budget/spend";
/// Budget service: a stream of [`HaltEvent`]s as JSON lines, `?since=<seq>` to resume.
pub const HALTS_PATH: &str = "/v1/budget/halts";
/// Budget service: spend grouped `?by=team|environment|workflow|agent|model` (`&sinceMs=`).
pub const SPEND_BY_PATH: &str = "/v1/spend";
/// Budget service: recent runs (`GET`), and one run at `/v1/runs/<id>`.
pub const RUNS_PATH: &str = "/v1/runs";
/// Budget service: every windowed quota counter with its current window's spend (`GET`), and
/// the same in Prometheus' text format at `/v1/quotas/metrics`.
pub const QUOTAS_PATH: &str = "/v1/quotas";
/// Budget service: the run ledger, one [`CallEvent`] per call a sidecar made, batched,
/// idempotent by event id ([`CallReport`] → [`CallAck`]).
pub const CALLS_PATH: &str = "/v1/ledger/calls";

/// The limits a run is held to, as the sidecar that opens it knows them from its bundle.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RunTerms {
    /// The agent that started the run.
    pub root: String,
    /// The human principal, empty when none.
    #[serde(default)]
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_total_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_micros: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(default)]
    pub on_breach: crate::budget::OnBreach,
    /// The RunBudgets these terms come from (`<namespace>/<name>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub budgets: Vec<String>,
    /// Where an alert about this run goes when it breaches its budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_webhook: Option<String>,
    /// The leasing agent's windowed quotas: a lease is granted only while each has room, and
    /// what is spent under it counts toward each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quotas: Vec<crate::quota::QuotaTerm>,
}

impl RunTerms {
    /// The tightest token limit among the run's and its quotas': leases are sliced from it.
    /// `None`: nothing limits tokens, and a lease reserves none.
    pub fn tightest_tokens(&self) -> Option<u64> {
        let quotas = self.quotas.iter().filter_map(|q| q.max_total_tokens);
        self.max_total_tokens.into_iter().chain(quotas).min()
    }

    /// The tightest cost limit (micro-USD) among the run's and its quotas'.
    pub fn tightest_micros(&self) -> Option<u64> {
        let quotas = self.quotas.iter().filter_map(|q| q.max_cost_micros);
        self.max_cost_micros.into_iter().chain(quotas).min()
    }
}

/// A request for a slice of a run's remaining budget.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseRequest {
    pub run: String,
    pub terms: RunTerms,
    pub tokens: u64,
    pub micros: u64,
}

/// The answer to a [`LeaseRequest`].
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "outcome", rename_all = "camelCase")]
pub enum LeaseResponse {
    /// Spend up to this much, then report it.
    #[serde(rename_all = "camelCase")]
    Granted {
        lease_id: String,
        tokens: u64,
        micros: u64,
    },
    /// The run's budget is spent (or promised to outstanding leases).
    #[serde(rename_all = "camelCase")]
    Exhausted {
        limit: String,
        spent: u64,
        limit_value: u64,
    },
    /// The run was halted.
    Halted { reason: String },
    /// The run is over.
    Completed,
}

/// What a sidecar returns of a lease.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseRequest {
    pub lease_id: String,
    pub tokens: u64,
    pub micros: u64,
}

/// One unit of spend: a call made, its tokens and cost.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SpendEvent {
    /// Unique per event; a re-sent event is counted once.
    pub event_id: String,
    pub run: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_id: Option<String>,
    #[serde(default)]
    pub tokens_in: u64,
    #[serde(default)]
    pub tokens_out: u64,
    #[serde(default)]
    pub micros: u64,
    #[serde(default)]
    pub calls: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The usage was estimated (the response carried none that could be read).
    #[serde(default)]
    pub estimated: bool,
    pub at_ms: u64,
    /// The spending agent's team and environment, and the RunBudget (`<namespace>/<name>`) it
    /// spends under: for attribution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// The run's root agent and user, so spend of a run no lease opened (one without token or
    /// cost limits) still lands in the ledger.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub root: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
}

/// A batch of spend.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SpendReport {
    pub events: Vec<SpendEvent>,
}

/// The budget service's answer to a [`SpendReport`]: durable once sent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SpendAck {
    pub accepted: usize,
    pub duplicates: usize,
    /// Runs this report halted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub halted: Vec<String>,
}

/// A run halted: every sidecar refuses its next call.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HaltEvent {
    pub seq: u64,
    pub run: String,
    pub reason: String,
    pub at_ms: u64,
}

/// What a call across an edge was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallKind {
    Agent,
    Tool,
    Model,
}

impl CallKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CallKind::Agent => "agent",
            CallKind::Tool => "tool",
            CallKind::Model => "model",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "agent" => Some(CallKind::Agent),
            "tool" => Some(CallKind::Tool),
            "model" => Some(CallKind::Model),
            _ => None,
        }
    }
}

/// What the sidecars decided about one call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "decision", content = "reason")]
pub enum Decision {
    Allowed,
    /// Denied, with the reason as the sidecar names it (`policy`, `rate_limit`, `depth`,
    /// `cycle`, `budget`, ...), by the caller's sidecar or the callee's.
    Denied(String),
}

/// One call a sidecar made for its agent (allowed or refused), as the run ledger keeps it. The
/// caller's sidecar reports it when the call is over; a refusal by the callee's sidecar comes
/// back with the answer and is reported the same way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallEvent {
    /// Unique per call (`<trace id>-<span id>`): the idempotency key of a ledger report.
    pub event_id: String,
    pub run_id: String,
    /// The run's trace (32 hex digits) and this call's client span (16 hex digits).
    #[serde(default)]
    pub trace_id: String,
    #[serde(default)]
    pub span_id: String,
    /// The span of the call that brought the run to `caller`; `None` for the root agent's calls.
    /// Calls link into the run's tree through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_call: Option<String>,
    /// The run's root agent and user, so the ledger knows a run no budget opened.
    #[serde(default)]
    pub root: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// The calling agent; the budget service accepts only the agent of the reporting SVID.
    pub caller: String,
    /// An agent name, `tool:<server>` or `model:<provider>`.
    pub callee: String,
    pub kind: CallKind,
    /// The A2A method, the MCP tool, or the model, when the call named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    #[serde(flatten)]
    pub decision: Decision,
    /// The rule that decided, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The callee's delegation depth (root 0).
    pub depth: u32,
    /// The callee was already on the run's path: a cycle formed here.
    #[serde(default)]
    pub cycle: bool,
    /// Untrusted content had reached the caller's branch.
    #[serde(default)]
    pub tainted: bool,
    pub latency_us: u64,
    #[serde(default)]
    pub tokens_in: u64,
    #[serde(default)]
    pub tokens_out: u64,
    pub micros: u64,
    /// When the call started, Unix milliseconds.
    pub at_ms: u64,
    /// The HTTP status the caller got, when the call got that far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

impl CallEvent {
    pub fn tokens(&self) -> u64 {
        self.tokens_in.saturating_add(self.tokens_out)
    }

    pub fn denied(&self) -> bool {
        matches!(self.decision, Decision::Denied(_))
    }
}

/// A batch of calls for the run ledger.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CallReport {
    pub calls: Vec<CallEvent>,
}

/// The budget service's answer to a [`CallReport`]: durable once sent.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CallAck {
    pub accepted: usize,
    /// Calls already recorded by an earlier report (a re-sent batch).
    pub duplicates: usize,
}
