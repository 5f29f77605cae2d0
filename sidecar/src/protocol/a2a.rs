//! A2A, as found in the wild: v1.0 and v0.3, over JSON-RPC and over the HTTP+JSON binding.
//!
//! - [`A2aMethod`] names an operation under either spelling (`SendMessage` / `message/send`).
//! - [`A2aMethod::from_http`] recognises the HTTP+JSON binding's routes (`POST /message:send`,
//!   `GET /tasks/{id}`, …) by their tail, so an interface URL with a base path (`/a2a/json`), a
//!   tenant segment (`/{tenant}/message:send`) or v0.3's `/v1` prefix all match.
//! - [`inspect`] reads the task, context and message ids for tracing and the ledger. They are
//!   informative: a field of the wrong type reads as absent, never as an error. (A2A's
//!   `contextId` is a conversation, not a Ringfence run.)
//! - [`rewrite_card`] points an agent card's interface URLs back through the sidecar, so a client
//!   that posts to the URL in the card (as a2a-sdk does) stays inside the mesh.
//!
//! Spec: A2A v1.0 §5.3 (method mapping), §8 (agent card), §9 (JSON-RPC), §11 (HTTP+JSON);
//! A2A v0.3 §3.5.6 (method mapping), §5.6 (url / additionalInterfaces).

use serde::Deserialize;
use serde_json::value::RawValue;

use super::jsonrpc::{self, Envelope, LenientObj, LenientStr};

/// An A2A operation, whichever protocol version named it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum A2aMethod {
    SendMessage,
    SendStreamingMessage,
    GetTask,
    ListTasks,
    CancelTask,
    SubscribeToTask,
    CreateTaskPushNotificationConfig,
    GetTaskPushNotificationConfig,
    ListTaskPushNotificationConfigs,
    DeleteTaskPushNotificationConfig,
    GetExtendedAgentCard,
}

/// Which spelling a JSON-RPC method name used. It decides where some ids live: v0.3's push
/// config requests carry the task in `params.id`, v1.0's in `params.taskId`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    V1,
    V0_3,
}

impl A2aMethod {
    /// Every operation, for tables and tests.
    pub const ALL: [A2aMethod; 11] = [
        Self::SendMessage,
        Self::SendStreamingMessage,
        Self::GetTask,
        Self::ListTasks,
        Self::CancelTask,
        Self::SubscribeToTask,
        Self::CreateTaskPushNotificationConfig,
        Self::GetTaskPushNotificationConfig,
        Self::ListTaskPushNotificationConfigs,
        Self::DeleteTaskPushNotificationConfig,
        Self::GetExtendedAgentCard,
    ];

    /// Recognises a JSON-RPC method name in either spelling.
    pub fn from_jsonrpc(method: &str) -> Option<Self> {
        Self::from_jsonrpc_spelled(method).map(|(method, _)| method)
    }

    fn from_jsonrpc_spelled(method: &str) -> Option<(Self, Spelling)> {
        use Spelling::{V0_3, V1};
        Some(match method {
            "SendMessage" => (Self::SendMessage, V1),
            "SendStreamingMessage" => (Self::SendStreamingMessage, V1),
            "GetTask" => (Self::GetTask, V1),
            "ListTasks" => (Self::ListTasks, V1),
            "CancelTask" => (Self::CancelTask, V1),
            "SubscribeToTask" => (Self::SubscribeToTask, V1),
            "CreateTaskPushNotificationConfig" => (Self::CreateTaskPushNotificationConfig, V1),
            "GetTaskPushNotificationConfig" => (Self::GetTaskPushNotificationConfig, V1),
            // The spec says `…Configs`; some 1.0 pre-releases and gRPC stubs say `…Config`.
            "ListTaskPushNotificationConfigs" | "ListTaskPushNotificationConfig" => {
                (Self::ListTaskPushNotificationConfigs, V1)
            }
            "DeleteTaskPushNotificationConfig" => (Self::DeleteTaskPushNotificationConfig, V1),
            "GetExtendedAgentCard" => (Self::GetExtendedAgentCard, V1),
            "message/send" => (Self::SendMessage, V0_3),
            "message/stream" => (Self::SendStreamingMessage, V0_3),
            "tasks/get" => (Self::GetTask, V0_3),
            // v0.3 defines tasks/list for gRPC and REST only, but JSON-RPC servers accept it.
            "tasks/list" => (Self::ListTasks, V0_3),
            "tasks/cancel" => (Self::CancelTask, V0_3),
            "tasks/resubscribe" => (Self::SubscribeToTask, V0_3),
            "tasks/pushNotificationConfig/set" => (Self::CreateTaskPushNotificationConfig, V0_3),
            "tasks/pushNotificationConfig/get" => (Self::GetTaskPushNotificationConfig, V0_3),
            "tasks/pushNotificationConfig/list" => (Self::ListTaskPushNotificationConfigs, V0_3),
            "tasks/pushNotificationConfig/delete" => (Self::DeleteTaskPushNotificationConfig, V0_3),
            "agent/getAuthenticatedExtendedCard" => (Self::GetExtendedAgentCard, V0_3),
            _ => return None,
        })
    }

    /// The canonical (v1.0) name, for spans, metrics and policy.
    pub fn name(self) -> &'static str {
        match self {
            Self::SendMessage => "SendMessage",
            Self::SendStreamingMessage => "SendStreamingMessage",
            Self::GetTask => "GetTask",
            Self::ListTasks => "ListTasks",
            Self::CancelTask => "CancelTask",
            Self::SubscribeToTask => "SubscribeToTask",
            Self::CreateTaskPushNotificationConfig => "CreateTaskPushNotificationConfig",
            Self::GetTaskPushNotificationConfig => "GetTaskPushNotificationConfig",
            Self::ListTaskPushNotificationConfigs => "ListTaskPushNotificationConfigs",
            Self::DeleteTaskPushNotificationConfig => "DeleteTaskPushNotificationConfig",
            Self::GetExtendedAgentCard => "GetExtendedAgentCard",
        }
    }

    /// The v0.3 JSON-RPC name.
    pub fn v0_3_name(self) -> &'static str {
        match self {
            Self::SendMessage => "message/send",
            Self::SendStreamingMessage => "message/stream",
            Self::GetTask => "tasks/get",
            Self::ListTasks => "tasks/list",
            Self::CancelTask => "tasks/cancel",
            Self::SubscribeToTask => "tasks/resubscribe",
            Self::CreateTaskPushNotificationConfig => "tasks/pushNotificationConfig/set",
            Self::GetTaskPushNotificationConfig => "tasks/pushNotificationConfig/get",
            Self::ListTaskPushNotificationConfigs => "tasks/pushNotificationConfig/list",
            Self::DeleteTaskPushNotificationConfig => "tasks/pushNotificationConfig/delete",
            Self::GetExtendedAgentCard => "agent/getAuthenticatedExtendedCard",
        }
    }

    /// The response is a Server-Sent Events stream: pass it through unbuffered.
    pub fn is_streaming(self) -> bool {
        matches!(self, Self::SendStreamingMessage | Self::SubscribeToTask)
    }

    /// Repeating the call has no further effect (spec §3.3.1: reads, and cancel), so a retry
    /// cannot do work twice. Sending a message is not: the agent may act on it again.
    pub fn is_idempotent(self) -> bool {
        match self {
            Self::GetTask
            | Self::ListTasks
            | Self::CancelTask
            | Self::SubscribeToTask
            | Self::GetTaskPushNotificationConfig
            | Self::ListTaskPushNotificationConfigs
            | Self::DeleteTaskPushNotificationConfig
            | Self::GetExtendedAgentCard => true,
            Self::SendMessage
            | Self::SendStreamingMessage
            | Self::CreateTaskPushNotificationConfig => false,
        }
    }

    /// Recognises an HTTP+JSON binding route and the task id in its path.
    ///
    /// `path` is the request path after the proxy's own `/agents/<name>` prefix. Routes are
    /// matched by their tail, so whatever precedes them (the interface URL's base path, a
    /// `{tenant}` segment, v0.3's `/v1`) does not matter. A query string is ignored; the task
    /// id is percent-decoded.
    pub fn from_http(method: &http::Method, path: &str) -> Option<(Self, Option<String>)> {
        Self::from_http_parts(method.as_str(), path)
    }

    /// [`from_http`](Self::from_http) with the HTTP method as text (`"POST"`).
    pub fn from_http_parts(method: &str, path: &str) -> Option<(Self, Option<String>)> {
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let mut tail = path.rsplit('/').filter(|segment| !segment.is_empty());
        let last = tail.next()?;
        let prev = tail.next();
        let prev2 = tail.next();
        let prev3 = tail.next();
        let task = |segment: &str| Some(percent_decode(segment));

        let route = match (method, last) {
            ("POST", "message:send") => (Self::SendMessage, None),
            ("POST", "message:stream") => (Self::SendStreamingMessage, None),
            ("GET", "extendedAgentCard") => (Self::GetExtendedAgentCard, None),
            ("GET", "card") if prev == Some("v1") => (Self::GetExtendedAgentCard, None),
            ("POST", "pushNotificationConfigs") if prev2 == Some("tasks") => {
                (Self::CreateTaskPushNotificationConfig, task(prev?))
            }
            ("GET", "pushNotificationConfigs") if prev2 == Some("tasks") => {
                (Self::ListTaskPushNotificationConfigs, task(prev?))
            }
            ("GET", _) if prev == Some("pushNotificationConfigs") && prev3 == Some("tasks") => {
                (Self::GetTaskPushNotificationConfig, task(prev2?))
            }
            ("DELETE", _) if prev == Some("pushNotificationConfigs") && prev3 == Some("tasks") => {
                (Self::DeleteTaskPushNotificationConfig, task(prev2?))
            }
            ("GET", "tasks") => (Self::ListTasks, None),
            (verb, segment) if prev == Some("tasks") => match segment.rsplit_once(':') {
                Some((id, "cancel")) if verb == "POST" => (Self::CancelTask, task(id)),
                // The v1.0 spec text says POST, its proto says GET; a2a-sdk serves both.
                Some((id, "subscribe")) if verb == "POST" || verb == "GET" => {
                    (Self::SubscribeToTask, task(id))
                }
                None if verb == "GET" => (Self::GetTask, task(segment)),
                _ => return None,
            },
            _ => return None,
        };
        Some(route)
    }
}

/// What a call says about the task it belongs to. Every field is optional: absent or mistyped
/// fields read as `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct A2aCall {
    /// `None` when the method is not an A2A operation (an extension method, say).
    pub method: Option<A2aMethod>,
    pub task_id: Option<String>,
    /// A2A's conversation id. Not a Ringfence run.
    pub context_id: Option<String>,
    pub message_id: Option<String>,
}

/// Reads an A2A JSON-RPC request body. A body that is not a JSON-RPC request yields an empty
/// [`A2aCall`]; use [`jsonrpc::parse_request`] first to refuse it with a reason.
pub fn inspect(body: &[u8]) -> A2aCall {
    jsonrpc::parse_request(body)
        .map(|env| inspect_envelope(&env))
        .unwrap_or_default()
}

/// Reads an A2A call out of an already parsed JSON-RPC envelope.
pub fn inspect_envelope(env: &Envelope<'_>) -> A2aCall {
    match A2aMethod::from_jsonrpc_spelled(&env.method) {
        Some((method, spelling)) => call_from_params(method, spelling, env.params),
        None => A2aCall::default(),
    }
}

/// Reads an HTTP+JSON binding request: the route names the method and (for task routes) the
/// task; a `message:send` / `message:stream` body carries the message ids. `None` when the route
/// is not an A2A route.
pub fn inspect_http(method: &http::Method, path: &str, body: &[u8]) -> Option<A2aCall> {
    inspect_http_parts(method.as_str(), path, body)
}

/// [`inspect_http`] with the HTTP method as text (`"POST"`).
pub fn inspect_http_parts(method: &str, path: &str, body: &[u8]) -> Option<A2aCall> {
    let (operation, path_task) = A2aMethod::from_http_parts(method, path)?;
    let mut call = match operation {
        A2aMethod::SendMessage | A2aMethod::SendStreamingMessage => {
            // The body is the bare SendMessageRequest: what JSON-RPC carries in `params`.
            let params = std::str::from_utf8(body)
                .ok()
                .and_then(|text| serde_json::from_str::<&RawValue>(text).ok());
            call_from_params(operation, Spelling::V1, params)
        }
        _ => A2aCall {
            method: Some(operation),
            ..A2aCall::default()
        },
    };
    if path_task.is_some() {
        call.task_id = path_task;
    }
    Some(call)
}

#[derive(Deserialize, Default)]
struct Params<'a> {
    #[serde(default, borrow)]
    message: LenientObj<MessageIds<'a>>,
    #[serde(default, borrow)]
    id: LenientStr<'a>,
    #[serde(default, borrow, rename = "taskId", alias = "task_id")]
    task_id: LenientStr<'a>,
    #[serde(default, borrow, rename = "contextId", alias = "context_id")]
    context_id: LenientStr<'a>,
}

#[derive(Deserialize, Default)]
struct MessageIds<'a> {
    #[serde(default, borrow, rename = "messageId", alias = "message_id")]
    message_id: LenientStr<'a>,
    #[serde(default, borrow, rename = "taskId", alias = "task_id")]
    task_id: LenientStr<'a>,
    #[serde(default, borrow, rename = "contextId", alias = "context_id")]
    context_id: LenientStr<'a>,
}

fn call_from_params(method: A2aMethod, spelling: Spelling, params: Option<&RawValue>) -> A2aCall {
    let params: Params<'_> = params
        .and_then(|raw| serde_json::from_str(raw.get()).ok())
        .unwrap_or_default();
    let mut call = A2aCall {
        method: Some(method),
        ..A2aCall::default()
    };
    match method {
        A2aMethod::SendMessage | A2aMethod::SendStreamingMessage => {
            if let Some(message) = params.message.0 {
                call.message_id = message.message_id.into_string();
                call.task_id = message.task_id.into_string();
                call.context_id = message.context_id.into_string();
            }
        }
        A2aMethod::GetTask | A2aMethod::CancelTask | A2aMethod::SubscribeToTask => {
            call.task_id = params.id.into_string();
        }
        A2aMethod::ListTasks => call.context_id = params.context_id.into_string(),
        A2aMethod::CreateTaskPushNotificationConfig => call.task_id = params.task_id.into_string(),
        A2aMethod::GetTaskPushNotificationConfig
        | A2aMethod::ListTaskPushNotificationConfigs
        | A2aMethod::DeleteTaskPushNotificationConfig => {
            call.task_id = match spelling {
                Spelling::V1 => params.task_id.into_string(),
                Spelling::V0_3 => params.id.into_string(),
            };
        }
        A2aMethod::GetExtendedAgentCard => {}
    }
    call
}

/// Decodes `%XX` escapes in a path segment. A segment that does not decode to UTF-8 is kept as
/// written.
fn percent_decode(segment: &str) -> String {
    if !segment.contains('%') {
        return segment.to_owned();
    }
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let escaped = (byte == b'%')
            .then(|| Some((hex(*bytes.get(i + 1)?)?, hex(*bytes.get(i + 2)?)?)))
            .flatten();
        match escaped {
            Some((high, low)) => {
                out.push(high << 4 | low);
                i += 3;
            }
            None => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| segment.to_owned())
}

fn hex(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// The well-known path of an agent card: `/.well-known/agent-card.json` (v0.3 and v1.0) or the
/// legacy `/.well-known/agent.json` (v0.2). A card served under a base path
/// (`/a2a/.well-known/agent-card.json`) counts too; a query string is ignored.
///
/// The extended card (`GET /extendedAgentCard`, v0.3 `GET /v1/card`, JSON-RPC
/// `GetExtendedAgentCard`) is a card as well: [`A2aMethod::from_http`] and
/// [`A2aMethod::from_jsonrpc`] recognise it, and [`rewrite_card`] rewrites its response.
pub fn is_card_path(path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    path.ends_with("/.well-known/agent-card.json") || path.ends_with("/.well-known/agent.json")
}

/// Why a card could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub enum CardError {
    #[error(
        "the agent card is not valid JSON, or names a member twice ({0}); check what the agent \
         serves as its card"
    )]
    Json(serde_json::Error),
    #[error("the agent card is not a JSON object; check what the agent serves as its card")]
    NotAnObject,
}

/// The members of a card (or of a JSON-RPC response carrying one) that hold endpoint URLs.
#[derive(Deserialize)]
struct CardSlots<'a> {
    #[serde(default, borrow, deserialize_with = "jsonrpc::present_borrowed")]
    jsonrpc: Option<&'a RawValue>,
    #[serde(default, borrow)]
    result: Option<&'a RawValue>,
    #[serde(default, borrow)]
    url: Option<&'a RawValue>,
    #[serde(default, borrow, rename = "supportedInterfaces")]
    supported_interfaces: Option<&'a RawValue>,
    #[serde(default, borrow, rename = "additionalInterfaces")]
    additional_interfaces: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct InterfaceSlot<'a> {
    #[serde(default, borrow)]
    url: Option<&'a RawValue>,
}

/// Rewrites every interface URL in an agent card: v1.0 `supportedInterfaces[].url`, v0.3 `url`
/// and `additionalInterfaces[].url` (a card may carry both generations). `rewrite` gets each URL
/// and returns its replacement, or `None` to leave it as it is (a gRPC `host:port`, say).
///
/// Also accepts a JSON-RPC response whose `result` is a card (`GetExtendedAgentCard`,
/// `agent/getAuthenticatedExtendedCard`); a JSON-RPC error response comes back unchanged.
///
/// The URLs are spliced in place: every other byte of the card stays as the agent served it
/// (`provider.url`, `iconUrl`, `documentationUrl` are not endpoints the client calls, and stay).
/// A card that names one of these members twice is refused, since clients disagree on which
/// copy wins and one of them would bypass the mesh. A card carrying `signatures` no longer
/// matches them once rewritten: a client that verifies card signatures will refuse it.
pub fn rewrite_card(
    body: &[u8],
    rewrite: impl Fn(&str) -> Option<String>,
) -> Result<Vec<u8>, CardError> {
    if jsonrpc::first_byte(body) != Some(b'{') {
        // Still tell broken JSON from a JSON value that is not an object.
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Ok(_) => CardError::NotAnObject,
                Err(err) => CardError::Json(err),
            },
        );
    }
    let top: CardSlots<'_> = serde_json::from_slice(body).map_err(CardError::Json)?;
    let card = if top.jsonrpc.is_some() {
        match top.result {
            Some(result) if jsonrpc::json_kind(result.get()) == "an object" => {
                serde_json::from_str(result.get()).map_err(CardError::Json)?
            }
            _ => return Ok(body.to_vec()),
        }
    } else {
        top
    };

    let mut edits = Vec::new();
    let mut visit = |slot: &RawValue| -> Result<(), CardError> {
        let Ok(url) = serde_json::from_str::<String>(slot.get()) else {
            return Ok(()); // not a string: not ours to fix
        };
        if let Some(new) = rewrite(&url) {
            let at = jsonrpc::span_in(body, slot.get()).ok_or(CardError::NotAnObject)?;
            let with = serde_json::to_string(&new).map_err(CardError::Json)?;
            edits.push(jsonrpc::Edit { at, with });
        }
        Ok(())
    };
    if let Some(url) = card.url {
        visit(url)?;
    }
    for list in [card.supported_interfaces, card.additional_interfaces]
        .into_iter()
        .flatten()
    {
        let Ok(interfaces) = serde_json::from_str::<Vec<&RawValue>>(list.get()) else {
            continue; // not an array
        };
        for interface in interfaces {
            if jsonrpc::json_kind(interface.get()) != "an object" {
                continue;
            }
            let slot: InterfaceSlot<'_> =
                serde_json::from_str(interface.get()).map_err(CardError::Json)?;
            if let Some(url) = slot.url {
                visit(url)?;
            }
        }
    }
    jsonrpc::splice(body, edits).ok_or(CardError::NotAnObject)
}

/// Maps an agent's own URL to the same path behind the sidecar's outbound listener:
/// `http://127.0.0.1:18102/a2a/v1` with base `http://127.0.0.1:15001` and agent `research`
/// becomes `http://127.0.0.1:15001/agents/research/a2a/v1`. The path, query and fragment after
/// the authority are kept.
///
/// `None` when `original` is not an absolute http(s) URL (a gRPC `host:port`), when
/// `outbound_base` is not one, or when `agent` is not a plain name.
pub fn mesh_url(original: &str, outbound_base: &str, agent: &str) -> Option<String> {
    let rest = strip_http_scheme(original)?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    if authority.is_empty() {
        return None;
    }
    strip_http_scheme(outbound_base).filter(|base| !base.is_empty())?;
    let agent_is_plain = !agent.is_empty()
        && agent
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if !agent_is_plain {
        return None;
    }
    let base = outbound_base.trim_end_matches('/');
    Some(format!("{base}/agents/{agent}{tail}"))
}

fn strip_http_scheme(url: &str) -> Option<&str> {
    ["https://", "http://"].iter().find_map(|scheme| {
        let head = url.get(..scheme.len())?;
        head.eq_ignore_ascii_case(scheme)
            .then(|| url.get(scheme.len()..))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;
    use serde_json::{Value, json};

    fn card_json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).expect("card output is JSON")
    }

    fn through_mesh(url: &str) -> Option<String> {
        mesh_url(url, "http://127.0.0.1:15001", "research")
    }

    #[test]
    fn both_spellings_of_send_message_are_recognised() {
        assert_eq!(
            A2aMethod::from_jsonrpc("SendMessage"),
            Some(A2aMethod::SendMessage)
        );
        assert_eq!(
            A2aMethod::from_jsonrpc("message/send"),
            Some(A2aMethod::SendMessage)
        );
        assert_eq!(
            A2aMethod::from_jsonrpc("message/send ").map(A2aMethod::name),
            None
        );
        assert_eq!(A2aMethod::from_jsonrpc("sendMessage"), None);
    }

    #[test]
    fn every_method_round_trips_through_both_names() {
        for method in A2aMethod::ALL {
            assert_eq!(A2aMethod::from_jsonrpc(method.name()), Some(method));
            assert_eq!(A2aMethod::from_jsonrpc(method.v0_3_name()), Some(method));
        }
    }

    #[test]
    fn streaming_and_idempotent_methods_are_told_apart() {
        let streaming: Vec<_> = A2aMethod::ALL
            .into_iter()
            .filter(|m| m.is_streaming())
            .collect();
        assert_eq!(
            streaming,
            [A2aMethod::SendStreamingMessage, A2aMethod::SubscribeToTask]
        );
        assert!(!A2aMethod::SendMessage.is_idempotent());
        assert!(A2aMethod::GetTask.is_idempotent());
        assert!(A2aMethod::CancelTask.is_idempotent());
    }

    #[test]
    fn a_v1_send_message_yields_its_message_task_and_context() {
        let body = br#"{"jsonrpc": "2.0", "method": "SendMessage", "params": {"message": {"messageId": "m-1", "contextId": "ctx-9", "taskId": "task-3", "role": "ROLE_USER", "parts": [{"text": "book a flight"}, {"url": "https://example.com/a.pdf", "mediaType": "application/pdf"}]}, "configuration": {"acceptedOutputModes": ["text/plain"]}}, "id": "r1"}"#;
        assert_eq!(
            inspect(body),
            A2aCall {
                method: Some(A2aMethod::SendMessage),
                task_id: Some("task-3".into()),
                context_id: Some("ctx-9".into()),
                message_id: Some("m-1".into()),
            }
        );
    }

    #[test]
    fn a_v0_3_message_stream_yields_its_ids() {
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"message/stream","params":{"message":{"role":"user","parts":[{"kind":"text","text":"hi"}],"messageId":"m-2","contextId":"ctx-1","kind":"message"},"metadata":{}}}"#;
        let call = inspect(body);
        assert_eq!(call.method, Some(A2aMethod::SendStreamingMessage));
        assert_eq!(call.message_id.as_deref(), Some("m-2"));
        assert_eq!(call.context_id.as_deref(), Some("ctx-1"));
        assert_eq!(call.task_id, None);
    }

    #[test]
    fn get_task_reads_the_task_from_params_id_in_both_versions() {
        for method in ["GetTask", "tasks/get"] {
            let body = format!(
                r#"{{"jsonrpc":"2.0","id":2,"method":"{method}","params":{{"id":"task-uuid","historyLength":10}}}}"#
            );
            let call = inspect(body.as_bytes());
            assert_eq!(call.method, Some(A2aMethod::GetTask));
            assert_eq!(call.task_id.as_deref(), Some("task-uuid"));
        }
    }

    #[test]
    fn push_config_requests_find_the_task_where_each_version_puts_it() {
        let v1 = br#"{"jsonrpc":"2.0","id":1,"method":"GetTaskPushNotificationConfig","params":{"taskId":"t-1","id":"cfg-1"}}"#;
        assert_eq!(inspect(v1).task_id.as_deref(), Some("t-1"));
        let v03 = br#"{"jsonrpc":"2.0","id":1,"method":"tasks/pushNotificationConfig/get","params":{"id":"t-1","pushNotificationConfigId":"cfg-1"}}"#;
        assert_eq!(inspect(v03).task_id.as_deref(), Some("t-1"));
    }

    #[test]
    fn absent_or_mistyped_ids_read_as_absent() {
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"SendMessage","params":{"message":{"messageId":42,"taskId":null,"contextId":["x"]}}}"#;
        let call = inspect(body);
        assert_eq!(call.method, Some(A2aMethod::SendMessage));
        assert_eq!(
            (call.task_id, call.context_id, call.message_id),
            (None, None, None)
        );
        let body =
            br#"{"jsonrpc":"2.0","id":1,"method":"SendMessage","params":{"message":"hello"}}"#;
        assert_eq!(inspect(body).message_id, None);
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"GetExtendedAgentCard"}"#;
        assert_eq!(inspect(body).method, Some(A2aMethod::GetExtendedAgentCard));
    }

    #[test]
    fn an_unknown_method_or_unreadable_body_is_no_a2a_call() {
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"myorg.ext/action","params":{}}"#;
        assert_eq!(inspect(body), A2aCall::default());
        assert_eq!(
            inspect(b"{\"jsonrpc\":\"2.0\",\"method\":\"SendMess"),
            A2aCall::default()
        );
    }

    #[test]
    fn rest_routes_are_recognised_under_any_base_path() {
        let cases: [(&Method, &str, A2aMethod, Option<&str>); 12] = [
            (&Method::POST, "/message:send", A2aMethod::SendMessage, None),
            (
                &Method::POST,
                "/a2a/json/message:stream",
                A2aMethod::SendStreamingMessage,
                None,
            ),
            (&Method::GET, "/tasks/t-1", A2aMethod::GetTask, Some("t-1")),
            (
                &Method::GET,
                "/tasks?contextId=c",
                A2aMethod::ListTasks,
                None,
            ),
            (
                &Method::POST,
                "/tenant-a/tasks/t-1:cancel",
                A2aMethod::CancelTask,
                Some("t-1"),
            ),
            (
                &Method::POST,
                "/tasks/t-1:subscribe",
                A2aMethod::SubscribeToTask,
                Some("t-1"),
            ),
            (
                &Method::GET,
                "/tasks/t-1:subscribe",
                A2aMethod::SubscribeToTask,
                Some("t-1"),
            ),
            (
                &Method::POST,
                "/tasks/t-1/pushNotificationConfigs",
                A2aMethod::CreateTaskPushNotificationConfig,
                Some("t-1"),
            ),
            (
                &Method::GET,
                "/tasks/t-1/pushNotificationConfigs",
                A2aMethod::ListTaskPushNotificationConfigs,
                Some("t-1"),
            ),
            (
                &Method::GET,
                "/tasks/t-1/pushNotificationConfigs/c-1",
                A2aMethod::GetTaskPushNotificationConfig,
                Some("t-1"),
            ),
            (
                &Method::DELETE,
                "/v1/tasks/t-1/pushNotificationConfigs/c-1",
                A2aMethod::DeleteTaskPushNotificationConfig,
                Some("t-1"),
            ),
            (
                &Method::GET,
                "/extendedAgentCard",
                A2aMethod::GetExtendedAgentCard,
                None,
            ),
        ];
        for (verb, path, method, task) in cases {
            assert_eq!(
                A2aMethod::from_http(verb, path),
                Some((method, task.map(str::to_owned))),
                "{verb} {path}"
            );
        }
    }

    #[test]
    fn v0_3_rest_routes_under_v1_are_recognised() {
        assert_eq!(
            A2aMethod::from_http(&Method::POST, "/v1/message:send"),
            Some((A2aMethod::SendMessage, None))
        );
        assert_eq!(
            A2aMethod::from_http(&Method::GET, "/v1/card"),
            Some((A2aMethod::GetExtendedAgentCard, None))
        );
        assert_eq!(A2aMethod::from_http(&Method::GET, "/card"), None);
    }

    #[test]
    fn the_wrong_verb_or_an_unknown_route_is_not_a2a() {
        assert_eq!(A2aMethod::from_http(&Method::GET, "/message:send"), None);
        assert_eq!(A2aMethod::from_http(&Method::DELETE, "/tasks/t-1"), None);
        assert_eq!(
            A2aMethod::from_http(&Method::POST, "/tasks/t-1:pause"),
            None
        );
        assert_eq!(A2aMethod::from_http(&Method::GET, "/"), None);
        assert_eq!(A2aMethod::from_http(&Method::GET, ""), None);
        assert_eq!(A2aMethod::from_http(&Method::GET, "/healthz"), None);
    }

    #[test]
    fn a_percent_encoded_task_id_is_decoded() {
        assert_eq!(
            A2aMethod::from_http(&Method::GET, "/tasks/a%20b%2"),
            Some((A2aMethod::GetTask, Some("a b%2".into())))
        );
        assert_eq!(percent_decode("%ff%fe"), "%ff%fe");
    }

    #[test]
    fn a_rest_send_message_reads_ids_from_the_bare_body() {
        let body = br#"{"message":{"messageId":"uuid","role":"ROLE_USER","parts":[{"text":"Hello"}],"contextId":"c-5"},"configuration":{"acceptedOutputModes":["text/plain"]}}"#;
        let call = inspect_http(&Method::POST, "/message:send", body).expect("a2a route");
        assert_eq!(call.method, Some(A2aMethod::SendMessage));
        assert_eq!(call.message_id.as_deref(), Some("uuid"));
        assert_eq!(call.context_id.as_deref(), Some("c-5"));
        let call = inspect_http(&Method::POST, "/tasks/t-9:cancel", b"").expect("a2a route");
        assert_eq!(call.task_id.as_deref(), Some("t-9"));
    }

    #[test]
    fn card_paths_are_recognised() {
        assert!(is_card_path("/.well-known/agent-card.json"));
        assert!(is_card_path("/.well-known/agent.json"));
        assert!(is_card_path("/a2a/.well-known/agent-card.json?v=1"));
        assert!(!is_card_path("/.well-known/agent-card.json/x"));
        assert!(!is_card_path("/message:send"));
    }

    #[test]
    fn an_upstream_url_maps_to_the_same_path_behind_the_sidecar() {
        assert_eq!(
            through_mesh("http://127.0.0.1:18102/a2a/v1").as_deref(),
            Some("http://127.0.0.1:15001/agents/research/a2a/v1")
        );
        assert_eq!(
            through_mesh("HTTPS://research.agents.svc:8443").as_deref(),
            Some("http://127.0.0.1:15001/agents/research")
        );
        assert_eq!(
            through_mesh("http://user@h/?q=1").as_deref(),
            Some("http://127.0.0.1:15001/agents/research/?q=1")
        );
        assert_eq!(
            mesh_url("http://h/x", "http://127.0.0.1:15001/", "research").as_deref(),
            Some("http://127.0.0.1:15001/agents/research/x")
        );
    }

    #[test]
    fn what_is_not_an_http_url_is_not_mapped() {
        assert_eq!(through_mesh("grpc.example.com:443"), None);
        assert_eq!(through_mesh("http://"), None);
        assert_eq!(through_mesh("http:/x"), None);
        assert_eq!(through_mesh("ftp://h/x"), None);
        assert_eq!(mesh_url("http://h/x", "127.0.0.1:15001", "research"), None);
        assert_eq!(
            mesh_url("http://h/x", "http://127.0.0.1:15001", "../admin"),
            None
        );
        assert_eq!(mesh_url("http://h/x", "http://127.0.0.1:15001", ""), None);
    }

    #[test]
    fn a_v1_cards_supported_interfaces_are_rewritten() {
        let card = br#"{
          "name": "GeoSpatial Route Planner Agent",
          "description": "Plans routes.",
          "supportedInterfaces": [
            {"url": "http://127.0.0.1:18102/a2a/v1", "protocolBinding": "JSONRPC", "protocolVersion": "1.0"},
            {"url": "georoute-agent.example.com:443", "protocolBinding": "GRPC", "protocolVersion": "1.0"},
            {"url": "http://127.0.0.1:18102/a2a/json", "protocolBinding": "HTTP+JSON", "protocolVersion": "1.0", "tenant": "t1"}
          ],
          "provider": {"organization": "Example Geo Services Inc.", "url": "https://www.examplegeoservices.com"},
          "version": "1.2.0",
          "documentationUrl": "https://docs.examplegeoservices.com/georoute-agent/api",
          "capabilities": {"streaming": true, "pushNotifications": true, "extendedAgentCard": true},
          "defaultInputModes": ["text/plain"],
          "defaultOutputModes": ["text/plain"],
          "skills": []
        }"#;
        let out = rewrite_card(card, through_mesh).expect("rewritten");
        let mut expected = card_json(card);
        expected["supportedInterfaces"][0]["url"] =
            json!("http://127.0.0.1:15001/agents/research/a2a/v1");
        expected["supportedInterfaces"][2]["url"] =
            json!("http://127.0.0.1:15001/agents/research/a2a/json");
        assert_eq!(card_json(&out), expected);
        // Member order survives, so the card still reads the way its author wrote it.
        let text = String::from_utf8(out).expect("utf-8");
        let name = text.find("\"name\"").expect("name");
        let skills = text.find("\"skills\"").expect("skills");
        assert!(name < skills);
    }

    #[test]
    fn a_v0_3_cards_url_points_back_through_the_mesh() {
        let card = br#"{
          "protocolVersion": "0.3.0",
          "name": "research",
          "description": "Finds things out.",
          "url": "http://127.0.0.1:18102/",
          "preferredTransport": "JSONRPC",
          "additionalInterfaces": [
            {"url": "http://127.0.0.1:18102/", "transport": "JSONRPC"},
            {"url": "http://127.0.0.1:18102/rest", "transport": "HTTP+JSON"}
          ],
          "iconUrl": "http://127.0.0.1:18102/icon.png",
          "version": "1.0.0",
          "capabilities": {"streaming": true},
          "defaultInputModes": ["text"],
          "defaultOutputModes": ["text"],
          "skills": [{"id": "search", "name": "search", "description": "web search", "tags": []}]
        }"#;
        let out = card_json(&rewrite_card(card, through_mesh).expect("rewritten"));
        assert_eq!(out["url"], json!("http://127.0.0.1:15001/agents/research/"));
        assert_eq!(
            out["additionalInterfaces"][1]["url"],
            json!("http://127.0.0.1:15001/agents/research/rest")
        );
        assert_eq!(out["iconUrl"], json!("http://127.0.0.1:18102/icon.png"));
        assert_eq!(out["preferredTransport"], json!("JSONRPC"));
        assert_eq!(out["skills"], card_json(card)["skills"]);
    }

    #[test]
    fn a_rewritten_card_keeps_every_other_byte() {
        let card = b"{\n  \"name\": \"r\",\n  \"url\" : \"http://h:1/a\\/b\",\n  \"n\": 1.10000000000000000001e400\n}";
        let out = rewrite_card(card, through_mesh).expect("rewritten");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "{\n  \"name\": \"r\",\n  \"url\" : \"http://127.0.0.1:15001/agents/research/a/b\",\n  \"n\": 1.10000000000000000001e400\n}"
        );
    }

    #[test]
    fn a_card_naming_its_url_twice_is_refused() {
        let card = br#"{"url":"http://127.0.0.1:18102/","url":"http://evil.example/"}"#;
        assert!(matches!(
            rewrite_card(card, through_mesh),
            Err(CardError::Json(_))
        ));
        let card = br#"{"supportedInterfaces":[{"url":"http://a/","url":"http://b/"}]}"#;
        assert!(matches!(
            rewrite_card(card, through_mesh),
            Err(CardError::Json(_))
        ));
    }

    #[test]
    fn an_extended_card_in_a_jsonrpc_response_is_rewritten() {
        let response = br#"{"jsonrpc":"2.0","id":6,"result":{"name":"r","supportedInterfaces":[{"url":"http://10.0.0.5:9000/a2a","protocolBinding":"JSONRPC","protocolVersion":"1.0"}]}}"#;
        let out = card_json(&rewrite_card(response, through_mesh).expect("rewritten"));
        assert_eq!(
            out["result"]["supportedInterfaces"][0]["url"],
            json!("http://127.0.0.1:15001/agents/research/a2a")
        );
        assert_eq!(out["id"], json!(6));
        let error = br#"{"jsonrpc":"2.0","id":6,"error":{"code":-32007,"message":"no"}}"#;
        assert_eq!(
            rewrite_card(error, through_mesh).expect("unchanged"),
            error.to_vec()
        );
    }

    #[test]
    fn a_card_that_is_not_a_json_object_is_an_error_not_a_panic() {
        assert!(matches!(
            rewrite_card(b"[1]", through_mesh),
            Err(CardError::NotAnObject)
        ));
        assert!(matches!(
            rewrite_card(b"{\"url\":", through_mesh),
            Err(CardError::Json(_))
        ));
        // Interface lists and URLs of the wrong type are left alone.
        let odd = br#"{"url":5,"supportedInterfaces":{"url":"http://h/"},"additionalInterfaces":[1,{"url":null}]}"#;
        assert_eq!(
            card_json(&rewrite_card(odd, through_mesh).expect("kept")),
            card_json(odd)
        );
    }
}
