//! Model fallback through a real sidecar and budget service: a provider that fails (503, 429,
//! too slow, unreachable) hands the call to the next route permitted by policy, and the call is
//! charged at the price of the model that answered.
//!
//! Prices (the shipped table): gpt-4o 2.50 $/M in, 10.00 $/M out; gpt-4o-mini 0.15 / 0.60. The
//! mock answers 100 in, 50 out, so a call costs 750 µ$ at gpt-4o and 45 µ$ at gpt-4o-mini.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use ringfence_e2e::llm::{self, CHAT_IN, CHAT_OUT};
use ringfence_e2e::mesh::{Mesh, Reply, call};
use ringfence_e2e::peers;

const GPT_4O_MICROS: u64 = 750;
const GPT_4O_MINI_MICROS: u64 = 45;

fn manifests(models: &str) -> String {
    format!(
        "apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {{name: models}}
spec:
  allow:
    - from: [orchestrator]
      models: [{models}]
---
apiVersion: ringfence.dev/v1alpha1
kind: RunBudget
metadata: {{name: limits}}
spec:
  maxCostUsd: \"10\"
"
    )
}

fn provider(name: &str, at: SocketAddr, extra: &str) -> String {
    format!("\n    - {{name: {name}, url: \"http://{at}\"{extra}}}")
}

fn chat(model: &str, stream: bool) -> String {
    serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}).to_string()
}

async fn ask(mesh: &Mesh, provider: &str, body: &str) -> Reply {
    call(
        mesh.outbound("orchestrator"),
        Method::POST,
        &format!("/models/{provider}/v1/chat/completions"),
        &[],
        body,
    )
    .await
}

fn routes(r: &Reply) -> &str {
    r.headers
        .get("ringfence-model-routes")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// The run a call started, from the context the sidecar handed back.
fn run_of(r: &Reply) -> String {
    use base64::Engine;
    let sealed = r.headers["ringfence-context"].to_str().unwrap();
    let payload = sealed.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["run"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn ledger(mesh: &Mesh, run: &str) -> serde_json::Value {
    ringfence_e2e::eventually(
        Duration::from_secs(5),
        "the call and its spend in the ledger",
        || async {
            let (_, body) =
                ringfence_e2e::get_tls(mesh.plane, &mesh.ca_pem(), &format!("/v1/runs/{run}"))
                    .await
                    .ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (v["spent"]["calls"].as_u64()? == 1 && v["calls"].as_array()?.len() == 1).then_some(v)
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_503_from_the_primary_is_answered_by_the_fallback_and_charged_at_the_fallbacks_price() {
    let (down, down_app) = llm::start_failing(StatusCode::SERVICE_UNAVAILABLE).await;
    let (backup, backup_app) = llm::start().await;
    let spec = format!(
        "  mayStartRuns: true\n  models:{}{}",
        provider(
            "openai",
            down,
            ", fallbacks: [{provider: backup, model: gpt-4o-mini}]"
        ),
        provider("backup", backup, ""),
    );
    let mesh = Mesh::start(
        &[("orchestrator", &spec)],
        &manifests("openai/*, backup/gpt-4o-mini"),
    )
    .await;

    let r = ask(&mesh, "openai", &chat("gpt-4o", false)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // The app sees the fallback's completion.
    assert_eq!(r.json()["model"], "gpt-4o-mini", "{}", r.body);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "hello");
    assert_eq!(routes(&r), "openai/gpt-4o, backup/gpt-4o-mini");
    assert_eq!(down_app.requests().len(), 1);
    let asked = backup_app.requests();
    assert_eq!(asked.len(), 1);
    let sent: serde_json::Value = serde_json::from_slice(&asked[0].body).unwrap();
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert_eq!(sent["messages"][0]["content"], "hi");

    // Charged at gpt-4o-mini's price, to the provider that answered, in the run's ledger …
    let run = ledger(&mesh, &run_of(&r)).await;
    assert_eq!(run["spent"]["micros"], GPT_4O_MINI_MICROS, "{run}");
    assert_eq!(run["spent"]["tokensIn"], CHAT_IN, "{run}");
    assert_eq!(run["spent"]["tokensOut"], CHAT_OUT, "{run}");
    // The ledger's call names the provider and model that answered, with its usage and cost.
    let answered = &run["calls"][0];
    assert_eq!(answered["callee"], "model:backup", "{answered}");
    assert_eq!(answered["operation"], "gpt-4o-mini", "{answered}");
    assert_eq!(answered["tokensIn"], CHAT_IN, "{answered}");
    assert_eq!(answered["micros"], GPT_4O_MINI_MICROS, "{answered}");
    // … and in the sidecar's metrics; nothing at the primary's price.
    assert_eq!(
        mesh.metric_micros(
            "orchestrator",
            "ringfence_cost_usd_total{model=\"gpt-4o-mini\",provider=\"backup\"} "
        )
        .await,
        GPT_4O_MINI_MICROS
    );
    assert_eq!(
        mesh.metric_micros(
            "orchestrator",
            "ringfence_cost_usd_total{model=\"gpt-4o\",provider=\"openai\"} "
        )
        .await,
        0
    );
    assert_eq!(
        mesh.metric(
            "orchestrator",
            "ringfence_model_fallbacks_total{provider=\"openai\",reason=\"server_error\",to=\"backup\"} "
        )
        .await,
        1
    );

    // A stream falls back the same way, before any byte reached the app.
    let r = ask(&mesh, "openai", &chat("gpt-4o", true)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body.contains("\"model\":\"gpt-4o-mini\""), "{}", r.body);
    assert!(
        r.body.contains("\"usage\":{\"prompt_tokens\":100"),
        "the fallback got include_usage too: {}",
        r.body
    );
    assert!(!r.body.contains("mock provider answers"), "{}", r.body);
    let sent: serde_json::Value = serde_json::from_slice(&backup_app.requests()[1].body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    let run = ledger(&mesh, &run_of(&r)).await;
    assert_eq!(run["spent"]["micros"], GPT_4O_MINI_MICROS, "{run}");
}

#[tokio::test]
async fn a_429_a_timeout_and_an_unreachable_provider_fall_back_but_a_400_does_not() {
    let (limited, _) = llm::start_failing(StatusCode::TOO_MANY_REQUESTS).await;
    let (slow, slow_app) = llm::start_slow(Duration::from_secs(5)).await;
    let (bad, _) = llm::start_failing(StatusCode::BAD_REQUEST).await;
    let (backup, backup_app) = llm::start().await;
    let nowhere = SocketAddr::from(([127, 0, 0, 1], ringfence_e2e::free_port()));
    let to_backup = ", fallbacks: [{provider: backup}]";
    let spec = format!(
        "  mayStartRuns: true\n  models:{}{}{}{}{}",
        provider("limited", limited, to_backup),
        provider("slow", slow, &format!(", timeoutSeconds: 1{to_backup}")),
        provider("bad", bad, to_backup),
        provider("nowhere", nowhere, to_backup),
        provider("backup", backup, ""),
    );
    let mesh = Mesh::start(
        &[("orchestrator", &spec)],
        &manifests("limited/*, slow/*, bad/*, nowhere/*, backup/*"),
    )
    .await;

    let r = ask(&mesh, "limited", &chat("gpt-4o", false)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(routes(&r), "limited/gpt-4o, backup/gpt-4o");
    // The route names no model: the request's is kept, and priced as such.
    assert_eq!(r.json()["model"], "gpt-4o");
    let run = ledger(&mesh, &run_of(&r)).await;
    assert_eq!(run["spent"]["micros"], GPT_4O_MICROS, "{run}");

    let started = Instant::now();
    let r = ask(&mesh, "slow", &chat("gpt-4o", false)).await;
    let took = started.elapsed();
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(routes(&r), "slow/gpt-4o, backup/gpt-4o");
    assert_eq!(slow_app.requests().len(), 1);
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(4),
        "fell back after {took:?}, the slow provider's timeout being 1 s"
    );

    let r = ask(&mesh, "nowhere", &chat("gpt-4o", false)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(routes(&r), "nowhere/gpt-4o, backup/gpt-4o");

    // A 400 is the request's fault: every route would refuse it.
    let asked = backup_app.requests().len();
    let r = ask(&mesh, "bad", &chat("gpt-4o", false)).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.body);
    assert!(r.body.contains("mock provider answers 400"), "{}", r.body);
    assert_eq!(routes(&r), "");
    assert_eq!(backup_app.requests().len(), asked);

    for (from, reason) in [
        ("limited", "rate_limited"),
        ("slow", "timeout"),
        ("nowhere", "unreachable"),
    ] {
        assert_eq!(
            mesh.metric(
                "orchestrator",
                &format!("ringfence_model_fallbacks_total{{provider=\"{from}\",reason=\"{reason}\",to=\"backup\"}} ")
            )
            .await,
            1,
            "{from}"
        );
    }
    assert_eq!(
        mesh.metric(
            "orchestrator",
            "ringfence_model_fallbacks_total{provider=\"bad\""
        )
        .await,
        0
    );
}

#[tokio::test]
async fn a_route_policy_denies_is_skipped_and_when_every_route_fails_the_app_gets_the_last_failure()
{
    let (down, _) = llm::start_failing(StatusCode::SERVICE_UNAVAILABLE).await;
    let (broken, broken_app) = llm::start_failing(StatusCode::INTERNAL_SERVER_ERROR).await;
    let (backup, backup_app) = llm::start().await;
    let spec = format!(
        "  mayStartRuns: true\n  models:{}{}{}{}",
        // o1 is not permitted: that route is skipped, the next one answers.
        provider(
            "guarded",
            down,
            ", fallbacks: [{provider: backup, model: o1}, {provider: backup, model: gpt-4o-mini}]"
        ),
        provider("openai", down, ", fallbacks: [{provider: broken}]"),
        provider("broken", broken, ""),
        provider("backup", backup, ""),
    );
    let mesh = Mesh::start(
        &[("orchestrator", &spec)],
        &manifests("guarded/*, openai/*, broken/*, backup/gpt-4o-mini"),
    )
    .await;

    let r = ask(&mesh, "guarded", &chat("gpt-4o", false)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.json()["model"], "gpt-4o-mini");
    assert_eq!(routes(&r), "guarded/gpt-4o, backup/gpt-4o-mini");
    let asked = backup_app.requests();
    assert_eq!(asked.len(), 1, "o1 was never asked");
    let sent: serde_json::Value = serde_json::from_slice(&asked[0].body).unwrap();
    assert_eq!(sent["model"], "gpt-4o-mini");
    assert_eq!(
        mesh.metric(
            "orchestrator",
            "ringfence_model_fallbacks_total{provider=\"guarded\",reason=\"policy\",to=\"backup\"} "
        )
        .await,
        1
    );

    // Both routes down: the app gets the fallback's own 500, not a sidecar-made error.
    let r = ask(&mesh, "openai", &chat("gpt-4o", false)).await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.body);
    assert!(r.body.contains("mock provider answers 500"), "{}", r.body);
    assert!(r.headers.get("ringfence-denied").is_none());
    assert_eq!(routes(&r), "openai/gpt-4o, broken/gpt-4o");
    assert_eq!(broken_app.requests().len(), 1);
    // Failures are not billed.
    assert_eq!(
        mesh.metric(
            "orchestrator",
            "ringfence_tokens_total{kind=\"input\",model=\"gpt-4o\",provider=\"broken\"} "
        )
        .await,
        0
    );
}

/// The official OpenAI Python client, unaware of any fallback: its three calls (chat, streamed
/// chat, Responses) to a provider that answers 503 are answered by the fallback, at its price.
#[tokio::test]
async fn the_openai_client_is_answered_by_the_fallback_when_its_provider_is_down() {
    // SAFETY: set before the runtime's other threads or the sidecar read the environment, and
    // nextest runs each test in its own process.
    unsafe { std::env::set_var("RINGFENCE_TEST_OPENAI_KEY", "sk-test-openai") };
    let (python, script) = (peers::python(), peers::script("openai_chat.py"));
    let (down, _) = llm::start_failing(StatusCode::SERVICE_UNAVAILABLE).await;
    let (backup, backup_app) = llm::start().await;
    let spec = format!(
        "  mayStartRuns: true\n  models:{}{}",
        provider(
            "openai",
            down,
            ", apiKeyEnv: RINGFENCE_TEST_OPENAI_KEY, fallbacks: [{provider: backup, model: gpt-4o}]"
        ),
        provider("backup", backup, ", apiKeyEnv: RINGFENCE_TEST_OPENAI_KEY"),
    );
    let mesh = Mesh::start(&[("orchestrator", &spec)], &manifests("openai/*, backup/*")).await;

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
    assert!(
        out.status.success(),
        "openai_chat.py failed ({}):\n{}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    let got = backup_app.requests();
    assert_eq!(got.len(), 3);
    for r in &got {
        assert_eq!(r.headers["authorization"], "Bearer sk-test-openai");
        let sent: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(sent["model"], "gpt-4o", "{}", r.path);
    }
    // The client asked for gpt-4o-mini (45 µ$ a call); gpt-4o answered (750 µ$).
    let runs = ringfence_e2e::eventually(
        Duration::from_secs(10),
        "3 runs with one call each in the ledger",
        || async {
            let (_, body) = ringfence_e2e::get_tls(
                mesh.plane,
                &mesh.ca_pem(),
                "/v1/runs?agent=default%2Forchestrator",
            )
            .await
            .ok()?;
            let runs: Vec<serde_json::Value> = serde_json::from_str(&body).ok()?;
            (runs.len() == 3 && runs.iter().all(|r| r["spent"]["calls"] == 1)).then_some(runs)
        },
    )
    .await
    .unwrap();
    for r in &runs {
        assert_eq!(r["spent"]["micros"], GPT_4O_MICROS, "{r}");
    }
    assert_eq!(
        mesh.metric(
            "orchestrator",
            "ringfence_model_fallbacks_total{provider=\"openai\",reason=\"server_error\",to=\"backup\"} "
        )
        .await,
        3
    );
}
