//! Versions and publishes bundles. A compilation becomes a [`Snapshot`] on a `watch` channel:
//! every connected bundle stream wakes up, compares its agent's bundle with what it last sent,
//! and pushes the new version. Unchanged content keeps its version, so an edit that changes
//! nothing for an agent sends that agent nothing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use ringfence_crds::AgentKey;
use ringfence_crds::bundle::{Bundle, BundleContent};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::compile::Diagnostic;

/// Everything the control plane serves at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases with every publication.
    pub generation: u64,
    pub bundles: BTreeMap<AgentKey, Arc<Published>>,
    pub diagnostics: Vec<Diagnostic>,
}

/// A bundle and its wire form, encoded once however many sidecars receive it.
#[derive(Debug)]
pub struct Published {
    pub bundle: Bundle,
    /// The bundle as one JSON line, newline included.
    pub line: Bytes,
}

impl Published {
    fn new(bundle: Bundle) -> Self {
        // Serialising plain structs and string maps cannot fail.
        let mut line = serde_json::to_vec(&bundle).unwrap_or_default();
        line.push(b'\n');
        Self {
            bundle,
            line: Bytes::from(line),
        }
    }
}

/// Why published versions could not be remembered.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "cannot write bundle versions to {path}: {reason} (check that the state folder is writable)"
    )]
    Save { path: PathBuf, reason: String },
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Versions {
    agents: BTreeMap<String, (u64, String)>,
}

/// Assigns versions and publishes snapshots.
pub struct Publisher {
    tx: watch::Sender<Arc<Snapshot>>,
    /// Where versions survive restarts, so a restarted control plane never reuses a version
    /// number for different content.
    versions_file: Option<PathBuf>,
    versions: Versions,
}

impl Publisher {
    pub fn new(versions_file: Option<PathBuf>) -> Self {
        let versions = versions_file
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        Self {
            tx,
            versions_file,
            versions,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Publishes one compilation's bundles; returns the agents whose bundle changed.
    pub fn publish(
        &mut self,
        contents: BTreeMap<AgentKey, BundleContent>,
        diagnostics: Vec<Diagnostic>,
    ) -> Result<Vec<AgentKey>, PublishError> {
        let prev = self.current();
        let mut changed = Vec::new();
        let mut bundles = BTreeMap::new();
        for (key, content) in contents {
            let hash = content.digest();
            let bundle = match prev.bundles.get(&key) {
                Some(p) if p.bundle.hash == hash => p.clone(),
                _ => {
                    let name = key.to_string();
                    let version = match self.versions.agents.get(&name) {
                        Some((v, h)) if *h == hash => *v,
                        Some((v, _)) => v + 1,
                        None => 1,
                    };
                    self.versions.agents.insert(name, (version, hash.clone()));
                    changed.push(key.clone());
                    Arc::new(Published::new(Bundle {
                        version,
                        hash,
                        content,
                    }))
                }
            };
            bundles.insert(key, bundle);
        }
        if !changed.is_empty() {
            self.save()?;
        }
        let snapshot = Snapshot {
            generation: prev.generation + 1,
            bundles,
            diagnostics,
        };
        self.tx.send_replace(Arc::new(snapshot));
        Ok(changed)
    }

    fn save(&self) -> Result<(), PublishError> {
        let Some(path) = &self.versions_file else {
            return Ok(());
        };
        let err = |e: std::io::Error| PublishError::Save {
            path: path.clone(),
            reason: e.to_string(),
        };
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(&self.versions).unwrap_or_default();
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{LastGood, Placement, Settings, compile};
    use crate::source::folder::Folder;

    fn contents() -> BTreeMap<AgentKey, BundleContent> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/incident");
        let m = Folder::new(dir).load().manifests;
        let s = Settings {
            trust_domain: Default::default(),
            placement: Placement::Local,
        };
        compile(&m, &s, &LastGood::default()).bundles
    }

    #[test]
    fn only_changed_agents_get_a_new_version() {
        let mut p = Publisher::new(None);
        let first = p.publish(contents(), vec![]).unwrap();
        assert_eq!(first.len(), 4);
        assert!(p.publish(contents(), vec![]).unwrap().is_empty());

        let mut c = contents();
        let writer = AgentKey::new("default", "writer").unwrap();
        c.get_mut(&writer).unwrap().limits.max_delegation_depth = 2;
        assert_eq!(p.publish(c, vec![]).unwrap(), vec![writer.clone()]);
        let snap = p.current();
        assert_eq!(snap.bundles[&writer].bundle.version, 2);
        assert_eq!(
            snap.bundles[&AgentKey::new("default", "critic").unwrap()]
                .bundle
                .version,
            1
        );
        assert_eq!(snap.generation, 3);
    }

    #[test]
    fn versions_survive_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("versions.json");
        let mut c = contents();
        Publisher::new(Some(file.clone()))
            .publish(c.clone(), vec![])
            .unwrap();
        let writer = AgentKey::new("default", "writer").unwrap();
        c.get_mut(&writer).unwrap().limits.max_revisits = 1;
        let mut again = Publisher::new(Some(file));
        again.publish(c, vec![]).unwrap();
        let snap = again.current();
        assert_eq!(
            snap.bundles[&writer].bundle.version, 2,
            "new content after restart gets a new version"
        );
        assert_eq!(
            snap.bundles[&AgentKey::new("default", "critic").unwrap()]
                .bundle
                .version,
            1,
            "same content keeps its version"
        );
    }
}
