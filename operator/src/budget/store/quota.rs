//! Windowed quota counters in the store: their terms, their spend per time bucket, and which
//! leases reserve against them. The window arithmetic is in [`crate::budget::quota`].
//!
//! A counter's row in `quotas` is its lock: a lease or a report that touches a counter upserts
//! or reads that row first (`FOR UPDATE` in PostgreSQL; SQLite's write lock covers everything),
//! after the run rows it locks, and counters in sorted order, so transactions never deadlock
//! and two replicas cannot both grant a counter's last room.

use std::collections::BTreeMap;

use ringfence_crds::quota::QuotaTerm;
use sqlx::{Any, Transaction};

use super::{Backend, Op, Store, StoreError, db, db_opt, get, get_u64, on_breach_str, opt_u64};
use crate::budget::quota::{self, CounterId, QuotaState, QuotaStatus, QuotaTrip, Span};
use crate::budget::{Amount, BudgetLimit, RunStatus};

/// How long a lease reserves against its quotas. A sidecar keeps what is left of a run's lease
/// until the run ends, and many runs share one quota: without a bound, each finished run would
/// strand its lease's rest and shrink the quota for the whole window. Spend reported under an
/// older lease still counts in full; only the reservation lapses.
pub const LEASE_HOLD_MS: u64 = 5 * 60 * 1_000;

/// A counter's stored terms and breach mark, read under its lock.
#[derive(Debug, Clone)]
pub(super) struct CounterRow {
    pub counter: CounterId,
    pub span: Span,
    pub max_tokens: Option<u64>,
    pub max_micros: Option<u64>,
    pub on_breach: ringfence_crds::budget::OnBreach,
    pub alert_webhook: Option<String>,
    pub tripped_ms: Option<u64>,
    /// When it was read: leases granted before `now_ms - LEASE_HOLD_MS` no longer reserve.
    pub now_ms: u64,
}

impl CounterRow {
    /// The breach when the window's spend reached a limit.
    pub fn trip(&self, state: &QuotaState) -> Option<QuotaTrip> {
        let (limit, spent, limit_value) = state.spent_limit()?;
        Some(self.trip_at(limit, spent, limit_value))
    }

    /// The breach of `limit`, `spent` of `limit_value` being reported.
    pub fn trip_at(&self, limit: BudgetLimit, spent: u64, limit_value: u64) -> QuotaTrip {
        QuotaTrip {
            counter: self.counter.clone(),
            limit,
            spent,
            limit_value,
            on_breach: self.on_breach,
            alert_webhook: self.alert_webhook.clone(),
            window_start_ms: self.span.from_ms,
        }
    }
}

impl Store {
    /// Records a lease's quota terms as the counters' current terms and locks their rows.
    pub(super) async fn upsert_counter(
        &self,
        tx: &mut Transaction<'static, Any>,
        term: &QuotaTerm,
        now_ms: u64,
    ) -> Result<CounterRow, StoreError> {
        let counter = CounterId::of(term);
        sqlx::query(
            "INSERT INTO quotas (quota_id, quota_key, win, max_tokens, max_micros, on_breach, \
             alert_webhook, seen_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (quota_id, quota_key, win) DO UPDATE SET \
             max_tokens = excluded.max_tokens, max_micros = excluded.max_micros, \
             on_breach = excluded.on_breach, alert_webhook = excluded.alert_webhook, \
             seen_at_ms = excluded.seen_at_ms",
        )
        .bind(&counter.id)
        .bind(&counter.key)
        .bind(&counter.window)
        .bind(db_opt("quota maxTotalTokens", term.max_total_tokens)?)
        .bind(db_opt(
            "quota maxCostUsd (micro-USD)",
            term.max_cost_micros,
        )?)
        .bind(on_breach_str(term.on_breach))
        .bind(term.alert_webhook.as_deref())
        .bind(db("now_ms", now_ms)?)
        .execute(&mut **tx)
        .await
        .op("recording a quota")?;
        self.read_counter(tx, &counter, now_ms, true)
            .await?
            .ok_or_else(|| StoreError::Corrupt {
                what: format!("{counter} vanished while it was recorded"),
            })
    }

    /// Reads a counter's row, with `lock` locking it until commit (writes only: PostgreSQL's
    /// read-only snapshots refuse `FOR UPDATE`). `None`: no lease ever named it.
    pub(super) async fn read_counter(
        &self,
        tx: &mut Transaction<'static, Any>,
        counter: &CounterId,
        now_ms: u64,
        lock: bool,
    ) -> Result<Option<CounterRow>, StoreError> {
        let lock = match (self.backend, lock) {
            (Backend::Postgres, true) => " FOR UPDATE",
            _ => "",
        };
        let row = sqlx::query(&format!(
            "SELECT max_tokens, max_micros, on_breach, alert_webhook, tripped_ms FROM quotas \
             WHERE quota_id = $1 AND quota_key = $2 AND win = $3{lock}"
        ))
        .bind(&counter.id)
        .bind(&counter.key)
        .bind(&counter.window)
        .fetch_optional(&mut **tx)
        .await
        .op("reading a quota")?;
        let Some(row) = row else { return Ok(None) };
        let (window, sliding) =
            quota::parse_label(&counter.window).ok_or_else(|| StoreError::Corrupt {
                what: format!("window of {counter}"),
            })?;
        let on_breach: String = get(&row, "on_breach")?;
        Ok(Some(CounterRow {
            counter: counter.clone(),
            span: quota::span(window, sliding, now_ms),
            max_tokens: opt_u64(&row, "max_tokens")?,
            max_micros: opt_u64(&row, "max_micros")?,
            on_breach: super::parse_on_breach(&on_breach).ok_or_else(|| StoreError::Corrupt {
                what: format!("onBreach of {counter}"),
            })?,
            alert_webhook: get(&row, "alert_webhook")?,
            tripped_ms: opt_u64(&row, "tripped_ms")?,
            now_ms,
        }))
    }

    /// Marks the counter's breach handled for its current window.
    pub(super) async fn mark_tripped(
        &self,
        tx: &mut Transaction<'static, Any>,
        row: &CounterRow,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE quotas SET tripped_ms = $4 WHERE quota_id = $1 AND quota_key = $2 AND win = $3",
        )
        .bind(&row.counter.id)
        .bind(&row.counter.key)
        .bind(&row.counter.window)
        .bind(db("now_ms", row.span.trip_mark_ms)?)
        .execute(&mut **tx)
        .await
        .op("marking a quota breached")?;
        Ok(())
    }

    /// Every known counter with its current window's spend, sorted by id, key and window.
    pub async fn quota_usage(&self, now_ms: u64) -> Result<Vec<QuotaStatus>, StoreError> {
        let mut tx = self.begin_read().await?;
        let rows = sqlx::query(
            "SELECT quota_id, quota_key, win FROM quotas ORDER BY quota_id, quota_key, win",
        )
        .fetch_all(&mut *tx)
        .await
        .op("listing quotas")?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let counter = CounterId {
                id: get(row, "quota_id")?,
                key: get(row, "quota_key")?,
                window: get(row, "win")?,
            };
            let Some(c) = self.read_counter(&mut tx, &counter, now_ms, false).await? else {
                continue;
            };
            let state = counter_state(&mut tx, &c).await?;
            out.push(QuotaStatus {
                exhausted: state.no_room(),
                counter,
                window_start_ms: c.span.from_ms,
                window_end_ms: c.span.until_ms,
                tokens: state.spent.tokens,
                micros: state.spent.micros,
                max_tokens: c.max_tokens,
                max_micros: c.max_micros,
                outstanding: state.outstanding,
                on_breach: c.on_breach,
            });
        }
        tx.commit().await.op("finishing a quota read")?;
        Ok(out)
    }

    /// The runs still running that spent or leased under `counter`: what its breach halts.
    pub async fn quota_runs(&self, counter: &CounterId) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "SELECT DISTINCT r.run_id FROM lease_quotas q \
             JOIN leases l ON l.lease_id = q.lease_id \
             JOIN runs r ON r.run_id = l.run_id \
             WHERE q.quota_id = $1 AND q.quota_key = $2 AND q.win = $3 AND r.status = $4 \
             ORDER BY r.run_id",
        )
        .bind(&counter.id)
        .bind(&counter.key)
        .bind(&counter.window)
        .bind(RunStatus::Running.as_str())
        .fetch_all(&self.pool)
        .await
        .op("finding the runs of a quota")?;
        rows.iter().map(|r| get(r, "run_id")).collect()
    }
}

/// A counter's spend in its window and what its leases still hold.
pub(super) async fn counter_state(
    tx: &mut Transaction<'static, Any>,
    c: &CounterRow,
) -> Result<QuotaState, StoreError> {
    let spent = sqlx::query(
        "SELECT CAST(COALESCE(SUM(tokens), 0) AS BIGINT) AS tokens, \
         CAST(COALESCE(SUM(micros), 0) AS BIGINT) AS micros FROM quota_buckets \
         WHERE quota_id = $1 AND quota_key = $2 AND win = $3 AND start_ms >= $4",
    )
    .bind(&c.counter.id)
    .bind(&c.counter.key)
    .bind(&c.counter.window)
    .bind(db("window start", c.span.from_ms)?)
    .fetch_one(&mut **tx)
    .await
    .op("summing a quota's window")?;
    let outstanding = sqlx::query(
        "SELECT CAST(COALESCE(SUM(l.remaining_tokens), 0) AS BIGINT) AS tokens, \
         CAST(COALESCE(SUM(l.remaining_micros), 0) AS BIGINT) AS micros \
         FROM lease_quotas q JOIN leases l ON l.lease_id = q.lease_id \
         WHERE q.quota_id = $1 AND q.quota_key = $2 AND q.win = $3 \
         AND (l.remaining_tokens > 0 OR l.remaining_micros > 0) AND l.granted_at_ms >= $4",
    )
    .bind(&c.counter.id)
    .bind(&c.counter.key)
    .bind(&c.counter.window)
    .bind(db("now_ms", c.now_ms.saturating_sub(LEASE_HOLD_MS))?)
    .fetch_one(&mut **tx)
    .await
    .op("summing a quota's outstanding leases")?;
    Ok(QuotaState {
        max_tokens: c.max_tokens,
        max_micros: c.max_micros,
        spent: Amount {
            tokens: get_u64(&spent, "tokens")?,
            micros: get_u64(&spent, "micros")?,
        },
        outstanding: Amount {
            tokens: get_u64(&outstanding, "tokens")?,
            micros: get_u64(&outstanding, "micros")?,
        },
    })
}

/// Ties a lease to the counters it reserves against.
pub(super) async fn link_lease(
    tx: &mut Transaction<'static, Any>,
    lease_id: &str,
    counters: &[CounterRow],
) -> Result<(), StoreError> {
    for c in counters {
        sqlx::query(
            "INSERT INTO lease_quotas (lease_id, quota_id, quota_key, win) \
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(lease_id)
        .bind(&c.counter.id)
        .bind(&c.counter.key)
        .bind(&c.counter.window)
        .execute(&mut **tx)
        .await
        .op("tying a lease to its quotas")?;
    }
    Ok(())
}

/// The counters a lease's spend counts toward.
pub(super) async fn lease_counters(
    tx: &mut Transaction<'static, Any>,
    lease_id: &str,
) -> Result<Vec<CounterId>, StoreError> {
    let rows = sqlx::query(
        "SELECT quota_id, quota_key, win FROM lease_quotas WHERE lease_id = $1 \
         ORDER BY quota_id, quota_key, win",
    )
    .bind(lease_id)
    .fetch_all(&mut **tx)
    .await
    .op("reading a lease's quotas")?;
    rows.iter()
        .map(|r| {
            Ok(CounterId {
                id: get(r, "quota_id")?,
                key: get(r, "quota_key")?,
                window: get(r, "win")?,
            })
        })
        .collect()
}

/// Adds spend to the counter's current bucket and drops buckets no window sums any more.
pub(super) async fn add_to_bucket(
    tx: &mut Transaction<'static, Any>,
    c: &CounterRow,
    spent: Amount,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO quota_buckets (quota_id, quota_key, win, start_ms, tokens, micros) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (quota_id, quota_key, win, start_ms) DO UPDATE SET \
         tokens = quota_buckets.tokens + excluded.tokens, \
         micros = quota_buckets.micros + excluded.micros",
    )
    .bind(&c.counter.id)
    .bind(&c.counter.key)
    .bind(&c.counter.window)
    .bind(db("bucket", c.span.bucket_ms)?)
    .bind(db("tokens", spent.tokens)?)
    .bind(db("micro-USD", spent.micros)?)
    .execute(&mut **tx)
    .await
    .op("adding spend to a quota")?;
    sqlx::query(
        "DELETE FROM quota_buckets WHERE quota_id = $1 AND quota_key = $2 AND win = $3 \
         AND start_ms < $4",
    )
    .bind(&c.counter.id)
    .bind(&c.counter.key)
    .bind(&c.counter.window)
    .bind(db("bucket", c.span.keep_from_ms())?)
    .execute(&mut **tx)
    .await
    .op("dropping expired quota buckets")?;
    Ok(())
}

/// Spend per counter within one report, from the leases its events name.
pub(super) type CounterSpend = BTreeMap<CounterId, Amount>;

/// Adds `spent` to what a report owes `counter`.
pub(super) fn owe(owed: &mut CounterSpend, counter: CounterId, spent: Amount) {
    let slot = owed.entry(counter).or_default();
    slot.tokens = slot.tokens.saturating_add(spent.tokens);
    slot.micros = slot.micros.saturating_add(spent.micros);
}
