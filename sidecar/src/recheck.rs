//! Live re-authorization of long-lived calls.
//!
//! A request on a kept-alive connection is decided against the bundle in force when it arrives,
//! so a new bundle governs it at once. A stream (SSE) outlives its decision: [`guard`] decides
//! the call again whenever a new bundle is published, and ends the stream if the edge is no
//! longer allowed.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::sync::{mpsc, watch};

use crate::bundle::Snapshot;
use crate::forward::{Body, BoxError};

/// Passes `body` through while `still_allowed` holds for every new bundle.
pub fn guard<F>(
    body: Incoming,
    mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    still_allowed: F,
) -> Body
where
    F: Fn(&Snapshot) -> Result<(), String> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(8);
    snapshots.borrow_and_update();
    tokio::spawn(async move {
        let mut body = body;
        let mut watching = true;
        loop {
            tokio::select! {
                frame = body.frame() => match frame {
                    None => break,
                    Some(f) => {
                        if tx.send(f.map_err(BoxError::from)).await.is_err() {
                            break;
                        }
                    }
                },
                changed = snapshots.changed(), if watching => {
                    if changed.is_err() {
                        watching = false;
                        continue;
                    }
                    let snap = snapshots.borrow_and_update().clone();
                    if let Some(snap) = snap
                        && let Err(why) = still_allowed(&snap)
                    {
                        tracing::info!(version = snap.bundle.version, "ending a stream: {why}");
                        let _ = tx.send(Err(BoxError::from(why))).await;
                        break;
                    }
                }
            }
        }
    });
    let frames =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    StreamBody::new(frames).boxed()
}
