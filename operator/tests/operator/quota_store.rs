//! Windowed quotas in the budget store, proven against both backends (SQLite in a fresh file,
//! PostgreSQL in a fresh schema; see `budget_store.rs`). Times are passed in, so window
//! boundaries are tested at the millisecond.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ringfence::budget::quota::CounterId;
use ringfence::budget::{Amount, BudgetLimit, LeaseOutcome, RunStatus};
use ringfence_crds::budget::OnBreach;
use ringfence_crds::quota::{QuotaTerm, QuotaWindow};

use super::budget_store::fixtures::{Db, lease_id, limits, spend};

/// 2026-11-24T00:00:00Z.
const MIDNIGHT: u64 = 1_795_478_400_000;
const HOUR: u64 = 3_600_000;

/// `prod/daily#0`: 1,000 tokens a day per team.
fn daily_team(team: &str, on_breach: OnBreach) -> QuotaTerm {
    QuotaTerm {
        id: "prod/daily#0".to_owned(),
        key: format!("team:{team}"),
        window: QuotaWindow::Day,
        sliding: false,
        max_total_tokens: Some(1_000),
        max_cost_micros: None,
        on_breach,
        alert_webhook: None,
    }
}

fn tokens(n: u64) -> Amount {
    Amount {
        tokens: n,
        micros: 0,
    }
}

async fn open(store: &ringfence::budget::store::Store, run: &str, root: &str) {
    store
        .open_run(run, root, "ada", &limits(None, None, OnBreach::Halt), 1)
        .await
        .expect("open");
}

/// Leases `n` tokens under `quota` and reports them spent at `now`.
async fn spend_under(
    store: &ringfence::budget::store::Store,
    run: &str,
    agent: &str,
    quota: &QuotaTerm,
    n: u64,
    event: &str,
    now: u64,
) -> ringfence::budget::ReportOutcome {
    let lease = store
        .lease_under_quotas(run, agent, tokens(n), std::slice::from_ref(quota), now)
        .await
        .expect("lease");
    let lease = lease_id(&lease);
    store
        .report(&[spend(event, run, agent, Some(&lease), n, 0)], now)
        .await
        .expect("report")
}

async fn refused(
    store: &ringfence::budget::store::Store,
    run: &str,
    agent: &str,
    quota: &QuotaTerm,
    now: u64,
) -> bool {
    match store
        .lease_under_quotas(run, agent, tokens(10), std::slice::from_ref(quota), now)
        .await
        .expect("lease")
    {
        LeaseOutcome::QuotaExhausted { .. } => true,
        LeaseOutcome::Granted { .. } => false,
        other => panic!("unexpected lease outcome {other:?}"),
    }
}

pub mod scenarios {
    use super::*;

    pub async fn a_daily_team_quota_spent_by_one_run_refuses_the_teams_other_runs_until_midnight(
        db: Db,
    ) {
        let store = db.open().await;
        open(&store, "run-a", "researcher").await;
        open(&store, "run-b", "summarizer").await;
        open(&store, "run-c", "writer").await;
        let search = daily_team("search", OnBreach::HaltAndAlert);
        let docs = daily_team("docs", OnBreach::HaltAndAlert);
        let late = MIDNIGHT + 23 * HOUR;

        let first = spend_under(&store, "run-a", "researcher", &search, 600, "a1", late).await;
        assert!(first.quota_trips.is_empty(), "600 of 1,000 is not spent");
        let second = spend_under(&store, "run-a", "researcher", &search, 400, "a2", late).await;
        let [trip] = second.quota_trips.as_slice() else {
            panic!("the report that spent the quota trips it once: {second:?}");
        };
        assert_eq!(trip.counter, CounterId::of(&search));
        assert_eq!((trip.spent, trip.limit_value), (1_000, 1_000));
        assert_eq!(trip.limit, BudgetLimit::MaxTotalTokens);
        assert_eq!(trip.window_start_ms, MIDNIGHT);
        assert_eq!(
            store.quota_runs(&trip.counter).await.expect("runs"),
            vec!["run-a".to_owned()],
            "the open runs that spend under the quota are what its breach halts"
        );

        // Another agent of the same team, in another run: refused, and the breach was already
        // handled this window.
        match store
            .lease_under_quotas(
                "run-b",
                "summarizer",
                tokens(10),
                std::slice::from_ref(&search),
                late + 1,
            )
            .await
            .expect("lease")
        {
            LeaseOutcome::QuotaExhausted {
                counter,
                spent: true,
                trip: None,
                used: 1_000,
                limit_value: 1_000,
                ..
            } => assert_eq!(counter.to_string(), "quota prod/daily#0 team:search day"),
            other => panic!("run B should be refused by the team's quota: {other:?}"),
        }
        // Another team's counter of the same quota is untouched.
        assert!(!refused(&store, "run-c", "writer", &docs, late + 2).await);

        // The last millisecond of the day is still refused; midnight opens a new window.
        let next_midnight = MIDNIGHT + 24 * HOUR;
        assert!(refused(&store, "run-b", "summarizer", &search, next_midnight - 1).await);
        assert!(!refused(&store, "run-b", "summarizer", &search, next_midnight).await);
        store.close().await;
    }

    pub async fn a_spent_quota_stays_spent_after_the_store_is_reopened(db: Db) {
        let store = db.open().await;
        open(&store, "run-a", "researcher").await;
        open(&store, "run-b", "summarizer").await;
        let search = daily_team("search", OnBreach::Halt);
        let now = MIDNIGHT + HOUR;
        spend_under(&store, "run-a", "researcher", &search, 1_000, "a1", now).await;
        store.close().await;

        let reopened = db.open().await;
        assert!(refused(&reopened, "run-b", "summarizer", &search, now + 5).await);
        let usage = reopened.quota_usage(now + 5).await.expect("usage");
        let [line] = usage.as_slice() else {
            panic!("one counter: {usage:?}");
        };
        assert_eq!((line.tokens, line.exhausted), (1_000, true));
        assert_eq!(line.window_start_ms, MIDNIGHT);
        assert_eq!(line.window_end_ms, MIDNIGHT + 24 * HOUR);
        reopened.close().await;
    }

    pub async fn a_resent_batch_counts_once_toward_its_quota(db: Db) {
        let store = db.open().await;
        open(&store, "run-a", "researcher").await;
        let search = daily_team("search", OnBreach::Halt);
        let now = MIDNIGHT + HOUR;
        let lease = store
            .lease_under_quotas(
                "run-a",
                "researcher",
                tokens(300),
                std::slice::from_ref(&search),
                now,
            )
            .await
            .expect("lease");
        let lease = lease_id(&lease);
        let batch = [
            spend("r1", "run-a", "researcher", Some(&lease), 100, 0),
            spend("r2", "run-a", "researcher", Some(&lease), 200, 0),
        ];
        store.report(&batch, now).await.expect("report");
        let again = store.report(&batch, now + 1).await.expect("re-sent");
        assert_eq!(again.duplicates, 2);
        let usage = store.quota_usage(now + 2).await.expect("usage");
        assert_eq!(usage[0].tokens, 300, "the re-sent batch counted once");
        assert_eq!(
            usage[0].outstanding,
            Amount::default(),
            "the lease is covered"
        );
        store.close().await;
    }

    pub async fn spend_in_a_sliding_hour_expires_a_full_hour_after_it_was_made(db: Db) {
        let store = db.open().await;
        open(&store, "run-a", "researcher").await;
        let mut hourly = daily_team("search", OnBreach::Halt);
        hourly.id = "prod/hourly#0".to_owned();
        hourly.window = QuotaWindow::Hour;
        hourly.sliding = true;
        let t0 = MIDNIGHT + 10 * HOUR + 30_000;
        spend_under(&store, "run-a", "researcher", &hourly, 1_000, "s1", t0).await;
        // A calendar hour would have reset at 11:00; the sliding one still holds it.
        assert!(
            refused(
                &store,
                "run-a",
                "researcher",
                &hourly,
                MIDNIGHT + 11 * HOUR + 1
            )
            .await
        );
        assert!(refused(&store, "run-a", "researcher", &hourly, t0 + HOUR - 1).await);
        // Within a bucket (a minute) of the full hour, the spend has expired.
        assert!(!refused(&store, "run-a", "researcher", &hourly, t0 + HOUR + 60_000).await);
        let usage = store.quota_usage(t0 + HOUR + 60_000).await.expect("usage");
        assert_eq!(usage[0].tokens, 0);
        assert_eq!(usage[0].counter.window, "sliding hour");
        store.close().await;
    }

    pub async fn concurrent_leases_of_many_runs_never_grant_a_quota_more_than_its_limit(db: Db) {
        // Two stores on one database: two budget service replicas.
        let replicas = [db.open().await, db.open().await];
        let search = daily_team("search", OnBreach::Halt);
        let now = MIDNIGHT + HOUR;
        for task in 0..8 {
            open(&replicas[0], &format!("run-{task}"), "researcher").await;
        }
        let granted = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..8u64 {
            let store = replicas[(task % 2) as usize].clone();
            let (granted, search) = (granted.clone(), search.clone());
            tasks.spawn(async move {
                loop {
                    let outcome = store
                        .lease_under_quotas(
                            &format!("run-{task}"),
                            "researcher",
                            tokens(37),
                            std::slice::from_ref(&search),
                            now,
                        )
                        .await
                        .expect("lease");
                    match outcome {
                        LeaseOutcome::Granted { granted: g, .. } => {
                            granted.fetch_add(g.tokens, Ordering::SeqCst);
                        }
                        LeaseOutcome::QuotaExhausted { spent: false, .. } => return,
                        other => panic!("unexpected lease outcome {other:?}"),
                    }
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("a leasing task");
        }
        assert_eq!(
            granted.load(Ordering::SeqCst),
            1_000,
            "outstanding leases reserve the whole quota, never more"
        );
        let usage = replicas[0].quota_usage(now).await.expect("usage");
        assert_eq!(usage[0].outstanding.tokens, 1_000);
        assert!(usage[0].exhausted, "promised to leases, nothing is left");
        // Leases nobody reports or gives back stop reserving after a while (a sidecar keeps a
        // finished run's rest): the quota's room comes back.
        let later = now + ringfence::budget::store::LEASE_HOLD_MS + 1;
        let usage = replicas[0].quota_usage(later).await.expect("usage");
        assert_eq!(usage[0].outstanding.tokens, 0);
        assert!(!refused(&replicas[0], "run-0", "researcher", &search, later).await);
        for r in &replicas {
            r.close().await;
        }
    }

    pub async fn a_halted_run_is_not_among_the_runs_a_quota_breach_halts(db: Db) {
        let store = db.open().await;
        open(&store, "run-a", "researcher").await;
        open(&store, "run-b", "researcher").await;
        let search = daily_team("search", OnBreach::Halt);
        let now = MIDNIGHT + HOUR;
        spend_under(&store, "run-a", "researcher", &search, 100, "a1", now).await;
        spend_under(&store, "run-b", "researcher", &search, 100, "b1", now).await;
        store.halt("run-a", "operator", now).await.expect("halt");
        let counter = CounterId::of(&search);
        assert_eq!(
            store.quota_runs(&counter).await.expect("runs"),
            vec!["run-b".to_owned()]
        );
        let detail = store.get_run("run-a").await.expect("get").expect("run");
        assert_eq!(detail.summary.run.status, RunStatus::Halted);
        store.close().await;
    }
}

macro_rules! quota_suite {
    ($backend:ident => $db:expr) => {
        mod $backend {
            quota_suite!(@tests $db;
                a_daily_team_quota_spent_by_one_run_refuses_the_teams_other_runs_until_midnight,
                a_spent_quota_stays_spent_after_the_store_is_reopened,
                a_resent_batch_counts_once_toward_its_quota,
                spend_in_a_sliding_hour_expires_a_full_hour_after_it_was_made,
                concurrent_leases_of_many_runs_never_grant_a_quota_more_than_its_limit,
                a_halted_run_is_not_among_the_runs_a_quota_breach_halts,
            );
        }
    };
    (@tests $db:expr; $($scenario:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                super::scenarios::$scenario($db.await).await;
            }
        )*
    };
}

quota_suite!(sqlite => super::super::budget_store::fixtures::Db::sqlite());
quota_suite!(postgres => super::super::budget_store::fixtures::Db::postgres());
