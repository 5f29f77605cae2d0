//! Agents and clients no one here wrote: the official A2A Python SDK (a2a-sdk), unmodified,
//! behind real sidecars spawned by `ringfence local`. The SDK's client discovers an agent
//! through the mesh, sends and streams over JSON-RPC and HTTP+JSON, in A2A 1.0 and 0.3, and
//! reports a denied edge as an error. (SDK agents replaying the incident: incident_sdk.rs.)
//!
//! The peers (e2e/python/a2a_agent.py, a2a_client.py) run from `e2e/.venv`, which
//! `bash hack/python-peers.sh` installs at pinned versions; without it these tests fail.

use ringfence_e2e::Proc;
use ringfence_e2e::local::LocalMesh;
use ringfence_e2e::peers;
use serde_json::Value;

/// Starts the SDK agent `name` (see e2e/python/a2a_agent.py).
async fn sdk_agent(mesh: &LocalMesh, name: &str, binding: &str, steps: &[&str]) -> Proc {
    peers::a2a_agent(mesh.ports(name), binding, steps).await
}

/// Runs the SDK client app with `args`; its JSON lines by action.
async fn sdk_client(args: &[&str]) -> Vec<Value> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    peers::run("a2a_client.py", &args).await
}

/// The report an agent answered with (the last one a client or a step saw).
fn report(v: &Value) -> &Value {
    let reports = v["reports"].as_array().or_else(|| v["answer"].as_array());
    reports
        .and_then(|r| r.last())
        .unwrap_or_else(|| panic!("no report in {v}"))
}

const DELEGATES: &str = "\
apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: client-delegates}
spec:
  allow:
    - from: [client]
      agents: [research, writer, legacy]
---
apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: keep-off-critic}
spec:
  deny:
    - description: The client app never calls the critic directly.
      from: [client]
      agents: [critic]
";

fn client_and_specialists() -> Vec<(&'static str, &'static str)> {
    vec![
        ("client", "  mayStartRuns: true"),
        ("research", ""),
        ("writer", ""),
        ("critic", ""),
        ("editor", ""),
        ("legacy", ""),
    ]
}

#[tokio::test]
async fn the_sdk_client_discovers_sends_and_streams_through_the_mesh_in_every_binding_and_version()
{
    let mesh = LocalMesh::start(&client_and_specialists(), DELEGATES, &[]).await;
    let _research = sdk_agent(&mesh, "research", "JSONRPC", &[]).await;
    let _writer = sdk_agent(&mesh, "writer", "HTTP+JSON", &[]).await;
    // An agent offering A2A 0.3: the SDK's client speaks 0.3 to it (message/send, message/stream).
    let _legacy = peers::a2a_agent_speaking(mesh.ports("legacy"), "JSONRPC", "0.3", &[]).await;
    let outbound = mesh.ports("client").outbound;

    for (agent, binding, version) in [
        ("research", "JSONRPC", "1.0"),
        ("writer", "HTTP+JSON", "1.0"),
        ("legacy", "JSONRPC", "0.3"),
    ] {
        let base = mesh.agent_url("client", agent);
        let lines = sdk_client(&[
            "--base",
            &base,
            "--binding",
            binding,
            "card",
            "extended-card",
            "send",
            "get-task",
            "stream",
        ])
        .await;
        let [card, extended, send, get_task, stream] = &lines[..] else {
            panic!("five actions, five lines: {lines:?}");
        };

        // The card the SDK's resolver got names the agent's own address; the sidecar rewrote it
        // to route back through the mesh, so the SDK's client never goes around it. The
        // version decides which protocol the SDK's client speaks. The extended card, asked
        // for through the protocol itself, is rewritten the same way.
        let through_the_mesh = serde_json::json!([{
            "url": format!("http://{outbound}/agents/{agent}/a2a"),
            "binding": binding,
            "version": version,
        }]);
        assert_eq!(card["ok"], true, "{card}");
        assert_eq!(card["name"], agent);
        assert_eq!(card["interfaces"], through_the_mesh, "{card}");
        assert_eq!(extended["ok"], true, "{extended}");
        assert_eq!(extended["name"], format!("{agent} (extended)"));
        assert_eq!(extended["interfaces"], through_the_mesh, "{extended}");

        // Sent plainly: one task, holding the agent's report. The agent was handed a context
        // by its sidecar: the call came through the mesh.
        assert_eq!(send["ok"], true, "{send}");
        assert_eq!(send["events"], serde_json::json!(["task"]), "{send}");
        let r = report(send);
        assert_eq!(r["agent"], agent);
        assert_eq!(r["got"], "find sources on agent loops");
        assert_eq!(r["context"], true, "{r}");

        // The task it created is read back through the mesh.
        assert_eq!(get_task["ok"], true, "{get_task}");
        assert_eq!(get_task["state"], "TASK_STATE_COMPLETED", "{get_task}");

        // Streamed: the SDK's events arrive one by one through both sidecars.
        assert_eq!(stream["ok"], true, "{stream}");
        assert_eq!(
            stream["events"],
            serde_json::json!(["task", "status_update", "artifact_update", "status_update"]),
            "{stream}"
        );
        assert_eq!(report(stream)["agent"], agent);
    }
}

#[tokio::test]
async fn the_sdk_client_discovers_only_the_agents_it_may_call_and_calls_one_from_the_listing() {
    let mesh = LocalMesh::start(&client_and_specialists(), DELEGATES, &[]).await;
    let _research = sdk_agent(&mesh, "research", "JSONRPC", &[]).await;
    let _writer = sdk_agent(&mesh, "writer", "HTTP+JSON", &[]).await;
    // legacy may be called but its app is not running; critic is denied; editor has no edge.
    let outbound = mesh.ports("client").outbound;
    let lines = sdk_client(&[
        "--base",
        &format!("http://{outbound}/agents"),
        "--pick",
        "research",
        "discover",
        "send",
    ])
    .await;
    let [discover, send] = &lines[..] else {
        panic!("two actions, two lines: {lines:?}");
    };
    assert_eq!(discover["ok"], true, "{discover}");
    assert_eq!(
        discover["agents"],
        serde_json::json!(["research", "writer"]),
        "{discover}"
    );
    assert_eq!(
        discover["unavailable"],
        serde_json::json!(["legacy"]),
        "{discover}"
    );
    // The SDK parses the listed card, and the client it builds from it calls through the mesh.
    assert_eq!(
        discover["picked"]["interfaces"][0]["url"],
        format!("http://{outbound}/agents/research/a2a"),
        "{discover}"
    );
    assert_eq!(send["ok"], true, "{send}");
    let r = report(send);
    assert_eq!(r["agent"], "research");
    assert_eq!(r["context"], true, "{r}");
}

#[tokio::test]
async fn a_denied_edge_is_an_error_the_sdk_client_reports_naming_the_rule() {
    let mesh = LocalMesh::start(&client_and_specialists(), DELEGATES, &[]).await;
    // critic is denied by a rule; editor by the default (no policy permits the edge).
    let _critic = sdk_agent(&mesh, "critic", "JSONRPC", &[]).await;
    let _editor = sdk_agent(&mesh, "editor", "HTTP+JSON", &[]).await;

    for (agent, binding, rule) in [
        ("critic", "JSONRPC", "default/keep-off-critic/deny[0]"),
        (
            "editor",
            "HTTP+JSON",
            "default deny (no policy permits this edge)",
        ),
    ] {
        let base = mesh.agent_url("client", agent);
        // Discovery is refused first: the card is behind the same edge.
        let lines = sdk_client(&["--base", &base, "--binding", binding, "card"]).await;
        let err = &lines[0]["error"];
        assert_eq!(lines[0]["ok"], false, "{}", lines[0]);
        assert_eq!(err["type"], "AgentCardResolutionError", "{err}");
        assert_eq!(err["status"], 403, "{err}");
        assert_eq!(err["rule"], rule, "{err}");

        // With the interface URL known out of band, the SDK's own client is refused too, sending
        // and streaming: an error it raises, with the sidecar's refusal behind it.
        let url = format!("{base}/a2a");
        let lines = sdk_client(&[
            "--base",
            &base,
            "--url",
            &url,
            "--binding",
            binding,
            "send",
            "stream",
        ])
        .await;
        assert_eq!(lines.len(), 2, "{lines:?}");
        for l in &lines {
            let err = &l["error"];
            assert_eq!(l["ok"], false, "{l}");
            assert_eq!(err["type"], "A2AClientError", "{err}");
            assert!(
                err["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("HTTP Error 403")),
                "{err}"
            );
            assert_eq!(err["reason"], "policy", "{err}");
            assert_eq!(err["rule"], rule, "{err}");
            assert_eq!(err["edge"], format!("client → {agent}"), "{err}");
        }
        // The refused agent's sidecar never passed it a call.
        assert!(
            !mesh
                .metrics(agent)
                .await
                .contains("ringfence_requests_total{decision=\"allowed\",direction=\"inbound\""),
            "{agent} was reached"
        );
    }
}
