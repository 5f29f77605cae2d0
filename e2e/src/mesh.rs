//! A mesh in one process: the real control plane (`ringfence local` on a temporary folder),
//! a real sidecar per agent, and small programmable agent apps — all on loopback with real TLS.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use ringfence::cli::local::{Local, LocalOptions};
use ringfence_crds::{AgentKey, TrustDomain};
use ringfence_sidecar::config::{Config, Tuning};
use ringfence_sidecar::run::Running;
use tokio::net::{TcpListener, TcpStream};

use crate::{AgentPorts, eventually};

/// What an app answers with.
pub type AppBody = BoxBody<Bytes, Infallible>;
/// A request as an app received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    /// The sealed context the sidecar handed the app.
    pub fn context(&self) -> Option<String> {
        self.headers
            .get("ringfence-context")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }
}

type Handler =
    Arc<dyn Fn(Received) -> Pin<Box<dyn Future<Output = Response<AppBody>> + Send>> + Send + Sync>;

/// An agent app: records what it receives and answers with its handler.
#[derive(Clone)]
pub struct App {
    pub received: Arc<Mutex<Vec<Received>>>,
    handler: Arc<Mutex<Handler>>,
}

impl Default for App {
    fn default() -> Self {
        Self::new()
    }
}

impl App {
    pub fn new() -> Self {
        let handler: Handler = Arc::new(|_r| {
            Box::pin(async {
                json_response(
                    StatusCode::OK,
                    r#"{"jsonrpc":"2.0","id":1,"result":{"ok":true}}"#,
                )
            })
        });
        Self {
            received: Arc::new(Mutex::new(Vec::new())),
            handler: Arc::new(Mutex::new(handler)),
        }
    }

    /// Replaces how the app answers.
    pub fn on<F, Fut>(&self, f: F)
    where
        F: Fn(Received) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<AppBody>> + Send + 'static,
    {
        let h: Handler = Arc::new(move |r| Box::pin(f(r)));
        *self.handler.lock().unwrap() = h;
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// A new app answering `{"ok":true}`, served on a free loopback port.
    pub async fn serve_fresh() -> (SocketAddr, App) {
        let app = App::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(app.clone().serve(listener));
        (addr, app)
    }

    /// Serves the app on `listener` until the runtime ends.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let app = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let app = app.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let r = Received {
                            path: parts
                                .uri
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default(),
                            headers: parts.headers,
                            body,
                        };
                        app.received.lock().unwrap().push(r.clone());
                        let handler = app.handler.lock().unwrap().clone();
                        Ok::<_, Infallible>(handler(r).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }
}

/// An MCP tool server that answers every call with one text result, on a free loopback port.
pub async fn mcp_server(tool_result: &'static str) -> (SocketAddr, App) {
    let app = App::new();
    app.on(move |_| async move {
        let result = serde_json::json!({"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": tool_result}]}});
        json_response(StatusCode::OK, &result.to_string())
    });
    let addr = SocketAddr::from(([127, 0, 0, 1], crate::free_port()));
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(app.clone().serve(listener));
    (addr, app)
}

/// A streaming `text/event-stream` response fed by `rx`.
pub fn sse_response(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Response<AppBody> {
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(hyper::body::Frame::data(b)), rx))
    });
    let mut r = Response::new(http_body_util::StreamBody::new(frames).boxed());
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("text/event-stream"),
    );
    r
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: &str) -> Response<AppBody> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_owned())).boxed());
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// One agent of the mesh.
pub struct Agent {
    pub ports: AgentPorts,
    pub app: App,
    pub sidecar: Option<Running>,
}

/// The whole mesh.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub plane: SocketAddr,
    pub agents: BTreeMap<String, Agent>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// A response as a test sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

impl Mesh {
    /// Starts the control plane with `agents` (name, spec YAML lines indented by two spaces)
    /// and `manifests` (more YAML: policies, budgets), then a sidecar and an app per agent, and
    /// waits until every sidecar is ready.
    pub async fn start(agents: &[(&str, &str)], manifests: &str) -> Self {
        Self::start_with(agents, manifests, Duration::from_secs(3600)).await
    }

    pub async fn start_with(agents: &[(&str, &str)], manifests: &str, svid_ttl: Duration) -> Self {
        Self::start_full(agents, manifests, svid_ttl, None).await
    }

    /// Like [`Mesh::start`], with the sidecars' budget service at `budget` (a separate
    /// `ringfence budget`) instead of the control plane's own.
    pub async fn start_full(
        agents: &[(&str, &str)],
        manifests: &str,
        svid_ttl: Duration,
        budget: Option<String>,
    ) -> Self {
        Self::start_tuned(agents, manifests, svid_ttl, budget, Tuning::default()).await
    }

    /// Like [`Mesh::start_full`], with the sidecars' `tuning`.
    pub async fn start_tuned(
        agents: &[(&str, &str)],
        manifests: &str,
        svid_ttl: Duration,
        budget: Option<String>,
        tuning: Tuning,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut docs = Vec::new();
        let mut map = BTreeMap::new();
        for (name, spec) in agents {
            let ports = AgentPorts::new(name);
            let spec = if spec.is_empty() {
                "  appPort: 8080"
            } else {
                spec
            };
            docs.push(ports.manifest(spec));
            map.insert(
                name.to_string(),
                Agent {
                    ports,
                    app: App::new(),
                    sidecar: None,
                },
            );
        }
        std::fs::write(dir.path().join("agents.yaml"), docs.join("---\n")).unwrap();
        std::fs::write(dir.path().join("policies.yaml"), manifests).unwrap();

        let local = Local::new(LocalOptions {
            dir: dir.path().to_owned(),
            state: None,
            listen: "127.0.0.1:0".parse().unwrap(),
            trust_domain: TrustDomain::default(),
            svid_ttl,
            spawn_sidecars: false,
            sidecar_bin: None,
            database: None,
            sidecar_logs: None,
        })
        .unwrap();
        let state = local.state_dir().to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plane = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(local.serve(listener, async move {
            let _ = rx.await;
        }));

        for agent in map.values_mut() {
            let listener = TcpListener::bind(agent.ports.app).await.unwrap();
            tokio::spawn(agent.app.clone().serve(listener));
            let key = AgentKey::new("default", &agent.ports.name).unwrap();
            let config = Config {
                agent: key.clone(),
                control_plane: format!("https://{plane}"),
                ca_file: state.join("ca").join("cert.pem"),
                token_file: Some(
                    state
                        .join("tokens")
                        .join("default")
                        .join(format!("{}.token", key.name)),
                ),
                admin: agent.ports.admin,
                outbound: agent.ports.outbound,
                inbound: agent.ports.inbound,
                app: agent.ports.app,
                budget: budget.clone(),
                pricing: None,
                decision_log: ringfence_sidecar::telemetry::decisions::Level::All,
                decision_log_file: Some(decisions_file(&state, &agent.ports.name)),
                exit_with_parent: false,
                tuning,
            };
            agent.sidecar = Some(ringfence_sidecar::run::start(&config).await.unwrap());
        }
        let mesh = Self {
            dir,
            plane,
            agents: map,
            stop: Some(tx),
        };
        for name in mesh.agents.keys() {
            mesh.wait_ready(name).await;
        }
        mesh
    }

    pub fn agent(&self, name: &str) -> &Agent {
        &self.agents[name]
    }

    pub fn app(&self, name: &str) -> &App {
        &self.agents[name].app
    }

    pub fn outbound(&self, name: &str) -> SocketAddr {
        self.agents[name].ports.outbound
    }

    pub fn inbound(&self, name: &str) -> SocketAddr {
        self.agents[name].ports.inbound
    }

    pub fn bundle_version(&self, name: &str) -> u64 {
        let running = self.agents[name].sidecar.as_ref().unwrap();
        running
            .snapshots
            .borrow()
            .as_ref()
            .map_or(0, |s| s.bundle.version)
    }

    async fn wait_ready(&self, name: &str) {
        let running = self.agents[name].sidecar.as_ref().unwrap();
        eventually(
            Duration::from_secs(30),
            &format!("{name}'s sidecar to be ready"),
            || async {
                (running.credentials.borrow().is_some() && running.snapshots.borrow().is_some())
                    .then_some(())
            },
        )
        .await
        .unwrap();
    }

    /// Rewrites the policies file and waits until the control plane has published the change
    /// and every sidecar acknowledges the bundle it should enforce (an edit changes only the
    /// bundles of the agents it touches).
    pub async fn set_policies(&self, manifests: &str) {
        let before = self.status().await["generation"].as_u64().unwrap_or(0);
        std::fs::write(self.dir.path().join("policies.yaml"), manifests).unwrap();
        eventually(
            Duration::from_secs(10),
            "every sidecar to enforce the new policies",
            || async {
                let v = self.status().await;
                let agents = v["agents"].as_array()?;
                let all = agents.iter().all(|a| {
                    a["sidecars"].as_array().is_some_and(|sc| {
                        !sc.is_empty() && sc.iter().all(|s| s["enforcedVersion"] == a["version"])
                    })
                });
                (v["generation"].as_u64()? > before && all).then_some(())
            },
        )
        .await
        .unwrap();
        // Acks are sent after the swap; give the last one's sidecar a moment past it.
        for name in self.agents.keys() {
            let want = self.status().await["agents"]
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|x| x["agent"] == format!("default/{name}"))
                        .cloned()
                })
                .and_then(|a| a["version"].as_u64())
                .unwrap_or(0);
            eventually(
                Duration::from_secs(5),
                &format!("{name} to enforce version {want}"),
                || async { (self.bundle_version(name) == want).then_some(()) },
            )
            .await
            .unwrap();
        }
    }

    /// The value of the first `/metrics` line of `agent`'s sidecar that starts with
    /// `line_start` (a metric name with its labels), or 0.
    pub async fn metric(&self, agent: &str, line_start: &str) -> u64 {
        let (_, text) = crate::get(self.agent(agent).ports.admin, "/metrics")
            .await
            .unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Like [`Mesh::metric`], for a counter in dollars: its value in whole micro-dollars.
    pub async fn metric_micros(&self, agent: &str, line_start: &str) -> u64 {
        let (_, text) = crate::get(self.agent(agent).ports.admin, "/metrics")
            .await
            .unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |usd| (usd * 1e6).round() as u64)
    }

    /// The control plane's `/v1/status`.
    pub async fn status(&self) -> serde_json::Value {
        let (_, body) = crate::get_tls(self.plane, &self.ca_pem(), "/v1/status")
            .await
            .unwrap();
        serde_json::from_str(&body).unwrap()
    }

    /// The CA certificate of the trust domain, PEM.
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(".ringfence/ca/cert.pem")).unwrap()
    }

    pub fn state_dir(&self) -> std::path::PathBuf {
        self.dir.path().join(".ringfence")
    }

    /// The decision log lines `agent`'s sidecar has written so far, parsed (each must be JSON).
    pub fn decisions(&self, agent: &str) -> Vec<serde_json::Value> {
        let text =
            std::fs::read_to_string(decisions_file(&self.state_dir(), agent)).unwrap_or_default();
        text.lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("a decision line that is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Waits until `agent`'s decision log holds a line `matches` accepts, and returns it.
    pub async fn decision(
        &self,
        agent: &str,
        what: &str,
        matches: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        eventually(
            Duration::from_secs(10),
            &format!("{agent}'s decision log to hold {what}"),
            || async { self.decisions(agent).into_iter().find(|l| matches(l)) },
        )
        .await
        .unwrap()
    }
}

/// Where an in-process sidecar of the mesh writes its decision log.
fn decisions_file(state: &std::path::Path, agent: &str) -> std::path::PathBuf {
    state.join(format!("{agent}.decisions.jsonl"))
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Sends a request to an outbound listener as the agent's app would.
pub async fn call(
    outbound: SocketAddr,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let tcp = TcpStream::connect(outbound).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    send_on(&mut sender, method, path, headers, body).await
}

/// Sends on an existing HTTP/1.1 connection (to test keep-alive behaviour).
pub async fn send_on(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: http::Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut b = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    if !body.is_empty() {
        b = b.header("content-type", "application/json");
    }
    let resp = sender
        .send_request(b.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// An A2A v1.0 JSON-RPC SendMessage body.
pub fn send_message(id: u32, text: &str) -> String {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id,
        "method": "SendMessage",
        "params": {"message": {"role": "ROLE_USER", "messageId": format!("m-{id}"), "parts": [{"text": text}]}}
    })
    .to_string()
}
