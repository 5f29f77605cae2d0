//! Retries the caller's sidecar makes for its agent: which failures are retried, how long to
//! wait before the next attempt, and the retry budget that keeps retries from amplifying load.
//!
//! Everything here is pure over plain data and an injected clock, so the schedule and the
//! budget are tested exactly; [`attempts`] drives one call's attempts over the wire.
//!
//! What the contract (`crds/src/retry.rs`) leaves to the sidecar:
//!
//! - A refusal by the callee's sidecar (`ringfence-denied`) is an answer, not a failure: policy,
//!   depth, cycle, budget and rate-limit refusals are never retried. Only `upstream` (the
//!   callee's app could not be reached: a gateway error) and `not_ready` (unavailable) are.
//! - A `Retry-After` (delta seconds) on a 429 or 503 is a floor under the jittered backoff; one
//!   that would outlast the call's time left ends the retries instead.
//! - The decision is taken on the answer's head only: no byte of a body ever reaches the app
//!   from an attempt that is then retried.

use std::time::Duration;

use http::{HeaderMap, Method, StatusCode, header};
use ringfence_crds::retry::{RetryOn, RetryPolicy};

use crate::deny::{DENIED_HEADER, Kind};
use crate::forward::ForwardError;
use crate::protocol::a2a::A2aMethod;

pub mod attempts;
pub mod budget;

pub use budget::RetryBudgets;

/// The longest `Retry-After` honoured; a longer one is read as this (the call's own timeout
/// caps it further).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3_600);

/// A failed attempt: which kind of failure, and the callee's `Retry-After`, if it sent one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    pub class: RetryOn,
    pub retry_after: Option<Duration>,
}

impl Failure {
    fn of(class: RetryOn) -> Self {
        Self {
            class,
            retry_after: None,
        }
    }
}

/// The failure an answer's head reports, if it is one a retry could cure.
pub fn classify_answer(status: StatusCode, headers: &HeaderMap) -> Option<Failure> {
    if let Some(kind) = headers.get(DENIED_HEADER) {
        // The callee's sidecar refused or could not serve the call. Only "could not serve" is
        // worth another attempt; a refusal names a rule and would refuse again.
        return match kind.as_bytes() {
            k if k == Kind::Upstream.name().as_bytes() => Some(Failure::of(RetryOn::GatewayError)),
            k if k == Kind::NotReady.name().as_bytes() => Some(Failure::of(RetryOn::Unavailable)),
            _ => None,
        };
    }
    let class = match status {
        StatusCode::SERVICE_UNAVAILABLE => RetryOn::Unavailable,
        StatusCode::TOO_MANY_REQUESTS => RetryOn::RateLimited,
        StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => RetryOn::GatewayError,
        _ => return None,
    };
    Some(Failure {
        class,
        retry_after: retry_after(headers),
    })
}

/// The failure a send error is. `per_try` says whether the attempt's timeout was the per-try
/// one (a `Timeout` failure) or the call's whole time (final: nothing is left to retry in).
pub fn classify_error(e: &ForwardError, per_try: bool) -> Option<Failure> {
    match e {
        ForwardError::Connect { .. } | ForwardError::Tls { .. } | ForwardError::MeshTls(_) => {
            Some(Failure::of(RetryOn::ConnectFailure))
        }
        ForwardError::Upstream { .. } => Some(Failure::of(RetryOn::GatewayError)),
        ForwardError::Timeout { .. } if per_try => Some(Failure::of(RetryOn::Timeout)),
        ForwardError::Timeout { .. } => None,
    }
}

/// `Retry-After` in delta seconds; an HTTP date is not honoured (clocks differ).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

/// Whether `policy` retries `failure` of a call that `idempotent` says can safely run twice.
pub fn retries(policy: &RetryPolicy, failure: Failure, idempotent: bool) -> bool {
    policy.retry_on.contains(&failure.class) && (idempotent || policy.non_idempotent)
}

/// The wait before retry `n` (1 for the first): full jitter, uniform in
/// `[0, min(max, base·2^(n-1)))` for a `jitter` drawn in `[0, 1)`, never less than the callee's
/// `Retry-After`.
pub fn backoff(
    policy: &RetryPolicy,
    n: u32,
    jitter: f64,
    retry_after: Option<Duration>,
) -> Duration {
    let exponent = n.saturating_sub(1).min(31);
    let base = Duration::from_millis(policy.backoff_base_millis);
    let max = Duration::from_millis(policy.backoff_max_millis.max(policy.backoff_base_millis));
    let bound = base.saturating_mul(1u32 << exponent).min(max);
    let drawn = bound.mul_f64(jitter.clamp(0.0, 1.0));
    retry_after.map_or(drawn, |floor| drawn.max(floor))
}

/// Whether an A2A call may run twice: everything but sending a message and creating a push
/// config. A request the sidecar cannot name counts as one that may not, unless it only reads.
pub fn agent_call_idempotent(http: &Method, method: Option<A2aMethod>) -> bool {
    match method {
        Some(A2aMethod::SendMessage | A2aMethod::SendStreamingMessage) => false,
        Some(A2aMethod::CreateTaskPushNotificationConfig) => false,
        Some(_) => true,
        None => is_safe(http),
    }
}

/// Whether an MCP request may run twice: anything but `tools/call` (a tool may act).
pub fn tool_call_idempotent(http: &Method, mcp_method: Option<&str>) -> bool {
    match mcp_method {
        Some("tools/call") => false,
        Some(_) => true,
        None => is_safe(http) || http == Method::DELETE,
    }
}

fn is_safe(m: &Method) -> bool {
    m == Method::GET || m == Method::HEAD || m == Method::OPTIONS
}

#[cfg(test)]
mod tests;
