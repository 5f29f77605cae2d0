//! The budget store's contract, proven the same way against both backends: SQLite in a fresh
//! file, and PostgreSQL in a fresh schema of the server at `RINGFENCE_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`; `hack/ensure-postgres.sh` starts one). The
//! PostgreSQL tests fail, never skip, when the server is down.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ringfence::budget::store::{Store, StoreError};
use ringfence::budget::{
    Amount, BudgetLimit, Decision, DenialKey, EdgeKind, HaltOutcome, LeaseOutcome, ReleaseOutcome,
    RunFilter, RunStatus,
};
use ringfence_crds::budget::OnBreach;

pub(crate) mod fixtures {
    use std::path::PathBuf;
    use std::time::Duration;

    use ringfence::budget::store::Store;
    use ringfence::budget::{Decision, EdgeEvent, EdgeKind, LeaseOutcome, RunLimits, SpendEvent};
    use ringfence_crds::budget::OnBreach;
    use sqlx::Connection;

    pub const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";

    /// A database of its own for one test.
    pub enum Db {
        Sqlite {
            _dir: tempfile::TempDir,
            path: PathBuf,
        },
        Postgres {
            admin_url: String,
            schema: String,
        },
    }

    impl Db {
        pub async fn sqlite() -> Db {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let path = dir.path().join("budget.db");
            Db::Sqlite { _dir: dir, path }
        }

        /// A fresh schema, so parallel test processes never see each other's rows.
        pub async fn postgres() -> Db {
            let admin_url = std::env::var("RINGFENCE_TEST_POSTGRES")
                .unwrap_or_else(|_| DEFAULT_POSTGRES.to_owned());
            let schema = format!("rf_test_{}", ulid::Ulid::new().to_string().to_lowercase());
            let mut conn = admin(&admin_url).await;
            sqlx::query(&format!("CREATE SCHEMA {schema}"))
                .execute(&mut conn)
                .await
                .expect("creating a test schema");
            Db::Postgres { admin_url, schema }
        }

        /// What `Store::open` takes; also what a re-executed writer process opens.
        pub fn url(&self) -> String {
            match self {
                Db::Sqlite { path, .. } => format!("sqlite://{}", path.display()),
                Db::Postgres { admin_url, schema } => {
                    let sep = if admin_url.contains('?') { '&' } else { '?' };
                    format!("{admin_url}{sep}options=-c%20search_path%3D{schema}")
                }
            }
        }

        pub async fn open(&self) -> Store {
            Store::open(&self.url())
                .await
                .unwrap_or_else(|e| panic!("opening the store: {e}"))
        }

        /// Runs raw SQL against the test database (to fake what another binary left there).
        pub async fn raw(&self) -> sqlx::AnyConnection {
            sqlx::any::install_default_drivers();
            sqlx::AnyConnection::connect(&self.url())
                .await
                .expect("a raw connection to the test database")
        }
    }

    /// Drops a test's PostgreSQL schema, also when the test failed. Drop cannot await, so a
    /// thread of its own runs the statement.
    impl Drop for Db {
        fn drop(&mut self) {
            let Db::Postgres { admin_url, schema } = self else {
                return;
            };
            let (url, statement) = (admin_url.clone(), format!("DROP SCHEMA {schema} CASCADE"));
            let dropped = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(async {
                    let mut conn = sqlx::PgConnection::connect(&url)
                        .await
                        .map_err(|e| e.to_string())?;
                    // A failed test may still hold locks in the schema; never hang on them.
                    sqlx::query("SET lock_timeout = '5s'")
                        .execute(&mut conn)
                        .await
                        .map_err(|e| e.to_string())?;
                    sqlx::query(&statement)
                        .execute(&mut conn)
                        .await
                        .map_err(|e| e.to_string())
                })
            })
            .join();
            if let Ok(Err(e)) = dropped {
                eprintln!("leaving test schema behind: {e}");
            }
        }
    }

    async fn admin(url: &str) -> sqlx::PgConnection {
        let connect = sqlx::PgConnection::connect(url);
        match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => panic!(
                "PostgreSQL is unreachable at {url}: {e}. Run hack/ensure-postgres.sh, or point \
                 RINGFENCE_TEST_POSTGRES at a server where this user may create schemas."
            ),
            Err(_) => panic!(
                "PostgreSQL at {url} did not answer within 10s. Run hack/ensure-postgres.sh, or \
                 point RINGFENCE_TEST_POSTGRES at a running server."
            ),
        }
    }

    pub fn limits(
        max_tokens: Option<u64>,
        max_micros: Option<u64>,
        on_breach: OnBreach,
    ) -> RunLimits {
        RunLimits {
            max_tokens,
            max_cost_micros: max_micros,
            deadline_ms: None,
            on_breach,
            budgets: vec!["default".to_owned()],
        }
    }

    pub fn spend(
        id: &str,
        run: &str,
        agent: &str,
        lease: Option<&str>,
        tokens: u64,
        micros: u64,
    ) -> SpendEvent {
        SpendEvent {
            event_id: id.to_owned(),
            run_id: run.to_owned(),
            agent: agent.to_owned(),
            lease_id: lease.map(str::to_owned),
            tokens_in: tokens / 2,
            tokens_out: tokens - tokens / 2,
            micros,
            calls: 1,
            model: Some("mock-1".to_owned()),
            estimated: false,
            at_ms: 1_000,
            // Attribution follows the agent's name in these fixtures: `w…` agents are workers.
            team: Some(
                if agent.starts_with('w') {
                    "workers"
                } else {
                    "research"
                }
                .to_owned(),
            ),
            environment: Some("prod".to_owned()),
            workflow: Some("default/limits".to_owned()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn edge(
        id: &str,
        run: &str,
        caller: &str,
        callee: &str,
        denied: Option<(&str, Option<&str>)>,
        depth: u32,
        tokens: u64,
        at_ms: u64,
    ) -> EdgeEvent {
        EdgeEvent {
            event_id: id.to_owned(),
            run_id: run.to_owned(),
            caller: caller.to_owned(),
            callee: callee.to_owned(),
            kind: EdgeKind::Agent,
            decision: match denied {
                None => Decision::Allowed,
                Some((reason, _)) => Decision::Denied(reason.to_owned()),
            },
            rule: denied.and_then(|(_, rule)| rule.map(str::to_owned)),
            depth,
            latency_us: 100,
            tokens_in: tokens,
            tokens_out: 0,
            micros: tokens * 10,
            at_ms,
            trace_id: "0af7651916cd43dd8448eb211c80319c".to_owned(),
            span_id: format!(
                "{:016x}",
                id.bytes().fold(7u64, |h, b| h * 31 + u64::from(b))
            ),
            parent_call: None,
            root: String::new(),
            user: String::new(),
            operation: None,
            cycle: false,
            tainted: false,
            status: None,
        }
    }

    pub fn lease_id(outcome: &LeaseOutcome) -> String {
        match outcome {
            LeaseOutcome::Granted { lease_id, .. } => lease_id.clone(),
            other => panic!("expected a grant, got {other:?}"),
        }
    }
}

use fixtures::{Db, edge, lease_id, limits, spend};

mod scenarios {
    use super::*;

    pub async fn concurrent_leasers_never_get_more_than_the_limit(db: Db) {
        const MAX_TOKENS: u64 = 6_000;
        const MAX_MICROS: u64 = 400_000;
        // Two stores on one database: two budget service replicas.
        let replicas = [db.open().await, db.open().await];
        replicas[0]
            .open_run(
                "run-c",
                "orchestrator",
                "ada",
                &limits(Some(MAX_TOKENS), Some(MAX_MICROS), OnBreach::HaltAndAlert),
                1,
            )
            .await
            .expect("open");

        let granted_tokens = Arc::new(AtomicU64::new(0));
        let granted_micros = Arc::new(AtomicU64::new(0));
        let returned_tokens = Arc::new(AtomicU64::new(0));
        let returned_micros = Arc::new(AtomicU64::new(0));
        let mut tasks = tokio::task::JoinSet::new();
        for task in 0..8u64 {
            let store = replicas[(task % 2) as usize].clone();
            let (gt, gm, rt, rm) = (
                granted_tokens.clone(),
                granted_micros.clone(),
                returned_tokens.clone(),
                returned_micros.clone(),
            );
            tasks.spawn(async move {
                for i in 0..200u64 {
                    let want = Amount {
                        tokens: 40 + (task * 7 + i * 13) % 80,
                        micros: 3_000 + (task * 11 + i * 17) % 5_000,
                    };
                    let outcome = store
                        .lease("run-c", &format!("agent-{task}"), want, 10 + i)
                        .await
                        .expect("lease");
                    let granted = match outcome {
                        LeaseOutcome::Granted { granted, lease_id } => (granted, lease_id),
                        LeaseOutcome::Exhausted { .. } => return,
                        other => panic!("unexpected lease outcome {other:?}"),
                    };
                    let (granted, lease) = granted;
                    assert!(granted.tokens <= want.tokens && granted.micros <= want.micros);
                    gt.fetch_add(granted.tokens, Ordering::SeqCst);
                    gm.fetch_add(granted.micros, Ordering::SeqCst);
                    // Every third call spends everything it leased; the others leave some.
                    let spent = if i % 3 == 0 {
                        granted
                    } else {
                        Amount {
                            tokens: granted.tokens * 2 / 3,
                            micros: granted.micros / 2,
                        }
                    };
                    let mut event = spend(
                        &format!("c-{task}-{i}"),
                        "run-c",
                        &format!("agent-{task}"),
                        Some(&lease),
                        spent.tokens,
                        spent.micros,
                    );
                    event.at_ms = 10 + i;
                    let report = store.report(&[event], 10 + i).await.expect("report");
                    assert_eq!(report.accepted, 1);
                    assert!(
                        report.breaches.is_empty(),
                        "leased spend breached: {report:?}"
                    );
                    let unused = Amount {
                        tokens: granted.tokens - spent.tokens,
                        micros: granted.micros - spent.micros,
                    };
                    match store
                        .release(&lease, unused, 10 + i)
                        .await
                        .expect("release")
                    {
                        ReleaseOutcome::Released { returned } => {
                            assert_eq!(returned, unused);
                            rt.fetch_add(returned.tokens, Ordering::SeqCst);
                            rm.fetch_add(returned.micros, Ordering::SeqCst);
                        }
                        other => panic!("unexpected release outcome {other:?}"),
                    }
                }
            });
        }
        // An auditor reads committed snapshots all along: reported plus leased never passes the
        // limit.
        let auditor = {
            let store = replicas[1].clone();
            tokio::spawn(async move {
                let mut reads = 0u32;
                loop {
                    let run = store.get_run("run-c").await.expect("get_run").expect("run");
                    let s = &run.summary;
                    assert!(
                        s.spent.tokens() + s.outstanding.tokens <= MAX_TOKENS,
                        "tokens overshoot: {s:?}"
                    );
                    assert!(
                        s.spent.micros + s.outstanding.micros <= MAX_MICROS,
                        "cost overshoot: {s:?}"
                    );
                    reads += 1;
                    if reads > 10_000 {
                        return;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            })
        };
        while let Some(done) = tasks.join_next().await {
            done.expect("a leasing task panicked");
        }
        auditor.abort();
        if let Err(e) = auditor.await
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }

        let run = replicas[0]
            .get_run("run-c")
            .await
            .expect("get_run")
            .expect("run");
        let s = &run.summary;
        assert_eq!(
            s.run.status,
            RunStatus::Running,
            "a leased run never breaches"
        );
        assert_eq!(
            s.outstanding,
            Amount::default(),
            "every lease was reported and released"
        );
        assert!(s.spent.tokens() <= MAX_TOKENS && s.spent.micros <= MAX_MICROS);
        assert!(
            s.spent.tokens() + 200 > MAX_TOKENS || s.spent.micros + 10_000 > MAX_MICROS,
            "the leasers ran the budget down: {s:?}"
        );
        // Exact accounting: everything granted was either spent or given back.
        assert_eq!(
            granted_tokens.load(Ordering::SeqCst) - returned_tokens.load(Ordering::SeqCst),
            s.spent.tokens()
        );
        assert_eq!(
            granted_micros.load(Ordering::SeqCst) - returned_micros.load(Ordering::SeqCst),
            s.spent.micros
        );
        let by_agents: u64 = run.agents.iter().map(|a| a.spent.tokens()).sum();
        assert_eq!(
            by_agents,
            s.spent.tokens(),
            "per-agent spend adds up to the run's"
        );
        for store in &replicas {
            store.close().await;
        }
    }

    pub async fn a_resent_batch_is_not_counted_twice(db: Db) {
        let store = db.open().await;
        store
            .open_run(
                "run-r",
                "orchestrator",
                "ada",
                &limits(Some(10_000), None, OnBreach::Halt),
                1,
            )
            .await
            .expect("open");
        let lease = lease_id(
            &store
                .lease(
                    "run-r",
                    "research",
                    Amount {
                        tokens: 1_000,
                        micros: 0,
                    },
                    2,
                )
                .await
                .expect("lease"),
        );
        let batch = vec![
            spend("e1", "run-r", "research", Some(&lease), 100, 1_000),
            spend("e2", "run-r", "research", Some(&lease), 200, 2_000),
            spend("e3", "run-r", "writer", None, 300, 3_000),
        ];
        let first = store.report(&batch, 3).await.expect("report");
        assert_eq!((first.accepted, first.duplicates), (3, 0));
        let again = store.report(&batch, 4).await.expect("re-sent report");
        assert_eq!((again.accepted, again.duplicates), (0, 3));
        // A batch that repeats an event within itself, beside a new one.
        let mixed = vec![
            spend("e4", "run-r", "writer", None, 10, 10),
            spend("e4", "run-r", "writer", None, 10, 10),
            spend("e1", "run-r", "research", Some(&lease), 100, 1_000),
        ];
        let third = store.report(&mixed, 5).await.expect("mixed report");
        assert_eq!((third.accepted, third.duplicates), (1, 2));

        let run = store.get_run("run-r").await.expect("get_run").expect("run");
        assert_eq!(run.summary.spent.tokens(), 610);
        assert_eq!(run.summary.spent.micros, 6_010);
        assert_eq!(run.summary.spent.calls, 4);
        assert_eq!(
            run.summary.outstanding.tokens, 700,
            "the lease is covered once by e1 and e2"
        );
        let by_agent: BTreeMap<_, _> = run
            .agents
            .iter()
            .map(|a| (a.agent.as_str(), a.spent.tokens()))
            .collect();
        assert_eq!(
            by_agent,
            BTreeMap::from([("research", 300), ("writer", 310)])
        );

        // Spend for a run the store does not know is counted out, not recorded.
        let stray = store
            .report(&[spend("x1", "no-such-run", "research", None, 1, 1)], 6)
            .await
            .expect("stray report");
        assert_eq!((stray.accepted, stray.unknown_run), (0, 1));
        store.close().await;
    }

    pub async fn a_breach_by_reported_spend_halts_the_run_everywhere(db: Db) {
        let store = db.open().await;
        store
            .open_run(
                "run-b",
                "orchestrator",
                "ada",
                &limits(None, Some(1_000), OnBreach::HaltAndAlert),
                1,
            )
            .await
            .expect("open");
        let (before, cursor) = store.halts_since(0).await.expect("halts");
        assert!(before.is_empty());

        // Estimated spend outside any lease can pass the limit.
        let mut estimate = spend("b1", "run-b", "research", None, 10, 1_500);
        estimate.estimated = true;
        let report = store.report(&[estimate], 50).await.expect("report");
        assert_eq!(report.breaches.len(), 1);
        let breach = &report.breaches[0];
        assert_eq!(
            (
                breach.limit,
                breach.spent,
                breach.limit_value,
                breach.halted
            ),
            (BudgetLimit::MaxCostUsd, 1_500, 1_000, true)
        );

        let (halts, cursor) = store.halts_since(cursor).await.expect("halts");
        assert_eq!(halts.len(), 1);
        assert_eq!(halts[0].run_id, "run-b");
        assert_eq!(halts[0].at_ms, 50);
        assert!(
            halts[0].reason.contains("maxCostUsd"),
            "{}",
            halts[0].reason
        );
        assert_eq!(cursor, halts[0].seq);

        match store
            .lease(
                "run-b",
                "research",
                Amount {
                    tokens: 1,
                    micros: 1,
                },
                51,
            )
            .await
            .expect("lease")
        {
            LeaseOutcome::Halted { reason } => assert!(reason.contains("maxCostUsd"), "{reason}"),
            other => panic!("a halted run granted {other:?}"),
        }
        let run = store.get_run("run-b").await.expect("get_run").expect("run");
        assert_eq!(run.summary.run.status, RunStatus::Halted);
        assert_eq!(run.summary.run.halted_at_ms, Some(50));

        // Spend still in flight is recorded, but the breach is not reported again.
        let late = store
            .report(&[spend("b2", "run-b", "research", None, 10, 500)], 52)
            .await
            .expect("late report");
        assert_eq!((late.accepted, late.breaches.len()), (1, 0));
        assert!(store.halts_since(cursor).await.expect("halts").0.is_empty());

        // An AlertOnly run is told about the breach but keeps running; its leases are refused.
        store
            .open_run(
                "run-a",
                "orchestrator",
                "ada",
                &limits(Some(100), None, OnBreach::AlertOnly),
                60,
            )
            .await
            .expect("open");
        let report = store
            .report(&[spend("a1", "run-a", "writer", None, 150, 0)], 61)
            .await
            .expect("report");
        assert_eq!(report.breaches.len(), 1);
        assert!(!report.breaches[0].halted);
        assert_eq!(report.breaches[0].limit, BudgetLimit::MaxTotalTokens);
        assert!(store.halts_since(cursor).await.expect("halts").0.is_empty());
        match store
            .lease(
                "run-a",
                "writer",
                Amount {
                    tokens: 10,
                    micros: 0,
                },
                62,
            )
            .await
            .expect("lease")
        {
            LeaseOutcome::Exhausted {
                limit,
                spent,
                limit_value,
                ..
            } => {
                assert_eq!(
                    (limit, spent, limit_value),
                    (BudgetLimit::MaxTotalTokens, 150, 100)
                );
            }
            other => panic!("an exhausted run granted {other:?}"),
        }
        store.close().await;
    }

    pub async fn an_operator_halt_is_streamed_once_in_order(db: Db) {
        let store = db.open().await;
        for run in ["run-1", "run-2"] {
            store
                .open_run(
                    run,
                    "orchestrator",
                    "ada",
                    &limits(None, None, OnBreach::Halt),
                    1,
                )
                .await
                .expect("open");
        }
        let first = store
            .halt("run-2", "operator: runaway loop", 10)
            .await
            .expect("halt");
        let second = store
            .halt("run-1", "operator: cleanup", 11)
            .await
            .expect("halt");
        let (HaltOutcome::Halted(first), HaltOutcome::Halted(second)) = (first, second) else {
            panic!("both runs were running");
        };
        assert!(second.seq > first.seq);
        assert_eq!(
            store.halt("run-2", "again", 12).await.expect("halt"),
            HaltOutcome::AlreadyStopped {
                status: RunStatus::Halted
            }
        );
        assert_eq!(
            store.halt("nope", "x", 12).await.expect("halt"),
            HaltOutcome::UnknownRun
        );

        let (all, cursor) = store.halts_since(0).await.expect("halts");
        let runs: Vec<&str> = all.iter().map(|h| h.run_id.as_str()).collect();
        assert_eq!(runs, ["run-2", "run-1"]);
        assert_eq!(cursor, second.seq);
        let (rest, same) = store.halts_since(first.seq).await.expect("halts");
        assert_eq!(rest, vec![second.clone()]);
        assert_eq!(same, second.seq);
        store.close().await;
    }

    pub async fn leases_are_covered_by_reports_and_released_once(db: Db) {
        let store = db.open().await;
        let opened = store
            .open_run(
                "run-l",
                "orchestrator",
                "ada",
                &limits(Some(5_000), Some(50_000), OnBreach::HaltAndAlert),
                1,
            )
            .await
            .expect("open");
        let reopened = store
            .open_run(
                "run-l",
                "someone-else",
                "bob",
                &limits(None, None, OnBreach::AlertOnly),
                99,
            )
            .await
            .expect("open again");
        assert_eq!(opened, reopened, "a second open returns the run unchanged");

        let outcome = store
            .lease(
                "run-l",
                "research",
                Amount {
                    tokens: 1_000,
                    micros: 10_000,
                },
                2,
            )
            .await
            .expect("lease");
        let lease = lease_id(&outcome);
        store
            .report(
                &[spend("l1", "run-l", "research", Some(&lease), 300, 2_000)],
                3,
            )
            .await
            .expect("report");
        // 500 tokens and 8_000 micros unused; 200 tokens still in flight.
        let released = store
            .release(
                &lease,
                Amount {
                    tokens: 500,
                    micros: 8_000,
                },
                4,
            )
            .await
            .expect("release");
        assert_eq!(
            released,
            ReleaseOutcome::Released {
                returned: Amount {
                    tokens: 500,
                    micros: 8_000
                }
            }
        );
        assert_eq!(
            store
                .release(
                    &lease,
                    Amount {
                        tokens: 200,
                        micros: 0
                    },
                    5
                )
                .await
                .expect("release"),
            ReleaseOutcome::AlreadyReleased
        );
        assert_eq!(
            store
                .release("no-such-lease", Amount::default(), 5)
                .await
                .expect("release"),
            ReleaseOutcome::UnknownLease
        );
        let run = store.get_run("run-l").await.expect("get_run").expect("run");
        assert_eq!(
            run.summary.outstanding,
            Amount {
                tokens: 200,
                micros: 0
            }
        );
        store
            .report(&[spend("l2", "run-l", "research", Some(&lease), 200, 0)], 6)
            .await
            .expect("report");
        let run = store.get_run("run-l").await.expect("get_run").expect("run");
        assert_eq!(run.summary.outstanding, Amount::default());

        // The rest of the budget, less what is spent, is what the next lease can get.
        match store
            .lease(
                "run-l",
                "writer",
                Amount {
                    tokens: 10_000,
                    micros: 100_000,
                },
                7,
            )
            .await
            .expect("lease")
        {
            LeaseOutcome::Granted { granted, .. } => {
                assert_eq!(
                    granted,
                    Amount {
                        tokens: 4_500,
                        micros: 48_000
                    }
                );
            }
            other => panic!("expected a grant, got {other:?}"),
        }
        match store
            .lease(
                "run-l",
                "writer",
                Amount {
                    tokens: 1,
                    micros: 0,
                },
                8,
            )
            .await
            .expect("lease")
        {
            LeaseOutcome::Exhausted {
                limit,
                spent,
                outstanding,
                limit_value,
            } => assert_eq!(
                (limit, spent, outstanding, limit_value),
                (BudgetLimit::MaxTotalTokens, 500, 4_500, 5_000)
            ),
            other => panic!("expected exhaustion, got {other:?}"),
        }
        assert_eq!(
            store
                .lease("no-such-run", "writer", Amount::default(), 9)
                .await
                .expect("lease"),
            LeaseOutcome::UnknownRun
        );
        assert_eq!(
            store.complete("run-l", 10).await.expect("complete"),
            Some(RunStatus::Completed)
        );
        assert_eq!(
            store
                .lease(
                    "run-l",
                    "writer",
                    Amount {
                        tokens: 1,
                        micros: 0
                    },
                    11
                )
                .await
                .expect("lease"),
            LeaseOutcome::Completed
        );
        store.close().await;
    }

    pub async fn acknowledged_spend_survives_reopening_the_store(db: Db) {
        let store = db.open().await;
        store
            .open_run(
                "run-d",
                "orchestrator",
                "ada",
                &limits(None, Some(1_000_000), OnBreach::Halt),
                1,
            )
            .await
            .expect("open");
        let lease = lease_id(
            &store
                .lease(
                    "run-d",
                    "research",
                    Amount {
                        tokens: 10_000,
                        micros: 100_000,
                    },
                    2,
                )
                .await
                .expect("lease"),
        );
        let batches: Vec<Vec<_>> = (0..10)
            .map(|b| {
                (0..5)
                    .map(|e| {
                        spend(
                            &format!("d-{b}-{e}"),
                            "run-d",
                            "research",
                            Some(&lease),
                            10,
                            100,
                        )
                    })
                    .collect()
            })
            .collect();
        for batch in &batches {
            assert_eq!(store.report(batch, 3).await.expect("report").accepted, 5);
        }
        store
            .record_edges(&[edge(
                "de1",
                "run-d",
                "orchestrator",
                "research",
                None,
                1,
                10,
                5,
            )])
            .await
            .expect("edges");
        // No close: the store goes away as a crashed process's would.
        drop(store);
        if let Db::Sqlite { .. } = &db {
            use sqlx::Row;
            let mode: String = sqlx::query("PRAGMA journal_mode")
                .fetch_one(&mut db.raw().await)
                .await
                .expect("journal mode")
                .get(0);
            assert_eq!(mode, "wal", "commits go to a write-ahead log");
        }

        let reopened = db.open().await;
        let run = reopened
            .get_run("run-d")
            .await
            .expect("get_run")
            .expect("run");
        assert_eq!(run.summary.spent.tokens(), 500);
        assert_eq!(run.summary.spent.micros, 5_000);
        assert_eq!(
            run.summary.outstanding,
            Amount {
                tokens: 9_500,
                micros: 95_000
            }
        );
        assert_eq!(run.edges.len(), 1);
        for batch in &batches {
            let again = reopened.report(batch, 4).await.expect("re-sent report");
            assert_eq!((again.accepted, again.duplicates), (0, 5));
        }
        reopened.close().await;
    }

    pub async fn migrations_are_versioned_and_reopening_is_a_no_op(db: Db) {
        let store = db.open().await;
        let known = store.known_schema_versions();
        assert_eq!(known.first(), Some(&1));
        assert_eq!(
            store.applied_schema_versions().await.expect("versions"),
            known
        );
        store
            .open_run(
                "run-m",
                "orchestrator",
                "ada",
                &limits(None, None, OnBreach::Halt),
                1,
            )
            .await
            .expect("open");
        store.close().await;

        let again = db.open().await;
        assert_eq!(
            again.applied_schema_versions().await.expect("versions"),
            known
        );
        assert!(
            again.get_run("run-m").await.expect("get_run").is_some(),
            "data kept"
        );
        again.close().await;

        // A database that a newer ringfence migrated is refused, not half-used.
        let mut raw = db.raw().await;
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(9_999_i64)
        .bind("from the future")
        .bind(true)
        .bind(vec![0u8; 48])
        .bind(0_i64)
        .execute(&mut raw)
        .await
        .expect("faking a newer migration");
        drop(raw);
        match Store::open(&db.url()).await {
            Err(StoreError::NewerSchema { found: 9_999, .. }) => {}
            Err(other) => panic!("expected NewerSchema, got {other}"),
            Ok(_) => panic!("a newer schema was opened"),
        }
    }

    pub async fn spend_is_attributed_by_team_environment_workflow_and_agent(db: Db) {
        use ringfence::budget::Attribution;
        let store = db.open().await;
        let l = limits(Some(100_000), None, OnBreach::HaltAndAlert);
        for run in ["run-t1", "run-t2"] {
            store
                .open_run(run, "orchestrator", "ada", &l, 100)
                .await
                .expect("open");
        }
        store
            .report(
                &[
                    spend("t1", "run-t1", "research", None, 100, 1_000),
                    spend("t2", "run-t1", "w1", None, 40, 400),
                    spend("t3", "run-t2", "w2", None, 60, 600),
                ],
                400,
            )
            .await
            .expect("report");
        let teams = store
            .spend_by(Attribution::Team, None)
            .await
            .expect("by team");
        let keys: Vec<(&str, u64, u64, u64)> = teams
            .iter()
            .map(|t| (t.key.as_str(), t.spent.micros, t.spent.calls, t.runs))
            .collect();
        assert_eq!(
            keys,
            vec![("research", 1_000, 1, 1), ("workers", 1_000, 2, 2)]
        );
        let env = store
            .spend_by(Attribution::Environment, None)
            .await
            .expect("by environment");
        assert_eq!(
            (env.len(), env[0].key.as_str(), env[0].spent.tokens()),
            (1, "prod", 200)
        );
        let wf = store
            .spend_by(Attribution::Workflow, None)
            .await
            .expect("by workflow");
        assert_eq!((wf[0].key.as_str(), wf[0].runs), ("default/limits", 2));
        let agents = store
            .spend_by(Attribution::Agent, None)
            .await
            .expect("by agent");
        assert_eq!(agents.len(), 3);
        assert!(
            store
                .spend_by(Attribution::Team, Some(10_000))
                .await
                .expect("since")
                .is_empty()
        );
    }

    pub async fn run_queries_return_the_aggregates(db: Db) {
        let store = db.open().await;
        let l = limits(Some(100_000), None, OnBreach::HaltAndAlert);
        store
            .open_run("run-q1", "orchestrator", "ada", &l, 100)
            .await
            .expect("open");
        store
            .open_run("run-q2", "orchestrator", "bob", &l, 200)
            .await
            .expect("open");
        store
            .open_run("run-q3", "triage", "ada", &l, 300)
            .await
            .expect("open");

        store
            .report(
                &[
                    spend("q1", "run-q1", "orchestrator", None, 100, 1_000),
                    spend("q2", "run-q1", "research", None, 40, 400),
                    spend("q3", "run-q1", "research", None, 60, 600),
                    spend("q4", "run-q2", "orchestrator", None, 5, 50),
                ],
                400,
            )
            .await
            .expect("report");
        let mut calls = vec![
            edge("c1", "run-q1", "orchestrator", "research", None, 1, 40, 110),
            edge("c2", "run-q1", "orchestrator", "research", None, 1, 60, 120),
            edge(
                "c3",
                "run-q1",
                "research",
                "orchestrator",
                Some(("cycle", None)),
                2,
                0,
                130,
            ),
            edge(
                "c4",
                "run-q1",
                "research",
                "orchestrator",
                Some(("policy", Some("no-callback"))),
                3,
                0,
                140,
            ),
            edge(
                "c5",
                "run-q1",
                "research",
                "orchestrator",
                Some(("cycle", None)),
                2,
                0,
                150,
            ),
            edge("c6", "run-q3", "triage", "web-search", None, 1, 7, 310),
        ];
        // research called back into orchestrator, already on the path: a cycle formed there.
        calls[4].cycle = true;
        calls[3].parent_call = Some(calls[0].span_id.clone());
        let first = store.record_edges(&calls).await.expect("edges");
        assert_eq!((first.accepted, first.duplicates), (6, 0));
        let again = store.record_edges(&calls[..3]).await.expect("edges");
        assert_eq!((again.accepted, again.duplicates), (0, 3));
        store.halt("run-q2", "operator", 500).await.expect("halt");
        store.complete("run-q3", 600).await.expect("complete");

        let run = store
            .get_run("run-q1")
            .await
            .expect("get_run")
            .expect("run");
        assert_eq!(run.summary.run.root_agent, "orchestrator");
        assert_eq!(run.summary.run.user, "ada");
        assert_eq!(run.summary.run.limits, l);
        assert_eq!(run.summary.run.status, RunStatus::Running);
        // Every call is kept, in the order it started, exactly as reported.
        let ids: Vec<&str> = run.calls.iter().map(|c| c.event_id.as_str()).collect();
        assert_eq!(ids, ["c1", "c2", "c3", "c4", "c5"]);
        let expected: Vec<_> = calls[..5]
            .iter()
            .cloned()
            .map(|mut c| {
                (c.root, c.user) = ("orchestrator".into(), "ada".into());
                c
            })
            .collect();
        assert_eq!(run.calls, expected);
        assert_eq!(run.summary.spent.tokens(), 200);
        assert_eq!(run.summary.spent.micros, 2_000);
        let agents: Vec<(&str, u64, u64)> = run
            .agents
            .iter()
            .map(|a| (a.agent.as_str(), a.spent.tokens(), a.spent.calls))
            .collect();
        assert_eq!(agents, [("orchestrator", 100, 1), ("research", 100, 2)]);

        assert_eq!(run.edges.len(), 2);
        let down = &run.edges[0];
        assert_eq!(
            (down.caller.as_str(), down.callee.as_str()),
            ("orchestrator", "research")
        );
        assert_eq!(
            (down.calls, down.tokens, down.micros, down.max_depth),
            (2, 100, 1_000, 1)
        );
        assert_eq!((down.first_seen_ms, down.last_seen_ms), (110, 120));
        assert!(down.denials.is_empty());
        assert_eq!(down.kind, EdgeKind::Agent);
        let back = &run.edges[1];
        assert_eq!(
            (back.caller.as_str(), back.callee.as_str()),
            ("research", "orchestrator")
        );
        assert_eq!(
            (back.calls, back.max_depth, back.total_latency_us),
            (3, 3, 300)
        );
        assert_eq!((back.first_seen_ms, back.last_seen_ms), (130, 150));
        assert_eq!((down.cycles, back.cycles), (0, 1));
        assert_eq!(
            back.denials,
            BTreeMap::from([
                (
                    DenialKey {
                        reason: "cycle".into(),
                        rule: None
                    },
                    2
                ),
                (
                    DenialKey {
                        reason: "policy".into(),
                        rule: Some("no-callback".into())
                    },
                    1
                ),
            ])
        );

        let ids = |runs: Vec<ringfence::budget::RunSummary>| -> Vec<String> {
            runs.into_iter().map(|r| r.run.run_id).collect()
        };
        let all = store
            .list_runs(&RunFilter::default(), 10)
            .await
            .expect("list");
        assert_eq!(
            ids(all.clone()),
            ["run-q3", "run-q2", "run-q1"],
            "newest first"
        );
        assert_eq!(all[2].spent.tokens(), 200);
        assert_eq!(
            ids(store
                .list_runs(&RunFilter::default(), 1)
                .await
                .expect("list")),
            ["run-q3"]
        );
        let by = |status: Option<RunStatus>, agent: Option<&str>, user: Option<&str>| RunFilter {
            status,
            agent: agent.map(str::to_owned),
            user: user.map(str::to_owned),
        };
        assert_eq!(
            ids(store
                .list_runs(&by(Some(RunStatus::Halted), None, None), 10)
                .await
                .expect("list")),
            ["run-q2"]
        );
        assert_eq!(
            ids(store
                .list_runs(&by(Some(RunStatus::Completed), None, None), 10)
                .await
                .expect("list")),
            ["run-q3"]
        );
        assert_eq!(
            ids(store
                .list_runs(&by(None, None, Some("ada")), 10)
                .await
                .expect("list")),
            ["run-q3", "run-q1"]
        );
        assert_eq!(
            ids(store
                .list_runs(&by(None, Some("research"), None), 10)
                .await
                .expect("list")),
            ["run-q1"]
        );
        assert_eq!(
            ids(store
                .list_runs(&by(None, Some("web-search"), None), 10)
                .await
                .expect("list")),
            ["run-q3"]
        );
        assert_eq!(
            ids(store
                .list_runs(
                    &by(Some(RunStatus::Running), Some("orchestrator"), Some("ada")),
                    10
                )
                .await
                .expect("list")),
            ["run-q1"]
        );
        assert!(store.get_run("nope").await.expect("get_run").is_none());

        // The detail is what `ringfence runs show --format json` prints.
        let json = serde_json::to_value(&run).expect("json");
        assert_eq!(json["status"], "running");
        assert_eq!(json["edges"][1]["denials"][0]["reason"], "cycle");
        assert_eq!(json["edges"][1]["denials"][0]["count"], 2);
        let _: Decision =
            serde_json::from_value(serde_json::json!({"decision": "allowed"})).expect("decision");
        store.close().await;
    }
}

/// "kill -9 loses nothing acknowledged", at process level: the test re-executes its own binary
/// as a writer that reports batch after batch and prints `ACK n` after each one the store
/// acknowledged, kills it with SIGKILL mid-stream, and checks every acknowledged batch is there.
mod crash {
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use super::*;

    /// Set in the re-executed writer: the store it writes to.
    const WRITER_STORE: &str = "RINGFENCE_TEST_CRASH_WRITER_STORE";
    const RUN: &str = "run-k";
    /// Acknowledged batches to wait for before the kill.
    const ACKS: usize = 40;

    pub fn writer_store() -> Option<String> {
        std::env::var(WRITER_STORE).ok()
    }

    fn batch(n: u64) -> Vec<ringfence::budget::SpendEvent> {
        (0..3)
            .map(|k| spend(&format!("k-{n}-{k}"), RUN, "research", None, 10, 100))
            .collect()
    }

    /// The writer's side. Bounded, though it is meant to be killed long before the end.
    pub async fn write_until_killed(url: &str) {
        let store = Store::open(url).await.expect("the writer opens the store");
        for n in 0..20_000u64 {
            store
                .report(&batch(n), n)
                .await
                .expect("the writer reports");
            let mut out = std::io::stdout().lock();
            writeln!(out, "ACK {n}").expect("stdout");
            out.flush().expect("stdout");
        }
    }

    pub async fn kill_9_loses_nothing_acknowledged(db: Db, test_name: &str) {
        let store = db.open().await;
        store
            .open_run(
                RUN,
                "orchestrator",
                "ada",
                &limits(None, None, OnBreach::Halt),
                1,
            )
            .await
            .expect("open");
        let exe = std::env::current_exe().expect("the test binary's path");
        let mut child = Command::new(exe)
            .args([test_name, "--exact", "--nocapture", "--test-threads=1"])
            .env(WRITER_STORE, db.url())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("re-executing the test binary as the writer");
        let stdout = child.stdout.take().expect("the writer's stdout");
        let reader = tokio::task::spawn_blocking(move || {
            let mut acked = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("ACK ") {
                    acked.push(n.parse::<u64>().expect("an ACK line's number"));
                    if acked.len() >= ACKS {
                        break;
                    }
                }
            }
            acked
        });
        let acked = tokio::time::timeout(Duration::from_secs(120), reader).await;
        // SIGKILL: no destructor, no flush, no rollback in the writer.
        child.kill().expect("kill -9 the writer");
        let status = child.wait().expect("reaping the writer");
        let acked = acked
            .expect("the writer acknowledged nothing for 120s")
            .expect("reading the writer's output");
        assert_eq!(
            acked.len(),
            ACKS,
            "the writer stopped after {} acknowledgements ({status}); its stderr is above",
            acked.len()
        );
        assert!(
            status.code().is_none(),
            "the writer died by the signal, not on its own ({status})"
        );

        let reopened = db.open().await;
        for n in &acked {
            let again = reopened
                .report(&batch(*n), 0)
                .await
                .expect("re-sent report");
            assert_eq!(
                (again.accepted, again.duplicates),
                (0, 3),
                "acknowledged batch {n} was lost"
            );
        }
        let run = reopened.get_run(RUN).await.expect("get_run").expect("run");
        assert!(run.summary.spent.micros >= 300 * ACKS as u64);
        store.close().await;
        reopened.close().await;
    }
}

/// The same scenarios, once per backend.
macro_rules! suite {
    ($backend:ident => $db:expr; $($scenario:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::scenarios::$scenario($db.await).await;
                }
            )*

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kill_9_loses_nothing_acknowledged() {
                if let Some(url) = super::crash::writer_store() {
                    return super::crash::write_until_killed(&url).await;
                }
                // libtest names a test by its path below the crate root.
                let module = module_path!().split_once("::").map_or("", |(_, path)| path);
                let name = format!("{module}::kill_9_loses_nothing_acknowledged");
                super::crash::kill_9_loses_nothing_acknowledged($db.await, &name).await;
            }
        }
    };
}

macro_rules! suite_on {
    ($backend:ident => $db:expr) => {
        suite!(
            $backend => $db;
            concurrent_leasers_never_get_more_than_the_limit,
            a_resent_batch_is_not_counted_twice,
            a_breach_by_reported_spend_halts_the_run_everywhere,
            an_operator_halt_is_streamed_once_in_order,
            leases_are_covered_by_reports_and_released_once,
            acknowledged_spend_survives_reopening_the_store,
            migrations_are_versioned_and_reopening_is_a_no_op,
            run_queries_return_the_aggregates,
            spend_is_attributed_by_team_environment_workflow_and_agent,
        );
    };
}

suite_on!(sqlite => super::fixtures::Db::sqlite());
suite_on!(postgres => super::fixtures::Db::postgres());
