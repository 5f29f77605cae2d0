//! One call's attempts against a scripted callee, on tokio's paused clock.

use std::collections::VecDeque;
use std::time::Duration;

use http::{Response, StatusCode};
use ringfence_crds::retry::{RetryOn, RetryPolicy};
use tokio::time::Instant;

use super::*;

/// A callee answering with a script of statuses (then 200), recording when each attempt came.
struct Scripted {
    script: VecDeque<Result<(u16, Option<&'static str>), ()>>,
    sent: Vec<(u32, Instant, Duration)>,
    retried: Vec<u32>,
}

impl Scripted {
    fn new(script: &[Result<(u16, Option<&'static str>), ()>]) -> Self {
        Self {
            script: script.iter().copied().collect(),
            sent: Vec::new(),
            retried: Vec::new(),
        }
    }
}

impl Attempt for Scripted {
    type Body = ();

    fn send(&mut self, n: u32, timeout: Duration) -> impl Future<Output = Outcome<()>> + Send {
        self.sent.push((n, Instant::now(), timeout));
        let next = self.script.pop_front().unwrap_or(Ok((200, None)));
        async move {
            match next {
                Ok((status, retry_after)) => {
                    let mut r = Response::new(());
                    *r.status_mut() = StatusCode::from_u16(status).unwrap();
                    if let Some(secs) = retry_after {
                        r.headers_mut().insert("retry-after", secs.parse().unwrap());
                    }
                    Ok(r)
                }
                Err(()) => Err(ForwardError::Connect {
                    addr: "127.0.0.1:1".into(),
                    reason: "connection refused".into(),
                }),
            }
        }
    }

    fn retried(&mut self, n: u32, _outcome: &Outcome<()>) {
        self.retried.push(n);
    }
}

struct Fixture {
    budgets: RetryBudgets,
    metrics: Metrics,
}

impl Fixture {
    fn new() -> Self {
        Self {
            budgets: RetryBudgets::new(Instant::now().into_std()),
            metrics: Metrics::new().unwrap(),
        }
    }

    fn plan<'a>(&'a self, policy: Option<&'a RetryPolicy>, idempotent: bool) -> Plan<'a> {
        Plan {
            policy,
            idempotent,
            budgets: &self.budgets,
            callee: "research",
            deadline: Instant::now() + Duration::from_secs(60),
            metrics: &self.metrics,
        }
    }
}

fn status<B>(a: &Attempted<B>) -> u16 {
    a.last.as_ref().map_or(0, |r| r.status().as_u16())
}

#[tokio::test(start_paused = true)]
async fn a_flaky_upstream_that_fails_once_is_retried_and_succeeds() {
    let f = Fixture::new();
    let policy = RetryPolicy::default();
    let mut callee = Scripted::new(&[Ok((503, None))]);
    let done = run(&f.plan(Some(&policy), true), &mut callee).await;
    assert_eq!(status(&done), 200);
    assert_eq!(done.attempts, 2);
    assert_eq!(done.failure, None);
    assert_eq!(
        callee.retried,
        vec![1],
        "the failed attempt gets its own span"
    );
    let text = f.metrics.encode();
    assert!(
        text.contains("ringfence_retries_total{callee=\"research\",outcome=\"answered\"} 1"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_connect_failure_is_retried_up_to_max_attempts_then_handed_on() {
    let f = Fixture::new();
    let policy = RetryPolicy::default();
    let mut callee = Scripted::new(&[Err(()), Err(()), Err(()), Err(())]);
    let done = run(&f.plan(Some(&policy), true), &mut callee).await;
    assert!(done.last.is_err());
    assert_eq!(done.attempts, 3);
    assert_eq!(done.failure.map(|f| f.class), Some(RetryOn::ConnectFailure));
    assert_eq!(callee.sent.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn send_message_is_not_retried_unless_the_policy_says_non_idempotent() {
    let f = Fixture::new();
    let policy = RetryPolicy::default();
    let mut callee = Scripted::new(&[Ok((503, None))]);
    let done = run(&f.plan(Some(&policy), false), &mut callee).await;
    assert_eq!((status(&done), done.attempts), (503, 1));

    let policy = RetryPolicy {
        non_idempotent: true,
        ..RetryPolicy::default()
    };
    let mut callee = Scripted::new(&[Ok((503, None))]);
    let done = run(&f.plan(Some(&policy), false), &mut callee).await;
    assert_eq!((status(&done), done.attempts), (200, 2));
}

#[tokio::test(start_paused = true)]
async fn without_a_policy_there_is_one_attempt() {
    let f = Fixture::new();
    let mut callee = Scripted::new(&[Ok((503, None))]);
    let done = run(&f.plan(None, true), &mut callee).await;
    assert_eq!((status(&done), done.attempts), (503, 1));
    assert_eq!(done.failure.map(|f| f.class), Some(RetryOn::Unavailable));
}

#[tokio::test(start_paused = true)]
async fn a_429s_retry_after_is_a_floor_under_the_backoff() {
    let f = Fixture::new();
    let policy = RetryPolicy {
        backoff_base_millis: 10,
        backoff_max_millis: 20,
        ..RetryPolicy::default()
    };
    let mut callee = Scripted::new(&[Ok((429, Some("3")))]);
    let done = run(&f.plan(Some(&policy), true), &mut callee).await;
    assert_eq!(status(&done), 200);
    let waited = callee.sent[1].1 - callee.sent[0].1;
    assert!(
        waited >= Duration::from_secs(3) && waited < Duration::from_millis(3_030),
        "waited {waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_beyond_the_calls_time_ends_the_retries() {
    let f = Fixture::new();
    let policy = RetryPolicy::default();
    let mut callee = Scripted::new(&[Ok((429, Some("120")))]);
    let done = run(&f.plan(Some(&policy), true), &mut callee).await;
    assert_eq!((status(&done), done.attempts), (429, 1));
}

#[tokio::test(start_paused = true)]
async fn the_per_try_timeout_bounds_each_attempt_within_the_calls_time() {
    let f = Fixture::new();
    let policy = RetryPolicy {
        per_try_timeout_millis: Some(250),
        ..RetryPolicy::default()
    };
    let mut callee = Scripted::new(&[]);
    run(&f.plan(Some(&policy), true), &mut callee).await;
    assert_eq!(callee.sent[0].2, Duration::from_millis(250));
    let policy = RetryPolicy {
        per_try_timeout_millis: Some(120_000),
        ..RetryPolicy::default()
    };
    let mut callee = Scripted::new(&[]);
    run(&f.plan(Some(&policy), true), &mut callee).await;
    assert_eq!(
        callee.sent[0].2,
        Duration::from_secs(60),
        "the call's own time"
    );
}

#[tokio::test(start_paused = true)]
async fn a_spent_retry_budget_hands_the_failure_on_and_is_counted() {
    let f = Fixture::new();
    let policy = RetryPolicy {
        budget_percent: 0,
        min_retries_per_second: 1,
        budget_window_seconds: 1,
        ..RetryPolicy::default()
    };
    let mut first = Scripted::new(&[Ok((503, None))]);
    assert_eq!(
        run(&f.plan(Some(&policy), true), &mut first).await.attempts,
        2
    );
    let mut second = Scripted::new(&[Ok((503, None))]);
    let done = run(&f.plan(Some(&policy), true), &mut second).await;
    assert_eq!((status(&done), done.attempts), (503, 1));
    assert!(
        f.metrics
            .encode()
            .contains("ringfence_retry_budget_exhausted_total{callee=\"research\"} 1")
    );
}

#[tokio::test(start_paused = true)]
async fn a_hard_down_callee_under_load_sees_at_most_the_budgeted_extra_traffic() {
    let f = Fixture::new();
    let policy = RetryPolicy {
        max_attempts: 5,
        budget_percent: 20,
        min_retries_per_second: 2,
        budget_window_seconds: 10,
        backoff_base_millis: 1,
        backoff_max_millis: 1,
        ..RetryPolicy::default()
    };
    let calls = 500;
    let mut sent = 0;
    let started = Instant::now();
    for _ in 0..calls {
        let mut callee = Scripted::new(&[Ok((503, None)); 5]);
        run(&f.plan(Some(&policy), true), &mut callee).await;
        sent += callee.sent.len();
    }
    let seconds = started.elapsed().as_secs() + 1;
    let windows = seconds.div_ceil(10);
    let bound = calls + calls * 20 / 100 + 2 * 10 * windows as usize;
    assert!(
        sent <= bound,
        "{sent} requests for {calls} calls, bound {bound}"
    );
    assert!(sent > calls, "some retries were made");
}
