//! `ringfence local` in process, with real TLS on loopback: a client does what a sidecar does
//! (bootstrap CSR, mTLS bundle stream, acks) while the test edits the manifest folder.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use ringfence::cli::local::{Local, LocalOptions};
use ringfence_crds::api::{self, BundleAck, CsrRequest, CsrResponse};
use ringfence_crds::bundle::Bundle;
use ringfence_crds::svid;
use ringfence_crds::{AgentKey, TrustDomain};
use tokio::net::{TcpListener, TcpStream};

struct Plane {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    state: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Plane {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/incident");
        for e in std::fs::read_dir(src).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") {
                std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
            }
        }
        let opts = LocalOptions {
            dir: dir.path().to_owned(),
            state: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            trust_domain: TrustDomain::default(),
            svid_ttl: Duration::from_secs(3600),
            spawn_sidecars: false,
            sidecar_bin: None,
            database: None,
            sidecar_logs: None,
        };
        let local = Local::new(opts).unwrap();
        let state = local.state_dir().to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(local.serve(listener, async move {
            let _ = rx.await;
        }));
        Self {
            addr,
            dir,
            state,
            stop: Some(tx),
            task,
        }
    }

    fn edit(&self, file: &str, from: &str, to: &str) {
        let p = self.dir.path().join(file);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains(from), "{from:?} not in {file}");
        std::fs::write(p, text.replace(from, to)).unwrap();
    }

    fn token(&self, agent: &AgentKey) -> String {
        let p = self
            .state
            .join("tokens")
            .join(&agent.namespace)
            .join(format!("{}.token", agent.name));
        std::fs::read_to_string(p).unwrap().trim().to_owned()
    }

    fn roots(&self) -> Arc<rustls::RootCertStore> {
        let pem = std::fs::read_to_string(self.state.join("ca").join("cert.pem")).unwrap();
        svid::trust_bundle_roots(&pem).unwrap()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

/// What a sidecar holds: its key and SVID.
struct Creds {
    chain: String,
    key: String,
}

fn tls(roots: Arc<rustls::RootCertStore>, creds: Option<&Creds>) -> Arc<rustls::ClientConfig> {
    let b = rustls::ClientConfig::builder_with_provider(svid::crypto_provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match creds {
        Some(c) => b
            .with_client_auth_cert(
                svid::certs_from_pem(&c.chain).unwrap(),
                svid::key_from_pem(&c.key).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    })
}

async fn send(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    req: Request<Full<Bytes>>,
) -> hyper::Response<Incoming> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender.send_request(req).await.unwrap()
}

fn request(
    method: Method,
    path: &str,
    body: Vec<u8>,
    headers: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::from(body))).unwrap()
}

async fn body_text(resp: hyper::Response<Incoming>) -> String {
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

async fn csr(plane: &Plane, agent: &AgentKey, token: &str) -> (StatusCode, String, Creds) {
    let key = KeyPair::generate().unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let body = serde_json::to_vec(&CsrRequest {
        agent: agent.clone(),
        csr,
    })
    .unwrap();
    let auth = format!("Bearer {token}");
    let resp = send(
        plane.addr,
        tls(plane.roots(), None),
        request(
            Method::POST,
            api::CSR_PATH,
            body,
            &[("authorization", &auth)],
        ),
    )
    .await;
    let status = resp.status();
    let text = body_text(resp).await;
    let chain = serde_json::from_str::<CsrResponse>(&text)
        .map(|r| r.certificate_chain)
        .unwrap_or_default();
    (
        status,
        text,
        Creds {
            chain,
            key: key.serialize_pem(),
        },
    )
}

async fn svid_for(plane: &Plane, name: &str) -> Creds {
    let agent = AgentKey::new("default", name).unwrap();
    let (status, text, creds) = csr(plane, &agent, &plane.token(&agent)).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    creds
}

/// An open bundle stream, read line by line.
struct Stream {
    body: Incoming,
    buf: Vec<u8>,
}

impl Stream {
    async fn open(plane: &Plane, creds: &Creds) -> Self {
        let resp = send(
            plane.addr,
            tls(plane.roots(), Some(creds)),
            request(
                Method::GET,
                api::WATCH_PATH,
                vec![],
                &[(api::SIDECAR_HEADER, "test-1")],
            ),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        Self {
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }

    async fn next_bundle(&mut self, within: Duration) -> Option<Bundle> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                if line.len() > 1 {
                    return Some(serde_json::from_slice(&line).unwrap());
                }
                continue;
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.body.frame()).await {
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
                Ok(_) => panic!("bundle stream ended"),
                Err(_) => return None,
            }
        }
    }
}

#[tokio::test]
async fn a_sidecar_gets_its_svid_with_its_bootstrap_token_and_not_another_agents() {
    let plane = Plane::start().await;
    let research = AgentKey::new("default", "research").unwrap();
    let orchestrator = AgentKey::new("default", "orchestrator").unwrap();

    let creds = svid_for(&plane, "research").await;
    let leaf = svid::certs_from_pem(&creds.chain).unwrap();
    assert_eq!(
        svid::spiffe_id_of(&leaf[0]).unwrap().to_string(),
        "spiffe://cluster.local/ns/default/agent/research"
    );

    // research's token cannot buy orchestrator's identity.
    let (status, text, _) = csr(&plane, &orchestrator, &plane.token(&research)).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{text}");
    // An agent nobody defined gets no identity.
    let ghost = AgentKey::new("default", "ghost").unwrap();
    let (status, text, _) = csr(&plane, &ghost, "whatever").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
    assert!(text.contains("no Agent default/ghost"), "{text}");
    plane.stop().await;
}

#[tokio::test]
async fn the_bundle_stream_needs_an_svid() {
    let plane = Plane::start().await;
    let resp = send(
        plane.addr,
        tls(plane.roots(), None),
        request(Method::GET, api::WATCH_PATH, vec![], &[]),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(body_text(resp).await.contains("needs mTLS"));
    plane.stop().await;
}

#[tokio::test]
async fn editing_a_manifest_pushes_a_new_bundle_version_to_a_connected_sidecar_within_a_second() {
    let plane = Plane::start().await;
    let creds = svid_for(&plane, "writer").await;
    let mut stream = Stream::open(&plane, &creds).await;
    let first = stream
        .next_bundle(Duration::from_secs(5))
        .await
        .expect("the current bundle at once");
    assert_eq!(first.content.agent.name, "writer");
    assert_eq!(first.content.limits.max_delegation_depth, 5);
    first.verify().unwrap();

    let saved = Instant::now();
    plane.edit(
        "budget.yaml",
        "maxDelegationDepth: 5",
        "maxDelegationDepth: 3",
    );
    let second = stream
        .next_bundle(Duration::from_secs(5))
        .await
        .expect("a pushed bundle");
    let took = saved.elapsed();
    assert!(took < Duration::from_secs(1), "pushed after {took:?}");
    assert_eq!(second.version, first.version + 1);
    assert_eq!(second.content.limits.max_delegation_depth, 3);
    second.verify().unwrap();
    plane.stop().await;
}

#[tokio::test]
async fn malformed_yaml_is_reported_and_the_control_plane_keeps_serving() {
    let plane = Plane::start().await;
    let creds = svid_for(&plane, "critic").await;
    let mut stream = Stream::open(&plane, &creds).await;
    let first = stream.next_bundle(Duration::from_secs(5)).await.unwrap();

    // A broken file changes nothing that is enforced: its last good content stays.
    plane.edit(
        "budget.yaml",
        "maxDelegationDepth: 5",
        "maxDelegationDepth: [5",
    );
    assert!(
        stream
            .next_bundle(Duration::from_millis(800))
            .await
            .is_none(),
        "a broken file must not change bundles"
    );

    // Fixing it with a real change goes through.
    plane.edit(
        "budget.yaml",
        "maxDelegationDepth: [5",
        "maxDelegationDepth: 4",
    );
    let next = stream
        .next_bundle(Duration::from_secs(5))
        .await
        .expect("the fixed file is served");
    assert_eq!(next.version, first.version + 1);
    assert_eq!(next.content.limits.max_delegation_depth, 4);
    plane.stop().await;
}

#[tokio::test]
async fn an_invalid_policy_is_reported_with_its_location_and_the_last_good_bundle_stays() {
    let plane = Plane::start().await;
    let creds = svid_for(&plane, "research").await;
    let mut stream = Stream::open(&plane, &creds).await;
    let first = stream.next_bundle(Duration::from_secs(5)).await.unwrap();

    plane.edit(
        "policies.yaml",
        "resource.sensitivity == \"high\"",
        "resource.sensitivty == \"high\"",
    );
    assert!(
        stream
            .next_bundle(Duration::from_millis(800))
            .await
            .is_none(),
        "an invalid policy must not reach the sidecar"
    );

    let resp = send(
        plane.addr,
        tls(plane.roots(), None),
        request(Method::GET, api::STATUS_PATH, vec![], &[]),
    )
    .await;
    let status: serde_json::Value = serde_json::from_str(&body_text(resp).await).unwrap();
    let diags = status["diagnostics"].to_string();
    assert!(
        diags.contains("AgentPolicy default/web-search") && diags.contains("spec.cedar line 9"),
        "{diags}"
    );
    let research = status["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == "default/research")
        .unwrap();
    assert_eq!(research["version"], first.version);
    plane.stop().await;
}

#[tokio::test]
async fn the_control_plane_shows_which_version_each_sidecar_enforces() {
    let plane = Plane::start().await;
    let creds = svid_for(&plane, "orchestrator").await;
    let mut stream = Stream::open(&plane, &creds).await;
    let bundle = stream.next_bundle(Duration::from_secs(5)).await.unwrap();
    let ack = serde_json::to_vec(&BundleAck {
        version: bundle.version,
        hash: bundle.hash.clone(),
        rejected: None,
    })
    .unwrap();
    let resp = send(
        plane.addr,
        tls(plane.roots(), Some(&creds)),
        request(
            Method::POST,
            api::ACK_PATH,
            ack,
            &[(api::SIDECAR_HEADER, "test-1")],
        ),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);

    let resp = send(
        plane.addr,
        tls(plane.roots(), None),
        request(Method::GET, api::STATUS_PATH, vec![], &[]),
    )
    .await;
    let status: serde_json::Value = serde_json::from_str(&body_text(resp).await).unwrap();
    let o = status["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == "default/orchestrator")
        .unwrap()
        .clone();
    let sidecar = &o["sidecars"][0];
    assert_eq!(sidecar["sidecar"], "test-1");
    assert_eq!(sidecar["connected"], true);
    assert_eq!(sidecar["enforcedVersion"], bundle.version);
    assert_eq!(sidecar["enforcedHash"], bundle.hash);
    plane.stop().await;
}
