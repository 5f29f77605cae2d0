//! Test fixtures: a trust-domain CA that signs CSRs the way the control plane does.
//!
//! Compiled for this crate's tests and for integration tests (feature `testing`); never in the
//! shipped binary.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use ringfence_crds::agent::Trust;
use ringfence_crds::api::{CsrRequest, CsrResponse};
use ringfence_crds::bundle::{AgentEntry, BundleContent, Limits, PolicyEntry, PolicySlice};
use ringfence_crds::spiffe::{AgentKey, SpiffeId, TrustDomain};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA for one trust domain.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    cert: CertificateDer<'static>,
    pem: String,
    pub trust_domain: String,
}

impl TestCa {
    pub fn new(trust_domain: &str) -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{trust_domain} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("CA certificate");
        Self {
            pem: cert.pem(),
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
            trust_domain: trust_domain.to_owned(),
        }
    }

    /// The CA certificate in PEM (what `--ca-file` holds).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    pub fn der(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// Signs a sidecar's CSR as an X.509-SVID valid from `now` for `ttl`.
    pub fn sign(
        &self,
        request: &CsrRequest,
        now: SystemTime,
        ttl: Duration,
    ) -> Result<CsrResponse, rcgen::Error> {
        let mut csr = CertificateSigningRequestParams::from_pem(&request.csr)?;
        let spiffe_id = format!(
            "spiffe://{}/ns/{}/agent/{}",
            self.trust_domain, request.agent.namespace, request.agent.name
        );
        let not_after = now + ttl;
        csr.params.subject_alt_names = vec![SanType::URI(spiffe_id.clone().try_into()?)];
        csr.params.not_before = (now - Duration::from_secs(60)).into();
        csr.params.not_after = not_after.into();
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = csr.signed_by(&self.issuer)?;
        Ok(CsrResponse {
            spiffe_id,
            certificate_chain: cert.pem(),
            trust_bundle: self.pem.clone(),
            not_after: not_after
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        })
    }

    /// A server certificate for `ip`, as the control plane's HTTPS listener would have.
    pub fn server_cert(
        &self,
        ip: IpAddr,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(vec![ip.to_string()]).expect("server params");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("server certificate");
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (vec![cert.der().clone()], key)
    }

    /// A TLS acceptor for a fake control-plane server on 127.0.0.1: this CA's server
    /// certificate, and client certificates from this CA verified when presented (a CSR comes
    /// without one).
    pub fn loopback_acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der().clone()).expect("CA certificate");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .expect("client verifier");
        let (chain, key) = self.server_cert(IpAddr::from([127, 0, 0, 1]));
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("server config");
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
    }
}

/// The Cedar schema the policy compiler emits.
pub const SCHEMA: &str = r#"
entity Agent = { namespace: String, team: String, environment: String, trust: String };
entity Tool = { server: String, name: String, untrusted: Bool, sensitivity: String };
entity Model = { provider: String, name: String };
entity User;
type Call = { run: String, depth: Long, path: Set<Agent>, revisits: Long, tainted: Bool, taint: Set<String>, user: String };
action invoke appliesTo { principal: Agent, resource: Agent, context: Call };
action call_tool appliesTo { principal: Agent, resource: Tool, context: Call };
action call_model appliesTo { principal: Agent, resource: Model, context: Call };
action start_run appliesTo { principal: Agent, resource: Agent, context: Call };
"#;

/// The article's system as one agent's bundle content: orchestrator, research, writer and
/// critic in `namespace`, with `policies` as `(rule, cedar)` pairs.
pub fn bundle_content(agent: &AgentKey, policies: &[(&str, &str)]) -> BundleContent {
    let td = TrustDomain::default();
    let entry = |name: &str| AgentEntry {
        name: name.to_owned(),
        namespace: agent.namespace.clone(),
        spiffe_id: SpiffeId::new(
            td.clone(),
            AgentKey {
                namespace: agent.namespace.clone(),
                name: name.to_owned(),
            },
        ),
        team: Some("content".to_owned()),
        environment: Some("prod".to_owned()),
        trust: Trust::Trusted,
        may_start_runs: name == "orchestrator",
        inbound: None,
        app: None,
        fallback: None,
    };
    let names = ["orchestrator", "research", "writer", "critic"];
    let entities: Vec<serde_json::Value> = names
        .iter()
        .map(|n| {
            serde_json::json!({
                "uid": { "type": "Agent", "id": n },
                "attrs": { "namespace": agent.namespace, "team": "content", "environment": "prod", "trust": "Trusted" },
                "parents": []
            })
        })
        .collect();
    BundleContent {
        trust_domain: td.to_string(),
        agent: entry(&agent.name),
        peers: names
            .iter()
            .filter(|n| **n != agent.name)
            .map(|n| entry(n))
            .collect(),
        tool_servers: Vec::new(),
        tools: Vec::new(),
        model_providers: Vec::new(),
        policy: PolicySlice {
            schema: SCHEMA.to_owned(),
            policies: policies
                .iter()
                .enumerate()
                .map(|(i, (rule, text))| PolicyEntry {
                    id: format!("policy{i}"),
                    rule: (*rule).to_owned(),
                    text: (*text).to_owned(),
                })
                .collect(),
            entities: serde_json::Value::Array(entities),
        },
        limits: Limits::default(),
    }
}
