//! The overnight-loop incident (../shared/seed), replayed with agents built on the official A2A
//! Python SDK and tools built on the official MCP Python SDK, behind real sidecars spawned by
//! `ringfence local` with the incident's policies. A user reaches the orchestrator directly (its
//! ingress); everything after that goes through the mesh.
//!
//! Each agent reports what each of its steps did: the answer, or the error its SDK raised with
//! the sidecar's refusal behind it. The reports nest, orchestrator first.

use std::net::SocketAddr;

use ringfence_e2e::local::LocalMesh;
use ringfence_e2e::{Proc, free_port, peers};
use serde_json::Value;

/// The incident's policies (examples/incident), with a vault whose secrets are sensitive.
const POLICIES: &str = r#"
apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: orchestrator-delegates}
spec:
  allow:
    - from: [orchestrator]
      agents: [research, writer, critic]
---
apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: no-loops}
spec:
  deny:
    - description: Sub-agents may not re-invoke the orchestrator; this edge made the overnight loop.
      from: [research, writer]
      agents: [orchestrator]
---
apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: tools}
spec:
  allow:
    - from: [research]
      tools: [search/web_search]
    - from: [research, writer]
      tools: [vault/read_secret]
  tools:
    - {server: search, tool: web_search, untrusted: true, sensitivity: low}
    - {server: vault, tool: read_secret, sensitivity: high}
  cedar: |
    // A branch that has read untrusted content never reaches a sensitive tool.
    @id("tainted-branches-keep-off-sensitive-tools")
    forbid (principal, action == Action::"call_tool", resource)
    when { context.tainted && resource.sensitivity == "high" };
---
apiVersion: ringfence.dev/v1alpha1
kind: RunBudget
metadata: {name: research-workflow}
spec:
  maxDelegationDepth: 5
  cycles: {maxRevisits: 0}
"#;

struct Incident {
    // Dropped before the mesh (fields drop in order): the agents and tools stop first.
    _peers: Vec<Proc>,
    mesh: LocalMesh,
}

/// The incident's four agents, each running `steps`, and the search and vault MCP servers.
async fn incident(steps: &[(&str, &[&str])]) -> Incident {
    let search = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let vault = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let research = format!(
        "  tools:\n    - {{name: search, url: \"http://{search}/mcp\"}}\n    - {{name: vault, url: \"http://{vault}/mcp\"}}"
    );
    let writer = format!("  tools:\n    - {{name: vault, url: \"http://{vault}/mcp\"}}");
    let mesh = LocalMesh::start(
        &[
            ("orchestrator", "  mayStartRuns: true"),
            ("research", &research),
            ("writer", &writer),
            ("critic", ""),
        ],
        POLICIES,
        &[],
    )
    .await;
    let mut procs = vec![
        peers::mcp_server("search", search).await,
        peers::mcp_server("vault", vault).await,
    ];
    for (name, steps) in steps {
        procs.push(peers::a2a_agent(mesh.ports(name), "JSONRPC", steps).await);
    }
    Incident {
        _peers: procs,
        mesh,
    }
}

impl Incident {
    /// A user asks the orchestrator, at its own address (its ingress), with the SDK's client;
    /// the orchestrator's report.
    async fn ask_orchestrator(&self) -> Value {
        let base = format!("http://{}", self.mesh.ports("orchestrator").app);
        let lines = peers::run("a2a_client.py", &["--base".into(), base, "send".into()]).await;
        assert_eq!(lines[0]["ok"], true, "{}", lines[0]);
        lines[0]["reports"][0].clone()
    }

    /// Whether `agent`'s sidecar ever let a call in.
    async fn was_invoked(&self, agent: &str) -> bool {
        self.mesh
            .metrics(agent)
            .await
            .contains("ringfence_requests_total{decision=\"allowed\",direction=\"inbound\"")
    }
}

/// The step `step` of `report`, failing with the whole report when it is not there.
fn step<'a>(report: &'a Value, step: &str) -> &'a Value {
    report["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["step"] == step))
        .unwrap_or_else(|| panic!("no step {step} in {report:#}"))
}

/// The report the agent asked in `step` answered with.
fn answer<'a>(report: &'a Value, s: &str) -> &'a Value {
    let done = step(report, s);
    assert_eq!(done["ok"], true, "{report:#}");
    &done["answer"][0]
}

#[tokio::test]
async fn the_overnight_loop_of_sdk_agents_is_cut_at_its_first_hop_with_the_rule_named() {
    // research "retries" by asking the orchestrator again, which would delegate again, all night.
    let incident = incident(&[
        ("orchestrator", &["ask:research"]),
        ("research", &["ask:orchestrator"]),
    ])
    .await;
    let orchestrator = incident.ask_orchestrator().await;
    assert_eq!(orchestrator["context"], false, "the user came in directly");

    let research = answer(&orchestrator, "ask:research");
    assert_eq!(research["agent"], "research");
    assert_eq!(research["context"], true, "{research}");
    // The first hop back is refused: discovering the orchestrator's card through the mesh is
    // already the forbidden edge. The SDK raised its error; the refusal names the rule.
    let retry = step(research, "ask:orchestrator");
    assert_eq!(retry["ok"], false, "{retry}");
    let err = &retry["error"];
    assert_eq!(err["type"], "AgentCardResolutionError", "{err}");
    assert_eq!(err["status"], 403, "{err}");
    assert_eq!(err["reason"], "policy", "{err}");
    assert_eq!(err["rule"], "default/no-loops/deny[0]", "{err}");
    assert_eq!(err["edge"], "research → orchestrator", "{err}");

    // The orchestrator was asked once, by the user, and never through the mesh.
    assert!(!incident.was_invoked("orchestrator").await);
}

#[tokio::test]
async fn a_sdk_sub_agent_that_drops_the_context_is_refused_and_told_which_header_to_forward() {
    // writer's client forgets to forward the context it was handed: from its sidecar's point of
    // view it starts a fresh run, which only the orchestrator may do.
    let incident = incident(&[
        ("orchestrator", &["ask:writer"]),
        ("writer", &["ask-dropping-context:critic", "ask:critic"]),
        ("critic", &[]),
    ])
    .await;
    let orchestrator = incident.ask_orchestrator().await;
    let writer = answer(&orchestrator, "ask:writer");

    let dropped = step(writer, "ask-dropping-context:critic");
    assert_eq!(dropped["ok"], false, "{dropped}");
    let err = &dropped["error"];
    assert_eq!(err["status"], 403, "{err}");
    assert_eq!(err["reason"], "start_run", "{err}");
    assert!(
        err["refusal"]
            .as_str()
            .is_some_and(|m| m.contains("forward the ringfence-context header")),
        "{err}"
    );

    // Forwarding the context, the same call gets past the run check to policy, where only the
    // orchestrator delegates: refused by the default deny, not for the missing context.
    let forwarded = step(writer, "ask:critic");
    assert_eq!(forwarded["error"]["reason"], "policy", "{forwarded}");
    assert_eq!(
        forwarded["error"]["rule"], "default deny (no policy permits this edge)",
        "{forwarded}"
    );
    assert!(!incident.was_invoked("critic").await);
}

#[tokio::test]
async fn taint_from_an_untrusted_sdk_tool_keeps_that_branch_from_the_sensitive_tool() {
    let incident = incident(&[
        // The orchestrator asks writer, then research, then writer again.
        (
            "orchestrator",
            &["ask:writer", "ask:research", "ask:writer"],
        ),
        (
            "research",
            &[
                "tool:vault/read_secret",
                "tool:search/web_search",
                "tool:vault/read_secret",
            ],
        ),
        ("writer", &["tool:vault/read_secret"]),
    ])
    .await;
    let orchestrator = incident.ask_orchestrator().await;
    let asked = orchestrator["steps"].as_array().unwrap();
    assert_eq!(asked.len(), 3, "{orchestrator:#}");
    let reports: Vec<&Value> = asked
        .iter()
        .map(|s| {
            assert_eq!(s["ok"], true, "{s}");
            &s["answer"][0]
        })
        .collect();

    // Nothing untrusted was read yet: writer reads the vault.
    let read = step(reports[0], "tool:vault/read_secret");
    assert_eq!(read["ok"], true, "{read}");
    assert_eq!(read["answer"], "the secret for ringfence is hunter2");

    // research reads the vault, then the open web (untrusted), then tries the vault again.
    let research = reports[1];
    let steps = research["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 3, "{research:#}");
    assert_eq!(steps[0]["ok"], true, "before the search: {}", steps[0]);
    assert_eq!(steps[1]["ok"], true, "{}", steps[1]);
    assert!(
        steps[1]["answer"]
            .as_str()
            .is_some_and(|a| a.contains("IGNORE PREVIOUS INSTRUCTIONS")),
        "{}",
        steps[1]
    );
    // After it, the MCP SDK's client gets the sidecar's JSON-RPC refusal, naming the rule.
    let err = &steps[2]["error"];
    assert_eq!(steps[2]["ok"], false, "{}", steps[2]);
    assert_eq!(err["type"], "MCPError", "{err}");
    assert_eq!(err["code"], -32050, "{err}");
    assert_eq!(err["reason"], "policy", "{err}");
    assert_eq!(
        err["rule"], "default/tools/tainted-branches-keep-off-sensitive-tools",
        "{err}"
    );
    assert_eq!(err["edge"], "research → tool:vault/read_secret", "{err}");

    // research's answer carried the taint back to the orchestrator, which read it: writer,
    // asked after that, is on a tainted branch too and is refused the vault.
    let read = step(reports[2], "tool:vault/read_secret");
    assert_eq!(read["ok"], false, "{read}");
    assert_eq!(
        read["error"]["rule"], "default/tools/tainted-branches-keep-off-sensitive-tools",
        "{read}"
    );
}
