//! The budget service's side of windowed quotas: checking the quota terms a lease brings,
//! handling a quota's breach (halting the runs that spend under it and alerting, once per
//! window), and showing the counters (`GET /v1/quotas`, and its Prometheus text at
//! `GET /v1/quotas/metrics`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use ringfence_crds::api::LeaseResponse;
use ringfence_crds::quota::QuotaTerm;

use super::{BudgetService, ServiceError, check_name, invalid, now_ms};
use crate::budget::quota::{CounterId, QuotaStatus, QuotaTrip};
use crate::budget::{BudgetLimit, HaltOutcome};
use crate::distribute::server::Body;

/// Most quota terms one lease may carry.
pub const MAX_QUOTAS: usize = 32;

/// Breaches counted per counter since the service started, for `ringfence_quota_exhausted_total`.
#[derive(Default)]
pub(super) struct Exhaustions(Mutex<BTreeMap<CounterId, u64>>);

impl Exhaustions {
    fn count(&self, counter: &CounterId) {
        let mut g = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Bounded by the configured quotas' keys, which leases bring; one line per counter.
        *g.entry(counter.clone()).or_default() += 1;
    }

    fn snapshot(&self) -> BTreeMap<CounterId, u64> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Checks the quota terms of a lease request: bounded in number and size.
pub(super) fn check_quotas(quotas: &[QuotaTerm]) -> Result<(), ServiceError> {
    if quotas.len() > MAX_QUOTAS {
        return Err(invalid(
            "terms.quotas",
            format!("at most {MAX_QUOTAS} quotas, got {}", quotas.len()),
        ));
    }
    for (i, q) in quotas.iter().enumerate() {
        check_name(&format!("terms.quotas[{i}].id"), &q.id, false)?;
        check_name(&format!("terms.quotas[{i}].key"), &q.key, false)?;
        if let Some(url) = &q.alert_webhook {
            check_name(&format!("terms.quotas[{i}].alertWebhook"), url, false)?;
        }
        if q.max_total_tokens.is_some_and(|v| v > i64::MAX as u64)
            || q.max_cost_micros.is_some_and(|v| v > i64::MAX as u64)
        {
            return Err(invalid(
                &format!("terms.quotas[{i}]"),
                format!("limits above {} do not fit the store", i64::MAX),
            ));
        }
    }
    Ok(())
}

impl BudgetService {
    /// A lease refused because a quota has nothing left: handles the breach this lease found
    /// first, halts the leasing run too when the quota's `onBreach` halts (a run that starts
    /// after the breach stops at its first call), and names the quota.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn quota_refused(
        &self,
        run: &str,
        quotas: &[QuotaTerm],
        counter: CounterId,
        limit: BudgetLimit,
        used: u64,
        limit_value: u64,
        trip: Option<QuotaTrip>,
    ) -> Result<LeaseResponse, ServiceError> {
        if let Some(trip) = &trip {
            self.quota_tripped(trip).await;
        }
        let halts = quotas
            .iter()
            .find(|t| CounterId::of(t) == counter)
            .is_some_and(|t| t.on_breach.halts());
        if halts {
            let reason = format!(
                "{counter} is exhausted: {used} {} spent of {limit_value} this window",
                unit(limit)
            );
            if matches!(
                self.store.halt(run, &reason, now_ms()).await?,
                HaltOutcome::Halted(_)
            ) {
                self.poke.notify_one();
            }
        }
        Ok(LeaseResponse::Exhausted {
            limit: counter.to_string(),
            spent: used,
            limit_value,
        })
    }

    /// A quota's window is spent, for the first time in this window: halts every open run that
    /// leased under it (per `onBreach`) and alerts its webhook.
    pub(super) async fn quota_tripped(&self, trip: &QuotaTrip) {
        self.exhaustions.count(&trip.counter);
        let reason = trip.reason();
        tracing::warn!(
            quota = %trip.counter.id,
            key = %trip.counter.key,
            window = %trip.counter.window,
            spent = trip.spent,
            limit_value = trip.limit_value,
            "windowed quota spent"
        );
        let now = now_ms();
        if trip.on_breach.halts() {
            // The breach is committed before its halts: were they to fail (or the service to
            // die here), each of those runs is halted at its next lease, which the spent
            // quota refuses.
            if let Err(e) = self.halt_quota_runs(trip, &reason, now).await {
                tracing::error!(quota = %trip.counter, error = %e, "cannot halt the runs of a spent quota; each halts at its next lease");
            }
        }
        if trip.on_breach.alerts()
            && let Some(url) = &trip.alert_webhook
        {
            self.alerter.quota_breached(url, trip, now);
        }
    }

    async fn halt_quota_runs(
        &self,
        trip: &QuotaTrip,
        reason: &str,
        now: u64,
    ) -> Result<(), ServiceError> {
        let mut halted = false;
        for run in self.store.quota_runs(&trip.counter).await? {
            halted |= matches!(
                self.store.halt(&run, reason, now).await?,
                HaltOutcome::Halted(_)
            );
        }
        if halted {
            self.poke.notify_one();
        }
        Ok(())
    }

    /// Every counter with its window's spend.
    pub(super) async fn quotas(&self) -> Result<Vec<QuotaStatus>, ServiceError> {
        Ok(self.store.quota_usage(now_ms()).await?)
    }

    /// The counters in Prometheus' text format.
    pub(super) async fn quota_metrics(&self) -> Result<Response<Body>, ServiceError> {
        let quotas = self.quotas().await?;
        let text = render_metrics(&quotas, &self.exhaustions.snapshot());
        Ok(Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4")
            .body(Full::new(Bytes::from(text)).boxed_unsync())
            .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed_unsync())))
    }
}

fn unit(limit: BudgetLimit) -> &'static str {
    match limit {
        BudgetLimit::MaxTotalTokens => "tokens",
        BudgetLimit::MaxCostUsd => "micro-USD",
    }
}

/// A metric family: name, type, help, and its value for one counter (if it has one).
type Family = (
    &'static str,
    &'static str,
    &'static str,
    fn(&QuotaStatus) -> Option<u64>,
);

/// `ringfence_quota_*` gauges per counter, and breaches since start.
pub fn render_metrics(quotas: &[QuotaStatus], exhausted: &BTreeMap<CounterId, u64>) -> String {
    let mut out = String::new();
    let families: [Family; 5] = [
        (
            "ringfence_quota_spent_tokens",
            "gauge",
            "Tokens spent in the quota's current window.",
            |q| Some(q.tokens),
        ),
        (
            "ringfence_quota_spent_micro_usd",
            "gauge",
            "Micro-dollars spent in the quota's current window.",
            |q| Some(q.micros),
        ),
        (
            "ringfence_quota_limit_tokens",
            "gauge",
            "The quota's token limit per window.",
            |q| q.max_tokens,
        ),
        (
            "ringfence_quota_limit_micro_usd",
            "gauge",
            "The quota's limit in micro-dollars per window.",
            |q| q.max_micros,
        ),
        (
            "ringfence_quota_exhausted",
            "gauge",
            "1 while the quota's current window is spent.",
            |q| Some(u64::from(q.exhausted)),
        ),
    ];
    for (name, kind, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for q in quotas {
            if let Some(v) = value(q) {
                let _ = writeln!(out, "{name}{{{}}} {v}", labels(&q.counter));
            }
        }
    }
    let name = "ringfence_quota_exhausted_total";
    let _ = writeln!(
        out,
        "# HELP {name} Quota windows spent since this budget service started.\n# TYPE {name} counter"
    );
    for (counter, n) in exhausted {
        let _ = writeln!(out, "{name}{{{}}} {n}", labels(counter));
    }
    out
}

fn labels(c: &CounterId) -> String {
    format!(
        "quota=\"{}\",key=\"{}\",window=\"{}\"",
        escape(&c.id),
        escape(&c.key),
        escape(&c.window)
    )
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::Amount;

    #[test]
    fn metrics_name_each_quota_by_id_key_and_window() {
        let counter = CounterId {
            id: "prod/daily#0".into(),
            key: "team:search".into(),
            window: "day".into(),
        };
        let status = QuotaStatus {
            counter: counter.clone(),
            window_start_ms: 0,
            window_end_ms: 1,
            tokens: 1_200,
            micros: 5,
            max_tokens: Some(1_000),
            max_micros: None,
            outstanding: Amount::default(),
            on_breach: Default::default(),
            exhausted: true,
        };
        let text = render_metrics(&[status], &BTreeMap::from([(counter, 1)]));
        let labels = "quota=\"prod/daily#0\",key=\"team:search\",window=\"day\"";
        assert!(text.contains(&format!("ringfence_quota_spent_tokens{{{labels}}} 1200")));
        assert!(text.contains(&format!("ringfence_quota_exhausted{{{labels}}} 1")));
        assert!(text.contains(&format!("ringfence_quota_exhausted_total{{{labels}}} 1")));
        assert!(!text.contains("ringfence_quota_limit_micro_usd{"));
    }
}
