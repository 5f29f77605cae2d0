//! The HTTPS client the sidecar speaks to the control plane with.
//!
//! Ordinary server-name TLS: the control plane's certificate must chain to the trust-domain CA
//! given with `--ca-file` (the only root) and name the host of `--control-plane`. The client
//! certificate is the sidecar's current SVID, read at each handshake from the
//! [`CredentialResolver`], so renewals and the bundle stream use the newest one. Before the first
//! SVID there is none and the control plane sees an anonymous client (the CSR then carries the
//! bootstrap token).
//!
//! HTTP/1.1. By default one connection per request: a CSR or an ack is rare. The budget
//! client, which reports spend and calls several times a second and leases on the request path,
//! keeps its connections alive ([`ControlPlane::keep_alive`], the [`pool`] module) and makes a
//! new one after a bounded age or an SVID rotation. Streams (bundles, halts) always hold a
//! connection of their own for as long as they last.

mod pool;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use ringfence_crds::api::{
    ACK_PATH, BundleAck, CSR_PATH, CsrRequest, CsrResponse, ErrorBody, HALTS_PATH, LEASE_PATH,
    LeaseRequest, LeaseResponse, RELEASE_PATH, ReleaseRequest, SIDECAR_HEADER, SPEND_PATH,
    SpendAck, SpendReport, WATCH_PATH,
};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::identity::{CertificateAuthority, CredentialResolver, IdentityError};
use pool::{Conn, Pool};

/// How long the budget client uses one connection: a rotated SVID is presented within this
/// (a rotation also retires older connections at the next request), and it costs a handshake a
/// minute instead of several a second.
pub const KEEP_ALIVE_MAX_AGE: Duration = Duration::from_secs(60);

/// Largest answer to a CSR or ack we read.
const MAX_RESPONSE: usize = 1 << 20;

/// What went wrong talking to the control plane, with what to check.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("--control-plane {0:?} is not an https://host:port URL")]
    Url(String),
    #[error("--ca-file holds no usable CA certificate: {0}")]
    Ca(String),
    #[error("cannot build the TLS client: {0}")]
    Tls(String),
    #[error(
        "cannot connect to the control plane at {addr}: {source}; is it running and reachable?"
    )]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error(
        "TLS handshake with the control plane at {addr} failed: {source}; check that its certificate is signed by --ca-file and names that host"
    )]
    Handshake {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP exchange with the control plane failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("the control plane did not answer {path} within {after:?}")]
    Timeout { path: &'static str, after: Duration },
    #[error("the control plane answered {path} with {status}: {message}")]
    Status {
        path: &'static str,
        status: StatusCode,
        message: String,
    },
    #[error("the control plane's answer to {path} is unreadable: {message}")]
    Body { path: &'static str, message: String },
}

/// A control plane at one URL.
#[derive(Clone)]
pub struct ControlPlane {
    addr: String,
    authority: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    client_cert: Arc<CredentialResolver>,
    /// Kept-alive connections for one-shot requests; `None`: a connection per request.
    pool: Option<Arc<Pool>>,
    timeout: Duration,
    instance: String,
}

/// Whether a request may be sent again after it may have reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// The server applies it once whatever the number of deliveries (idempotency keys,
    /// releases by lease id, acks).
    Safe,
    /// A second delivery would act twice (a lease grants again): resend only what was
    /// provably never written to the connection.
    OnlyUnsent,
}

/// How a request on a connection failed.
enum Failure {
    /// The connection was closed before the request was written.
    Unsent(hyper::Error),
    /// The request may have reached the server.
    MaybeSent(hyper::Error),
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("addr", &self.addr)
            .finish()
    }
}

impl ControlPlane {
    /// `url` is `https://host[:port]`; `ca_pem` the trust domain's CA certificates; `instance`
    /// names this sidecar among its agent's others (sent as the `ringfence-sidecar` header).
    pub fn new(
        url: &str,
        ca_pem: &[u8],
        client_cert: Arc<CredentialResolver>,
        timeout: Duration,
        instance: &str,
    ) -> Result<Self, ControlPlaneError> {
        let bad_url = || ControlPlaneError::Url(url.to_owned());
        let uri: Uri = url.parse().map_err(|_| bad_url())?;
        if uri.scheme_str() != Some("https")
            || uri.path_and_query().is_some_and(|p| p.as_str() != "/")
        {
            return Err(bad_url());
        }
        let authority = uri.authority().ok_or_else(bad_url)?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(443);
        let server_name = ServerName::try_from(host.to_owned()).map_err(|_| bad_url())?;

        let mut roots = RootCertStore::empty();
        let mut found = 0usize;
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| ControlPlaneError::Ca(e.to_string()))?;
            roots
                .add(cert)
                .map_err(|e| ControlPlaneError::Ca(e.to_string()))?;
            found += 1;
        }
        if found == 0 {
            return Err(ControlPlaneError::Ca("no PEM CERTIFICATE block".to_owned()));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| ControlPlaneError::Tls(e.to_string()))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ControlPlaneError::Tls(e.to_string()))?
            .with_webpki_verifier(verifier)
            .with_client_cert_resolver(client_cert.clone());
        // A resumed session keeps the client identity of the session it resumes: the anonymous
        // one from before the first SVID, or an SVID since replaced. Every connection must
        // present the current SVID, so no resumption (connections here are rare or kept alive).
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            addr: format!("{}:{port}", authority.host()),
            authority: authority.as_str().to_owned(),
            server_name,
            connector: TlsConnector::from(Arc::new(config)),
            client_cert,
            pool: None,
            timeout,
            instance: instance.to_owned(),
        })
    }

    /// Keeps connections of one-shot requests alive for reuse, each for at most `max_age`, and
    /// only while the SVID it presented is the current one. A request that fails on a reused
    /// connection is sent once more on a new one when resending is safe.
    pub fn keep_alive(mut self, max_age: Duration) -> Self {
        self.pool = Some(Arc::new(Pool::new(max_age)));
        self
    }

    /// Where the control plane is, for logs.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ControlPlaneError> {
        let tcp =
            TcpStream::connect(&self.addr)
                .await
                .map_err(|source| ControlPlaneError::Connect {
                    addr: self.addr.clone(),
                    source,
                })?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|source| ControlPlaneError::Handshake {
                addr: self.addr.clone(),
                source,
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "control-plane connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends one request and returns the response head once it is a success.
    async fn send(
        &self,
        path: &'static str,
        method: Method,
        body: Option<Vec<u8>>,
        bearer: Option<&str>,
    ) -> Result<Response<Incoming>, ControlPlaneError> {
        self.send_to(path, path, method, body, bearer).await
    }

    /// Like `send`, to `uri` (a path with a query); `path` names it in errors.
    async fn send_to(
        &self,
        path: &'static str,
        uri: &str,
        method: Method,
        body: Option<Vec<u8>>,
        bearer: Option<&str>,
    ) -> Result<Response<Incoming>, ControlPlaneError> {
        let exchange = async {
            let mut sender = self.connect().await?;
            let request = self.request(path, uri, method, body.map(Bytes::from), bearer)?;
            Ok::<_, ControlPlaneError>(sender.send_request(request).await?)
        };
        let response = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ControlPlaneError::Timeout {
                path,
                after: self.timeout,
            })??;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let message = match self.read_body(path, response).await {
            Ok(bytes) => error_message(&bytes),
            Err(e) => e.to_string(),
        };
        Err(ControlPlaneError::Status {
            path,
            status,
            message,
        })
    }

    fn request(
        &self,
        path: &'static str,
        uri: &str,
        method: Method,
        body: Option<Bytes>,
        bearer: Option<&str>,
    ) -> Result<Request<Full<Bytes>>, ControlPlaneError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::HOST, &self.authority)
            .header(SIDECAR_HEADER, &self.instance)
            .header(
                header::USER_AGENT,
                concat!("ringfence-sidecar/", env!("CARGO_PKG_VERSION")),
            );
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(token) = bearer {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| ControlPlaneError::Body {
                path,
                message: e.to_string(),
            })
    }

    /// A POST on a kept-alive connection, read to the end; the connection goes back to the pool
    /// once its response is read. Retries once on a new connection when a reused one fails
    /// before the response and `replay` allows it: the server may have closed it while idle.
    async fn pooled_post(
        &self,
        pool: &Pool,
        path: &'static str,
        body: Bytes,
        bearer: Option<&str>,
        replay: Replay,
    ) -> Result<Bytes, ControlPlaneError> {
        let svid = self.client_cert.current();
        let exchange = async {
            let mut conn = match pool.checkout(&svid) {
                Some(conn) => conn,
                None => Conn::fresh(self.connect().await?, svid.clone()),
            };
            let response = loop {
                let request = self.request(path, path, Method::POST, Some(body.clone()), bearer)?;
                let error = match attempt(&mut conn, request).await {
                    Ok(response) => break response,
                    Err(Failure::Unsent(e)) if conn.reused => e,
                    Err(Failure::MaybeSent(e)) if conn.reused && replay == Replay::Safe => e,
                    Err(Failure::Unsent(e) | Failure::MaybeSent(e)) => return Err(e.into()),
                };
                tracing::debug!(path, error = %error, "a kept-alive control-plane connection failed; retrying on a new one");
                conn = Conn::fresh(self.connect().await?, svid.clone());
            };
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| ControlPlaneError::Body {
                    path,
                    message: e.to_string(),
                })?
                .to_bytes();
            pool.checkin(conn);
            Ok::<_, ControlPlaneError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ControlPlaneError::Timeout {
                path,
                after: self.timeout,
            })??;
        if status.is_success() {
            return Ok(bytes);
        }
        Err(ControlPlaneError::Status {
            path,
            status,
            message: error_message(&bytes),
        })
    }

    async fn read_body(
        &self,
        path: &'static str,
        response: Response<Incoming>,
    ) -> Result<Bytes, ControlPlaneError> {
        let body = Limited::new(response.into_body(), MAX_RESPONSE);
        let collected = tokio::time::timeout(self.timeout, body.collect())
            .await
            .map_err(|_| ControlPlaneError::Timeout {
                path,
                after: self.timeout,
            })?
            .map_err(|e| ControlPlaneError::Body {
                path,
                message: e.to_string(),
            })?;
        Ok(collected.to_bytes())
    }

    async fn post_json<T: Serialize, R: DeserializeOwned>(
        &self,
        path: &'static str,
        body: &T,
        bearer: Option<&str>,
        replay: Replay,
    ) -> Result<R, ControlPlaneError> {
        let body = serde_json::to_vec(body).map_err(|e| ControlPlaneError::Body {
            path,
            message: e.to_string(),
        })?;
        let bytes = match &self.pool {
            Some(pool) => {
                self.pooled_post(pool, path, Bytes::from(body), bearer, replay)
                    .await?
            }
            None => {
                let response = self.send(path, Method::POST, Some(body), bearer).await?;
                self.read_body(path, response).await?
            }
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            // An ack may be answered with an empty body; decode it as JSON null.
            return serde_json::from_slice(b"null").map_err(|e| ControlPlaneError::Body {
                path,
                message: e.to_string(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ControlPlaneError::Body {
            path,
            message: e.to_string(),
        })
    }

    /// `POST /v1/identity/csr`.
    pub async fn request_svid(
        &self,
        request: &CsrRequest,
        token: Option<&str>,
    ) -> Result<CsrResponse, ControlPlaneError> {
        // A second CSR would be signed a second time: harmless, but not worth a retry.
        self.post_json(CSR_PATH, request, token, Replay::OnlyUnsent)
            .await
    }

    /// `POST /v1/bundles/ack`.
    pub async fn ack(&self, ack: &BundleAck) -> Result<(), ControlPlaneError> {
        self.post_json::<_, serde_json::Value>(ACK_PATH, ack, None, Replay::Safe)
            .await
            .map(drop)
    }

    /// `GET /v1/bundles/watch`: the body is the never-ending stream of JSON lines. Only the
    /// response head is bounded by the timeout.
    pub async fn watch(&self) -> Result<Incoming, ControlPlaneError> {
        let response = self.send(WATCH_PATH, Method::GET, None, None).await?;
        Ok(response.into_body())
    }
}

/// The budget service's side of the same client (it may be the control plane itself, or a
/// separate `ringfence budget` at its own URL).
impl ControlPlane {
    /// `POST /v1/budget/leases`.
    pub async fn lease(&self, request: &LeaseRequest) -> Result<LeaseResponse, ControlPlaneError> {
        // The budget service grants every lease request it receives: no idempotency key.
        self.post_json(LEASE_PATH, request, None, Replay::OnlyUnsent)
            .await
    }

    /// `POST /v1/budget/leases/release`.
    pub async fn release(&self, request: &ReleaseRequest) -> Result<(), ControlPlaneError> {
        // A lease released twice is answered "already released".
        self.post_json::<_, serde_json::Value>(RELEASE_PATH, request, None, Replay::Safe)
            .await
            .map(drop)
    }

    /// `POST /v1/budget/spend`: `Ok` only once the spend is durable.
    pub async fn report(&self, report: &SpendReport) -> Result<SpendAck, ControlPlaneError> {
        // Spend events carry idempotency keys (`eventId`).
        self.post_json(SPEND_PATH, report, None, Replay::Safe).await
    }

    /// `POST /v1/ledger/calls`: `Ok` only once the calls are durable.
    pub async fn report_calls(
        &self,
        report: &ringfence_crds::api::CallReport,
    ) -> Result<ringfence_crds::api::CallAck, ControlPlaneError> {
        // Calls carry idempotency keys (`eventId`).
        self.post_json(ringfence_crds::api::CALLS_PATH, report, None, Replay::Safe)
            .await
    }

    /// `GET /v1/budget/halts?since=<seq>`: the never-ending stream of halts as JSON lines.
    pub async fn halts(&self, since: u64) -> Result<Incoming, ControlPlaneError> {
        let uri = format!("{HALTS_PATH}?since={since}");
        let response = self
            .send_to(HALTS_PATH, &uri, Method::GET, None, None)
            .await?;
        Ok(response.into_body())
    }
}

/// Sends `request` on `conn` once it can take one.
async fn attempt(
    conn: &mut Conn,
    request: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, Failure> {
    // An idle HTTP/1.1 connection the server closed fails here, before anything is written.
    conn.sender.ready().await.map_err(Failure::Unsent)?;
    conn.sender
        .try_send_request(request)
        .await
        .map_err(|e| match e.message() {
            Some(_) => Failure::Unsent(e.into_error()),
            None => Failure::MaybeSent(e.into_error()),
        })
}

/// The `error` of an [`ErrorBody`], or the start of whatever else the body says.
fn error_message(bytes: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => body.error,
        Err(_) => String::from_utf8_lossy(bytes).chars().take(500).collect(),
    }
}

impl CertificateAuthority for ControlPlane {
    async fn sign(
        &self,
        request: &CsrRequest,
        token: Option<&str>,
    ) -> Result<CsrResponse, IdentityError> {
        self.request_svid(request, token)
            .await
            .map_err(|e| IdentityError::ControlPlane(e.to_string()))
    }
}
