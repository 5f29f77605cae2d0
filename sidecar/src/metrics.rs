//! The control-plane metrics of the sidecar, in Prometheus text format.
//!
//! Labels are bounded: `outcome` takes two values; `direction`, `kind` and `decision` a handful
//! each. Nothing names a run or a bundle hash.

use std::time::Duration;

use prometheus::{
    CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Why the metrics could not be set up (a duplicate name: a sidecar bug).
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot register metric {name}: {source}")]
    Register {
        name: &'static str,
        source: prometheus::Error,
    },
}

fn failed(name: &'static str) -> impl FnOnce(prometheus::Error) -> MetricsError {
    move |source| MetricsError::Register { name, source }
}

/// Outcome label of updates and renewals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The bundle is enforced / the SVID was issued.
    Ok,
    /// The bundle was rejected / the request for an SVID failed.
    Failed,
}

/// Every control-plane metric of one sidecar, registered in its own registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    bundle_version: IntGauge,
    bundle_updates: IntCounterVec,
    svid_expiry: IntGauge,
    svid_renewals: IntCounterVec,
    requests: IntCounterVec,
    request_seconds: HistogramVec,
    tokens: IntCounterVec,
    cost_usd: CounterVec,
    usage_estimated: IntCounterVec,
    model_fallbacks: IntCounterVec,
    telemetry_sent: IntCounterVec,
    telemetry_dropped: IntCounterVec,
    retries: IntCounterVec,
    retry_budget_exhausted: IntCounterVec,
    fallbacks: IntCounterVec,
    inbound_connections: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let bundle_version = IntGauge::new(
            "ringfence_bundle_version",
            "Version of the policy bundle this sidecar enforces (0: none yet).",
        )
        .map_err(failed("ringfence_bundle_version"))?;
        let bundle_updates = IntCounterVec::new(
            Opts::new(
                "ringfence_bundle_updates_total",
                "Bundles received, by outcome (applied or rejected).",
            ),
            &["outcome"],
        )
        .map_err(failed("ringfence_bundle_updates_total"))?;
        let svid_expiry = IntGauge::new(
            "ringfence_svid_expiry_timestamp_seconds",
            "When the current X.509-SVID expires, seconds since the Unix epoch (0: none).",
        )
        .map_err(failed("ringfence_svid_expiry_timestamp_seconds"))?;
        let svid_renewals = IntCounterVec::new(
            Opts::new(
                "ringfence_svid_renewals_total",
                "Requests for an X.509-SVID (first issuance and renewals), by outcome.",
            ),
            &["outcome"],
        )
        .map_err(failed("ringfence_svid_renewals_total"))?;
        registry
            .register(Box::new(bundle_version.clone()))
            .map_err(failed("ringfence_bundle_version"))?;
        registry
            .register(Box::new(bundle_updates.clone()))
            .map_err(failed("ringfence_bundle_updates_total"))?;
        registry
            .register(Box::new(svid_expiry.clone()))
            .map_err(failed("ringfence_svid_expiry_timestamp_seconds"))?;
        registry
            .register(Box::new(svid_renewals.clone()))
            .map_err(failed("ringfence_svid_renewals_total"))?;
        let requests = IntCounterVec::new(
            Opts::new(
                "ringfence_requests_total",
                "Calls through the sidecar, by direction (outbound, inbound), kind (agent, tool, model, discovery, unknown), peer (the agent, tool server or model provider, as the bundle names it; `agents` for a `GET /agents` listing; `unknown` otherwise) and decision (allowed, or the refusal: policy, depth, cycle, rate_limit, timeout, ...).",
            ),
            &["direction", "kind", "peer", "decision"],
        )
        .map_err(failed("ringfence_requests_total"))?;
        let request_seconds = HistogramVec::new(
            HistogramOpts::new(
                "ringfence_request_duration_seconds",
                "Time from a call's arrival to its response head, by direction and kind.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["direction", "kind"],
        )
        .map_err(failed("ringfence_request_duration_seconds"))?;
        let tokens = IntCounterVec::new(
            Opts::new("ringfence_tokens_total", "LLM tokens through this sidecar, by provider, model (as priced; `other` when the model is not in the pricing table) and kind (input, output)."),
            &["provider", "model", "kind"],
        )
        .map_err(failed("ringfence_tokens_total"))?;
        // Prometheus counts in base units (dollars); accounting itself stays in integer
        // micro-dollars, and every increment is a whole number of them.
        let cost_usd = CounterVec::new(
            Opts::new(
                "ringfence_cost_usd_total",
                "LLM cost through this sidecar in US dollars, by provider and model.",
            ),
            &["provider", "model"],
        )
        .map_err(failed("ringfence_cost_usd_total"))?;
        registry
            .register(Box::new(cost_usd.clone()))
            .map_err(failed("ringfence_cost_usd_total"))?;
        let usage_estimated = IntCounterVec::new(
            Opts::new(
                "ringfence_usage_estimated_total",
                "LLM answers whose usage could not be read and was estimated, by reason.",
            ),
            &["reason"],
        )
        .map_err(failed("ringfence_usage_estimated_total"))?;
        let model_fallbacks = IntCounterVec::new(
            Opts::new(
                "ringfence_model_fallbacks_total",
                "Fallback routes model calls reached, by the provider first asked (`provider`), the fallback route's provider (`to`, both as the bundle names them) and `reason`: why the route before it failed (`server_error`, `rate_limited`, `timeout`, `unreachable`), or `policy` when this route was skipped because policy denies its model.",
            ),
            &["provider", "to", "reason"],
        )
        .map_err(failed("ringfence_model_fallbacks_total"))?;
        let telemetry_sent = IntCounterVec::new(
            Opts::new(
                "ringfence_telemetry_sent_total",
                "Records delivered, by queue: `spans` (to the OTLP endpoint), `ledger` (calls to the budget service's run ledger) and `decisions` (decision log lines written).",
            ),
            &["queue"],
        )
        .map_err(failed("ringfence_telemetry_sent_total"))?;
        let telemetry_dropped = IntCounterVec::new(
            Opts::new(
                "ringfence_telemetry_dropped_total",
                "Records dropped, by queue (`spans`, `ledger`, `decisions`): the queue was full, or the endpoint refused or could not be reached. Requests never wait for telemetry.",
            ),
            &["queue"],
        )
        .map_err(failed("ringfence_telemetry_dropped_total"))?;
        let retries = IntCounterVec::new(
            Opts::new(
                "ringfence_retries_total",
                "Retries this sidecar made (attempts after a call's first), by callee (the agent or tool server, as the bundle names it) and outcome (answered: the retry got an answer a retry would not cure; failed: it failed again).",
            ),
            &["callee", "outcome"],
        )
        .map_err(failed("ringfence_retries_total"))?;
        let retry_budget_exhausted = IntCounterVec::new(
            Opts::new(
                "ringfence_retry_budget_exhausted_total",
                "Retries not made because the callee's retry budget was spent, by callee.",
            ),
            &["callee"],
        )
        .map_err(failed("ringfence_retry_budget_exhausted_total"))?;
        let fallbacks = IntCounterVec::new(
            Opts::new(
                "ringfence_fallbacks_total",
                "Calls to a failed agent sent on to its fallback agent, by from, to (agents as the bundle names them) and outcome (answered, failed, or denied: policy does not permit the fallback edge).",
            ),
            &["from", "to", "outcome"],
        )
        .map_err(failed("ringfence_fallbacks_total"))?;
        let inbound_connections = IntCounterVec::new(
            Opts::new(
                "ringfence_inbound_connections_total",
                "mTLS connections other sidecars opened to this one, by protocol (http/1.1, up to 32 per caller; h2 for what overflows them, and from sidecars of earlier releases). Callers keep connections alive: a rate that follows the request rate means they are not reused.",
            ),
            &["protocol"],
        )
        .map_err(failed("ringfence_inbound_connections_total"))?;
        for protocol in ["http/1.1", "h2"] {
            inbound_connections.with_label_values(&[protocol]);
        }
        for (m, name) in [
            (&inbound_connections, "ringfence_inbound_connections_total"),
            (&retries, "ringfence_retries_total"),
            (
                &retry_budget_exhausted,
                "ringfence_retry_budget_exhausted_total",
            ),
            (&fallbacks, "ringfence_fallbacks_total"),
        ] {
            registry
                .register(Box::new(m.clone()))
                .map_err(failed(name))?;
        }
        for queue in ["spans", "ledger", "decisions"] {
            telemetry_sent.with_label_values(&[queue]);
            telemetry_dropped.with_label_values(&[queue]);
        }
        for (m, name) in [
            (&tokens, "ringfence_tokens_total"),
            (&usage_estimated, "ringfence_usage_estimated_total"),
            (&model_fallbacks, "ringfence_model_fallbacks_total"),
            (&telemetry_sent, "ringfence_telemetry_sent_total"),
            (&telemetry_dropped, "ringfence_telemetry_dropped_total"),
        ] {
            registry
                .register(Box::new(m.clone()))
                .map_err(failed(name))?;
        }
        registry
            .register(Box::new(requests.clone()))
            .map_err(failed("ringfence_requests_total"))?;
        registry
            .register(Box::new(request_seconds.clone()))
            .map_err(failed("ringfence_request_duration_seconds"))?;
        // Both outcomes exist from the start, so a rate() over them never sees a missing series.
        for outcome in ["applied", "rejected"] {
            bundle_updates.with_label_values(&[outcome]);
        }
        for outcome in ["success", "failure"] {
            svid_renewals.with_label_values(&[outcome]);
        }
        Ok(Self {
            registry,
            bundle_version,
            bundle_updates,
            svid_expiry,
            svid_renewals,
            requests,
            request_seconds,
            tokens,
            cost_usd,
            usage_estimated,
            model_fallbacks,
            telemetry_sent,
            telemetry_dropped,
            retries,
            retry_budget_exhausted,
            fallbacks,
            inbound_connections,
        })
    }

    /// Counts one mTLS connection accepted from another sidecar, by its protocol.
    pub fn inbound_connection(&self, h2: bool) {
        let protocol = if h2 { "h2" } else { "http/1.1" };
        self.inbound_connections
            .with_label_values(&[protocol])
            .inc();
    }

    /// Counts one retry to `callee` (a name from the bundle) by its `outcome` (`answered`,
    /// `failed`).
    pub fn retried(&self, callee: &str, outcome: &'static str) {
        self.retries.with_label_values(&[callee, outcome]).inc();
    }

    /// Counts one retry to `callee` that the retry budget did not allow.
    pub fn retry_budget_exhausted(&self, callee: &str) {
        self.retry_budget_exhausted
            .with_label_values(&[callee])
            .inc();
    }

    /// Counts one fallback from agent `from` to agent `to` by its `outcome` (`answered`,
    /// `failed`, `denied`).
    pub fn fallback(&self, from: &str, to: &str, outcome: &'static str) {
        self.fallbacks.with_label_values(&[from, to, outcome]).inc();
    }

    /// Counts records of `queue` (`spans`, `ledger`, `decisions`) delivered.
    pub fn telemetry_sent(&self, queue: &'static str, n: usize) {
        self.telemetry_sent
            .with_label_values(&[queue])
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// Counts one record of `queue` (`spans`, `ledger`, `decisions`) dropped.
    pub fn telemetry_dropped(&self, queue: &'static str) {
        self.telemetry_dropped_n(queue, 1);
    }

    /// Counts `n` records of `queue` dropped.
    pub fn telemetry_dropped_n(&self, queue: &'static str, n: usize) {
        self.telemetry_dropped
            .with_label_values(&[queue])
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// Records one LLM call's usage. `model` must come from a bounded set (the pricing table).
    pub fn record_usage(
        &self,
        provider: &str,
        model: &str,
        input: u64,
        output: u64,
        micros: u64,
        estimated: Option<&'static str>,
    ) {
        self.tokens
            .with_label_values(&[provider, model, "input"])
            .inc_by(input);
        self.tokens
            .with_label_values(&[provider, model, "output"])
            .inc_by(output);
        self.cost_usd
            .with_label_values(&[provider, model])
            .inc_by(micros as f64 / 1e6);
        if let Some(reason) = estimated {
            self.usage_estimated.with_label_values(&[reason]).inc();
        }
    }

    /// Counts a model call reaching the fallback route of provider `to`. `provider` and `to` come
    /// from the bundle's providers, `reason` from a fixed set: the labels stay bounded.
    pub fn model_fallback(&self, provider: &str, to: &str, reason: &'static str) {
        self.model_fallbacks
            .with_label_values(&[provider, to, reason])
            .inc();
    }

    /// Records one proxied call. `decision` is `allowed` or the refusal's kind.
    pub fn record_request(
        &self,
        direction: &str,
        kind: &str,
        peer: &str,
        decision: &str,
        took: Duration,
    ) {
        self.requests
            .with_label_values(&[direction, kind, peer, decision])
            .inc();
        self.request_seconds
            .with_label_values(&[direction, kind])
            .observe(took.as_secs_f64());
    }

    /// Records a received bundle; `version` is the one enforced afterwards.
    pub fn bundle_update(&self, outcome: Outcome, enforced_version: Option<u64>) {
        let label = match outcome {
            Outcome::Ok => "applied",
            Outcome::Failed => "rejected",
        };
        self.bundle_updates.with_label_values(&[label]).inc();
        if let Some(v) = enforced_version {
            self.bundle_version
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        }
    }

    /// Records a request for an SVID; `expiry` is the enforced SVID's, if any.
    pub fn svid_request(&self, outcome: Outcome, expiry_unix: Option<i64>) {
        let label = match outcome {
            Outcome::Ok => "success",
            Outcome::Failed => "failure",
        };
        self.svid_renewals.with_label_values(&[label]).inc();
        self.svid_expiry.set(expiry_unix.unwrap_or(0));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec fails only on invalid metric families, which registration rules out.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_exported_with_bounded_labels() {
        let m = Metrics::new().unwrap();
        m.bundle_update(Outcome::Ok, Some(7));
        m.bundle_update(Outcome::Failed, None);
        m.svid_request(Outcome::Ok, Some(1_900_000_000));
        let text = m.encode();
        for line in [
            "ringfence_bundle_version 7",
            "ringfence_bundle_updates_total{outcome=\"applied\"} 1",
            "ringfence_bundle_updates_total{outcome=\"rejected\"} 1",
            "ringfence_svid_expiry_timestamp_seconds 1900000000",
            "ringfence_svid_renewals_total{outcome=\"success\"} 1",
            "ringfence_svid_renewals_total{outcome=\"failure\"} 0",
            "ringfence_inbound_connections_total{protocol=\"http/1.1\"} 0",
            "ringfence_inbound_connections_total{protocol=\"h2\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
