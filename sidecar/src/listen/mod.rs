//! The sidecar's listeners: outbound (the agent calls out, plain HTTP on loopback) and inbound
//! (other sidecars call in, mTLS only). The admin listener is in [`crate::admin`].

pub mod inbound;
pub mod models;
pub mod outbound;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use ringfence_crds::svid::peer_spiffe_id;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::proxy::Proxy;
use crate::tls::ALPN_H2;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the outbound listener forever.
pub async fn serve_outbound(listener: TcpListener, proxy: Arc<Proxy>) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "outbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(outbound::handle(proxy, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(30))
                .serve_connection(TokioIo::new(tcp), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "outbound connection ended");
            }
        });
    }
}

/// Serves the inbound listener forever: mTLS with an agent of our trust domain, then HTTP/1.1,
/// or HTTP/2 when the caller's sidecar asked for it (ALPN `h2`: its calls past its HTTP/1.1
/// connections, or a sidecar of an earlier release).
pub async fn serve_inbound(listener: TcpListener, proxy: Arc<Proxy>) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "inbound accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let config = match proxy.tls.server_config() {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!(%remote, error = %e, "refusing inbound connection: not ready");
                    return;
                }
            };
            let tls = match tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                TlsAcceptor::from(config).accept(tcp),
            )
            .await
            {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::info!(%remote, error = %e, "inbound TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, "inbound TLS handshake timed out");
                    return;
                }
            };
            let peer = peer_spiffe_id(tls.get_ref().1);
            let h2 = tls.get_ref().1.alpn_protocol() == Some(ALPN_H2);
            proxy.metrics.inbound_connection(h2);
            let svc = hyper::service::service_fn(move |req| {
                let proxy = proxy.clone();
                let peer = peer.clone();
                async move { Ok::<_, Infallible>(inbound::handle(proxy, peer, req).await) }
            });
            let served = if h2 {
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(30))
                    .serve_connection(TokioIo::new(tls), svc)
                    .await
            } else {
                hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(30))
                    .serve_connection(TokioIo::new(tls), svc)
                    .await
            };
            if let Err(e) = served {
                tracing::debug!(%remote, error = %e, "inbound connection ended");
            }
        });
    }
}
