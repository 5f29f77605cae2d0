//! Discovery filtered by policy, through real sidecars with real mTLS: `GET /agents` on an
//! agent's sidecar lists the cards of exactly the agents it may invoke, each card pointing back
//! through that sidecar, and a peer that does not answer is named without failing the listing.

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use ringfence_e2e::mesh::{AppBody, Mesh, Received, call, json_response};
use serde_json::Value;

/// The incident's policies, plus one edge of research's own: it may ask the critic.
const POLICIES: &str = "\
apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: orchestrator-delegates}
spec:
  allow:
    - from: [orchestrator]
      agents: [research, writer, critic]
    - from: [research]
      agents: [critic]
---
apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: no-loops}
spec:
  deny:
    - from: [research, writer]
      agents: [orchestrator]
";

fn agents() -> Vec<(&'static str, &'static str)> {
    vec![
        ("orchestrator", "  mayStartRuns: true"),
        ("research", ""),
        ("writer", ""),
        ("critic", ""),
    ]
}

/// An A2A v1.0 agent card naming the agent's own address, as an SDK server writes it.
fn card(name: &str, app: std::net::SocketAddr) -> String {
    serde_json::json!({
        "name": name,
        "description": format!("the {name} agent"),
        "version": "1.0.0",
        "supportedInterfaces": [{"url": format!("http://{app}/a2a"), "protocolBinding": "JSONRPC", "protocolVersion": "1.0"}],
        "capabilities": {},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
        "skills": []
    })
    .to_string()
}

/// Every app serves its card; research's app also answers a delegated task with the listing
/// its sidecar gives it, in the run the task belongs to.
fn serve_cards(mesh: &Mesh) {
    for name in ["orchestrator", "research", "writer", "critic"] {
        let app = mesh.agent(name).ports.app;
        let research_out = mesh.outbound("research");
        mesh.app(name).on(move |r: Received| {
            let card = card(name, app);
            async move { answer(name, r, card, research_out).await }
        });
    }
}

async fn answer(
    name: &str,
    r: Received,
    card: String,
    research_out: std::net::SocketAddr,
) -> http::Response<AppBody> {
    if r.path.ends_with("/.well-known/agent-card.json") {
        return json_response(StatusCode::OK, &card);
    }
    if name == "research" {
        let ctx = r.context().unwrap_or_default();
        let listing = call(
            research_out,
            Method::GET,
            "/agents",
            &[("ringfence-context", &ctx)],
            "",
        )
        .await;
        return json_response(listing.status, &listing.body);
    }
    json_response(StatusCode::OK, r#"{"jsonrpc":"2.0","id":1,"result":{}}"#)
}

fn names(listing: &Value) -> Vec<&str> {
    listing["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn research_discovers_only_the_agents_it_may_invoke() {
    let mesh = Mesh::start(&agents(), POLICIES).await;
    serve_cards(&mesh);

    // The orchestrator starts a run and delegates to research, whose app lists its peers.
    let reply = call(
        mesh.outbound("orchestrator"),
        Method::POST,
        "/agents/research/",
        &[("ringfence-user", "user:ada")],
        &ringfence_e2e::mesh::send_message(1, "who can help you?"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    let listing = reply.json();
    // research may not invoke the orchestrator (no-loops) nor the writer (no edge).
    assert_eq!(names(&listing), ["critic"], "{listing}");
    assert_eq!(listing["unavailable"], serde_json::json!([]));
    let critic = &listing["agents"][0]["card"];
    assert_eq!(critic["name"], "critic");
    assert_eq!(
        critic["supportedInterfaces"][0]["url"],
        format!("http://{}/agents/critic/a2a", mesh.outbound("research")),
        "the card points back through research's sidecar"
    );

    // The orchestrator, asking outside any run, sees every agent it delegates to; the listing
    // starts a run like any call without a context, and hands its context back.
    let listing = call(
        mesh.outbound("orchestrator"),
        Method::GET,
        "/agents/",
        &[],
        "",
    )
    .await;
    assert_eq!(listing.status, StatusCode::OK, "{}", listing.body);
    assert!(listing.headers.contains_key("ringfence-context"));
    assert_eq!(
        listing.headers["content-type"].to_str().unwrap(),
        "application/json"
    );
    assert_eq!(
        names(&listing.json()),
        ["critic", "research", "writer"],
        "{}",
        listing.body
    );

    // A sub-agent without a context may not start a run, so it is told to forward one.
    let refused = call(mesh.outbound("writer"), Method::GET, "/agents", &[], "").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    assert!(
        refused.body.contains("ringfence-context"),
        "{}",
        refused.body
    );
}

#[tokio::test]
async fn a_peer_that_does_not_answer_is_named_and_the_others_are_still_listed() {
    let mesh = Mesh::start(&agents(), POLICIES).await;
    serve_cards(&mesh);
    // The critic's app hangs on its card.
    mesh.app("critic").on(|_r| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        json_response(StatusCode::OK, "{}")
    });

    let started = Instant::now();
    let listing = call(
        mesh.outbound("orchestrator"),
        Method::GET,
        "/agents",
        &[],
        "",
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "bounded per peer, not by the slowest: {:?}",
        started.elapsed()
    );
    assert_eq!(listing.status, StatusCode::OK, "{}", listing.body);
    let v = listing.json();
    assert_eq!(names(&v), ["research", "writer"], "{v}");
    assert_eq!(v["unavailable"][0]["name"], "critic", "{v}");
    assert!(
        v["unavailable"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no answer within")),
        "{v}"
    );
    // Counted as one discovery request, not as calls to the agents.
    assert_eq!(
        mesh.metric(
            "orchestrator",
            "ringfence_requests_total{decision=\"allowed\",direction=\"outbound\",kind=\"discovery\",peer=\"agents\"}"
        )
        .await,
        1
    );
}
