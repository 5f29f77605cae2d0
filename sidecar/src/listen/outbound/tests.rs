//! Routing of outbound calls, which answers are agent cards to rewrite, and which MCP requests
//! carry no message.

use ringfence_crds::agent::Trust;
use ringfence_crds::bundle::{AgentEntry, BundleContent, Limits, PolicySlice, ToolServerEntry};
use ringfence_crds::{AgentKey, SpiffeId, TrustDomain};

use super::*;

fn entry(name: &str, app: &str) -> AgentEntry {
    AgentEntry {
        name: name.into(),
        namespace: "default".into(),
        spiffe_id: SpiffeId::new(
            TrustDomain::default(),
            AgentKey::new("default", name).unwrap(),
        ),
        team: None,
        environment: None,
        trust: Trust::Trusted,
        may_start_runs: false,
        inbound: Some("127.0.0.1:15602".into()),
        app: Some(app.into()),
        fallback: None,
    }
}

fn content() -> BundleContent {
    BundleContent {
        trust_domain: "cluster.local".into(),
        agent: entry("orchestrator", "127.0.0.1:18101"),
        peers: vec![entry("research", "127.0.0.1:18102")],
        tool_servers: vec![ToolServerEntry {
            name: "search".into(),
            url: "http://127.0.0.1:18201/mcp".into(),
        }],
        tools: vec![],
        model_providers: vec![],
        policy: PolicySlice {
            schema: String::new(),
            policies: vec![],
            entities: serde_json::json!([]),
        },
        limits: Limits::default(),
    }
}

fn route_of(uri: &str) -> Result<Target, Denial> {
    route(&uri.parse().unwrap(), &content())
}

#[test]
fn agents_and_tools_are_addressed_by_path() {
    assert_eq!(
        route_of("/agents/research/a2a/v1?x=1").unwrap(),
        Target::Agent {
            name: "research".into(),
            rest: "/a2a/v1?x=1".into()
        }
    );
    assert_eq!(
        route_of("/agents/research").unwrap(),
        Target::Agent {
            name: "research".into(),
            rest: "/".into()
        }
    );
    assert_eq!(
        route_of("/agents/research?x=1").unwrap(),
        Target::Agent {
            name: "research".into(),
            rest: "/?x=1".into()
        }
    );
    assert_eq!(
        route_of("/tools/search").unwrap(),
        Target::Tool {
            server: "search".into(),
            rest: "/".into()
        }
    );
    assert!(route_of("/agents/").is_err());
    assert!(route_of("/elsewhere").is_err());
}

#[test]
fn forward_proxy_requests_map_hosts_to_agents_and_tool_servers() {
    assert_eq!(
        route_of("http://research/tasks").unwrap(),
        Target::Agent {
            name: "research".into(),
            rest: "/tasks".into()
        }
    );
    assert_eq!(
        route_of("http://research.default.svc.cluster.local:8080/").unwrap(),
        Target::Agent {
            name: "research".into(),
            rest: "/".into()
        }
    );
    // A card URL that still points at the agent's own address is caught too.
    assert_eq!(
        route_of("http://127.0.0.1:18102/a2a").unwrap(),
        Target::Agent {
            name: "research".into(),
            rest: "/a2a".into()
        }
    );
    assert_eq!(
        route_of("http://127.0.0.1:18201/mcp").unwrap(),
        Target::Tool {
            server: "search".into(),
            rest: "/mcp".into()
        }
    );
    let err = route_of("http://example.com/").unwrap_err();
    assert!(err.message.contains("example.com"), "{}", err.message);
}

#[test]
fn the_well_known_and_the_extended_card_are_rewritten_and_nothing_else() {
    use crate::protocol::a2a::A2aMethod;
    let operation = |body: &str, verb: &str, path: &str| {
        jsonrpc::parse_request(body.as_bytes())
            .ok()
            .and_then(|e| A2aMethod::from_jsonrpc(&e.method))
            .or_else(|| A2aMethod::from_http_parts(verb, path).map(|(m, _)| m))
    };
    // The extended card asked for over JSON-RPC (v1.0 and v0.3) and over HTTP+JSON.
    for (body, verb, path) in [
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"GetExtendedAgentCard","params":{}}"#,
            "POST",
            "/a2a",
        ),
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"agent/getAuthenticatedExtendedCard"}"#,
            "POST",
            "/",
        ),
        ("", "GET", "/a2a/extendedAgentCard"),
        ("", "GET", "/v1/card"),
    ] {
        assert!(
            answers_with_card(false, operation(body, verb, path)),
            "{verb} {path} {body}"
        );
    }
    assert!(answers_with_card(true, None), "the well-known card");
    for (body, verb, path) in [
        (
            r#"{"jsonrpc":"2.0","id":1,"method":"SendMessage","params":{}}"#,
            "POST",
            "/a2a",
        ),
        ("", "POST", "/a2a/message:send"),
        ("", "GET", "/a2a/tasks/t-1"),
    ] {
        assert!(
            !answers_with_card(false, operation(body, verb, path)),
            "{verb} {path} {body}"
        );
    }
}

#[test]
fn an_mcp_session_get_or_delete_carries_no_message_but_a_bodyless_post_is_still_read() {
    assert!(is_session_request(&http::Method::GET, b""));
    assert!(is_session_request(&http::Method::DELETE, b""));
    assert!(is_session_request(&http::Method::DELETE, b"\r\n"));
    // A POST always carries a message: an empty one is refused as malformed, never waved on.
    assert!(!is_session_request(&http::Method::POST, b""));
    // A GET with a body is read like any request (and its tools/call decided on).
    let call = br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"x"}}"#;
    assert!(!is_session_request(&http::Method::GET, call));
}
