//! One trace per run, through real sidecars to a real OTLP receiver, and the same run in the
//! run ledger as `ringfence runs show` draws it.
//!
//! The run: orchestrator → research → the web-search tool, research → orchestrator (refused:
//! the overnight loop's first hop), orchestrator → writer → the LLM. The apps forward only the
//! `ringfence-context` header, never `traceparent`: the sidecars keep the trace from it.

use std::process::Command;
use std::time::Duration;

use http::{Method, StatusCode};
use ringfence::budget::store::Store;
use ringfence::cli::runs::{ShowFormat, render};
use ringfence_e2e::llm::{self, CHAT_IN, CHAT_OUT};
use ringfence_e2e::mesh::{Mesh, call, json_response, mcp_server, send_message};
use ringfence_e2e::otlp::{Received, Receiver};
use ringfence_e2e::{binary, eventually};

const POLICY: &str = "\
apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: incident}
spec:
  allow:
    - from: [orchestrator]
      agents: [research, writer]
    - from: [research]
      tools: [web-search/*]
    - from: [writer]
      models: [openai/*]
---
apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: no-loops}
spec:
  deny:
    - from: [research, writer]
      agents: [orchestrator]
";

fn tool_call() -> String {
    serde_json::json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"web_search","arguments":{"q":"overnight loop"}}}).to_string()
}

fn chat() -> String {
    serde_json::json!({"model":"gpt-4o-mini","messages":[{"role":"user","content":"write it up"}],"max_tokens":100}).to_string()
}

fn one<'a>(spans: &'a [Received], name: &str, service: &str) -> &'a Received {
    let found: Vec<&Received> = spans
        .iter()
        .filter(|s| s.name() == name && s.service == service)
        .collect();
    assert_eq!(found.len(), 1, "one span {name} from {service}: {spans:#?}");
    found[0]
}

#[tokio::test]
async fn a_three_hop_run_is_one_trace_with_its_links_attributes_usage_and_refusal() {
    let otlp = Receiver::start().await;
    // SAFETY: set before the sidecars (in this process) start and read the environment.
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint());
        std::env::set_var("RINGFENCE_TEST_OPENAI_KEY", "sk-test");
    }
    let (llm_addr, _llm) = llm::start().await;
    let (search, _) = mcp_server("three sources").await;
    let research = format!("  tools:\n    - {{name: web-search, url: \"http://{search}/mcp\"}}");
    let writer = format!(
        "  models:\n    - {{name: openai, url: \"http://{llm_addr}\", apiKeyEnv: RINGFENCE_TEST_OPENAI_KEY}}"
    );
    let mesh = Mesh::start(
        &[
            ("orchestrator", "  mayStartRuns: true"),
            ("research", Box::leak(research.into_boxed_str())),
            ("writer", Box::leak(writer.into_boxed_str())),
        ],
        POLICY,
    )
    .await;

    // research searches, then "retries" by invoking the orchestrator; writer asks the model.
    let research_out = mesh.outbound("research");
    mesh.app("research").on(move |r| async move {
        let ctx = r.context().unwrap_or_default();
        let found = call(
            research_out,
            Method::POST,
            "/tools/web-search/mcp",
            &[("ringfence-context", &ctx)],
            &tool_call(),
        )
        .await;
        assert_eq!(found.status, StatusCode::OK, "{}", found.body);
        let back = call(
            research_out,
            Method::POST,
            "/agents/orchestrator/",
            &[("ringfence-context", &ctx)],
            &send_message(9, "retry"),
        )
        .await;
        assert_eq!(back.status, StatusCode::FORBIDDEN, "{}", back.body);
        json_response(
            StatusCode::OK,
            r#"{"jsonrpc":"2.0","id":1,"result":{"ok":true}}"#,
        )
    });
    let writer_out = mesh.outbound("writer");
    mesh.app("writer").on(move |r| async move {
        let ctx = r.context().unwrap_or_default();
        let answer = call(
            writer_out,
            Method::POST,
            "/models/openai/v1/chat/completions",
            &[("ringfence-context", &ctx)],
            &chat(),
        )
        .await;
        json_response(
            answer.status,
            r#"{"jsonrpc":"2.0","id":1,"result":{"ok":true}}"#,
        )
    });

    let out = mesh.outbound("orchestrator");
    let first = call(
        out,
        Method::POST,
        "/agents/research/",
        &[("ringfence-user", "user:ada")],
        &send_message(1, "find sources"),
    )
    .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let ctx = first.headers["ringfence-context"]
        .to_str()
        .unwrap()
        .to_owned();
    let second = call(
        out,
        Method::POST,
        "/agents/writer/",
        &[("ringfence-context", &ctx)],
        &send_message(2, "write"),
    )
    .await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.body);

    // Eight spans: the run's root, three client spans of orchestrator and research each side
    // of two hops, the tool call, the refusal and the model call.
    eventually(
        Duration::from_secs(10),
        "eight spans at the receiver",
        || async { (otlp.spans().len() >= 8).then_some(()) },
    )
    .await
    .unwrap();
    let spans = otlp.spans();
    assert_eq!(spans.len(), 8, "{spans:#?}");
    let trace = spans[0].trace_id();
    assert!(
        spans.iter().all(|s| s.trace_id() == trace),
        "one trace id for the run"
    );
    let run = spans[0].attr("ringfence.run.id").unwrap();
    assert!(
        spans
            .iter()
            .all(|s| s.attr("ringfence.run.id").as_deref() == Some(run.as_str()))
    );

    let root = one(&spans, "invoke_agent orchestrator", "orchestrator");
    assert_eq!(root.parent_id(), "", "the run's root has no parent");
    let to_research = one(&spans, "invoke_agent research", "orchestrator");
    let at_research = one(&spans, "invoke_agent research", "research");
    let tool = one(&spans, "execute_tool web_search", "research");
    let refused = one(&spans, "invoke_agent orchestrator", "research");
    let to_writer = one(&spans, "invoke_agent writer", "orchestrator");
    let at_writer = one(&spans, "invoke_agent writer", "writer");
    let chat = one(&spans, "chat gpt-4o-mini", "writer");
    for (child, parent) in [
        (to_research, root),
        (at_research, to_research),
        (tool, at_research),
        (refused, at_research),
        (to_writer, root),
        (at_writer, to_writer),
        (chat, at_writer),
    ] {
        assert_eq!(
            child.parent_id(),
            parent.span_id(),
            "{} under {}",
            child.name(),
            parent.name()
        );
    }
    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    assert_eq!(to_research.span.kind, SpanKind::Client as i32);
    assert_eq!(at_research.span.kind, SpanKind::Server as i32);

    for (span, key, value) in [
        (to_research, "gen_ai.operation.name", "invoke_agent"),
        (to_research, "gen_ai.agent.name", "research"),
        (to_research, "a2a.method.name", "SendMessage"),
        (to_research, "ringfence.caller", "orchestrator"),
        (to_research, "ringfence.depth", "1"),
        (to_research, "ringfence.decision", "allowed"),
        (at_research, "ringfence.caller", "orchestrator"),
        (tool, "gen_ai.operation.name", "execute_tool"),
        (tool, "gen_ai.tool.name", "web_search"),
        (tool, "mcp.method.name", "tools/call"),
        (tool, "ringfence.depth", "2"),
        (chat, "gen_ai.operation.name", "chat"),
        (chat, "gen_ai.request.model", "gpt-4o-mini"),
        (chat, "gen_ai.usage.input_tokens", &CHAT_IN.to_string()),
        (chat, "gen_ai.usage.output_tokens", &CHAT_OUT.to_string()),
        (chat, "ringfence.tainted", "false"),
        (refused, "ringfence.decision", "policy"),
        (refused, "ringfence.rule", "default/no-loops/deny[0]"),
        (refused, "ringfence.cycle", "true"),
    ] {
        assert_eq!(
            span.attr(key).as_deref(),
            Some(value),
            "{key} of {}",
            span.name()
        );
    }
    assert!(
        chat.attr("ringfence.cost_usd")
            .is_some_and(|c| c.parse::<f64>().unwrap() > 0.0)
    );
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode as Otel;
    let status = refused
        .span
        .status
        .as_ref()
        .expect("the refusal has a status");
    assert_eq!(status.code, Otel::Error as i32);
    assert!(
        status
            .message
            .contains("research may not invoke orchestrator"),
        "{}",
        status.message
    );
    assert_ne!(
        tool.span.status.as_ref().map(|s| s.code),
        Some(Otel::Error as i32)
    );

    // Each sidecar wrote one JSON decision line per call, naming the same run, trace and span.
    let decisions = |agent: &str| mesh.decisions(agent);
    let client = |agent: &str, callee: &str| {
        let found: Vec<serde_json::Value> = decisions(agent)
            .into_iter()
            .filter(|l| l["side"] == "client" && l["callee"] == callee)
            .collect();
        assert_eq!(
            found.len(),
            1,
            "one line for {agent} → {callee}: {found:#?}"
        );
        found.into_iter().next().unwrap()
    };
    mesh.decision("writer", "the model call", |l| l["kind"] == "model")
        .await;
    let to_research_line = client("orchestrator", "research");
    for (key, value) in [
        ("kind", "agent"),
        ("caller", "orchestrator"),
        ("method", "SendMessage"),
        ("decision", "allowed"),
        ("user", "user:ada"),
    ] {
        assert_eq!(to_research_line[key], value, "{key}: {to_research_line}");
    }
    assert_eq!(to_research_line["run"], run.as_str());
    assert_eq!(to_research_line["trace_id"], trace.as_str());
    assert_eq!(to_research_line["span_id"], to_research.span_id().as_str());
    assert_eq!(to_research_line["status"], 200);
    assert_eq!(to_research_line["depth"], 1);
    assert!(to_research_line["latency_us"].as_u64().unwrap() > 0);
    let refusal = client("research", "orchestrator");
    assert_eq!(refusal["decision"], "policy", "{refusal}");
    assert_eq!(refusal["rule"], "default/no-loops/deny[0]", "{refusal}");
    assert_eq!(refusal["status"], 403, "{refusal}");
    assert_eq!(refusal["cycle"], true, "{refusal}");
    assert_eq!(refusal["depth"], 2, "{refusal}");
    let tool_line = client("research", "tool:web-search");
    assert_eq!(tool_line["kind"], "tool", "{tool_line}");
    assert_eq!(tool_line["method"], "tools/call", "{tool_line}");
    assert_eq!(tool_line["tool"], "web_search", "{tool_line}");
    assert_eq!(tool_line["decision"], "allowed", "{tool_line}");
    let chat_line = client("writer", "model:openai");
    assert_eq!(chat_line["model"], "gpt-4o-mini", "{chat_line}");
    assert_eq!(chat_line["tokens_in"], CHAT_IN, "{chat_line}");
    assert_eq!(chat_line["tokens_out"], CHAT_OUT, "{chat_line}");
    assert!(
        chat_line["cost_usd_micros"].as_u64().unwrap() > 0,
        "{chat_line}"
    );
    assert_eq!(chat_line["tainted"], false, "{chat_line}");
    // The callee's sidecar logs the call it let in.
    let at_research_line = decisions("research")
        .into_iter()
        .find(|l| l["side"] == "server")
        .expect("research's sidecar logs the call it served");
    assert_eq!(at_research_line["caller"], "orchestrator");
    assert_eq!(at_research_line["decision"], "allowed");
    assert_eq!(at_research_line["span_id"], at_research.span_id().as_str());

    // The run ledger holds the same run as a tree; `ringfence runs show` draws it.
    let db = mesh.state_dir().join("budget.db");
    let store = Store::open(db.to_str().unwrap()).await.unwrap();
    let detail = eventually(
        Duration::from_secs(10),
        "the run's five calls in the ledger",
        || async {
            store
                .get_run(&run)
                .await
                .unwrap()
                .filter(|d| d.calls.len() == 5)
        },
    )
    .await
    .unwrap();
    let chat_call = detail
        .calls
        .iter()
        .find(|c| c.callee == "model:openai")
        .unwrap();
    assert_eq!(
        (chat_call.tokens_in, chat_call.tokens_out),
        (CHAT_IN, CHAT_OUT)
    );
    assert_eq!(
        chat_call.span_id,
        chat.span_id(),
        "the ledger and the trace name the same call"
    );
    let tree = render(&detail, ShowFormat::Tree);
    assert!(
        tree.contains("started by orchestrator for user:ada"),
        "{tree}"
    );
    assert!(
        tree.contains("│  └─ ✗ orchestrator  SendMessage  denied (policy) by default/no-loops/deny[0]  ↺ cycle"),
        "{tree}"
    );
    assert!(tree.contains("└─ model:openai  gpt-4o-mini"), "{tree}");

    let cli = Command::new(binary("ringfence"))
        .args(["runs", "--database"])
        .arg(&db)
        .args(["show", &run, "--format", "json"])
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(json["rootAgent"], "orchestrator");
    assert_eq!(json["tree"][0]["callee"], "research");
    assert_eq!(
        json["tree"][0]["children"][1]["rule"],
        "default/no-loops/deny[0]"
    );
}
