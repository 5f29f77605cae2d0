//! Retries and agent fallback through real sidecars: a flaky callee is retried, a hard-down
//! one sees no more than the retry budget allows (counted at the callee), retries never reset
//! depth nor count twice against the rate limit, `SendMessage` is retried only when
//! configured, and a fallback agent takes a failed agent's calls only where policy permits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use http::{Method, StatusCode};
use ringfence_e2e::mesh::{Mesh, call, json_response, send_message};

const DELEGATES: &str = "\
apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: orchestrator-delegates}
spec:
  allow:
    - from: [orchestrator]
      agents: [research, writer]
";

fn agents(research: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("orchestrator", "  mayStartRuns: true"),
        ("research", research),
        ("writer", ""),
        ("critic", ""),
    ]
}

fn budget(spec: &str) -> String {
    format!(
        "---\napiVersion: ringfence.dev/v1alpha1\nkind: RunBudget\nmetadata: {{name: limits}}\nspec:\n{spec}"
    )
}

/// An A2A v1.0 `GetTask`: idempotent, so retried under the default policy.
fn get_task(id: u32) -> String {
    format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"GetTask","params":{{"id":"task-{id}"}}}}"#)
}

/// Makes `agent`'s app answer 503 to the requests `fails` says (by arrival number, from 0).
fn failing(mesh: &Mesh, agent: &str, fails: fn(u32) -> bool) -> Arc<AtomicU32> {
    let seen = Arc::new(AtomicU32::new(0));
    let counter = seen.clone();
    mesh.app(agent).on(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if fails(n) {
                json_response(StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"warming up"}"#)
            } else {
                json_response(
                    StatusCode::OK,
                    r#"{"jsonrpc":"2.0","id":1,"result":{"ok":true}}"#,
                )
            }
        }
    });
    seen
}

#[tokio::test]
async fn a_flaky_research_that_fails_once_is_retried_and_answers() {
    let mesh = Mesh::start(
        &agents(""),
        &format!("{DELEGATES}{}", budget("  retry: {maxAttempts: 3}\n")),
    )
    .await;
    failing(&mesh, "research", |n| n == 0);
    let r = call(
        mesh.outbound("orchestrator"),
        Method::POST,
        "/agents/research/",
        &[],
        &get_task(1),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(mesh.app("research").requests().len(), 2);
    assert_eq!(
        mesh.metric(
            "orchestrator",
            "ringfence_retries_total{callee=\"research\",outcome=\"answered\"}"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn send_message_is_not_retried_unless_the_policy_says_non_idempotent() {
    let mesh = Mesh::start(
        &agents(""),
        &format!("{DELEGATES}{}", budget("  retry: {}\n")),
    )
    .await;
    failing(&mesh, "research", |n| n <= 1);
    let out = mesh.outbound("orchestrator");
    let r = call(
        out,
        Method::POST,
        "/agents/research/",
        &[],
        &send_message(1, "go"),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(
        mesh.app("research").requests().len(),
        1,
        "a task may not run twice"
    );

    mesh.set_policies(&format!(
        "{DELEGATES}{}",
        budget("  retry: {nonIdempotent: true}\n")
    ))
    .await;
    let r = call(
        out,
        Method::POST,
        "/agents/research/",
        &[],
        &send_message(2, "go"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(mesh.app("research").requests().len(), 3);
}

#[tokio::test]
async fn a_403_from_the_callee_is_not_retried() {
    let mesh = Mesh::start(
        &agents(""),
        &format!("{DELEGATES}{}", budget("  retry: {maxAttempts: 5}\n")),
    )
    .await;
    mesh.app("research")
        .on(|_| async { json_response(StatusCode::FORBIDDEN, r#"{"error":"no"}"#) });
    let r = call(
        mesh.outbound("orchestrator"),
        Method::POST,
        "/agents/research/",
        &[],
        &get_task(1),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert_eq!(mesh.app("research").requests().len(), 1);
}

#[tokio::test]
async fn retries_never_reset_depth_nor_count_twice_against_the_rate_limit() {
    let research_may_delegate = "---\napiVersion: ringfence.dev/v1alpha1\nkind: AgentPolicy\nmetadata: {name: research-delegates}\nspec:\n  allow:\n    - from: [research]\n      agents: [writer]\n";
    let limits = budget(
        "  maxDelegationDepth: 1\n  perAgent: {invokeRateLimit: 2/min}\n  retry: {maxAttempts: 2}\n",
    );
    let mesh = Mesh::start(
        &agents(""),
        &format!("{DELEGATES}{research_may_delegate}{limits}"),
    )
    .await;
    // research fails every first attempt; on the retry it delegates to writer with the
    // context the retry brought, and answers with what writer's side said.
    let seen = Arc::new(AtomicU32::new(0));
    let outbound = mesh.outbound("research");
    let counter = seen.clone();
    mesh.app("research").on(move |r| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n.is_multiple_of(2) {
                return json_response(StatusCode::SERVICE_UNAVAILABLE, "{}");
            }
            let ctx = r.context().unwrap_or_default();
            let reply = call(
                outbound,
                Method::POST,
                "/agents/writer/",
                &[("ringfence-context", &ctx)],
                &get_task(9),
            )
            .await;
            let denied = reply
                .headers
                .get("ringfence-denied")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none")
                .to_owned();
            json_response(
                StatusCode::OK,
                &serde_json::json!({"jsonrpc": "2.0", "id": 1, "result": {"writer": denied, "message": reply.json()["error"]["message"]}}).to_string(),
            )
        }
    });
    let out = mesh.outbound("orchestrator");
    for id in 0..2 {
        let r = call(out, Method::POST, "/agents/research/", &[], &get_task(id)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        // The retried attempt still carries depth 1: research's own call would be depth 2.
        assert_eq!(r.json()["result"]["writer"], "depth", "{}", r.body);
    }
    assert_eq!(
        mesh.app("research").requests().len(),
        4,
        "two calls, two attempts each"
    );
    assert!(mesh.app("writer").requests().is_empty());
    // Two calls of 2/min were admitted, whatever their attempts: the third is refused here.
    let r = call(out, Method::POST, "/agents/research/", &[], &get_task(3)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.body);
    assert_eq!(r.headers["ringfence-denied"], "rate_limit");
    assert_eq!(mesh.app("research").requests().len(), 4);
}

#[tokio::test]
async fn a_hard_down_research_under_load_gets_at_most_the_budgeted_extra_traffic() {
    let (calls, percent, floor, window) = (500u64, 20u64, 1u64, 10u64);
    let retry = format!(
        "  retry: {{maxAttempts: 3, budgetPercent: {percent}, minRetriesPerSecond: {floor}, budgetWindowSeconds: {window}, backoffBaseMillis: 1, backoffMaxMillis: 5}}\n"
    );
    let mesh = Mesh::start(&agents(""), &format!("{DELEGATES}{}", budget(&retry))).await;
    failing(&mesh, "research", |_| true);
    let out = mesh.outbound("orchestrator");
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let next = Arc::new(AtomicU32::new(0));
    for _ in 0..20 {
        let next = next.clone();
        tasks.spawn(async move {
            loop {
                let id = next.fetch_add(1, Ordering::SeqCst);
                if u64::from(id) >= calls {
                    break;
                }
                let r = call(out, Method::POST, "/agents/research/", &[], &get_task(id)).await;
                assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let took = started.elapsed();
    let received = mesh.app("research").requests().len() as u64;
    // Every second the run touched, and the one on each side, may sit in a new window.
    let seconds = took.as_secs() + 2;
    let bound = calls + calls * percent / 100 + floor * window * seconds.div_ceil(window);
    eprintln!(
        "{calls} calls to a hard-down callee in {took:?}: it received {received} requests (bound {bound}; without a budget up to {})",
        calls * 3
    );
    assert!(received <= bound, "{received} > {bound}");
    assert!(received > calls, "some retries were made");
    assert!(
        mesh.metric(
            "orchestrator",
            "ringfence_retry_budget_exhausted_total{callee=\"research\"}"
        )
        .await
            > 0
    );
}

#[tokio::test]
async fn an_agent_fallback_answers_when_the_primary_is_down_and_policy_allows() {
    let mesh = Mesh::start(
        &agents("  appPort: 8080\n  fallback: writer"),
        &format!(
            "{DELEGATES}{}",
            budget("  retry: {maxAttempts: 2, nonIdempotent: true}\n")
        ),
    )
    .await;
    failing(&mesh, "research", |_| true);
    let r = call(
        mesh.outbound("orchestrator"),
        Method::POST,
        "/agents/research/",
        &[],
        &send_message(1, "find sources"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(mesh.app("research").requests().len(), 2);
    let got = mesh.app("writer").requests();
    assert_eq!(got.len(), 1, "writer took the call");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&got[0].body).unwrap()["method"],
        "SendMessage"
    );
    assert_eq!(
        mesh.metric(
            "orchestrator",
            "ringfence_fallbacks_total{from=\"research\",outcome=\"answered\",to=\"writer\"}"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn an_agent_fallback_is_refused_when_policy_does_not_allow_that_edge() {
    let mesh = Mesh::start(
        &agents("  appPort: 8080\n  fallback: critic"),
        &format!("{DELEGATES}{}", budget("  retry: {maxAttempts: 2}\n")),
    )
    .await;
    failing(&mesh, "research", |_| true);
    let r = call(
        mesh.outbound("orchestrator"),
        Method::POST,
        "/agents/research/",
        &[],
        &get_task(1),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    let note = r.headers["ringfence-fallback"].to_str().unwrap();
    assert!(note.starts_with("denied by default deny"), "{note}");
    assert!(mesh.app("critic").requests().is_empty());
    assert_eq!(mesh.app("research").requests().len(), 2);
}
