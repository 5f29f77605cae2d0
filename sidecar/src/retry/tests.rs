//! Which failures are retried, the backoff schedule, and which calls may run twice.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, StatusCode};
use ringfence_crds::retry::{RetryOn, RetryPolicy};

use super::*;

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_static(v));
    }
    h
}

#[test]
fn a_503_a_429_and_gateway_errors_are_failures_a_retry_may_cure() {
    let none = HeaderMap::new();
    let class = |s: u16| classify_answer(StatusCode::from_u16(s).unwrap(), &none).map(|f| f.class);
    assert_eq!(class(503), Some(RetryOn::Unavailable));
    assert_eq!(class(429), Some(RetryOn::RateLimited));
    assert_eq!(class(502), Some(RetryOn::GatewayError));
    assert_eq!(class(504), Some(RetryOn::GatewayError));
    for ok_or_final in [200, 201, 400, 403, 404, 500, 508] {
        assert_eq!(class(ok_or_final), None, "{ok_or_final}");
    }
}

#[test]
fn a_refusal_by_the_callees_sidecar_is_never_retried() {
    for kind in [
        "policy",
        "depth",
        "cycle",
        "rate_limit",
        "budget",
        "context",
        "timeout",
    ] {
        let h = headers(&[("ringfence-denied", kind), ("ringfence-rule", "some/rule")]);
        for status in [403, 429, 503, 504, 508, 402] {
            assert_eq!(
                classify_answer(StatusCode::from_u16(status).unwrap(), &h),
                None,
                "{kind} {status}"
            );
        }
    }
    // The callee's sidecar could not reach its app, or is not ready: worth another attempt.
    let upstream = headers(&[("ringfence-denied", "upstream")]);
    assert_eq!(
        classify_answer(StatusCode::BAD_GATEWAY, &upstream).map(|f| f.class),
        Some(RetryOn::GatewayError)
    );
    let not_ready = headers(&[("ringfence-denied", "not_ready")]);
    assert_eq!(
        classify_answer(StatusCode::SERVICE_UNAVAILABLE, &not_ready).map(|f| f.class),
        Some(RetryOn::Unavailable)
    );
}

#[test]
fn retry_after_in_seconds_is_read_and_an_http_date_is_not() {
    let h = headers(&[("retry-after", "7")]);
    assert_eq!(
        classify_answer(StatusCode::TOO_MANY_REQUESTS, &h)
            .unwrap()
            .retry_after,
        Some(Duration::from_secs(7))
    );
    let date = headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]);
    assert_eq!(retry_after(&date), None);
    let huge = headers(&[("retry-after", "99999999")]);
    assert_eq!(retry_after(&huge), Some(Duration::from_secs(3_600)));
}

#[test]
fn connect_failures_and_per_try_timeouts_are_retryable_but_the_calls_own_timeout_is_not() {
    let connect = ForwardError::Connect {
        addr: "127.0.0.1:1".into(),
        reason: "refused".into(),
    };
    assert_eq!(
        classify_error(&connect, false).map(|f| f.class),
        Some(RetryOn::ConnectFailure)
    );
    let timeout = ForwardError::Timeout {
        target: "research".into(),
        after: Duration::from_secs(1),
    };
    assert_eq!(
        classify_error(&timeout, true).map(|f| f.class),
        Some(RetryOn::Timeout)
    );
    assert_eq!(classify_error(&timeout, false), None);
}

#[test]
fn backoff_is_full_jitter_under_a_doubling_cap_with_retry_after_as_a_floor() {
    let p = RetryPolicy {
        backoff_base_millis: 100,
        backoff_max_millis: 1_000,
        ..RetryPolicy::default()
    };
    let ceil: Vec<u64> = (1..=6)
        .map(|n| backoff(&p, n, 1.0, None).as_millis() as u64)
        .collect();
    assert_eq!(ceil, vec![100, 200, 400, 800, 1_000, 1_000]);
    assert_eq!(backoff(&p, 3, 0.0, None), Duration::ZERO);
    assert_eq!(backoff(&p, 3, 0.5, None), Duration::from_millis(200));
    assert_eq!(
        backoff(&p, 1, 0.5, Some(Duration::from_secs(2))),
        Duration::from_secs(2)
    );
    assert_eq!(backoff(&p, 1_000, 1.0, None), Duration::from_secs(1));
}

#[test]
fn send_message_is_not_idempotent_and_get_task_and_card_fetches_are() {
    use A2aMethod::*;
    assert!(!agent_call_idempotent(&Method::POST, Some(SendMessage)));
    assert!(!agent_call_idempotent(
        &Method::POST,
        Some(SendStreamingMessage)
    ));
    assert!(agent_call_idempotent(&Method::POST, Some(GetTask)));
    assert!(agent_call_idempotent(&Method::GET, None), "an agent card");
    assert!(
        !agent_call_idempotent(&Method::POST, None),
        "an unknown POST"
    );
    assert!(!tool_call_idempotent(&Method::POST, Some("tools/call")));
    assert!(tool_call_idempotent(&Method::POST, Some("tools/list")));
    assert!(tool_call_idempotent(&Method::DELETE, None));
}

#[test]
fn a_policy_retries_a_non_idempotent_call_only_when_configured() {
    let unavailable = Failure {
        class: RetryOn::Unavailable,
        retry_after: None,
    };
    let p = RetryPolicy::default();
    assert!(retries(&p, unavailable, true));
    assert!(!retries(&p, unavailable, false));
    let p = RetryPolicy {
        non_idempotent: true,
        ..p
    };
    assert!(retries(&p, unavailable, false));
    let gateway = Failure {
        class: RetryOn::GatewayError,
        retry_after: None,
    };
    assert!(!retries(&p, gateway, true), "not in the default retryOn");
}
