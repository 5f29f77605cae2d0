//! Sending requests on: to another agent's sidecar over mTLS (HTTP/2, one multiplexed
//! connection per peer), or in plain HTTP to this agent's app and to tool servers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ringfence_crds::SpiffeId;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

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

/// Clients to other sidecars, one HTTP/2 connection each.
pub struct Mesh {
    tls: Arc<MeshTls>,
    conns: Mutex<HashMap<SpiffeId, http2::SendRequest<Body>>>,
}

impl Mesh {
    pub fn new(tls: Arc<MeshTls>) -> Self {
        Self {
            tls,
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `req` to the sidecar of `peer` at `addr`, waiting at most `timeout` for the
    /// response head. The request body is in memory, so a request on a connection found closed
    /// is sent once more on a new one.
    pub async fn send(
        &self,
        peer: &SpiffeId,
        addr: &str,
        req: Request<Bytes>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ForwardError> {
        let target = peer.to_string();
        let work = async {
            for attempt in 0..2 {
                let mut sender = self.connection(peer, addr, attempt > 0).await?;
                let (parts, bytes) = req.clone().into_parts();
                match sender
                    .send_request(Request::from_parts(parts, full(bytes)))
                    .await
                {
                    Ok(resp) => return Ok(resp),
                    // Nothing reached the peer: the pooled connection had gone away.
                    Err(e) if attempt == 0 && (e.is_closed() || e.is_canceled()) => {
                        self.forget(peer);
                    }
                    Err(e) => {
                        self.forget(peer);
                        return Err(ForwardError::Upstream {
                            target: target.clone(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
            Err(ForwardError::Upstream {
                target: target.clone(),
                reason: "the connection closed twice".into(),
            })
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or(Err(ForwardError::Timeout {
                target,
                after: timeout,
            }))
    }

    fn forget(&self, peer: &SpiffeId) {
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(peer);
    }

    async fn connection(
        &self,
        peer: &SpiffeId,
        addr: &str,
        fresh: bool,
    ) -> Result<http2::SendRequest<Body>, ForwardError> {
        if !fresh {
            let conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(s) = conns.get(peer).filter(|s| !s.is_closed()) {
                return Ok(s.clone());
            }
        }
        let config = self.tls.client_config(peer)?;
        let connect = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|e| ForwardError::Connect {
                    addr: addr.to_owned(),
                    reason: e.to_string(),
                })?;
            let _ = tcp.set_nodelay(true);
            // The verifier checks the SPIFFE ID; the name only has to be well-formed.
            let name =
                ServerName::try_from(format!("{}.{}.ringfence", peer.name(), peer.namespace()))
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
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| ForwardError::Connect {
                addr: addr.to_owned(),
                reason: format!("no connection within {CONNECT_TIMEOUT:?}"),
            })??;
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
        self.conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(peer.clone(), sender.clone());
        Ok(sender)
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
