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
        })
    }

    /// Waits for a change, then for the folder to be quiet. `None` once the watch has stopped.
    pub async fn changed(&mut self) -> Option<()> {
        self.rx.recv().await?;
        loop {
            match tokio::time::timeout(QUIET, self.rx.recv()).await {
                Ok(Some(())) => continue,
                Ok(None) | Err(_) => return Some(()),
            }
        }
    }
}
