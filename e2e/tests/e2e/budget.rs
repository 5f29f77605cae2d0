//! Run budgets through real sidecars and the real budget service (inside `ringfence local`):
//! LLM usage counted from every API shape, the run halted everywhere when its budget is spent.

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use ringfence_e2e::llm;
use ringfence_e2e::mesh::{Mesh, call, send_message};

fn policy(budget: &str) -> String {
    format!(
        "apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {{name: models}}
spec:
  allow:
    - from: [orchestrator]
      agents: [research, writer]
    - from: [orchestrator, research, writer]
      models: [openai/*, anthropic/*]
---
apiVersion: ringfence.dev/v1alpha1
kind: RunBudget
metadata: {{name: limits}}
spec:
{budget}
"
    )
}

fn models_spec(llm: std::net::SocketAddr, first_line: &str) -> &'static str {
    Box::leak(
        format!("{first_line}\n  models:\n    - {{name: openai, url: \"http://{llm}\", apiKeyEnv: RINGFENCE_TEST_OPENAI_KEY}}\n    - {{name: anthropic, url: \"http://{llm}\", api: Anthropic, apiKeyEnv: RINGFENCE_TEST_ANTHROPIC_KEY}}")
            .into_boxed_str(),
    )
}

fn chat(stream: bool) -> String {
    serde_json::json!({"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}).to_string()
}

#[tokio::test]
async fn usage_is_counted_for_openai_chat_and_responses_and_anthropic_plain_and_streaming() {
    // SAFETY: set before any other thread of this test process reads the environment.
    unsafe {
        std::env::set_var("RINGFENCE_TEST_OPENAI_KEY", "sk-test-openai");
        std::env::set_var("RINGFENCE_TEST_ANTHROPIC_KEY", "sk-test-anthropic");
    }
    let (addr, mock) = llm::start().await;
    let mesh = Mesh::start(
        &[("orchestrator", models_spec(addr, "  mayStartRuns: true"))],
        &policy("  maxTotalTokens: 1000000"),
    )
    .await;
    let out = mesh.outbound("orchestrator");

    for stream in [false, true] {
        let r = call(
            out,
            Method::POST,
            "/models/openai/v1/chat/completions",
            &[("authorization", "Bearer agent-must-not-hold-keys")],
            &chat(stream),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        if stream {
            assert!(
                r.body.contains("\"usage\":{\"prompt_tokens\":100"),
                "include_usage was set: {}",
                r.body
            );
        }
        let body = serde_json::json!({"model": "gpt-4o-mini", "stream": stream, "input": "hi"})
            .to_string();
        let r = call(out, Method::POST, "/models/openai/v1/responses", &[], &body).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let body = serde_json::json!({"model": "claude-sonnet-4", "stream": stream, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}).to_string();
        let r = call(
            out,
            Method::POST,
            "/models/anthropic/v1/messages",
            &[],
            &body,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    // The provider saw the sidecar's key, never the agent's.
    let got = mock.requests();
    assert_eq!(got.len(), 6);
    assert_eq!(got[0].headers["authorization"], "Bearer sk-test-openai");
    assert_eq!(
        got[0].headers["accept-encoding"], "identity",
        "usage must come uncompressed"
    );
    assert_eq!(got[2].headers["x-api-key"], "sk-test-anthropic");
    assert!(got[2].headers.get("authorization").is_none());
    let streamed: serde_json::Value = serde_json::from_slice(&got[3].body).unwrap();
    assert_eq!(streamed["stream_options"]["include_usage"], true);

    // 4 OpenAI answers × (100 in, 50 out); 2 Anthropic × (10 + 20 + 30 in, 40 out).
    let input = |p: &'static str, m: &'static str| {
        mesh.metric(
            "orchestrator",
            Box::leak(
                format!("ringfence_tokens_total{{kind=\"input\",model=\"{m}\",provider=\"{p}\"}}")
                    .into_boxed_str(),
            ),
        )
    };
    assert_eq!(input("openai", "gpt-4o-mini").await, 400);
    assert_eq!(input("anthropic", "claude-sonnet-4").await, 120);
    assert_eq!(
        mesh.metric(
            "orchestrator",
            "ringfence_tokens_total{kind=\"output\",model=\"gpt-4o-mini\",provider=\"openai\"}"
        )
        .await,
        200
    );
    assert_eq!(mesh.metric( "orchestrator", "ringfence_tokens_total{kind=\"output\",model=\"claude-sonnet-4\",provider=\"anthropic\"}").await, 80);
    assert_eq!(
        mesh.metric("orchestrator", "ringfence_usage_estimated_total")
            .await,
        0
    );
    // gpt-4o-mini: 400 × 0.15 $/M + 200 × 0.60 $/M = 60 + 120 µ$ = 180 µ$.
    assert_eq!(
        mesh.metric_micros(
            "orchestrator",
            "ringfence_cost_usd_total{model=\"gpt-4o-mini\",provider=\"openai\"}"
        )
        .await,
        180
    );
}

#[tokio::test]
async fn a_run_over_its_token_budget_is_refused_with_402_halted_everywhere_within_a_second_and_alerted()
 {
    let (addr, _mock) = llm::start().await;
    let (hook_addr, hook) = ringfence_e2e::mesh::App::serve_fresh().await;
    let mesh = Mesh::start(
        &[
            ("orchestrator", models_spec(addr, "  mayStartRuns: true")),
            ("research", models_spec(addr, "  team: research")),
            ("writer", ""),
        ],
        &policy(&format!(
            "  maxTotalTokens: 1000\n  onBreach: HaltAndAlert\n  alert: {{webhook: \"http://{hook_addr}/alerts\"}}"
        )),
    )
    .await;
    // Start a run (on behalf of a person) and hand its context to research.
    let out = mesh.outbound("orchestrator");
    let r = call(
        out,
        Method::POST,
        "/agents/research/",
        &[("ringfence-user", "user:tomas")],
        &send_message(1, "go"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let run_ctx = r.headers["ringfence-context"].to_str().unwrap().to_owned();
    let research_ctx = mesh.app("research").requests()[0].context().unwrap();

    // research spends 150 tokens a call; the run allows 1000.
    let research_out = mesh.outbound("research");
    let mut refused = None;
    for i in 0..20 {
        let r = call(
            research_out,
            Method::POST,
            "/models/openai/v1/chat/completions",
            &[("ringfence-context", &research_ctx)],
            &chat(false),
        )
        .await;
        if r.status != StatusCode::OK {
            refused = Some((i, r));
            break;
        }
    }
    let (calls, r) = refused.expect("the budget never tripped");
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{}", r.body);
    assert!(
        (5..=8).contains(&calls),
        "tripped after {calls} calls of 150 tokens under a 1000-token budget"
    );
    let e = &r.json()["error"];
    assert_eq!(e["reason"], "budget");
    assert!(
        e["rule"] == "maxTotalTokens" || e["rule"] == "onBreach",
        "{e}"
    );

    // The halt reaches the orchestrator's sidecar: the run's next call there is refused too.
    let started = Instant::now();
    let halted_at_orchestrator = ringfence_e2e::eventually(
        Duration::from_secs(2),
        "the halt at the orchestrator",
        || async {
            let r = call(
                out,
                Method::POST,
                "/agents/writer/",
                &[("ringfence-context", &run_ctx)],
                &send_message(2, "more"),
            )
            .await;
            (r.status == StatusCode::PAYMENT_REQUIRED).then_some(r)
        },
    )
    .await
    .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the halt took {:?}",
        started.elapsed()
    );
    assert!(
        halted_at_orchestrator.body.contains("halted"),
        "{}",
        halted_at_orchestrator.body
    );
    // Polls sent before the halt arrived may have reached the writer; none after it does.
    let reached_before = mesh.app("writer").requests().len();
    let r = call(
        out,
        Method::POST,
        "/agents/writer/",
        &[("ringfence-context", &run_ctx)],
        &send_message(4, "after the halt"),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{}", r.body);
    assert_eq!(mesh.app("writer").requests().len(), reached_before);

    // Other runs go on.
    let r = call(
        out,
        Method::POST,
        "/agents/writer/",
        &[],
        &send_message(3, "new run"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // The alert webhook got the run's summary: who started it, for whom, who spent what, and
    // which limit tripped.
    let alert = ringfence_e2e::eventually(Duration::from_secs(5), "the alert", || async {
        hook.requests()
            .first()
            .map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap())
    })
    .await
    .unwrap();
    assert_eq!(hook.requests().len(), 1, "one alert per breach");
    assert_eq!(hook.requests()[0].path, "/alerts");
    assert_eq!(alert["root"], "orchestrator", "{alert}");
    assert_eq!(alert["user"], "user:tomas", "{alert}");
    assert_eq!(alert["limit"], "maxTotalTokens", "{alert}");
    assert_eq!(alert["limitValue"], 1000, "{alert}");
    assert_eq!(alert["status"], "halted", "{alert}");
    let research = alert["spendByAgent"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["agent"] == "default/research")
        .cloned()
        .unwrap_or_default();
    assert_eq!(research["calls"].as_u64(), Some(calls as u64), "{alert}");
}

#[tokio::test]
async fn concurrent_sidecars_spending_on_one_run_never_overshoot_its_budget() {
    let (addr, _mock) = llm::start().await;
    let workers = ["w1", "w2", "w3"];
    let mut agents = vec![("orchestrator", models_spec(addr, "  mayStartRuns: true"))];
    for w in workers {
        agents.push((w, models_spec(addr, "  team: workers")));
    }
    let policy = policy("  maxTotalTokens: 3000\n  onBreach: Halt")
        .replace("agents: [research, writer]", "agents: [w1, w2, w3]")
        .replace(
            "[orchestrator, research, writer]",
            "[orchestrator, w1, w2, w3]",
        );
    let mesh = Mesh::start(&agents, &policy).await;
    let out = mesh.outbound("orchestrator");
    let r = call(
        out,
        Method::POST,
        "/agents/w1/",
        &[],
        &send_message(1, "go"),
    )
    .await;
    let run_ctx = r.headers["ringfence-context"].to_str().unwrap().to_owned();
    for w in &workers[1..] {
        let r = call(
            out,
            Method::POST,
            &format!("/agents/{w}/"),
            &[("ringfence-context", &run_ctx)],
            &send_message(1, "go"),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    // Every worker's sidecar spends on the same run at once, until refused.
    let mut tasks = Vec::new();
    for w in workers {
        let ctx = mesh.app(w).requests()[0].context().unwrap();
        let out = mesh.outbound(w);
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            loop {
                let r = call(
                    out,
                    Method::POST,
                    "/models/openai/v1/chat/completions",
                    &[("ringfence-context", &ctx)],
                    &chat(false),
                )
                .await;
                match r.status {
                    StatusCode::OK => ok += 1,
                    StatusCode::PAYMENT_REQUIRED => return ok,
                    other => panic!("unexpected {other}: {}", r.body),
                }
            }
        }));
    }
    let mut calls = 0;
    for t in tasks {
        calls += t.await.unwrap();
    }
    let run = run_ctx
        .split('.')
        .nth(1)
        .map(|p| {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .unwrap();
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["run"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .unwrap();
    // The reports are batched: wait until every call's spend is in the ledger.
    let detail =
        ringfence_e2e::eventually(Duration::from_secs(5), "all spend reported", || async {
            let (_, body) =
                ringfence_e2e::get_tls(mesh.plane, &mesh.ca_pem(), &format!("/v1/runs/{run}"))
                    .await
                    .ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (v["spent"]["calls"].as_u64()? == calls).then_some(v)
        })
        .await
        .unwrap();
    let spent = detail["spent"]["tokensIn"].as_u64().unwrap()
        + detail["spent"]["tokensOut"].as_u64().unwrap();
    assert!(spent <= 3000, "spent {spent} of 3000: {detail}");
    assert_eq!(spent, calls * 150);
    // The budget was used, not refused early: at most one reservation per worker is left over.
    assert!(
        spent >= 3000 - 3 * 300,
        "only {spent} of 3000 spent before the refusal"
    );
    assert_eq!(
        detail["agents"].as_array().map(Vec::len),
        Some(3),
        "spend is attributed per agent: {detail}"
    );
    // Attribution: the workers' team and the RunBudget they spent under.
    let (_, body) = ringfence_e2e::get_tls(mesh.plane, &mesh.ca_pem(), "/v1/spend?by=team")
        .await
        .unwrap();
    let teams: serde_json::Value = serde_json::from_str(&body).unwrap();
    let workers = teams
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["key"] == "workers")
        .cloned()
        .unwrap_or_default();
    assert_eq!(workers["calls"].as_u64(), Some(calls), "{teams}");
    let (_, body) = ringfence_e2e::get_tls(mesh.plane, &mesh.ca_pem(), "/v1/spend?by=workflow")
        .await
        .unwrap();
    assert!(body.contains("\"key\":\"default/limits\""), "{body}");
}

/// A `ringfence budget` of its own, in process, on `addr`, over the SQLite file `db`.
async fn budget_service(
    mesh_state: &std::path::Path,
    addr: std::net::SocketAddr,
    db: &std::path::Path,
) -> tokio::sync::oneshot::Sender<()> {
    let identity = ringfence::identity::Identity::load_or_create(
        mesh_state,
        ringfence_crds::TrustDomain::default(),
        Duration::from_secs(3600),
    )
    .unwrap();
    let tls = identity
        .server_tls_config(&["localhost".into(), "127.0.0.1".into()])
        .unwrap();
    let store = ringfence::budget::store::Store::open_sqlite(db)
        .await
        .unwrap();
    let service = ringfence::budget::service::BudgetService::new(store);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(ringfence::budget::service::serve(
        listener,
        std::sync::Arc::new(tls),
        service,
        async move {
            let _ = rx.await;
        },
    ));
    tx
}

#[tokio::test]
async fn with_the_budget_service_down_sidecars_spend_their_lease_then_refuse_and_deliver_the_spend_when_it_returns()
 {
    let (llm_addr, _mock) = llm::start().await;
    let budget_addr = std::net::SocketAddr::from(([127, 0, 0, 1], ringfence_e2e::free_port()));
    let db_dir = tempfile::tempdir().unwrap();
    let db = db_dir.path().join("budget.db");
    // The control plane's CA must exist before the budget service issues its certificate: start
    // the mesh first, pointed at the budget address, then the service on it.
    let mesh = Mesh::start_full(
        &[(
            "orchestrator",
            models_spec(llm_addr, "  mayStartRuns: true"),
        )],
        &policy("  maxTotalTokens: 100000"),
        Duration::from_secs(3600),
        Some(format!("https://{budget_addr}")),
    )
    .await;
    let stop = budget_service(&mesh.state_dir(), budget_addr, &db).await;
    let out = mesh.outbound("orchestrator");
    let r = call(
        out,
        Method::POST,
        "/models/openai/v1/chat/completions",
        &[],
        &chat(false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let ctx = r.headers["ringfence-context"].to_str().unwrap().to_owned();

    // The service goes away; the lease in hand (a twentieth of the budget) keeps the run going.
    let _ = stop.send(());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut served = 1u64;
    let refusal = loop {
        let r = call(
            out,
            Method::POST,
            "/models/openai/v1/chat/completions",
            &[("ringfence-context", &ctx)],
            &chat(false),
        )
        .await;
        if r.status != StatusCode::OK {
            break r;
        }
        served += 1;
        assert!(
            served < 100,
            "a lease of 5,000 tokens cannot cover {served} calls"
        );
    };
    assert!(
        served >= 10,
        "only {served} calls were served from the lease"
    );
    assert_eq!(
        refusal.status,
        StatusCode::PAYMENT_REQUIRED,
        "{}",
        refusal.body
    );
    assert!(
        refusal.body.contains("cannot be reached") && refusal.body.contains("fail closed"),
        "{}",
        refusal.body
    );

    // The service returns (same database): every call served meanwhile is delivered.
    let _stop = budget_service(&mesh.state_dir(), budget_addr, &db).await;
    let run = {
        use base64::Engine;
        let p = ctx.split('.').nth(1).unwrap();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(p)
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["run"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let ca = mesh.ca_pem();
    ringfence_e2e::eventually(
        Duration::from_secs(20),
        "the spend made while the service was down",
        || async {
            let (_, body) = ringfence_e2e::get_tls(budget_addr, &ca, &format!("/v1/runs/{run}"))
                .await
                .ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (v["spent"]["calls"].as_u64()? == served).then_some(())
        },
    )
    .await
    .unwrap();
    // And the run goes on.
    let r = call(
        out,
        Method::POST,
        "/models/openai/v1/chat/completions",
        &[("ringfence-context", &ctx)],
        &chat(false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

#[tokio::test]
async fn a_run_that_fails_open_keeps_going_while_the_budget_service_is_down() {
    let (llm_addr, _mock) = llm::start().await;
    let budget_addr = std::net::SocketAddr::from(([127, 0, 0, 1], ringfence_e2e::free_port()));
    let db_dir = tempfile::tempdir().unwrap();
    let db = db_dir.path().join("budget.db");
    let mesh = Mesh::start_full(
        &[(
            "orchestrator",
            models_spec(llm_addr, "  mayStartRuns: true"),
        )],
        &policy("  maxTotalTokens: 100000\n  onBudgetServiceUnavailable: FailOpen"),
        Duration::from_secs(3600),
        Some(format!("https://{budget_addr}")),
    )
    .await;
    let stop = budget_service(&mesh.state_dir(), budget_addr, &db).await;
    let out = mesh.outbound("orchestrator");
    let r = call(
        out,
        Method::POST,
        "/models/openai/v1/chat/completions",
        &[],
        &chat(false),
    )
    .await;
    let ctx = r.headers["ringfence-context"].to_str().unwrap().to_owned();
    let _ = stop.send(());
    // Well past what the lease in hand covers (~21 calls), every call is served.
    for i in 0..40 {
        let r = call(
            out,
            Method::POST,
            "/models/openai/v1/chat/completions",
            &[("ringfence-context", &ctx)],
            &chat(false),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK, "call {i}: {}", r.body);
    }
    let _stop = budget_service(&mesh.state_dir(), budget_addr, &db).await;
    let run = run_of(&ctx);
    let ca = mesh.ca_pem();
    ringfence_e2e::eventually(
        Duration::from_secs(20),
        "the spend made while failing open",
        || async {
            let (_, body) = ringfence_e2e::get_tls(budget_addr, &ca, &format!("/v1/runs/{run}"))
                .await
                .ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (v["spent"]["calls"].as_u64()? == 41).then_some(())
        },
    )
    .await
    .unwrap();
}

fn run_of(sealed_ctx: &str) -> String {
    use base64::Engine;
    let p = sealed_ctx.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(p)
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["run"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn kill_9_of_the_budget_service_mid_stream_loses_no_spend_and_counts_none_twice() {
    use ringfence_e2e::{Proc, binary};
    let (llm_addr, _mock) = llm::start().await;
    let budget_addr = std::net::SocketAddr::from(([127, 0, 0, 1], ringfence_e2e::free_port()));
    let db_dir = tempfile::tempdir().unwrap();
    let db = db_dir.path().join("budget.db");
    let mesh = Mesh::start_full(
        &[(
            "orchestrator",
            models_spec(llm_addr, "  mayStartRuns: true"),
        )],
        &policy("  maxTotalTokens: 1000000"),
        Duration::from_secs(3600),
        Some(format!("https://{budget_addr}")),
    )
    .await;
    let start_service = || {
        Proc::spawn(
            "ringfence budget",
            std::process::Command::new(binary("ringfence"))
                .arg("budget")
                .arg("--state")
                .arg(mesh.state_dir())
                .args(["--listen", &budget_addr.to_string()])
                .arg("--database")
                .arg(&db),
        )
        .unwrap()
    };
    let mut service = start_service();
    let ca = mesh.ca_pem();
    ringfence_e2e::eventually(Duration::from_secs(20), "the budget service", || async {
        ringfence_e2e::get_tls(budget_addr, &ca, "/v1/runs")
            .await
            .ok()
            .filter(|(s, _)| s.is_success())
    })
    .await
    .unwrap();

    let out = mesh.outbound("orchestrator");
    let r = call(
        out,
        Method::POST,
        "/models/openai/v1/chat/completions",
        &[],
        &chat(false),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let ctx = r.headers["ringfence-context"].to_str().unwrap().to_owned();
    let mut served = 1u64;
    // Calls stream spend reports (every 100 ms); the service dies without warning in between.
    for i in 0..60 {
        if i == 20 {
            service.kill();
        }
        if i == 40 {
            service = start_service();
        }
        let r = call(
            out,
            Method::POST,
            "/models/openai/v1/chat/completions",
            &[("ringfence-context", &ctx)],
            &chat(false),
        )
        .await;
        match r.status {
            StatusCode::OK => served += 1,
            // While it is down and the lease is spent, metered calls fail closed.
            StatusCode::PAYMENT_REQUIRED => {
                assert!(r.body.contains("cannot be reached"), "{}", r.body)
            }
            other => panic!("unexpected {other}: {}", r.body),
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let run = run_of(&ctx);
    let got = ringfence_e2e::eventually(
        Duration::from_secs(20),
        "every served call in the ledger",
        || async {
            let (_, body) = ringfence_e2e::get_tls(budget_addr, &ca, &format!("/v1/runs/{run}"))
                .await
                .ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let calls = v["spent"]["calls"].as_u64()?;
            (calls >= served).then_some(v)
        },
    )
    .await
    .unwrap();
    // Exactly once: re-sent batches (unacknowledged when the service died) are not counted twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, body) = ringfence_e2e::get_tls(budget_addr, &ca, &format!("/v1/runs/{run}"))
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["spent"]["calls"].as_u64(), Some(served), "{got}");
    assert_eq!(v["spent"]["tokensIn"].as_u64(), Some(served * 100));
}

#[tokio::test]
async fn a_truncated_usage_block_is_counted_as_an_estimate_with_a_warning_metric() {
    let (addr, _mock) = llm::start().await;
    let mesh = Mesh::start(
        &[("orchestrator", models_spec(addr, "  mayStartRuns: true"))],
        &policy("  maxTotalTokens: 1000000"),
    )
    .await;
    let body = serde_json::json!({"model": "truncated-usage", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}).to_string();
    let r = call(
        mesh.outbound("orchestrator"),
        Method::POST,
        "/models/openai/v1/chat/completions",
        &[],
        &body,
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "the answer passes through as it came: {}",
        r.body
    );
    let (_, text) = ringfence_e2e::get(mesh.agent("orchestrator").ports.admin, "/metrics")
        .await
        .unwrap();
    let estimated: u64 = text
        .lines()
        .filter(|l| l.starts_with("ringfence_usage_estimated_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(estimated, 1, "{text}");
    // The estimate errs high: something was counted, never nothing.
    assert!(
        mesh.metric(
            "orchestrator",
            "ringfence_tokens_total{kind=\"input\",model=\"other\",provider=\"openai\"}"
        )
        .await
            > 0,
        "{text}"
    );
}

#[tokio::test]
async fn a_daily_team_quota_refuses_the_teams_model_calls_across_runs_and_survives_a_budget_service_restart()
 {
    use ringfence_e2e::{Proc, binary};
    let (llm_addr, _mock) = llm::start().await;
    let budget_addr = std::net::SocketAddr::from(([127, 0, 0, 1], ringfence_e2e::free_port()));
    let db_dir = tempfile::tempdir().unwrap();
    let db = db_dir.path().join("budget.db");
    // No run limits at all: the team's daily quota alone meters the calls.
    let mesh = Mesh::start_full(
        &[
            (
                "orchestrator",
                models_spec(llm_addr, "  mayStartRuns: true\n  team: search"),
            ),
            (
                "research",
                models_spec(llm_addr, "  mayStartRuns: true\n  team: search"),
            ),
            (
                "writer",
                models_spec(llm_addr, "  mayStartRuns: true\n  team: docs"),
            ),
        ],
        &policy("  quotas:\n    - {per: Team, window: Day, maxTotalTokens: 1000}"),
        Duration::from_secs(3600),
        Some(format!("https://{budget_addr}")),
    )
    .await;
    let start_service = || {
        Proc::spawn(
            "ringfence budget",
            std::process::Command::new(binary("ringfence"))
                .arg("budget")
                .arg("--state")
                .arg(mesh.state_dir())
                .args(["--listen", &budget_addr.to_string()])
                .arg("--database")
                .arg(&db),
        )
        .unwrap()
    };
    let ca = mesh.ca_pem();
    let ready = || async {
        ringfence_e2e::eventually(Duration::from_secs(20), "the budget service", || async {
            ringfence_e2e::get_tls(budget_addr, &ca, "/v1/runs")
                .await
                .ok()
                .filter(|(s, _)| s.is_success())
        })
        .await
        .unwrap();
    };
    let mut service = start_service();
    ready().await;
    let model_call = |agent: &'static str, ctx: Option<String>| {
        let out = mesh.outbound(agent);
        async move {
            let headers: Vec<(&str, &str)> = match &ctx {
                Some(c) => vec![("ringfence-context", c.as_str())],
                None => vec![],
            };
            call(
                out,
                Method::POST,
                "/models/openai/v1/chat/completions",
                &headers,
                &chat(false),
            )
            .await
        }
    };

    // The orchestrator's run spends the search team's day, 150 tokens a call.
    let first = model_call("orchestrator", None).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let ctx = first.headers["ringfence-context"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut served = 1;
    let refused = loop {
        let r = model_call("orchestrator", Some(ctx.clone())).await;
        if r.status != StatusCode::OK {
            break r;
        }
        served += 1;
        assert!(
            served <= 7,
            "1000 tokens a day allow at most 6 calls of 150"
        );
    };
    assert_eq!(
        refused.status,
        StatusCode::PAYMENT_REQUIRED,
        "{}",
        refused.body
    );
    assert!(
        refused.body.contains("team:search day"),
        "the refusal names the quota: {}",
        refused.body
    );

    // research is in the same team: its own new run is refused too; writer's team is not.
    let r = model_call("research", None).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{}", r.body);
    assert!(r.body.contains("team:search day"), "{}", r.body);
    let r = model_call("writer", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // A restarted budget service still holds the day's spend. The sidecars report spend in
    // batches a little after each call: wait until the service has it before killing it.
    let search_tokens = || async {
        let (_, body) = ringfence_e2e::get_tls(budget_addr, &ca, "/v1/quotas")
            .await
            .ok()?;
        let quotas: serde_json::Value = serde_json::from_str(&body).ok()?;
        quotas
            .as_array()?
            .iter()
            .find(|q| q["key"] == "team:search")?["tokens"]
            .as_u64()
    };
    ringfence_e2e::eventually(
        Duration::from_secs(10),
        "the search team's spend",
        || async { search_tokens().await.filter(|t| *t == 150 * served) },
    )
    .await
    .unwrap();
    service.kill();
    service = start_service();
    ready().await;
    let r = model_call("research", None).await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "{}", r.body);
    assert!(r.body.contains("team:search day"), "{}", r.body);
    let r = model_call("writer", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // The restarted service holds exactly what the first one acknowledged.
    let (_, body) = ringfence_e2e::get_tls(budget_addr, &ca, "/v1/quotas")
        .await
        .unwrap();
    let quotas: serde_json::Value = serde_json::from_str(&body).unwrap();
    let search = quotas
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["key"] == "team:search")
        .unwrap_or_else(|| panic!("no search counter in {body}"));
    assert_eq!(search["exhausted"], true, "{body}");
    assert_eq!(search["tokens"].as_u64(), Some(150 * served), "{body}");
    drop(service);
}
