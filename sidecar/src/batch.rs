//! Batches for what the sidecar reports in the background (spend, ledger calls, spans): wait for
//! one item, gather more for a short while, send them together.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::backoff::Backoff;

/// The next batch: waits for one item, then takes more until `max` or until `wait` has passed.
/// `None` once the queue is closed and empty.
///
/// While it gathers, the task sleeps rather than waiting on the queue: a request that queues an
/// item then wakes nobody, and one batch costs two wake-ups (its first item and the end of the
/// wait) however many requests fill it. A queue holding `max` items already is taken at once.
pub async fn next<T>(rx: &mut mpsc::Receiver<T>, max: usize, wait: Duration) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    let mut batch = vec![first];
    drain(rx, &mut batch, max);
    if batch.len() < max {
        tokio::time::sleep(wait).await;
        drain(rx, &mut batch, max);
    }
    Some(batch)
}

/// Moves what is queued into `batch`, up to `max` items.
fn drain<T>(rx: &mut mpsc::Receiver<T>, batch: &mut Vec<T>, max: usize) {
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
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
    async fn items_queued_during_the_wait_join_the_batch_and_a_full_queue_is_taken_at_once() {
        let (tx, mut rx) = mpsc::channel(16);
        tx.send(0).await.unwrap();
        let gather = tokio::spawn(async move {
            let batch = next(&mut rx, 10, Duration::from_millis(100)).await;
            (batch, rx)
        });
        tokio::task::yield_now().await;
        for i in 1..4 {
            tx.try_send(i).unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (batch, mut rx) = gather.await.unwrap();
        assert_eq!(batch, Some(vec![0, 1, 2, 3]));
        // A full queue is taken without waiting.
        for i in 0..10 {
            tx.try_send(i).unwrap();
        }
        let started = tokio::time::Instant::now();
        assert_eq!(
            next(&mut rx, 10, Duration::from_secs(60))
                .await
                .unwrap()
                .len(),
            10
        );
        assert_eq!(started.elapsed(), Duration::ZERO);
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
