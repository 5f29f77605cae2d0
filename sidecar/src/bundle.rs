//! The bundle stream: from the control plane's JSON lines to the snapshot the hot path reads.
//!
//! `GET /v1/bundles/watch` (mTLS, our SVID names the agent) sends the current bundle at once and
//! each new version as it is published, one JSON [`Bundle`] per line; blank lines are
//! keep-alives. Each bundle is checked (hash, agent) and compiled into an [`Authorizer`]; only
//! then is it published as a new [`Snapshot`]. Anything wrong — a bad hash, a policy that does
//! not validate, a malformed or oversized line — is acknowledged as rejected with the reason,
//! and the last good snapshot stays in force. The stream is reopened with backoff when it
//! breaks or goes silent.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use http_body_util::BodyExt;
use ringfence_crds::api::BundleAck;
use ringfence_crds::bundle::Bundle;
use ringfence_crds::spiffe::AgentKey;
use serde::Deserialize;
use tokio::sync::watch;

use crate::authz::{Authorizer, AuthzError};
use crate::backoff::Backoff;
use crate::control_plane::{ControlPlane, ControlPlaneError};
use crate::identity::Credentials;
use crate::metrics::{Metrics, Outcome};

/// Default cap on one line of the stream; a larger one is rejected, not buffered.
pub const MAX_LINE: usize = 16 << 20;

/// Why a received bundle is not enforced. The text goes into the ack and the log.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("a line of the bundle stream exceeds {limit} bytes; it was discarded")]
    TooLong { limit: usize },
    #[error("a line of the bundle stream is not a bundle: {0}")]
    Malformed(String),
    #[error("{0}")]
    Hash(#[from] ringfence_crds::bundle::BundleError),
    #[error("bundle version {version} is for agent {got} but this sidecar speaks for {expected}")]
    WrongAgent {
        version: u64,
        expected: AgentKey,
        got: String,
    },
    #[error("bundle version {version} cannot be enforced: {source}")]
    Policy { version: u64, source: AuthzError },
}

/// One enforced bundle and its compiled authorizer. Built once, shared by `Arc`.
#[derive(Debug)]
pub struct Snapshot {
    pub bundle: Bundle,
    pub authorizer: Authorizer,
    pub enforced_since: SystemTime,
    /// Where each peer is in `bundle.content.peers`, by name: every call looks its peer up, and
    /// a namespace may hold thousands of agents.
    peers: std::collections::HashMap<String, usize>,
}

impl Snapshot {
    pub fn new(bundle: Bundle, authorizer: Authorizer) -> Self {
        let peers = bundle
            .content
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| (p.name.clone(), i))
            .collect();
        Snapshot {
            bundle,
            authorizer,
            enforced_since: SystemTime::now(),
            peers,
        }
    }

    /// This agent or a peer, by name.
    pub fn agent_named(&self, name: &str) -> Option<&ringfence_crds::bundle::AgentEntry> {
        let content = &self.bundle.content;
        if content.agent.name == name {
            return Some(&content.agent);
        }
        self.peers.get(name).and_then(|&i| content.peers.get(i))
    }
}

/// What to do with one line of the stream.
#[derive(Debug)]
pub enum Admission {
    /// A blank keep-alive line.
    KeepAlive,
    /// The version and hash we already enforce (sent again after a reconnect).
    Unchanged { version: u64, hash: String },
    /// A new snapshot to publish.
    Enforce(Box<Snapshot>),
    /// Not enforceable; `version` and `hash` are what the line claimed (0 and empty when it
    /// could not even say).
    Reject {
        version: u64,
        hash: String,
        error: BundleError,
    },
}

/// Checks and compiles one line. Pure apart from the clock reading for `enforced_since`.
pub fn admit(line: &[u8], agent: &AgentKey, current: Option<&Snapshot>) -> Admission {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Admission::KeepAlive;
    }
    let bundle: Bundle = match serde_json::from_slice(line) {
        Ok(b) => b,
        Err(e) => {
            // Say which version was refused when the line at least says that much.
            #[derive(Deserialize, Default)]
            struct Claim {
                #[serde(default)]
                version: u64,
                #[serde(default)]
                hash: String,
            }
            let claim: Claim = serde_json::from_slice(line).unwrap_or_default();
            return Admission::Reject {
                version: claim.version,
                hash: claim.hash,
                error: BundleError::Malformed(e.to_string()),
            };
        }
    };
    let reject = |error| Admission::Reject {
        version: bundle.version,
        hash: bundle.hash.clone(),
        error,
    };
    if let Err(e) = bundle.verify() {
        return reject(e.into());
    }
    let own = &bundle.content.agent;
    if own.name != agent.name || own.namespace != agent.namespace {
        return reject(BundleError::WrongAgent {
            version: bundle.version,
            expected: agent.clone(),
            got: format!("{}/{}", own.namespace, own.name),
        });
    }
    if let Some(current) = current
        && current.bundle.version == bundle.version
        && current.bundle.hash == bundle.hash
    {
        return Admission::Unchanged {
            version: bundle.version,
            hash: bundle.hash,
        };
    }
    match Authorizer::build(&bundle.content.policy, &bundle.content.tools) {
        Ok(authorizer) => Admission::Enforce(Box::new(Snapshot::new(bundle, authorizer))),
        Err(source) => reject(BundleError::Policy {
            version: bundle.version,
            source,
        }),
    }
}

/// One item out of [`LineReader`].
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Complete(BytesMut),
    /// A line longer than the cap; its bytes were dropped up to the next newline.
    TooLong,
}

/// Splits a byte stream into lines without ever holding more than `max` bytes of one.
#[derive(Debug)]
pub struct LineReader {
    buf: BytesMut,
    max: usize,
    discarding: bool,
}

impl LineReader {
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
            discarding: false,
        }
    }

    /// Feeds a chunk; returns the lines it completed.
    pub fn push(&mut self, mut chunk: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        loop {
            let newline = chunk.iter().position(|b| *b == b'\n');
            if self.discarding {
                match newline {
                    Some(i) => {
                        self.discarding = false;
                        chunk = &chunk[i + 1..];
                        continue;
                    }
                    None => return out,
                }
            }
            match newline {
                Some(i) => {
                    if self.buf.len() + i > self.max {
                        self.buf.clear();
                        out.push(Line::TooLong);
                    } else {
                        self.buf.extend_from_slice(&chunk[..i]);
                        if self.buf.last() == Some(&b'\r') {
                            self.buf.truncate(self.buf.len() - 1);
                        }
                        out.push(Line::Complete(self.buf.split()));
                    }
                    chunk = &chunk[i + 1..];
                }
                None => {
                    if self.buf.len() + chunk.len() > self.max {
                        self.buf.clear();
                        self.discarding = true;
                        out.push(Line::TooLong);
                    } else {
                        self.buf.extend_from_slice(chunk);
                    }
                    return out;
                }
            }
        }
    }
}

/// Settings of the bundle watch.
#[derive(Debug, Clone, Copy)]
pub struct WatchSettings {
    pub backoff: Backoff,
    /// Reopen the stream when nothing (not even a keep-alive) arrived for this long.
    pub idle_timeout: Duration,
    pub max_line: usize,
}

impl Default for WatchSettings {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            // The control plane sends a keep-alive every 15 s; four missed ones mean a dead link.
            idle_timeout: Duration::from_secs(60),
            max_line: MAX_LINE,
        }
    }
}

/// Keeps the enforced snapshot in step with the control plane.
pub struct BundleWatch {
    agent: AgentKey,
    control_plane: ControlPlane,
    credentials: watch::Receiver<Option<Arc<Credentials>>>,
    snapshots: watch::Sender<Option<Arc<Snapshot>>>,
    problem: watch::Sender<Option<String>>,
    metrics: Metrics,
    settings: WatchSettings,
}

/// Why the stream ended.
#[derive(Debug, thiserror::Error)]
enum StreamEnd {
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    #[error("the bundle stream broke: {0}")]
    Broken(hyper::Error),
    #[error("the control plane closed the bundle stream")]
    Closed,
    #[error("nothing arrived on the bundle stream for {0:?}")]
    Idle(Duration),
}

impl BundleWatch {
    pub fn new(
        agent: AgentKey,
        control_plane: ControlPlane,
        credentials: watch::Receiver<Option<Arc<Credentials>>>,
        metrics: Metrics,
        settings: WatchSettings,
    ) -> Self {
        Self {
            agent,
            control_plane,
            credentials,
            snapshots: watch::Sender::new(None),
            problem: watch::Sender::new(Some(
                "waiting for an SVID to open the bundle stream".to_owned(),
            )),
            metrics,
            settings,
        }
    }

    /// The enforced snapshot, for the hot path.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.snapshots.subscribe()
    }

    /// Why no bundle is enforced yet (or the last stream problem), `None` when all is well.
    pub fn problems(&self) -> watch::Receiver<Option<String>> {
        self.problem.subscribe()
    }

    /// Runs forever: wait for an SVID, open the stream, apply bundles, reopen on failure.
    pub async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            if self.credentials.wait_for(Option::is_some).await.is_err() {
                tracing::info!("credential store closed; bundle watch stops");
                return;
            }
            let end = self.stream(&mut failures).await;
            failures = failures.saturating_add(1);
            let delay = self.settings.backoff.delay(failures);
            tracing::warn!(error = %end, retry_in = ?delay, "bundle stream ended; reopening");
            let enforced = self.snapshots.borrow().as_ref().map(|s| s.bundle.version);
            self.problem.send_replace(Some(match enforced {
                Some(v) => format!("enforcing version {v}; {end}"),
                None => format!("no bundle received yet: {end}"),
            }));
            tokio::time::sleep(delay).await;
        }
    }

    /// One stream, until it ends. Resets `failures` once the stream delivers a line.
    async fn stream(&self, failures: &mut u32) -> StreamEnd {
        let mut body = match self.control_plane.watch().await {
            Ok(b) => b,
            Err(e) => return e.into(),
        };
        tracing::info!(
            control_plane = self.control_plane.addr(),
            "bundle stream open"
        );
        let mut lines = LineReader::new(self.settings.max_line);
        loop {
            let frame = match tokio::time::timeout(self.settings.idle_timeout, body.frame()).await {
                Err(_) => return StreamEnd::Idle(self.settings.idle_timeout),
                Ok(None) => return StreamEnd::Closed,
                Ok(Some(Err(e))) => return StreamEnd::Broken(e),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            for line in lines.push(&data) {
                *failures = 0;
                self.apply(line).await;
            }
        }
    }

    async fn apply(&self, line: Line) {
        let admission = match line {
            Line::TooLong => Admission::Reject {
                version: 0,
                hash: String::new(),
                error: BundleError::TooLong {
                    limit: self.settings.max_line,
                },
            },
            Line::Complete(bytes) => {
                let current = self.snapshots.borrow().clone();
                admit(&bytes, &self.agent, current.as_deref())
            }
        };
        let ack = match admission {
            Admission::KeepAlive => return,
            Admission::Unchanged { version, hash } => {
                tracing::debug!(version, "bundle unchanged");
                self.problem.send_replace(None);
                BundleAck {
                    version,
                    hash,
                    rejected: None,
                }
            }
            Admission::Enforce(snapshot) => {
                let (version, hash) = (snapshot.bundle.version, snapshot.bundle.hash.clone());
                tracing::info!(
                    version,
                    hash,
                    policies = snapshot.authorizer.policy_count(),
                    peers = snapshot.bundle.content.peers.len(),
                    "bundle enforced"
                );
                self.snapshots.send_replace(Some(Arc::from(snapshot)));
                self.metrics.bundle_update(Outcome::Ok, Some(version));
                self.problem.send_replace(None);
                BundleAck {
                    version,
                    hash,
                    rejected: None,
                }
            }
            Admission::Reject {
                version,
                hash,
                error,
            } => {
                let enforced = self.snapshots.borrow().as_ref().map(|s| s.bundle.version);
                tracing::error!(version, error = %error, enforced = ?enforced, "bundle rejected; the previous one stays in force");
                self.metrics.bundle_update(Outcome::Failed, None);
                if enforced.is_none() {
                    self.problem.send_replace(Some(format!(
                        "no bundle enforced: version {version} was rejected: {error}"
                    )));
                }
                BundleAck {
                    version,
                    hash,
                    rejected: Some(error.to_string()),
                }
            }
        };
        if let Err(e) = self.control_plane.ack(&ack).await {
            // Not retried: the next bundle, or the resend after a reconnect, is acked again.
            tracing::warn!(version = ack.version, error = %e, "cannot acknowledge bundle");
        }
    }
}

#[cfg(test)]
mod tests;
