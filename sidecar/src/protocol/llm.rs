//! LLM calls: which API a `/models/<provider>/…` request speaks, what it asks for, and how many
//! tokens it used.
//!
//! - [`Api::from_path`] names the API from the path after the `/models/<provider>` prefix:
//!   OpenAI-compatible `/v1/chat/completions` and `/v1/responses`, Anthropic-style `/v1/messages`
//!   (each also without `/v1`).
//! - [`inspect_request`] reads the model, the `stream` flag and the output-token cap (what a
//!   budget reservation is sized from). [`LlmRequest::with_stream_usage`] sets
//!   `stream_options.include_usage` on an OpenAI chat stream, which otherwise carries no usage at
//!   all; like every body edit in this crate it is a splice, so every other byte (numbers
//!   included) reaches the provider as the client wrote it.
//! - [`response_usage`] reads a complete JSON response; [`UsageStream`] watches an SSE response
//!   go by, chunk by chunk, without holding more than one event (capped at [`MAX_EVENT_BYTES`]).
//!
//! Where the usage lives, per API (each is cumulative for the whole call, never a delta):
//!
//! | API | JSON response | stream |
//! |---|---|---|
//! | chat completions | `usage.prompt_tokens`, `completion_tokens` | the last chunk before `[DONE]` (`choices: []`), only with `include_usage` |
//! | responses | `usage.input_tokens`, `output_tokens` | `response.completed` (or `.incomplete`, `.failed`): `response.usage` |
//! | messages | `usage.input_tokens` + `cache_creation_input_tokens` + `cache_read_input_tokens`, `output_tokens` | `message_start`: `message.usage`; `message_delta`: `usage`, the latest values win |
//!
//! OpenAI's `cached_tokens` are part of `prompt_tokens`/`input_tokens`; Anthropic's
//! `input_tokens` leaves the cache out, so its input total is the sum. [`Usage::input_tokens`] is
//! always the total, with the cached part broken out for pricing.
//!
//! When the usage cannot be read — a stream cut short, a provider that ignored `include_usage`,
//! a malformed block — the result is [`Usage::estimated`] with a reason, never a panic or an
//! error the proxy must handle. The estimate errs high: input is the request size / 4, output is
//! the response size / 4 capped by the request's max output tokens. Providers bill nothing for a
//! non-2xx response; the caller should settle zero for those rather than ask for an estimate.
//!
//! Sources: OpenAI API reference (`ChatCompletionStreamOptions.include_usage`, the Responses
//! streaming events), Anthropic "Streaming Messages" and `MessageDeltaUsage` (cumulative,
//! nullable cache fields).

use std::borrow::Cow;
use std::ops::Range;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::jsonrpc::{self, LenientObj, LenientStr};

#[cfg(test)]
mod tests;

/// The most of one SSE event [`UsageStream`] holds. Past it, only the event's last
/// [`TAIL_BYTES`] are kept, which is where a large `response.completed` keeps its usage.
pub const MAX_EVENT_BYTES: usize = 1 << 20;
/// How much of an oversized event's end is kept.
pub const TAIL_BYTES: usize = 64 << 10;

/// Why an LLM request or response could not be read, phrased for whoever has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("the request body is not a JSON object; send the model request as one JSON object")]
    NotAnObject,
    #[error("the request body could not be read ({0}); send valid JSON with each member once")]
    Request(serde_json::Error),
    #[error(
        "the request's stream_options is {found}; make it an object, e.g. \
         {{\"include_usage\": true}}, or leave it out"
    )]
    StreamOptionsNotObject { found: &'static str },
    #[error("the response body is not valid JSON ({0}); check what the model provider returned")]
    Response(serde_json::Error),
    #[error("the response has no usage object; the provider did not report the tokens it used")]
    NoUsage,
    #[error("the response's usage lacks {field}; the provider's usage block is incomplete")]
    MissingCount { field: &'static str },
    #[error(
        "the response's usage.{field} is not a non-negative integer; check what the model \
         provider returned"
    )]
    BadCount { field: &'static str },
    #[error("the body could not be edited where it was read; this is a sidecar bug, report it")]
    Splice,
}

impl LlmError {
    /// A short, fixed reason for [`Usage::estimate_reason`] (and a bounded metric label).
    pub fn estimate_reason(&self) -> &'static str {
        match self {
            Self::Response(_) => "the response body is not valid JSON",
            Self::NoUsage => "the response carried no usage",
            Self::MissingCount { .. } | Self::BadCount { .. } => {
                "the usage block could not be read"
            }
            Self::NotAnObject | Self::Request(_) | Self::StreamOptionsNotObject { .. } => {
                "the request could not be read"
            }
            Self::Splice => "sidecar bug",
        }
    }
}

/// The LLM API a request speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    /// OpenAI-compatible `POST /v1/chat/completions`.
    ChatCompletions,
    /// OpenAI `POST /v1/responses`.
    Responses,
    /// Anthropic `POST /v1/messages`.
    AnthropicMessages,
}

impl Api {
    /// The API of a path after the `/models/<provider>` prefix (a query string is ignored).
    /// `None` for anything else, such as `/v1/models` or `/v1/messages/count_tokens`.
    pub fn from_path(path: &str) -> Option<Self> {
        let path = path.split(['?', '#']).next().unwrap_or_default();
        let path = path.strip_suffix('/').unwrap_or(path);
        let path = path
            .strip_prefix("/v1")
            .filter(|rest| rest.starts_with('/'))
            .unwrap_or(path);
        match path {
            "/chat/completions" => Some(Self::ChatCompletions),
            "/responses" => Some(Self::Responses),
            "/messages" => Some(Self::AnthropicMessages),
            _ => None,
        }
    }

    /// A stable name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Self::ChatCompletions => "chat_completions",
            Self::Responses => "responses",
            Self::AnthropicMessages => "messages",
        }
    }
}

/// What the sidecar knows about a call's size before the response: the basis of a budget
/// reservation, and of the estimate when the response's usage cannot be read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Estimate {
    /// Request bytes / 4: JSON framing counts as text, so this errs high.
    pub input_tokens: u64,
    /// The request's cap on output tokens, when it set one.
    pub max_output_tokens: Option<u64>,
}

impl Estimate {
    /// Output tokens for a response of `response_bytes`: bytes / 4, capped by the request's
    /// max output tokens. Errs high (SSE and JSON framing count as text).
    pub fn output_tokens(&self, response_bytes: u64) -> u64 {
        let by_size = response_bytes.div_ceil(4);
        self.max_output_tokens
            .map_or(by_size, |cap| cap.min(by_size))
    }
}

/// The part of an LLM request the sidecar reads. Borrows from the body.
#[derive(Debug, Clone)]
pub struct LlmRequest<'a> {
    pub api: Api,
    /// `model`, when it is a string.
    pub model: Option<Cow<'a, str>>,
    /// `stream: true`.
    pub stream: bool,
    /// The cap on output tokens: `max_completion_tokens` (else `max_tokens`) for chat,
    /// `max_output_tokens` for responses, `max_tokens` for messages. A value that is not a
    /// non-negative integer reads as absent (the provider will refuse it anyway).
    pub max_output_tokens: Option<u64>,
    /// The request body's size in bytes.
    pub body_len: usize,
    stream_options: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct WireRequest<'a> {
    #[serde(default, borrow)]
    model: LenientStr<'a>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default, borrow)]
    max_tokens: Option<&'a RawValue>,
    #[serde(default, borrow)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(default, borrow)]
    max_output_tokens: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "jsonrpc::present_borrowed")]
    stream_options: Option<&'a RawValue>,
}

/// Reads an LLM request body. A member sent twice is refused: the sidecar and the provider must
/// not read different requests out of one body.
pub fn inspect_request(api: Api, body: &[u8]) -> Result<LlmRequest<'_>, LlmError> {
    if jsonrpc::first_byte(body) != Some(b'{') {
        return Err(LlmError::NotAnObject);
    }
    let wire: WireRequest<'_> = serde_json::from_slice(body).map_err(LlmError::Request)?;
    let lenient = |raw: Option<&RawValue>| raw.and_then(|raw| raw.get().parse::<u64>().ok());
    let max_output_tokens = match api {
        Api::ChatCompletions => lenient(wire.max_completion_tokens).or(lenient(wire.max_tokens)),
        Api::Responses => lenient(wire.max_output_tokens),
        Api::AnthropicMessages => lenient(wire.max_tokens),
    };
    Ok(LlmRequest {
        api,
        model: wire.model.0,
        stream: wire.stream.unwrap_or(false),
        max_output_tokens,
        body_len: body.len(),
        stream_options: wire.stream_options,
    })
}

#[derive(Deserialize)]
struct IncludeUsageSlot<'a> {
    #[serde(default, borrow, deserialize_with = "jsonrpc::present_borrowed")]
    include_usage: Option<&'a RawValue>,
}

impl<'a> LlmRequest<'a> {
    /// The estimate a reservation is sized from.
    pub fn estimate(&self) -> Estimate {
        Estimate {
            input_tokens: u64::try_from(self.body_len.div_ceil(4)).unwrap_or(u64::MAX),
            max_output_tokens: self.max_output_tokens,
        }
    }

    /// The body to forward: for a streaming chat completion, `stream_options.include_usage` is
    /// set to `true` (added, or merged into the client's `stream_options`); anything else comes
    /// back borrowed and unchanged. `body` must be the body this request was read from.
    ///
    /// The client then sees one more chunk before `[DONE]`, with `choices: []` and the usage;
    /// OpenAI's SDKs expect it.
    pub fn with_stream_usage(&self, body: &'a [u8]) -> Result<Cow<'a, [u8]>, LlmError> {
        if self.api != Api::ChatCompletions || !self.stream {
            return Ok(Cow::Borrowed(body));
        }
        let edit = match self.stream_options {
            None => {
                // A streaming request has members (`stream`), so the new one follows a comma.
                let close = body
                    .iter()
                    .rposition(|&b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
                    .filter(|&at| body.get(at) == Some(&b'}'))
                    .ok_or(LlmError::Splice)?;
                jsonrpc::Edit {
                    at: close..close,
                    with: r#","stream_options":{"include_usage":true}"#.to_owned(),
                }
            }
            Some(slot) => match jsonrpc::json_kind(slot.get()) {
                "null" => jsonrpc::Edit {
                    at: span(body, slot)?,
                    with: r#"{"include_usage":true}"#.to_owned(),
                },
                "an object" => {
                    let found: IncludeUsageSlot<'_> =
                        serde_json::from_str(slot.get()).map_err(LlmError::Request)?;
                    match found.include_usage {
                        Some(value) if value.get() == "true" => return Ok(Cow::Borrowed(body)),
                        Some(value) => jsonrpc::Edit {
                            at: span(body, value)?,
                            with: "true".to_owned(),
                        },
                        None => {
                            let at = span(body, slot)?.start + 1; // just after '{'
                            let inner = slot.get().as_bytes().get(1..).unwrap_or_default();
                            let with = if jsonrpc::first_byte(inner) == Some(b'}') {
                                r#""include_usage":true"#
                            } else {
                                r#""include_usage":true,"#
                            };
                            jsonrpc::Edit {
                                at: at..at,
                                with: with.to_owned(),
                            }
                        }
                    }
                }
                found => return Err(LlmError::StreamOptionsNotObject { found }),
            },
        };
        jsonrpc::splice(body, vec![edit])
            .map(Cow::Owned)
            .ok_or(LlmError::Splice)
    }
}

fn span(body: &[u8], raw: &RawValue) -> Result<Range<usize>, LlmError> {
    jsonrpc::span_in(body, raw.get()).ok_or(LlmError::Splice)
}

/// The tokens one call used, and whether they were read or estimated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    /// All input tokens, cached ones included.
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The part of `input_tokens` read from the provider's prompt cache.
    pub cache_read_tokens: u64,
    /// The part of `input_tokens` written to the provider's prompt cache (Anthropic).
    pub cache_creation_tokens: u64,
    /// The model the provider says answered (e.g. `gpt-4o-mini-2024-07-18`), when it said.
    pub model: Option<String>,
    /// The counts are an estimate, not the provider's.
    pub estimated: bool,
    /// Why they are an estimate; a fixed phrase, fit for a bounded metric label.
    pub estimate_reason: Option<&'static str>,
}

impl Usage {
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }

    /// An estimate for a response of `response_bytes` whose usage could not be read.
    pub fn estimate(estimate: &Estimate, response_bytes: u64, reason: &'static str) -> Self {
        Self {
            input_tokens: estimate.input_tokens,
            output_tokens: estimate.output_tokens(response_bytes),
            estimated: true,
            estimate_reason: Some(reason),
            ..Self::default()
        }
    }
}

#[derive(Deserialize, Default)]
struct WireUsage<'a> {
    #[serde(default, borrow)]
    prompt_tokens: Option<&'a RawValue>,
    #[serde(default, borrow)]
    completion_tokens: Option<&'a RawValue>,
    #[serde(default, borrow)]
    input_tokens: Option<&'a RawValue>,
    #[serde(default, borrow)]
    output_tokens: Option<&'a RawValue>,
    #[serde(default, borrow)]
    cache_creation_input_tokens: Option<&'a RawValue>,
    #[serde(default, borrow)]
    cache_read_input_tokens: Option<&'a RawValue>,
    #[serde(default, borrow)]
    prompt_tokens_details: LenientObj<Details<'a>>,
    #[serde(default, borrow)]
    input_tokens_details: LenientObj<Details<'a>>,
}

#[derive(Deserialize, Default)]
struct Details<'a> {
    #[serde(default, borrow)]
    cached_tokens: Option<&'a RawValue>,
}

/// A response body or one stream event: usage is at the top (JSON responses, chat chunks,
/// `message_delta`), under `response` (responses events) or under `message` (`message_start`).
#[derive(Deserialize)]
struct WireEvent<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: LenientStr<'a>,
    #[serde(default, borrow)]
    model: LenientStr<'a>,
    #[serde(default, borrow)]
    usage: LenientObj<WireUsage<'a>>,
    #[serde(default, borrow)]
    response: LenientObj<Nested<'a>>,
    #[serde(default, borrow)]
    message: LenientObj<Nested<'a>>,
}

#[derive(Deserialize)]
struct Nested<'a> {
    #[serde(default, borrow)]
    model: LenientStr<'a>,
    #[serde(default, borrow)]
    usage: LenientObj<WireUsage<'a>>,
}

/// Counts as read, before they are known complete. For Anthropic `input` is the uncached part.
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    input: Option<u64>,
    output: Option<u64>,
    cache_read: Option<u64>,
    cache_creation: Option<u64>,
}

impl Counts {
    fn read<'a>(api: Api, usage: &WireUsage<'a>) -> Result<Self, LlmError> {
        fn details<'a>(d: &LenientObj<Details<'a>>) -> Option<&'a RawValue> {
            d.0.as_ref().and_then(|d| d.cached_tokens)
        }
        Ok(match api {
            Api::ChatCompletions => Self {
                input: count(usage.prompt_tokens, "prompt_tokens")?,
                output: count(usage.completion_tokens, "completion_tokens")?,
                cache_read: count(
                    details(&usage.prompt_tokens_details),
                    "prompt_tokens_details.cached_tokens",
                )?,
                cache_creation: None,
            },
            Api::Responses => Self {
                input: count(usage.input_tokens, "input_tokens")?,
                output: count(usage.output_tokens, "output_tokens")?,
                cache_read: count(
                    details(&usage.input_tokens_details),
                    "input_tokens_details.cached_tokens",
                )?,
                cache_creation: None,
            },
            Api::AnthropicMessages => Self {
                input: count(usage.input_tokens, "input_tokens")?,
                output: count(usage.output_tokens, "output_tokens")?,
                cache_read: count(usage.cache_read_input_tokens, "cache_read_input_tokens")?,
                cache_creation: count(
                    usage.cache_creation_input_tokens,
                    "cache_creation_input_tokens",
                )?,
            },
        })
    }

    /// Later cumulative values replace earlier ones; a field the newer block leaves out (or
    /// sends as `null`) keeps its value.
    fn update(&mut self, newer: Self) {
        self.input = newer.input.or(self.input);
        self.output = newer.output.or(self.output);
        self.cache_read = newer.cache_read.or(self.cache_read);
        self.cache_creation = newer.cache_creation.or(self.cache_creation);
    }

    /// Input and output are both known.
    fn complete(&self) -> bool {
        self.input.is_some() && self.output.is_some()
    }

    /// The usage these counts make; unknown fields read as 0.
    fn usage(&self, api: Api, model: Option<String>) -> Usage {
        let cache_read = self.cache_read.unwrap_or(0);
        let cache_creation = self.cache_creation.unwrap_or(0);
        let input = self.input.unwrap_or(0);
        let input_tokens = match api {
            Api::AnthropicMessages => input
                .saturating_add(cache_read)
                .saturating_add(cache_creation),
            Api::ChatCompletions | Api::Responses => input,
        };
        Usage {
            input_tokens,
            output_tokens: self.output.unwrap_or(0),
            // A cached part larger than the whole is a provider bug; never price more than all.
            cache_read_tokens: cache_read.min(input_tokens),
            cache_creation_tokens: cache_creation.min(input_tokens.saturating_sub(cache_read)),
            model,
            estimated: false,
            estimate_reason: None,
        }
    }
}

/// A token count: absent and `null` are `None`; anything but a non-negative integer is an error.
fn count(raw: Option<&RawValue>, field: &'static str) -> Result<Option<u64>, LlmError> {
    raw.map(|raw| {
        raw.get()
            .parse::<u64>()
            .map_err(|_| LlmError::BadCount { field })
    })
    .transpose()
}

/// The usage of a complete (non-streaming) JSON response.
pub fn response_usage(api: Api, body: &[u8]) -> Result<Usage, LlmError> {
    let event: WireEvent<'_> = serde_json::from_slice(body).map_err(LlmError::Response)?;
    let usage = event.usage.0.ok_or(LlmError::NoUsage)?;
    let counts = Counts::read(api, &usage)?;
    let (input, output) = match api {
        Api::ChatCompletions => ("prompt_tokens", "completion_tokens"),
        Api::Responses | Api::AnthropicMessages => ("input_tokens", "output_tokens"),
    };
    if counts.input.is_none() {
        return Err(LlmError::MissingCount { field: input });
    }
    if counts.output.is_none() {
        return Err(LlmError::MissingCount { field: output });
    }
    Ok(counts.usage(api, event.model.into_string()))
}

/// [`response_usage`], or an estimate (with the reason) when the usage cannot be read.
pub fn response_usage_or_estimate(api: Api, body: &[u8], estimate: &Estimate) -> Usage {
    response_usage(api, body).unwrap_or_else(|err| {
        let bytes = u64::try_from(body.len()).unwrap_or(u64::MAX);
        Usage::estimate(estimate, bytes, err.estimate_reason())
    })
}

/// Where in the SSE line the parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Reading the field name (up to ':' or the end of the line).
    Field,
    /// In a `data:` value.
    Data,
    /// In an `event:` value.
    Event,
    /// In a value nobody reads (`id:`, `retry:`, comments).
    Skip,
}

const FIELD_CAP: usize = 8;
const EVENT_NAME_CAP: usize = 32;
const HEAD_CAP: usize = 64;

/// Watches an SSE response go by and reads its usage. Feed every chunk as it is forwarded
/// (chunks may split anywhere: inside a line, a UTF-8 character or a number); call
/// [`finish`](Self::finish) when the stream ends, cleanly or not.
///
/// It holds one event's data at a time, at most [`MAX_EVENT_BYTES`], and parses only events that
/// carry a `"usage": {…}` object — the chat chunks before the last say `"usage": null` and are
/// skipped by a byte scan.
#[derive(Debug)]
pub struct UsageStream {
    api: Api,
    estimate: Estimate,
    bytes: u64,

    line: Line,
    field: [u8; FIELD_CAP],
    field_len: usize,
    after_cr: bool,
    skip_space: bool,
    event_name: [u8; EVENT_NAME_CAP],
    event_name_len: usize,
    data: Vec<u8>,
    data_lines: usize,
    /// The first bytes of an event that outgrew [`MAX_EVENT_BYTES`]; `data` then holds its tail.
    head: Option<([u8; HEAD_CAP], usize)>,

    counts: Counts,
    /// The event that carries the final usage arrived (chat usage chunk, `response.completed`,
    /// `message_delta`).
    got_final: bool,
    /// Anthropic's `message_start` arrived.
    got_start: bool,
    done: bool,
    model: Option<String>,
    malformed: bool,
}

impl UsageStream {
    /// A watcher for a response of `api`; `estimate` fills in what the stream fails to say.
    pub fn new(api: Api, estimate: Estimate) -> Self {
        Self {
            api,
            estimate,
            bytes: 0,
            line: Line::Field,
            field: [0; FIELD_CAP],
            field_len: 0,
            after_cr: false,
            skip_space: false,
            event_name: [0; EVENT_NAME_CAP],
            event_name_len: 0,
            data: Vec::new(),
            data_lines: 0,
            head: None,
            counts: Counts::default(),
            got_final: false,
            got_start: false,
            done: false,
            model: None,
            malformed: false,
        }
    }

    /// Reads one chunk of the response, exactly as it is forwarded.
    pub fn feed(&mut self, mut chunk: &[u8]) {
        self.bytes = self
            .bytes
            .saturating_add(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
        while let Some((&first, rest)) = chunk.split_first() {
            if self.after_cr {
                // "\r\n" is one line ending, even split across chunks.
                self.after_cr = false;
                if first == b'\n' {
                    chunk = rest;
                    continue;
                }
            }
            if self.line == Line::Field {
                match first {
                    b'\n' | b'\r' => self.end_line(first),
                    b':' => self.begin_value(),
                    byte => {
                        if let Some(slot) = self.field.get_mut(self.field_len) {
                            *slot = byte;
                        }
                        self.field_len = self.field_len.saturating_add(1);
                    }
                }
                chunk = rest;
                continue;
            }
            let end = chunk.iter().position(|&b| b == b'\n' || b == b'\r');
            let (mut value, after) = match end {
                Some(at) => chunk.split_at(at),
                None => (chunk, &[][..]),
            };
            if self.skip_space && !value.is_empty() {
                self.skip_space = false;
                value = value.strip_prefix(b" ").unwrap_or(value);
            }
            match self.line {
                Line::Data => self.push_data(value),
                Line::Event => self.push_event_name(value),
                Line::Field | Line::Skip => {}
            }
            match after.split_first() {
                Some((&eol, rest)) => {
                    self.end_line(eol);
                    chunk = rest;
                }
                None => chunk = after,
            }
        }
    }

    /// The usage the stream reported, or the best estimate (with its reason) when it did not.
    pub fn finish(mut self) -> Usage {
        if self.data_lines > 0 {
            // The stream ended without the blank line that ends its last event.
            self.dispatch();
        }
        let complete = self.got_final
            && self.counts.complete()
            && (self.api != Api::AnthropicMessages || self.got_start);
        if complete {
            return self.counts.usage(self.api, self.model);
        }
        let reason = if self.malformed {
            "the usage block could not be read"
        } else {
            match self.api {
                Api::ChatCompletions if self.done => {
                    "the stream carried no usage (stream_options.include_usage was not honoured)"
                }
                Api::ChatCompletions => "the stream ended before its usage chunk",
                Api::Responses => "the stream ended before response.completed",
                Api::AnthropicMessages if self.got_start => {
                    "the stream ended before message_delta's usage"
                }
                Api::AnthropicMessages => "the stream ended before message_start",
            }
        };
        // What was read stands (Anthropic's input from message_start); the rest is estimated.
        let mut usage = self.counts.usage(self.api, self.model);
        if self.counts.input.is_none() {
            // Cache counts may have come without the plain input; the whole is never less.
            usage.input_tokens = self.estimate.input_tokens.max(
                usage
                    .cache_read_tokens
                    .saturating_add(usage.cache_creation_tokens),
            );
        }
        usage.output_tokens = usage
            .output_tokens
            .max(self.estimate.output_tokens(self.bytes));
        usage.estimated = true;
        usage.estimate_reason = Some(reason);
        usage
    }

    fn field_is(&self, name: &[u8]) -> bool {
        self.field_len == name.len() && self.field.get(..name.len()) == Some(name)
    }

    fn begin_value(&mut self) {
        self.line = if self.field_is(b"data") {
            self.begin_data_line();
            Line::Data
        } else if self.field_is(b"event") {
            self.event_name_len = 0;
            Line::Event
        } else {
            Line::Skip
        };
        self.skip_space = true;
    }

    fn end_line(&mut self, eol: u8) {
        self.after_cr = eol == b'\r';
        if self.line == Line::Field {
            if self.field_len == 0 {
                self.dispatch();
            } else if self.field_is(b"data") {
                // A bare "data" line is a data line with an empty value.
                self.begin_data_line();
            }
        }
        self.line = Line::Field;
        self.field_len = 0;
        self.skip_space = false;
    }

    fn begin_data_line(&mut self) {
        if self.data_lines > 0 {
            self.push_data(b"\n");
        }
        self.data_lines = self.data_lines.saturating_add(1);
    }

    fn push_event_name(&mut self, value: &[u8]) {
        for &byte in value {
            if let Some(slot) = self.event_name.get_mut(self.event_name_len) {
                *slot = byte;
            }
            self.event_name_len = self.event_name_len.saturating_add(1);
        }
    }

    fn push_data(&mut self, value: &[u8]) {
        if self.head.is_none() {
            if self.data.len().saturating_add(value.len()) <= MAX_EVENT_BYTES {
                self.data.extend_from_slice(value);
                return;
            }
            // Too big to hold: remember how it starts, keep only how it ends. The head is the
            // event's first bytes however the chunks fell.
            let mut head = [0; HEAD_CAP];
            let mut kept = 0;
            for (slot, &byte) in head.iter_mut().zip(self.data.iter().chain(value)) {
                *slot = byte;
                kept += 1;
            }
            self.head = Some((head, kept));
        }
        let value = value
            .get(value.len().saturating_sub(TAIL_BYTES)..)
            .unwrap_or(value);
        let keep = TAIL_BYTES.saturating_sub(value.len());
        let cut = self.data.len().saturating_sub(keep);
        if cut > 0 {
            self.data.drain(..cut);
        }
        self.data.extend_from_slice(value);
    }

    /// Handles the event just ended and clears it.
    fn dispatch(&mut self) {
        if self.data_lines > 0 {
            match self.head {
                None => self.read_event(),
                Some((head, len)) => self.salvage_oversized(head.get(..len).unwrap_or_default()),
            }
        }
        self.data.clear();
        if self.data.capacity() > TAIL_BYTES {
            self.data.shrink_to(TAIL_BYTES);
        }
        self.data_lines = 0;
        self.head = None;
        self.event_name_len = 0;
    }

    fn read_event(&mut self) {
        let data = self.data.as_slice();
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        if usage_object_at(data).is_none() {
            return;
        }
        let event: WireEvent<'_> = match serde_json::from_slice(data) {
            Ok(event) => event,
            Err(_) => {
                self.malformed = true;
                return;
            }
        };
        let (usage, model, is_final, is_start) = match self.api {
            Api::ChatCompletions => (event.usage.0, event.model, true, false),
            Api::Responses => {
                let terminal = matches!(
                    event.kind.0.as_deref(),
                    Some("response.completed" | "response.incomplete" | "response.failed")
                );
                match event.response.0 {
                    Some(response) if terminal => (response.usage.0, response.model, true, false),
                    _ => return,
                }
            }
            Api::AnthropicMessages => match event.kind.0.as_deref() {
                Some("message_start") => match event.message.0 {
                    Some(message) => (message.usage.0, message.model, false, true),
                    None => return,
                },
                Some("message_delta") => (event.usage.0, event.model, true, false),
                _ => return,
            },
        };
        let Some(usage) = usage else {
            return;
        };
        match Counts::read(self.api, &usage) {
            Ok(counts) => {
                self.counts.update(counts);
                self.got_final |= is_final;
                self.got_start |= is_start;
            }
            Err(_) => self.malformed = true,
        }
        if let Some(model) = model.0 {
            self.model = Some(model.into_owned());
        }
    }

    /// An event over [`MAX_EVENT_BYTES`]: only a terminal responses event is worth reading, and
    /// its top-level `usage` sits near its end (after `output`), so it is read from the tail.
    fn salvage_oversized(&mut self, head: &[u8]) {
        const TERMINAL: [&[u8]; 3] = [
            b"response.completed",
            b"response.incomplete",
            b"response.failed",
        ];
        let name = self
            .event_name
            .get(..self.event_name_len)
            .unwrap_or_default();
        let terminal = TERMINAL.iter().any(|t| name == *t || contains(head, t));
        if self.api != Api::Responses || !terminal {
            return;
        }
        let data = self.data.as_slice();
        let Some(at) = last_usage_object_at(data) else {
            self.malformed = true;
            return;
        };
        let object = data.get(at..).unwrap_or_default();
        let mut values = serde_json::Deserializer::from_slice(object).into_iter::<WireUsage<'_>>();
        match values.next() {
            Some(Ok(usage)) => match Counts::read(self.api, &usage) {
                Ok(counts) => {
                    self.counts.update(counts);
                    self.got_final = true;
                }
                Err(_) => self.malformed = true,
            },
            _ => self.malformed = true,
        }
    }
}

/// Where the object of the first `"usage": {` in `data` starts; `None` when every `"usage"`
/// member is `null` (or there is none). A cheap filter before a parse.
fn usage_object_at(data: &[u8]) -> Option<usize> {
    usage_objects(data).next()
}

/// Like [`usage_object_at`], the last one.
fn last_usage_object_at(data: &[u8]) -> Option<usize> {
    usage_objects(data).last()
}

fn usage_objects(data: &[u8]) -> impl Iterator<Item = usize> + '_ {
    const KEY: &[u8] = b"\"usage\"";
    data.windows(KEY.len())
        .enumerate()
        .filter(|(_, window)| *window == KEY)
        .filter_map(move |(at, _)| {
            let mut rest = data.get(at + KEY.len()..)?.iter().enumerate();
            let colon = rest.find(|(_, b)| !b.is_ascii_whitespace())?;
            if *colon.1 != b':' {
                return None;
            }
            let open = rest.find(|(_, b)| !b.is_ascii_whitespace())?;
            (*open.1 == b'{').then_some(at + KEY.len() + open.0)
        })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
