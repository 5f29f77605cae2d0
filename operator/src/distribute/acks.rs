//! What each sidecar says it enforces. Sidecars acknowledge every bundle version they receive,
//! or report why they rejected it; the control plane shows this per agent.

use std::collections::BTreeMap;
use std::sync::Mutex;

use ringfence_crds::AgentKey;
use ringfence_crds::api::BundleAck;
use serde::Serialize;

/// One sidecar's latest report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SidecarState {
    pub sidecar: String,
    pub connected: bool,
    /// The version it enforces (its last accepted one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enforced_version: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enforced_hash: Option<String>,
    /// The last version it rejected, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected: Option<(u64, String)>,
}

/// The registry of sidecar reports. Writes are rare (connects, acks); a mutex is enough.
#[derive(Debug, Default)]
pub struct Acks {
    inner: Mutex<BTreeMap<AgentKey, BTreeMap<String, SidecarState>>>,
}

impl Acks {
    fn with<R>(
        &self,
        f: impl FnOnce(&mut BTreeMap<AgentKey, BTreeMap<String, SidecarState>>) -> R,
    ) -> R {
        let mut guard = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    fn entry<'a>(
        map: &'a mut BTreeMap<AgentKey, BTreeMap<String, SidecarState>>,
        agent: &AgentKey,
        sidecar: &str,
    ) -> &'a mut SidecarState {
        map.entry(agent.clone())
            .or_default()
            .entry(sidecar.to_owned())
            .or_insert_with(|| SidecarState {
                sidecar: sidecar.to_owned(),
                connected: false,
                enforced_version: None,
                enforced_hash: None,
                rejected: None,
            })
    }

    pub fn connected(&self, agent: &AgentKey, sidecar: &str, connected: bool) {
        self.with(|m| Self::entry(m, agent, sidecar).connected = connected);
    }

    pub fn record(&self, agent: &AgentKey, sidecar: &str, ack: &BundleAck) {
        self.with(|m| {
            let s = Self::entry(m, agent, sidecar);
            match &ack.rejected {
                None => {
                    s.enforced_version = Some(ack.version);
                    s.enforced_hash = Some(ack.hash.clone());
                }
                Some(reason) => s.rejected = Some((ack.version, reason.clone())),
            }
        });
    }

    /// Every sidecar of every agent.
    pub fn report(&self) -> BTreeMap<AgentKey, Vec<SidecarState>> {
        self.with(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.values().cloned().collect()))
                .collect()
        })
    }
}
