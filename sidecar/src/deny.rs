//! Refusals on the wire. Every refusal names what refused the call (the rule), the edge
//! (caller → callee) and the run, with a status a client can act on: 403 policy, 429 rate limit
//! (with `Retry-After`), 508 depth or cycle, 402 budget exhausted or run halted, 504 stall or
//! deadline, 503 not ready, 502 a failed upstream. A JSON-RPC caller gets a JSON-RPC error object carrying its request's id.

use http::{HeaderValue, Response, StatusCode, header};
use serde_json::{Value, json};

use crate::authz::Decision;
use crate::forward::{Body, full};
use crate::limits::Breach;

/// Header naming the kind of refusal, so callers and tests need not parse bodies.
pub const DENIED_HEADER: &str = "ringfence-denied";
/// Response header naming the rule that refused the call, so the caller's sidecar can record it.
pub const RULE_HEADER: &str = "ringfence-rule";

/// What kind of refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Cedar denied the call.
    Policy,
    /// The call had no context and this agent may not start a run.
    StartRun,
    /// The context header was forged, modified, or not for this hop.
    Context,
    /// Delegation depth limit.
    Depth,
    /// Re-entry into an agent already on the run's path.
    Cycle,
    /// Per-agent invocation rate limit.
    RateLimit,
    /// The run's wall-clock deadline passed.
    Deadline,
    /// A child did not answer in time.
    Timeout,
    /// The sidecar holds no SVID or bundle yet.
    NotReady,
    /// The request itself is unusable (unknown target, oversized or malformed body).
    BadRequest,
    /// The next hop could not be reached.
    Upstream,
    /// The run's token or cost budget is spent, or the run was halted.
    Budget,
}

impl Kind {
    /// Every kind, for bounded metric labels.
    pub const ALL: [Kind; 12] = [
        Kind::Policy,
        Kind::StartRun,
        Kind::Context,
        Kind::Depth,
        Kind::Cycle,
        Kind::RateLimit,
        Kind::Deadline,
        Kind::Timeout,
        Kind::NotReady,
        Kind::BadRequest,
        Kind::Upstream,
        Kind::Budget,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Policy => "policy",
            Kind::StartRun => "start_run",
            Kind::Context => "context",
            Kind::Depth => "depth",
            Kind::Cycle => "cycle",
            Kind::RateLimit => "rate_limit",
            Kind::Deadline => "deadline",
            Kind::Timeout => "timeout",
            Kind::NotReady => "not_ready",
            Kind::BadRequest => "bad_request",
            Kind::Upstream => "upstream",
            Kind::Budget => "budget",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            Kind::Policy | Kind::StartRun | Kind::Context => StatusCode::FORBIDDEN,
            Kind::Depth | Kind::Cycle => StatusCode::LOOP_DETECTED,
            Kind::RateLimit => StatusCode::TOO_MANY_REQUESTS,
            Kind::Deadline | Kind::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Kind::NotReady => StatusCode::SERVICE_UNAVAILABLE,
            Kind::BadRequest => StatusCode::BAD_REQUEST,
            Kind::Upstream => StatusCode::BAD_GATEWAY,
            Kind::Budget => StatusCode::PAYMENT_REQUIRED,
        }
    }

    /// JSON-RPC error code, in the implementation-defined server range, clear of the codes A2A
    /// and MCP define.
    pub fn jsonrpc_code(self) -> i64 {
        match self {
            Kind::Policy | Kind::StartRun | Kind::Context => -32050,
            Kind::Depth | Kind::Cycle => -32051,
            Kind::RateLimit => -32052,
            Kind::Deadline | Kind::Timeout => -32053,
            Kind::NotReady => -32054,
            Kind::BadRequest => -32600,
            Kind::Upstream => -32055,
            Kind::Budget => -32056,
        }
    }
}

/// One refusal.
#[derive(Debug, Clone)]
pub struct Denial {
    pub kind: Kind,
    pub message: String,
    pub rule: Option<String>,
    pub edge: Option<String>,
    pub run: Option<String>,
    pub retry_after_secs: Option<u64>,
}

impl Denial {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            rule: None,
            edge: None,
            run: None,
            retry_after_secs: None,
        }
    }

    pub fn rule(mut self, rule: impl Into<String>) -> Self {
        self.rule = Some(rule.into());
        self
    }

    pub fn edge(mut self, caller: &str, callee: &str) -> Self {
        self.edge = Some(format!("{caller} → {callee}"));
        self
    }

    pub fn run(mut self, run: &str) -> Self {
        if !run.is_empty() {
            self.run = Some(run.to_owned());
        }
        self
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs.max(1));
        self
    }

    /// Cedar refused the call: the message says what was refused and why, the rule names the
    /// policies that decided (or the default deny, with what it was about).
    pub fn policy(d: &Decision, what: &str, caller: &str, callee: &str, run: &str) -> Self {
        Self::new(Kind::Policy, format!("{what}: {d}"))
            .rule(rule_names(
                d,
                &format!(
                    "default deny (no policy permits this {})",
                    callee_kind(callee)
                ),
            ))
            .edge(caller, callee)
            .run(run)
    }

    /// A run limit refused the call.
    pub fn breach(b: &Breach, caller: &str, callee: &str, run: &str) -> Self {
        let kind = match b {
            Breach::Depth { .. } => Kind::Depth,
            Breach::Cycle { .. } => Kind::Cycle,
            Breach::RateLimited { .. } => Kind::RateLimit,
            Breach::DeadlineExceeded { .. } => Kind::Deadline,
        };
        let d = Self::new(kind, b.to_string())
            .rule(b.rule())
            .edge(caller, callee)
            .run(run);
        match b.retry_after_secs() {
            Some(secs) => d.retry_after(secs),
            None => d,
        }
    }

    /// The JSON object describing the refusal.
    pub fn detail(&self) -> Value {
        let mut v = json!({
            "status": self.kind.status().as_u16(),
            "reason": self.kind.name(),
            "message": self.message,
        });
        for (k, val) in [
            ("rule", &self.rule),
            ("edge", &self.edge),
            ("run", &self.run),
        ] {
            if let Some(val) = val {
                v[k] = json!(val);
            }
        }
        if let Some(s) = self.retry_after_secs {
            v["retryAfterSeconds"] = json!(s);
        }
        v
    }

    /// The response: a JSON-RPC error with `jsonrpc_id` (the request's id, raw JSON) when the
    /// request was JSON-RPC, plain JSON otherwise.
    pub fn into_response(self, jsonrpc_id: Option<&str>) -> Response<Body> {
        let body = match jsonrpc_id {
            Some(id) => {
                let id: Value = serde_json::from_str(id).unwrap_or(Value::Null);
                json!({
                    "jsonrpc": "2.0",
                    "id": id,
                    "error": {
                        "code": self.kind.jsonrpc_code(),
                        "message": self.message,
                        "data": self.detail(),
                    }
                })
            }
            None => json!({ "error": self.detail() }),
        };
        let mut resp = Response::new(full(serde_json::to_vec(&body).unwrap_or_default()));
        *resp.status_mut() = self.kind.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(DENIED_HEADER, HeaderValue::from_static(self.kind.name()));
        if let Some(v) = self
            .rule
            .as_deref()
            .and_then(|r| HeaderValue::from_str(r).ok())
        {
            h.insert(RULE_HEADER, v);
        }
        if let Some(s) = self.retry_after_secs {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

/// The rules that decided `d`, or `default` when nothing did.
pub fn rule_names(d: &Decision, default: &str) -> String {
    if d.rules.is_empty() {
        default.to_owned()
    } else {
        d.rules
            .iter()
            .map(|r| r.as_ref())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What kind of thing a callee label names: `tool:…`, `model:…` or an agent.
fn callee_kind(callee: &str) -> &'static str {
    if callee.starts_with("tool:") {
        "tool"
    } else if callee.starts_with("model:") {
        "model"
    } else {
        "edge"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(resp: Response<Body>) -> Value {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn a_denial_names_the_rule_the_edge_and_the_run() {
        let resp = Denial::new(Kind::Policy, "research may not invoke orchestrator")
            .rule("default/no-loops/deny[0]")
            .edge("research", "orchestrator")
            .run("01JRUN")
            .into_response(None);
        assert_eq!(resp.status(), StatusCode::FORBIDDEN);
        assert_eq!(resp.headers()[DENIED_HEADER], "policy");
        assert_eq!(resp.headers()[RULE_HEADER], "default/no-loops/deny[0]");
        let v = body(resp).await;
        assert_eq!(v["error"]["rule"], "default/no-loops/deny[0]");
        assert_eq!(v["error"]["edge"], "research → orchestrator");
        assert_eq!(v["error"]["run"], "01JRUN");
    }

    #[tokio::test]
    async fn a_jsonrpc_caller_gets_an_error_object_with_its_id() {
        let resp = Denial::new(Kind::RateLimit, "slow down")
            .retry_after(3)
            .into_response(Some("\"req-7\""));
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "3");
        let v = body(resp).await;
        assert_eq!(v["jsonrpc"], "2.0");
        assert_eq!(v["id"], "req-7");
        assert_eq!(v["error"]["code"], -32052);
        assert_eq!(v["error"]["data"]["reason"], "rate_limit");
    }
}
