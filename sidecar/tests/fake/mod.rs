//! A small control plane for tests: real TLS on loopback, a test CA that signs CSRs, a bundle
//! stream the test pushes lines into, and a record of every CSR and ack.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use ringfence_crds::api::{ACK_PATH, BundleAck, CSR_PATH, CsrRequest, ErrorBody, WATCH_PATH};
use ringfence_sidecar::testing::TestCa;
use rustls::pki_types::CertificateDer;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub const TOKEN: &str = "bootstrap-token-for-research";

/// One CSR as the control plane saw it.
#[derive(Clone, Debug)]
pub struct SeenCsr {
    pub agent: String,
    pub token: Option<String>,
    /// The client certificate presented on that connection (a renewal over mTLS).
    pub client_cert: Option<CertificateDer<'static>>,
}

pub struct FakeControlPlane {
    pub ca: TestCa,
    pub ttl: Mutex<Duration>,
    /// The line every watcher is sent (the current bundle, or garbage a test wants to send).
    stream: watch::Sender<Option<String>>,
    pub acks: Mutex<Vec<BundleAck>>,
    pub csrs: Mutex<Vec<SeenCsr>>,
}

type Body = BoxBody<Bytes, Infallible>;

impl FakeControlPlane {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            ca: TestCa::new("cluster.local"),
            ttl: Mutex::new(Duration::from_secs(3600)),
            stream: watch::Sender::new(None),
            acks: Mutex::new(Vec::new()),
            csrs: Mutex::new(Vec::new()),
        })
    }

    /// Sends `line` to every watcher now and to each one that connects later.
    pub fn push(&self, line: String) {
        self.stream.send_replace(Some(line));
    }

    pub fn acks(&self) -> Vec<BundleAck> {
        self.acks.lock().unwrap().clone()
    }

    pub fn csrs(&self) -> Vec<SeenCsr> {
        self.csrs.lock().unwrap().clone()
    }

    /// Serves HTTPS on `listener` until the task is aborted.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let acceptor = self.ca.loopback_acceptor();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
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
                let service = service_fn(move |req| {
                    let fake = fake.clone();
                    let peer = peer.clone();
                    async move { Ok::<_, Infallible>(fake.handle(req, peer).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: Option<CertificateDer<'static>>,
    ) -> Response<Body> {
        match (req.method().clone(), req.uri().path()) {
            (Method::POST, CSR_PATH) => {
                let token = req
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::to_owned);
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let csr: CsrRequest = serde_json::from_slice(&body).unwrap();
                self.csrs.lock().unwrap().push(SeenCsr {
                    agent: csr.agent.to_string(),
                    token: token.clone(),
                    client_cert: peer.clone(),
                });
                if peer.is_none() && token.as_deref() != Some(TOKEN) {
                    return error(StatusCode::UNAUTHORIZED, "bootstrap token missing or wrong");
                }
                let ttl = *self.ttl.lock().unwrap();
                let signed = self.ca.sign(&csr, SystemTime::now(), ttl).unwrap();
                json(StatusCode::OK, &signed)
            }
            (Method::GET, WATCH_PATH) if peer.is_some() => {
                let mut rx = self.stream.subscribe();
                rx.mark_changed();
                let keep_alive = futures_util::stream::once(async {
                    Ok(Frame::data(Bytes::from_static(b"\n")))
                });
                let lines = futures_util::stream::unfold(rx, |mut rx| async move {
                    loop {
                        rx.changed().await.ok()?;
                        let line = rx.borrow_and_update().clone();
                        if let Some(line) = line {
                            let frame = Frame::data(Bytes::from(format!("{line}\n")));
                            return Some((Ok::<_, Infallible>(frame), rx));
                        }
                    }
                });
                let stream = futures_util::StreamExt::chain(keep_alive, lines);
                Response::new(StreamBody::new(stream).boxed())
            }
            (Method::POST, ACK_PATH) if peer.is_some() => {
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let ack: BundleAck = serde_json::from_slice(&body).unwrap();
                self.acks.lock().unwrap().push(ack);
                json(StatusCode::OK, &serde_json::json!({}))
            }
            (_, WATCH_PATH | ACK_PATH) => {
                error(StatusCode::UNAUTHORIZED, "client certificate required")
            }
            _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
        }
    }
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())).boxed());
    *r.status_mut() = status;
    r
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(
        status,
        &ErrorBody {
            error: message.to_owned(),
        },
    )
}

/// Starts a fake control plane on `addr` (port 0 for any).
pub async fn start(
    addr: SocketAddr,
) -> (
    Arc<FakeControlPlane>,
    SocketAddr,
    tokio::task::JoinHandle<()>,
) {
    let fake = FakeControlPlane::new();
    let (addr, task) = serve_on(fake.clone(), addr).await;
    (fake, addr, task)
}

pub async fn serve_on(
    fake: Arc<FakeControlPlane>,
    addr: SocketAddr,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, tokio::spawn(fake.serve(listener)))
}
