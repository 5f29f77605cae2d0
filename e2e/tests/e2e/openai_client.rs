//! The official OpenAI Python client, used as an agent uses it, through a real sidecar: it holds
//! no key, sees the provider's usage unchanged, and every call is counted in the sidecar's
//! metrics and in the run ledger of the control plane.
//!
//! The client runs from `e2e/.venv`, which `bash hack/python-peers.sh` installs at pinned
//! versions; without it this test fails (it never skips).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ringfence_e2e::llm::{self, CHAT_IN, CHAT_OUT};
use ringfence_e2e::mesh::Mesh;

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

/// The venv's interpreter and the agent script, or a failure that says how to install them.
fn python_peer(script: &str) -> (PathBuf, PathBuf) {
    let e2e = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = e2e.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: the Python peers are not installed; run `bash hack/python-peers.sh`",
        python.display()
    );
    (python, e2e.join("python").join(script))
}

#[tokio::test]
async fn the_openai_client_calls_through_the_sidecar_without_a_key_and_every_call_is_counted() {
    // SAFETY: set before the runtime's other threads or the sidecar read the environment, and
    // nextest runs each test in its own process.
    unsafe { std::env::set_var("RINGFENCE_TEST_OPENAI_KEY", SIDECAR_KEY) };
    let (python, script) = python_peer("openai_chat.py");
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
