//! The budget client keeps its mTLS connections alive: a fake budget service over real TLS on
//! loopback counts the TCP connections it accepts and records the client certificate behind
//! every request.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use ringfence_crds::api::{
    CALLS_PATH, CallAck, CallReport, CsrRequest, LEASE_PATH, LeaseRequest, LeaseResponse, RunTerms,
    SPEND_PATH, SpendAck, SpendReport,
};
use ringfence_crds::spiffe::AgentKey;
use ringfence_sidecar::control_plane::{ControlPlane, ControlPlaneError};
use ringfence_sidecar::identity::{CredentialResolver, Credentials};
use ringfence_sidecar::testing::TestCa;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

/// A budget service that answers spend, ledger and lease requests.
struct FakeBudget {
    ca: TestCa,
    /// TCP connections accepted so far.
    connections: AtomicUsize,
    /// Every request: its path and the client certificate of its connection.
    seen: Mutex<Vec<(String, Option<CertificateDer<'static>>)>>,
    /// Closes every open connection, as a server's idle timeout would.
    close_all: Notify,
    /// Reads the second request of each connection and closes it without an answer, as a
    /// server that timed the connection out just as the request arrived.
    drop_second_request: AtomicBool,
}

impl FakeBudget {
    async fn start() -> (Arc<Self>, SocketAddr) {
        let fake = Arc::new(Self {
            ca: TestCa::new("cluster.local"),
            connections: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            close_all: Notify::new(),
            drop_second_request: AtomicBool::new(false),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(fake.clone().serve(listener));
        (fake, addr)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<(String, Option<CertificateDer<'static>>)> {
        self.seen.lock().unwrap().clone()
    }

    async fn serve(self: Arc<Self>, listener: TcpListener) {
        let acceptor = self.ca.loopback_acceptor();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            self.connections.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let fake = self.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first().cloned());
                let requests = Arc::new(AtomicUsize::new(0));
                let (hang_up_tx, mut hang_up) = watch::channel(false);
                let service = {
                    let fake = fake.clone();
                    service_fn(move |req| {
                        let fake = fake.clone();
                        let peer = peer.clone();
                        let nth = requests.fetch_add(1, Ordering::SeqCst) + 1;
                        let hang_up_tx = hang_up_tx.clone();
                        async move {
                            let response = fake.handle(req, peer).await;
                            if nth == 2 && fake.drop_second_request.load(Ordering::SeqCst) {
                                hang_up_tx.send_replace(true);
                                std::future::pending::<()>().await;
                            }
                            Ok::<_, Infallible>(response)
                        }
                    })
                };
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service);
                tokio::select! {
                    _ = conn => {}
                    _ = fake.close_all.notified() => {}
                    _ = hang_up.wait_for(|h| *h) => {}
                }
            });
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: Option<CertificateDer<'static>>,
    ) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_owned();
        self.seen.lock().unwrap().push((path.clone(), peer));
        let _ = req.into_body().collect().await;
        let body = match path.as_str() {
            SPEND_PATH => serde_json::to_vec(&SpendAck {
                accepted: 0,
                duplicates: 0,
                halted: Vec::new(),
            }),
            CALLS_PATH => serde_json::to_vec(&CallAck::default()),
            LEASE_PATH => serde_json::to_vec(&LeaseResponse::Granted {
                lease_id: "lease-1".to_owned(),
                tokens: 1000,
                micros: 0,
            }),
            _ => {
                let mut r = Response::new(Full::new(Bytes::from_static(b"{\"error\":\"no\"}")));
                *r.status_mut() = StatusCode::NOT_FOUND;
                return r;
            }
        };
        Response::new(Full::new(Bytes::from(body.unwrap())))
    }
}

/// An SVID for research, signed by `ca`.
fn svid(ca: &TestCa) -> Arc<Credentials> {
    let agent = AgentKey::new("default", "research").unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, agent.to_string());
    params.distinguished_name = name;
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let now = SystemTime::now();
    let response = ca
        .sign(
            &CsrRequest {
                agent: agent.clone(),
                csr,
            },
            now,
            Duration::from_secs(3600),
        )
        .unwrap();
    Arc::new(Credentials::from_response(&agent, &key, &response, now).unwrap())
}

fn leaf(creds: &Credentials) -> CertificateDer<'static> {
    creds.certified_key.cert[0].clone()
}

/// A budget client holding `creds`, whose SVID the test can replace through the sender.
fn client(
    fake: &FakeBudget,
    addr: SocketAddr,
    max_age: Duration,
) -> (ControlPlane, watch::Sender<Option<Arc<Credentials>>>) {
    let (tx, rx) = watch::channel(Some(svid(&fake.ca)));
    let client = ControlPlane::new(
        &format!("https://{addr}"),
        fake.ca.pem().as_bytes(),
        Arc::new(CredentialResolver::new(rx)),
        Duration::from_secs(5),
        "research-0",
    )
    .unwrap()
    .keep_alive(max_age);
    (client, tx)
}

fn spend() -> SpendReport {
    SpendReport { events: Vec::new() }
}

fn lease() -> LeaseRequest {
    LeaseRequest {
        run: "run-1".to_owned(),
        terms: RunTerms {
            root: "orchestrator".to_owned(),
            ..RunTerms::default()
        },
        tokens: 1000,
        micros: 0,
    }
}

const MINUTE: Duration = Duration::from_secs(60);

#[tokio::test]
async fn consecutive_spend_ledger_and_lease_requests_share_one_connection() {
    let (fake, addr) = FakeBudget::start().await;
    let (client, _svid) = client(&fake, addr, MINUTE);
    for _ in 0..5 {
        client.report(&spend()).await.unwrap();
        client
            .report_calls(&CallReport { calls: Vec::new() })
            .await
            .unwrap();
        let granted = client.lease(&lease()).await.unwrap();
        assert!(matches!(granted, LeaseResponse::Granted { .. }));
    }
    assert_eq!(fake.seen().len(), 15);
    assert_eq!(fake.connections(), 1, "15 requests, one handshake");
}

#[tokio::test]
async fn without_keep_alive_every_request_opens_a_connection() {
    let (fake, addr) = FakeBudget::start().await;
    let (tx, rx) = watch::channel(Some(svid(&fake.ca)));
    let client = ControlPlane::new(
        &format!("https://{addr}"),
        fake.ca.pem().as_bytes(),
        Arc::new(CredentialResolver::new(rx)),
        Duration::from_secs(5),
        "research-0",
    )
    .unwrap();
    for _ in 0..3 {
        client.report(&spend()).await.unwrap();
    }
    assert_eq!(fake.connections(), 3);
    drop(tx);
}

#[tokio::test]
async fn after_the_server_closes_the_idle_connection_the_next_report_goes_on_a_new_one() {
    let (fake, addr) = FakeBudget::start().await;
    let (client, _svid) = client(&fake, addr, MINUTE);
    client.report(&spend()).await.unwrap();
    fake.close_all.notify_waiters();
    // Whether the client has noticed the close yet or not, the report must get through.
    client.report(&spend()).await.unwrap();
    client.lease(&lease()).await.unwrap();
    assert_eq!(fake.connections(), 2);
}

#[tokio::test]
async fn a_report_lost_with_its_connection_is_sent_again_on_a_new_one() {
    let (fake, addr) = FakeBudget::start().await;
    fake.drop_second_request.store(true, Ordering::SeqCst);
    let (client, _svid) = client(&fake, addr, MINUTE);
    client.report(&spend()).await.unwrap();
    // The server reads the second report, then hangs up without an answer: the report may
    // have been recorded, and its idempotency keys make sending it again safe.
    client.report(&spend()).await.unwrap();
    let spends = fake.seen().iter().filter(|(p, _)| p == SPEND_PATH).count();
    assert_eq!(spends, 3, "the lost report was delivered twice");
    assert_eq!(fake.connections(), 2);
}

#[tokio::test]
async fn a_lease_that_may_have_reached_the_server_is_not_sent_twice() {
    let (fake, addr) = FakeBudget::start().await;
    fake.drop_second_request.store(true, Ordering::SeqCst);
    let (client, _svid) = client(&fake, addr, MINUTE);
    client.report(&spend()).await.unwrap();
    let err = client.lease(&lease()).await.unwrap_err();
    assert!(matches!(err, ControlPlaneError::Http(_)), "{err}");
    let leases = fake.seen().iter().filter(|(p, _)| p == LEASE_PATH).count();
    assert_eq!(
        leases, 1,
        "a lease has no idempotency key: one delivery only"
    );
    // The broken connection is gone; the next lease opens a new one.
    client.lease(&lease()).await.unwrap();
    assert_eq!(fake.connections(), 2);
}

#[tokio::test]
async fn after_an_svid_rotation_the_next_request_presents_the_new_certificate() {
    let (fake, addr) = FakeBudget::start().await;
    let (client, creds) = client(&fake, addr, MINUTE);
    let first = leaf(creds.borrow().as_ref().unwrap());
    client.report(&spend()).await.unwrap();
    client.report(&spend()).await.unwrap();

    let renewed = svid(&fake.ca);
    let second = leaf(&renewed);
    creds.send_replace(Some(renewed));
    client.report(&spend()).await.unwrap();
    client.lease(&lease()).await.unwrap();

    let certs: Vec<_> = fake.seen().into_iter().map(|(_, c)| c.unwrap()).collect();
    assert_eq!(certs, vec![first.clone(), first, second.clone(), second]);
    assert_eq!(fake.connections(), 2);
}

#[tokio::test]
async fn a_connection_older_than_the_maximum_age_is_replaced() {
    let (fake, addr) = FakeBudget::start().await;
    let (client, _svid) = client(&fake, addr, Duration::from_millis(300));
    client.report(&spend()).await.unwrap();
    client.report(&spend()).await.unwrap();
    assert_eq!(fake.connections(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    client.report(&spend()).await.unwrap();
    assert_eq!(fake.connections(), 2);
}
