//! The official OpenAI Python client, used as an agent uses it, through a real sidecar: it holds
//! no key, sees the provider's usage unchanged, and every call is counted in the sidecar's
//! metrics and in the run ledger of the control plane.
//!
//! The client runs from `e2e/.venv`, which `bash hack/python-peers.sh` installs at pinned
//! versions; without it this test fails (it never skips).

use std::time::Duration;

use ringfence_e2e::llm::{self, CHAT_IN, CHAT_OUT};
use ringfence_e2e::local::LocalMesh;
use ringfence_e2e::mesh::Mesh;
use ringfence_e2e::peers;

const SIDECAR_KEY: &str = "sk-test-openai";

fn orchestrator(llm: std::net::SocketAddr) -> String {
    format!(
        "  mayStartRuns: true\n  models:\n    - {{name: openai, url: \"http://{llm}\", apiKeyEnv: RINGFENCE_TEST_OPENAI_KEY}}"
    )
}

const POLICY: &str = "apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: models}
spec:
  allow:
    - from: [orchestrator]
      models: [openai/*]
---
apiVersion: ringfence.dev/v1alpha1
kind: RunBudget
metadata: {name: limits}
spec:
  maxTotalTokens: 100000
";

#[tokio::test]
async fn the_openai_client_calls_through_the_sidecar_without_a_key_and_every_call_is_counted() {
    // SAFETY: set before the runtime's other threads or the sidecar read the environment, and
    // nextest runs each test in its own process.
    unsafe { std::env::set_var("RINGFENCE_TEST_OPENAI_KEY", SIDECAR_KEY) };
    let (python, script) = (peers::python(), peers::script("openai_chat.py"));
    let (addr, mock) = llm::start().await;
    let mesh = Mesh::start(&[("orchestrator", orchestrator(addr).as_str())], POLICY).await;

    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .env(
            "RINGFENCE_MODELS_URL",
            format!("http://{}/models/openai/v1", mesh.outbound("orchestrator")),
        )
        .env_remove("RINGFENCE_CONTEXT")
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("openai_chat.py did not finish within 60 s")
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai_chat.py failed ({}):\n{stderr}\n{stdout}",
        out.status
    );

    // The client saw the provider's answer and usage, unchanged, on all three calls.
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let calls: Vec<_> = lines.iter().map(|l| l["call"].as_str().unwrap()).collect();
    assert_eq!(calls, ["chat", "chat-stream", "responses"], "{stdout}");
    for l in &lines {
        assert_eq!(l["text"], "hello", "{l}");
        assert_eq!(l["usage"]["input"], CHAT_IN, "{l}");
        assert_eq!(l["usage"]["output"], CHAT_OUT, "{l}");
    }

    // The provider saw the sidecar's key on every call, never the agent's placeholder.
    let got = mock.requests();
    assert_eq!(got.len(), 3);
    for r in &got {
        assert_eq!(
            r.headers["authorization"],
            format!("Bearer {SIDECAR_KEY}"),
            "{}",
            r.path
        );
        assert!(
            !r.headers
                .values()
                .any(|v| v.as_bytes().windows(16).any(|w| w == b"agent-has-no-key")),
            "the agent's key reached the provider on {}",
            r.path
        );
    }
    // The client did not ask for usage on the stream; the sidecar did.
    let streamed: serde_json::Value = serde_json::from_slice(&got[1].body).unwrap();
    assert_eq!(streamed["stream"], true);
    assert_eq!(streamed["stream_options"]["include_usage"], true);

    // The sidecar counted 3 × (100 in, 50 out); gpt-4o-mini costs 0.15 $/M in and 0.60 $/M out:
    // 300 × 0.15 + 150 × 0.60 = 45 + 90 = 135 µ$.
    let tokens = |kind: &str| {
        format!(
            "ringfence_tokens_total{{kind=\"{kind}\",model=\"gpt-4o-mini\",provider=\"openai\"}} "
        )
    };
    assert_eq!(
        mesh.metric("orchestrator", &tokens("input")).await,
        3 * CHAT_IN
    );
    assert_eq!(
        mesh.metric("orchestrator", &tokens("output")).await,
        3 * CHAT_OUT
    );
    assert_eq!(
        mesh.metric_micros(
            "orchestrator",
            "ringfence_cost_usd_total{model=\"gpt-4o-mini\",provider=\"openai\"} "
        )
        .await,
        135
    );
    assert_eq!(
        mesh.metric("orchestrator", "ringfence_usage_estimated_total")
            .await,
        0
    );

    // Each call came without a context, so each started its own run; the ledger has all three
    // once the sidecar's spend batches (every 100 ms) are in.
    let ca = mesh.ca_pem();
    let runs = ringfence_e2e::eventually(
        Duration::from_secs(10),
        "3 runs of orchestrator with one call each in the ledger",
        || async {
            let (status, body) =
                ringfence_e2e::get_tls(mesh.plane, &ca, "/v1/runs?agent=default%2Forchestrator")
                    .await
                    .ok()?;
            let runs: Vec<serde_json::Value> = serde_json::from_str(&body).ok()?;
            (status.is_success()
                && runs.len() == 3
                && runs.iter().all(|r| r["spent"]["calls"] == 1))
            .then_some(runs)
        },
    )
    .await
    .unwrap();
    for r in &runs {
        assert_eq!(r["spent"]["tokensIn"], CHAT_IN, "{r}");
        assert_eq!(r["spent"]["tokensOut"], CHAT_OUT, "{r}");
        assert_eq!(r["spent"]["micros"], 45, "{r}");
    }
}

/// The same client inside an SDK agent that another agent delegated to, all spawned by
/// `ringfence local`: its model calls join the run the orchestrator started, and the run's
/// ledger entry shows who spent what.
#[tokio::test]
async fn model_calls_of_a_sub_agent_land_in_the_ledger_of_the_run_that_delegated_to_it() {
    let (llm, mock) = llm::start().await;
    let research = format!(
        "  models:\n    - {{name: openai, url: \"http://{llm}\", apiKeyEnv: RINGFENCE_TEST_OPENAI_KEY}}"
    );
    let policy = "apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: delegates}
spec:
  allow:
    - from: [orchestrator]
      agents: [research]
    - from: [research]
      models: [openai/*]
---
apiVersion: ringfence.dev/v1alpha1
kind: RunBudget
metadata: {name: limits}
spec:
  maxTotalTokens: 100000
";
    let orchestrator = format!("  mayStartRuns: true\n{research}");
    let mesh = LocalMesh::start(
        &[("orchestrator", &orchestrator), ("research", &research)],
        policy,
        // The spawned sidecars inherit it; the agents never see it.
        &[("RINGFENCE_TEST_OPENAI_KEY", SIDECAR_KEY)],
    )
    .await;
    // The orchestrator delegates, then tries the model itself, which no policy permits it.
    let _orchestrator = peers::a2a_agent(
        mesh.ports("orchestrator"),
        "JSONRPC",
        &["ask:research", "model:openai"],
    )
    .await;
    let _research = peers::a2a_agent(
        mesh.ports("research"),
        "JSONRPC",
        &["model:openai", "model:openai"],
    )
    .await;

    // A user asks the orchestrator at its own address; it delegates through the mesh.
    let base = format!("http://{}", mesh.ports("orchestrator").app);
    let lines = peers::run("a2a_client.py", &["--base".into(), base, "send".into()]).await;
    let research_report = &lines[0]["reports"][0]["steps"][0]["answer"][0];
    let calls = research_report["steps"].as_array().unwrap();
    assert_eq!(calls.len(), 2, "{:#}", lines[0]);
    for c in calls {
        assert_eq!(c["ok"], true, "{c}");
        assert_eq!(c["answer"], "hello");
        assert_eq!(
            c["usage"],
            serde_json::json!({"input": CHAT_IN, "output": CHAT_OUT})
        );
    }
    assert!(
        mock.requests()
            .iter()
            .all(|r| r.headers["authorization"] == format!("Bearer {SIDECAR_KEY}")),
        "the provider saw the sidecar's key on every call"
    );
    // The OpenAI client raised its own error for the refusal; the provider never saw the call.
    let refused = &lines[0]["reports"][0]["steps"][1];
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(
        refused["error"]["type"], "PermissionDeniedError",
        "{refused}"
    );
    assert_eq!(refused["error"]["status"], 403, "{refused}");
    assert_eq!(
        refused["error"]["rule"], "default deny (no policy permits this model)",
        "{refused}"
    );
    assert_eq!(mock.requests().len(), 2);

    // One run, started by the orchestrator, with research's two calls in it: 2 × (100 in,
    // 50 out) at 0.15 $/M in and 0.60 $/M out = 2 × 45 µ$.
    let run = ringfence_e2e::eventually(
        Duration::from_secs(10),
        "research's two calls in the ledger",
        || async {
            let runs = mesh.api("/v1/runs?agent=default%2Fresearch").await?;
            let runs = runs.as_array()?;
            (runs.len() == 1 && runs[0]["spent"]["calls"] == 2).then(|| runs[0].clone())
        },
    )
    .await
    .unwrap();
    assert_eq!(run["rootAgent"], "orchestrator", "{run}");
    assert_eq!(run["spent"]["tokensIn"], 2 * CHAT_IN, "{run}");
    assert_eq!(run["spent"]["tokensOut"], 2 * CHAT_OUT, "{run}");
    assert_eq!(run["spent"]["micros"], 90, "{run}");

    let id = run["runId"].as_str().unwrap();
    let detail = mesh.api(&format!("/v1/runs/{id}")).await.unwrap();
    let agents = detail["agents"].as_array().unwrap();
    assert_eq!(agents.len(), 1, "only research spent: {detail:#}");
    assert_eq!(agents[0]["agent"], "default/research", "{detail:#}");
    assert_eq!(agents[0]["micros"], 90, "{detail:#}");
}
