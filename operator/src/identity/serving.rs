//! Certificates for the control plane's own ends of TLS, handed out as key material so the
//! caller can rotate them: serving certificates for its in-cluster endpoints (the admission
//! webhook), and SVIDs for its own clients (the operator reading the budget service).

use rcgen::KeyPair;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use ringfence_crds::{AgentKey, SpiffeId};

use super::{CaError, Identity, IdentityError, revalidated};

/// A certificate (serving certificate or SVID) and its key, fresh from the CA.
pub struct ServingCert {
    /// The leaf, then the CA certificate (clients that pin the CA still get the full path).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Identity {
    /// Signs a serving certificate for `names` (DNS names or IPs) over a key made here and
    /// returned in memory only. Unlike [`Identity::server_tls_config`] it asks nothing of
    /// clients: the Kubernetes API server calls webhooks without a client certificate.
    pub fn issue_serving(&self, names: &[String]) -> Result<ServingCert, IdentityError> {
        if names.is_empty() {
            return Err(IdentityError::NoServingNames);
        }
        let now = OffsetDateTime::now_utc();
        let key = KeyPair::generate().map_err(CaError::from)?;
        let issued = self.ca.sign_serving(&key, names, now)?;
        let ca_der = ringfence_crds::svid::certs_from_pem(self.ca.cert_pem())?;
        let mut chain = vec![issued.der];
        chain.extend(ca_der);
        Ok(ServingCert {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: now,
            not_after: issued.not_after,
        })
    }

    /// Signs an SVID for `agent` over a key made here and returned in memory only: the control
    /// plane's own client identity (no CSR, no proof: the CA trusts itself). Valid for the
    /// identity's SVID lifetime; sign a new one to renew.
    pub fn mint_svid(&self, agent: &AgentKey) -> Result<ServingCert, IdentityError> {
        let agent = revalidated(agent)?;
        let id = SpiffeId::new(self.trust_domain().clone(), agent);
        let now = OffsetDateTime::now_utc();
        let key = KeyPair::generate().map_err(CaError::from)?;
        let issued = self.ca.sign_svid(&key, &id, self.svid_ttl, now)?;
        let ca_der = ringfence_crds::svid::certs_from_pem(self.ca.cert_pem())?;
        let mut chain = vec![issued.der];
        chain.extend(ca_der);
        Ok(ServingCert {
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: now,
            not_after: issued.not_after,
        })
    }
}
