//! A mock LLM on loopback: OpenAI chat completions and Responses, Anthropic messages, plain and
//! streamed, each answering with known usage so tests can check what was counted.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;

use crate::free_port;
use crate::mesh::{App, AppBody, Received, json_response};

/// Usage every mock answer reports: chat and Responses 100 in / 50 out; Anthropic 10 plain input
/// + 20 cache writes + 30 cache reads, 40 out.
pub const CHAT_IN: u64 = 100;
pub const CHAT_OUT: u64 = 50;

/// Starts the mock; returns its address and the app (to read what it received).
pub async fn start() -> (SocketAddr, App) {
    let app = App::new();
    app.on(|r| async move { answer(&r) });
    serve(app).await
}

/// A provider that is down: every call is answered `status` with an OpenAI-style error body
/// naming the status, so a test can tell whose failure reached the app.
pub async fn start_failing(status: StatusCode) -> (SocketAddr, App) {
    let app = App::new();
    app.on(move |_r| async move {
        json_response(
            status,
            &serde_json::json!({"error": {"message": format!("mock provider answers {}", status.as_u16()), "type": "mock_error"}}).to_string(),
        )
    });
    serve(app).await
}

/// A provider that answers like [`start`], but only after `delay`.
pub async fn start_slow(delay: Duration) -> (SocketAddr, App) {
    let app = App::new();
    app.on(move |r| async move {
        tokio::time::sleep(delay).await;
        answer(&r)
    });
    serve(app).await
}

async fn serve(app: App) -> (SocketAddr, App) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let listener = TcpListener::bind(addr)
        .await
        .unwrap_or_else(|e| panic!("cannot bind the mock LLM: {e}"));
    tokio::spawn(app.clone().serve(listener));
    (addr, app)
}

fn sse(events: &[String]) -> Response<AppBody> {
    let mut body = String::new();
    for e in events {
        body.push_str(e);
        body.push_str("\n\n");
    }
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|n: Infallible| match n {})
            .boxed(),
    );
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("text/event-stream"),
    );
    r
}

fn answer(r: &Received) -> Response<AppBody> {
    let req: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    let model = req["model"].as_str().unwrap_or("gpt-4o-mini").to_owned();
    let stream = req["stream"] == true;
    let path = r.path.split('?').next().unwrap_or_default();
    if model == "truncated-usage" {
        // A body cut off inside its usage block, as a proxy dying mid-answer leaves it.
        return json_response(
            StatusCode::OK,
            r#"{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"hel"#,
        );
    }
    match (path, stream) {
        ("/v1/chat/completions", false) => json_response(StatusCode::OK, &serde_json::json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": CHAT_IN, "completion_tokens": CHAT_OUT, "total_tokens": CHAT_IN + CHAT_OUT}
        }).to_string()),
        ("/v1/chat/completions", true) => {
            let include = req["stream_options"]["include_usage"] == true;
            let chunk = |content: &str| format!("data: {}", serde_json::json!({"id":"c","object":"chat.completion.chunk","created":1,"model":model,"choices":[{"index":0,"delta":{"content":content},"finish_reason":null}],"usage":null}));
            let mut events = vec![chunk("hel"), chunk("lo")];
            if include {
                events.push(format!("data: {}", serde_json::json!({"id":"c","object":"chat.completion.chunk","created":1,"model":model,"choices":[],"usage":{"prompt_tokens":CHAT_IN,"completion_tokens":CHAT_OUT,"total_tokens":CHAT_IN + CHAT_OUT}})));
            }
            events.push("data: [DONE]".into());
            sse(&events)
        }
        ("/v1/responses", false) => json_response(StatusCode::OK, &serde_json::json!({
            "id": "resp_1", "object": "response", "model": model, "status": "completed",
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hello"}]}],
            "usage": {"input_tokens": CHAT_IN, "output_tokens": CHAT_OUT, "total_tokens": CHAT_IN + CHAT_OUT, "input_tokens_details": {"cached_tokens": 0}}
        }).to_string()),
        ("/v1/responses", true) => sse(&[
            format!("event: response.created\ndata: {}", serde_json::json!({"type":"response.created","response":{"id":"resp_1","status":"in_progress","model":model}})),
            format!("event: response.output_text.delta\ndata: {}", serde_json::json!({"type":"response.output_text.delta","delta":"hello"})),
            format!("event: response.completed\ndata: {}", serde_json::json!({"type":"response.completed","response":{"id":"resp_1","status":"completed","model":model,"usage":{"input_tokens":CHAT_IN,"output_tokens":CHAT_OUT,"total_tokens":CHAT_IN + CHAT_OUT}}})),
        ]),
        ("/v1/messages", false) => json_response(StatusCode::OK, &serde_json::json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 10, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 30, "output_tokens": 40}
        }).to_string()),
        ("/v1/messages", true) => sse(&[
            format!("event: message_start\ndata: {}", serde_json::json!({"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":model,"content":[],"usage":{"input_tokens":10,"cache_creation_input_tokens":20,"cache_read_input_tokens":30,"output_tokens":1}}})),
            format!("event: content_block_delta\ndata: {}", serde_json::json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hello"}})),
            format!("event: message_delta\ndata: {}", serde_json::json!({"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":40}})),
            format!("event: message_stop\ndata: {}", serde_json::json!({"type":"message_stop"})),
        ]),
        _ => json_response(StatusCode::NOT_FOUND, r#"{"error":"no such mock route"}"#),
    }
}
