//! The run ledger: every call of a run (its tree), per-edge aggregates, and the queries that
//! read runs back.

use std::collections::BTreeMap;

use sqlx::any::AnyRow;
use sqlx::{Any, Transaction};

use super::spend::outstanding;
use super::{Op, RunRow, SELECT_RUN, Store, StoreError, db, get, get_u64};
use crate::budget::{
    AgentSpend, Attribution, Decision, DenialKey, EdgeAggregate, EdgeEvent, EdgeKind, EdgesOutcome,
    RunDetail, RunFilter, RunSummary, Spend, SpendLine,
};

impl Store {
    /// Adds a batch of calls to the ledger. Idempotent by `event_id`. Calls of runs the store
    /// does not know are kept too: the ledger records what happened, opened or not.
    pub async fn record_edges(&self, batch: &[EdgeEvent]) -> Result<EdgesOutcome, StoreError> {
        let mut outcome = EdgesOutcome::default();
        if batch.is_empty() {
            return Ok(outcome);
        }
        // Sorted, so concurrent batches lock rows in one order and cannot deadlock.
        let mut events: Vec<&EdgeEvent> = batch.iter().collect();
        events.sort_by(|a, b| a.event_id.cmp(&b.event_id));

        let mut tx = self.begin_write().await?;
        let mut opened = std::collections::BTreeSet::new();
        for event in &events {
            if !event.root.is_empty() && opened.insert(event.run_id.as_str()) {
                open_for_ledger(&mut tx, event).await?;
            }
        }
        let mut edges: BTreeMap<(&str, &str, &str), EdgeDelta> = BTreeMap::new();
        let mut denials: BTreeMap<(&str, &str, &str, &str, &str), u64> = BTreeMap::new();
        for event in events {
            let inserted = insert_call(&mut tx, event).await?;
            if !inserted {
                outcome.duplicates += 1;
                continue;
            }
            outcome.accepted += 1;
            edges
                .entry((&event.run_id, &event.caller, &event.callee))
                .or_insert_with(|| EdgeDelta::new(event))
                .add(event);
            if let Decision::Denied(reason) = &event.decision {
                let rule = event.rule.as_deref().unwrap_or("");
                let count = denials
                    .entry((&event.run_id, &event.caller, &event.callee, reason, rule))
                    .or_default();
                *count = count.saturating_add(1);
            }
        }
        for ((run_id, caller, callee), delta) in &edges {
            upsert_edge(&mut tx, run_id, caller, callee, delta).await?;
        }
        for ((run_id, caller, callee, reason, rule), count) in &denials {
            sqlx::query(
                "INSERT INTO edge_denials (run_id, caller, callee, reason, rule, count) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (run_id, caller, callee, reason, rule) DO UPDATE SET \
                 count = edge_denials.count + excluded.count",
            )
            .bind(*run_id)
            .bind(*caller)
            .bind(*callee)
            .bind(*reason)
            .bind(*rule)
            .bind(db("denials", *count)?)
            .execute(&mut *tx)
            .await
            .op("counting denials")?;
        }
        tx.commit().await.op("committing calls to the ledger")?;
        Ok(outcome)
    }

    /// A run with its totals, per-agent spend and edges; `None` if unknown.
    pub async fn get_run(&self, run_id: &str) -> Result<Option<RunDetail>, StoreError> {
        let mut tx = self.begin_read().await?;
        let Some(row) = sqlx::query(&format!("{SELECT_RUN} WHERE run_id = $1"))
            .bind(run_id)
            .fetch_optional(&mut *tx)
            .await
            .op("reading a run")?
        else {
            return Ok(None);
        };
        let run = RunRow::from_row(&row)?;
        let outstanding = outstanding(&mut tx, run_id).await?;
        let agents = agent_spend(&mut tx, run_id).await?;
        let edges = edges(&mut tx, run_id).await?;
        let calls = calls(&mut tx, &run.record).await?;
        tx.commit().await.op("ending a read")?;
        Ok(Some(RunDetail {
            summary: RunSummary {
                run: run.record,
                spent: run.spent,
                outstanding,
            },
            agents,
            edges,
            calls,
        }))
    }

    /// Spend grouped by team, environment, workflow, agent or model, over events at or after
    /// `since_ms` (all when `None`), largest cost first.
    pub async fn spend_by(
        &self,
        by: Attribution,
        since_ms: Option<u64>,
    ) -> Result<Vec<SpendLine>, StoreError> {
        let col = by.column();
        let sql = format!(
            "SELECT COALESCE({col}, '') AS k, \
             CAST(COALESCE(SUM(tokens_in), 0) AS BIGINT) AS tokens_in, \
             CAST(COALESCE(SUM(tokens_out), 0) AS BIGINT) AS tokens_out, \
             CAST(COALESCE(SUM(micros), 0) AS BIGINT) AS micros, \
             CAST(COALESCE(SUM(calls), 0) AS BIGINT) AS calls, \
             CAST(COUNT(DISTINCT run_id) AS BIGINT) AS runs \
             FROM spend_events WHERE at_ms >= $1 GROUP BY COALESCE({col}, '') \
             ORDER BY micros DESC, k"
        );
        let rows = sqlx::query(&sql)
            .bind(db("since_ms", since_ms.unwrap_or(0))?)
            .fetch_all(&self.pool)
            .await
            .op("summing spend")?;
        rows.iter()
            .map(|row| {
                Ok(SpendLine {
                    key: get(row, "k")?,
                    spent: Spend {
                        tokens_in: get_u64(row, "tokens_in")?,
                        tokens_out: get_u64(row, "tokens_out")?,
                        micros: get_u64(row, "micros")?,
                        calls: get_u64(row, "calls")?,
                    },
                    runs: get_u64(row, "runs")?,
                })
            })
            .collect()
    }

    /// Runs that match `filter`, newest first, at most `limit`.
    pub async fn list_runs(
        &self,
        filter: &RunFilter,
        limit: usize,
    ) -> Result<Vec<RunSummary>, StoreError> {
        let mut sql = format!(
            "SELECT r.*, \
             (SELECT CAST(COALESCE(SUM(l.remaining_tokens), 0) AS BIGINT) FROM leases l \
              WHERE l.run_id = r.run_id) AS out_tokens, \
             (SELECT CAST(COALESCE(SUM(l.remaining_micros), 0) AS BIGINT) FROM leases l \
              WHERE l.run_id = r.run_id) AS out_micros \
             FROM ({SELECT_RUN}) r WHERE 1 = 1"
        );
        let mut binds: Vec<String> = Vec::new();
        if let Some(status) = filter.status {
            binds.push(status.as_str().to_owned());
            sql.push_str(&format!(" AND r.status = ${}", binds.len()));
        }
        if let Some(user) = &filter.user {
            binds.push(user.clone());
            sql.push_str(&format!(" AND r.user_name = ${}", binds.len()));
        }
        if let Some(agent) = &filter.agent {
            binds.push(agent.clone());
            let n = binds.len();
            sql.push_str(&format!(
                " AND (r.root_agent = ${n} \
                 OR EXISTS (SELECT 1 FROM agent_spend a WHERE a.run_id = r.run_id AND a.agent = ${n}) \
                 OR EXISTS (SELECT 1 FROM edges e WHERE e.run_id = r.run_id \
                            AND (e.caller = ${n} OR e.callee = ${n})))"
            ));
        }
        sql.push_str(&format!(
            " ORDER BY r.opened_at_ms DESC, r.run_id LIMIT ${}",
            binds.len() + 1
        ));
        let mut query = sqlx::query(&sql);
        for bind in binds {
            query = query.bind(bind);
        }
        let rows = query
            .bind(db("limit", limit as u64)?)
            .fetch_all(&self.pool)
            .await
            .op("listing runs")?;
        rows.iter()
            .map(|row| {
                let run = RunRow::from_row(row)?;
                Ok(RunSummary {
                    run: run.record,
                    spent: run.spent,
                    outstanding: crate::budget::Amount {
                        tokens: get_u64(row, "out_tokens")?,
                        micros: get_u64(row, "out_micros")?,
                    },
                })
            })
            .collect()
    }
}

/// One edge's new calls within a batch.
#[derive(Debug, Clone)]
struct EdgeDelta {
    kind: EdgeKind,
    calls: u64,
    denials: u64,
    tokens: u64,
    micros: u64,
    max_depth: u32,
    cycles: u64,
    latency_us: u64,
    first_ms: u64,
    last_ms: u64,
}

impl EdgeDelta {
    fn new(event: &EdgeEvent) -> EdgeDelta {
        EdgeDelta {
            kind: event.kind,
            calls: 0,
            denials: 0,
            tokens: 0,
            micros: 0,
            max_depth: 0,
            cycles: 0,
            latency_us: 0,
            first_ms: event.at_ms,
            last_ms: event.at_ms,
        }
    }

    fn add(&mut self, event: &EdgeEvent) {
        self.calls = self.calls.saturating_add(1);
        if event.denied() {
            self.denials = self.denials.saturating_add(1);
        }
        self.cycles = self.cycles.saturating_add(u64::from(event.cycle));
        self.tokens = self.tokens.saturating_add(event.tokens());
        self.micros = self.micros.saturating_add(event.micros);
        self.max_depth = self.max_depth.max(event.depth);
        self.latency_us = self.latency_us.saturating_add(event.latency_us);
        self.first_ms = self.first_ms.min(event.at_ms);
        self.last_ms = self.last_ms.max(event.at_ms);
    }
}

async fn upsert_edge(
    tx: &mut Transaction<'static, Any>,
    run_id: &str,
    caller: &str,
    callee: &str,
    delta: &EdgeDelta,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO edges (run_id, caller, callee, kind, calls, denials, tokens, micros, \
         max_depth, total_latency_us, first_seen_ms, last_seen_ms, cycles) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
         ON CONFLICT (run_id, caller, callee) DO UPDATE SET \
         calls = edges.calls + excluded.calls, \
         denials = edges.denials + excluded.denials, \
         tokens = edges.tokens + excluded.tokens, \
         micros = edges.micros + excluded.micros, \
         max_depth = CASE WHEN excluded.max_depth > edges.max_depth \
             THEN excluded.max_depth ELSE edges.max_depth END, \
         total_latency_us = edges.total_latency_us + excluded.total_latency_us, \
         cycles = edges.cycles + excluded.cycles, \
         first_seen_ms = CASE WHEN excluded.first_seen_ms < edges.first_seen_ms \
             THEN excluded.first_seen_ms ELSE edges.first_seen_ms END, \
         last_seen_ms = CASE WHEN excluded.last_seen_ms > edges.last_seen_ms \
             THEN excluded.last_seen_ms ELSE edges.last_seen_ms END",
    )
    .bind(run_id)
    .bind(caller)
    .bind(callee)
    .bind(delta.kind.as_str())
    .bind(db("calls", delta.calls)?)
    .bind(db("denials", delta.denials)?)
    .bind(db("tokens", delta.tokens)?)
    .bind(db("micro-USD", delta.micros)?)
    .bind(i64::from(delta.max_depth))
    .bind(db("latency_us", delta.latency_us)?)
    .bind(db("at_ms", delta.first_ms)?)
    .bind(db("at_ms", delta.last_ms)?)
    .bind(db("cycles", delta.cycles)?)
    .execute(&mut **tx)
    .await
    .op("adding calls to an edge")?;
    Ok(())
}

async fn agent_spend(
    tx: &mut Transaction<'static, Any>,
    run_id: &str,
) -> Result<Vec<AgentSpend>, StoreError> {
    let rows = sqlx::query(
        "SELECT agent, tokens_in, tokens_out, micros, calls, first_at_ms, last_at_ms \
         FROM agent_spend WHERE run_id = $1 ORDER BY agent",
    )
    .bind(run_id)
    .fetch_all(&mut **tx)
    .await
    .op("reading per-agent spend")?;
    rows.iter()
        .map(|row| {
            Ok(AgentSpend {
                agent: get(row, "agent")?,
                spent: Spend {
                    tokens_in: get_u64(row, "tokens_in")?,
                    tokens_out: get_u64(row, "tokens_out")?,
                    micros: get_u64(row, "micros")?,
                    calls: get_u64(row, "calls")?,
                },
                first_at_ms: get_u64(row, "first_at_ms")?,
                last_at_ms: get_u64(row, "last_at_ms")?,
            })
        })
        .collect()
}

async fn edges(
    tx: &mut Transaction<'static, Any>,
    run_id: &str,
) -> Result<Vec<EdgeAggregate>, StoreError> {
    let denial_rows = sqlx::query(
        "SELECT caller, callee, reason, rule, count FROM edge_denials WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_all(&mut **tx)
    .await
    .op("reading denials")?;
    let mut denials: BTreeMap<(String, String), BTreeMap<DenialKey, u64>> = BTreeMap::new();
    for row in &denial_rows {
        let rule: String = get(row, "rule")?;
        denials
            .entry((get(row, "caller")?, get(row, "callee")?))
            .or_default()
            .insert(
                DenialKey {
                    reason: get(row, "reason")?,
                    rule: (!rule.is_empty()).then_some(rule),
                },
                get_u64(row, "count")?,
            );
    }
    let rows = sqlx::query(
        "SELECT caller, callee, kind, calls, tokens, micros, max_depth, cycles, total_latency_us, \
         first_seen_ms, last_seen_ms FROM edges WHERE run_id = $1 ORDER BY first_seen_ms, caller, callee",
    )
    .bind(run_id)
    .fetch_all(&mut **tx)
    .await
    .op("reading edges")?;
    rows.iter()
        .map(|row| edge_from_row(row, &mut denials))
        .collect()
}

fn edge_from_row(
    row: &AnyRow,
    denials: &mut BTreeMap<(String, String), BTreeMap<DenialKey, u64>>,
) -> Result<EdgeAggregate, StoreError> {
    let caller: String = get(row, "caller")?;
    let callee: String = get(row, "callee")?;
    let kind: String = get(row, "kind")?;
    let max_depth = get_u64(row, "max_depth")?;
    Ok(EdgeAggregate {
        kind: EdgeKind::parse(&kind).ok_or_else(|| StoreError::Corrupt {
            what: format!("edge kind {kind:?} of {caller} -> {callee}"),
        })?,
        calls: get_u64(row, "calls")?,
        denials: denials
            .remove(&(caller.clone(), callee.clone()))
            .unwrap_or_default(),
        tokens: get_u64(row, "tokens")?,
        micros: get_u64(row, "micros")?,
        max_depth: u32::try_from(max_depth).map_err(|_| StoreError::Corrupt {
            what: format!("depth {max_depth} of {caller} -> {callee}"),
        })?,
        cycles: get_u64(row, "cycles")?,
        total_latency_us: get_u64(row, "total_latency_us")?,
        first_seen_ms: get_u64(row, "first_seen_ms")?,
        last_seen_ms: get_u64(row, "last_seen_ms")?,
        caller,
        callee,
    })
}

/// Opens the run of `event` if no lease did: the ledger keeps every run, budgeted or not. A
/// lease that comes later sets the run's terms ([`Store::open_run`]).
async fn open_for_ledger(
    tx: &mut Transaction<'static, Any>,
    event: &EdgeEvent,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO runs (run_id, root_agent, user_name, on_breach, budgets, status, \
         opened_at_ms) VALUES ($1, $2, $3, $4, '[]', 'running', $5) \
         ON CONFLICT (run_id) DO NOTHING",
    )
    .bind(&event.run_id)
    .bind(&event.root)
    .bind(&event.user)
    .bind(super::on_breach_str(
        ringfence_crds::budget::OnBreach::default(),
    ))
    .bind(db("at_ms", event.at_ms)?)
    .execute(&mut **tx)
    .await
    .op("opening a run for the ledger")?;
    Ok(())
}

/// Keeps one call; `false` when its event id was recorded before (a re-sent batch).
async fn insert_call(
    tx: &mut Transaction<'static, Any>,
    event: &EdgeEvent,
) -> Result<bool, StoreError> {
    let (decision, reason) = match &event.decision {
        Decision::Allowed => ("allowed", None),
        Decision::Denied(reason) => (reason.as_str(), Some(reason)),
    };
    if reason.is_some_and(|r| r == "allowed") {
        return Err(StoreError::Invalid {
            what: format!(
                "call {}: \"allowed\" is not a reason to refuse a call",
                event.event_id
            ),
        });
    }
    let inserted = sqlx::query(
        "INSERT INTO calls (event_id, run_id, trace_id, span_id, parent_call, caller, callee, \
         kind, operation, decision, rule, depth, cycle, tainted, latency_us, tokens_in, \
         tokens_out, micros, at_ms, status) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
         $18, $19, $20) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(&event.event_id)
    .bind(&event.run_id)
    .bind(&event.trace_id)
    .bind(&event.span_id)
    .bind(event.parent_call.as_deref())
    .bind(&event.caller)
    .bind(&event.callee)
    .bind(event.kind.as_str())
    .bind(event.operation.as_deref())
    .bind(decision)
    .bind(event.rule.as_deref())
    .bind(i64::from(event.depth))
    .bind(i64::from(event.cycle))
    .bind(i64::from(event.tainted))
    .bind(db("latency_us", event.latency_us)?)
    .bind(db("tokens_in", event.tokens_in)?)
    .bind(db("tokens_out", event.tokens_out)?)
    .bind(db("micro-USD", event.micros)?)
    .bind(db("at_ms", event.at_ms)?)
    .bind(event.status.map(i64::from))
    .execute(&mut **tx)
    .await
    .op("recording a call")?;
    Ok(inserted.rows_affected() == 1)
}

/// A run's calls in the order they started (rows migrated from before calls were kept, which
/// carry no caller, are skipped).
async fn calls(
    tx: &mut Transaction<'static, Any>,
    run: &crate::budget::RunRecord,
) -> Result<Vec<EdgeEvent>, StoreError> {
    let run_id = run.run_id.as_str();
    let rows = sqlx::query(
        "SELECT event_id, trace_id, span_id, parent_call, caller, callee, kind, operation, \
         decision, rule, depth, cycle, tainted, latency_us, tokens_in, tokens_out, micros, \
         at_ms, status FROM calls WHERE run_id = $1 AND caller <> '' ORDER BY at_ms, event_id",
    )
    .bind(run_id)
    .fetch_all(&mut **tx)
    .await
    .op("reading a run's calls")?;
    rows.iter()
        .map(|row| {
            let event_id: String = get(row, "event_id")?;
            let kind: String = get(row, "kind")?;
            let decision: String = get(row, "decision")?;
            let small = |col: &'static str| -> Result<u32, StoreError> {
                let v = get_u64(row, col)?;
                u32::try_from(v).map_err(|_| StoreError::Corrupt {
                    what: format!("{col} {v} of call {event_id}"),
                })
            };
            let status: Option<i64> = get(row, "status")?;
            Ok(EdgeEvent {
                run_id: run_id.to_owned(),
                trace_id: get(row, "trace_id")?,
                span_id: get(row, "span_id")?,
                parent_call: get(row, "parent_call")?,
                root: run.root_agent.clone(),
                user: run.user.clone(),
                caller: get(row, "caller")?,
                callee: get(row, "callee")?,
                kind: EdgeKind::parse(&kind).ok_or_else(|| StoreError::Corrupt {
                    what: format!("kind {kind:?} of call {event_id}"),
                })?,
                operation: get(row, "operation")?,
                decision: if decision == "allowed" {
                    Decision::Allowed
                } else {
                    Decision::Denied(decision)
                },
                rule: get(row, "rule")?,
                depth: small("depth")?,
                cycle: get_u64(row, "cycle")? != 0,
                tainted: get_u64(row, "tainted")? != 0,
                latency_us: get_u64(row, "latency_us")?,
                tokens_in: get_u64(row, "tokens_in")?,
                tokens_out: get_u64(row, "tokens_out")?,
                micros: get_u64(row, "micros")?,
                at_ms: get_u64(row, "at_ms")?,
                status: status.and_then(|s| u16::try_from(s).ok()),
                event_id,
            })
        })
        .collect()
}
