//! RunBudget `status.quotas` against a fake API server: the counters read from the budget
//! service land in the status of the RunBudget that declares them, once.

use std::sync::Arc;

use http::Method;
use serde_json::{Value, json};

use super::fixtures::*;
use super::index::Kind;
use super::quotas::{self, BudgetQuotas, Known};
use super::reconcile::reconcile;
use crate::budget::Amount;
use crate::budget::quota::{CounterId, QuotaStatus};

const DAILY_STATUS: &str =
    "/apis/ringfence.dev/v1alpha1/namespaces/default/runbudgets/daily/status";
/// 2026-11-24T00:00:00Z.
const MIDNIGHT_MS: u64 = 1_795_478_400_000;

fn counter(id: &str, key: &str, tokens: u64, exhausted: bool) -> QuotaStatus {
    QuotaStatus {
        counter: CounterId {
            id: id.to_owned(),
            key: key.to_owned(),
            window: "day".to_owned(),
        },
        window_start_ms: MIDNIGHT_MS,
        window_end_ms: MIDNIGHT_MS + 86_400_000,
        tokens,
        micros: 1_500_000,
        max_tokens: Some(1_000),
        max_micros: None,
        outstanding: Amount::default(),
        on_breach: Default::default(),
        exhausted,
    }
}

/// What the budget service answers: the team quota of `default/daily` for two teams (listed
/// out of order), and a counter of another namespace's RunBudget.
fn counters() -> Known {
    Some(Arc::new(quotas::group(&[
        counter("default/daily#0", "team:search", 1_000, true),
        counter("other/daily#0", "team:search", 5, false),
        counter("default/daily#0", "team:docs", 40, false),
    ])))
}

fn daily(generation: i64) -> kube::api::DynamicObject {
    budget(
        "daily",
        generation,
        json!({"quotas": [{"per": "Team", "window": "Day", "maxTotalTokens": 1000}]}),
    )
}

/// One reconcile of `obj` with `known` counters; the requests the fake API saw.
async fn reconcile_daily(obj: kube::api::DynamicObject, known: Known) -> Vec<Seen> {
    let mut cluster = Cluster::new();
    let outcome = cluster.project(&[(Kind::RunBudget, obj.clone())]);
    let (client, api) = FakeApi::new().start();
    reconcile(
        Kind::RunBudget,
        Arc::new(obj),
        ctx_with_quotas(client, outcome, known),
    )
    .await
    .unwrap();
    requests(api).await
}

#[tokio::test]
async fn a_run_budget_status_carries_its_own_quota_counters_sorted() {
    let seen = reconcile_daily(daily(1), counters()).await;
    let status = &seen
        .to(Method::PATCH, DAILY_STATUS)
        .expect("status written")
        .body["status"];
    assert_eq!(
        status["quotas"],
        json!([
            {"id": "default/daily#0", "key": "team:docs", "window": "day",
             "windowStart": "2026-11-24T00:00:00Z", "tokens": 40, "costUsd": "1.50",
             "exhausted": false},
            {"id": "default/daily#0", "key": "team:search", "window": "day",
             "windowStart": "2026-11-24T00:00:00Z", "tokens": 1000, "costUsd": "1.50",
             "exhausted": true},
        ]),
        "only default/daily's counters, by key"
    );
}

#[tokio::test]
async fn the_same_quota_counters_twice_write_nothing() {
    let first = reconcile_daily(daily(1), counters()).await;
    let status = first.to(Method::PATCH, DAILY_STATUS).unwrap().body["status"].clone();

    let again = reconcile_daily(with_status(daily(1), status.clone()), counters()).await;
    assert!(
        again.writes().is_empty(),
        "same counters, nothing written: {:?}",
        again.writes()
    );

    // New spend is a write, of the new figure.
    let mut more = counters().unwrap().as_ref().clone();
    more.values_mut().for_each(|l| l[0].tokens = 41);
    let moved = reconcile_daily(with_status(daily(1), status), Some(Arc::new(more))).await;
    let written = &moved.to(Method::PATCH, DAILY_STATUS).expect("a write").body;
    assert_eq!(written["status"]["quotas"][0]["tokens"], 41);
}

#[tokio::test]
async fn unknown_quota_counters_leave_the_status_as_it_is() {
    let first = reconcile_daily(daily(1), counters()).await;
    let status = first.to(Method::PATCH, DAILY_STATUS).unwrap().body["status"].clone();

    // No read has succeeded (the budget service is down since the operator started).
    let seen = reconcile_daily(with_status(daily(1), status.clone()), None).await;
    assert!(seen.writes().is_empty(), "{:?}", seen.writes());

    // A new generation is written with the counters the status already had.
    let seen = reconcile_daily(with_status(daily(2), status.clone()), None).await;
    let written = &seen.to(Method::PATCH, DAILY_STATUS).expect("a write").body;
    assert_eq!(written["status"]["observedGeneration"], 2);
    assert_eq!(written["status"]["quotas"], status["quotas"]);
}

#[tokio::test]
async fn a_run_budget_whose_counters_are_gone_drops_its_quotas() {
    let first = reconcile_daily(daily(1), counters()).await;
    let status = first.to(Method::PATCH, DAILY_STATUS).unwrap().body["status"].clone();

    let none = Some(Arc::new(quotas::Usages::new()));
    let seen = reconcile_daily(with_status(daily(1), status), none).await;
    let written = &seen.to(Method::PATCH, DAILY_STATUS).expect("a write").body;
    assert_eq!(written["status"].get("quotas"), None::<&Value>);
}

#[tokio::test]
async fn a_failed_read_keeps_the_last_counters_known() {
    let identity = Arc::new(
        crate::identity::Identity::generate(
            Default::default(),
            "test",
            std::time::Duration::from_secs(3600),
        )
        .unwrap()
        .0,
    );
    // Nothing listens there: every read fails.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "https://localhost:{}",
        listener.local_addr().unwrap().port()
    );
    drop(listener);
    let source = BudgetQuotas::new(&url, identity, "ringfence-system").unwrap();
    let (tx, mut rx) = tokio::sync::watch::channel(counters());
    let tx = Arc::new(tx);
    rx.mark_unchanged();
    let reader = tokio::spawn(quotas::poll(source, tx.clone()));
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    reader.abort();
    assert!(!rx.has_changed().unwrap(), "no counters published");
    assert_eq!(*rx.borrow(), counters());
}

#[test]
fn counters_of_no_run_budget_are_skipped() {
    let usages = quotas::group(&[
        counter("no-hash", "team:a", 1, false),
        counter("no-namespace#0", "team:a", 1, false),
        counter("prod/daily#1", "team:a", 1, false),
    ]);
    assert_eq!(
        usages.keys().collect::<Vec<_>>(),
        [&("prod".to_owned(), "daily".to_owned())]
    );
}

#[test]
fn a_budget_url_must_be_https() {
    let identity = Arc::new(
        crate::identity::Identity::generate(
            Default::default(),
            "test",
            std::time::Duration::from_secs(3600),
        )
        .unwrap()
        .0,
    );
    let err = BudgetQuotas::new(
        "http://ringfence-budget:15013",
        identity,
        "ringfence-system",
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("HTTPS only"), "{err}");
}
