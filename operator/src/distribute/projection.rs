//! Manifests → compiled bundles → a published snapshot: the one path every source of manifests
//! takes, whether a folder (`ringfence local`) or the Kubernetes API (`ringfence operator`).
//!
//! The projection remembers the last accepted version of every policy between runs, so an
//! invalid edit never takes a rule out of force, and republishes only what changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use ringfence_crds::AgentKey;
use tokio::sync::watch;

use super::publish::{PublishError, Publisher, Snapshot};
use crate::compile::{self, Diagnostic, LastGood, ResourceRef, Settings};
use crate::source::Manifests;

/// What one projection did.
#[derive(Debug, Clone)]
pub struct Projected {
    /// Agents whose bundle got a new version.
    pub changed: Vec<AgentKey>,
    /// Every problem found, warnings included (also in `snapshot.diagnostics`).
    pub diagnostics: Vec<Diagnostic>,
    /// The AgentPolicies in force, and how many Cedar policies each compiled to. A policy whose
    /// new version is invalid but whose last accepted version is in force is listed.
    pub accepted: BTreeMap<ResourceRef, usize>,
    /// What is served from now on.
    pub snapshot: Arc<Snapshot>,
}

/// Compiles manifests and publishes the result, carrying the last good policies along.
pub struct Projection {
    settings: Settings,
    last_good: LastGood,
    publisher: Publisher,
}

impl Projection {
    pub fn new(settings: Settings, publisher: Publisher) -> Self {
        Self {
            settings,
            last_good: LastGood::default(),
            publisher,
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The snapshots served to sidecars.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.publisher.subscribe()
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.publisher.current()
    }

    /// Compiles `manifests` and publishes the bundles. Problems are logged and returned; what
    /// was in force stays in force for whatever they touch.
    pub fn project(&mut self, manifests: &Manifests) -> Result<Projected, PublishError> {
        let compiled = compile::compile(manifests, &self.settings, &self.last_good);
        for d in &compiled.diagnostics {
            if d.is_error() {
                tracing::error!("{d}");
            } else {
                tracing::warn!("{d}");
            }
        }
        self.last_good = compiled.last_good;
        let diagnostics = compiled.diagnostics.clone();
        let changed = self
            .publisher
            .publish(compiled.bundles, compiled.diagnostics)?;
        let snapshot = self.publisher.current();
        for k in &changed {
            if let Some(p) = snapshot.bundles.get(k) {
                tracing::info!(agent = %k, version = p.bundle.version, hash = %p.bundle.hash, policies = p.bundle.content.policy.policies.len(), "bundle published");
            }
        }
        Ok(Projected {
            changed,
            diagnostics,
            accepted: compiled.accepted,
            snapshot,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::compile::Placement;
    use crate::source::folder::Folder;

    fn incident() -> Manifests {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/incident");
        Folder::new(dir).load().manifests
    }

    #[test]
    fn an_invalid_edit_keeps_the_last_accepted_policy_in_force() {
        let settings = Settings {
            trust_domain: Default::default(),
            placement: Placement::Local,
        };
        let mut p = Projection::new(settings, Publisher::new(None));
        let first = p.project(&incident()).unwrap();
        assert!(first.diagnostics.iter().all(|d| !d.is_error()));
        let before = p.current();

        let mut broken = incident();
        let policy = broken
            .policies
            .iter_mut()
            .find(|p| p.spec.cedar.is_some())
            .unwrap();
        policy.spec.cedar = Some("permit (principal, actoin, resource);".into());
        let r = crate::compile::resource_ref("AgentPolicy", &policy.metadata);
        let second = p.project(&broken).unwrap();
        assert!(second.diagnostics.iter().any(Diagnostic::is_error));
        assert!(second.changed.is_empty(), "no agent's bundle changed");
        assert!(
            second.accepted.contains_key(&r),
            "the last good version is in force"
        );
        for (k, b) in &before.bundles {
            assert_eq!(second.snapshot.bundles[k].bundle.hash, b.bundle.hash);
        }
    }
}
