//! Watches a manifest folder and says when to reload it.
//!
//! Editors save in bursts (write a temp file, rename, touch); events are gathered for a short
//! quiet period and turned into one reload.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::folder::Folder;

/// How long the folder must be quiet before a reload.
pub const QUIET: Duration = Duration::from_millis(100);

/// Why the folder cannot be watched.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {dir} for changes: {source} (on Linux, check fs.inotify.max_user_watches)")]
pub struct WatchError {
    dir: PathBuf,
    source: notify::Error,
}

/// A running watch; dropping it stops watching.
pub struct FolderWatch {
    _watcher: notify::RecommendedWatcher,
    rx: mpsc::UnboundedReceiver<()>,
    /// A change was received and its quiet period has not ended: kept across calls so that
    /// [`FolderWatch::changed`] dropped mid-wait (a `select!` taking another branch) never
    /// loses the change.
    pending: bool,
}

impl FolderWatch {
    pub fn new(dir: &Path) -> Result<Self, WatchError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let err = |source| WatchError {
            dir: dir.to_owned(),
            source,
        };
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let relevant = match res {
                Ok(ev) => {
                    !matches!(ev.kind, EventKind::Access(_))
                        && ev.paths.iter().any(|p| Folder::is_manifest(p))
                }
                // A watcher error may mean lost events: reload to be safe.
                Err(_) => true,
            };
            if relevant {
                let _ = tx.send(());
            }
        })
        .map_err(err)?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(err)?;
        Ok(Self {
            _watcher: watcher,
            rx,
            pending: false,
        })
    }

    /// Waits for a change, then for the folder to be quiet. `None` once the watch has stopped.
    /// Cancel-safe: a change seen by a call that was dropped is reported by the next call.
    pub async fn changed(&mut self) -> Option<()> {
        if !self.pending {
            self.rx.recv().await?;
            self.pending = true;
        }
        while let Ok(Some(())) = tokio::time::timeout(QUIET, self.rx.recv()).await {}
        self.pending = false;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_change_seen_by_a_dropped_wait_is_reported_by_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut watch = FolderWatch::new(dir.path()).unwrap();
        std::fs::write(dir.path().join("a.yaml"), "kind: Agent\n").unwrap();
        // Dropped inside the quiet period, as `ringfence local`'s select! loop may drop it when
        // its once-a-second sidecar check fires.
        let _ = tokio::time::timeout(QUIET / 2, watch.changed()).await;
        let reported = tokio::time::timeout(Duration::from_secs(10), watch.changed()).await;
        assert_eq!(reported, Ok(Some(())), "the change was lost");
    }
}
