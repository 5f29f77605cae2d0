//! Run budgets from the sidecar's side.
//!
//! A run's token and cost budget is global; this sidecar holds a **lease**, a slice of what is
//! left, granted by the budget service. LLM calls reserve from the lease before they go out
//! and settle after the answer. The difference goes back into the lease, and the actual spend
//! is queued for the service. Calls that fit the lease need no round trip, so overshoot is
//! bounded by the leases outstanding. When the lease runs short, a new one is asked for. If the
//! service cannot be reached, the sidecar keeps spending what it holds, then refuses.
//!
//! Halts arrive two ways: on a stream from the service, and in answers to leases and reports.
//! A halted run's next call anywhere is refused (402).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http_body_util::BodyExt;
use ringfence_crds::api::{
    HaltEvent, LeaseRequest, LeaseResponse, ReleaseRequest, RunTerms, SpendEvent, SpendReport,
};
use tokio::sync::mpsc;

use crate::backoff::Backoff;
use crate::control_plane::ControlPlane;

/// How many spend events may wait for the service before new ones are dropped (and counted).
pub const QUEUE: usize = 65_536;
/// Events per report.
pub const BATCH: usize = 500;
/// How long events wait to be batched.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// How many halted runs are remembered.
pub const HALTED_CAPACITY: usize = 100_000;
/// How many runs' leases are held at once.
pub const HELD_CAPACITY: usize = 10_000;

/// Why a call may not spend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("run {run} was halted: {reason}")]
    Halted { run: String, reason: String },
    #[error(
        "run {run} has exhausted {limit}: {spent} spent (or promised to other calls) of {limit_value}"
    )]
    Exhausted {
        run: String,
        limit: String,
        spent: u64,
        limit_value: u64,
    },
    #[error("run {run} is over")]
    Completed { run: String },
    #[error(
        "the budget service cannot be reached and this sidecar's lease for run {run} is spent ({reason}); the call is refused (fail closed)"
    )]
    Unavailable { run: String, reason: String },
}

#[derive(Debug, Default, Clone)]
struct Held {
    lease_id: Option<String>,
    tokens: u64,
    micros: u64,
}

/// An amount taken from a lease for one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub run: String,
    pub lease_id: Option<String>,
    pub tokens: u64,
    pub micros: u64,
    /// Granted without a lease because the service was unreachable and the run fails open:
    /// nothing is returned to a lease when it settles.
    pub provisional: bool,
}

/// This sidecar's side of every run's budget.
pub struct Spend {
    client: ControlPlane,
    held: Mutex<HashMap<String, Held>>,
    halted: Mutex<(HashMap<String, String>, VecDeque<String>)>,
    queue: mpsc::Sender<SpendEvent>,
    queue_rx: Mutex<Option<mpsc::Receiver<SpendEvent>>>,
    dropped: AtomicU64,
}

impl Spend {
    pub fn new(client: ControlPlane) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        Self {
            client,
            held: Mutex::new(HashMap::new()),
            halted: Mutex::new((HashMap::new(), VecDeque::new())),
            queue: tx,
            queue_rx: Mutex::new(Some(rx)),
            dropped: AtomicU64::new(0),
        }
    }

    /// Why `run` may not go on, if it was halted.
    pub fn halted(&self, run: &str) -> Option<String> {
        self.halted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .get(run)
            .cloned()
    }

    fn mark_halted(&self, run: &str, reason: &str) {
        let mut g = self.halted.lock().unwrap_or_else(PoisonError::into_inner);
        let (map, order) = &mut *g;
        if map.insert(run.to_owned(), reason.to_owned()).is_none() {
            tracing::info!(run, reason, "run halted");
            order.push_back(run.to_owned());
            if order.len() > HALTED_CAPACITY
                && let Some(old) = order.pop_front()
            {
                map.remove(&old);
            }
        }
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Takes `tokens`/`micros` from this sidecar's lease for `run`, leasing more first when the
    /// lease is short.
    pub async fn reserve(
        &self,
        run: &str,
        terms: &RunTerms,
        tokens: u64,
        micros: u64,
        fail_open: bool,
    ) -> Result<Reservation, Refusal> {
        if let Some(reason) = self.halted(run) {
            return Err(Refusal::Halted {
                run: run.to_owned(),
                reason,
            });
        }
        if let Some(r) = self.take(run, tokens, micros) {
            return Ok(r);
        }
        // Lease in slices: large enough to spare round trips, small enough that several
        // sidecars share a run's budget fairly and overshoot stays small. A grant smaller than
        // the call needs (the last of the budget) is kept and the shortfall asked for once more:
        // the service then answers that the budget is exhausted, which halts the run.
        for _ in 0..2 {
            let (have_t, have_m) = self.holding(run);
            let need_t = tokens.saturating_sub(have_t);
            let need_m = micros.saturating_sub(have_m);
            let want_tokens = terms
                .tightest_tokens()
                .map_or(0, |max| need_t.max(max / 20));
            let want_micros = terms
                .tightest_micros()
                .map_or(0, |max| need_m.max(max / 20));
            let request = LeaseRequest {
                run: run.to_owned(),
                terms: terms.clone(),
                tokens: want_tokens,
                micros: want_micros,
            };
            match self.client.lease(&request).await {
                Ok(LeaseResponse::Granted {
                    lease_id,
                    tokens: t,
                    micros: m,
                }) => {
                    self.add(run, Some(lease_id), t, m);
                    if let Some(r) = self.take(run, tokens, micros) {
                        return Ok(r);
                    }
                }
                Ok(LeaseResponse::Exhausted {
                    limit,
                    spent,
                    limit_value,
                }) => {
                    return Err(Refusal::Exhausted {
                        run: run.to_owned(),
                        limit,
                        spent,
                        limit_value,
                    });
                }
                Ok(LeaseResponse::Halted { reason }) => {
                    self.mark_halted(run, &reason);
                    return Err(Refusal::Halted {
                        run: run.to_owned(),
                        reason,
                    });
                }
                Ok(LeaseResponse::Completed) => {
                    return Err(Refusal::Completed {
                        run: run.to_owned(),
                    });
                }
                Err(e) if fail_open => {
                    tracing::warn!(run, error = %e, "budget service unreachable; the run fails open");
                    return Ok(Reservation {
                        run: run.to_owned(),
                        lease_id: None,
                        tokens,
                        micros,
                        provisional: true,
                    });
                }
                Err(e) => {
                    return Err(Refusal::Unavailable {
                        run: run.to_owned(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        let (limit, limit_value) = match (terms.max_total_tokens, terms.max_cost_micros) {
            (Some(t), _) => ("maxTotalTokens", t),
            (None, m) => ("maxCostUsd", m.unwrap_or(0)),
        };
        Err(Refusal::Exhausted {
            run: run.to_owned(),
            limit: limit.into(),
            spent: limit_value,
            limit_value,
        })
    }

    fn holding(&self, run: &str) -> (u64, u64) {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.get(run).map_or((0, 0), |h| (h.tokens, h.micros))
    }

    fn take(&self, run: &str, tokens: u64, micros: u64) -> Option<Reservation> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let h = held.get_mut(run)?;
        if h.tokens < tokens || h.micros < micros {
            return None;
        }
        h.tokens -= tokens;
        h.micros -= micros;
        Some(Reservation {
            run: run.to_owned(),
            lease_id: h.lease_id.clone(),
            tokens,
            micros,
            provisional: false,
        })
    }

    fn add(&self, run: &str, lease_id: Option<String>, tokens: u64, micros: u64) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if !held.contains_key(run) && held.len() >= HELD_CAPACITY {
            // Forget an arbitrary old run: its unspent lease returns when the run completes.
            if let Some(k) = held.keys().next().cloned() {
                held.remove(&k);
            }
        }
        let h = held.entry(run.to_owned()).or_default();
        if lease_id.is_some() {
            h.lease_id = lease_id;
        }
        h.tokens = h.tokens.saturating_add(tokens);
        h.micros = h.micros.saturating_add(micros);
    }

    /// Settles a reservation with what the call actually spent: the unspent part goes back to
    /// the lease, and the spend is queued for the service (never blocking).
    pub fn settle(&self, reservation: Reservation, mut event: SpendEvent) {
        if reservation.provisional {
            self.record(event);
            return;
        }
        // Only what was reserved is settled against the lease: a dimension the run does not limit
        // (reserved as zero) is reported but never held.
        let spent_tokens = if reservation.tokens == 0 {
            0
        } else {
            event.tokens_in.saturating_add(event.tokens_out)
        };
        let spent_micros = if reservation.micros == 0 {
            0
        } else {
            event.micros
        };
        if spent_tokens <= reservation.tokens && spent_micros <= reservation.micros {
            self.add(
                &reservation.run,
                None,
                reservation.tokens - spent_tokens,
                reservation.micros - spent_micros,
            );
        } else {
            // Spent more than reserved: the excess comes out of what the lease still holds.
            let extra_t = spent_tokens.saturating_sub(reservation.tokens);
            let extra_m = spent_micros.saturating_sub(reservation.micros);
            let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(h) = held.get_mut(&reservation.run) {
                h.tokens = h.tokens.saturating_sub(extra_t);
                h.micros = h.micros.saturating_sub(extra_m);
            }
        }
        event.lease_id = reservation.lease_id;
        self.record(event);
    }

    /// Queues spend that needed no reservation (a run without token or cost limits).
    pub fn record(&self, event: SpendEvent) {
        if self.queue.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("spend queue full: an event was dropped");
        }
    }

    /// Reports queued spend in batches until the process ends. A batch that fails is sent again
    /// (the service counts each event once).
    pub async fn run_reporter(self: Arc<Self>) {
        let Some(rx) = self
            .queue_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return;
        };
        crate::batch::deliver(rx, BATCH, FLUSH_EVERY, "spend", |events| {
            let this = &self;
            async move {
                let ack = this.client.report(&SpendReport { events }).await?;
                for run in &ack.halted {
                    this.mark_halted(run, "its budget was exhausted");
                }
                Ok::<_, crate::control_plane::ControlPlaneError>(())
            }
        })
        .await;
    }

    /// Follows the service's halt stream until the process ends, reconnecting with backoff.
    pub async fn run_halts(self: Arc<Self>) {
        let mut since = 0u64;
        let backoff = Backoff::default();
        let mut failures = 0u32;
        loop {
            match self.client.halts(since).await {
                Ok(mut body) => {
                    failures = 0;
                    let mut buf: Vec<u8> = Vec::new();
                    while let Some(frame) = body.frame().await {
                        let Ok(frame) = frame else { break };
                        let Ok(data) = frame.into_data() else {
                            continue;
                        };
                        buf.extend_from_slice(&data);
                        while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                            let line: Vec<u8> = buf.drain(..=i).collect();
                            if line.iter().all(u8::is_ascii_whitespace) {
                                continue;
                            }
                            match serde_json::from_slice::<HaltEvent>(&line) {
                                Ok(h) => {
                                    since = since.max(h.seq);
                                    self.mark_halted(&h.run, &h.reason);
                                }
                                Err(e) => tracing::warn!(error = %e, "unreadable halt event"),
                            }
                        }
                        if buf.len() > 1 << 20 {
                            buf.clear();
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "halt stream unavailable"),
            }
            failures = failures.saturating_add(1);
            tokio::time::sleep(backoff.delay(failures)).await;
        }
    }

    /// Gives back what this sidecar holds of `run`'s budget.
    pub async fn release(&self, run: &str) {
        let held = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(run);
        if let Some(Held {
            lease_id: Some(lease_id),
            tokens,
            micros,
        }) = held
        {
            let _ = self
                .client
                .release(&ReleaseRequest {
                    lease_id,
                    tokens,
                    micros,
                })
                .await;
        }
    }
}
