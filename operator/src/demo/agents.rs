//! The demo's agents — orchestrator, research, writer, critic — as small A2A servers in this
//! process. Each answers JSON-RPC `SendMessage` and makes its own calls through its sidecar's
//! outbound listener (`/agents/<name>/`, `/tools/<server>`, `/models/openai/v1/...`),
//! forwarding the `ringfence-context` header it was handed, as an agent built on an SDK forwards
//! `traceparent`. What they do depends on the act ([`Behaviour`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::output::Progress;
use super::scenario::Behaviour;
use super::upstream::{self, Received, Reply, json_reply};

/// The sidecar's context header, and the header the root uses to say on whose behalf it runs.
const CONTEXT: &str = "ringfence-context";
const USER: &str = "ringfence-user";
/// The header a sidecar sets on its own refusals (never on an agent's answer).
const DENIED: &str = "ringfence-denied";
/// The person the demo's runs are for.
pub const USER_ID: &str = "user:tomas";
/// Longest an agent waits for one outbound call: far above any limit the demo sets, so a
/// loaded machine never turns a slow answer into a failure.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest answer an agent reads.
const MAX_ANSWER: usize = 4 * 1024 * 1024;
/// How many times the loop may come back to the orchestrator before the demo agents stop it
/// themselves: a safety net should every control fail (the demo then reports the act failed).
pub const MAX_ROUNDS: usize = 40;

/// Why an agent's call did not succeed: the refusal a sidecar answered with (status, reason,
/// rule, edge, run, message), or a failure of the call itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub status: u16,
    /// The sidecar's denial as it sent it (`reason`, `rule`, `edge`, `run`, `message`, ...).
    pub detail: Value,
}

impl Refusal {
    fn field(&self, k: &str) -> Option<&str> {
        self.detail.get(k).and_then(Value::as_str)
    }
    pub fn reason(&self) -> &str {
        self.field("reason").unwrap_or("error")
    }
    pub fn rule(&self) -> Option<&str> {
        self.field("rule")
    }
    pub fn edge(&self) -> Option<&str> {
        self.field("edge")
    }
    pub fn run(&self) -> Option<&str> {
        self.field("run")
    }
    pub fn message(&self) -> &str {
        self.field("message").unwrap_or("no message")
    }

    /// A failure of the demo itself (not a sidecar's refusal).
    pub fn demo(status: u16, reason: &str, message: String) -> Self {
        Self {
            status,
            detail: json!({"status": status, "reason": reason, "message": message}),
        }
    }

    /// Reads a refusal from an answer: a sidecar's denial is a JSON-RPC error whose `data` is
    /// the denial, or `{"error": denial}` for calls that are not JSON-RPC.
    pub fn from_answer(status: u16, body: &[u8]) -> Self {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let detail = [&v["error"]["data"], &v["error"]]
            .into_iter()
            .find(|d| d.get("message").is_some_and(Value::is_string))
            .cloned();
        match detail {
            Some(detail) => Self { status, detail },
            None => Self::demo(
                status,
                "upstream",
                format!(
                    "answered {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                ),
            ),
        }
    }
}

/// What the agents share with the demo driver: the act's behaviour and counters.
pub struct Stage {
    behaviour: RwLock<Behaviour>,
    /// Outbound calls made in the current act: the calls the run ledger must end up holding.
    calls: AtomicUsize,
    /// Times the loop came back to the orchestrator in the current act.
    rounds: AtomicUsize,
    /// Tokens the model reported in the current act.
    tokens: AtomicU64,
    stop: watch::Receiver<bool>,
    progress: Progress,
}

impl Stage {
    pub fn new(stop: watch::Receiver<bool>, progress: Progress) -> Arc<Self> {
        Arc::new(Self {
            behaviour: RwLock::new(Behaviour::Loop),
            calls: AtomicUsize::new(0),
            rounds: AtomicUsize::new(0),
            tokens: AtomicU64::new(0),
            stop,
            progress,
        })
    }

    /// Starts an act: new behaviour, counters at zero.
    pub fn begin(&self, behaviour: Behaviour) {
        *self
            .behaviour
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = behaviour;
        self.calls.store(0, Ordering::SeqCst);
        self.rounds.store(0, Ordering::SeqCst);
        self.tokens.store(0, Ordering::SeqCst);
    }

    fn behaviour(&self) -> Behaviour {
        *self
            .behaviour
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Outbound calls the agents made in this act.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::SeqCst)
    }

    pub fn rounds(&self) -> usize {
        self.rounds.load(Ordering::SeqCst)
    }
}

/// One agent's calls while serving one request: through its sidecar, with the run's context.
struct Caller<'a> {
    name: &'a str,
    outbound: SocketAddr,
    stage: &'a Stage,
    /// The context this agent was handed, or (for the root) the one its sidecar gave back on
    /// its first call.
    ctx: Option<String>,
}

impl Caller<'_> {
    async fn post(&mut self, path: &str, body: Value) -> Result<Value, Refusal> {
        self.stage.calls.fetch_add(1, Ordering::SeqCst);
        let mut headers = vec![("content-type", "application/json".to_owned())];
        match &self.ctx {
            Some(ctx) => headers.push((CONTEXT, ctx.clone())),
            None => headers.push((USER, USER_ID.to_owned())),
        }
        let answer = tokio::time::timeout(
            CALL_TIMEOUT,
            post(self.outbound, path, &headers, body.to_string()),
        )
        .await;
        let (status, resp_headers, bytes) = match answer {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                return Err(Refusal::demo(
                    502,
                    "unreachable",
                    format!("{}'s sidecar could not be reached: {e}", self.name),
                ));
            }
            Err(_) => {
                return Err(Refusal::demo(
                    504,
                    "demo-timeout",
                    format!("no answer within {}s", CALL_TIMEOUT.as_secs()),
                ));
            }
        };
        // The root agent's first call started the run: its sidecar hands back the run's
        // context, which the agent forwards on its later calls of the same run.
        if self.ctx.is_none()
            && let Some(v) = resp_headers.get(CONTEXT).and_then(|v| v.to_str().ok())
        {
            self.ctx = Some(v.to_owned());
        }
        if !status.is_success() {
            let refusal = Refusal::from_answer(status.as_u16(), &bytes);
            // Said once, by the agent whose own sidecar refused; the agents above only pass
            // the refusal on.
            if resp_headers.contains_key(DENIED) {
                self.stage.progress.step(&format!(
                    "✗ {} refused: {} {} by {}: {}",
                    refusal.edge().unwrap_or(self.name),
                    refusal.status,
                    refusal.reason(),
                    refusal.rule().unwrap_or("-"),
                    refusal.message()
                ));
            }
            return Err(refusal);
        }
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if let Some(err) = v.get("error").filter(|e| !e.is_null()) {
            return Err(Refusal::demo(
                500,
                "error",
                format!("{path} answered with an error: {err}"),
            ));
        }
        Ok(v)
    }

    /// Asks the model; returns its answer.
    async fn think(&mut self, about: &str) -> Result<String, Refusal> {
        let v = self
            .post(
                "/models/openai/v1/chat/completions",
                json!({"model": upstream::MODEL, "max_tokens": 400, "messages": [{"role": "user", "content": about}]}),
            )
            .await?;
        let tokens = v["usage"]["total_tokens"].as_u64().unwrap_or(0);
        self.stage.tokens.fetch_add(tokens, Ordering::SeqCst);
        Ok(v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Calls an MCP tool; returns its text.
    async fn tool(&mut self, server: &str, tool: &str) -> Result<String, Refusal> {
        let v = self
            .post(
                &format!("/tools/{server}"),
                json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": {}}}),
            )
            .await?;
        Ok(v["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }

    /// Delegates to another agent with A2A `SendMessage`; returns its answer's text.
    async fn invoke(&mut self, agent: &str, text: &str) -> Result<String, Refusal> {
        let v = self
            .post(&format!("/agents/{agent}/"), send_message(text))
            .await?;
        Ok(v["result"]["message"]["parts"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    }
}

/// An A2A v1.0 JSON-RPC `SendMessage` request.
pub fn send_message(text: &str) -> Value {
    let id = ulid::Ulid::new().to_string();
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "method": "SendMessage",
        "params": {"message": {"role": "ROLE_USER", "messageId": id, "parts": [{"text": text}]}}
    })
}

/// Why a call got no answer at all.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("the HTTP exchange failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("cannot build the request: {0}")]
    Request(#[from] http::Error),
    #[error("cannot read the answer (over {MAX_ANSWER} bytes, or cut off): {0}")]
    Answer(String),
}

/// One POST on a fresh loopback connection: status, headers, body.
pub async fn post(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, String)],
    body: String,
) -> Result<(StatusCode, HeaderMap, Bytes), CallError> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut b = Request::builder()
        .method(Method::POST)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        b = b.header(*k, v);
    }
    let resp = sender
        .send_request(b.body(Full::new(Bytes::from(body)))?)
        .await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = Limited::new(resp.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| CallError::Answer(e.to_string()))?
        .to_bytes();
    Ok((status, headers, bytes))
}

/// Serves one agent: `SendMessage` in, its behaviour's calls out.
pub async fn handle(
    name: &'static str,
    outbound: SocketAddr,
    stage: Arc<Stage>,
    r: Received,
) -> Reply {
    let req: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    let id = req.get("id").cloned().unwrap_or(Value::Null);
    if req["method"] != "SendMessage" {
        return json_reply(
            StatusCode::OK,
            &json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "the demo agents answer SendMessage only"}}),
        );
    }
    let text = req["params"]["message"]["parts"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let mut caller = Caller {
        name,
        outbound,
        stage: &stage,
        ctx: r
            .headers
            .get(CONTEXT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    };
    let outcome = act(&mut caller, &text).await;
    match outcome {
        Ok(answer) => json_reply(
            StatusCode::OK,
            &json!({"jsonrpc": "2.0", "id": id, "result": {"message": {
                "role": "ROLE_AGENT",
                "messageId": ulid::Ulid::new().to_string(),
                "parts": [{"text": answer}]
            }}}),
        ),
        // The refusal travels back up the chain unchanged, so whoever started the run learns
        // which rule stopped it and where.
        Err(refusal) => json_reply(
            StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_GATEWAY),
            &json!({"jsonrpc": "2.0", "id": id, "error": {
                "code": -32000,
                "message": refusal.message(),
                "data": refusal.detail,
            }}),
        ),
    }
}

/// What `caller` does with a request in the current act.
async fn act(c: &mut Caller<'_>, text: &str) -> Result<String, Refusal> {
    let stage = c.stage;
    let say = |line: String| stage.progress.step(&line);
    match (stage.behaviour(), c.name) {
        (Behaviour::Loop, "orchestrator") => {
            let round = stage.rounds.fetch_add(1, Ordering::SeqCst) + 1;
            if round > MAX_ROUNDS {
                return Err(Refusal::demo(
                    500,
                    "demo-safety-net",
                    format!(
                        "the demo agents stopped the loop themselves after {MAX_ROUNDS} rounds: no control tripped"
                    ),
                ));
            }
            c.think(&format!("plan: {text}")).await?;
            say(format!(
                "round {round}: orchestrator planned ({} tokens so far) and delegates to research",
                stage.tokens()
            ));
            c.invoke("research", "find sources on A2A").await
        }
        (Behaviour::Loop, "research") => {
            c.think(&format!("summarise: {text}")).await?;
            c.tool("search", "web_search").await?;
            say(format!(
                "research searched the web, hit a transient error and retries by re-invoking the orchestrator ({} tokens so far)",
                stage.tokens()
            ));
            c.invoke("orchestrator", "the search failed, please try again")
                .await
        }
        (Behaviour::FanOut, "orchestrator") => {
            let mut answers = Vec::new();
            for i in 1..=5 {
                match c.invoke("research", &format!("question {i} of 5")).await {
                    Ok(a) => {
                        say(format!(
                            "orchestrator → research: question {i} of 5 answered"
                        ));
                        answers.push(a);
                    }
                    Err(r) => return Err(r),
                }
            }
            Ok(answers.join("\n"))
        }
        (Behaviour::Stall, "orchestrator") => {
            c.think("draft the report").await?;
            say("orchestrator drafted the report and asks the critic for a review".into());
            c.invoke("critic", "review this draft").await
        }
        (Behaviour::Stall, "critic") => {
            say("critic is stuck waiting on something that never answers".into());
            // Hangs until the demo ends: the orchestrator's sidecar must not wait with it.
            let mut stop = stage.stop.clone();
            let _ = stop.wait_for(|s| *s).await;
            Err(Refusal::demo(
                503,
                "shutting-down",
                "the demo is stopping".into(),
            ))
        }
        (Behaviour::Taint, "orchestrator") => {
            say("orchestrator asks the writer to draft from the vault notes".into());
            c.invoke("writer", "draft from the vault notes").await?;
            say("orchestrator asks research for fresh web sources".into());
            c.invoke("research", "find fresh sources").await
        }
        (Behaviour::Taint, "writer") => {
            c.tool("vault", "read_secret").await?;
            say("writer read vault/read_secret (its branch of the run is clean) and drafts".into());
            c.think("draft from the notes").await
        }
        (Behaviour::Taint, "research") => {
            let page = c.tool("search", "web_search").await?;
            say(format!("research read a web page (untrusted): \"{page}\""));
            say("research, steered by the page, tries vault/read_secret".into());
            c.tool("vault", "read_secret").await
        }
        // Anyone else asked anything answers with the model's help.
        (_, _) => c.think(text).await,
    }
}

/// The demo agents' listeners: name → (its app listener, its sidecar's outbound address).
pub type Agents = BTreeMap<&'static str, (tokio::net::TcpListener, SocketAddr)>;

/// Serves every agent until `stop` turns true.
pub fn serve_all(agents: Agents, stage: &Arc<Stage>, stop: &watch::Receiver<bool>) {
    for (name, (listener, outbound)) in agents {
        let stage = stage.clone();
        tokio::spawn(upstream::serve(listener, stop.clone(), move |r| {
            handle(name, outbound, stage.clone(), r)
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_rpc_denial_is_read_from_its_error_data() {
        let body = json!({"jsonrpc": "2.0", "id": 1, "error": {"code": -32003, "message": "research may not invoke orchestrator", "data": {
            "status": 403, "reason": "policy", "message": "research may not invoke orchestrator",
            "rule": "default/no-loops/deny[0]", "edge": "research → orchestrator", "run": "01JABCDEFGHJKMNPQRSTVWXYZ0"
        }}});
        let r = Refusal::from_answer(403, body.to_string().as_bytes());
        assert_eq!(r.status, 403);
        assert_eq!(r.reason(), "policy");
        assert_eq!(r.rule(), Some("default/no-loops/deny[0]"));
        assert_eq!(r.edge(), Some("research → orchestrator"));
        assert_eq!(r.run(), Some("01JABCDEFGHJKMNPQRSTVWXYZ0"));
    }

    #[test]
    fn a_plain_denial_of_a_model_call_is_read_from_error() {
        let body = json!({"error": {"status": 402, "reason": "budget", "message": "the run is over its budget", "rule": "maxTotalTokens"}});
        let r = Refusal::from_answer(402, body.to_string().as_bytes());
        assert_eq!(r.rule(), Some("maxTotalTokens"));
        assert_eq!(r.message(), "the run is over its budget");
    }

    #[test]
    fn an_answer_that_is_no_denial_says_what_came_back() {
        let r = Refusal::from_answer(502, b"bad gateway");
        assert_eq!(r.reason(), "upstream");
        assert!(r.message().contains("bad gateway"), "{}", r.message());
        assert_eq!(r.rule(), None);
    }

    #[test]
    fn send_message_is_a2a_v1() {
        let m = send_message("hi");
        assert_eq!(m["method"], "SendMessage");
        assert_eq!(m["params"]["message"]["role"], "ROLE_USER");
        assert_eq!(m["params"]["message"]["parts"][0]["text"], "hi");
    }
}
