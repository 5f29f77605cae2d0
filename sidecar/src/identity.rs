//! The sidecar's X.509-SVID: obtained with a locally generated key, renewed at half-life.
//!
//! The key never leaves this process: each request for an SVID generates a fresh ECDSA P-256
//! key and sends only a CSR. The first issuance proves who we are with the bootstrap token; a
//! renewal is made over mTLS presenting the current SVID (the token goes along when there is
//! one, which is harmless).
//!
//! Credentials are published through a [`CredentialStore`] (a `watch` of `Arc<Credentials>`).
//! TLS configs built once read it through [`CredentialResolver`] at every handshake, so a new
//! certificate is used by the next connection while live ones keep the certificate they
//! negotiated with. A failed renewal keeps the current certificate while it is valid and retries
//! with backoff; once it expires it is withdrawn, and readiness says why.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use ringfence_crds::api::{CsrRequest, CsrResponse};
use ringfence_crds::spiffe::{AgentKey, SpiffeId};
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::metrics::{Metrics, Outcome};

/// Why an SVID could not be obtained or used.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot generate a key or CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error(
        "cannot read the bootstrap token from {path}: {source}; check --token-file and the volume that projects it"
    )]
    Token {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the control plane refused or could not be reached: {0}")]
    ControlPlane(String),
    #[error("the control plane returned no certificate in certificateChain")]
    EmptyChain,
    #[error("the control plane returned an unreadable {what}: {message}")]
    Pem { what: &'static str, message: String },
    #[error("the SVID does not match the key we generated: {0}")]
    KeyMismatch(String),
    #[error("the SVID names {got:?} but this sidecar speaks for {expected}; check --agent")]
    WrongIdentity { expected: AgentKey, got: String },
    #[error(
        "the SVID expired already (notAfter {not_after}); check the control plane's clock and SVID TTL"
    )]
    Expired { not_after: i64 },
}

/// A wall clock; a seam so the renewal schedule can be tested on tokio's paused time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Who signs our CSRs: the control plane, or a test double.
pub trait CertificateAuthority: Send + Sync + 'static {
    /// Sends a CSR; `token` is the bootstrap proof when there is one.
    fn sign(
        &self,
        request: &CsrRequest,
        token: Option<&str>,
    ) -> impl Future<Output = Result<CsrResponse, IdentityError>> + Send;
}

/// One issued SVID with its private key, ready for rustls.
pub struct Credentials {
    pub spiffe_id: SpiffeId,
    /// Leaf-first chain and our key.
    pub certified_key: Arc<CertifiedKey>,
    /// The trust domain's CA certificates, to verify peers.
    pub trust_bundle: Vec<CertificateDer<'static>>,
    pub not_after: SystemTime,
    /// When we received it; the renewal schedule counts from here.
    pub issued_at: SystemTime,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("spiffe_id", &self.spiffe_id.to_string())
            .field("not_after", &unix_seconds(self.not_after))
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Checks a control-plane answer against the key we generated and the agent we speak for.
    pub fn from_response(
        agent: &AgentKey,
        key: &KeyPair,
        response: &CsrResponse,
        now: SystemTime,
    ) -> Result<Self, IdentityError> {
        let spiffe_id =
            SpiffeId::parse(&response.spiffe_id).map_err(|_| IdentityError::WrongIdentity {
                expected: agent.clone(),
                got: response.spiffe_id.clone(),
            })?;
        if spiffe_id.agent() != agent {
            return Err(IdentityError::WrongIdentity {
                expected: agent.clone(),
                got: response.spiffe_id.clone(),
            });
        }
        let chain = read_certs("certificateChain", &response.certificate_chain)?;
        if chain.is_empty() {
            return Err(IdentityError::EmptyChain);
        }
        let trust_bundle = read_certs("trustBundle", &response.trust_bundle)?;
        let not_after =
            UNIX_EPOCH + Duration::from_secs(u64::try_from(response.not_after).unwrap_or(0));
        if not_after <= now {
            return Err(IdentityError::Expired {
                not_after: response.not_after,
            });
        }
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = rustls::crypto::ring::default_provider();
        let certified_key = CertifiedKey::from_der(chain, private, &provider)
            .map_err(|e| IdentityError::KeyMismatch(e.to_string()))?;
        Ok(Self {
            spiffe_id,
            certified_key: Arc::new(certified_key),
            trust_bundle,
            not_after,
            issued_at: now,
        })
    }

    /// Half-way between receipt and expiry.
    pub fn renew_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.issued_at)
            .unwrap_or_default();
        self.issued_at + lifetime / 2
    }

    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now < self.not_after
    }

    /// Expiry in seconds since the Unix epoch.
    pub fn not_after_unix(&self) -> i64 {
        unix_seconds(self.not_after)
    }
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn read_certs(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| IdentityError::Pem {
            what,
            message: e.to_string(),
        })
}

/// Where the current credentials are published.
#[derive(Debug, Clone)]
pub struct CredentialStore {
    tx: watch::Sender<Option<Arc<Credentials>>>,
}

impl Default for CredentialStore {
    fn default() -> Self {
        Self {
            tx: watch::Sender::new(None),
        }
    }
}

impl CredentialStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A receiver that sees every published change.
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Credentials>>> {
        self.tx.subscribe()
    }

    /// A rustls client/server certificate resolver over this store.
    pub fn resolver(&self) -> Arc<CredentialResolver> {
        Arc::new(CredentialResolver(self.tx.subscribe()))
    }

    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.tx.borrow().clone()
    }

    fn publish(&self, creds: Option<Arc<Credentials>>) {
        self.tx.send_replace(creds);
    }
}

/// Presents the latest credentials at each TLS handshake, as client or as server.
#[derive(Debug)]
pub struct CredentialResolver(watch::Receiver<Option<Arc<Credentials>>>);

impl CredentialResolver {
    /// A resolver that follows `credentials`, as published by a [`CredentialStore`].
    pub fn new(credentials: watch::Receiver<Option<Arc<Credentials>>>) -> Self {
        Self(credentials)
    }

    /// The certificate and key the next handshake presents.
    pub(crate) fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.0.borrow().as_ref().map(|c| c.certified_key.clone())
    }
}

impl ResolvesClientCert for CredentialResolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        self.0.borrow().is_some()
    }
}

impl ResolvesServerCert for CredentialResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

/// Obtains the SVID and keeps it fresh.
pub struct Identity<CA, C = SystemClock> {
    agent: AgentKey,
    ca: CA,
    clock: C,
    token_file: Option<PathBuf>,
    backoff: Backoff,
    store: CredentialStore,
    problem: watch::Sender<Option<String>>,
    metrics: Metrics,
}

impl<CA: CertificateAuthority, C: Clock> Identity<CA, C> {
    pub fn new(
        agent: AgentKey,
        ca: CA,
        clock: C,
        token_file: Option<PathBuf>,
        backoff: Backoff,
        store: CredentialStore,
        metrics: Metrics,
    ) -> Self {
        Self {
            agent,
            ca,
            clock,
            token_file,
            backoff,
            store,
            problem: watch::Sender::new(Some("requesting the first SVID".to_owned())),
            metrics,
        }
    }

    /// Why there is no valid SVID, or `None` when there is one.
    pub fn problems(&self) -> watch::Receiver<Option<String>> {
        self.problem.subscribe()
    }

    /// One request for an SVID, with a fresh key.
    pub async fn request(&self) -> Result<Credentials, IdentityError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, self.agent.to_string());
        params.distinguished_name = name;
        let csr = params.serialize_request(&key)?.pem()?;
        let token = self.token()?;
        let request = CsrRequest {
            agent: self.agent.clone(),
            csr,
        };
        let response = self.ca.sign(&request, token.as_deref()).await?;
        Credentials::from_response(&self.agent, &key, &response, self.clock.now())
    }

    /// The bootstrap token. Needed only for the first SVID: with a valid one, an unreadable
    /// token does not stop a renewal. Read synchronously: it is a small local file read once
    /// per issuance, not worth a trip through the blocking pool.
    fn token(&self) -> Result<Option<String>, IdentityError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        match std::fs::read_to_string(path) {
            Ok(t) => Ok(Some(t.trim().to_owned())),
            Err(e) if self.valid_now() => {
                tracing::debug!(path = %path.display(), error = %e, "renewing without the bootstrap token");
                Ok(None)
            }
            Err(source) => Err(IdentityError::Token {
                path: path.clone(),
                source,
            }),
        }
    }

    fn valid_now(&self) -> bool {
        self.store
            .current()
            .is_some_and(|c| c.is_valid_at(self.clock.now()))
    }

    /// How long to wait before the next request: at once without an SVID, at half-life with
    /// one, and with backoff after failures — never past expiry.
    fn next_wait(&self, failures: u32) -> Duration {
        let now = self.clock.now();
        let current = self.store.current();
        let until = |t: SystemTime| t.duration_since(now).unwrap_or_default();
        match (current, failures) {
            (None, 0) => Duration::ZERO,
            (None, n) => self.backoff.delay(n),
            (Some(c), 0) => until(c.renew_at()),
            (Some(c), n) => self.backoff.delay(n).min(until(c.not_after)),
        }
    }

    /// Runs forever: first issuance, then renewal at each half-life.
    pub async fn run(self) {
        let mut failures = 0u32;
        // Expiry of the last SVID we held, to tell "expired" from "never had one".
        let mut expired_at: Option<i64> = None;
        loop {
            tokio::time::sleep(self.next_wait(failures)).await;
            match self.request().await {
                Ok(creds) => {
                    failures = 0;
                    tracing::info!(
                        spiffe_id = %creds.spiffe_id,
                        not_after = creds.not_after_unix(),
                        "SVID issued"
                    );
                    self.metrics
                        .svid_request(Outcome::Ok, Some(creds.not_after_unix()));
                    self.store.publish(Some(Arc::new(creds)));
                    self.problem.send_replace(None);
                    expired_at = None;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let now = self.clock.now();
                    let current = self.store.current();
                    match &current {
                        Some(c) if c.is_valid_at(now) => {
                            tracing::warn!(error = %e, failures, not_after = c.not_after_unix(), "SVID renewal failed; keeping the current SVID while it is valid");
                            self.metrics
                                .svid_request(Outcome::Failed, Some(c.not_after_unix()));
                        }
                        Some(c) => {
                            tracing::error!(error = %e, failures, not_after = c.not_after_unix(), "SVID renewal failed and the SVID expired; withdrawing it");
                            self.store.publish(None);
                            self.metrics.svid_request(Outcome::Failed, None);
                            expired_at = Some(c.not_after_unix());
                            self.problem.send_replace(Some(format!(
                                "the SVID expired at {} and renewal fails: {e}",
                                c.not_after_unix()
                            )));
                        }
                        None if expired_at.is_some() => {
                            tracing::warn!(error = %e, failures, "SVID renewal still fails");
                            self.metrics.svid_request(Outcome::Failed, None);
                            self.problem.send_replace(Some(format!(
                                "the SVID expired at {} and renewal fails ({failures} failed attempts): {e}",
                                expired_at.unwrap_or_default()
                            )));
                        }
                        None => {
                            tracing::warn!(error = %e, failures, "cannot obtain an SVID yet");
                            self.metrics.svid_request(Outcome::Failed, None);
                            self.problem.send_replace(Some(format!(
                                "no SVID yet ({failures} failed attempts): {e}"
                            )));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
