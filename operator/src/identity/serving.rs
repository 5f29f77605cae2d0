//! Serving certificates for the control plane's in-cluster endpoints (the admission webhook),
//! handed out as key material so the caller can rotate them behind a certificate resolver.

use rcgen::KeyPair;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;

use super::{CaError, Identity, IdentityError};

/// A serving certificate and its key, fresh from the CA.
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
}
