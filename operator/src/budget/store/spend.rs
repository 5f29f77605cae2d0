//! Runs, leases, spend reports and halts: everything that moves a run's money.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{Any, Transaction};

use ringfence_crds::quota::QuotaTerm;

use super::account::{self, LeaseDecision, RunState};
use super::quota;
use super::{Op, RunRow, SELECT_RUN, Store, StoreError, db, db_opt, get, get_u64, on_breach_str};
use crate::budget::quota::{CounterId, QuotaDecision};
use crate::budget::{
    Amount, Breach, Halt, HaltOutcome, LeaseOutcome, ReleaseOutcome, ReportOutcome, RunLimits,
    RunRecord, RunStatus, Spend, SpendEvent,
};

/// How many halts one [`Store::halts_since`] call returns at most; ask again from the new cursor.
pub const HALT_PAGE: usize = 1_000;

impl Store {
    /// Opens a run, or returns it unchanged if it is already open (whatever the arguments).
    /// A run the ledger opened (from its calls, with no terms) takes the first terms a lease
    /// brings; a run opened with terms keeps them.
    pub async fn open_run(
        &self,
        run_id: &str,
        root_agent: &str,
        user: &str,
        limits: &RunLimits,
        now_ms: u64,
    ) -> Result<RunRecord, StoreError> {
        let budgets = serde_json::to_string(&limits.budgets).map_err(|e| StoreError::Corrupt {
            what: format!("budget list ({e})"),
        })?;
        sqlx::query(
            "INSERT INTO runs (run_id, root_agent, user_name, max_tokens, max_micros, \
             deadline_ms, on_breach, budgets, status, opened_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'running', $9) \
             ON CONFLICT (run_id) DO UPDATE SET max_tokens = excluded.max_tokens, \
             max_micros = excluded.max_micros, deadline_ms = excluded.deadline_ms, \
             on_breach = excluded.on_breach, budgets = excluded.budgets \
             WHERE runs.budgets = '[]' AND runs.max_tokens IS NULL AND runs.max_micros IS NULL \
             AND runs.deadline_ms IS NULL",
        )
        .bind(run_id)
        .bind(root_agent)
        .bind(user)
        .bind(db_opt("maxTotalTokens", limits.max_tokens)?)
        .bind(db_opt("maxCostUsd (micro-USD)", limits.max_cost_micros)?)
        .bind(db_opt("deadline_ms", limits.deadline_ms)?)
        .bind(on_breach_str(limits.on_breach))
        .bind(budgets)
        .bind(db("now_ms", now_ms)?)
        .execute(&self.pool)
        .await
        .op("opening a run")?;
        let row = sqlx::query(&format!("{SELECT_RUN} WHERE run_id = $1"))
            .bind(run_id)
            .fetch_one(&self.pool)
            .await
            .op("reading the opened run")?;
        Ok(RunRow::from_row(&row)?.record)
    }

    /// Leases up to `want` of what the run has left. Atomic: concurrent leases of one run, from
    /// any number of replicas, never grant more than `limit - spent - outstanding` together.
    pub async fn lease(
        &self,
        run_id: &str,
        agent: &str,
        want: Amount,
        now_ms: u64,
    ) -> Result<LeaseOutcome, StoreError> {
        self.lease_under_quotas(run_id, agent, want, &[], now_ms)
            .await
    }

    /// [`Store::lease`], also capped by what each of `quotas` has left in its window; the lease
    /// reserves against each, and spend reported under it counts toward each. Concurrent leases
    /// of any runs never grant a quota more than `limit - spent - outstanding` together.
    pub async fn lease_under_quotas(
        &self,
        run_id: &str,
        agent: &str,
        want: Amount,
        quotas: &[QuotaTerm],
        now_ms: u64,
    ) -> Result<LeaseOutcome, StoreError> {
        let mut tx = self.begin_write().await?;
        let Some(run) = self.lock_run(&mut tx, run_id).await? else {
            return Ok(LeaseOutcome::UnknownRun);
        };
        let outstanding = outstanding(&mut tx, run_id).await?;
        let state = RunState {
            status: run.record.status,
            halt_reason: run.record.halt_reason.clone(),
            max_tokens: run.record.limits.max_tokens,
            max_micros: run.record.limits.max_cost_micros,
            spent: run.spent,
            outstanding,
        };
        let granted = match account::decide_lease(&state, want) {
            LeaseDecision::Grant(granted) => granted,
            LeaseDecision::Exhausted {
                limit,
                spent,
                outstanding,
                limit_value,
            } => {
                return Ok(LeaseOutcome::Exhausted {
                    limit,
                    spent,
                    outstanding,
                    limit_value,
                });
            }
            LeaseDecision::Halted { reason } => return Ok(LeaseOutcome::Halted { reason }),
            LeaseDecision::Completed => return Ok(LeaseOutcome::Completed),
        };
        // Then each quota, in counter order (the lock order of every transaction).
        let mut terms: Vec<&QuotaTerm> = quotas.iter().collect();
        terms.sort_by_key(|t| CounterId::of(t));
        terms.dedup_by_key(|t| CounterId::of(t));
        let mut granted = granted;
        let mut counters = Vec::with_capacity(terms.len());
        for term in terms {
            let counter = self.upsert_counter(&mut tx, term, now_ms).await?;
            let state = quota::counter_state(&mut tx, &counter).await?;
            match crate::budget::quota::decide(&state, granted) {
                QuotaDecision::Room(room) => granted = room,
                QuotaDecision::Exhausted {
                    limit,
                    used,
                    outstanding,
                    limit_value,
                    spent,
                } => {
                    // As with a run's budget, leases keep reported spend from crossing the
                    // limit, so a refusal is where the breach shows: the first refusal of the
                    // window handles it.
                    let trip = if counter.span.tripped(counter.tripped_ms) {
                        None
                    } else {
                        self.mark_tripped(&mut tx, &counter).await?;
                        Some(counter.trip_at(limit, used, limit_value))
                    };
                    tx.commit().await.op("committing a quota refusal")?;
                    return Ok(LeaseOutcome::QuotaExhausted {
                        counter: counter.counter,
                        limit,
                        used,
                        outstanding,
                        limit_value,
                        spent,
                        trip,
                    });
                }
            }
            counters.push(counter);
        }
        let lease_id = ulid::Ulid::new().to_string();
        sqlx::query(
            "INSERT INTO leases (lease_id, run_id, agent, granted_tokens, granted_micros, \
             remaining_tokens, remaining_micros, granted_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $4, $5, $6)",
        )
        .bind(&lease_id)
        .bind(run_id)
        .bind(agent)
        .bind(db("granted tokens", granted.tokens)?)
        .bind(db("granted micro-USD", granted.micros)?)
        .bind(db("now_ms", now_ms)?)
        .execute(&mut *tx)
        .await
        .op("recording a lease")?;
        quota::link_lease(&mut tx, &lease_id, &counters).await?;
        tx.commit().await.op("committing a lease")?;
        Ok(LeaseOutcome::Granted { lease_id, granted })
    }

    /// Records a batch of spend. Idempotent by `event_id`; durable once it returns `Ok`. Applies
    /// each new event to its run's and agent's totals, covers the lease it names, and halts runs
    /// whose spend crossed a limit when their `onBreach` halts.
    pub async fn report(
        &self,
        batch: &[SpendEvent],
        now_ms: u64,
    ) -> Result<ReportOutcome, StoreError> {
        let mut outcome = ReportOutcome::default();
        if batch.is_empty() {
            return Ok(outcome);
        }
        // Sorted, so concurrent batches take row locks in one order and cannot deadlock.
        let mut events: Vec<&SpendEvent> = batch.iter().collect();
        events.sort_by(|a, b| a.event_id.cmp(&b.event_id));
        let run_ids: BTreeSet<&str> = events.iter().map(|e| e.run_id.as_str()).collect();

        let mut tx = self.begin_write().await?;
        let mut runs: BTreeMap<&str, (RunRow, Spend)> = BTreeMap::new();
        for run_id in run_ids {
            if let Some(run) = self.lock_run(&mut tx, run_id).await? {
                let spent = run.spent;
                runs.insert(run_id, (run, spent));
            }
        }

        let mut agents: BTreeMap<(&str, &str), AgentDelta> = BTreeMap::new();
        let mut covers: BTreeMap<(&str, &str), Amount> = BTreeMap::new();
        let mut lease_quotas: BTreeMap<&str, Vec<CounterId>> = BTreeMap::new();
        let mut owed = quota::CounterSpend::new();
        for event in events {
            let Some((_, after)) = runs.get_mut(event.run_id.as_str()) else {
                outcome.unknown_run += 1;
                continue;
            };
            if !insert_spend_event(&mut tx, event, now_ms).await? {
                outcome.duplicates += 1;
                continue;
            }
            outcome.accepted += 1;
            account::add_spend(after, event).map_err(|_| StoreError::Overflow {
                run_id: event.run_id.clone(),
            })?;
            agents
                .entry((&event.run_id, &event.agent))
                .or_insert_with(|| AgentDelta::starting_at(event.at_ms))
                .add(event)
                .map_err(|_| StoreError::Overflow {
                    run_id: event.run_id.clone(),
                })?;
            if let Some(lease_id) = &event.lease_id {
                let covered = covers.entry((&event.run_id, lease_id)).or_default();
                covered.tokens = covered
                    .tokens
                    .saturating_add(event.tokens_in.saturating_add(event.tokens_out));
                covered.micros = covered.micros.saturating_add(event.micros);
                // Spend under a lease counts toward the lease's quotas.
                if !lease_quotas.contains_key(lease_id.as_str()) {
                    let counters = quota::lease_counters(&mut tx, lease_id).await?;
                    lease_quotas.insert(lease_id, counters);
                }
                let spent = Amount {
                    tokens: event.tokens_in.saturating_add(event.tokens_out),
                    micros: event.micros,
                };
                for counter in lease_quotas.get(lease_id.as_str()).into_iter().flatten() {
                    quota::owe(&mut owed, counter.clone(), spent);
                }
            }
        }

        for (run_id, (before, after)) in &runs {
            if *after == before.spent {
                continue;
            }
            sqlx::query(
                "UPDATE runs SET tokens_in = $2, tokens_out = $3, micros = $4, calls = $5 \
                 WHERE run_id = $1",
            )
            .bind(*run_id)
            .bind(db("tokens_in", after.tokens_in)?)
            .bind(db("tokens_out", after.tokens_out)?)
            .bind(db("micro-USD", after.micros)?)
            .bind(db("calls", after.calls)?)
            .execute(&mut *tx)
            .await
            .op("adding spend to a run")?;

            let limits = &before.record.limits;
            let crossed = account::crossed(
                limits.max_tokens,
                limits.max_cost_micros,
                &before.spent,
                after,
            );
            if crossed.is_empty() {
                continue;
            }
            let halts = limits.on_breach.halts() && before.record.status == RunStatus::Running;
            if halts {
                let reason = account::breach_reason(&crossed);
                self.halt_locked(&mut tx, run_id, &reason, now_ms).await?;
            }
            outcome
                .breaches
                .extend(
                    crossed
                        .into_iter()
                        .map(|(limit, spent, limit_value)| Breach {
                            run_id: (*run_id).to_owned(),
                            limit,
                            spent,
                            limit_value,
                            halted: halts,
                        }),
                );
        }

        for ((run_id, agent), delta) in &agents {
            upsert_agent_spend(&mut tx, run_id, agent, delta).await?;
        }
        for ((run_id, lease_id), covered) in &covers {
            take_from_lease(&mut tx, run_id, lease_id, *covered).await?;
        }
        // Counters last, in order, after every run lock (the lock order of leases too).
        for (counter, spent) in owed {
            let Some(row) = self.read_counter(&mut tx, &counter, now_ms, true).await? else {
                continue;
            };
            quota::add_to_bucket(&mut tx, &row, spent).await?;
            let state = quota::counter_state(&mut tx, &row).await?;
            if let Some(trip) = row.trip(&state)
                && !row.span.tripped(row.tripped_ms)
            {
                self.mark_tripped(&mut tx, &row).await?;
                outcome.quota_trips.push(trip);
            }
        }
        tx.commit().await.op("committing a spend report")?;
        Ok(outcome)
    }

    /// Gives back `unused` of a lease and closes it. What the lease still holds beyond `unused`
    /// stays outstanding until reports cover it (spend still in flight). Idempotent.
    pub async fn release(
        &self,
        lease_id: &str,
        unused: Amount,
        now_ms: u64,
    ) -> Result<ReleaseOutcome, StoreError> {
        let mut tx = self.begin_write().await?;
        let Some(row) = sqlx::query("SELECT run_id FROM leases WHERE lease_id = $1")
            .bind(lease_id)
            .fetch_optional(&mut *tx)
            .await
            .op("reading a lease")?
        else {
            return Ok(ReleaseOutcome::UnknownLease);
        };
        let run_id: String = get(&row, "run_id")?;
        // Lock order is run, then lease (as in lease and report).
        self.lock_run(&mut tx, &run_id).await?;
        let Some(row) = sqlx::query(
            "SELECT remaining_tokens, remaining_micros, released_at_ms \
             FROM leases WHERE lease_id = $1",
        )
        .bind(lease_id)
        .fetch_optional(&mut *tx)
        .await
        .op("reading a lease")?
        else {
            return Ok(ReleaseOutcome::UnknownLease);
        };
        if get::<Option<i64>>(&row, "released_at_ms")?.is_some() {
            return Ok(ReleaseOutcome::AlreadyReleased);
        }
        let remaining = Amount {
            tokens: get_u64(&row, "remaining_tokens")?,
            micros: get_u64(&row, "remaining_micros")?,
        };
        let left = account::cover(remaining, unused);
        sqlx::query(
            "UPDATE leases SET remaining_tokens = $2, remaining_micros = $3, released_at_ms = $4 \
             WHERE lease_id = $1",
        )
        .bind(lease_id)
        .bind(db("tokens", left.tokens)?)
        .bind(db("micro-USD", left.micros)?)
        .bind(db("now_ms", now_ms)?)
        .execute(&mut *tx)
        .await
        .op("releasing a lease")?;
        tx.commit().await.op("committing a release")?;
        Ok(ReleaseOutcome::Released {
            returned: Amount {
                tokens: remaining.tokens - left.tokens,
                micros: remaining.micros - left.micros,
            },
        })
    }

    /// Halts a running run (an operator's decision, or the service's on a deadline).
    pub async fn halt(
        &self,
        run_id: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<HaltOutcome, StoreError> {
        let mut tx = self.begin_write().await?;
        let Some(run) = self.lock_run(&mut tx, run_id).await? else {
            return Ok(HaltOutcome::UnknownRun);
        };
        if run.record.status != RunStatus::Running {
            return Ok(HaltOutcome::AlreadyStopped {
                status: run.record.status,
            });
        }
        let halt = self.halt_locked(&mut tx, run_id, reason, now_ms).await?;
        tx.commit().await.op("committing a halt")?;
        Ok(HaltOutcome::Halted(halt))
    }

    /// Marks a running run completed. Returns its status afterwards (`None`: unknown run); a
    /// halted run stays halted.
    pub async fn complete(
        &self,
        run_id: &str,
        now_ms: u64,
    ) -> Result<Option<RunStatus>, StoreError> {
        let mut tx = self.begin_write().await?;
        let Some(run) = self.lock_run(&mut tx, run_id).await? else {
            return Ok(None);
        };
        if run.record.status != RunStatus::Running {
            return Ok(Some(run.record.status));
        }
        sqlx::query("UPDATE runs SET status = 'completed', completed_at_ms = $2 WHERE run_id = $1")
            .bind(run_id)
            .bind(db("now_ms", now_ms)?)
            .execute(&mut *tx)
            .await
            .op("completing a run")?;
        tx.commit().await.op("committing a run's completion")?;
        Ok(Some(RunStatus::Completed))
    }

    /// Halts after `cursor` (0 for all), oldest first, at most [`HALT_PAGE`], and the cursor to
    /// ask with next time.
    pub async fn halts_since(&self, cursor: u64) -> Result<(Vec<Halt>, u64), StoreError> {
        let rows = sqlx::query(
            "SELECT seq, run_id, reason, at_ms FROM halts WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(db("halt cursor", cursor)?)
        .bind(db("halt page", HALT_PAGE as u64)?)
        .fetch_all(&self.pool)
        .await
        .op("reading the halt stream")?;
        let halts = rows
            .iter()
            .map(|row| {
                Ok(Halt {
                    seq: get_u64(row, "seq")?,
                    run_id: get(row, "run_id")?,
                    reason: get(row, "reason")?,
                    at_ms: get_u64(row, "at_ms")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let next = halts.last().map_or(cursor, |h| h.seq);
        Ok((halts, next))
    }

    /// Halts a run whose row this transaction has locked, and appends to the halt stream.
    async fn halt_locked(
        &self,
        tx: &mut Transaction<'static, Any>,
        run_id: &str,
        reason: &str,
        now_ms: u64,
    ) -> Result<Halt, StoreError> {
        let at = db("now_ms", now_ms)?;
        sqlx::query(
            "UPDATE runs SET status = 'halted', halted_at_ms = $2, halt_reason = $3 \
             WHERE run_id = $1",
        )
        .bind(run_id)
        .bind(at)
        .bind(reason)
        .execute(&mut **tx)
        .await
        .op("halting a run")?;
        self.serialize_halts(tx).await?;
        let row = sqlx::query(
            "INSERT INTO halts (run_id, reason, at_ms) VALUES ($1, $2, $3) RETURNING seq",
        )
        .bind(run_id)
        .bind(reason)
        .bind(at)
        .fetch_one(&mut **tx)
        .await
        .op("appending to the halt stream")?;
        Ok(Halt {
            seq: get_u64(&row, "seq")?,
            run_id: run_id.to_owned(),
            reason: reason.to_owned(),
            at_ms: now_ms,
        })
    }
}

/// What the run's leases still hold.
pub(super) async fn outstanding(
    tx: &mut Transaction<'static, Any>,
    run_id: &str,
) -> Result<Amount, StoreError> {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(remaining_tokens), 0) AS BIGINT) AS tokens, \
         CAST(COALESCE(SUM(remaining_micros), 0) AS BIGINT) AS micros \
         FROM leases WHERE run_id = $1 AND (remaining_tokens > 0 OR remaining_micros > 0)",
    )
    .bind(run_id)
    .fetch_one(&mut **tx)
    .await
    .op("summing outstanding leases")?;
    Ok(Amount {
        tokens: get_u64(&row, "tokens")?,
        micros: get_u64(&row, "micros")?,
    })
}

/// Inserts an event unless its id is known. `false`: a duplicate.
async fn insert_spend_event(
    tx: &mut Transaction<'static, Any>,
    event: &SpendEvent,
    now_ms: u64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "INSERT INTO spend_events (event_id, run_id, agent, lease_id, tokens_in, tokens_out, \
         micros, calls, model, estimated, at_ms, received_at_ms, team, environment, workflow) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
         ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(&event.event_id)
    .bind(&event.run_id)
    .bind(&event.agent)
    .bind(event.lease_id.as_deref())
    .bind(db("tokens_in", event.tokens_in)?)
    .bind(db("tokens_out", event.tokens_out)?)
    .bind(db("micro-USD", event.micros)?)
    .bind(db("calls", event.calls)?)
    .bind(event.model.as_deref())
    .bind(event.estimated)
    .bind(db("at_ms", event.at_ms)?)
    .bind(db("now_ms", now_ms)?)
    .bind(event.team.as_deref())
    .bind(event.environment.as_deref())
    .bind(event.workflow.as_deref())
    .execute(&mut **tx)
    .await
    .op("recording a spend event")?;
    Ok(done.rows_affected() == 1)
}

/// One agent's new spend within a batch.
#[derive(Debug, Clone, Copy)]
struct AgentDelta {
    spent: Spend,
    first_at_ms: u64,
    last_at_ms: u64,
}

impl AgentDelta {
    fn starting_at(at_ms: u64) -> AgentDelta {
        AgentDelta {
            spent: Spend::default(),
            first_at_ms: at_ms,
            last_at_ms: at_ms,
        }
    }

    fn add(&mut self, event: &SpendEvent) -> Result<(), account::Overflow> {
        account::add_spend(&mut self.spent, event)?;
        self.first_at_ms = self.first_at_ms.min(event.at_ms);
        self.last_at_ms = self.last_at_ms.max(event.at_ms);
        Ok(())
    }
}

async fn upsert_agent_spend(
    tx: &mut Transaction<'static, Any>,
    run_id: &str,
    agent: &str,
    delta: &AgentDelta,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO agent_spend (run_id, agent, tokens_in, tokens_out, micros, calls, \
         first_at_ms, last_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (run_id, agent) DO UPDATE SET \
         tokens_in = agent_spend.tokens_in + excluded.tokens_in, \
         tokens_out = agent_spend.tokens_out + excluded.tokens_out, \
         micros = agent_spend.micros + excluded.micros, \
         calls = agent_spend.calls + excluded.calls, \
         first_at_ms = CASE WHEN excluded.first_at_ms < agent_spend.first_at_ms \
             THEN excluded.first_at_ms ELSE agent_spend.first_at_ms END, \
         last_at_ms = CASE WHEN excluded.last_at_ms > agent_spend.last_at_ms \
             THEN excluded.last_at_ms ELSE agent_spend.last_at_ms END",
    )
    .bind(run_id)
    .bind(agent)
    .bind(db("tokens_in", delta.spent.tokens_in)?)
    .bind(db("tokens_out", delta.spent.tokens_out)?)
    .bind(db("micro-USD", delta.spent.micros)?)
    .bind(db("calls", delta.spent.calls)?)
    .bind(db("at_ms", delta.first_at_ms)?)
    .bind(db("at_ms", delta.last_at_ms)?)
    .execute(&mut **tx)
    .await
    .op("adding spend to an agent")?;
    Ok(())
}

/// Reported spend covers the lease it came from: that much is no longer outstanding. A lease of
/// another run, or an unknown one, is left alone.
async fn take_from_lease(
    tx: &mut Transaction<'static, Any>,
    run_id: &str,
    lease_id: &str,
    covered: Amount,
) -> Result<(), StoreError> {
    let tokens = db("tokens", covered.tokens)?;
    let micros = db("micro-USD", covered.micros)?;
    sqlx::query(
        "UPDATE leases SET \
         remaining_tokens = CASE WHEN remaining_tokens > $3 THEN remaining_tokens - $3 ELSE 0 END, \
         remaining_micros = CASE WHEN remaining_micros > $4 THEN remaining_micros - $4 ELSE 0 END \
         WHERE lease_id = $1 AND run_id = $2",
    )
    .bind(lease_id)
    .bind(run_id)
    .bind(tokens)
    .bind(micros)
    .execute(&mut **tx)
    .await
    .op("covering a lease")?;
    Ok(())
}
