//! MCP over streamable HTTP: what a call is (`tools/call` of which tool), whether its mirrored
//! headers tell the truth, and its trace context.
//!
//! - [`inspect`] reads the JSON-RPC method and, for `tools/call` and `prompts/get`, `params.name`
//!   (for `resources/read`, `params.uri`): the name a policy decides on. The 2026-07-28 revision
//!   mirrors both into `Mcp-Method` and `Mcp-Name` headers; when a header is present it must
//!   equal the body (a `=?base64?…?=` header value is decoded first), and when the request says
//!   `MCP-Protocol-Version: 2026-07-28` or later they must be present. The body is what the
//!   server runs, so the body is what the sidecar decides on, and a header that disagrees is
//!   refused rather than trusted by something further along.
//! - [`meta_trace`] / [`set_meta_traceparent`] read and set W3C trace context in `params._meta`,
//!   where MCP carries it besides the HTTP headers. Setting splices the body: everything else
//!   stays byte for byte.
//! - [`filter_tools_list`] removes tools a caller may not call from a `tools/list` response, JSON
//!   or SSE-framed.
//!
//! Spec: MCP 2026-07-28 basic/transports/streamable-http ("Standard Request Headers", "Value
//! Encoding", "Server Validation"), basic/index (`_meta`, "OpenTelemetry trace context").

use std::borrow::Cow;

use base64::Engine as _;
use http::HeaderMap;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::jsonrpc::{
    self, Envelope, INTERNAL_ERROR, INVALID_PARAMS, Id, JsonRpcError, LenientObj, LenientStr,
};

/// `Mcp-Method`: mirrors the JSON-RPC `method`.
pub const MCP_METHOD: &str = "mcp-method";
/// `Mcp-Name`: mirrors `params.name` (or `params.uri` for `resources/read`).
pub const MCP_NAME: &str = "mcp-name";
/// `MCP-Protocol-Version`: the revision the client speaks.
pub const MCP_PROTOCOL_VERSION: &str = "mcp-protocol-version";
/// The first revision whose clients must send `Mcp-Method` / `Mcp-Name`.
pub const HEADERS_REQUIRED_FROM: &str = "2026-07-28";
/// MCP's `HeaderMismatch` error code.
pub const HEADER_MISMATCH: i64 = -32020;

/// Why an MCP request or response could not be read, phrased for whoever has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum McpError {
    #[error("{0}")]
    JsonRpc(#[from] JsonRpcError),
    #[error(
        "the {header} header says {header_value:?} but the request body says {body_value:?}; \
         send the same value in both (the body is what the server runs)"
    )]
    HeaderMismatch {
        header: &'static str,
        header_value: String,
        body_value: String,
    },
    #[error(
        "the {header} header is missing; MCP-Protocol-Version {version} requires it on \
         {method} requests (set it to {expected:?})"
    )]
    HeaderMissing {
        header: &'static str,
        version: String,
        method: String,
        expected: String,
    },
    #[error("the {header} header is sent more than once; send it once")]
    HeaderRepeated { header: &'static str },
    #[error(
        "the {header} header value is not valid ({reason}); plain values are visible ASCII, \
         anything else is sent as =?base64?<base64 of the UTF-8 value>?="
    )]
    HeaderInvalid {
        header: &'static str,
        reason: &'static str,
    },
    #[error("a {method} request needs params.{field} as a string (the {what} it targets)")]
    MissingName {
        method: String,
        field: &'static str,
        what: &'static str,
    },
    #[error("the request's params could not be read ({0}); send each member once")]
    Params(serde_json::Error),
    #[error("the request's params is an array; _meta needs params to be an object")]
    ParamsNotObject,
    #[error("the response is not valid JSON ({0}); check what the MCP server returned")]
    Response(serde_json::Error),
    #[error("the SSE response is not UTF-8; check what the MCP server returned")]
    SseNotUtf8,
    #[error("the body could not be edited where it was read; this is a sidecar bug, report it")]
    Splice,
}

impl McpError {
    /// The JSON-RPC error code to answer with.
    pub fn code(&self) -> i64 {
        match self {
            Self::JsonRpc(err) => err.code(),
            Self::HeaderMismatch { .. }
            | Self::HeaderMissing { .. }
            | Self::HeaderRepeated { .. }
            | Self::HeaderInvalid { .. } => HEADER_MISMATCH,
            Self::MissingName { .. } | Self::Params(_) | Self::ParamsNotObject => INVALID_PARAMS,
            Self::Response(_) | Self::SseNotUtf8 | Self::Splice => INTERNAL_ERROR,
        }
    }
}

/// The MCP request headers the sidecar checks, as raw bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct McpHeaders<'a> {
    pub method: Option<&'a [u8]>,
    pub name: Option<&'a [u8]>,
    pub protocol_version: Option<&'a [u8]>,
    /// The first of them that was sent more than once, if any.
    pub repeated: Option<&'static str>,
}

impl<'a> McpHeaders<'a> {
    /// Picks the MCP headers out of a request's headers.
    pub fn from_map(headers: &'a HeaderMap) -> Self {
        let mut repeated = None;
        let mut one = |name: &'static str, shown: &'static str| {
            let mut values = headers.get_all(name).iter();
            let first = values.next().map(http::HeaderValue::as_bytes);
            if values.next().is_some() && repeated.is_none() {
                repeated = Some(shown);
            }
            first
        };
        let method = one(MCP_METHOD, "Mcp-Method");
        let name = one(MCP_NAME, "Mcp-Name");
        let protocol_version = one(MCP_PROTOCOL_VERSION, "MCP-Protocol-Version");
        Self {
            method,
            name,
            protocol_version,
            repeated,
        }
    }
}

/// Trace context carried in `params._meta` (MCP reserves `traceparent`, `tracestate` and
/// `baggage` there for W3C Trace Context and Baggage). Values are as sent, not validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaTrace {
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    pub baggage: Option<String>,
}

/// One MCP request or notification, as the proxy decides on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McpCall {
    /// `None` for a notification.
    pub id: Option<Id>,
    pub method: String,
    /// What the call targets: the tool (`tools/call`), the prompt (`prompts/get`) or the
    /// resource URI (`resources/read`). `None` for other methods.
    pub name: Option<String>,
    pub trace: MetaTrace,
}

impl McpCall {
    /// The tool a `tools/call` invokes: the Cedar resource.
    pub fn tool(&self) -> Option<&str> {
        (self.method == "tools/call")
            .then_some(self.name.as_deref())
            .flatten()
    }

    pub fn is_notification(&self) -> bool {
        self.id.is_none()
    }
}

/// The methods whose target is mirrored into `Mcp-Name`, and where the body keeps it.
fn name_field(method: &str) -> Option<(&'static str, &'static str)> {
    match method {
        "tools/call" => Some(("name", "tool")),
        "prompts/get" => Some(("name", "prompt")),
        "resources/read" => Some(("uri", "resource")),
        _ => None,
    }
}

#[derive(Deserialize, Default)]
struct Params<'a> {
    #[serde(default, borrow)]
    name: LenientStr<'a>,
    #[serde(default, borrow)]
    uri: LenientStr<'a>,
    #[serde(default, borrow, rename = "_meta")]
    meta: LenientObj<MetaFields<'a>>,
}

#[derive(Deserialize, Default)]
struct MetaFields<'a> {
    #[serde(default, borrow)]
    traceparent: LenientStr<'a>,
    #[serde(default, borrow)]
    tracestate: LenientStr<'a>,
    #[serde(default, borrow)]
    baggage: LenientStr<'a>,
}

impl From<MetaFields<'_>> for MetaTrace {
    fn from(meta: MetaFields<'_>) -> Self {
        Self {
            traceparent: meta.traceparent.into_string(),
            tracestate: meta.tracestate.into_string(),
            baggage: meta.baggage.into_string(),
        }
    }
}

/// Reads an MCP request and checks its mirrored headers against its body.
pub fn inspect(headers: &HeaderMap, body: &[u8]) -> Result<McpCall, McpError> {
    let envelope = jsonrpc::parse_request(body)?;
    inspect_envelope(McpHeaders::from_map(headers), &envelope)
}

/// [`inspect`] over an envelope the proxy already parsed (it keeps the id for error replies).
pub fn inspect_envelope(headers: McpHeaders<'_>, env: &Envelope<'_>) -> Result<McpCall, McpError> {
    if let Some(header) = headers.repeated {
        return Err(McpError::HeaderRepeated { header });
    }
    let params: Params<'_> = match env.params {
        // Positional params carry neither a name nor _meta.
        Some(raw) if raw.get().starts_with('{') => {
            serde_json::from_str(raw.get()).map_err(McpError::Params)?
        }
        _ => Params::default(),
    };
    let method = env.method.as_ref();
    let version = headers
        .protocol_version
        .and_then(|v| std::str::from_utf8(v).ok());
    let headers_required = version.is_some_and(requires_headers);

    match headers.method {
        Some(value) => {
            let value = plain_header("Mcp-Method", value)?;
            if value != method {
                return Err(McpError::HeaderMismatch {
                    header: "Mcp-Method",
                    header_value: value.to_owned(),
                    body_value: method.to_owned(),
                });
            }
        }
        None if headers_required => {
            return Err(McpError::HeaderMissing {
                header: "Mcp-Method",
                version: version.unwrap_or_default().to_owned(),
                method: method.to_owned(),
                expected: method.to_owned(),
            });
        }
        None => {}
    }

    let name = match name_field(method) {
        None => None,
        Some((field, what)) => {
            let body_name = match field {
                "uri" => params.uri.0,
                _ => params.name.0,
            };
            let Some(body_name) = body_name else {
                return Err(McpError::MissingName {
                    method: method.to_owned(),
                    field,
                    what,
                });
            };
            match headers.name {
                Some(value) => {
                    let value = decode_name_header(value)?;
                    if value != body_name {
                        return Err(McpError::HeaderMismatch {
                            header: "Mcp-Name",
                            header_value: value.into_owned(),
                            body_value: body_name.into_owned(),
                        });
                    }
                }
                None if headers_required => {
                    return Err(McpError::HeaderMissing {
                        header: "Mcp-Name",
                        version: version.unwrap_or_default().to_owned(),
                        method: method.to_owned(),
                        expected: body_name.into_owned(),
                    });
                }
                None => {}
            }
            Some(body_name.into_owned())
        }
    };

    Ok(McpCall {
        id: env.id.clone(),
        method: method.to_owned(),
        name,
        trace: params.meta.0.map(MetaTrace::from).unwrap_or_default(),
    })
}

/// Revisions are dates (`2026-07-28`), so they order as text.
fn requires_headers(version: &str) -> bool {
    let is_date = version.len() == HEADERS_REQUIRED_FROM.len()
        && version.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    is_date && version >= HEADERS_REQUIRED_FROM
}

/// A header value that must be plain visible ASCII (space and tab allowed).
fn plain_header<'a>(header: &'static str, value: &'a [u8]) -> Result<&'a str, McpError> {
    if !value
        .iter()
        .all(|b| matches!(b, b'\t' | b' ') || b.is_ascii_graphic())
    {
        return Err(McpError::HeaderInvalid {
            header,
            reason: "it has bytes outside visible ASCII",
        });
    }
    std::str::from_utf8(value).map_err(|_| McpError::HeaderInvalid {
        header,
        reason: "it is not UTF-8",
    })
}

/// `Mcp-Name` as the client meant it: plain, or `=?base64?…?=` decoded to UTF-8.
fn decode_name_header(value: &[u8]) -> Result<Cow<'_, str>, McpError> {
    const HEADER: &str = "Mcp-Name";
    let plain = plain_header(HEADER, value)?;
    let Some(encoded) = plain
        .strip_prefix("=?base64?")
        .and_then(|rest| rest.strip_suffix("?="))
    else {
        return Ok(Cow::Borrowed(plain));
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| McpError::HeaderInvalid {
            header: HEADER,
            reason: "its =?base64?…?= value is not valid base64",
        })?;
    String::from_utf8(bytes)
        .map(Cow::Owned)
        .map_err(|_| McpError::HeaderInvalid {
            header: HEADER,
            reason: "its =?base64?…?= value does not decode to UTF-8",
        })
}

/// The trace context in a request's `params._meta`. Anything unreadable reads as empty.
pub fn meta_trace(body: &[u8]) -> MetaTrace {
    let Ok(env) = jsonrpc::parse_request(body) else {
        return MetaTrace::default();
    };
    env.params
        .and_then(|raw| serde_json::from_str::<Params<'_>>(raw.get()).ok())
        .and_then(|params| params.meta.0)
        .map(MetaTrace::from)
        .unwrap_or_default()
}

#[derive(Deserialize)]
struct MetaSlot<'a> {
    #[serde(
        default,
        borrow,
        rename = "_meta",
        deserialize_with = "jsonrpc::present_borrowed"
    )]
    meta: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct TraceparentSlot<'a> {
    #[serde(default, borrow, deserialize_with = "jsonrpc::present_borrowed")]
    traceparent: Option<&'a RawValue>,
}

/// Sets `params._meta.traceparent` in a request body, adding `_meta` (and `params`) when
/// missing, and returns the new body. Everything else is kept byte for byte: the edit is a
/// splice at one place.
pub fn set_meta_traceparent(body: &[u8], traceparent: &str) -> Result<Vec<u8>, McpError> {
    let env = jsonrpc::parse_request(body)?;
    let value = serde_json::to_string(traceparent).map_err(|_| McpError::Splice)?;
    let member = format!(r#""traceparent":{value}"#);

    let (at, insert) = match env.params_slot {
        // No params: add them before the body's closing brace (the body has members already).
        None => {
            let close = body
                .iter()
                .rposition(|&b| b == b'}')
                .ok_or(McpError::Splice)?;
            (
                close..close,
                format!(r#","params":{{"_meta":{{{member}}}}}"#),
            )
        }
        Some(slot) => match jsonrpc::json_kind(slot.get()) {
            "null" => (span(body, slot)?, format!(r#"{{"_meta":{{{member}}}}}"#)),
            "an object" => {
                let found: MetaSlot<'_> =
                    serde_json::from_str(slot.get()).map_err(McpError::Params)?;
                match found.meta {
                    None => open_object(body, slot, &format!(r#""_meta":{{{member}}}"#))?,
                    Some(meta) if jsonrpc::json_kind(meta.get()) == "an object" => {
                        let found: TraceparentSlot<'_> =
                            serde_json::from_str(meta.get()).map_err(McpError::Params)?;
                        match found.traceparent {
                            Some(old) => (span(body, old)?, value),
                            None => open_object(body, meta, &member)?,
                        }
                    }
                    // `_meta` of another type: replace it with an object.
                    Some(meta) => (span(body, meta)?, format!("{{{member}}}")),
                }
            }
            _ => return Err(McpError::ParamsNotObject),
        },
    };

    jsonrpc::splice(body, vec![jsonrpc::Edit { at, with: insert }]).ok_or(McpError::Splice)
}

/// Where a raw value borrowed from `body` sits in it.
fn span(body: &[u8], raw: &RawValue) -> Result<std::ops::Range<usize>, McpError> {
    // parse_request borrows from the body, so this holds; an error (never a panic) otherwise.
    jsonrpc::span_in(body, raw.get()).ok_or(McpError::Splice)
}

/// An insertion of `member` as the first member of the object `object` (a raw value in `body`).
fn open_object(
    body: &[u8],
    object: &RawValue,
    member: &str,
) -> Result<(std::ops::Range<usize>, String), McpError> {
    let at = span(body, object)?.start + 1; // just after '{'
    let is_empty =
        jsonrpc::first_byte(object.get().as_bytes().get(1..).unwrap_or_default()) == Some(b'}');
    let insert = if is_empty {
        member.to_owned()
    } else {
        format!("{member},")
    };
    Ok((at..at, insert))
}

/// Removes the tools `allowed` refuses from a `tools/list` response (`result.tools[]`, matched by
/// `name`; a tool without a string name is removed). Accepts a JSON body or an SSE body whose
/// `data:` events carry JSON-RPC messages; the caller buffers the response first (a `tools/list`
/// answer is one message). A response without `result.tools` (an error, another method's
/// result, a notification event) is passed through as it is.
pub fn filter_tools_list(body: &[u8], allowed: impl Fn(&str) -> bool) -> Result<Vec<u8>, McpError> {
    match jsonrpc::first_byte(body) {
        None => Ok(body.to_vec()),
        Some(b'{' | b'[') => Ok(filter_message(body, &allowed)?.unwrap_or_else(|| body.to_vec())),
        Some(_) => filter_sse(body, &allowed),
    }
}

#[derive(Deserialize)]
struct ResultSlot<'a> {
    #[serde(default, borrow)]
    result: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ToolsSlot<'a> {
    #[serde(default, borrow)]
    tools: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ToolName<'a> {
    #[serde(default, borrow)]
    name: LenientStr<'a>,
}

/// The filtered message, or `None` when it has no `result.tools` array to filter. The kept tools
/// and everything around them are copied byte for byte. A tool that names itself twice is an
/// error: clients disagree on which name wins.
fn filter_message(
    json: &[u8],
    allowed: &impl Fn(&str) -> bool,
) -> Result<Option<Vec<u8>>, McpError> {
    if jsonrpc::first_byte(json) != Some(b'{') {
        // A batch or a scalar: validate, and leave it alone.
        serde_json::from_slice::<serde::de::IgnoredAny>(json).map_err(McpError::Response)?;
        return Ok(None);
    }
    let message: ResultSlot<'_> = serde_json::from_slice(json).map_err(McpError::Response)?;
    let Some(result) = message
        .result
        .filter(|r| jsonrpc::json_kind(r.get()) == "an object")
    else {
        return Ok(None);
    };
    let result: ToolsSlot<'_> = serde_json::from_str(result.get()).map_err(McpError::Response)?;
    let Some(tools) = result
        .tools
        .filter(|t| jsonrpc::json_kind(t.get()) == "an array")
    else {
        return Ok(None);
    };
    let listed: Vec<&RawValue> = serde_json::from_str(tools.get()).map_err(McpError::Response)?;
    let mut kept = String::with_capacity(tools.get().len());
    kept.push('[');
    for tool in listed {
        let name: LenientObj<ToolName<'_>> =
            serde_json::from_str(tool.get()).map_err(McpError::Response)?;
        let keep = name
            .0
            .and_then(|n| n.name.0)
            .is_some_and(|name| allowed(&name));
        if keep {
            if kept.len() > 1 {
                kept.push(',');
            }
            kept.push_str(tool.get());
        }
    }
    kept.push(']');
    let at = jsonrpc::span_in(json, tools.get()).ok_or(McpError::Splice)?;
    jsonrpc::splice(json, vec![jsonrpc::Edit { at, with: kept }])
        .map(Some)
        .ok_or(McpError::Splice)
}

/// Filters each SSE event's data; every other line (event, id, retry, comments) is kept.
fn filter_sse(body: &[u8], allowed: &impl Fn(&str) -> bool) -> Result<Vec<u8>, McpError> {
    let text = std::str::from_utf8(body).map_err(|_| McpError::SseNotUtf8)?;
    let mut out = Vec::with_capacity(body.len());
    let mut event: Vec<&str> = Vec::new();
    for line in text.split_inclusive('\n') {
        if line.trim_end_matches(['\r', '\n']).is_empty() {
            flush_event(&event, &mut out, allowed)?;
            event.clear();
            out.extend_from_slice(line.as_bytes());
        } else {
            event.push(line);
        }
    }
    flush_event(&event, &mut out, allowed)?;
    Ok(out)
}

fn flush_event(
    lines: &[&str],
    out: &mut Vec<u8>,
    allowed: &impl Fn(&str) -> bool,
) -> Result<(), McpError> {
    fn data_of(line: &str) -> Option<&str> {
        line.trim_end_matches(['\r', '\n'])
            .strip_prefix("data:")
            .map(|data| data.strip_prefix(' ').unwrap_or(data))
    }
    let data: Vec<&str> = lines.iter().filter_map(|line| data_of(line)).collect();
    let filtered = if data.is_empty() {
        None
    } else {
        filter_message(data.join("\n").as_bytes(), allowed)?
    };
    let Some(filtered) = filtered else {
        lines
            .iter()
            .for_each(|line| out.extend_from_slice(line.as_bytes()));
        return Ok(());
    };
    let mut written = false;
    for line in lines {
        if data_of(line).is_none() {
            out.extend_from_slice(line.as_bytes());
        } else if !written {
            // The filtered message keeps the original's line breaks: one data line each.
            written = true;
            let ending = line
                .get(line.trim_end_matches(['\r', '\n']).len()..)
                .filter(|ending| !ending.is_empty())
                .unwrap_or("\n");
            for part in filtered.split(|&b| b == b'\n') {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(part);
                out.extend_from_slice(ending.as_bytes());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use serde_json::{Value, json};

    const CALL: &[u8] = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"get_weather","arguments":{"location":"Seattle, WA"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientInfo":{"name":"ExampleClient","version":"1.0.0"},"io.modelcontextprotocol/clientCapabilities":{}}}}"#;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn json_of(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).expect("output is JSON")
    }

    #[test]
    fn a_2026_tools_call_with_matching_headers_names_its_tool() {
        let h = headers(&[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "get_weather"),
        ]);
        let call = inspect(&h, CALL).expect("valid call");
        assert_eq!(call.tool(), Some("get_weather"));
        assert_eq!(call.id.as_ref().map(Id::as_json), Some("1"));
        assert!(!call.is_notification());
    }

    #[test]
    fn an_older_client_without_headers_is_read_from_the_body() {
        // What the mcp Python SDK (2025-06-18 era) posts.
        let body = br#"{"method":"tools/call","params":{"name":"search_docs","arguments":{"q":"cedar"}},"jsonrpc":"2.0","id":3}"#;
        let h = headers(&[("mcp-protocol-version", "2025-06-18")]);
        let call = inspect(&h, body).expect("valid call");
        assert_eq!(call.tool(), Some("search_docs"));
    }

    #[test]
    fn an_mcp_name_header_that_disagrees_with_the_body_is_refused() {
        let h = headers(&[("mcp-method", "tools/call"), ("mcp-name", "read_file")]);
        let err = inspect(&h, CALL).expect_err("mismatch");
        assert!(
            matches!(&err, McpError::HeaderMismatch { header: "Mcp-Name", header_value, body_value }
                if header_value == "read_file" && body_value == "get_weather"),
            "{err:?}"
        );
        assert_eq!(err.code(), HEADER_MISMATCH);
        assert!(err.to_string().contains("send the same value in both"));
    }

    #[test]
    fn an_mcp_method_header_that_disagrees_with_the_body_is_refused() {
        let h = headers(&[("mcp-method", "tools/list")]);
        let err = inspect(&h, CALL).expect_err("mismatch");
        assert!(matches!(
            err,
            McpError::HeaderMismatch {
                header: "Mcp-Method",
                ..
            }
        ));
    }

    #[test]
    fn a_2026_request_without_its_mirrored_headers_is_refused() {
        let h = headers(&[("mcp-protocol-version", "2026-07-28")]);
        let err = inspect(&h, CALL).expect_err("missing");
        assert!(matches!(
            err,
            McpError::HeaderMissing {
                header: "Mcp-Method",
                ..
            }
        ));
        let h = headers(&[
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
        ]);
        let err = inspect(&h, CALL).expect_err("missing");
        assert!(
            matches!(&err, McpError::HeaderMissing { header: "Mcp-Name", expected, .. } if expected == "get_weather")
        );
    }

    #[test]
    fn a_base64_mcp_name_is_decoded_before_comparing() {
        let body =
            r#"{"jsonrpc":"2.0","id":2,"method":"prompts/get","params":{"name":"Hello, 世界"}}"#;
        let h = headers(&[
            ("mcp-method", "prompts/get"),
            ("mcp-name", "=?base64?SGVsbG8sIOS4lueVjA==?="),
        ]);
        let call = inspect(&h, body.as_bytes()).expect("decoded");
        assert_eq!(call.name.as_deref(), Some("Hello, 世界"));
        assert_eq!(call.tool(), None);
        let h = headers(&[("mcp-name", "=?base64?!!!?=")]);
        assert!(matches!(
            inspect(&h, body.as_bytes()),
            Err(McpError::HeaderInvalid {
                header: "Mcp-Name",
                ..
            })
        ));
    }

    #[test]
    fn resources_read_is_named_by_its_uri() {
        let body = br#"{"jsonrpc":"2.0","id":2,"method":"resources/read","params":{"uri":"file:///projects/myapp/config.json"}}"#;
        let h = headers(&[
            ("mcp-method", "resources/read"),
            ("mcp-name", "file:///projects/myapp/config.json"),
        ]);
        let call = inspect(&h, body).expect("valid");
        assert_eq!(
            call.name.as_deref(),
            Some("file:///projects/myapp/config.json")
        );
    }

    #[test]
    fn a_tools_call_without_a_tool_name_is_refused() {
        let body = br#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":7}}"#;
        let err = inspect(&HeaderMap::new(), body).expect_err("no name");
        assert!(matches!(err, McpError::MissingName { field: "name", .. }));
        assert_eq!(err.code(), INVALID_PARAMS);
    }

    #[test]
    fn a_tools_call_naming_two_tools_is_refused() {
        let body = br#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"get_weather","name":"delete_repo"}}"#;
        assert!(matches!(
            inspect(&HeaderMap::new(), body),
            Err(McpError::Params(_))
        ));
    }

    #[test]
    fn a_repeated_mirrored_header_is_refused() {
        let h = headers(&[("mcp-name", "get_weather"), ("mcp-name", "delete_repo")]);
        assert!(matches!(
            inspect(&h, CALL),
            Err(McpError::HeaderRepeated { header: "Mcp-Name" })
        ));
    }

    #[test]
    fn a_notification_and_a_list_carry_no_name() {
        let body = br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
        let h = headers(&[("mcp-method", "notifications/initialized")]);
        let call = inspect(&h, body).expect("valid");
        assert!(call.is_notification());
        assert_eq!(call.name, None);
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"cursor":"abc"}}"#;
        assert_eq!(inspect(&HeaderMap::new(), body).expect("valid").name, None);
    }

    #[test]
    fn a_truncated_body_is_an_error_not_a_panic() {
        for cut in 0..CALL.len() {
            let _ = inspect(&HeaderMap::new(), CALL.get(..cut).unwrap_or_default());
            let _ = set_meta_traceparent(CALL.get(..cut).unwrap_or_default(), "x");
        }
        let err = inspect(&HeaderMap::new(), CALL.get(..40).unwrap_or_default()).expect_err("cut");
        assert!(matches!(
            err,
            McpError::JsonRpc(JsonRpcError::Truncated { .. })
        ));
    }

    #[test]
    fn trace_context_in_meta_is_read() {
        let body = br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"get_weather","arguments":{"location":"New York"},"_meta":{"traceparent":"00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01","tracestate":"rojo=00f067aa0ba902b7","baggage":"userId=alice"}}}"#;
        let trace = meta_trace(body);
        assert_eq!(
            trace,
            MetaTrace {
                traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01".into()),
                tracestate: Some("rojo=00f067aa0ba902b7".into()),
                baggage: Some("userId=alice".into()),
            }
        );
        assert_eq!(
            inspect(&HeaderMap::new(), body).expect("valid").trace,
            trace
        );
        assert_eq!(meta_trace(CALL), MetaTrace::default());
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn traceparent_after_set(body: &[u8]) -> (Value, Value) {
        let out = set_meta_traceparent(body, TP).expect("set");
        let new = json_of(&out);
        (json_of(body), new)
    }

    #[test]
    fn setting_traceparent_adds_it_to_an_existing_meta_and_keeps_the_rest() {
        let (mut old, new) = traceparent_after_set(CALL);
        old["params"]["_meta"]["traceparent"] = json!(TP);
        assert_eq!(new, old);
        assert_eq!(
            meta_trace(&set_meta_traceparent(CALL, TP).expect("set"))
                .traceparent
                .as_deref(),
            Some(TP)
        );
    }

    #[test]
    fn setting_traceparent_replaces_an_old_one() {
        let body = br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"t","_meta":{"traceparent":"00-old-old-01","tracestate":"a=b"}}}"#;
        let out = set_meta_traceparent(body, TP).expect("set");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            text,
            format!(
                r#"{{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{{"name":"t","_meta":{{"traceparent":"{TP}","tracestate":"a=b"}}}}}}"#
            )
        );
    }

    #[test]
    fn setting_traceparent_creates_meta_or_params_when_missing() {
        for body in [
            &br#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#[..],
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":null}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"cursor":"c"}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{}}}"#,
            br#"{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":null}}"#,
            br#" {"jsonrpc":"2.0","id":1,"method":"tools/list"} "#,
        ] {
            let (old, new) = traceparent_after_set(body);
            assert_eq!(new["params"]["_meta"]["traceparent"], json!(TP), "{new}");
            assert_eq!(new["method"], old["method"]);
            if let Some(cursor) = old["params"].get("cursor") {
                assert_eq!(&new["params"]["cursor"], cursor);
            }
        }
    }

    #[test]
    fn setting_traceparent_on_positional_params_is_refused() {
        let body = br#"{"jsonrpc":"2.0","id":1,"method":"x","params":[1,2]}"#;
        assert!(matches!(
            set_meta_traceparent(body, TP),
            Err(McpError::ParamsNotObject)
        ));
    }

    const TOOLS: &str = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"get_weather","description":"Get current weather","inputSchema":{"type":"object"}},{"name":"delete_repo","inputSchema":{"type":"object"}},{"description":"nameless"}],"nextCursor":"next-page-cursor"}}"#;

    #[test]
    fn tools_list_keeps_only_the_allowed_tools() {
        let out =
            filter_tools_list(TOOLS.as_bytes(), |name| name == "get_weather").expect("filtered");
        let out = json_of(&out);
        assert_eq!(
            out["result"]["tools"],
            json!([{"name":"get_weather","description":"Get current weather","inputSchema":{"type":"object"}}])
        );
        assert_eq!(out["result"]["nextCursor"], json!("next-page-cursor"));
        assert_eq!(out["id"], json!(1));
    }

    #[test]
    fn a_filtered_tools_list_keeps_the_bytes_of_what_it_keeps() {
        let body = b"{\"jsonrpc\": \"2.0\", \"id\": 123456789012345678901234567890,\n \"result\": {\"tools\": [ {\"name\": \"a\", \"inputSchema\": {\"maximum\": 1.10000000000000000001e300}} , {\"name\": \"b\"} ]}}";
        let out = filter_tools_list(body, |name| name == "a").expect("filtered");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "{\"jsonrpc\": \"2.0\", \"id\": 123456789012345678901234567890,\n \"result\": {\"tools\": [{\"name\": \"a\", \"inputSchema\": {\"maximum\": 1.10000000000000000001e300}}]}}"
        );
        let twice = br#"{"result":{"tools":[{"name":"a","name":"b"}]}}"#;
        assert!(matches!(
            filter_tools_list(twice, |_| true),
            Err(McpError::Response(_))
        ));
    }

    #[test]
    fn an_sse_framed_tools_list_is_filtered_event_by_event() {
        let body = format!(
            "event: message\r\nid: 7\r\ndata: {TOOLS}\r\n\r\n: keep-alive\n\ndata: {{\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{{}}}}\n\n"
        );
        let out =
            filter_tools_list(body.as_bytes(), |name| name == "delete_repo").expect("filtered");
        let text = String::from_utf8(out).expect("utf-8");
        let mut events = text.split("\r\n\r\n");
        let first = events.next().expect("first event");
        assert!(
            first.starts_with("event: message\r\nid: 7\r\ndata: {"),
            "{first}"
        );
        let data = first
            .lines()
            .nth(2)
            .and_then(|l| l.strip_prefix("data: "))
            .expect("data");
        assert_eq!(
            json_of(data.as_bytes())["result"]["tools"],
            json!([{"name":"delete_repo","inputSchema":{"type":"object"}}])
        );
        assert!(text.ends_with(": keep-alive\n\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/message\",\"params\":{}}\n\n"), "{text}");
    }

    #[test]
    fn a_multi_line_sse_data_event_is_joined_before_filtering() {
        let body = "data: {\"jsonrpc\":\"2.0\",\"id\":1,\ndata: \"result\":{\"tools\":[{\"name\":\"a\"},{\"name\":\"b\"}]}}\n\n";
        let out = filter_tools_list(body.as_bytes(), |name| name == "b").expect("filtered");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            text,
            "data: {\"jsonrpc\":\"2.0\",\"id\":1,\ndata: \"result\":{\"tools\":[{\"name\":\"b\"}]}}\n\n"
        );
    }

    #[test]
    fn an_error_response_or_broken_json_is_not_filtered() {
        let error =
            br#"{"jsonrpc":"2.0","id":1,"error":{"code":-32601,"message":"Method not found"}}"#;
        assert_eq!(
            filter_tools_list(error, |_| false).expect("unchanged"),
            error.to_vec()
        );
        assert!(matches!(
            filter_tools_list(b"{\"result\":{\"tools\":[", |_| true),
            Err(McpError::Response(_))
        ));
    }
}
