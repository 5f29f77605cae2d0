//! The budget service over HTTPS: leases, spend reports, the halt stream and run queries, in
//! front of the durable [`Store`].
//!
//! | route | who | what |
//! |---|---|---|
//! | `POST /v1/budget/leases` | mTLS | [`LeaseRequest`] → [`LeaseResponse`]; the first lease opens the run |
//! | `POST /v1/budget/leases/release` | mTLS | [`ReleaseRequest`] → the store's `ReleaseOutcome` |
//! | `POST /v1/budget/spend` | mTLS | [`SpendReport`] → [`SpendAck`], sent only once durable |
//! | `GET /v1/budget/halts?since=SEQ` | mTLS | never-ending JSON lines of [`HaltEvent`]s |
//! | `POST /v1/ledger/calls` | mTLS | [`CallReport`] → [`CallAck`]: the calls of the reporting agent, for the run ledger |
//! | `GET /v1/runs?status=&agent=&user=&limit=` | TLS | recent runs, newest first |
//! | `GET /v1/runs/ID` | TLS | one run with per-agent spend, edges and calls |
//! | `GET /v1/quotas` | TLS | every windowed quota counter with its current window's spend |
//! | `GET /v1/quotas/metrics` | TLS | the same as Prometheus gauges, and breaches since start |
//!
//! The agent that leases and spends is always the one the verified client certificate names,
//! never one a body claims. Run queries need no client certificate, only a connection that
//! trusts the CA, so the CLI (`ringfence runs`) can read them with the trust bundle alone; they
//! reveal spend and call graphs, not the power to spend or halt.
//!
//! Halts reach the stream two ways: a report handled here that halts a run wakes the poller at
//! once, and the poller reads the store every [`HALT_POLL`] for halts that other replicas
//! (sharing one PostgreSQL) wrote. The poller publishes the newest halt sequence number over a
//! `watch`; every open stream reads the store from its own cursor when that number passes it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use ringfence_crds::SpiffeId;
use ringfence_crds::api::{
    self, CallAck, CallReport, HaltEvent, LeaseRequest, LeaseResponse, ReleaseRequest, SpendAck,
    SpendReport,
};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};

use super::Attribution;
use super::alert::{Alerter, Tripped};
use super::store::{HALT_PAGE, Store, StoreError};
use super::{
    Amount, Halt, HaltOutcome, LeaseOutcome, ReleaseOutcome, RunFilter, RunLimits, RunStatus,
};
use crate::distribute::server::{Body, error, json, ndjson, serve_tls};

mod quotas;

/// Most events one spend report may carry.
pub const MAX_EVENTS: usize = 10_000;
/// Largest spend report body, in bytes.
pub const MAX_SPEND_BODY: usize = 4 * 1024 * 1024;
/// Largest lease or release body, in bytes.
const MAX_SMALL_BODY: usize = 64 * 1024;
/// Most runs one `GET /v1/runs` returns, and how many when no `limit` is given.
pub const MAX_RUNS: usize = 1_000;
const DEFAULT_RUNS: usize = 100;
/// How often the store is read for halts written by other replicas.
pub const HALT_POLL: Duration = Duration::from_millis(200);
/// How often an idle halt stream sends a blank line, so dead peers are noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// How long a halt stream waits before reading the store again after a failure.
const RETRY: Duration = Duration::from_secs(1);
/// Longest event or lease id.
const MAX_ID: usize = 128;
/// Longest agent, user, model or RunBudget name.
const MAX_NAME: usize = 256;
const MAX_BUDGETS: usize = 64;

/// Why a budget service request was refused. Each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(
        "{what} needs mTLS: present the agent's SVID (issued by {csr}) as the client certificate",
        csr = api::CSR_PATH
    )]
    NoSvid { what: &'static str },
    #[error("cannot read the request body (at most {limit} bytes): {reason}")]
    Body { limit: usize, reason: String },
    #[error("the request body is not a valid {what}: {reason}")]
    Json { what: &'static str, reason: String },
    #[error(
        "{field} {value:?} is not a run id: expected a ULID (26 characters of upper-case \
         Crockford base32), as the sidecar's run context carries"
    )]
    RunId { field: String, value: String },
    #[error("{field} is invalid: {reason}")]
    Invalid { field: String, reason: String },
    #[error(
        "a spend report carries at most {MAX_EVENTS} events and this one has {0}: send smaller \
         batches"
    )]
    TooManyEvents(usize),
    #[error("no run {0} is known to this budget service")]
    UnknownRun(String),
    #[error(
        "no lease {0} is known to this budget service; check that the sidecar talks to the \
         service (or database) that granted it"
    )]
    UnknownLease(String),
    #[error("no budget service endpoint {method} {path}")]
    NoEndpoint { method: Method, path: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ServiceError {
    fn status(&self) -> StatusCode {
        match self {
            ServiceError::NoSvid { .. } => StatusCode::UNAUTHORIZED,
            ServiceError::Body { .. }
            | ServiceError::Json { .. }
            | ServiceError::RunId { .. }
            | ServiceError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ServiceError::TooManyEvents(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ServiceError::UnknownRun(_)
            | ServiceError::UnknownLease(_)
            | ServiceError::NoEndpoint { .. } => StatusCode::NOT_FOUND,
            // Numbers a sidecar sent that the store cannot hold: the sidecar's fault.
            ServiceError::Store(
                StoreError::TooLarge { .. }
                | StoreError::Overflow { .. }
                | StoreError::Invalid { .. },
            ) => StatusCode::BAD_REQUEST,
            // The database is down or busy: the sidecar keeps its batch and retries.
            ServiceError::Store(StoreError::Query { .. } | StoreError::Connect { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ServiceError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The budget service: the store plus the halt stream's wake-up machinery. Mount it in any
/// HTTPS server with [`BudgetService::handle`], or serve it alone with [`serve`].
pub struct BudgetService {
    store: Store,
    /// The newest halt sequence number in the store, as the poller last saw it.
    latest_halt: watch::Receiver<u64>,
    /// Wakes the poller at once: a report handled here just halted a run.
    poke: Arc<Notify>,
    /// Breach alerts to the runs' webhooks.
    alerter: Arc<Alerter>,
    exhaustions: quotas::Exhaustions,
}

impl BudgetService {
    /// Starts the halt poller; call within a Tokio runtime. The poller stops once the service
    /// and every open halt stream are gone.
    pub fn new(store: Store) -> Arc<BudgetService> {
        let (tx, latest_halt) = watch::channel(0);
        let poke = Arc::new(Notify::new());
        tokio::spawn(poll_halts(store.clone(), tx, poke.clone()));
        Arc::new(BudgetService {
            store,
            latest_halt,
            poke,
            alerter: Arc::new(Alerter::default()),
            exhaustions: quotas::Exhaustions::default(),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Whether `path` belongs to the budget service (whatever the method).
    pub fn serves(path: &str) -> bool {
        path.starts_with("/v1/budget/")
            || path == api::CALLS_PATH
            || path == api::RUNS_PATH
            || path.starts_with("/v1/runs/")
            || path == api::SPEND_BY_PATH
            || path == api::QUOTAS_PATH
            || path.starts_with("/v1/quotas/")
    }

    /// Answers a budget service request; `None` when `path` is not one ([`Self::serves`]).
    /// `peer` is the identity of the verified client certificate, if one was presented.
    pub async fn handle(
        &self,
        peer: Option<&SpiffeId>,
        req: Request<Incoming>,
    ) -> Option<Response<Body>> {
        let path = req.uri().path().to_owned();
        if !Self::serves(&path) {
            return None;
        }
        let method = req.method().clone();
        Some(match self.dispatch(peer, req, &path).await {
            Ok(resp) => resp,
            Err(e) => {
                let status = e.status();
                if status.is_server_error() {
                    tracing::error!(%method, %path, error = %e, "budget service request failed");
                } else {
                    tracing::info!(%method, %path, %status, error = %e, "budget service refused a request");
                }
                error(status, &e.to_string())
            }
        })
    }

    async fn dispatch(
        &self,
        peer: Option<&SpiffeId>,
        req: Request<Incoming>,
        path: &str,
    ) -> Result<Response<Body>, ServiceError> {
        let method = req.method().clone();
        match (&method, path) {
            (&Method::POST, api::LEASE_PATH) => {
                let agent = agent_of(peer, "leasing budget")?;
                let body = read_json(req, MAX_SMALL_BODY, "LeaseRequest").await?;
                Ok(json(StatusCode::OK, &self.lease(&agent, body).await?))
            }
            (&Method::POST, api::RELEASE_PATH) => {
                agent_of(peer, "releasing a lease")?;
                let body = read_json(req, MAX_SMALL_BODY, "ReleaseRequest").await?;
                Ok(json(StatusCode::OK, &self.release(body).await?))
            }
            (&Method::POST, api::SPEND_PATH) => {
                let agent = agent_of(peer, "reporting spend")?;
                let body = read_json(req, MAX_SPEND_BODY, "SpendReport").await?;
                Ok(json(StatusCode::OK, &self.report(&agent, body).await?))
            }
            (&Method::POST, api::CALLS_PATH) => {
                agent_of(peer, "reporting calls")?;
                let agent = peer.map(|id| id.name().to_owned()).unwrap_or_default();
                let body = read_json(req, MAX_SPEND_BODY, "CallReport").await?;
                Ok(json(
                    StatusCode::OK,
                    &self.record_calls(&agent, body).await?,
                ))
            }
            (&Method::GET, api::HALTS_PATH) => {
                agent_of(peer, "the halt stream")?;
                let since = match query_pairs(req.uri().query())?
                    .into_iter()
                    .find(|(k, _)| k == "since")
                {
                    Some((_, v)) => parse_number("since", &v)?,
                    None => 0,
                };
                self.halts(since).await
            }
            (&Method::GET, api::SPEND_BY_PATH) => {
                let pairs = query_pairs(req.uri().query())?;
                let value = |k: &str| {
                    pairs
                        .iter()
                        .find(|(key, _)| key == k)
                        .map(|(_, v)| v.clone())
                };
                let by_text = value("by").unwrap_or_else(|| "team".to_owned());
                let by = Attribution::parse(&by_text).ok_or_else(|| {
                    invalid(
                        "by",
                        format!(
                            "{by_text:?}: group by team, environment, workflow, agent or model"
                        ),
                    )
                })?;
                let since = value("sinceMs")
                    .map(|v| parse_number("sinceMs", &v))
                    .transpose()?;
                Ok(json(StatusCode::OK, &self.store.spend_by(by, since).await?))
            }
            (&Method::GET, api::QUOTAS_PATH) => Ok(json(StatusCode::OK, &self.quotas().await?)),
            (&Method::GET, "/v1/quotas/metrics") => self.quota_metrics().await,
            (&Method::GET, api::RUNS_PATH) => {
                let (filter, limit) = run_query(req.uri().query())?;
                Ok(json(
                    StatusCode::OK,
                    &self.store.list_runs(&filter, limit).await?,
                ))
            }
            (&Method::GET, _) if path.starts_with("/v1/runs/") => {
                let id = run_id("run id", &path["/v1/runs/".len()..])?;
                match self.store.get_run(&id).await? {
                    Some(detail) => Ok(json(StatusCode::OK, &detail)),
                    None => Err(ServiceError::UnknownRun(id)),
                }
            }
            _ => Err(ServiceError::NoEndpoint {
                method,
                path: path.to_owned(),
            }),
        }
    }

    /// Opens the run with the leasing sidecar's terms (a no-op if it is open) and leases.
    async fn lease(&self, agent: &str, req: LeaseRequest) -> Result<LeaseResponse, ServiceError> {
        let run = run_id("run", &req.run)?;
        let terms = req.terms;
        check_name("terms.root", &terms.root, false)?;
        check_name("terms.user", &terms.user, true)?;
        if terms.budgets.len() > MAX_BUDGETS {
            return Err(invalid(
                "terms.budgets",
                format!(
                    "at most {MAX_BUDGETS} RunBudgets, got {}",
                    terms.budgets.len()
                ),
            ));
        }
        for b in &terms.budgets {
            check_name("terms.budgets[]", b, false)?;
        }
        quotas::check_quotas(&terms.quotas)?;
        let limits_on_breach = terms.on_breach;
        let limits = RunLimits {
            max_tokens: terms.max_total_tokens,
            max_cost_micros: terms.max_cost_micros,
            deadline_ms: terms.deadline_ms,
            on_breach: terms.on_breach,
            budgets: terms.budgets,
        };
        let now = now_ms();
        self.store
            .open_run(&run, &terms.root, &terms.user, &limits, now)
            .await?;
        self.alerter.remember(&run, terms.alert_webhook.as_deref());
        let want = Amount {
            tokens: req.tokens,
            micros: req.micros,
        };
        let outcome = self
            .store
            .lease_under_quotas(&run, agent, want, &terms.quotas, now)
            .await?;
        Ok(match outcome {
            LeaseOutcome::Granted { lease_id, granted } => LeaseResponse::Granted {
                lease_id,
                tokens: granted.tokens,
                micros: granted.micros,
            },
            LeaseOutcome::Exhausted {
                limit,
                spent,
                outstanding,
                limit_value,
            } => {
                // A run whose budget is spent (or promised to outstanding leases) has breached it:
                // leases keep reported spend from ever crossing the limit, so this is where the
                // breach shows. A halting `onBreach` stops the run everywhere now; the first
                // breach alerts.
                let reason = format!(
                    "its budget is exhausted: {} — {spent} spent and {outstanding} leased of {limit_value}",
                    limit.as_str()
                );
                let first = if limits_on_breach.halts() {
                    let halted = matches!(
                        self.store.halt(&run, &reason, now).await?,
                        HaltOutcome::Halted(_)
                    );
                    if halted {
                        self.poke.notify_one();
                    }
                    halted
                } else {
                    // AlertOnly: the run goes on; alert once per run.
                    self.alerter.first_alert(&run)
                };
                if first {
                    self.alerter.breached(
                        &self.store,
                        Tripped {
                            run: run.clone(),
                            limit: limit.as_str().to_owned(),
                            spent,
                            limit_value,
                            reason,
                            at_ms: now,
                        },
                    );
                }
                LeaseResponse::Exhausted {
                    limit: limit.as_str().to_owned(),
                    spent,
                    limit_value,
                }
            }
            LeaseOutcome::Halted { reason } => LeaseResponse::Halted { reason },
            LeaseOutcome::Completed => LeaseResponse::Completed,
            LeaseOutcome::QuotaExhausted {
                counter,
                limit,
                used,
                outstanding: _,
                limit_value,
                spent: _,
                trip,
            } => {
                self.quota_refused(&run, &terms.quotas, counter, limit, used, limit_value, trip)
                    .await?
            }
            // Only if the run vanished between opening and leasing (a manual delete).
            LeaseOutcome::UnknownRun => return Err(ServiceError::UnknownRun(run)),
        })
    }

    async fn release(&self, req: ReleaseRequest) -> Result<ReleaseOutcome, ServiceError> {
        check_id("leaseId", &req.lease_id)?;
        let unused = Amount {
            tokens: req.tokens,
            micros: req.micros,
        };
        match self.store.release(&req.lease_id, unused, now_ms()).await? {
            ReleaseOutcome::UnknownLease => Err(ServiceError::UnknownLease(req.lease_id)),
            outcome => Ok(outcome),
        }
    }

    /// Adds a batch of `agent`'s calls to the run ledger; the ack goes out only after the store
    /// committed it.
    async fn record_calls(&self, agent: &str, report: CallReport) -> Result<CallAck, ServiceError> {
        if report.calls.len() > MAX_EVENTS {
            return Err(ServiceError::TooManyEvents(report.calls.len()));
        }
        let mut calls = report.calls;
        for (i, c) in calls.iter_mut().enumerate() {
            check_call(i, agent, c)?;
        }
        Ok(self.store.record_edges(&calls).await?)
    }

    /// Records the batch, every event as spent by `agent`; the ack goes out only after the store
    /// committed it.
    async fn report(&self, agent: &str, report: SpendReport) -> Result<SpendAck, ServiceError> {
        if report.events.len() > MAX_EVENTS {
            return Err(ServiceError::TooManyEvents(report.events.len()));
        }
        // Spend outside any lease may be a run no lease opened (no token or cost limits): open
        // it with the root and user the sidecar names, so the ledger keeps it.
        let mut unleased: Vec<(String, String, String)> = Vec::new();
        for (i, e) in report.events.iter().enumerate() {
            if e.lease_id.is_none() && !e.root.is_empty() {
                check_name(&format!("events[{i}].root"), &e.root, false)?;
                check_name(&format!("events[{i}].user"), &e.user, true)?;
                let run = run_id(&format!("events[{i}].run"), &e.run)?;
                if !unleased.iter().any(|(r, _, _)| *r == run) {
                    unleased.push((run, e.root.clone(), e.user.clone()));
                }
            }
        }
        let events = report
            .events
            .into_iter()
            .enumerate()
            .map(|(i, e)| spend_event(i, agent, e))
            .collect::<Result<Vec<_>, _>>()?;
        let now = now_ms();
        for (run, root, user) in &unleased {
            self.store
                .open_run(run, root, user, &RunLimits::default(), now)
                .await?;
        }
        let outcome = self.store.report(&events, now).await?;
        if outcome.unknown_run > 0 {
            // The wire ack has no field for these; a sidecar leases (opening the run) first.
            tracing::warn!(
                %agent,
                dropped = outcome.unknown_run,
                "spend reported for runs never leased; dropped"
            );
        }
        let mut halted: Vec<String> = outcome
            .breaches
            .iter()
            .filter(|b| b.halted)
            .map(|b| b.run_id.clone())
            .collect();
        halted.dedup();
        for b in &outcome.breaches {
            tracing::warn!(run = %b.run_id, limit = %b.limit, spent = b.spent, limit_value = b.limit_value, halted = b.halted, "run budget breached");
            let reason = format!(
                "{} breached: {} spent of {}",
                b.limit.as_str(),
                b.spent,
                b.limit_value
            );
            self.alerter.breached(
                &self.store,
                Tripped {
                    run: b.run_id.clone(),
                    limit: b.limit.as_str().to_owned(),
                    spent: b.spent,
                    limit_value: b.limit_value,
                    reason,
                    at_ms: now_ms(),
                },
            );
        }
        if !halted.is_empty() {
            self.poke.notify_one();
        }
        for trip in &outcome.quota_trips {
            self.quota_tripped(trip).await;
        }
        Ok(SpendAck {
            accepted: outcome.accepted,
            duplicates: outcome.duplicates,
            halted,
        })
    }

    /// Everything after `since` at once, then each new halt as it happens. The first read is
    /// made before answering, so a store that is down is a 503, not an empty stream.
    async fn halts(&self, since: u64) -> Result<Response<Body>, ServiceError> {
        let (first, cursor) = self.store.halts_since(since).await?;
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        tokio::spawn(feed_halts(
            self.store.clone(),
            self.latest_halt.clone(),
            tx,
            first,
            cursor,
        ));
        Ok(ndjson(rx))
    }
}

/// Serves the budget service alone (`ringfence budget`) until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    service: Arc<BudgetService>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let handler = move |peer: Option<SpiffeId>, req: Request<Incoming>| {
        let service = service.clone();
        async move {
            let (method, path) = (req.method().clone(), req.uri().path().to_owned());
            match service.handle(peer.as_ref(), req).await {
                Some(resp) => resp,
                None => error(
                    StatusCode::NOT_FOUND,
                    &ServiceError::NoEndpoint { method, path }.to_string(),
                ),
            }
        }
    };
    serve_tls(listener, tls, handler, shutdown).await;
}

/// Publishes the newest halt sequence number: every [`HALT_POLL`], or at once when poked.
async fn poll_halts(store: Store, latest: watch::Sender<u64>, poke: Arc<Notify>) {
    let mut newest = 0;
    let mut failing = false;
    loop {
        match newest_halt(&store, newest).await {
            Ok(seq) => {
                if failing {
                    tracing::info!("the halt poller reads the budget store again");
                    failing = false;
                }
                if seq > newest {
                    newest = seq;
                    latest.send_replace(seq);
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "the halt poller cannot read the budget store; halts from other replicas wait until it can");
                    failing = true;
                }
            }
        }
        tokio::select! {
            _ = latest.closed() => return,
            _ = poke.notified() => {}
            _ = tokio::time::sleep(HALT_POLL) => {}
        }
    }
}

/// The newest halt's sequence number, reading on from `after`.
async fn newest_halt(store: &Store, after: u64) -> Result<u64, StoreError> {
    let mut cursor = after;
    loop {
        let (page, next) = store.halts_since(cursor).await?;
        cursor = next;
        if page.len() < HALT_PAGE {
            return Ok(cursor);
        }
    }
}

/// Feeds one halt stream until its client goes away.
async fn feed_halts(
    store: Store,
    mut latest: watch::Receiver<u64>,
    tx: mpsc::Sender<Bytes>,
    mut page: Vec<Halt>,
    mut cursor: u64,
) {
    loop {
        let full = page.len() >= HALT_PAGE;
        for halt in page {
            let event = HaltEvent {
                seq: halt.seq,
                run: halt.run_id,
                reason: halt.reason,
                at_ms: halt.at_ms,
            };
            let Ok(mut line) = serde_json::to_vec(&event) else {
                continue;
            };
            line.push(b'\n');
            if tx.send(Bytes::from(line)).await.is_err() {
                return;
            }
        }
        // A full page means more are waiting; otherwise sleep until the store has news.
        if !full {
            while *latest.borrow_and_update() <= cursor {
                tokio::select! {
                    changed = latest.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(KEEPALIVE) => {
                        if tx.send(Bytes::from_static(b"\n")).await.is_err() { return }
                    }
                    _ = tx.closed() => return,
                }
            }
        }
        page = loop {
            match store.halts_since(cursor).await {
                Ok((halts, next)) => {
                    cursor = next;
                    break halts;
                }
                Err(e) => {
                    tracing::warn!(error = %e, cursor, "halt stream cannot read the budget store; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY) => {}
                        _ = tx.closed() => return,
                    }
                }
            }
        };
    }
}

/// The agent the client certificate names, as the store records it (`namespace/name`).
fn agent_of(peer: Option<&SpiffeId>, what: &'static str) -> Result<String, ServiceError> {
    peer.map(|id| id.agent().to_string())
        .ok_or(ServiceError::NoSvid { what })
}

async fn read_json<T: DeserializeOwned>(
    req: Request<Incoming>,
    limit: usize,
    what: &'static str,
) -> Result<T, ServiceError> {
    let body = Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|e| ServiceError::Body {
            limit,
            reason: e.to_string(),
        })?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| ServiceError::Json {
        what,
        reason: e.to_string(),
    })
}

/// A sidecar's spend event as the store records it, under the certificate's agent.
fn spend_event(
    i: usize,
    agent: &str,
    e: api::SpendEvent,
) -> Result<super::SpendEvent, ServiceError> {
    check_id(&format!("events[{i}].eventId"), &e.event_id)?;
    if let Some(lease) = &e.lease_id {
        check_id(&format!("events[{i}].leaseId"), lease)?;
    }
    if let Some(model) = &e.model {
        check_name(&format!("events[{i}].model"), model, true)?;
    }
    Ok(super::SpendEvent {
        run_id: run_id(&format!("events[{i}].run"), &e.run)?,
        event_id: e.event_id,
        agent: agent.to_owned(),
        lease_id: e.lease_id,
        tokens_in: e.tokens_in,
        tokens_out: e.tokens_out,
        micros: e.micros,
        calls: e.calls,
        model: e.model,
        estimated: e.estimated,
        at_ms: e.at_ms,
        team: bounded(e.team),
        environment: bounded(e.environment),
        workflow: bounded(e.workflow),
    })
}

/// A reported call, checked: it is `agent`'s own, and every text fits the ledger.
fn check_call(i: usize, agent: &str, c: &mut api::CallEvent) -> Result<(), ServiceError> {
    if c.caller != agent {
        return Err(invalid(
            &format!("calls[{i}].caller"),
            format!(
                "{:?}, but the client certificate is {agent}'s: a sidecar reports its own agent's calls only",
                c.caller.chars().take(64).collect::<String>()
            ),
        ));
    }
    check_id(&format!("calls[{i}].eventId"), &c.event_id)?;
    c.run_id = run_id(&format!("calls[{i}].runId"), &c.run_id)?;
    for (field, value, len) in [
        ("traceId", Some(&c.trace_id), 32),
        ("spanId", Some(&c.span_id), 16),
        ("parentCall", c.parent_call.as_ref(), 16),
    ] {
        if let Some(v) = value
            && (v.len() != len || !v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        {
            return Err(invalid(
                &format!("calls[{i}].{field}"),
                format!("expected {len} lowercase hex digits"),
            ));
        }
    }
    check_name(&format!("calls[{i}].callee"), &c.callee, false)?;
    check_name(&format!("calls[{i}].root"), &c.root, true)?;
    check_name(&format!("calls[{i}].user"), &c.user, true)?;
    for (field, value) in [("operation", &c.operation), ("rule", &c.rule)] {
        if let Some(v) = value {
            check_name(&format!("calls[{i}].{field}"), v, true)?;
        }
    }
    if let api::Decision::Denied(reason) = &c.decision {
        check_name(&format!("calls[{i}].reason"), reason, false)?;
    }
    Ok(())
}

/// A run id: a ULID in its canonical spelling (upper case, in range), as the sidecar's run
/// context insists, so one run never goes by two names.
fn run_id(field: &str, value: &str) -> Result<String, ServiceError> {
    let bad = || ServiceError::RunId {
        field: field.to_owned(),
        value: value.chars().take(64).collect(),
    };
    if value.len() != ulid::ULID_LEN {
        return Err(bad());
    }
    let parsed = ulid::Ulid::from_string(value).map_err(|_| bad())?;
    let mut canonical = [0u8; ulid::ULID_LEN];
    if parsed.array_to_str(&mut canonical) != value {
        return Err(bad());
    }
    Ok(value.to_owned())
}

/// An attribution label from a sidecar: kept when it is a plausible name, dropped otherwise.
fn bounded(label: Option<String>) -> Option<String> {
    label.filter(|l| !l.is_empty() && l.len() <= 256 && !l.chars().any(char::is_control))
}

fn invalid(field: &str, reason: String) -> ServiceError {
    ServiceError::Invalid {
        field: field.to_owned(),
        reason,
    }
}

/// An event or lease id: 1 to [`MAX_ID`] printable ASCII characters.
fn check_id(field: &str, value: &str) -> Result<(), ServiceError> {
    if value.is_empty() || value.len() > MAX_ID || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            field,
            format!("expected 1 to {MAX_ID} printable ASCII characters"),
        ));
    }
    Ok(())
}

/// A name: at most [`MAX_NAME`] bytes, no control characters.
fn check_name(field: &str, value: &str, may_be_empty: bool) -> Result<(), ServiceError> {
    if (!may_be_empty && value.is_empty())
        || value.len() > MAX_NAME
        || value.chars().any(char::is_control)
    {
        return Err(invalid(
            field,
            format!(
                "expected {} to {MAX_NAME} bytes without control characters",
                u8::from(!may_be_empty)
            ),
        ));
    }
    Ok(())
}

fn parse_number(field: &str, value: &str) -> Result<u64, ServiceError> {
    value
        .parse()
        .map_err(|_| invalid(field, format!("{value:?} is not a non-negative integer")))
}

/// `?status=&agent=&user=&limit=` of `GET /v1/runs`.
fn run_query(query: Option<&str>) -> Result<(RunFilter, usize), ServiceError> {
    let mut filter = RunFilter::default();
    let mut limit = DEFAULT_RUNS;
    for (key, value) in query_pairs(query)? {
        match key.as_str() {
            "status" => {
                filter.status = Some(RunStatus::parse(&value).ok_or_else(|| {
                    invalid(
                        "status",
                        format!("{value:?}: expected running, halted or completed"),
                    )
                })?);
            }
            "agent" => filter.agent = Some(value),
            "user" => filter.user = Some(value),
            "limit" => {
                limit = usize::try_from(parse_number("limit", &value)?).unwrap_or(usize::MAX);
                if limit == 0 || limit > MAX_RUNS {
                    return Err(invalid("limit", format!("expected 1 to {MAX_RUNS}")));
                }
            }
            other => {
                return Err(invalid(
                    other,
                    "unknown query parameter: expected status, agent, user or limit".to_owned(),
                ));
            }
        }
    }
    Ok((filter, limit))
}

/// Splits and percent-decodes a query string (`+` is a space).
fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, ServiceError> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((percent_decode(k)?, percent_decode(v)?))
        })
        .collect()
}

fn percent_decode(s: &str) -> Result<String, ServiceError> {
    let bad = || invalid("query", format!("{s:?} is not valid percent-encoded UTF-8"));
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
                let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
                out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| bad())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_canonical_ulids() {
        let id = ulid::Ulid::new().to_string();
        assert_eq!(run_id("run", &id).ok(), Some(id.clone()));
        assert!(run_id("run", &id.to_lowercase()).is_err());
        assert!(run_id("run", "not-a-ulid").is_err());
        assert!(run_id("run", "ZZZZZZZZZZZZZZZZZZZZZZZZZZ").is_err());
    }

    #[test]
    fn a_run_query_decodes_its_filters_and_bounds_the_limit() {
        let (filter, limit) = run_query(Some(
            "status=halted&agent=default%2Fresearch&user=a+b&limit=5",
        ))
        .expect("a valid query");
        assert_eq!(filter.status, Some(RunStatus::Halted));
        assert_eq!(filter.agent.as_deref(), Some("default/research"));
        assert_eq!(filter.user.as_deref(), Some("a b"));
        assert_eq!(limit, 5);
        assert!(run_query(Some("limit=1001")).is_err());
        assert!(run_query(Some("status=paused")).is_err());
        assert!(run_query(Some("agent=%zz")).is_err());
        assert!(run_query(Some("color=red")).is_err());
    }
}
