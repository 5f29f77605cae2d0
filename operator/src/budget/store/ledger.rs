//! The run ledger: per-edge aggregates of every call, and the queries that read runs back.

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
        let mut edges: BTreeMap<(&str, &str, &str), EdgeDelta> = BTreeMap::new();
        let mut denials: BTreeMap<(&str, &str, &str, &str, &str), u64> = BTreeMap::new();
        for event in events {
            let inserted = sqlx::query(
                "INSERT INTO edge_events (event_id, run_id, at_ms) VALUES ($1, $2, $3) \
                 ON CONFLICT (event_id) DO NOTHING",
            )
            .bind(&event.event_id)
            .bind(&event.run_id)
            .bind(db("at_ms", event.at_ms)?)
            .execute(&mut *tx)
            .await
            .op("recording a call")?;
            if inserted.rows_affected() == 0 {
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
        tx.commit().await.op("ending a read")?;
        Ok(Some(RunDetail {
            summary: RunSummary {
                run: run.record,
                spent: run.spent,
                outstanding,
            },
            agents,
            edges,
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
            latency_us: 0,
            first_ms: event.at_ms,
            last_ms: event.at_ms,
        }
    }

    fn add(&mut self, event: &EdgeEvent) {
        self.calls = self.calls.saturating_add(1);
        if matches!(event.decision, Decision::Denied(_)) {
            self.denials = self.denials.saturating_add(1);
        }
        self.tokens = self.tokens.saturating_add(event.tokens);
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
         max_depth, total_latency_us, first_seen_ms, last_seen_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (run_id, caller, callee) DO UPDATE SET \
         calls = edges.calls + excluded.calls, \
         denials = edges.denials + excluded.denials, \
         tokens = edges.tokens + excluded.tokens, \
         micros = edges.micros + excluded.micros, \
         max_depth = CASE WHEN excluded.max_depth > edges.max_depth \
             THEN excluded.max_depth ELSE edges.max_depth END, \
         total_latency_us = edges.total_latency_us + excluded.total_latency_us, \
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
        "SELECT caller, callee, kind, calls, tokens, micros, max_depth, total_latency_us, \
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
        total_latency_us: get_u64(row, "total_latency_us")?,
        first_seen_ms: get_u64(row, "first_seen_ms")?,
        last_seen_ms: get_u64(row, "last_seen_ms")?,
        caller,
        callee,
    })
}
