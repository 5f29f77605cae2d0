//! One call's attempts: send, read the answer's head, and either hand it on or — when the
//! policy retries that failure, attempts remain, the call's time allows the backoff and the
//! retry budget has a retry left — wait and send again.
//!
//! The call was admitted (policy, depth, rate limit) once, before its first attempt; nothing
//! here decides or counts those again. Each attempt is sent by an [`Attempt`], which gives it
//! its own span and records the ones that failed.

use std::future::Future;
use std::time::Duration;

use http::Response;
use ringfence_crds::retry::RetryPolicy;
use tokio::time::Instant;

use super::{Failure, RetryBudgets, backoff, classify_answer, classify_error, retries};
use crate::forward::ForwardError;
use crate::metrics::Metrics;

/// What an attempt came back with.
pub type Outcome<B> = Result<Response<B>, ForwardError>;

/// Sends one attempt of a call; the call's body is in memory, so every attempt replays it.
pub trait Attempt {
    type Body;
    /// Sends attempt `n` (1 for the first), waiting at most `timeout` for the answer's head.
    fn send(
        &mut self,
        n: u32,
        timeout: Duration,
    ) -> impl Future<Output = Outcome<Self::Body>> + Send;
    /// Attempt `n` failed with `outcome` and another follows: record it (its span).
    fn retried(&mut self, n: u32, outcome: &Outcome<Self::Body>);
}

/// How a call is attempted.
pub struct Plan<'a> {
    /// `None`: one attempt.
    pub policy: Option<&'a RetryPolicy>,
    /// Whether the call may run twice (see [`super::agent_call_idempotent`]).
    pub idempotent: bool,
    pub budgets: &'a RetryBudgets,
    /// The callee as the bundle names it: the budget's key and the metrics label.
    pub callee: &'a str,
    /// When the call's whole time is up.
    pub deadline: Instant,
    pub metrics: &'a Metrics,
}

/// How the attempts ended.
pub struct Attempted<B> {
    /// The last attempt's outcome, which the app gets.
    pub last: Outcome<B>,
    pub attempts: u32,
    /// The last outcome as a failure a retry could have cured, if it is one.
    pub failure: Option<Failure>,
}

/// Attempts the call as `plan` says.
pub async fn run<A: Attempt>(plan: &Plan<'_>, attempt: &mut A) -> Attempted<A::Body> {
    if let Some(policy) = plan.policy {
        plan.budgets
            .deposit(plan.callee, policy, Instant::now().into_std());
    }
    let mut n = 1;
    loop {
        let left = plan.deadline.saturating_duration_since(Instant::now());
        let per_try = plan
            .policy
            .and_then(|p| p.per_try_timeout_millis)
            .map(Duration::from_millis)
            .filter(|t| *t < left);
        let out = attempt.send(n, per_try.unwrap_or(left)).await;
        let failure = match &out {
            Ok(r) => classify_answer(r.status(), r.headers()),
            Err(e) => classify_error(e, per_try.is_some()),
        };
        if n > 1 {
            let outcome = if failure.is_some() {
                "failed"
            } else {
                "answered"
            };
            plan.metrics.retried(plan.callee, outcome);
        }
        let done = |last| Attempted {
            last,
            attempts: n,
            failure,
        };
        let (Some(policy), Some(f)) = (plan.policy, failure) else {
            return done(out);
        };
        if n >= policy.max_attempts || !retries(policy, f, plan.idempotent) {
            return done(out);
        }
        let wait = backoff(policy, n, crate::backoff::jitter(), f.retry_after);
        if Instant::now() + wait >= plan.deadline {
            // No time left for another attempt after the wait: the app gets this answer now.
            return done(out);
        }
        if !plan
            .budgets
            .withdraw(plan.callee, policy, Instant::now().into_std())
        {
            plan.metrics.retry_budget_exhausted(plan.callee);
            return done(out);
        }
        attempt.retried(n, &out);
        drop(out);
        tokio::time::sleep(wait).await;
        n += 1;
    }
}

#[cfg(test)]
mod tests;
