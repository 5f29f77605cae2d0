//! The trust domain's certificate authority and how sidecars prove who they are.
//!
//! A sidecar generates its own key, proves which agent it speaks for ([`Proof`]), and sends a
//! CSR; the control plane signs a short-lived X.509-SVID whose one URI SAN is
//! `spiffe://<trust-domain>/ns/<namespace>/agent/<name>`. Private keys never travel.
//!
//! - `ca` — the CA key and certificate, persisted in `<state>/ca/`; signing.
//! - `csr` — what a CSR may ask for.
//! - `proof` — attestation: bootstrap tokens (local mode) and renewal with the current SVID.
//! - `tokens` — the per-agent bootstrap tokens in `<state>/tokens/`.
//! - `tokenreview` — Kubernetes: a projected ServiceAccount token checked with TokenReview, and
//!   the pod it is bound to mapped to its Agent.
//! - `files` — owner-only files written atomically.
//! - `serving` — serving certificates as key material, for endpoints that rotate their own
//!   (the admission webhook).
//!
//! [`Identity`] ties them together for the control plane's HTTP server; the TLS verifiers that
//! check SVIDs on every connection live in `ringfence_crds::svid`, shared with the sidecar.

mod ca;
mod csr;
mod files;
mod proof;
mod serving;
pub mod tokenreview;
mod tokens;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::KeyPair;
use ringfence_crds::api::{CsrRequest, CsrResponse};
use ringfence_crds::spiffe::SpiffeError;
use ringfence_crds::svid::{self, ClientAuth, SvidError};
use ringfence_crds::{AgentKey, SpiffeId, TrustDomain};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

pub use ca::CaError;
pub use csr::CsrError;
pub use proof::{Proof, ProofError};
pub use serving::ServingCert;
pub use tokenreview::{AgentDirectory, PodAttestor, PodProofError};
pub use tokens::TokenError;

use ca::Ca;
use tokens::Tokens;

/// How long an SVID is valid unless configured otherwise. Sidecars renew at half-life.
pub const DEFAULT_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// Shorter SVIDs would have sidecars renewing faster than clocks can be trusted to agree.
const MIN_SVID_TTL: Duration = Duration::from_secs(60);
/// Longer SVIDs would defeat the point of short-lived credentials.
const MAX_SVID_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why an SVID was not issued, or the identity service could not start.
///
/// [`IdentityError::is_refusal`] separates the caller's fault (403/400 material) from the
/// control plane's (500).
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Tokens(#[from] TokenError),
    // Reasons are boxed so the Ok path of every identity call stays small.
    #[error("refused to issue an SVID for {agent}: {reason}")]
    Unproven {
        agent: AgentKey,
        reason: Box<ProofError>,
    },
    #[error("refused the CSR of {agent}: {reason}")]
    Csr {
        agent: AgentKey,
        reason: Box<CsrError>,
    },
    #[error("the request names no valid agent: {0}")]
    InvalidAgent(#[from] SpiffeError),
    #[error(
        "the SVID lifetime {0:?} is out of range: use between 1 minute and 365 days (default 24h)"
    )]
    SvidTtl(Duration),
    #[error(
        "this control plane keeps no bootstrap tokens (in Kubernetes, sidecars prove themselves with a ServiceAccount token)"
    )]
    NoBootstrapTokens,
    #[error("the control plane's serving certificate needs at least one DNS name or IP address")]
    NoServingNames,
    #[error("cannot build the control plane's TLS configuration: {0}")]
    Tls(#[from] SvidError),
}

impl IdentityError {
    /// Whether the caller is at fault (bad proof, bad CSR, bad agent name), as opposed to the
    /// control plane failing.
    pub fn is_refusal(&self) -> bool {
        match self {
            IdentityError::Unproven { reason, .. } => !matches!(
                **reason,
                ProofError::Token(
                    TokenError::Io { .. } | TokenError::Corrupt { .. } | TokenError::Random
                )
            ),
            IdentityError::Csr { .. } | IdentityError::InvalidAgent(_) => true,
            _ => false,
        }
    }
}

/// The control plane's identity service: the trust domain's CA plus the proofs it accepts.
pub struct Identity {
    ca: Ca,
    /// Bootstrap tokens: local mode only. In Kubernetes, pods prove themselves with TokenReview.
    tokens: Option<Tokens>,
    svid_ttl: Duration,
}

impl Identity {
    /// Loads the CA from `<state_dir>/ca/` (creating it on first start) and the bootstrap tokens
    /// under `<state_dir>/tokens/`.
    pub fn load_or_create(
        state_dir: &Path,
        trust_domain: TrustDomain,
        svid_ttl: Duration,
    ) -> Result<Self, IdentityError> {
        check_ttl(svid_ttl)?;
        Ok(Self {
            ca: Ca::load_or_create(state_dir, trust_domain)?,
            tokens: Some(Tokens::new(state_dir)),
            svid_ttl,
        })
    }

    /// An identity service over a CA handed over as PEM (Kubernetes: the CA Secret). It takes no
    /// bootstrap tokens; `origin` names the CA's source in error messages.
    pub fn from_ca_pem(
        key_pem: &str,
        cert_pem: &str,
        origin: &str,
        trust_domain: TrustDomain,
        svid_ttl: Duration,
    ) -> Result<Self, IdentityError> {
        check_ttl(svid_ttl)?;
        Ok(Self {
            ca: Ca::from_pem(key_pem, cert_pem, origin, trust_domain)?,
            tokens: None,
            svid_ttl,
        })
    }

    /// A new CA made in memory; returns the identity service and the CA key as PEM, for the
    /// caller to store (with [`Identity::trust_bundle_pem`] as its certificate).
    pub fn generate(
        trust_domain: TrustDomain,
        origin: &str,
        svid_ttl: Duration,
    ) -> Result<(Self, String), IdentityError> {
        check_ttl(svid_ttl)?;
        let (ca, key_pem) = Ca::generate(trust_domain, origin)?;
        Ok((
            Self {
                ca,
                tokens: None,
                svid_ttl,
            },
            key_pem,
        ))
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        self.ca.trust_domain()
    }

    /// The CA certificate(s) every sidecar trusts, PEM.
    pub fn trust_bundle_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// Where the trust bundle is on disk, for local-mode sidecars started from the same folder.
    pub fn trust_bundle_path(&self) -> &Path {
        self.ca.cert_path()
    }

    /// Creates a bootstrap token for each agent that has none yet (local mode).
    pub fn ensure_tokens(&self, agents: &[AgentKey]) -> Result<(), IdentityError> {
        let agents = agents
            .iter()
            .map(revalidated)
            .collect::<Result<Vec<_>, _>>()?;
        match &self.tokens {
            Some(tokens) => Ok(tokens.ensure(&agents)?),
            None => Err(IdentityError::NoBootstrapTokens),
        }
    }

    /// Where `agent`'s bootstrap token is kept (local mode). The key must be a valid one
    /// (`AgentKey::new`).
    pub fn token_path(&self, agent: &AgentKey) -> Option<PathBuf> {
        self.tokens.as_ref().map(|t| t.path(agent))
    }

    /// Checks that `proof` names `req.agent`, that the CSR asks for that identity or none, and
    /// signs an SVID for it.
    pub fn issue(&self, req: &CsrRequest, proof: Proof<'_>) -> Result<CsrResponse, IdentityError> {
        self.issue_at(req, proof, OffsetDateTime::now_utc())
    }

    fn issue_at(
        &self,
        req: &CsrRequest,
        proof: Proof<'_>,
        now: OffsetDateTime,
    ) -> Result<CsrResponse, IdentityError> {
        let agent = revalidated(&req.agent)?;
        let id = SpiffeId::new(self.trust_domain().clone(), agent.clone());
        // Proof before parsing: an unauthenticated caller gets no work out of the CA.
        proof::attest(proof, &id, self.tokens.as_ref()).map_err(|reason| {
            IdentityError::Unproven {
                agent: agent.clone(),
                reason: Box::new(reason),
            }
        })?;
        let public_key =
            csr::checked_public_key(&req.csr, &id).map_err(|reason| IdentityError::Csr {
                agent,
                reason: Box::new(reason),
            })?;
        let issued = self.ca.sign_svid(&public_key, &id, self.svid_ttl, now)?;
        tracing::info!(spiffe_id = %id, not_after = %issued.not_after, "issued SVID");
        Ok(CsrResponse {
            spiffe_id: id.to_string(),
            certificate_chain: issued.pem,
            trust_bundle: self.ca.cert_pem().to_owned(),
            not_after: issued.not_after.unix_timestamp(),
        })
    }

    /// A TLS configuration for the control plane's own endpoints: a serving certificate for
    /// `names` (DNS names or IPs) signed by the CA, its key made here and kept in memory; client
    /// certificates optional, and verified as agent SVIDs when present.
    ///
    /// Sidecars verify it with the trust bundle and the name they dialled. The certificate is
    /// valid for a year; build a new configuration to renew it. Set `alpn_protocols` on the
    /// result as the server needs.
    pub fn server_tls_config(
        &self,
        names: &[String],
    ) -> Result<rustls::ServerConfig, IdentityError> {
        if names.is_empty() {
            return Err(IdentityError::NoServingNames);
        }
        let key = KeyPair::generate().map_err(CaError::from)?;
        let issued = self
            .ca
            .sign_serving(&key, names, OffsetDateTime::now_utc())?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(svid::server_config(
            self.ca.roots(),
            self.trust_domain().clone(),
            ClientAuth::Optional,
            vec![issued.der],
            key_der,
        )?)
    }
}

fn check_ttl(svid_ttl: Duration) -> Result<(), IdentityError> {
    if (MIN_SVID_TTL..=MAX_SVID_TTL).contains(&svid_ttl) {
        Ok(())
    } else {
        Err(IdentityError::SvidTtl(svid_ttl))
    }
}

/// `AgentKey` deserializes without validation; a name reaching a file path or a certificate must
/// be a DNS label, never `..` or `a/b`.
fn revalidated(agent: &AgentKey) -> Result<AgentKey, SpiffeError> {
    AgentKey::new(&agent.namespace, &agent.name)
}
