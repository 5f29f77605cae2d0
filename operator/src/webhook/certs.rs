//! The webhook's serving certificate: issued by the trust domain's CA, published through a
//! `watch`, and picked per handshake by a rustls certificate resolver, so renewal needs no
//! restart and no connection is dropped.

use std::sync::Arc;
use std::time::Duration;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::identity::{Identity, IdentityError};

/// After a failed renewal, try again this soon (the current certificate is still valid).
const RETRY: Duration = Duration::from_secs(60);

/// Why the serving certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot issue the webhook's serving certificate: {0}")]
    Issue(#[from] IdentityError),
    #[error("the CA issued a serving certificate rustls cannot use: {0}")]
    Key(#[source] rustls::Error),
    #[error("cannot build the webhook's TLS configuration: {0}")]
    Config(#[source] rustls::Error),
}

/// One issued certificate and when to replace it.
pub struct Issued {
    pub key: Arc<CertifiedKey>,
    /// Two thirds into its lifetime, as SVIDs are renewed at half-life: early enough that a
    /// control plane down for days still renews in time.
    pub renew_at: OffsetDateTime,
}

/// Issues a serving certificate for `names` from `identity`'s CA.
pub fn issue(identity: &Identity, names: &[String]) -> Result<Issued, CertError> {
    let cert = identity.issue_serving(names)?;
    let provider = ringfence_crds::svid::crypto_provider();
    let key = CertifiedKey::from_der(cert.chain, cert.key, &provider).map_err(CertError::Key)?;
    let lifetime = cert.not_after - cert.not_before;
    Ok(Issued {
        key: Arc::new(key),
        renew_at: cert.not_before + lifetime * 2 / 3,
    })
}

/// Hands every handshake the newest published certificate.
#[derive(Debug)]
struct Resolver(watch::Receiver<Arc<CertifiedKey>>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.borrow().clone())
    }
}

/// A TLS 1.2/1.3 server configuration (the API server speaks either) without client
/// authentication, serving whatever `certs` holds at each handshake.
pub fn server_config(
    certs: watch::Receiver<Arc<CertifiedKey>>,
) -> Result<rustls::ServerConfig, CertError> {
    let mut config =
        rustls::ServerConfig::builder_with_provider(ringfence_crds::svid::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(CertError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(certs)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Renews the certificate in `certs` before it expires, until `shutdown`.
pub async fn renew(
    identity: Arc<Identity>,
    names: Vec<String>,
    mut renew_at: OffsetDateTime,
    certs: watch::Sender<Arc<CertifiedKey>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let wait = (renew_at - OffsetDateTime::now_utc())
            .try_into()
            .unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match issue(&identity, &names) {
            Ok(next) => {
                renew_at = next.renew_at;
                certs.send_replace(next.key);
                tracing::info!(renew_at = %renew_at, "renewed the webhook's serving certificate");
            }
            Err(e) => {
                tracing::warn!(error = %e, "renewing the webhook's serving certificate failed; retrying in a minute");
                renew_at = OffsetDateTime::now_utc() + RETRY;
            }
        }
    }
}
