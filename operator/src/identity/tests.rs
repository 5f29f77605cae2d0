//! The identity service end to end: enrolment through [`Identity::issue`], and real TLS
//! handshakes on 127.0.0.1 with the certificates it issues.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, SanType};
use ringfence_crds::svid::{self, ClientAuth};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use x509_parser::extensions::GeneralName;

use super::*;

const DAY: Duration = Duration::from_secs(24 * 3600);

fn agent(name: &str) -> AgentKey {
    AgentKey::new("default", name).unwrap()
}

fn id_of(identity: &Identity, name: &str) -> SpiffeId {
    SpiffeId::new(identity.trust_domain().clone(), agent(name))
}

fn identity_in(dir: &Path, trust_domain: &str) -> Identity {
    let td = TrustDomain::new(trust_domain).unwrap();
    Identity::load_or_create(dir, td, DEFAULT_SVID_TTL).unwrap()
}

fn token_of(identity: &Identity, name: &str) -> String {
    identity.ensure_tokens(&[agent(name)]).unwrap();
    std::fs::read_to_string(identity.token_path(&agent(name)).unwrap()).unwrap()
}

fn csr(sans: Vec<SanType>) -> (KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans;
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

fn uri(id: &SpiffeId) -> SanType {
    SanType::URI(id.to_string().try_into().unwrap())
}

/// What a sidecar holds after enrolment.
struct Svid {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Svid {
    fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

/// Enrols `name` the way a local-mode sidecar does, as if the control plane's clock read `now`.
fn enrol_at(identity: &Identity, name: &str, now: OffsetDateTime) -> Svid {
    let token = token_of(identity, name);
    let (key, pem) = csr(vec![uri(&id_of(identity, name))]);
    let req = CsrRequest {
        agent: agent(name),
        csr: pem,
    };
    let resp = identity
        .issue_at(&req, Proof::BootstrapToken(&token), now)
        .unwrap();
    Svid {
        chain: svid::certs_from_pem(&resp.certificate_chain).unwrap(),
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    }
}

fn enrol(identity: &Identity, name: &str) -> Svid {
    enrol_at(identity, name, OffsetDateTime::now_utc())
}

fn roots(identity: &Identity) -> Arc<rustls::RootCertStore> {
    svid::trust_bundle_roots(identity.trust_bundle_pem()).unwrap()
}

/// A sidecar's inbound listener: presents its SVID, requires one from every caller.
fn inbound(identity: &Identity, own: &Svid) -> ServerConfig {
    svid::server_config(
        roots(identity),
        identity.trust_domain().clone(),
        ClientAuth::Required,
        own.chain.clone(),
        own.key(),
    )
    .unwrap()
}

/// A sidecar dialling `peer`, presenting `own`.
fn outbound(identity: &Identity, own: &Svid, peer: &str) -> ClientConfig {
    svid::client_config(
        roots(identity),
        id_of(identity, peer),
        own.chain.clone(),
        own.key(),
    )
    .unwrap()
}

/// What each end saw of one handshake.
struct Handshake {
    /// The caller's identity as the server read it, or why the server refused.
    server: Result<Option<SpiffeId>, String>,
    /// Whether the client got through (it reads a byte the server writes once it accepted).
    client: Result<(), String>,
}

async fn handshake(server: ServerConfig, client: ClientConfig, server_name: &str) -> Handshake {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = svid::peer_spiffe_id(tls.get_ref().1);
        tls.write_all(b"!").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok(peer)
    });
    let connector = TlsConnector::from(Arc::new(client));
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let client = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok(())
    };
    let limit = Duration::from_secs(10);
    let client = tokio::time::timeout(limit, client)
        .await
        .expect("client handshake hung");
    let server = tokio::time::timeout(limit, server)
        .await
        .expect("server handshake hung")
        .expect("server task panicked");
    Handshake { server, client }
}

fn csr_refusal(err: &IdentityError) -> Option<&CsrError> {
    match err {
        IdentityError::Csr { reason, .. } => Some(reason),
        _ => None,
    }
}

fn proof_refusal(err: &IdentityError) -> Option<&ProofError> {
    match err {
        IdentityError::Unproven { reason, .. } => Some(reason),
        _ => None,
    }
}

// ---- enrolment -------------------------------------------------------------------------------

#[test]
fn an_issued_svid_verifies_against_the_trust_bundle_and_carries_exactly_one_uri_san() {
    let state = tempfile::tempdir().unwrap();
    let identity = identity_in(state.path(), "cluster.local");
    let research = id_of(&identity, "research");
    let token = token_of(&identity, "research");
    // A CSR naming nothing gets the proven identity.
    let (_, pem) = csr(vec![]);
    let req = CsrRequest {
        agent: agent("research"),
        csr: pem,
    };
    let now = OffsetDateTime::now_utc();
    let resp = identity
        .issue_at(&req, Proof::BootstrapToken(&token), now)
        .unwrap();
    assert_eq!(resp.spiffe_id, research.to_string());
    assert_eq!(resp.trust_bundle, identity.trust_bundle_pem());

    let chain = svid::certs_from_pem(&resp.certificate_chain).unwrap();
    assert_eq!(chain.len(), 1);
    assert_eq!(svid::spiffe_id_of(&chain[0]).unwrap(), research);
    let server_view = svid::SpiffeServerVerifier::new(
        svid::trust_bundle_roots(&resp.trust_bundle).unwrap(),
        research.clone(),
    );
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        &server_view,
        &chain[0],
        &[],
        &ServerName::try_from("ignored").unwrap(),
        &[],
        rustls::pki_types::UnixTime::now(),
    )
    .unwrap();

    let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let names = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(matches!(names[0], GeneralName::URI(u) if u == research.to_string()));
    assert!(!cert.is_ca());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let not_before = cert.validity().not_before.timestamp();
    let not_after = cert.validity().not_after.timestamp();
    assert_eq!(not_after, resp.not_after);
    assert_eq!(not_after - now.unix_timestamp(), DAY.as_secs() as i64);
    assert!(
        not_before < now.unix_timestamp(),
        "backdated for clock skew"
    );
}

#[test]
fn a_csr_for_another_agents_identity_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let identity = identity_in(state.path(), "cluster.local");
    let token = token_of(&identity, "research");
    let (_, pem) = csr(vec![uri(&id_of(&identity, "writer"))]);
    let req = CsrRequest {
        agent: agent("research"),
        csr: pem,
    };
    let err = identity
        .issue(&req, Proof::BootstrapToken(&token))
        .unwrap_err();
    assert!(
        matches!(csr_refusal(&err), Some(CsrError::OtherIdentity { .. })),
        "{err}"
    );
    assert!(err.is_refusal());
    let msg = err.to_string();
    assert!(
        msg.contains("spiffe://cluster.local/ns/default/agent/writer")
            && msg.contains("spiffe://cluster.local/ns/default/agent/research"),
        "{msg}"
    );
}

#[test]
fn a_csr_with_extra_sans_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let identity = identity_in(state.path(), "cluster.local");
    let token = token_of(&identity, "research");
    let research = id_of(&identity, "research");
    let (_, pem) = csr(vec![
        uri(&research),
        SanType::DnsName("research.default.svc".try_into().unwrap()),
    ]);
    let req = CsrRequest {
        agent: agent("research"),
        csr: pem,
    };
    let err = identity
        .issue(&req, Proof::BootstrapToken(&token))
        .unwrap_err();
    assert!(
        matches!(csr_refusal(&err), Some(CsrError::ExtraNames { .. })),
        "{err}"
    );
}

#[test]
fn a_wrong_bootstrap_token_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let identity = identity_in(state.path(), "cluster.local");
    token_of(&identity, "research");
    let writers_token = token_of(&identity, "writer");
    let (_, pem) = csr(vec![]);
    let req = CsrRequest {
        agent: agent("research"),
        csr: pem,
    };
    for wrong in [writers_token.as_str(), "guess"] {
        let err = identity
            .issue(&req, Proof::BootstrapToken(wrong))
            .unwrap_err();
        assert!(
            matches!(
                proof_refusal(&err),
                Some(ProofError::Token(TokenError::Wrong { .. }))
            ),
            "{err}"
        );
        assert!(err.is_refusal());
    }
}

#[test]
fn a_sidecar_renews_only_its_own_identity() {
    let state = tempfile::tempdir().unwrap();
    let identity = identity_in(state.path(), "cluster.local");
    let (_, pem) = csr(vec![]);
    let req = CsrRequest {
        agent: agent("writer"),
        csr: pem,
    };
    let research = id_of(&identity, "research");
    let err = identity.issue(&req, Proof::Svid(&research)).unwrap_err();
    assert!(
        matches!(proof_refusal(&err), Some(ProofError::OtherSvid { .. })),
        "{err}"
    );
    let writer = id_of(&identity, "writer");
    identity.issue(&req, Proof::Svid(&writer)).unwrap();
}

#[test]
fn an_agent_name_that_is_a_path_is_refused_before_any_file_is_touched() {
    let state = tempfile::tempdir().unwrap();
    let identity = identity_in(state.path(), "cluster.local");
    let (_, pem) = csr(vec![]);
    let req = CsrRequest {
        agent: AgentKey {
            namespace: "..".to_owned(),
            name: "ca".to_owned(),
        },
        csr: pem,
    };
    let err = identity
        .issue(&req, Proof::BootstrapToken("x"))
        .unwrap_err();
    assert!(matches!(err, IdentityError::InvalidAgent(_)), "{err}");
    let bad = AgentKey {
        namespace: "default".to_owned(),
        name: "../../ca/key".to_owned(),
    };
    assert!(matches!(
        identity.ensure_tokens(&[bad]),
        Err(IdentityError::InvalidAgent(_))
    ));
}

#[test]
fn the_ca_persists_across_restarts_and_a_corrupt_key_is_named() {
    let state = tempfile::tempdir().unwrap();
    let first = identity_in(state.path(), "cluster.local");
    let second = identity_in(state.path(), "cluster.local");
    assert_eq!(first.trust_bundle_pem(), second.trust_bundle_pem());

    std::fs::write(state.path().join("ca/key.pem"), "not a key").unwrap();
    let err = Identity::load_or_create(state.path(), TrustDomain::default(), DEFAULT_SVID_TTL)
        .err()
        .unwrap();
    assert!(
        matches!(err, IdentityError::Ca(CaError::CorruptKey { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("ca/key.pem"), "{err}");
}

#[test]
fn an_svid_lifetime_out_of_range_is_refused() {
    let state = tempfile::tempdir().unwrap();
    for ttl in [Duration::ZERO, Duration::from_secs(59), 400 * DAY] {
        let err = Identity::load_or_create(state.path(), TrustDomain::default(), ttl)
            .err()
            .unwrap();
        assert!(matches!(err, IdentityError::SvidTtl(_)));
    }
}

#[test]
fn the_identity_service_can_be_shared_between_tasks() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<Identity>();
}

// ---- TLS between sidecars ----------------------------------------------------------------------

#[tokio::test]
async fn a_sidecar_with_a_valid_svid_is_accepted_and_the_server_reads_its_spiffe_id() {
    let state = tempfile::tempdir().unwrap();
    let identity = identity_in(state.path(), "cluster.local");
    let writer = enrol(&identity, "writer");
    let research = enrol(&identity, "research");
    let seen = handshake(
        inbound(&identity, &writer),
        outbound(&identity, &research, "writer"),
        "writer.default",
    )
    .await;
    seen.client.unwrap();
    assert_eq!(seen.server.unwrap(), Some(id_of(&identity, "research")));
}

#[tokio::test]
async fn a_client_with_an_expired_svid_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let identity = identity_in(state.path(), "cluster.local");
    let writer = enrol(&identity, "writer");
    let stale = enrol_at(&identity, "research", OffsetDateTime::now_utc() - 2 * DAY);
    let seen = handshake(
        inbound(&identity, &writer),
        outbound(&identity, &stale, "writer"),
        "writer.default",
    )
    .await;
    let err = seen.server.unwrap_err();
    assert!(err.to_lowercase().contains("expired"), "{err}");
    assert!(seen.client.is_err());
}

#[tokio::test]
async fn a_client_with_a_not_yet_valid_svid_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let identity = identity_in(state.path(), "cluster.local");
    let writer = enrol(&identity, "writer");
    let early = enrol_at(&identity, "research", OffsetDateTime::now_utc() + DAY);
    let seen = handshake(
        inbound(&identity, &writer),
        outbound(&identity, &early, "writer"),
        "writer.default",
    )
    .await;
    let err = seen.server.unwrap_err();
    assert!(err.to_lowercase().contains("not valid yet"), "{err}");
    assert!(seen.client.is_err());
}

#[tokio::test]
async fn a_client_whose_svid_comes_from_another_trust_domains_ca_is_refused() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let identity = identity_in(ours.path(), "cluster.local");
    let foreign_ca = identity_in(theirs.path(), "example.org");
    let writer = enrol(&identity, "writer");
    let stranger = enrol(&foreign_ca, "research");
    // The stranger trusts our CA, so only the server's check can stop it.
    let seen = handshake(
        inbound(&identity, &writer),
        outbound(&identity, &stranger, "writer"),
        "writer.default",
    )
    .await;
    let err = seen.server.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(seen.client.is_err());
}

#[tokio::test]
async fn a_client_whose_svid_comes_from_another_ca_of_the_same_name_is_refused() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let identity = identity_in(ours.path(), "cluster.local");
    let impostor_ca = identity_in(theirs.path(), "cluster.local");
    let writer = enrol(&identity, "writer");
    let impostor = enrol(&impostor_ca, "research");
    let seen = handshake(
        inbound(&identity, &writer),
        outbound(&identity, &impostor, "writer"),
        "writer.default",
    )
    .await;
    assert!(seen.server.is_err());
    assert!(seen.client.is_err());
}

#[tokio::test]
async fn a_client_with_a_self_signed_certificate_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let identity = identity_in(state.path(), "cluster.local");
    let writer = enrol(&identity, "writer");
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![uri(&id_of(&identity, "research"))];
    let own = params.self_signed(&key).unwrap();
    let forged = Svid {
        chain: vec![own.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    };
    let seen = handshake(
        inbound(&identity, &writer),
        outbound(&identity, &forged, "writer"),
        "writer.default",
    )
    .await;
    assert!(seen.server.is_err());
    assert!(seen.client.is_err());
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_by_a_sidecar() {
    let state = tempfile::tempdir().unwrap();
    let identity = identity_in(state.path(), "cluster.local");
    let writer = enrol(&identity, "writer");
    let anonymous = ClientConfig::builder_with_provider(svid::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(svid::SpiffeServerVerifier::new(
            roots(&identity),
            id_of(&identity, "writer"),
        )))
        .with_no_client_auth();
    let seen = handshake(inbound(&identity, &writer), anonymous, "writer.default").await;
    assert!(seen.server.is_err());
    assert!(seen.client.is_err());
}

#[tokio::test]
async fn a_sidecar_refuses_a_server_presenting_another_agents_svid() {
    let state = tempfile::tempdir().unwrap();
    let identity = identity_in(state.path(), "cluster.local");
    let planner = enrol(&identity, "planner");
    let research = enrol(&identity, "research");
    // research dials writer, but whoever answers holds planner's SVID.
    let seen = handshake(
        inbound(&identity, &planner),
        outbound(&identity, &research, "writer"),
        "writer.default",
    )
    .await;
    let err = seen.client.unwrap_err();
    assert!(
        err.contains("agent/planner") && err.contains("agent/writer"),
        "{err}"
    );
    assert!(seen.server.is_err());
}

// ---- TLS to the control plane ------------------------------------------------------------------

fn to_control_plane(identity: &Identity, own: Option<&Svid>) -> ClientConfig {
    let builder = ClientConfig::builder_with_provider(svid::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(identity));
    match own {
        Some(own) => builder
            .with_client_auth_cert(own.chain.clone(), own.key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    }
}

fn control_plane_names() -> Vec<String> {
    vec![
        "ringfence.ringfence-system.svc".to_owned(),
        "127.0.0.1".to_owned(),
    ]
}

#[tokio::test]
async fn the_control_plane_lets_a_sidecar_without_an_svid_ask_for_its_first_one() {
    let state = tempfile::tempdir().unwrap();
    let identity = identity_in(state.path(), "cluster.local");
    let server = identity.server_tls_config(&control_plane_names()).unwrap();
    let seen = handshake(server, to_control_plane(&identity, None), "127.0.0.1").await;
    seen.client.unwrap();
    assert_eq!(seen.server.unwrap(), None);
}

#[tokio::test]
async fn the_control_plane_reads_the_spiffe_id_of_a_renewing_sidecar() {
    let state = tempfile::tempdir().unwrap();
    let identity = identity_in(state.path(), "cluster.local");
    let research = enrol(&identity, "research");
    let server = identity.server_tls_config(&control_plane_names()).unwrap();
    let seen = handshake(
        server,
        to_control_plane(&identity, Some(&research)),
        "ringfence.ringfence-system.svc",
    )
    .await;
    seen.client.unwrap();
    assert_eq!(seen.server.unwrap(), Some(id_of(&identity, "research")));
}

#[tokio::test]
async fn the_control_plane_refuses_a_client_certificate_from_another_ca() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let identity = identity_in(ours.path(), "cluster.local");
    let stranger = enrol(&identity_in(theirs.path(), "example.org"), "research");
    let server = identity.server_tls_config(&control_plane_names()).unwrap();
    let seen = handshake(
        server,
        to_control_plane(&identity, Some(&stranger)),
        "127.0.0.1",
    )
    .await;
    assert!(seen.server.is_err());
}

#[tokio::test]
async fn the_control_planes_certificate_cannot_pass_for_an_agent() {
    let state = tempfile::tempdir().unwrap();
    let identity = identity_in(state.path(), "cluster.local");
    let research = enrol(&identity, "research");
    let server = identity.server_tls_config(&control_plane_names()).unwrap();
    let seen = handshake(
        server,
        outbound(&identity, &research, "writer"),
        "127.0.0.1",
    )
    .await;
    let err = seen.client.unwrap_err();
    assert!(err.contains("URI SAN"), "{err}");
}

#[test]
fn a_control_plane_certificate_needs_a_name() {
    let state = tempfile::tempdir().unwrap();
    let identity = identity_in(state.path(), "cluster.local");
    assert!(matches!(
        identity.server_tls_config(&[]),
        Err(IdentityError::NoServingNames)
    ));
}
