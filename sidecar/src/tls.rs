//! TLS between sidecars: the inbound listener's server config and one client config per peer
//! agent, built from the current SVID and trust bundle.
//!
//! Certificates are not baked into the configs: the [`CredentialResolver`] hands rustls the
//! latest SVID at every handshake, so rotation needs no rebuild and never touches live
//! connections. Configs are rebuilt only when the trust bundle changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use ringfence_crds::SpiffeId;
use ringfence_crds::svid::{self, ClientAuth, SpiffeClientVerifier, SpiffeServerVerifier};
use rustls::client::Resumption;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::sync::watch;

use crate::identity::{CredentialResolver, Credentials};

/// ALPN of a sidecar's calls to a peer: HTTP/1.1, or HTTP/2 for what overflows its
/// HTTP/1.1 connections (see [`crate::forward::Mesh`]). The inbound listener accepts both.
pub const ALPN: &[u8] = b"http/1.1";
pub const ALPN_H2: &[u8] = b"h2";

/// Why a TLS config cannot be built.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MeshTlsError {
    #[error("no SVID yet: the sidecar has not obtained its certificate from the control plane")]
    NoSvid,
    #[error("the trust bundle from the control plane is unusable: {0}")]
    TrustBundle(String),
    #[error("cannot build a TLS configuration: {0}")]
    Config(String),
}

struct Cache {
    bundle: Vec<CertificateDer<'static>>,
    server: Arc<ServerConfig>,
    clients: HashMap<(SpiffeId, bool), Arc<ClientConfig>>,
}

/// Builds and caches the sidecar's TLS configs.
pub struct MeshTls {
    credentials: watch::Receiver<Option<Arc<Credentials>>>,
    resolver: Arc<CredentialResolver>,
    cache: Mutex<Option<Cache>>,
}

impl MeshTls {
    pub fn new(credentials: watch::Receiver<Option<Arc<Credentials>>>) -> Self {
        Self {
            resolver: Arc::new(CredentialResolver::new(credentials.clone())),
            credentials,
            cache: Mutex::new(None),
        }
    }

    /// The inbound listener's config: mTLS required, any agent of our trust domain.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, MeshTlsError> {
        self.with_cache(|c| Ok(c.server.clone()))
    }

    /// A client config that accepts only `peer` as the server and asks for HTTP/1.1 (`h2`
    /// false) or HTTP/2.
    pub fn client_config(
        &self,
        peer: &SpiffeId,
        h2: bool,
    ) -> Result<Arc<ClientConfig>, MeshTlsError> {
        self.with_cache(|c| {
            let key = (peer.clone(), h2);
            if let Some(cfg) = c.clients.get(&key) {
                return Ok(cfg.clone());
            }
            let roots = roots(&c.bundle)?;
            let mut cfg = ClientConfig::builder_with_provider(svid::crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| MeshTlsError::Config(e.to_string()))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
                    roots,
                    peer.clone(),
                )))
                .with_client_cert_resolver(self.resolver.clone());
            // HTTP/1.1 first; `h2` too, which a sidecar of an earlier release (HTTP/2 only)
            // picks: the pool then speaks HTTP/2 on that connection.
            cfg.alpn_protocols = if h2 {
                vec![ALPN_H2.to_vec()]
            } else {
                vec![ALPN.to_vec(), ALPN_H2.to_vec()]
            };
            // A resumed session keeps the identity of the handshake it resumes, which may be
            // an SVID that has since rotated; full handshakes are rare on pooled connections.
            cfg.resumption = Resumption::disabled();
            let cfg = Arc::new(cfg);
            // Bounded by twice the agents in the bundle; cleared with the trust bundle.
            c.clients.insert(key, cfg.clone());
            Ok(cfg)
        })
    }

    fn with_cache<T>(
        &self,
        f: impl FnOnce(&mut Cache) -> Result<T, MeshTlsError>,
    ) -> Result<T, MeshTlsError> {
        let creds = self
            .credentials
            .borrow()
            .clone()
            .ok_or(MeshTlsError::NoSvid)?;
        let mut guard = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let stale = guard
            .as_ref()
            .is_none_or(|c| c.bundle != creds.trust_bundle);
        if stale {
            *guard = Some(self.build(&creds)?);
        }
        match guard.as_mut() {
            Some(c) => f(c),
            None => Err(MeshTlsError::NoSvid),
        }
    }

    fn build(&self, creds: &Credentials) -> Result<Cache, MeshTlsError> {
        let roots = roots(&creds.trust_bundle)?;
        let verifier = SpiffeClientVerifier::new(
            roots,
            creds.spiffe_id.trust_domain().clone(),
            ClientAuth::Required,
        )
        .map_err(|e| MeshTlsError::TrustBundle(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(svid::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| MeshTlsError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(self.resolver.clone());
        server.alpn_protocols = vec![ALPN.to_vec(), ALPN_H2.to_vec()];
        Ok(Cache {
            bundle: creds.trust_bundle.clone(),
            server: Arc::new(server),
            clients: HashMap::new(),
        })
    }
}

fn roots(bundle: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, MeshTlsError> {
    let mut store = RootCertStore::empty();
    for cert in bundle {
        store
            .add(cert.clone())
            .map_err(|e| MeshTlsError::TrustBundle(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(MeshTlsError::TrustBundle("it holds no certificate".into()));
    }
    Ok(Arc::new(store))
}
