//! JSON-RPC 2.0: the envelope the proxy reads before deciding, and the error object it answers
//! with.
//!
//! A request body is read without building a DOM: the method is borrowed from the body when it
//! has no escapes, `params` stays a [`RawValue`] slice of the body that the protocol modules read
//! again for the few fields they need, and every other member is skipped. The id is copied (a few
//! bytes) so an error response can still carry it after the body is gone.
//!
//! Two members with the same name (two `method`s, two `params`) are refused rather than resolved:
//! the sidecar and the server behind it must never read different requests out of one body.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// JSON-RPC 2.0 "Parse error": the body is not valid JSON.
pub const PARSE_ERROR: i64 = -32700;
/// JSON-RPC 2.0 "Invalid Request": valid JSON, but not a request object.
pub const INVALID_REQUEST: i64 = -32600;
/// JSON-RPC 2.0 "Method not found".
pub const METHOD_NOT_FOUND: i64 = -32601;
/// JSON-RPC 2.0 "Invalid params".
pub const INVALID_PARAMS: i64 = -32602;
/// JSON-RPC 2.0 "Internal error".
pub const INTERNAL_ERROR: i64 = -32603;

/// What is wrong with a request body, phrased for the caller who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum JsonRpcError {
    #[error("the request body is empty; send one JSON-RPC 2.0 request object")]
    Empty,
    #[error(
        "the request body is a JSON-RPC batch (a JSON array), which is not accepted here; \
         send one request object per HTTP request"
    )]
    Batch,
    #[error("the request body is not a JSON object; send one JSON-RPC 2.0 request object")]
    NotAnObject,
    #[error(
        "the request body ends early (line {line}, column {column}); it looks truncated: \
         send the complete JSON-RPC request"
    )]
    Truncated { line: usize, column: usize },
    #[error("the request body is not valid JSON ({0}); send one JSON-RPC 2.0 request object")]
    Syntax(serde_json::Error),
    #[error(
        "the request is not a valid JSON-RPC 2.0 request ({0}); check the member types, and \
         send each member once"
    )]
    Shape(serde_json::Error),
    #[error("the request lacks \"jsonrpc\": \"2.0\"; JSON-RPC 2.0 requires that member")]
    Version { id: Option<Id> },
    #[error("the request has no \"method\"; name the method to call")]
    MissingMethod { id: Option<Id> },
    #[error("the request's id is {found}; a JSON-RPC id must be a string, a number or null")]
    InvalidId { found: &'static str },
    #[error("the request's params is {found}; JSON-RPC params must be an object or an array")]
    InvalidParams { id: Option<Id>, found: &'static str },
}

impl JsonRpcError {
    /// The JSON-RPC error code to answer with.
    pub fn code(&self) -> i64 {
        match self {
            Self::Empty | Self::Truncated { .. } | Self::Syntax(_) => PARSE_ERROR,
            _ => INVALID_REQUEST,
        }
    }

    /// The request's id, when the body got far enough to have one.
    pub fn id(&self) -> Option<&Id> {
        match self {
            Self::Version { id } | Self::MissingMethod { id } | Self::InvalidParams { id, .. } => {
                id.as_ref()
            }
            _ => None,
        }
    }
}

/// A request id exactly as the client wrote it: a string, a number or `null`.
///
/// Kept as raw JSON so an error response echoes it byte for byte (a large or fractional number
/// is not rounded through `f64`).
#[derive(Clone)]
pub struct Id(Box<RawValue>);

impl Id {
    /// The id as JSON text, e.g. `"7f3c…"`, `42` or `null`.
    pub fn as_json(&self) -> &str {
        self.0.get()
    }

    /// The id as raw JSON, for embedding in a response.
    pub fn as_raw(&self) -> &RawValue {
        &self.0
    }
}

impl PartialEq for Id {
    fn eq(&self, other: &Self) -> bool {
        self.as_json() == other.as_json()
    }
}

impl Eq for Id {}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_json())
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_json())
    }
}

/// The part of a JSON-RPC request the proxy reads. Borrows from the body.
#[derive(Debug)]
pub struct Envelope<'a> {
    /// `None` for a notification (no `id` member); `Some` of `null` is a request whose id is null.
    pub id: Option<Id>,
    pub method: Cow<'a, str>,
    /// The `params` object or array; `None` when absent or `null`.
    pub params: Option<&'a RawValue>,
    /// The `params` member as written, `null` included, for edits that splice the body.
    pub(crate) params_slot: Option<&'a RawValue>,
}

impl Envelope<'_> {
    /// A notification expects no response.
    pub fn is_notification(&self) -> bool {
        self.id.is_none()
    }
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(default, borrow)]
    jsonrpc: LenientStr<'a>,
    #[serde(default, deserialize_with = "present")]
    id: Option<Box<RawValue>>,
    #[serde(default, borrow, deserialize_with = "borrowed_str")]
    method: Option<Cow<'a, str>>,
    #[serde(default, borrow, deserialize_with = "present_borrowed")]
    params: Option<&'a RawValue>,
}

/// Deserializes a member that is present (even as `null`) into `Some`; absent stays `None` via
/// `#[serde(default)]`. Plain `Option` would fold `null` into absent.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

/// A string borrowed from the body when it has no escapes. (serde's own `Cow` impl always
/// copies unless the field is a bare `Cow`.)
fn borrowed_str<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Cow<'de, str>>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Cow<'de, str>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(v))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v.to_owned()))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Cow::Owned(v))
        }
    }
    d.deserialize_str(V).map(Some)
}

pub(crate) fn present_borrowed<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// Reads the envelope of one JSON-RPC 2.0 request.
pub fn parse_request(body: &[u8]) -> Result<Envelope<'_>, JsonRpcError> {
    match first_byte(body) {
        None => return Err(JsonRpcError::Empty),
        Some(b'[') => return Err(JsonRpcError::Batch),
        Some(b'{') => {}
        Some(_) => return Err(JsonRpcError::NotAnObject),
    }
    let wire: Wire<'_> = serde_json::from_slice(body).map_err(classify)?;

    let id = match wire.id {
        None => None,
        Some(raw) => match json_kind(raw.get()) {
            "a string" | "a number" | "null" => Some(Id(raw)),
            found => return Err(JsonRpcError::InvalidId { found }),
        },
    };
    if wire.jsonrpc.0.as_deref() != Some("2.0") {
        return Err(JsonRpcError::Version { id });
    }
    let Some(method) = wire.method else {
        return Err(JsonRpcError::MissingMethod { id });
    };
    let params = match wire.params {
        None => None,
        Some(raw) => match json_kind(raw.get()) {
            "an object" | "an array" => Some(raw),
            "null" => None,
            found => return Err(JsonRpcError::InvalidParams { id, found }),
        },
    };
    Ok(Envelope {
        id,
        method,
        params,
        params_slot: wire.params,
    })
}

fn classify(err: serde_json::Error) -> JsonRpcError {
    match err.classify() {
        serde_json::error::Category::Eof => JsonRpcError::Truncated {
            line: err.line(),
            column: err.column(),
        },
        serde_json::error::Category::Data => JsonRpcError::Shape(err),
        _ => JsonRpcError::Syntax(err),
    }
}

/// Whether a body looks like JSON-RPC: a JSON object or array that mentions a `"jsonrpc"` member.
/// A cheap scan, no parse: it only chooses between a JSON-RPC error object and a plain JSON error
/// for a body the sidecar refuses.
pub fn looks_like_jsonrpc(body: &[u8]) -> bool {
    const KEY: &[u8] = b"\"jsonrpc\"";
    matches!(first_byte(body), Some(b'{' | b'['))
        && body.windows(KEY.len()).any(|window| window == KEY)
}

#[derive(Serialize)]
struct ErrorResponse<'a> {
    jsonrpc: &'static str,
    id: &'a RawValue,
    error: ErrorObject<'a>,
}

#[derive(Serialize)]
struct ErrorObject<'a> {
    code: i64,
    message: &'a str,
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    data: serde_json::Value,
}

/// A JSON-RPC 2.0 error response carrying the request's id (`null` when it is not known).
/// `data` is left out when it is `Value::Null`.
pub fn error_response(
    id: Option<&Id>,
    code: i64,
    message: &str,
    data: serde_json::Value,
) -> Vec<u8> {
    let response = ErrorResponse {
        jsonrpc: "2.0",
        id: id.map_or(RawValue::NULL, Id::as_raw),
        error: ErrorObject {
            code,
            message,
            data,
        },
    };
    // Serializing plain structs and a `Value` into memory cannot fail; the fallback is
    // belt and braces, never a panic.
    serde_json::to_vec(&response).unwrap_or_else(|_| {
        br#"{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"Internal error"}}"#
            .to_vec()
    })
}

/// The error response for a body that [`parse_request`] refused.
pub fn error_response_for(err: &JsonRpcError) -> Vec<u8> {
    error_response(
        err.id(),
        err.code(),
        &err.to_string(),
        serde_json::Value::Null,
    )
}

/// The first byte that is not JSON whitespace.
pub(crate) fn first_byte(bytes: &[u8]) -> Option<u8> {
    bytes
        .iter()
        .copied()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

/// What kind of JSON value a raw (already validated) value is, for error messages.
pub(crate) fn json_kind(raw: &str) -> &'static str {
    match first_byte(raw.as_bytes()) {
        Some(b'"') => "a string",
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// Where `inner` (a slice borrowed out of `outer`) sits in `outer`. `None` if it does not.
pub(crate) fn span_in(outer: &[u8], inner: &str) -> Option<std::ops::Range<usize>> {
    let start = (inner.as_ptr() as usize).checked_sub(outer.as_ptr() as usize)?;
    let end = start.checked_add(inner.len())?;
    (end <= outer.len()).then_some(start..end)
}

/// One replacement in a body: the bytes at `at` become `with` (an empty range inserts).
pub(crate) struct Edit {
    pub at: std::ops::Range<usize>,
    pub with: String,
}

/// Applies edits to a body, keeping every other byte. `None` if edits overlap or fall outside.
pub(crate) fn splice(body: &[u8], mut edits: Vec<Edit>) -> Option<Vec<u8>> {
    edits.sort_by_key(|edit| edit.at.start);
    let extra: usize = edits.iter().map(|edit| edit.with.len()).sum();
    let mut out = Vec::with_capacity(body.len().saturating_add(extra));
    let mut pos = 0;
    for edit in edits {
        out.extend_from_slice(body.get(pos..edit.at.start)?);
        out.extend_from_slice(edit.with.as_bytes());
        pos = edit.at.end;
    }
    out.extend_from_slice(body.get(pos..)?);
    Some(out)
}

/// A string member read leniently: any other JSON type (or `null`) reads as `None` instead of
/// failing the whole document. For fields that are informative, not decisive.
#[derive(Debug, Default)]
pub(crate) struct LenientStr<'a>(pub Option<Cow<'a, str>>);

impl<'a> LenientStr<'a> {
    pub(crate) fn into_string(self) -> Option<String> {
        self.0.map(Cow::into_owned)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for LenientStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = LenientStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(LenientStr(Some(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(LenientStr(Some(Cow::Owned(v.to_owned()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(LenientStr(Some(Cow::Owned(v))))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(LenientStr(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(LenientStr(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(LenientStr(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(LenientStr(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(LenientStr(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(LenientStr(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(LenientStr(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// An object member read leniently: a JSON object is read as `T`, any other JSON type reads as
/// `None`. Errors inside the object (a repeated member, say) still fail the document.
#[derive(Debug)]
pub(crate) struct LenientObj<T>(pub Option<T>);

impl<T> Default for LenientObj<T> {
    fn default() -> Self {
        Self(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for LenientObj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = LenientObj<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|t| LenientObj(Some(t)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(LenientObj(None))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(LenientObj(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(LenientObj(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(LenientObj(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(LenientObj(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(LenientObj(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(LenientObj(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn parsed(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).expect("test output is JSON")
    }

    #[test]
    fn an_a2a_sdk_send_message_is_read_without_copying_params() {
        // What a2a-sdk 1.x's JsonRpcTransport posts (JSONRPC20Request key order).
        let body = br#"{"jsonrpc": "2.0", "method": "SendMessage", "params": {"message": {"messageId": "9229e770-767c-417b-a0b0-f0741243c589", "role": "ROLE_USER", "parts": [{"text": "plan my trip"}]}}, "id": "1c5d0f0e-6a43-4e8c-b0a2-3f9b1d2c7e11"}"#;
        let env = parse_request(body).expect("valid request");
        assert_eq!(env.method, "SendMessage");
        assert!(matches!(env.method, Cow::Borrowed(_)));
        assert_eq!(
            env.id.as_ref().map(Id::as_json),
            Some(r#""1c5d0f0e-6a43-4e8c-b0a2-3f9b1d2c7e11""#)
        );
        let params = env.params.expect("params");
        assert!(params.get().starts_with(r#"{"message""#));
        assert!(span_in(body, params.get()).is_some());
        assert!(!env.is_notification());
    }

    #[test]
    fn a_notification_has_no_id_and_a_null_id_is_still_a_request() {
        let note = parse_request(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .expect("valid notification");
        assert!(note.is_notification());
        assert!(note.params.is_none());

        let null_id = parse_request(br#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#)
            .expect("valid request");
        assert_eq!(null_id.id.as_ref().map(Id::as_json), Some("null"));
    }

    #[test]
    fn a_batch_is_recognised_so_the_caller_can_refuse_it() {
        let body = br#" [{"jsonrpc":"2.0","id":1,"method":"tools/list"}]"#;
        assert!(matches!(parse_request(body), Err(JsonRpcError::Batch)));
        assert!(matches!(parse_request(b"[]"), Err(JsonRpcError::Batch)));
    }

    #[test]
    fn a_truncated_body_is_an_error_not_a_panic() {
        let body = br#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"sea"#;
        let err = parse_request(body).expect_err("truncated");
        assert!(matches!(err, JsonRpcError::Truncated { .. }), "{err:?}");
        assert_eq!(err.code(), PARSE_ERROR);
        for cut in 0..body.len() {
            let _ = parse_request(body.get(..cut).unwrap_or_default());
        }
    }

    #[test]
    fn a_body_with_two_methods_is_refused() {
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","method":"tools/call"}"#;
        let err = parse_request(body).expect_err("duplicate");
        assert!(matches!(err, JsonRpcError::Shape(_)), "{err:?}");
        assert!(err.to_string().contains("duplicate field"), "{err}");
    }

    #[test]
    fn a_body_without_the_version_member_is_refused_with_its_id() {
        let err = parse_request(br#"{"id":3,"method":"tools/list"}"#).expect_err("no version");
        assert!(matches!(err, JsonRpcError::Version { .. }));
        assert_eq!(err.id().map(Id::as_json), Some("3"));
        assert!(err.to_string().contains("\"jsonrpc\": \"2.0\""));
    }

    #[test]
    fn an_object_id_and_scalar_params_are_invalid_requests() {
        let err = parse_request(br#"{"jsonrpc":"2.0","id":{"a":1},"method":"x"}"#)
            .expect_err("object id");
        assert!(matches!(
            err,
            JsonRpcError::InvalidId { found: "an object" }
        ));
        let err = parse_request(br#"{"jsonrpc":"2.0","id":1,"method":"x","params":"p"}"#)
            .expect_err("string params");
        assert!(matches!(
            err,
            JsonRpcError::InvalidParams {
                found: "a string",
                ..
            }
        ));
        assert_eq!(err.code(), INVALID_REQUEST);
    }

    #[test]
    fn non_json_and_non_objects_are_told_apart() {
        assert!(matches!(parse_request(b"  "), Err(JsonRpcError::Empty)));
        assert!(matches!(
            parse_request(b"42"),
            Err(JsonRpcError::NotAnObject)
        ));
        assert!(matches!(
            parse_request(b"{\"jsonrpc\":\"2.0\",}"),
            Err(JsonRpcError::Syntax(_))
        ));
    }

    #[test]
    fn a_jsonrpc_error_keeps_the_requests_id() {
        let env = parse_request(br#"{"jsonrpc":"2.0","id":"req-17","method":"SendMessage"}"#)
            .expect("valid");
        let out = error_response(
            env.id.as_ref(),
            -32001,
            "research may not invoke orchestrator",
            json!({"rule": "deny-cycles"}),
        );
        assert_eq!(
            parsed(&out),
            json!({
                "jsonrpc": "2.0",
                "id": "req-17",
                "error": {"code": -32001, "message": "research may not invoke orchestrator",
                          "data": {"rule": "deny-cycles"}}
            })
        );
    }

    #[test]
    fn a_large_numeric_id_is_echoed_byte_for_byte() {
        let env = parse_request(br#"{"jsonrpc":"2.0","id":12345678901234567890123,"method":"m"}"#)
            .expect("valid");
        let out = error_response(env.id.as_ref(), METHOD_NOT_FOUND, "no", Value::Null);
        let text = String::from_utf8(out).expect("utf-8");
        assert!(text.contains(r#""id":12345678901234567890123"#), "{text}");
        assert!(!text.contains("data"), "{text}");
    }

    #[test]
    fn an_error_for_an_unreadable_body_has_a_null_id() {
        let err = parse_request(b"{not json").expect_err("syntax");
        let out = parsed(&error_response_for(&err));
        assert_eq!(out["id"], Value::Null);
        assert_eq!(out["error"]["code"], json!(PARSE_ERROR));
    }

    #[test]
    fn only_bodies_that_mention_jsonrpc_look_like_jsonrpc() {
        assert!(looks_like_jsonrpc(br#"{"jsonrpc":"2.0","method":"x"}"#));
        assert!(looks_like_jsonrpc(br#"[{"jsonrpc":"2.0"}]"#));
        assert!(!looks_like_jsonrpc(br#"{"message":{"role":"ROLE_USER"}}"#));
        assert!(!looks_like_jsonrpc(b"jsonrpc"));
        assert!(!looks_like_jsonrpc(b""));
    }

    #[test]
    fn lenient_fields_skip_values_of_the_wrong_type() {
        #[derive(Deserialize)]
        struct Probe<'a> {
            #[serde(default, borrow)]
            a: LenientStr<'a>,
            #[serde(default, borrow)]
            b: LenientStr<'a>,
            #[serde(default)]
            c: LenientObj<Inner>,
        }
        #[derive(Deserialize)]
        struct Inner {
            x: u8,
        }
        let probe: Probe<'_> =
            serde_json::from_str(r#"{"a":{"deep":[1,2]},"b":"esc\"aped","c":[{"x":1}]}"#)
                .expect("lenient");
        assert!(probe.a.0.is_none());
        assert_eq!(probe.b.0.as_deref(), Some("esc\"aped"));
        assert!(probe.c.0.is_none());
        let probe: Probe<'_> = serde_json::from_str(r#"{"c":{"x":4}}"#).expect("lenient");
        assert_eq!(probe.c.0.map(|i| i.x), Some(4));
    }
}
