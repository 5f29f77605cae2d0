//! A canned upstream: answers A2A JSON-RPC with a completed task, OpenAI chat completions with
//! a fixed completion (usage included), and `"stream": true` chat requests with an SSE stream
//! whose last event carries usage. Anything else gets the chat completion.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value = "127.0.0.1:18000")]
    listen: SocketAddr,
    /// Delay every response by this many milliseconds (a model's think time).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
}

pub const A2A_RESPONSE: &str = r#"{"jsonrpc":"2.0","id":"req-0001","result":{"kind":"task","id":"task-1","contextId":"ctx-42","status":{"state":"completed"},"artifacts":[{"artifactId":"a1","parts":[{"kind":"text","text":"Approved under clause 4.2; amount within delegated limit."}]}]}}"#;
pub const CHAT_RESPONSE: &str = r#"{"id":"chatcmpl-mock","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","system_fingerprint":"fp_mock","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from the mock upstream. This is a short canned completion."},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":250,"completion_tokens":14,"total_tokens":264}}"#;

fn sse() -> String {
    let mut out = String::new();
    for word in [
        "Hello",
        " from",
        " the",
        " mock",
        " upstream",
        ".",
        " A",
        " short",
        " stream",
    ] {
        out.push_str(&format!("data: {{\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}},\"finish_reason\":null}}]}}\n\n"));
    }
    out.push_str("data: {\"id\":\"chatcmpl-mock\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"gpt-4o-mini\",\"choices\":[],\"usage\":{\"prompt_tokens\":250,\"completion_tokens\":9,\"total_tokens\":259}}\n\ndata: [DONE]\n\n");
    out
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let delay = Duration::from_millis(args.delay_ms);
    let sse = Bytes::from(sse());
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let sse = sse.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, delay, sse.clone()));
            // A client that goes away mid-request is not the mock's problem.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    delay: Duration,
    sse: Bytes,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let text = std::str::from_utf8(&body).unwrap_or_default();
    let (content_type, payload) = if text.contains("\"jsonrpc\"") || path.contains("a2a") {
        (
            "application/json",
            Bytes::from_static(A2A_RESPONSE.as_bytes()),
        )
    } else if text.contains("\"stream\":true") || text.contains("\"stream\": true") {
        ("text/event-stream", sse)
    } else {
        (
            "application/json",
            Bytes::from_static(CHAT_RESPONSE.as_bytes()),
        )
    };
    let mut resp = Response::new(Full::new(payload));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    Ok(resp)
}
