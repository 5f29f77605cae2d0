//! Sending requests on: to another agent's sidecar over mTLS (HTTP/1.1 on kept-alive connections
//! pooled per peer, HTTP/2 for what overflows them), or in plain HTTP to this agent's app and to
//! tool servers.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Uri;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ringfence_crds::SpiffeId;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::tls::{MeshTls, MeshTlsError};

/// Errors of any body the proxy streams.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type of everything the proxy sends and returns.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body from bytes held in memory.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A received body, streamed on as it arrives.
pub fn stream(body: Incoming) -> Body {
    body.map_err(BoxError::from).boxed()
}

/// Why a request could not be sent on.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("TLS with {peer} failed: {reason}")]
    Tls { peer: String, reason: String },
    #[error(transparent)]
    MeshTls(#[from] MeshTlsError),
    #[error("no answer from {target} within {after:?}")]
    Timeout { target: String, after: Duration },
    #[error("{target} failed: {reason}")]
    Upstream { target: String, reason: String },
}

/// How long to wait for a TCP connection and a TLS handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Calls in flight to one peer over HTTP/1.1 at most (one connection each); more go over one
/// multiplexed HTTP/2 connection. Idle HTTP/1.1 connections are kept as many, and this long.
pub const H1_PER_PEER: usize = 32;
const MESH_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Where each peer's sidecar is, by the authority its requests are sent to
/// (`<name>.<namespace>.ringfence`): the SPIFFE ID it must present and its inbound address.
type Routes = Arc<Mutex<HashMap<String, (SpiffeId, String)>>>;

/// Clients to other sidecars over mTLS: HTTP/1.1 on kept-alive connections pooled per peer, up
/// to [`H1_PER_PEER`] calls in flight to a peer; beyond that, HTTP/2 on one multiplexed
/// connection per peer.
///
/// HTTP/1.1 first: a request goes out as one write (head and body together) and the answer
/// comes back on the connection that sent it, with no stream bookkeeping, HPACK or task per
/// request; HTTP/2 sent the head and the body in separate TLS records and cost ~15 % more CPU
/// per call (docs/benchmarks.md). But HTTP/1.1 needs a connection, and so a full TLS handshake,
/// per concurrent call: under a burst, new connections cost more than the calls they carry and
/// a caller can fall behind for good. Past the limit, calls share one HTTP/2 connection, as
/// they all did before. A peer is pooled by its identity: the authority names the agent, and
/// a connection is only ever made to a server that proved it is that agent.
pub struct Mesh {
    tls: Arc<MeshTls>,
    routes: Routes,
    client: Client<MeshConnector, Body>,
    /// Calls in flight over HTTP/1.1, per peer, until their answer's head arrived.
    busy: Mutex<HashMap<SpiffeId, usize>>,
    h1_limit: usize,
    multiplexed: Mutex<HashMap<SpiffeId, http2::SendRequest<Body>>>,
    /// Held while a peer's HTTP/2 connection is being made.
    connecting: Mutex<HashMap<SpiffeId, Arc<tokio::sync::Mutex<()>>>>,
}

impl Mesh {
    /// A mesh that sends at most `h1_limit` concurrent calls to a peer over HTTP/1.1.
    pub fn new(tls: Arc<MeshTls>, h1_limit: usize) -> Self {
        let routes = Routes::default();
        let connector = MeshConnector {
            tls: tls.clone(),
            routes: routes.clone(),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(MESH_IDLE_TIMEOUT)
            .pool_max_idle_per_host(h1_limit)
            // A request that met a pooled connection the peer had closed, before a byte of it
            // was written, goes once more on a new one.
            .retry_canceled_requests(true)
            .build(connector);
        Self {
            tls,
            routes,
            client,
            busy: Mutex::default(),
            h1_limit,
            multiplexed: Mutex::default(),
            connecting: Mutex::default(),
        }
    }

    /// Sends `req` (an `https://<name>.<namespace>.ringfence/…` URI) to the sidecar of `peer`
    /// at `addr`, waiting at most `timeout` for the response head.
    pub async fn send(
        &self,
        peer: &SpiffeId,
        addr: &str,
        req: Request<Bytes>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ForwardError> {
        let target = peer.to_string();
        let sent = async {
            match self.h1_slot(peer) {
                Some(_slot) => self.send_h1(peer, addr, req, &target).await,
                None => self.send_h2(peer, addr, req, &target).await,
            }
        };
        tokio::time::timeout(timeout, sent)
            .await
            .unwrap_or(Err(ForwardError::Timeout {
                target,
                after: timeout,
            }))
    }

    /// A place for one more HTTP/1.1 call to `peer`, if it has one; given back when dropped.
    fn h1_slot<'m>(&'m self, peer: &'m SpiffeId) -> Option<H1Slot<'m>> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        let n = match busy.get_mut(peer) {
            Some(n) => n,
            // Bounded by the agents of the bundle.
            None => busy.entry(peer.clone()).or_default(),
        };
        if *n >= self.h1_limit {
            return None;
        }
        *n += 1;
        Some(H1Slot { mesh: self, peer })
    }

    async fn send_h1(
        &self,
        peer: &SpiffeId,
        addr: &str,
        req: Request<Bytes>,
        target: &str,
    ) -> Result<Response<Incoming>, ForwardError> {
        let authority = req
            .uri()
            .authority()
            .ok_or_else(|| ForwardError::Upstream {
                target: target.to_owned(),
                reason: "the request names no peer".into(),
            })?;
        self.route(authority.as_str(), peer, addr);
        let (mut parts, bytes) = req.into_parts();
        parts.version = http::Version::HTTP_11;
        self.client
            .request(Request::from_parts(parts, full(bytes)))
            .await
            .map_err(|e| mesh_error(&e, target, addr))
    }

    /// Over the peer's HTTP/2 connection. The request body is in memory, so a request on a
    /// connection found closed is sent once more on a new one.
    async fn send_h2(
        &self,
        peer: &SpiffeId,
        addr: &str,
        req: Request<Bytes>,
        target: &str,
    ) -> Result<Response<Incoming>, ForwardError> {
        for attempt in 0..2 {
            let mut sender = self.h2_connection(peer, addr, attempt > 0).await?;
            let (mut parts, bytes) = req.clone().into_parts();
            parts.version = http::Version::HTTP_2;
            match sender
                .send_request(Request::from_parts(parts, full(bytes)))
                .await
            {
                Ok(resp) => return Ok(resp),
                // Nothing reached the peer: the connection had gone away.
                Err(e) if attempt == 0 && (e.is_closed() || e.is_canceled()) => {
                    self.forget_h2(peer);
                }
                Err(e) => {
                    self.forget_h2(peer);
                    return Err(ForwardError::Upstream {
                        target: target.to_owned(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        Err(ForwardError::Upstream {
            target: target.to_owned(),
            reason: "the connection closed twice".into(),
        })
    }

    fn forget_h2(&self, peer: &SpiffeId) {
        self.multiplexed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(peer);
    }

    async fn h2_connection(
        &self,
        peer: &SpiffeId,
        addr: &str,
        fresh: bool,
    ) -> Result<http2::SendRequest<Body>, ForwardError> {
        let live = || {
            self.multiplexed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(peer)
                .filter(|s| !s.is_closed())
                .cloned()
        };
        if !fresh && let Some(s) = live() {
            return Ok(s);
        }
        // One connection per peer: calls that overflow together wait for the first to make it.
        let gate = self
            .connecting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(peer.clone())
            .or_default()
            .clone();
        let _connecting = gate.lock().await;
        if let Some(s) = live() {
            return Ok(s);
        }
        let tls = connect_tls(&self.tls, peer, addr, true).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ForwardError::Upstream {
                target: peer.to_string(),
                reason: e.to_string(),
            })?;
        let who = peer.to_string();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(peer = %who, error = %e, "mesh connection ended");
            }
        });
        self.multiplexed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(peer.clone(), sender.clone());
        Ok(sender)
    }

    /// Records where `authority`'s peer is; new connections go there.
    fn route(&self, authority: &str, peer: &SpiffeId, addr: &str) {
        let mut routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        if routes
            .get(authority)
            .is_some_and(|(id, at)| id == peer && at == addr)
        {
            return;
        }
        // Bounded by the agents of the bundle.
        routes.insert(authority.to_owned(), (peer.clone(), addr.to_owned()));
    }
}

/// The error of a mesh request: the connector's own (connect, TLS) as it said it, else the
/// connection's.
fn mesh_error(e: &hyper_util::client::legacy::Error, target: &str, addr: &str) -> ForwardError {
    let source = std::error::Error::source(e);
    match source.and_then(|s| s.downcast_ref::<ForwardError>()) {
        Some(ForwardError::Tls { peer, reason }) => ForwardError::Tls {
            peer: peer.clone(),
            reason: reason.clone(),
        },
        Some(ForwardError::MeshTls(m)) => ForwardError::MeshTls(m.clone()),
        Some(other) => ForwardError::Connect {
            addr: addr.to_owned(),
            reason: other.to_string(),
        },
        None if e.is_connect() => ForwardError::Connect {
            addr: addr.to_owned(),
            reason: source.map_or_else(|| e.to_string(), ToString::to_string),
        },
        None => ForwardError::Upstream {
            target: target.to_owned(),
            reason: source.map_or_else(|| e.to_string(), |s| format!("{e}: {s}")),
        },
    }
}

/// Opens mTLS connections to peer sidecars for the mesh's pool.
#[derive(Clone)]
struct MeshConnector {
    tls: Arc<MeshTls>,
    routes: Routes,
}

impl tower_service::Service<Uri> for MeshConnector {
    type Response = TokioIo<MeshStream>;
    type Error = ForwardError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ForwardError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ForwardError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let authority = uri.authority().map(|a| a.as_str().to_owned());
        let route = authority.as_ref().and_then(|a| {
            self.routes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(a)
                .cloned()
        });
        let tls = self.tls.clone();
        Box::pin(async move {
            let Some((peer, addr)) = route else {
                return Err(ForwardError::Upstream {
                    target: authority.unwrap_or_default(),
                    reason: "no route to this peer's sidecar".into(),
                });
            };
            let tls = connect_tls(&tls, &peer, &addr, false).await?;
            Ok(TokioIo::new(MeshStream(tls)))
        })
    }
}

/// One HTTP/1.1 call in flight to a peer, counted until dropped.
struct H1Slot<'m> {
    mesh: &'m Mesh,
    peer: &'m SpiffeId,
}

impl Drop for H1Slot<'_> {
    fn drop(&mut self) {
        let mut busy = self
            .mesh
            .busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = busy.get_mut(self.peer) {
            *n = n.saturating_sub(1);
        }
    }
}

/// An mTLS connection to `peer`'s sidecar at `addr`, asking for HTTP/2 (`h2`) or HTTP/1.1.
async fn connect_tls(
    tls: &MeshTls,
    peer: &SpiffeId,
    addr: &str,
    h2: bool,
) -> Result<TlsStream<TcpStream>, ForwardError> {
    let config = tls.client_config(peer, h2)?;
    let connect = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| ForwardError::Connect {
                addr: addr.to_owned(),
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        // The verifier checks the SPIFFE ID; the name only has to be well-formed.
        let name = ServerName::try_from(format!("{}.{}.ringfence", peer.name(), peer.namespace()))
            .map_err(|e| ForwardError::Tls {
                peer: peer.to_string(),
                reason: e.to_string(),
            })?;
        TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| ForwardError::Tls {
                peer: peer.to_string(),
                reason: e.to_string(),
            })
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| ForwardError::Connect {
            addr: addr.to_owned(),
            reason: format!("no connection within {CONNECT_TIMEOUT:?}"),
        })?
}

/// A TLS connection to a peer sidecar, as the pool holds it.
struct MeshStream(TlsStream<TcpStream>);

impl Connection for MeshStream {
    /// HTTP/2 when the peer chose it (a sidecar of an earlier release accepts nothing else).
    fn connected(&self) -> Connected {
        let connected = Connected::new();
        if self.0.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2) {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl AsyncRead for MeshStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// HTTP/1.1 (or HTTP/2 over TLS where offered) to this agent's app, tool servers and model
/// providers, pooled. `https://` upstreams are verified against Mozilla's roots.
#[derive(Clone)]
pub struct Plain {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>,
}

impl Default for Plain {
    fn default() -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(ringfence_crds::svid::crypto_provider())
            .map(|b| {
                b.https_or_http()
                    .enable_http1()
                    .enable_http2()
                    .wrap_connector(http.clone())
            })
            .unwrap_or_else(|e| {
                // Only an unusable crypto provider gets here: keep plain HTTP working.
                tracing::error!(error = %e, "HTTPS to upstreams is unavailable");
                hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(
                        rustls::ClientConfig::builder_with_provider(
                            ringfence_crds::svid::crypto_provider(),
                        )
                        .with_safe_default_protocol_versions()
                        .map(|b| {
                            b.with_root_certificates(rustls::RootCertStore::empty())
                                .with_no_client_auth()
                        })
                        .unwrap_or_else(|_| unreachable!("TLS 1.3 is supported by ring")),
                    )
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(http)
            });
        Self {
            client: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(connector),
        }
    }
}

impl Plain {
    /// Sends `req` (absolute `http://` URI), waiting at most `timeout` for the response head.
    pub async fn send(
        &self,
        req: Request<Body>,
        timeout: Option<Duration>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let target = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let fut = self.client.request(req);
        let result = match timeout {
            Some(t) => tokio::time::timeout(t, fut)
                .await
                .map_err(|_| ForwardError::Timeout {
                    target: target.clone(),
                    after: t,
                })?,
            None => fut.await,
        };
        result.map_err(|e| {
            if e.is_connect() {
                ForwardError::Connect {
                    addr: target,
                    reason: std::error::Error::source(&e)
                        .map_or_else(|| e.to_string(), ToString::to_string),
                }
            } else {
                ForwardError::Upstream {
                    target,
                    reason: e.to_string(),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(limit: usize) -> Mesh {
        let (_, credentials) = tokio::sync::watch::channel(None);
        Mesh::new(Arc::new(MeshTls::new(credentials)), limit)
    }

    #[tokio::test]
    async fn http1_slots_are_counted_per_peer_and_given_back_when_a_call_ends() {
        let m = mesh(2);
        let research = SpiffeId::parse("spiffe://cluster.local/ns/default/agent/research").unwrap();
        let critic = SpiffeId::parse("spiffe://cluster.local/ns/default/agent/critic").unwrap();
        let first = m.h1_slot(&research);
        let second = m.h1_slot(&research);
        assert!(first.is_some() && second.is_some());
        assert!(m.h1_slot(&research).is_none(), "the third call overflows");
        assert!(
            m.h1_slot(&critic).is_some(),
            "another peer has its own slots"
        );
        drop(first);
        // A call that ends, or is dropped mid-way (a timeout), gives its slot back.
        let again = m.h1_slot(&research);
        assert!(again.is_some());
        drop((second, again));
        assert_eq!(m.busy.lock().unwrap()[&research], 0);
    }

    #[tokio::test]
    async fn a_peer_with_no_credentials_yet_is_a_tls_error_not_a_hang() {
        // Before the sidecar has its SVID, a mesh call fails at once and says why.
        let m = mesh(2);
        let research = SpiffeId::parse("spiffe://cluster.local/ns/default/agent/research").unwrap();
        let req = Request::post("https://research.default.ringfence/")
            .body(Bytes::from_static(b"{}"))
            .unwrap();
        let err = m
            .send(&research, "127.0.0.1:9", req, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ForwardError::MeshTls(MeshTlsError::NoSvid)),
            "{err:?}"
        );
        assert_eq!(m.busy.lock().unwrap()[&research], 0, "the slot is back");
    }
}
