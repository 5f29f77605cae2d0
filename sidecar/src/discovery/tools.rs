//! MCP `tools/list` answers, filtered to the tools this agent may call.
//!
//! A tool server lists everything it has; an agent should see only what policy lets it call, so
//! a model never plans around a tool whose call would be refused (or learns that a tool it may
//! not touch exists). Each listed tool is decided with Cedar's `call_tool`, in the context of
//! the run the listing belongs to, exactly as a call of it would be.
//!
//! Streamable HTTP answers a request with JSON or with an SSE stream. A JSON answer is one
//! message: it is read (bounded), filtered and sent on. An SSE answer is filtered event by event
//! as the events arrive, so a server that keeps the stream open after its answer (notifications,
//! progress) is never waited for and nothing but the tool list is held back. Any other answer
//! to any other request streams through untouched: only `tools/list` answers, and the session's
//! GET stream (where a resumed stream may replay one), are read.
//!
//! An answer that cannot be read as MCP is refused rather than passed on: unfiltered, it would
//! list the tools policy hides.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{Response, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, SizeHint};

use crate::authz::{Action, CallContext, CallRequest, Resource};
use crate::bundle::Snapshot;
use crate::deny::{Denial, Kind};
use crate::forward::{Body, BoxError, full};
use crate::protocol::mcp;

/// Largest `tools/list` answer, or SSE event, that is read to be filtered.
pub const MAX_LISTING: usize = 8 * 1024 * 1024;

/// Decides, per tool name, whether this agent may call a tool of one server in one run.
#[derive(Clone)]
pub struct ToolPolicy {
    snap: Arc<Snapshot>,
    server: Arc<str>,
    context: Arc<CallContext>,
}

impl ToolPolicy {
    pub fn new(snap: Arc<Snapshot>, server: &str, context: CallContext) -> Self {
        ToolPolicy {
            snap,
            server: server.into(),
            context: Arc::new(context),
        }
    }

    /// Whether `tool` of this server may be called: Cedar's `call_tool`, as for a call.
    pub fn allows(&self, tool: &str) -> bool {
        let me = &self.snap.bundle.content.agent.name;
        self.snap
            .authorizer
            .decide(&CallRequest {
                principal: me,
                action: Action::CallTool,
                resource: Resource::Tool {
                    server: &self.server,
                    tool,
                },
                context: &self.context,
            })
            .allowed
    }
}

/// Whether the answer to a request with this MCP method (`None`: a bodyless session GET) must be
/// read for tool lists.
pub fn wants_filter(method: Option<&str>, http_method: &http::Method) -> bool {
    match method {
        Some(m) => m == "tools/list",
        None => http_method == http::Method::GET,
    }
}

/// The answer with every tool `policy` refuses removed from it.
pub async fn filter_answer<B>(
    policy: ToolPolicy,
    parts: http::response::Parts,
    body: B,
    listing: bool,
) -> Result<Response<Body>, Denial>
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"));
    let mut parts = parts;
    if sse {
        parts.headers.remove(header::CONTENT_LENGTH);
        let body = FilteredSse {
            inner: body,
            pending: BytesMut::new(),
            scanned: 0,
            line_start: 0,
            policy,
            ended: false,
        };
        return Ok(Response::from_parts(parts, Body::new(body)));
    }
    if !listing {
        // The session GET answered with something other than a stream (405 from a server
        // without one, say): no tool list in it.
        return Ok(Response::from_parts(
            parts,
            body.map_err(Into::into).boxed(),
        ));
    }
    let bytes = Limited::new(body, MAX_LISTING)
        .collect()
        .await
        .map_err(|e| unreadable(&policy, &e.to_string()))?
        .to_bytes();
    let filtered = mcp::filter_tools_list(&bytes, |t| policy.allows(t))
        .map_err(|e| unreadable(&policy, &e.to_string()))?;
    parts.headers.remove(header::CONTENT_LENGTH);
    Ok(Response::from_parts(parts, full(filtered)))
}

fn unreadable(policy: &ToolPolicy, why: &str) -> Denial {
    Denial::new(
        Kind::Upstream,
        format!(
            "the tools/list answer of tool server {} cannot be filtered by policy ({why}); it is not passed on unfiltered",
            policy.server
        ),
    )
}

/// An SSE body filtered one event at a time: bytes are held only until their event is complete.
struct FilteredSse<B> {
    inner: B,
    /// The start of an event not yet complete.
    pending: BytesMut,
    /// How much of `pending` has been scanned for the end of an event, and where its last line
    /// starts: each byte is scanned once, however the event is split into frames.
    scanned: usize,
    line_start: usize,
    policy: ToolPolicy,
    ended: bool,
}

impl<B> FilteredSse<B> {
    /// Takes the complete events at the start of `pending`: up to and including its last blank
    /// line (an event ends with one; lines end with LF or CRLF).
    fn complete_events(&mut self) -> Option<BytesMut> {
        let mut end = 0;
        for i in self.scanned..self.pending.len() {
            if self.pending[i] == b'\n' {
                let line = &self.pending[self.line_start..i];
                if line.is_empty() || line == b"\r" {
                    end = i + 1;
                }
                self.line_start = i + 1;
            }
        }
        self.scanned = self.pending.len();
        if end == 0 {
            return None;
        }
        self.scanned -= end;
        self.line_start -= end;
        Some(self.pending.split_to(end))
    }

    fn filter(&self, events: &[u8]) -> Result<Bytes, BoxError> {
        mcp::filter_tools_list(events, |t| self.policy.allows(t))
            .map(Bytes::from)
            .map_err(|e| BoxError::from(unreadable(&self.policy, &e.to_string()).message))
    }
}

impl<B> hyper::body::Body for FilteredSse<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        // Trailers pass through.
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    this.pending.extend_from_slice(&data);
                    let Some(events) = this.complete_events() else {
                        if this.pending.len() > MAX_LISTING {
                            this.ended = true;
                            return Poll::Ready(Some(Err(BoxError::from(format!(
                                "an SSE event of tool server {} is larger than {MAX_LISTING} bytes; it cannot be filtered by policy",
                                this.policy.server
                            )))));
                        }
                        continue;
                    };
                    return Poll::Ready(Some(this.filter(&events).map(Frame::data)));
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    if this.pending.is_empty() {
                        return Poll::Ready(None);
                    }
                    // The stream ended inside an event: filter what there is.
                    let rest = this.pending.split();
                    (this.scanned, this.line_start) = (0, 0);
                    return Poll::Ready(Some(this.filter(&rest).map(Frame::data)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests;
