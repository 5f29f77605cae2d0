//! An MCP server and client no one here wrote: the official MCP Python SDK (mcp), over
//! streamable HTTP through a real sidecar spawned by `ringfence local`. The tool list shows only
//! the tools policy lets the agent call; tool calls are allowed and refused per policy; a refusal
//! reaches the SDK's client as the JSON-RPC error it raises, naming the rule.
//!
//! The peers (e2e/python/mcp_tools.py, mcp_client.py) run from `e2e/.venv`, which
//! `bash hack/python-peers.sh` installs at pinned versions; without it this test fails.

use std::net::SocketAddr;

use ringfence_e2e::local::LocalMesh;
use ringfence_e2e::{free_port, peers};

const POLICIES: &str = r#"
apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: vault}
spec:
  allow:
    - from: [research]
      tools: [vault/*]
  cedar: |
    // Whatever is permitted, research never reads the secrets themselves.
    @id("research-reads-no-secrets")
    forbid (principal == Agent::"research", action == Action::"call_tool", resource == Tool::"vault/read_secret");
"#;

#[tokio::test]
async fn the_mcp_sdk_client_calls_allowed_tools_and_gets_the_refusal_of_denied_ones() {
    let vault = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let spec = format!(
        "  mayStartRuns: true\n  tools:\n    - {{name: vault, url: \"http://{vault}/mcp\"}}"
    );
    let mesh = LocalMesh::start(&[("research", &spec)], POLICIES, &[]).await;
    let _vault = peers::mcp_server("vault", vault).await;

    // The agent addresses the tool server by name on its sidecar; one SDK session for all. The
    // SDK speaks the 2026-07-28 revision by default, and the handshake-era protocol (initialize,
    // a session, its GET stream and DELETE) in legacy mode, as older clients do.
    let url = format!("http://{}/tools/vault", mesh.ports("research").outbound);
    for mode in ["auto", "legacy"] {
        let lines = peers::run(
            "mcp_client.py",
            &[
                "--url".into(),
                url.clone(),
                "--mode".into(),
                mode.into(),
                "list".into(),
                "call:list_secrets".into(),
                "call:read_secret".into(),
                "call:list_secrets".into(),
            ],
        )
        .await;
        let [list, allowed, denied, again] = &lines[..] else {
            panic!("four actions, four lines: {lines:?}");
        };

        assert_eq!(list["ok"], true, "{list}");
        let tools: Vec<&str> = list["tools"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t.as_str())
            .collect();
        // The vault serves both; research sees only the tool policy lets it call.
        assert_eq!(tools, ["list_secrets"]);

        assert_eq!(allowed["ok"], true, "{allowed}");
        assert_eq!(allowed["text"], "secrets matching ringfence: db-password");

        // The SDK raises the sidecar's JSON-RPC error: its code, message and the rule in its data.
        let err = &denied["error"];
        assert_eq!(denied["ok"], false, "{denied}");
        assert_eq!(err["type"], "MCPError", "{err}");
        assert_eq!(err["code"], -32050, "{err}");
        assert_eq!(err["reason"], "policy", "{err}");
        assert_eq!(
            err["rule"], "default/vault/research-reads-no-secrets",
            "{err}"
        );
        assert_eq!(err["edge"], "research → tool:vault/read_secret", "{err}");
        assert!(
            err["message"]
                .as_str()
                .is_some_and(|m| m.contains("research may not call vault/read_secret")),
            "{err}"
        );

        // The session goes on after a refusal.
        assert_eq!(again["ok"], true, "{again}");
    }

    // Counted per decision: the denied call never left the sidecar. Nothing the SDK sent was
    // refused as malformed (legacy mode's bodyless GET stream and session DELETE included).
    let metrics = mesh.metrics("research").await;
    assert!(!metrics.contains("decision=\"bad_request\""), "{metrics}");
    for line in [
        "ringfence_requests_total{decision=\"allowed\",direction=\"outbound\",kind=\"tool\",peer=\"vault\"}",
        "ringfence_requests_total{decision=\"policy\",direction=\"outbound\",kind=\"tool\",peer=\"vault\"} 2",
    ] {
        assert!(metrics.contains(line), "no {line} in\n{metrics}");
    }
}
