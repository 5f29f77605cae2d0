//! Decision logs: one JSON line per call this sidecar decided on, for whoever greps, ships or
//! audits them (`jq`, Loki, Fluent Bit, a SIEM).
//!
//! A line is written when a call is over — when its answer has been passed on in full — from the
//! same [`Finished`] record the span and the ledger are made of, so the three never disagree:
//!
//! ```json
//! {"time":"2026-11-24T04:31:07.412Z","kind":"agent","side":"client","trace_id":"0af7…","span_id":"b7ad…",
//!  "run":"01JD…","user":"user:tomas","caller":"research","callee":"orchestrator","method":"SendMessage",
//!  "tool":null,"model":null,"decision":"policy","rule":"default/incident/no-callbacks","message":"…",
//!  "status":403,"latency_us":412,"tokens_in":0,"tokens_out":0,"cost_usd_micros":0,"depth":1,
//!  "cycle":false,"tainted":false,"error":null}
//! ```
//!
//! The level ([`Level`]) chooses which calls are logged. Lines go through a bounded queue
//! ([`DECISION_QUEUE`]) to a writer task: a full queue (a stalled stdout, a slow disk) drops the
//! line and counts it in `ringfence_telemetry_dropped_total{queue="decisions"}`; the request
//! never waits. The writer gathers what arrives within [`GATHER`] and writes it at once: tokio
//! writes stdout and files on its blocking pool, a thread hand-off per write, so a write per
//! line cost more CPU than the call it logged (see docs/benchmarks.md). The sidecar's own logs go
//! to stderr, so stdout carries nothing but these lines.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::{Finished, Side, hex};
use crate::metrics::Metrics;

/// Lines waiting for the writer; beyond this they are dropped and counted.
pub const DECISION_QUEUE: usize = 16_384;
/// Lines written per write: whatever is queued, up to this many.
const BATCH: usize = 256;
/// How long the writer gathers lines after the first before it writes them.
pub const GATHER: Duration = Duration::from_millis(50);

/// Which calls get a decision line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Level {
    /// None.
    Off,
    /// Only refused calls (by this sidecar or, seen from the caller, by the callee's).
    Deny,
    /// Every call.
    #[default]
    All,
}

/// Why the decision log cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum DecisionLogError {
    #[error(
        "cannot open --decision-log-file {path} for appending: {source}; check that its directory exists and is writable"
    )]
    Open {
        path: String,
        source: std::io::Error,
    },
}

/// The request path's end of the decision log. Cloning is cheap.
#[derive(Clone, Debug)]
pub struct DecisionLog {
    level: Level,
    tx: mpsc::Sender<String>,
}

impl DecisionLog {
    /// A log at `level` with a queue of `capacity` lines, and the queue's other end for
    /// [`write`].
    pub fn new(level: Level, capacity: usize) -> (Self, mpsc::Receiver<String>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (DecisionLog { level, tx }, rx)
    }

    /// Queues the line of a finished call, if the level asks for it. Never waits: a full queue
    /// drops the line and counts it. A span that carries no decision (the synthetic root span of
    /// a run) is not a call and gets no line.
    pub fn record(&self, done: &Finished, metrics: &Metrics) {
        if done.span.decision.is_none() {
            return;
        }
        let wanted = match self.level {
            Level::Off => false,
            Level::Deny => !done.allowed(),
            Level::All => true,
        };
        if !wanted {
            return;
        }
        if self.tx.try_send(line(done)).is_err() {
            metrics.telemetry_dropped("decisions");
        }
    }
}

/// One decision line.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    kind: &'static str,
    side: &'static str,
    trace_id: Option<String>,
    span_id: Option<String>,
    run: Option<&'a str>,
    user: &'a str,
    caller: &'a str,
    callee: &'a str,
    method: Option<&'a str>,
    tool: Option<&'a str>,
    model: Option<&'a str>,
    decision: &'a str,
    rule: Option<&'a str>,
    message: Option<&'a str>,
    status: Option<u16>,
    latency_us: u64,
    tokens_in: u64,
    tokens_out: u64,
    cost_usd_micros: u64,
    depth: u32,
    cycle: bool,
    tainted: bool,
    error: Option<&'a str>,
}

/// The JSON line of a finished call, newline included.
pub fn line(done: &Finished) -> String {
    let s = &done.span;
    let (decision, rule, message) = match &s.decision {
        Some((reason, rule, message)) => (
            reason.as_str(),
            rule.as_deref(),
            Some(message.as_str()).filter(|m| !m.is_empty()),
        ),
        None => ("allowed", None, None),
    };
    let time = OffsetDateTime::from(s.start)
        .format(&Rfc3339)
        .unwrap_or_default();
    let l = Line {
        time,
        kind: s.kind.as_str(),
        side: match s.side {
            Side::Client => "client",
            Side::Server => "server",
        },
        trace_id: s.trace.map(|t| hex(&t.trace_id)),
        span_id: s.trace.map(|t| hex(&t.parent_id)),
        run: s.run.as_deref(),
        user: &s.user,
        caller: &s.caller,
        callee: &s.callee,
        method: s.a2a_method.or(s.mcp_method.as_deref()),
        tool: s.tool.as_deref(),
        model: s.model.as_deref(),
        decision,
        rule,
        message,
        status: s.status,
        latency_us: done.latency_us,
        tokens_in: done.usage.input_tokens,
        tokens_out: done.usage.output_tokens,
        cost_usd_micros: done.usage.micros,
        depth: s.depth,
        cycle: s.cycle,
        tainted: s.tainted,
        error: s.error.as_deref(),
    };
    // Serializing plain strings and numbers cannot fail; an empty line would be the only result.
    let mut out = serde_json::to_string(&l).unwrap_or_default();
    out.push('\n');
    out
}

/// Where lines go: standard output, or a file opened for appending.
pub async fn open(
    path: Option<&Path>,
) -> Result<Box<dyn AsyncWrite + Send + Unpin>, DecisionLogError> {
    match path {
        None => Ok(Box::new(tokio::io::stdout())),
        Some(path) => {
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await
                .map_err(|source| DecisionLogError::Open {
                    path: path.display().to_string(),
                    source,
                })?;
            Ok(Box::new(file))
        }
    }
}

/// Writes queued lines to `out` until the queue closes. A failed write drops its lines and
/// counts them; the sidecar's log says so once per run of failures, not once per line.
pub async fn write(
    mut rx: mpsc::Receiver<String>,
    mut out: impl AsyncWrite + Unpin,
    metrics: Metrics,
) {
    let mut buf = Vec::with_capacity(BATCH * 512);
    let mut failing = false;
    while let Some(lines) = crate::batch::next(&mut rx, BATCH, GATHER).await {
        buf.clear();
        for l in &lines {
            buf.extend_from_slice(l.as_bytes());
        }
        let n = lines.len();
        let written = async {
            out.write_all(&buf).await?;
            out.flush().await
        };
        match written.await {
            Ok(()) => {
                metrics.telemetry_sent("decisions", n);
                failing = false;
            }
            Err(e) => {
                metrics.telemetry_dropped_n("decisions", n);
                if !failing {
                    tracing::warn!(lines = n, error = %e, "cannot write decision log lines; dropped");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests;
