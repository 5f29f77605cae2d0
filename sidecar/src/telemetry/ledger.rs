//! The calls this agent made, reported to the budget service's run ledger in batches. A batch is
//! sent again until it is acknowledged; the service counts each call once (by its event id).

use std::time::Duration;

use ringfence_crds::api::{CallEvent, CallReport};
use tokio::sync::mpsc;

use super::LEDGER_QUEUE;
use crate::control_plane::{ControlPlane, ControlPlaneError};
use crate::metrics::Metrics;

/// Calls per report.
pub const BATCH: usize = 500;
/// How long calls wait to be batched.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);

/// The queue the ledger reporter reads.
pub fn queue() -> (mpsc::Sender<CallEvent>, mpsc::Receiver<CallEvent>) {
    mpsc::channel(LEDGER_QUEUE)
}

/// Reports queued calls until the queue closes.
pub async fn run(rx: mpsc::Receiver<CallEvent>, client: ControlPlane, metrics: Metrics) {
    super::super::batch::deliver(rx, BATCH, FLUSH_EVERY, "calls to the run ledger", |calls| {
        let (client, metrics) = (&client, &metrics);
        async move {
            let n = calls.len();
            match client.report_calls(&CallReport { calls }).await {
                Ok(_) => metrics.telemetry_sent("ledger", n),
                // Refused as invalid: sending it again cannot help.
                Err(ControlPlaneError::Status { status, message, .. })
                    if status.is_client_error() =>
                {
                    metrics.telemetry_dropped_n("ledger", n);
                    tracing::error!(calls = n, %status, %message, "the run ledger refused calls; dropped");
                }
                Err(e) => return Err(e),
            }
            Ok(())
        }
    })
    .await;
}
