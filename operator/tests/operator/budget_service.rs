//! The budget service over real mTLS on loopback: sidecars (here, test clients holding SVIDs the
//! CA issued with bootstrap tokens) lease, report spend and watch the halt stream. SQLite by
//! default; the replica test runs two services on one PostgreSQL schema at
//! `RINGFENCE_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/postgres`;
//! `hack/ensure-postgres.sh` starts one) and fails, never skips, when it is down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair};
use ringfence::budget::service::{self, BudgetService};
use ringfence::budget::store::Store;
use ringfence::cli::local::{Local, LocalOptions};
use ringfence::cluster::quotas::{self, BudgetQuotas};
use ringfence::identity::{Identity, Proof};
use ringfence_crds::api::{
    self, CsrRequest, HaltEvent, LeaseRequest, LeaseResponse, RunTerms, SpendAck, SpendEvent,
    SpendReport,
};
use ringfence_crds::budget::OnBreach;
use ringfence_crds::svid;
use ringfence_crds::{AgentKey, TrustDomain};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

const DEFAULT_POSTGRES: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A CA and the SVIDs it issued to the test's agents.
struct Trust {
    _dir: Option<tempfile::TempDir>,
    identity: Arc<Identity>,
}

impl Trust {
    fn new() -> Trust {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let identity = Identity::load_or_create(
            dir.path(),
            TrustDomain::default(),
            Duration::from_secs(3600),
        )
        .expect("a CA");
        Trust {
            _dir: Some(dir),
            identity: Arc::new(identity),
        }
    }

    /// What a sidecar holds after its bootstrap CSR.
    fn svid(&self, name: &str) -> Creds {
        let agent = AgentKey::new("default", name).expect("an agent name");
        self.identity
            .ensure_tokens(std::slice::from_ref(&agent))
            .expect("a bootstrap token");
        let token = std::fs::read_to_string(self.identity.token_path(&agent).expect("local mode"))
            .expect("the token");
        let key = KeyPair::generate().expect("a key");
        let csr = CertificateParams::default()
            .serialize_request(&key)
            .expect("a CSR")
            .pem()
            .expect("PEM");
        let issued = self
            .identity
            .issue(
                &CsrRequest { agent, csr },
                Proof::BootstrapToken(token.trim()),
            )
            .expect("an SVID");
        Creds {
            chain: issued.certificate_chain,
            key: key.serialize_pem(),
        }
    }

    fn roots(&self) -> Arc<rustls::RootCertStore> {
        svid::trust_bundle_roots(self.identity.trust_bundle_pem()).expect("the trust bundle")
    }
}

struct Creds {
    chain: String,
    key: String,
}

/// One budget service on loopback.
struct Budget {
    addr: SocketAddr,
    roots: Arc<rustls::RootCertStore>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Budget {
    async fn start(trust: &Trust, store: Store) -> Budget {
        let tls = trust
            .identity
            .server_tls_config(&["localhost".to_owned()])
            .expect("a serving certificate");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let addr = listener.local_addr().expect("its address");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(service::serve(
            listener,
            Arc::new(tls),
            BudgetService::new(store),
            async move {
                let _ = rx.await;
            },
        ));
        Budget {
            addr,
            roots: trust.roots(),
            stop: Some(tx),
        }
    }

    async fn send(
        &self,
        creds: Option<&Creds>,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> hyper::Response<Incoming> {
        let b = rustls::ClientConfig::builder_with_provider(svid::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(self.roots.clone());
        let config = match creds {
            Some(c) => b
                .with_client_auth_cert(
                    svid::certs_from_pem(&c.chain).expect("the chain"),
                    svid::key_from_pem(&c.key).expect("the key"),
                )
                .expect("a client certificate"),
            None => b.with_no_client_auth(),
        };
        let tcp = TcpStream::connect(self.addr).await.expect("connecting");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("a TLS handshake");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("an HTTP connection");
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .body(Full::new(Bytes::from(body)))
            .expect("a request");
        sender.send_request(req).await.expect("a response")
    }

    /// Sends and reads the whole answer as JSON.
    async fn call(
        &self,
        creds: Option<&Creds>,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> (StatusCode, Value) {
        let resp = self.send(creds, method, path, body).await;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("a body").to_bytes();
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes));
        });
        (status, value)
    }

    async fn lease(
        &self,
        creds: &Creds,
        run: &str,
        terms: &RunTerms,
        tokens: u64,
    ) -> LeaseResponse {
        let req = LeaseRequest {
            run: run.to_owned(),
            terms: terms.clone(),
            tokens,
            micros: 0,
        };
        let (status, body) = self
            .call(Some(creds), Method::POST, api::LEASE_PATH, to_json(&req))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_value(body).expect("a LeaseResponse")
    }

    async fn report(&self, creds: &Creds, events: Vec<SpendEvent>) -> SpendAck {
        let (status, body) = self
            .call(
                Some(creds),
                Method::POST,
                api::SPEND_PATH,
                to_json(&SpendReport { events }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        serde_json::from_value(body).expect("a SpendAck")
    }

    async fn run(&self, run: &str) -> Value {
        // Run queries need only the CA, no client certificate.
        let (status, body) = self
            .call(
                None,
                Method::GET,
                &format!("{}/{run}", api::RUNS_PATH),
                vec![],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    async fn halts(&self, creds: &Creds, since: u64) -> Halts {
        let resp = self
            .send(
                Some(creds),
                Method::GET,
                &format!("{}?since={since}", api::HALTS_PATH),
                vec![],
            )
            .await;
        assert_eq!(resp.status(), StatusCode::OK);
        Halts {
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// An open halt stream, read line by line.
struct Halts {
    body: Incoming,
    buf: Vec<u8>,
}

impl Halts {
    async fn next(&mut self, within: Duration) -> Option<HaltEvent> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                if line.len() > 1 {
                    return Some(serde_json::from_slice(&line).expect("a HaltEvent"));
                }
                continue;
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.body.frame()).await {
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
                Ok(_) => panic!("the halt stream ended"),
                Err(_) => return None,
            }
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("serializable")
}

fn new_run() -> String {
    ulid::Ulid::new().to_string()
}

fn terms(max_tokens: Option<u64>, on_breach: OnBreach) -> RunTerms {
    RunTerms {
        root: "default/orchestrator".to_owned(),
        user: "alice".to_owned(),
        max_total_tokens: max_tokens,
        on_breach,
        budgets: vec!["default/incident".to_owned()],
        ..RunTerms::default()
    }
}

fn spend(id: &str, run: &str, lease: Option<&str>, tokens: u64, micros: u64) -> SpendEvent {
    SpendEvent {
        event_id: id.to_owned(),
        run: run.to_owned(),
        lease_id: lease.map(str::to_owned),
        tokens_in: tokens / 2,
        tokens_out: tokens - tokens / 2,
        micros,
        calls: 1,
        model: Some("mock-1".to_owned()),
        estimated: false,
        at_ms: 1_000,
        team: None,
        environment: None,
        workflow: None,
        root: String::new(),
        user: String::new(),
    }
}

async fn sqlite_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let store = Store::open_sqlite(&dir.path().join("budget.db"))
        .await
        .expect("a SQLite store");
    (dir, store)
}

fn lease_id(resp: &LeaseResponse) -> String {
    match resp {
        LeaseResponse::Granted { lease_id, .. } => lease_id.clone(),
        other => panic!("expected a grant, got {other:?}"),
    }
}

#[tokio::test]
async fn spend_leased_from_the_budget_service_shows_on_the_run_under_each_agents_certificate() {
    let trust = Trust::new();
    let (orchestrator, research) = (trust.svid("orchestrator"), trust.svid("research"));
    let (_dir, store) = sqlite_store().await;
    let budget = Budget::start(&trust, store).await;
    let run = new_run();
    let terms = terms(Some(10_000), OnBreach::HaltAndAlert);

    let first = budget.lease(&orchestrator, &run, &terms, 1_000).await;
    assert_eq!(
        first,
        LeaseResponse::Granted {
            lease_id: lease_id(&first),
            tokens: 1_000,
            micros: 0
        }
    );
    let second = budget.lease(&research, &run, &terms, 500).await;
    let ack = budget
        .report(
            &orchestrator,
            vec![spend("e1", &run, Some(&lease_id(&first)), 300, 30)],
        )
        .await;
    assert_eq!((ack.accepted, ack.duplicates), (1, 0));
    let ack = budget
        .report(
            &research,
            vec![
                spend("e2", &run, Some(&lease_id(&second)), 100, 10),
                spend("e3", &run, Some(&lease_id(&second)), 50, 5),
            ],
        )
        .await;
    assert_eq!((ack.accepted, ack.duplicates), (2, 0));
    assert!(ack.halted.is_empty());

    let detail = budget.run(&run).await;
    assert_eq!(detail["runId"], run.as_str());
    assert_eq!(detail["rootAgent"], "default/orchestrator");
    assert_eq!(detail["user"], "alice");
    assert_eq!(detail["status"], "running");
    assert_eq!(detail["spent"]["micros"], 45);
    assert_eq!(detail["spent"]["calls"], 3);
    let agents: Vec<(String, u64)> = detail["agents"]
        .as_array()
        .expect("per-agent spend")
        .iter()
        .map(|a| {
            let tokens = a["tokensIn"].as_u64().unwrap_or(0) + a["tokensOut"].as_u64().unwrap_or(0);
            (a["agent"].as_str().unwrap_or("").to_owned(), tokens)
        })
        .collect();
    assert_eq!(
        agents,
        vec![
            ("default/orchestrator".to_owned(), 300),
            ("default/research".to_owned(), 150)
        ]
    );

    let (status, runs) = budget
        .call(
            None,
            Method::GET,
            &format!("{}?agent=default%2Fresearch&limit=10", api::RUNS_PATH),
            vec![],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{runs}");
    assert_eq!(runs.as_array().map(Vec::len), Some(1), "{runs}");
    assert_eq!(runs[0]["runId"], run.as_str());

    let (status, body) = budget
        .call(
            None,
            Method::GET,
            &format!("{}/{}", api::RUNS_PATH, new_run()),
            vec![],
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

/// Opens a stream, breaches the run's token budget on `reporter`, and returns how long the halt
/// took to arrive on `watcher`'s stream.
async fn breach_and_watch(reporter: &Budget, watcher: &Budget, trust: &Trust) -> Duration {
    let (orchestrator, research) = (trust.svid("orchestrator"), trust.svid("research"));
    let run = new_run();
    let terms = terms(Some(100), OnBreach::HaltAndAlert);
    let lease = reporter.lease(&orchestrator, &run, &terms, 100).await;
    let mut halts = watcher.halts(&research, 0).await;
    assert_eq!(halts.next(Duration::from_millis(300)).await, None);

    let sent = Instant::now();
    let ack = reporter
        .report(
            &orchestrator,
            vec![spend("over", &run, Some(&lease_id(&lease)), 150, 0)],
        )
        .await;
    assert_eq!(ack.halted, vec![run.clone()]);
    let halt = halts
        .next(Duration::from_secs(2))
        .await
        .expect("a halt on the stream");
    let latency = sent.elapsed();
    assert_eq!(halt.run, run);
    assert!(halt.reason.contains("maxTotalTokens"), "{}", halt.reason);

    // Every replica refuses the run from now on, and a stream resumed after it stays quiet.
    for budget in [reporter, watcher] {
        match budget.lease(&research, &run, &terms, 10).await {
            LeaseResponse::Halted { reason } => assert!(reason.contains("maxTotalTokens")),
            other => panic!("expected Halted, got {other:?}"),
        }
    }
    let mut resumed = watcher.halts(&research, halt.seq).await;
    assert_eq!(resumed.next(Duration::from_millis(300)).await, None);
    let mut replayed = watcher.halts(&research, 0).await;
    assert_eq!(
        replayed.next(Duration::from_secs(1)).await.map(|h| h.run),
        Some(run)
    );
    latency
}

#[tokio::test]
async fn a_budget_breach_halts_the_run_and_the_halt_reaches_an_open_stream_within_a_second() {
    let trust = Trust::new();
    let (_dir, store) = sqlite_store().await;
    let budget = Budget::start(&trust, store).await;
    let latency = breach_and_watch(&budget, &budget, &trust).await;
    assert!(
        latency < Duration::from_secs(1),
        "the halt took {latency:?}"
    );
}

#[tokio::test]
async fn a_budget_halt_on_one_postgres_replica_reaches_a_stream_on_another_within_a_second() {
    let db = PgSchema::new().await;
    let trust = Trust::new();
    let reporter = Budget::start(&trust, db.open().await).await;
    let watcher = Budget::start(&trust, db.open().await).await;
    let latency = breach_and_watch(&reporter, &watcher, &trust).await;
    assert!(
        latency < Duration::from_secs(1),
        "the halt took {latency:?}"
    );
}

#[tokio::test]
async fn a_resent_spend_report_is_not_counted_twice_against_the_budget() {
    let trust = Trust::new();
    let research = trust.svid("research");
    let (_dir, store) = sqlite_store().await;
    let budget = Budget::start(&trust, store).await;
    let run = new_run();
    let lease = budget
        .lease(&research, &run, &terms(None, OnBreach::Halt), 1_000)
        .await;
    let batch = vec![
        spend("a", &run, Some(&lease_id(&lease)), 100, 7),
        spend("b", &run, Some(&lease_id(&lease)), 100, 7),
    ];
    let ack = budget.report(&research, batch.clone()).await;
    assert_eq!((ack.accepted, ack.duplicates), (2, 0));
    let ack = budget.report(&research, batch).await;
    assert_eq!((ack.accepted, ack.duplicates), (0, 2));
    let detail = budget.run(&run).await;
    assert_eq!(detail["spent"]["micros"], 14);
    assert_eq!(detail["spent"]["calls"], 2);
}

#[tokio::test]
async fn the_budget_service_refuses_callers_without_a_client_certificate_naming_the_svid() {
    let trust = Trust::new();
    let (_dir, store) = sqlite_store().await;
    let budget = Budget::start(&trust, store).await;
    let lease = LeaseRequest {
        run: new_run(),
        terms: terms(Some(10), OnBreach::Halt),
        tokens: 1,
        micros: 0,
    };
    for (method, path, body) in [
        (Method::POST, api::LEASE_PATH, to_json(&lease)),
        (
            Method::POST,
            api::SPEND_PATH,
            to_json(&SpendReport { events: vec![] }),
        ),
        (Method::GET, api::HALTS_PATH, vec![]),
    ] {
        let (status, body) = budget.call(None, method, path, body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}: {body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains("SVID"), "{path}: {message}");
    }
}

#[tokio::test]
async fn the_budget_service_answers_malformed_requests_with_a_400_that_says_what_is_wrong() {
    let trust = Trust::new();
    let research = trust.svid("research");
    let (_dir, store) = sqlite_store().await;
    let budget = Budget::start(&trust, store).await;

    let (status, body) = budget
        .call(
            Some(&research),
            Method::POST,
            api::SPEND_PATH,
            b"{\"events\": [{\"eventId\": 5}]}".to_vec(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("SpendReport") && message.contains("line 1"),
        "{message}"
    );

    let bad_run = LeaseRequest {
        run: "run-1".to_owned(),
        terms: terms(Some(10), OnBreach::Halt),
        tokens: 1,
        micros: 0,
    };
    let (status, body) = budget
        .call(
            Some(&research),
            Method::POST,
            api::LEASE_PATH,
            to_json(&bad_run),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"].as_str().unwrap_or_default().contains("ULID"),
        "{body}"
    );

    let huge = LeaseRequest {
        tokens: u64::MAX,
        ..bad_run.clone()
    };
    let huge = LeaseRequest {
        run: new_run(),
        terms: terms(None, OnBreach::Halt),
        ..huge
    };
    let (status, body) = budget
        .call(
            Some(&research),
            Method::POST,
            api::LEASE_PATH,
            to_json(&huge),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let (status, body) = budget
        .call(
            None,
            Method::GET,
            &format!("{}?limit=5000", api::RUNS_PATH),
            vec![],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn the_local_control_plane_serves_the_budget_service_from_its_state_folder() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/incident");
    for file in ["agents.yaml", "policies.yaml", "budget.yaml"] {
        std::fs::copy(examples.join(file), dir.path().join(file)).expect("an example manifest");
    }
    let local = Local::new(LocalOptions {
        dir: dir.path().to_owned(),
        state: None,
        listen: "127.0.0.1:0".parse().expect("an address"),
        trust_domain: TrustDomain::default(),
        svid_ttl: Duration::from_secs(3600),
        spawn_sidecars: false,
        sidecar_bin: None,
        database: None,
        sidecar_logs: None,
    })
    .expect("a local control plane");
    let state = local.state_dir().to_owned();
    let trust = Trust {
        _dir: None,
        identity: local.identity().clone(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let addr = listener.local_addr().expect("its address");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(local.serve(listener, async move {
        let _ = rx.await;
    }));
    let plane = Budget {
        addr,
        roots: trust.roots(),
        stop: Some(tx),
    };

    let research = trust.svid("research");
    let run = new_run();
    let lease = plane
        .lease(&research, &run, &terms(Some(1_000), OnBreach::Halt), 100)
        .await;
    let ack = plane
        .report(
            &research,
            vec![spend("e1", &run, Some(&lease_id(&lease)), 40, 4)],
        )
        .await;
    assert_eq!(ack.accepted, 1);
    assert_eq!(plane.run(&run).await["spent"]["micros"], 4);
    assert!(state.join("budget.db").is_file());

    drop(plane);
    served
        .await
        .expect("the control plane task")
        .expect("a clean shutdown");
}

/// A PostgreSQL schema of the test's own, dropped afterwards.
struct PgSchema {
    admin_url: String,
    schema: String,
}

impl PgSchema {
    async fn new() -> PgSchema {
        use sqlx::Connection;
        let admin_url = std::env::var("RINGFENCE_TEST_POSTGRES")
            .unwrap_or_else(|_| DEFAULT_POSTGRES.to_owned());
        let schema = format!("rf_svc_{}", ulid::Ulid::new().to_string().to_lowercase());
        let connect = sqlx::PgConnection::connect(&admin_url);
        let mut conn = match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => panic!(
                "PostgreSQL is unreachable at {admin_url}: {e}. Run hack/ensure-postgres.sh, or \
                 point RINGFENCE_TEST_POSTGRES at a server where this user may create schemas."
            ),
            Err(_) => panic!("PostgreSQL at {admin_url} did not answer within 10s"),
        };
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut conn)
            .await
            .expect("creating a test schema");
        PgSchema { admin_url, schema }
    }

    async fn open(&self) -> Store {
        let sep = if self.admin_url.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!(
            "{}{sep}options=-c%20search_path%3D{}",
            self.admin_url, self.schema
        );
        Store::open(&url)
            .await
            .unwrap_or_else(|e| panic!("opening the store: {e}"))
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let (url, statement) = (
            self.admin_url.clone(),
            format!("DROP SCHEMA {} CASCADE", self.schema),
        );
        // Drop cannot await: a thread of its own runs the statement.
        let dropped = std::thread::spawn(move || {
            use sqlx::Connection;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&url)
                    .await
                    .map_err(|e| e.to_string())?;
                sqlx::query("SET lock_timeout = '5s'")
                    .execute(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                sqlx::query(&statement)
                    .execute(&mut conn)
                    .await
                    .map_err(|e| e.to_string())
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("leaving test schema behind: {e}");
        }
    }
}

fn ledger_call(run: &str, span: &str, caller: &str, callee: &str) -> api::CallEvent {
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    api::CallEvent {
        event_id: format!("{trace}-{span}"),
        run_id: run.to_owned(),
        trace_id: trace.to_owned(),
        span_id: span.to_owned(),
        parent_call: None,
        root: "orchestrator".to_owned(),
        user: "user:ada".to_owned(),
        caller: caller.to_owned(),
        callee: callee.to_owned(),
        kind: api::CallKind::Agent,
        operation: Some("SendMessage".to_owned()),
        decision: api::Decision::Allowed,
        rule: None,
        depth: 1,
        cycle: false,
        tainted: false,
        latency_us: 900,
        tokens_in: 0,
        tokens_out: 0,
        micros: 0,
        at_ms: 1_000,
        status: Some(200),
    }
}

#[tokio::test]
async fn calls_reach_the_ledger_only_as_the_agent_of_the_reporting_svid_and_once() {
    let trust = Trust::new();
    let orchestrator = trust.svid("orchestrator");
    let (_dir, store) = sqlite_store().await;
    let budget = Budget::start(&trust, store).await;
    let run = new_run();
    let report = |calls| to_json(&api::CallReport { calls });

    // research's sidecar cannot put words in the orchestrator's mouth.
    let forged = vec![ledger_call(&run, "00000000000000b1", "research", "writer")];
    let (status, body) = budget
        .call(
            Some(&orchestrator),
            Method::POST,
            api::CALLS_PATH,
            report(forged),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(message.contains("its own agent's calls only"), "{message}");
    let (status, _) = budget
        .call(None, Method::POST, api::CALLS_PATH, report(vec![]))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let calls = vec![ledger_call(
        &run,
        "00000000000000a1",
        "orchestrator",
        "research",
    )];
    for expected in [(1, 0), (0, 1)] {
        let (status, body) = budget
            .call(
                Some(&orchestrator),
                Method::POST,
                api::CALLS_PATH,
                report(calls.clone()),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let ack: api::CallAck = serde_json::from_value(body).unwrap();
        assert_eq!((ack.accepted, ack.duplicates), expected);
    }
    // A run no budget opened is in the ledger all the same, with its root and user.
    let detail = budget.run(&run).await;
    assert_eq!(detail["rootAgent"], "orchestrator");
    assert_eq!(detail["user"], "user:ada");
    assert_eq!(detail["calls"][0]["callee"], "research");
    assert_eq!(detail["edges"][0]["calls"], 1);
    assert_eq!(detail["limits"]["maxTokens"], Value::Null);

    // The first lease of that run brings its terms, and they hold.
    budget
        .lease(&orchestrator, &run, &terms(Some(500), OnBreach::Halt), 100)
        .await;
    assert_eq!(budget.run(&run).await["limits"]["maxTokens"], 500);
    budget
        .lease(
            &orchestrator,
            &run,
            &terms(Some(9_999), OnBreach::Halt),
            100,
        )
        .await;
    assert_eq!(budget.run(&run).await["limits"]["maxTokens"], 500);
}

#[tokio::test]
async fn spend_of_a_run_without_token_or_cost_limits_opens_it_in_the_ledger() {
    let trust = Trust::new();
    let writer = trust.svid("writer");
    let (_dir, store) = sqlite_store().await;
    let budget = Budget::start(&trust, store).await;
    let run = new_run();
    let mut event = spend("u1", &run, None, 300, 90);
    event.root = "orchestrator".to_owned();
    event.user = "user:ada".to_owned();
    let ack = budget.report(&writer, vec![event]).await;
    assert_eq!((ack.accepted, ack.duplicates), (1, 0));
    let detail = budget.run(&run).await;
    assert_eq!(detail["rootAgent"], "orchestrator");
    assert_eq!(detail["spent"]["micros"], 90);
    assert_eq!(detail["agents"][0]["agent"], "default/writer");
}

/// `prod/daily#0`: 1,000 tokens a day per team.
fn daily_team_quota(team: &str) -> ringfence_crds::quota::QuotaTerm {
    ringfence_crds::quota::QuotaTerm {
        id: "prod/daily#0".to_owned(),
        key: format!("team:{team}"),
        window: ringfence_crds::quota::QuotaWindow::Day,
        sliding: false,
        max_total_tokens: Some(1_000),
        max_cost_micros: None,
        on_breach: OnBreach::HaltAndAlert,
        alert_webhook: None,
    }
}

#[tokio::test]
async fn a_daily_team_quota_halts_the_teams_runs_and_stays_spent_across_a_budget_service_restart() {
    let trust = Trust::new();
    let (research, summarize, writer) = (
        trust.svid("research"),
        trust.svid("summarize"),
        trust.svid("writer"),
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let db = dir.path().join("budget.db");
    let with_quota = |team: &str| RunTerms {
        quotas: vec![daily_team_quota(team)],
        ..terms(None, OnBreach::HaltAndAlert)
    };

    let budget = Budget::start(&trust, Store::open_sqlite(&db).await.expect("store")).await;
    let mut halts = budget.halts(&research, 0).await;
    let (run_a, run_b, run_c) = (new_run(), new_run(), new_run());
    // Run B (another agent of the team) is under way before the quota is spent.
    let lease_b = budget
        .lease(&summarize, &run_b, &with_quota("search"), 10)
        .await;
    budget
        .report(
            &summarize,
            vec![spend("b1", &run_b, Some(&lease_id(&lease_b)), 10, 0)],
        )
        .await;
    let lease_a = budget
        .lease(&research, &run_a, &with_quota("search"), 990)
        .await;
    assert!(
        matches!(lease_a, LeaseResponse::Granted { tokens: 990, .. }),
        "{lease_a:?}"
    );
    budget
        .report(
            &research,
            vec![spend("a1", &run_a, Some(&lease_id(&lease_a)), 990, 0)],
        )
        .await;

    // Spending the team's day halts both of its running runs, on the halt stream.
    let mut halted = Vec::new();
    while halted.len() < 2 {
        let halt = halts
            .next(Duration::from_secs(2))
            .await
            .expect("the quota's halts reach the stream");
        assert!(
            halt.reason.starts_with(
                "quota prod/daily#0 team:search day is exhausted: 1000 tokens spent of 1000"
            ),
            "{}",
            halt.reason
        );
        halted.push(halt.run);
    }
    halted.sort();
    let mut expected = vec![run_a.clone(), run_b.clone()];
    expected.sort();
    assert_eq!(halted, expected);
    drop(halts);
    drop(budget);

    // A new budget service process over the same database: the quota is still spent.
    let budget = Budget::start(&trust, Store::open_sqlite(&db).await.expect("reopen")).await;
    let run_d = new_run();
    match budget
        .lease(&summarize, &run_d, &with_quota("search"), 10)
        .await
    {
        LeaseResponse::Exhausted {
            limit,
            spent,
            limit_value,
        } => {
            assert_eq!(limit, "quota prod/daily#0 team:search day");
            assert_eq!((spent, limit_value), (1_000, 1_000));
        }
        other => panic!("a new run of the team must be refused: {other:?}"),
    }
    assert_eq!(
        budget.run(&run_d).await["status"],
        "halted",
        "a run that starts after the breach halts at its first lease"
    );
    // Another team's counter of the same quota has room.
    let lease_c = budget.lease(&writer, &run_c, &with_quota("docs"), 10).await;
    assert!(
        matches!(lease_c, LeaseResponse::Granted { .. }),
        "{lease_c:?}"
    );

    let (status, quotas) = budget
        .call(None, Method::GET, api::QUOTAS_PATH, vec![])
        .await;
    assert_eq!(status, StatusCode::OK, "{quotas}");
    let search = quotas
        .as_array()
        .expect("a list")
        .iter()
        .find(|q| q["key"] == "team:search")
        .expect("the search team's counter");
    assert_eq!(search["tokens"], 1_000);
    assert_eq!(search["exhausted"], true);
    assert_eq!(search["window"], "day");

    let resp = budget
        .send(None, Method::GET, "/v1/quotas/metrics", vec![])
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.into_body().collect().await.expect("a body").to_bytes();
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains(
            "ringfence_quota_exhausted{quota=\"prod/daily#0\",key=\"team:search\",window=\"day\"} 1"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn the_operator_reads_each_run_budgets_quota_counters_from_the_budget_service_under_its_own_svid()
 {
    let trust = Trust::new();
    let research = trust.svid("research");
    let (_dir, store) = sqlite_store().await;
    let budget = Budget::start(&trust, store).await;
    let run = new_run();
    let terms = RunTerms {
        quotas: vec![daily_team_quota("search")],
        ..terms(None, OnBreach::HaltAndAlert)
    };
    let lease = budget.lease(&research, &run, &terms, 100).await;
    budget
        .report(
            &research,
            vec![spend("q1", &run, Some(&lease_id(&lease)), 40, 2_000_000)],
        )
        .await;

    // The operator's reader: the CA's own SVID for ringfence-operator, over mTLS.
    let url = format!("https://localhost:{}", budget.addr.port());
    let mut reader =
        BudgetQuotas::new(&url, trust.identity.clone(), "ringfence-system").expect("a reader");
    let counters = reader.read().await.expect("the budget service answers");
    let usages = quotas::group(&counters);
    let daily = &usages[&("prod".to_owned(), "daily".to_owned())];
    assert_eq!(daily.len(), 1, "{daily:?}");
    assert_eq!(daily[0].id, "prod/daily#0");
    assert_eq!(daily[0].key, "team:search");
    assert_eq!(daily[0].window, "day");
    assert_eq!(daily[0].tokens, 40);
    assert_eq!(daily[0].cost_usd, "2.00");
    assert!(!daily[0].exhausted);

    // Once the service is gone, a read fails and says where it tried.
    drop(budget);
    let mut reader = reader.fresh();
    let err = reader.read().await.expect_err("nothing answers");
    assert!(err.to_string().contains(&url), "{err}");
}
