//! X.509-SVIDs on the wire: the SPIFFE ID a certificate carries, and rustls verifiers that make
//! every mTLS handshake in the mesh check it.
//!
//! rustls (through webpki) checks a certificate's chain, validity, key usage and DNS name. An
//! agent's identity lives in the leaf's URI SAN, which rustls never looks at. So each verifier
//! here lets webpki check the chain against the trust bundle first, then requires the leaf's one
//! URI SAN to be the agent expected:
//!
//! - [`SpiffeServerVerifier`] — a sidecar dialling another sidecar: the peer must be exactly the
//!   agent it meant to reach. The TLS server name is ignored; the SPIFFE ID is the name.
//! - [`SpiffeClientVerifier`] — a listener: the peer must be an agent of this trust domain.
//!   Client certificates are either required (sidecar inbound) or optional (the control plane's
//!   CSR endpoint, where a sidecar without an SVID yet proves itself another way).
//!
//! After the handshake, [`peer_spiffe_id`] reads who the peer is. That is the only place a callee
//! takes its caller's identity from — never a header.
//!
//! Sidecar-to-sidecar configurations speak TLS 1.3 only, with the `ring` provider.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use x509_parser::extensions::GeneralName;

use crate::spiffe::{SpiffeError, SpiffeId, TrustDomain};

/// Why a certificate is not an acceptable SVID, or why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SvidError {
    #[error(
        "the certificate is not valid X.509 DER ({0}); check that the PEM holds a CERTIFICATE block issued by the Ringfence CA"
    )]
    BadCertificate(String),
    #[error(
        "an X.509-SVID carries exactly one URI SAN, this certificate carries {0}; it was not issued to an agent by a Ringfence CA"
    )]
    UriSanCount(usize),
    #[error("the certificate's URI SAN {uri:?} is not an agent identity: {source}")]
    NotAnAgent {
        uri: String,
        #[source]
        source: SpiffeError,
    },
    #[error(
        "the peer is {presented}, but this connection is meant for {expected}: check that the address dialled belongs to that agent"
    )]
    UnexpectedPeer {
        // Boxed: two identities inline would make every Result in this module large.
        expected: Box<SpiffeId>,
        presented: Box<SpiffeId>,
    },
    #[error(
        "the peer {presented} belongs to another trust domain than {expected}: it is from another mesh, or the trust domain was renamed without reissuing its SVID"
    )]
    ForeignTrustDomain {
        expected: TrustDomain,
        presented: SpiffeId,
    },
    #[error("the {what} PEM is unreadable ({detail}); check that the file holds PEM blocks")]
    Pem { what: &'static str, detail: String },
    #[error("the {0} PEM holds no usable block; check that the right file was given")]
    EmptyPem(&'static str),
    #[error(
        "the trust bundle is unusable ({0}); fetch it again from the control plane (CsrResponse.trustBundle)"
    )]
    TrustBundle(String),
    #[error(
        "cannot build the TLS configuration ({0}); check that the private key belongs to the certificate"
    )]
    Config(#[source] rustls::Error),
}

/// The agent identity in an X.509-SVID: its only URI SAN, parsed strictly.
///
/// Other SAN types (DNS names, IPs) are tolerated, as the SPIFFE X.509-SVID spec allows; Ringfence
/// issues none to agents. This reads the certificate only — it proves nothing until a verifier
/// has checked the chain.
pub fn spiffe_id_of(cert_der: &[u8]) -> Result<SpiffeId, SvidError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(cert_der)
        .map_err(|e| SvidError::BadCertificate(e.to_string()))?;
    if !rest.is_empty() {
        return Err(SvidError::BadCertificate(format!(
            "{} bytes after the certificate",
            rest.len()
        )));
    }
    // Errors on a duplicated SAN extension, which would make "the" URI SAN ambiguous.
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::BadCertificate(e.to_string()))?;
    let uris: Vec<&str> = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(*uri),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => SpiffeId::parse(uri).map_err(|source| SvidError::NotAnAgent {
            uri: (*uri).to_owned(),
            source,
        }),
        other => Err(SvidError::UriSanCount(other.len())),
    }
}

/// The identity of the peer of a finished handshake, when it presented an agent SVID.
///
/// Works on a `ServerConnection` or `ClientConnection` (both dereference to [`CommonState`]).
/// The certificate was checked by the connection's verifier; with [`SpiffeClientVerifier`] or
/// [`SpiffeServerVerifier`] that includes the identity itself.
pub fn peer_spiffe_id(conn: &CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    spiffe_id_of(leaf).ok()
}

/// The `ring` provider every Ringfence TLS configuration uses (one TLS stack, never aws-lc).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses a PEM chain (leaf first) into DER certificates; at least one is required.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, SvidError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SvidError::Pem {
            what: "certificate",
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(SvidError::EmptyPem("certificate"));
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#8, SEC1 or PKCS#1) of a PEM file.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, SvidError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => SvidError::EmptyPem("private key"),
        e => SvidError::Pem {
            what: "private key",
            detail: e.to_string(),
        },
    })
}

/// The trust bundle (the trust domain's CA certificates, PEM) as rustls roots.
pub fn trust_bundle_roots(pem: &str) -> Result<Arc<RootCertStore>, SvidError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(pem).map_err(|e| SvidError::TrustBundle(e.to_string()))? {
        roots
            .add(cert)
            .map_err(|e| SvidError::TrustBundle(e.to_string()))?;
    }
    Ok(Arc::new(roots))
}

/// A client configuration for one sidecar-to-sidecar connection target: presents this agent's
/// SVID and accepts only `peer` as the server.
pub fn client_config(
    roots: Arc<RootCertStore>,
    peer: SpiffeId,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ClientConfig, SvidError> {
    let verifier = SpiffeServerVerifier::new(roots, peer);
    ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(SvidError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .map_err(SvidError::Config)
}

/// A server configuration presenting `chain`, accepting clients with [`SpiffeClientVerifier`].
pub fn server_config(
    roots: Arc<RootCertStore>,
    trust_domain: TrustDomain,
    auth: ClientAuth,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<ServerConfig, SvidError> {
    let verifier = SpiffeClientVerifier::new(roots, trust_domain, auth)?;
    ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(SvidError::Config)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)
        .map_err(SvidError::Config)
}

/// Which peers a verifier accepts, once the chain is good.
#[derive(Debug, Clone)]
enum Expected {
    Agent(SpiffeId),
    AnyAgentIn(TrustDomain),
}

impl Expected {
    fn check(&self, cert_der: &[u8]) -> Result<(), SvidError> {
        let presented = spiffe_id_of(cert_der)?;
        match self {
            Expected::Agent(expected) if *expected == presented => Ok(()),
            Expected::Agent(expected) => Err(SvidError::UnexpectedPeer {
                expected: Box::new(expected.clone()),
                presented: Box::new(presented),
            }),
            Expected::AnyAgentIn(td) if presented.trust_domain() == td => Ok(()),
            Expected::AnyAgentIn(td) => Err(SvidError::ForeignTrustDomain {
                expected: td.clone(),
                presented,
            }),
        }
    }
}

/// rustls reports verifier errors as `CertificateError`s; `Other` carries ours to the log line.
fn refusal(err: SvidError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refusal(err)))))
}

/// rustls prints an `Other` certificate error with `{:?}`; this makes that print our message
/// rather than the variant's name.
struct Refusal(SvidError);

impl std::fmt::Debug for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // Display already is the inner message; skip a level so error chains don't repeat it.
        std::error::Error::source(&self.0)
    }
}

/// Verifies the server of a sidecar-to-sidecar connection: chain and validity against the trust
/// bundle (webpki), then the leaf's SPIFFE ID. The TLS server name plays no part.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Expected,
    algorithms: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    /// Accepts only the agent `peer`.
    pub fn new(roots: Arc<RootCertStore>, peer: SpiffeId) -> Self {
        Self::expecting(roots, Expected::Agent(peer))
    }

    /// Accepts any agent of `trust_domain`: for callers that authorize the peer after the
    /// handshake, with [`peer_spiffe_id`].
    pub fn any_agent_in(roots: Arc<RootCertStore>, trust_domain: TrustDomain) -> Self {
        Self::expecting(roots, Expected::AnyAgentIn(trust_domain))
    }

    fn expecting(roots: Arc<RootCertStore>, expected: Expected) -> Self {
        Self {
            roots,
            expected,
            algorithms: crypto_provider().signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        self.expected.check(end_entity).map_err(refusal)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Whether a listener requires a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Sidecar inbound listeners: no SVID, no connection.
    Required,
    /// The control plane: a sidecar asking for its first SVID has none yet. A certificate that
    /// is presented is still verified in full; the handler sees `None` from [`peer_spiffe_id`]
    /// and must demand another proof.
    Optional,
}

/// Verifies clients: chain, validity and clientAuth usage against the trust bundle (webpki), then
/// an agent SPIFFE ID in the trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    /// rustls' own webpki verifier does the chain; we add the identity on top.
    chain: Arc<dyn ClientCertVerifier>,
    expected: Expected,
}

impl SpiffeClientVerifier {
    pub fn new(
        roots: Arc<RootCertStore>,
        trust_domain: TrustDomain,
        auth: ClientAuth,
    ) -> Result<Self, SvidError> {
        let builder = WebPkiClientVerifier::builder_with_provider(roots, crypto_provider());
        let builder = match auth {
            ClientAuth::Required => builder,
            ClientAuth::Optional => builder.allow_unauthenticated(),
        };
        let chain = builder
            .build()
            .map_err(|e| SvidError::TrustBundle(e.to_string()))?;
        Ok(Self {
            chain,
            expected: Expected::AnyAgentIn(trust_domain),
        })
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.chain.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chain.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.chain
            .verify_client_cert(end_entity, intermediates, now)?;
        self.expected.check(end_entity).map_err(refusal)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType, date_time_ymd,
    };

    use super::*;

    /// A trust domain's CA for tests; certificates it signs are valid during 2030-01-01 only.
    struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    impl TestCa {
        fn new(name: &str) -> Self {
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            Self {
                issuer: Issuer::new(params, key),
                pem: cert.pem(),
            }
        }

        fn roots(&self) -> Arc<RootCertStore> {
            trust_bundle_roots(&self.pem).unwrap()
        }

        fn leaf(&self, uris: &[&str]) -> CertificateDer<'static> {
            let params = leaf_params(uris);
            let key = KeyPair::generate().unwrap();
            params.signed_by(&key, &self.issuer).unwrap().der().clone()
        }
    }

    fn leaf_params(uris: &[&str]) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.not_before = date_time_ymd(2030, 1, 1);
        params.not_after = date_time_ymd(2030, 1, 2);
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params
    }

    /// 2030-01-01 + `hours`.
    fn at(hours: i64) -> UnixTime {
        let midnight = 1_893_456_000; // 2030-01-01T00:00:00Z
        UnixTime::since_unix_epoch(Duration::from_secs((midnight + hours * 3600) as u64))
    }

    const RESEARCH: &str = "spiffe://cluster.local/ns/default/agent/research";
    const WRITER: &str = "spiffe://cluster.local/ns/default/agent/writer";

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn td() -> TrustDomain {
        TrustDomain::default()
    }

    fn server_check(
        v: &SpiffeServerVerifier,
        leaf: &CertificateDer<'_>,
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from("unrelated.example").unwrap();
        v.verify_server_cert(leaf, &[], &name, &[], now)
    }

    fn message(err: rustls::Error) -> String {
        match err {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(e))) => {
                e.to_string()
            }
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn an_svid_names_its_agent() {
        let ca = TestCa::new("ca");
        assert_eq!(spiffe_id_of(&ca.leaf(&[RESEARCH])).unwrap(), id(RESEARCH));
    }

    #[test]
    fn a_certificate_with_two_uri_sans_is_not_an_svid() {
        let ca = TestCa::new("ca");
        let err = spiffe_id_of(&ca.leaf(&[RESEARCH, WRITER])).unwrap_err();
        assert!(matches!(err, SvidError::UriSanCount(2)), "{err}");
    }

    #[test]
    fn a_certificate_without_a_uri_san_is_not_an_svid() {
        let ca = TestCa::new("ca");
        let err = spiffe_id_of(&ca.leaf(&[])).unwrap_err();
        assert!(matches!(err, SvidError::UriSanCount(0)), "{err}");
    }

    #[test]
    fn a_spiffe_id_that_is_not_an_agent_is_refused() {
        let ca = TestCa::new("ca");
        let leaf = ca.leaf(&["spiffe://cluster.local/ns/default/sa/research"]);
        let err = spiffe_id_of(&leaf).unwrap_err();
        assert!(matches!(err, SvidError::NotAnAgent { .. }), "{err}");
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert!(matches!(
            spiffe_id_of(b"not der").unwrap_err(),
            SvidError::BadCertificate(_)
        ));
    }

    #[test]
    fn a_sidecar_accepts_the_agent_it_dialled_whatever_the_tls_server_name() {
        let ca = TestCa::new("ca");
        let v = SpiffeServerVerifier::new(ca.roots(), id(WRITER));
        server_check(&v, &ca.leaf(&[WRITER]), at(12)).unwrap();
    }

    #[test]
    fn a_sidecar_refuses_a_server_that_is_another_agent() {
        let ca = TestCa::new("ca");
        let v = SpiffeServerVerifier::new(ca.roots(), id(WRITER));
        let err = server_check(&v, &ca.leaf(&[RESEARCH]), at(12)).unwrap_err();
        let msg = message(err);
        assert!(
            msg.contains("agent/research") && msg.contains("agent/writer"),
            "{msg}"
        );
    }

    #[test]
    fn expired_and_not_yet_valid_servers_are_refused() {
        let ca = TestCa::new("ca");
        let v = SpiffeServerVerifier::new(ca.roots(), id(WRITER));
        let leaf = ca.leaf(&[WRITER]);
        assert!(matches!(
            server_check(&v, &leaf, at(25)),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ExpiredContext { .. }
            ))
        ));
        assert!(matches!(
            server_check(&v, &leaf, at(-1)),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidYetContext { .. }
            ))
        ));
    }

    #[test]
    fn a_server_signed_by_another_ca_is_refused() {
        let ours = TestCa::new("ours");
        let theirs = TestCa::new("theirs");
        let v = SpiffeServerVerifier::new(ours.roots(), id(WRITER));
        assert!(matches!(
            server_check(&v, &theirs.leaf(&[WRITER]), at(12)),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ));
    }

    #[test]
    fn any_agent_of_the_trust_domain_means_only_that_trust_domain() {
        let ca = TestCa::new("ca");
        let v = SpiffeServerVerifier::any_agent_in(ca.roots(), td());
        server_check(&v, &ca.leaf(&[RESEARCH]), at(12)).unwrap();
        let foreign = ca.leaf(&["spiffe://example.org/ns/default/agent/research"]);
        let msg = message(server_check(&v, &foreign, at(12)).unwrap_err());
        assert!(msg.contains("another trust domain"), "{msg}");
    }

    #[test]
    fn a_listener_accepts_any_agent_of_its_trust_domain() {
        let ca = TestCa::new("ca");
        let v = SpiffeClientVerifier::new(ca.roots(), td(), ClientAuth::Required).unwrap();
        assert!(v.offer_client_auth() && v.client_auth_mandatory());
        v.verify_client_cert(&ca.leaf(&[RESEARCH]), &[], at(12))
            .unwrap();
    }

    #[test]
    fn a_listener_refuses_agents_of_another_trust_domain_even_from_its_own_ca() {
        let ca = TestCa::new("ca");
        let v = SpiffeClientVerifier::new(ca.roots(), td(), ClientAuth::Required).unwrap();
        let foreign = ca.leaf(&["spiffe://example.org/ns/default/agent/research"]);
        let err = v.verify_client_cert(&foreign, &[], at(12)).unwrap_err();
        assert!(message(err).contains("example.org"));
    }

    #[test]
    fn a_listener_refuses_a_self_signed_client() {
        let ca = TestCa::new("ca");
        let v = SpiffeClientVerifier::new(ca.roots(), td(), ClientAuth::Required).unwrap();
        let key = KeyPair::generate().unwrap();
        let own = leaf_params(&[RESEARCH]).self_signed(&key).unwrap();
        assert!(matches!(
            v.verify_client_cert(own.der(), &[], at(12)),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ));
    }

    #[test]
    fn a_listener_refuses_an_expired_client() {
        let ca = TestCa::new("ca");
        let v = SpiffeClientVerifier::new(ca.roots(), td(), ClientAuth::Optional).unwrap();
        assert!(v.offer_client_auth() && !v.client_auth_mandatory());
        assert!(matches!(
            v.verify_client_cert(&ca.leaf(&[RESEARCH]), &[], at(48)),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ExpiredContext { .. }
            ))
        ));
    }

    #[test]
    fn a_ca_certificate_is_not_accepted_as_an_agent() {
        let ca = TestCa::new("ca");
        let mut params = leaf_params(&[RESEARCH]);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().unwrap();
        let sub_ca = params.signed_by(&key, &ca.issuer).unwrap();
        let v = SpiffeClientVerifier::new(ca.roots(), td(), ClientAuth::Required).unwrap();
        assert!(v.verify_client_cert(sub_ca.der(), &[], at(12)).is_err());
    }

    #[test]
    fn pem_helpers_say_what_is_missing() {
        assert!(matches!(
            certs_from_pem("nothing here"),
            Err(SvidError::EmptyPem("certificate"))
        ));
        assert!(matches!(
            key_from_pem(""),
            Err(SvidError::EmptyPem("private key"))
        ));
        assert!(matches!(
            trust_bundle_roots(""),
            Err(SvidError::TrustBundle(_))
        ));
        let key = KeyPair::generate().unwrap();
        key_from_pem(&key.serialize_pem()).unwrap();
    }
}
