//! Retries a caller's sidecar makes for its agent, bounded by a retry budget.
//!
//! The overnight loop began with a sub-agent "retrying" by re-invoking its parent. A retry made
//! by the sidecar instead goes to the same callee, inside the same run, at the same depth, and
//! only while the retry budget allows: retries may add at most `budgetPercent` of the calls made
//! over the last `budgetWindowSeconds` (plus a floor of `minRetriesPerSecond`), as Linkerd and
//! Finagle do, so a hard-down upstream never sees its load amplified.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How a sidecar retries failed calls of the agents a RunBudget selects.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Attempts per call, the first included: 3 means at most two retries. 1 turns retries off.
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: u32,
    /// Which failures are retried. Default: connect failures, 503 and 429.
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<RetryOn>,
    /// How long one attempt may wait for the answer's headers before it counts as a `Timeout`
    /// failure. Absent: attempts are bounded only by `perAgent.timeoutSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout_millis: Option<u64>,
    /// The first backoff; each later one doubles, up to `backoffMaxMillis`. Every wait is drawn
    /// uniformly from zero to that bound (full jitter). A 429's `Retry-After` is a floor.
    #[serde(default = "default_backoff_base")]
    pub backoff_base_millis: u64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_millis: u64,
    /// Retries may add at most this percentage of the calls made over the window.
    #[serde(default = "default_budget_percent")]
    #[schemars(range(max = 100))]
    pub budget_percent: u32,
    /// Retries allowed per second whatever the traffic, so a quiet agent can still retry.
    #[serde(default = "default_min_per_second")]
    pub min_retries_per_second: u32,
    /// The window the budget counts calls over.
    #[serde(default = "default_budget_window")]
    pub budget_window_seconds: u64,
    /// Also retry calls that are not idempotent: A2A `SendMessage`/`SendStreamingMessage`,
    /// MCP `tools/call`, and model calls. Off by default: a retried `SendMessage` can run a task
    /// twice.
    #[serde(default)]
    pub non_idempotent: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            retry_on: default_retry_on(),
            per_try_timeout_millis: None,
            backoff_base_millis: default_backoff_base(),
            backoff_max_millis: default_backoff_max(),
            budget_percent: default_budget_percent(),
            min_retries_per_second: default_min_per_second(),
            budget_window_seconds: default_budget_window(),
            non_idempotent: false,
        }
    }
}

/// A failure that may be retried.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum RetryOn {
    /// The callee's sidecar or upstream could not be reached (refused, reset, TLS failure).
    ConnectFailure,
    /// 503 Service Unavailable.
    Unavailable,
    /// 429 Too Many Requests from the callee (not the caller's own rate limit); `Retry-After`
    /// is honoured.
    RateLimited,
    /// 502 and 504 from the callee's upstream.
    GatewayError,
    /// The attempt outlived `perTryTimeoutMillis`.
    Timeout,
}

fn default_max_attempts() -> u32 {
    3
}
fn default_retry_on() -> Vec<RetryOn> {
    vec![
        RetryOn::ConnectFailure,
        RetryOn::Unavailable,
        RetryOn::RateLimited,
    ]
}
fn default_backoff_base() -> u64 {
    25
}
fn default_backoff_max() -> u64 {
    1_000
}
fn default_budget_percent() -> u32 {
    20
}
fn default_min_per_second() -> u32 {
    10
}
fn default_budget_window() -> u64 {
    10
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_retry_block_means_the_defaults() {
        let p: RetryPolicy = serde_yaml::from_str("{}").unwrap();
        assert_eq!(p, RetryPolicy::default());
        assert_eq!(p.max_attempts, 3);
        assert!(!p.non_idempotent);
    }
}
