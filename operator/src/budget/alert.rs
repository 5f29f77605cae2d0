//! Breach alerts: a JSON summary of the run posted to the RunBudget's webhook, and for a
//! windowed quota, a summary of the quota posted to its webhook once per window.
//!
//! The webhook of a run comes with the terms of its leases (the sidecars know it from their
//! bundles) and is remembered in memory, bounded. Delivery is best effort with a few retries:
//! an alert never blocks a lease or a report, and a webhook that is down is logged, not fatal.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use super::RunDetail;
use super::quota::QuotaTrip;
use super::store::Store;

/// How many runs' webhooks are remembered.
const CAPACITY: usize = 100_000;
const ATTEMPTS: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long an alert waits before reading the run: sidecars batch their spend reports (every
/// 100 ms), so spend made just before the breach may still be on its way. The halt itself is
/// never delayed; only the summary waits, so it is complete.
const SETTLE: Duration = Duration::from_secs(1);

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// What a breach alert says.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub kind: &'static str,
    pub run: String,
    pub root: String,
    pub user: String,
    pub status: String,
    /// The limit that tripped: `maxTotalTokens` or `maxCostUsd`.
    pub limit: String,
    pub spent: u64,
    pub limit_value: u64,
    pub reason: String,
    pub budgets: Vec<String>,
    pub spend_by_agent: Vec<AgentLine>,
    pub at_ms: u64,
}

/// What a quota's breach alert says: once per window, to the webhook of the quota's RunBudget.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct QuotaAlert {
    pub kind: &'static str,
    /// `<namespace>/<RunBudget>#<index>`.
    pub quota: String,
    /// `team:search`, ...
    pub key: String,
    pub window: String,
    pub window_start_ms: u64,
    /// `maxTotalTokens` or `maxCostUsd`.
    pub limit: String,
    pub spent: u64,
    pub limit_value: u64,
    pub reason: String,
    pub at_ms: u64,
}

/// One agent's part of a run's spend.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct AgentLine {
    pub agent: String,
    pub tokens_in: u64,
    pub tokens_out: u64,
    pub micros: u64,
    pub calls: u64,
}

impl Alert {
    /// The alert for `detail`, whose `limit` tripped.
    pub fn new(
        detail: &RunDetail,
        limit: &str,
        spent: u64,
        limit_value: u64,
        reason: &str,
        at_ms: u64,
    ) -> Self {
        let run = &detail.summary.run;
        Self {
            kind: "ringfence.run.budget_breached",
            run: run.run_id.clone(),
            root: run.root_agent.clone(),
            user: run.user.clone(),
            status: run.status.as_str().to_owned(),
            limit: limit.to_owned(),
            spent,
            limit_value,
            reason: reason.to_owned(),
            budgets: run.limits.budgets.clone(),
            spend_by_agent: detail
                .agents
                .iter()
                .map(|a| AgentLine {
                    agent: a.agent.clone(),
                    tokens_in: a.spent.tokens_in,
                    tokens_out: a.spent.tokens_out,
                    micros: a.spent.micros,
                    calls: a.spent.calls,
                })
                .collect(),
            at_ms,
        }
    }
}

/// A limit that tripped.
#[derive(Debug, Clone)]
pub struct Tripped {
    pub run: String,
    /// `maxTotalTokens` or `maxCostUsd`.
    pub limit: String,
    pub spent: u64,
    pub limit_value: u64,
    pub reason: String,
    pub at_ms: u64,
}

/// Remembers webhooks and delivers alerts.
pub struct Alerter {
    webhooks: Mutex<(HashMap<String, String>, VecDeque<String>)>,
    /// Runs already alerted whose breach does not halt them (AlertOnly), to alert once.
    alerted: Mutex<(std::collections::HashSet<String>, VecDeque<String>)>,
    client: Option<HttpsClient>,
}

impl Default for Alerter {
    fn default() -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(TIMEOUT));
        let client = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(ringfence_crds::svid::crypto_provider())
            .map(|b| {
                Client::builder(TokioExecutor::new())
                    .build(b.https_or_http().enable_http1().wrap_connector(http))
            })
            .map_err(
                |e| tracing::error!(error = %e, "alert webhooks are unavailable: no TLS provider"),
            )
            .ok();
        Self {
            webhooks: Mutex::new((HashMap::new(), VecDeque::new())),
            alerted: Mutex::new((std::collections::HashSet::new(), VecDeque::new())),
            client,
        }
    }
}

impl Alerter {
    /// Remembers where `run`'s alerts go.
    pub fn remember(&self, run: &str, webhook: Option<&str>) {
        let Some(url) = webhook else { return };
        let mut g = self.webhooks.lock().unwrap_or_else(PoisonError::into_inner);
        let (map, order) = &mut *g;
        if map.insert(run.to_owned(), url.to_owned()).is_none() {
            order.push_back(run.to_owned());
            if order.len() > CAPACITY
                && let Some(old) = order.pop_front()
            {
                map.remove(&old);
            }
        }
    }

    /// Whether this is the first breach alert of `run` (for breaches that do not halt it).
    pub fn first_alert(&self, run: &str) -> bool {
        let mut g = self.alerted.lock().unwrap_or_else(PoisonError::into_inner);
        let (set, order) = &mut *g;
        if !set.insert(run.to_owned()) {
            return false;
        }
        order.push_back(run.to_owned());
        if order.len() > CAPACITY
            && let Some(old) = order.pop_front()
        {
            set.remove(&old);
        }
        true
    }

    fn webhook(&self, run: &str) -> Option<String> {
        self.webhooks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .get(run)
            .cloned()
    }

    /// Sends the alert for the breach in the background, if its run has a webhook and its
    /// `onBreach` alerts.
    pub fn breached(self: &std::sync::Arc<Self>, store: &Store, breach: Tripped) {
        let Some(url) = self.webhook(&breach.run) else {
            return;
        };
        let this = self.clone();
        let store = store.clone();
        let Tripped {
            run,
            limit,
            spent,
            limit_value,
            reason,
            at_ms,
        } = breach;
        tokio::spawn(async move {
            tokio::time::sleep(SETTLE).await;
            let detail = match store.get_run(&run).await {
                Ok(Some(d)) => d,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(%run, error = %e, "cannot read the run for its alert");
                    return;
                }
            };
            if !detail.summary.run.limits.on_breach.alerts() {
                return;
            }
            let alert = Alert::new(&detail, &limit, spent, limit_value, &reason, at_ms);
            this.deliver(&url, &alert.run, &alert).await;
        });
    }

    /// Sends a quota's breach alert to its webhook in the background.
    pub fn quota_breached(self: &std::sync::Arc<Self>, url: &str, trip: &QuotaTrip, at_ms: u64) {
        let alert = QuotaAlert {
            kind: "ringfence.quota.exhausted",
            quota: trip.counter.id.clone(),
            key: trip.counter.key.clone(),
            window: trip.counter.window.clone(),
            window_start_ms: trip.window_start_ms,
            limit: trip.limit.as_str().to_owned(),
            spent: trip.spent,
            limit_value: trip.limit_value,
            reason: trip.reason(),
            at_ms,
        };
        let this = self.clone();
        let url = url.to_owned();
        tokio::spawn(async move {
            this.deliver(&url, &format!("{} {}", alert.quota, alert.key), &alert)
                .await;
        });
    }

    async fn deliver(&self, url: &str, what: &str, alert: &impl Serialize) {
        let Some(client) = &self.client else { return };
        let body = Bytes::from(serde_json::to_vec(alert).unwrap_or_default());
        for attempt in 1..=ATTEMPTS {
            let req = match Request::post(url)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()))
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(url, error = %e, "the alert webhook is not a valid URL");
                    return;
                }
            };
            match tokio::time::timeout(TIMEOUT, client.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => {
                    tracing::info!(run = %what, url, "budget alert delivered");
                    return;
                }
                Ok(Ok(resp)) => {
                    tracing::warn!(run = %what, url, status = %resp.status(), attempt, "the alert webhook refused the alert")
                }
                Ok(Err(e)) => {
                    tracing::warn!(run = %what, url, error = %e, attempt, "cannot deliver the alert")
                }
                Err(_) => {
                    tracing::warn!(run = %what, url, attempt, "the alert webhook did not answer")
                }
            }
            tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
        }
    }
}
