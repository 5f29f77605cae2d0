//! Certificates for calling sidecars directly: a real SVID from the control plane, and the
//! kinds a sidecar must refuse (another trust domain, self-signed, expired).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use ringfence_crds::api::{CsrRequest, CsrResponse};
use ringfence_crds::svid::{self, SpiffeServerVerifier};
use ringfence_crds::{AgentKey, TrustDomain};
use tokio::net::TcpStream;

use crate::mesh::{Mesh, Reply};

/// A client certificate chain and key, PEM.
#[derive(Debug, Clone)]
pub struct Creds {
    pub label: &'static str,
    pub chain: String,
    pub key: String,
}

fn agent_uri(td: &str, agent: &str) -> SanType {
    SanType::URI(
        format!("spiffe://{td}/ns/default/agent/{agent}")
            .try_into()
            .unwrap(),
    )
}

fn leaf_params(td: &str, agent: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![agent_uri(td, agent)];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p
}

/// A real SVID for `agent`, obtained from the mesh's control plane with its bootstrap token.
pub async fn tls_creds_for(mesh: &Mesh, agent: &str) -> Creds {
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let token = std::fs::read_to_string(
        mesh.state_dir()
            .join(format!("tokens/default/{agent}.token")),
    )
    .unwrap();
    let body = serde_json::to_vec(&CsrRequest {
        agent: AgentKey::new("default", agent).unwrap(),
        csr,
    })
    .unwrap();
    let roots = svid::trust_bundle_roots(&mesh.ca_pem()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(svid::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(mesh.plane).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/v1/identity/csr")
        .header("host", "localhost")
        .header("authorization", format!("Bearer {}", token.trim()))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let issued: CsrResponse = serde_json::from_slice(&bytes).unwrap();
    Creds {
        label: "a real SVID",
        chain: issued.certificate_chain,
        key: key.serialize_pem(),
    }
}

/// An SVID for `agent` from a CA of another trust domain.
pub fn foreign_trust_domain_creds(agent: &str) -> Creds {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "other");
    ca.subject_alt_names = vec![SanType::URI("spiffe://other.example".try_into().unwrap())];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = leaf_params("other.example", agent)
        .signed_by(&key, &issuer)
        .unwrap();
    Creds {
        label: "another trust domain's SVID",
        chain: leaf.pem(),
        key: key.serialize_pem(),
    }
}

/// A self-signed certificate naming `agent` of our trust domain.
pub fn self_signed_creds(agent: &str) -> Creds {
    let key = KeyPair::generate().unwrap();
    let cert = leaf_params("cluster.local", agent)
        .self_signed(&key)
        .unwrap();
    Creds {
        label: "a self-signed certificate",
        chain: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// An SVID for `agent` signed by the mesh's own CA, expired an hour ago.
pub fn expired_creds(mesh: &Mesh, agent: &str) -> Creds {
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(mesh.state_dir().join("ca/key.pem")).unwrap())
            .unwrap();
    let issuer = Issuer::from_ca_cert_pem(&mesh.ca_pem(), ca_key).unwrap();
    let mut p = leaf_params("cluster.local", agent);
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - Duration::from_secs(7200);
    p.not_after = now - Duration::from_secs(3600);
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    Creds {
        label: "an expired SVID",
        chain: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// How a caller speaks to a sidecar's inbound listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// HTTP/1.1 (ALPN `http/1.1`), as sidecars call each other.
    Http1,
    /// HTTP/2 (ALPN `h2`), as sidecars of earlier releases did.
    Http2,
}

/// POSTs to a sidecar's inbound listener over mTLS (HTTP/1.1) with `creds`, as another sidecar
/// would. `Err` when the TLS handshake or the connection fails.
pub async fn mtls_post(
    addr: SocketAddr,
    ca_pem: &str,
    creds: &Creds,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<Reply> {
    mtls_post_over(Wire::Http1, addr, ca_pem, creds, path, headers, body).await
}

/// [`mtls_post`] over the given protocol.
pub async fn mtls_post_over(
    wire: Wire,
    addr: SocketAddr,
    ca_pem: &str,
    creds: &Creds,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<Reply> {
    let roots = svid::trust_bundle_roots(ca_pem)?;
    let mut config = rustls::ClientConfig::builder_with_provider(svid::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::any_agent_in(
            roots,
            TrustDomain::default(),
        )))
        .with_client_auth_cert(
            svid::certs_from_pem(&creds.chain)?,
            svid::key_from_pem(&creds.key)?,
        )?;
    config.alpn_protocols = vec![match wire {
        Wire::Http1 => b"http/1.1".to_vec(),
        Wire::Http2 => b"h2".to_vec(),
    }];
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::try_from("sidecar.ringfence")?,
            tcp,
        )
        .await?;
    let negotiated = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    let mut b = Request::post(format!("https://sidecar.ringfence{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::from(body.to_owned())))?;
    let sent = match wire {
        Wire::Http1 => {
            anyhow::ensure!(
                negotiated.as_deref() == Some(b"http/1.1"),
                "ALPN negotiated {negotiated:?}"
            );
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            let mut req = req;
            *req.uri_mut() = path.parse()?;
            req.headers_mut()
                .insert("host", "sidecar.ringfence".parse()?);
            tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await??
        }
        Wire::Http2 => {
            anyhow::ensure!(
                negotiated.as_deref() == Some(b"h2"),
                "ALPN negotiated {negotiated:?}"
            );
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await?;
            tokio::spawn(conn);
            tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await??
        }
    };
    let status = sent.status();
    let headers = sent.headers().clone();
    let bytes = sent.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

/// A hop-form context for a run whose path is `path` (root first), as a caller's sidecar sends.
pub fn hop_context(path: &[&str]) -> String {
    let mut ctx = ringfence_sidecar::context::RunContext::start(path[0], "", None, None).unwrap();
    for name in &path[1..] {
        ctx = ctx.enter(name).unwrap();
    }
    ctx.hop().encode().unwrap()
}
