//! Batches for what the sidecar reports in the background (spend, ledger calls, spans): wait for
//! one item, gather more for a short while, send them together.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::backoff::Backoff;

/// The next batch: waits for one item, then takes more until `max` or until `wait` has passed.
/// `None` once the queue is closed and empty.
pub async fn next<T>(rx: &mut mpsc::Receiver<T>, max: usize, wait: Duration) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let mut batch = vec![first];
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    while batch.len() < max {
        tokio::select! {
            item = rx.recv() => match item {
                Some(item) => batch.push(item),
                None => break,
            },
            _ = &mut deadline => break,
        }
    }
    Some(batch)
}

/// Sends batches until the queue closes. A batch that fails is sent again, whole, after a
/// backoff: the receiver must count each item once (an idempotency key per item).
pub async fn deliver<T, E, F, Fut>(
    mut rx: mpsc::Receiver<T>,
    max: usize,
    wait: Duration,
    what: &'static str,
    mut send: F,
) where
    T: Clone,
    E: Display,
    F: FnMut(Vec<T>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let backoff = Backoff::default();
    while let Some(batch) = next(&mut rx, max, wait).await {
        let mut failures = 0u32;
        while let Err(e) = send(batch.clone()).await {
            failures = failures.saturating_add(1);
            let delay = backoff.delay(failures);
            tracing::warn!(items = batch.len(), error = %e, ?delay, "cannot report {what}; will retry");
            tokio::time::sleep(delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_batch_gathers_what_arrives_within_the_wait_and_no_more_than_max() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 0..5 {
            tx.send(i).await.unwrap();
        }
        assert_eq!(
            next(&mut rx, 3, Duration::from_millis(100)).await,
            Some(vec![0, 1, 2])
        );
        assert_eq!(
            next(&mut rx, 3, Duration::from_millis(100)).await,
            Some(vec![3, 4])
        );
        drop(tx);
        assert_eq!(next(&mut rx, 3, Duration::from_millis(100)).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_batch_is_sent_again_whole_until_it_is_taken() {
        let (tx, rx) = mpsc::channel(16);
        tx.send("a").await.unwrap();
        tx.send("b").await.unwrap();
        drop(tx);
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let seen = attempts.clone();
        deliver(
            rx,
            10,
            Duration::from_millis(10),
            "test items",
            move |batch| {
                let seen = seen.clone();
                async move {
                    let mut seen = seen.lock().unwrap();
                    seen.push(batch);
                    if seen.len() < 3 {
                        Err("service down")
                    } else {
                        Ok(())
                    }
                }
            },
        )
        .await;
        let attempts = attempts.lock().unwrap();
        assert_eq!(attempts.len(), 3);
        assert!(attempts.iter().all(|b| b == &vec!["a", "b"]));
    }
}
