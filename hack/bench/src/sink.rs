//! A loopback OTLP/HTTP sink: takes `POST /v1/traces` (any body), answers 200 with an empty
//! `ExportTraceServiceResponse` (an empty protobuf message), and counts what it took, so the
//! suite's "+tracing" rung pays for real span export and can show the spans arrived.
//! `GET /stats` answers `{"exports":N,"bytes":M}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value = "127.0.0.1:18318")]
    listen: SocketAddr,
}

/// What the sink has taken so far.
#[derive(Default)]
pub struct Counts {
    exports: AtomicU64,
    bytes: AtomicU64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        serve(listener, Arc::default()).await
    })
}

/// Serves until the listener fails.
pub async fn serve(listener: TcpListener, counts: Arc<Counts>) -> anyhow::Result<()> {
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let counts = counts.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, counts.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    counts: Arc<Counts>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (status, content_type, payload) = match (method, path.as_str()) {
        (Method::POST, "/v1/traces") => {
            counts.exports.fetch_add(1, Ordering::Relaxed);
            counts.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            (StatusCode::OK, "application/x-protobuf", Bytes::new())
        }
        (Method::GET, "/stats") => {
            let stats = serde_json::json!({
                "exports": counts.exports.load(Ordering::Relaxed),
                "bytes": counts.bytes.load(Ordering::Relaxed),
            });
            (
                StatusCode::OK,
                "application/json",
                Bytes::from(stats.to_string()),
            )
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", Bytes::from_static(b"")),
    };
    let mut resp = Response::new(Full::new(payload));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_sink_takes_span_exports_and_counts_them() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, Arc::default()));
        let export = exchange(
            addr,
            "POST /v1/traces HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-protobuf\r\ncontent-length: 5\r\nconnection: close\r\n\r\nspans",
        )
        .await;
        assert!(export.starts_with("HTTP/1.1 200"), "{export}");
        assert!(export.contains("application/x-protobuf"), "{export}");
        let stats = exchange(
            addr,
            "GET /stats HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        let (_, body) = stats.split_once("\r\n\r\n").unwrap();
        let stats: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(stats, serde_json::json!({"exports": 1, "bytes": 5}));
        let other = exchange(
            addr,
            "GET /v1/metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    }
}
