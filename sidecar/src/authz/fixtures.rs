//! A realistic policy slice for benchmarks: one sidecar's cut of a namespace of many agents
//! and edges, written exactly as the operator's compiler writes it
//! (`operator/src/compile/{policies,entities}.rs`): one Cedar policy per (caller, target) pair
//! with `@rule` naming the AgentPolicy rule, agents and listed tools as entities, and the
//! article's free-form Cedar beside the edges.

use ringfence_crds::bundle::{PolicyEntry, PolicySlice, ToolAttrs};
use ringfence_crds::policy::Sensitivity;
use serde_json::{Value, json};

/// The shape of the namespace a slice is cut from.
#[derive(Debug, Clone, Copy)]
pub struct Mesh {
    pub agents: usize,
    /// Agent → agent edges (A2A `invoke`).
    pub agent_edges: usize,
    /// Agent → tool edges.
    pub tool_edges: usize,
    /// Agent → model-provider edges (`<provider>/*`).
    pub model_edges: usize,
    /// Tool servers, each with `tools_per_server` listed tools.
    pub servers: usize,
    pub tools_per_server: usize,
    /// Add the article's free-form Cedar (taint guard, research-only tool, depth guard).
    pub free_form: bool,
    pub seed: u64,
}

impl Mesh {
    /// 1,000 agents and 10,000 edges (8,000 A2A, 1,500 tool, 500 model), 20 tool servers of
    /// 10 tools, with free-form Cedar.
    pub const THOUSAND: Mesh = Mesh {
        agents: 1_000,
        agent_edges: 8_000,
        tool_edges: 1_500,
        model_edges: 500,
        servers: 20,
        tools_per_server: 10,
        free_form: true,
        seed: 7,
    };
}

/// A deterministic generator (SplitMix64): fixtures must not change between runs.
struct SplitMix(u64);

impl SplitMix {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z % n.max(1) as u64) as usize
    }
}

/// The name of agent `i`.
pub fn agent_name(i: usize) -> String {
    format!("agent-{i:04}")
}

const NS: &str = "bench";

#[allow(clippy::too_many_arguments)] // one argument per part of the compiler's text
fn edge_policy(
    policy: usize,
    field: &str,
    rule: usize,
    effect: &str,
    caller: &str,
    action: &str,
    scope: &str,
    target: &str,
) -> PolicyEntry {
    let rule_name = format!("{NS}/edges-{policy:03}/{field}[{rule}]");
    PolicyEntry {
        id: format!("{rule_name}:{caller}->{target}"),
        text: format!(
            "@rule(\"{rule_name}\") {effect} (principal == Agent::\"{caller}\", action == Action::\"{action}\", {scope});"
        ),
        rule: rule_name,
    }
}

/// The slice the compiler would send to agent `of`, and the namespace's tool attributes.
pub fn mesh_slice(mesh: &Mesh, of: usize) -> (PolicySlice, Vec<ToolAttrs>) {
    let mut rng = SplitMix(mesh.seed);
    let me = agent_name(of);
    let mut policies = Vec::new();
    // Edges of the whole namespace are drawn in the same order for every `of`, so that all
    // sidecars' slices are cut from one namespace; only those touching `of` are kept.
    let mut push = |e: PolicyEntry, caller: &str, callee: Option<&str>| {
        if caller == me || callee == Some(me.as_str()) {
            policies.push(e);
        }
    };
    for i in 0..mesh.agent_edges {
        let from = agent_name(rng.below(mesh.agents));
        let to = agent_name(rng.below(mesh.agents));
        // One AgentPolicy per 100 edges; one in twenty edges is a deny.
        let (field, effect) = if i % 20 == 19 {
            ("deny", "forbid")
        } else {
            ("allow", "permit")
        };
        let e = edge_policy(
            i / 100,
            field,
            i % 100,
            effect,
            &from,
            "invoke",
            &format!("resource == Agent::\"{to}\""),
            &to,
        );
        push(e, &from, Some(&to));
    }
    for i in 0..mesh.tool_edges {
        let from = agent_name(rng.below(mesh.agents));
        let tool = format!(
            "srv-{:02}/tool-{:02}",
            rng.below(mesh.servers),
            rng.below(mesh.tools_per_server)
        );
        let e = edge_policy(
            1000 + i / 100,
            "allow",
            i % 100,
            "permit",
            &from,
            "call_tool",
            &format!("resource == Tool::\"{tool}\""),
            &tool,
        );
        push(e, &from, None);
    }
    for i in 0..mesh.model_edges {
        let from = agent_name(rng.below(mesh.agents));
        let provider = ["openai", "anthropic", "mistral"][rng.below(3)];
        let e = edge_policy(
            2000 + i / 100,
            "allow",
            i % 100,
            "permit",
            &from,
            "call_model",
            &format!("resource is Model when {{ resource.provider == \"{provider}\" }}"),
            &format!("{provider}/*"),
        );
        push(e, &from, None);
    }
    if mesh.free_form {
        for (id, text) in [
            (
                "web-search-is-research-only",
                r#"forbid (principal, action == Action::"call_tool", resource == Tool::"srv-00/tool-00") unless { principal == Agent::"agent-0000" };"#,
            ),
            (
                "tainted-branches-keep-off-sensitive-tools",
                r#"forbid (principal, action == Action::"call_tool", resource) when { context.tainted && resource.sensitivity == "high" };"#,
            ),
            (
                "no-deep-delegation",
                r#"forbid (principal, action == Action::"invoke", resource) when { context.depth > 8 };"#,
            ),
        ] {
            let rule = format!("{NS}/guards/{id}");
            policies.push(PolicyEntry {
                id: rule.clone(),
                rule,
                text: text.to_owned(),
            });
        }
    }
    policies.sort_by(|a, b| a.id.cmp(&b.id));
    policies.dedup_by(|a, b| a.id == b.id);

    let mut tools = Vec::new();
    for s in 0..mesh.servers {
        for t in 0..mesh.tools_per_server {
            tools.push(ToolAttrs {
                server: format!("srv-{s:02}"),
                tool: Some(format!("tool-{t:02}")),
                untrusted: t % 3 == 0,
                sensitivity: if t % 4 == 0 {
                    Sensitivity::High
                } else {
                    Sensitivity::Low
                },
            });
        }
    }
    let mut entities: Vec<Value> = (0..mesh.agents)
        .map(|i| {
            json!({
                "uid": { "type": "Agent", "id": agent_name(i) },
                "attrs": {
                    "namespace": NS,
                    "team": format!("team-{}", i % 25),
                    "environment": "prod",
                    "trust": "Trusted",
                },
                "parents": [],
            })
        })
        .collect();
    for t in &tools {
        let Some(tool) = &t.tool else { continue };
        entities.push(json!({
            "uid": { "type": "Tool", "id": format!("{}/{}", t.server, tool) },
            "attrs": {
                "server": t.server,
                "name": tool,
                "untrusted": t.untrusted,
                "sensitivity": t.sensitivity.as_str(),
            },
            "parents": [],
        }));
    }
    let slice = PolicySlice {
        schema: crate::testing::SCHEMA.to_owned(),
        policies,
        entities: Value::Array(entities),
    };
    (slice, tools)
}
