//! research lists the vault's tools and sees only those it may call, in JSON and in SSE however
//! the stream is cut.

use std::convert::Infallible;

use http_body_util::StreamBody;
use ringfence_crds::AgentKey;
use ringfence_crds::bundle::Bundle;
use serde_json::Value;

use super::*;
use crate::authz::Authorizer;

const LISTS_SECRETS: (&str, &str) = (
    "research-lists-secrets",
    r#"permit (principal == Agent::"research", action == Action::"call_tool", resource == Tool::"vault/list_secrets");"#,
);
const TOOLS: &str = r#"{"jsonrpc":"2.0","id":2,"result":{"tools":[{"name":"list_secrets","inputSchema":{"type":"object"}},{"name":"read_secret","inputSchema":{"type":"object"}}]}}"#;

fn policy() -> ToolPolicy {
    let content = crate::testing::bundle_content(
        &AgentKey::new("default", "research").unwrap(),
        &[LISTS_SECRETS],
    );
    let authorizer = Authorizer::build(&content.policy, &[]).unwrap();
    let snap = Snapshot::new(
        Bundle {
            version: 1,
            hash: String::new(),
            content,
        },
        authorizer,
    );
    ToolPolicy::new(Arc::new(snap), "vault", CallContext::default())
}

fn answer(content_type: &str) -> http::response::Parts {
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, "999")
        .body(())
        .unwrap()
        .into_parts()
        .0
}

fn chunks(
    parts: &[&str],
) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + use<>> {
    let frames: Vec<Result<Frame<Bytes>, Infallible>> = parts
        .iter()
        .map(|p| Ok(Frame::data(Bytes::from(p.to_string()))))
        .collect();
    StreamBody::new(futures_util::stream::iter(frames))
}

async fn text(resp: Response<Body>) -> String {
    assert!(resp.headers().get(header::CONTENT_LENGTH).is_none());
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn names(message: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(message).unwrap();
    v["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn research_may_call_list_secrets_and_not_read_secret() {
    let p = policy();
    assert!(p.allows("list_secrets"));
    assert!(!p.allows("read_secret"));
}

#[tokio::test]
async fn a_json_tools_list_shows_only_the_tools_research_may_call() {
    let resp = filter_answer(policy(), answer("application/json"), chunks(&[TOOLS]), true)
        .await
        .unwrap();
    assert_eq!(names(&text(resp).await), ["list_secrets"]);
}

#[tokio::test]
async fn an_sse_tools_list_is_filtered_event_by_event_however_the_stream_is_cut() {
    let stream = format!(
        "event: message\r\nid: 1\r\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\",\"params\":{{}}}}\r\n\r\nevent: message\r\ndata: {TOOLS}\r\n\r\n"
    );
    // Cut in every place at once: one byte per frame.
    let bytes: Vec<String> = stream.chars().map(String::from).collect();
    let cut: Vec<&str> = bytes.iter().map(String::as_str).collect();
    for frames in [vec![stream.as_str()], cut] {
        let resp = filter_answer(policy(), answer("text/event-stream"), chunks(&frames), true)
            .await
            .unwrap();
        let out = text(resp).await;
        let events: Vec<&str> = out.split("\r\n\r\n").collect();
        assert_eq!(events.len(), 3, "{out}");
        assert!(events[0].contains("notifications/progress"), "{out}");
        let data = events[1].strip_prefix("event: message\r\ndata: ").unwrap();
        assert_eq!(names(data), ["list_secrets"]);
    }
}

#[tokio::test]
async fn an_event_is_passed_on_as_soon_as_it_is_complete() {
    // The server keeps the stream open after its answer: the answer must not wait for its end.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let body = StreamBody::new(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (f, rx))
    }));
    let body = Box::pin(body);
    let resp = filter_answer(policy(), answer("text/event-stream"), body, true)
        .await
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from(format!("data: {TOOLS}\n\n")))))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
        .await
        .expect("the event arrives while the stream stays open")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    let first = String::from_utf8(first.to_vec()).unwrap();
    assert_eq!(
        names(first.trim().strip_prefix("data: ").unwrap()),
        ["list_secrets"]
    );
    drop(tx);
}

#[tokio::test]
async fn an_answer_that_cannot_be_read_is_refused_not_passed_on_unfiltered() {
    let err = filter_answer(
        policy(),
        answer("application/json"),
        chunks(&["{\"result\":{\"tools\":[{\"name\":\"read_secret\""]),
        true,
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.kind, Kind::Upstream);
    assert!(err.message.contains("vault"), "{}", err.message);
}

#[tokio::test]
async fn other_answers_of_the_session_stream_pass_untouched() {
    let resp = filter_answer(
        policy(),
        answer("application/json"),
        chunks(&["not json at all"]),
        false,
    )
    .await
    .unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&bytes[..], b"not json at all");
}

#[test]
fn only_tools_list_and_the_session_stream_are_read() {
    assert!(wants_filter(Some("tools/list"), &http::Method::POST));
    assert!(!wants_filter(Some("tools/call"), &http::Method::POST));
    assert!(wants_filter(None, &http::Method::GET));
    assert!(!wants_filter(None, &http::Method::DELETE));
}
