//! The demo's acts: for each, the manifests in force, what the agents do, and which control
//! must stop the run. Pure: the manifests are text built from where things listen.

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// The incident's policies and run limits, exactly as shipped in `examples/incident/`.
const INCIDENT_POLICIES: &str = include_str!("../../../examples/incident/policies.yaml");
const INCIDENT_BUDGET: &str = include_str!("../../../examples/incident/budget.yaml");

/// The demo's agents, in the order they are started.
pub const AGENTS: [&str; 4] = ["orchestrator", "research", "writer", "critic"];

/// What each agent is for, as its manifest describes it.
fn description(agent: &str) -> &'static str {
    match agent {
        "orchestrator" => "Plans the research workflow and delegates subtasks to the specialists.",
        "research" => "Searches the web and summarises sources.",
        "writer" => "Drafts the report from the research notes.",
        _ => "Reviews the draft and asks for fixes.",
    }
}

/// Where one agent and its sidecar listen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentAddrs {
    /// The in-process demo agent.
    pub app: SocketAddr,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
}

/// Where everything of the demo listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub agents: BTreeMap<String, AgentAddrs>,
    /// The mock LLM (OpenAI chat completions).
    pub llm: SocketAddr,
    /// The MCP server with `web_search` and `read_secret`.
    pub mcp: SocketAddr,
    /// The demo's own alert webhook receiver.
    pub alerts: SocketAddr,
}

impl Endpoints {
    /// The alert webhook URL RunBudgets point at.
    pub fn alert_url(&self) -> String {
        format!("http://{}/alerts", self.alerts)
    }
}

/// What the demo agents do during an act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// The overnight loop: the orchestrator plans (a model call) and delegates to research;
    /// research searches, hits a "transient error" and retries by re-invoking the orchestrator.
    Loop,
    /// The orchestrator asks research five questions in quick succession.
    FanOut,
    /// The orchestrator asks the critic for a review; the critic never answers.
    Stall,
    /// The writer reads the vault (allowed); research reads a web page carrying injected
    /// instructions, then tries the vault too.
    Taint,
}

/// What must stop the act's run: the HTTP status and the rule the refusal names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    pub status: u16,
    /// Rules that count: the refusal's `rule` must be one of them.
    pub rules: &'static [&'static str],
    /// The run budget's alert webhook must receive an alert.
    pub alert: bool,
}

/// One act of the demo.
#[derive(Debug, Clone, Copy)]
pub struct Act {
    /// Short, for file names and the summary: `budget`, `policy`, `depth`, ...
    pub id: &'static str,
    pub title: &'static str,
    /// What the act shows, in a sentence or two.
    pub story: &'static str,
    /// What Tomás asks the orchestrator.
    pub task: &'static str,
    pub behaviour: Behaviour,
    pub expect: Expect,
    policies: fn(&Endpoints) -> String,
}

impl Act {
    /// Every manifest in force during the act: the agents, then its policies and budgets.
    pub fn manifests(&self, e: &Endpoints) -> String {
        format!("{}---\n{}", agents_yaml(e), (self.policies)(e))
    }
}

/// The acts, in the order they run.
pub fn acts() -> Vec<Act> {
    vec![
        Act {
            id: "budget",
            title: "Act 1 · the overnight loop, with permissive policy",
            story: "research may call the orchestrator back, so its retry loops forever; only the run's budget (maxTotalTokens 16000, onBreach HaltAndAlert) can stop it",
            task: "Research the state of agent-to-agent protocols and write a report.",
            behaviour: Behaviour::Loop,
            expect: Expect {
                status: 402,
                rules: &["maxTotalTokens", "maxCostUsd", "onBreach"],
                alert: true,
            },
            policies: permissive_with_budget,
        },
        Act {
            id: "policy",
            title: "Act 2 · the same loop under the incident policies",
            story: "examples/incident: sub-agents may not re-invoke the orchestrator (AgentPolicy no-loops), so the loop is cut at its first hop",
            task: "Research the state of agent-to-agent protocols and write a report.",
            behaviour: Behaviour::Loop,
            expect: Expect {
                status: 403,
                rules: &["default/no-loops/deny[0]"],
                alert: false,
            },
            policies: incident,
        },
        Act {
            id: "depth",
            title: "Control · delegation depth",
            story: "the loop is allowed and cycles are tolerated, but maxDelegationDepth 3 caps how deep the chain may go",
            task: "Research the state of agent-to-agent protocols and write a report.",
            behaviour: Behaviour::Loop,
            expect: Expect {
                status: 508,
                rules: &["maxDelegationDepth"],
                alert: false,
            },
            policies: |e| {
                permissive_with_limits(e, "  maxDelegationDepth: 3\n  cycles: {maxRevisits: 100}\n")
            },
        },
        Act {
            id: "cycle",
            title: "Control · cycle check",
            story: "the loop is allowed, but cycles.maxRevisits 0 refuses any call back into an agent already on the run's path",
            task: "Research the state of agent-to-agent protocols and write a report.",
            behaviour: Behaviour::Loop,
            expect: Expect {
                status: 508,
                rules: &["cycles"],
                alert: false,
            },
            policies: |e| {
                permissive_with_limits(e, "  maxDelegationDepth: 10\n  cycles: {maxRevisits: 0}\n")
            },
        },
        Act {
            id: "rate",
            title: "Control · invoke rate limit",
            story: "the orchestrator fans five questions out to research; perAgent.invokeRateLimit 3/min lets three through",
            task: "Answer five questions about agent protocols.",
            behaviour: Behaviour::FanOut,
            expect: Expect {
                status: 429,
                rules: &["invokeRateLimit"],
                alert: false,
            },
            policies: |e| permissive_with_limits(e, "  perAgent: {invokeRateLimit: 3/min}\n"),
        },
        Act {
            id: "stall",
            title: "Control · stall timeout",
            story: "the critic hangs; perAgent.timeoutSeconds 1 answers the orchestrator with a 504 instead of waiting forever",
            task: "Get the draft reviewed.",
            behaviour: Behaviour::Stall,
            expect: Expect {
                status: 504,
                rules: &["perAgent.timeoutSeconds"],
                alert: false,
            },
            policies: |e| permissive_with_limits(e, "  perAgent: {timeoutSeconds: 1}\n"),
        },
        Act {
            id: "taint",
            title: "Control · taint",
            story: "web_search is marked untrusted: once research has read a web page, its branch of the run may not reach the sensitive vault/read_secret tool; the writer's clean branch still may",
            task: "Write the report from the vault notes and fresh web sources.",
            behaviour: Behaviour::Taint,
            expect: Expect {
                status: 403,
                rules: &["default/tools/tainted-branches-keep-off-sensitive-tools"],
                alert: false,
            },
            policies: taint,
        },
    ]
}

/// The manifests left in force when the demo keeps running: the incident's.
pub fn explore_manifests(e: &Endpoints) -> String {
    format!("{}---\n{}", agents_yaml(e), incident(e))
}

/// The four agents, with where they listen, the mock LLM and the MCP servers.
pub fn agents_yaml(e: &Endpoints) -> String {
    let mut docs = Vec::new();
    for name in AGENTS {
        let Some(a) = e.agents.get(name) else {
            continue;
        };
        let starts = if name == "orchestrator" {
            "  mayStartRuns: true\n"
        } else {
            ""
        };
        docs.push(format!(
            "apiVersion: ringfence.dev/v1alpha1
kind: Agent
metadata:
  name: {name}
  labels: {{workflow: research}}
  annotations:
    ringfence.dev/local-app: \"{app}\"
    ringfence.dev/local-outbound: \"{outbound}\"
    ringfence.dev/local-inbound: \"{inbound}\"
    ringfence.dev/local-admin: \"{admin}\"
spec:
  description: {desc}
  team: research-platform
  environment: demo
{starts}  models:
    - {{name: openai, url: \"http://{llm}\"}}
  tools:
    - {{name: search, url: \"http://{mcp}/mcp\"}}
    - {{name: vault, url: \"http://{mcp}/mcp\"}}
",
            app = a.app,
            outbound = a.outbound,
            inbound = a.inbound,
            admin = a.admin,
            desc = description(name),
            llm = e.llm,
            mcp = e.mcp,
        ));
    }
    docs.join("---\n")
}

/// Every agent may call the model (the incident's policies say nothing about models, and
/// anything not permitted is denied).
const MODELS: &str = "apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: models}
spec:
  allow:
    - description: Every agent may call the model.
      from: [\"*\"]
      models: [openai/*]
";

/// The graph that made the overnight loop: research may call the orchestrator back.
const PERMISSIVE: &str = "apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {name: permissive}
spec:
  allow:
    - description: The orchestrator delegates to its specialists.
      from: [orchestrator]
      agents: [research, writer, critic]
    - description: research retries a failed step by asking the orchestrator again; this edge made the overnight loop.
      from: [research]
      agents: [orchestrator]
    - description: research searches the web.
      from: [research]
      tools: [search/web_search]
";

fn permissive_with_limits(_e: &Endpoints, limits: &str) -> String {
    format!(
        "{PERMISSIVE}---\n{MODELS}---
apiVersion: ringfence.dev/v1alpha1
kind: RunBudget
metadata: {{name: research-workflow}}
spec:
  selector:
    matchLabels: {{workflow: research}}
{limits}"
    )
}

fn permissive_with_budget(e: &Endpoints) -> String {
    permissive_with_limits(
        e,
        &format!(
            "  # High enough that only the money stops the loop.
  maxDelegationDepth: 60
  cycles: {{maxRevisits: 100}}
  maxTotalTokens: 16000
  maxCostUsd: \"5.00\"
  onBreach: HaltAndAlert
  alert: {{webhook: \"{}\"}}
",
            e.alert_url()
        ),
    )
}

fn incident(_e: &Endpoints) -> String {
    format!("{INCIDENT_POLICIES}---\n{INCIDENT_BUDGET}---\n{MODELS}")
}

fn taint(_e: &Endpoints) -> String {
    format!(
        "apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {{name: orchestrator-delegates}}
spec:
  allow:
    - from: [orchestrator]
      agents: [research, writer, critic]
---
apiVersion: ringfence.dev/v1alpha1
kind: AgentPolicy
metadata: {{name: tools}}
spec:
  allow:
    - description: research and writer use the search and vault tools.
      from: [research, writer]
      tools: [search/web_search, vault/read_secret]
  tools:
    - {{server: search, tool: web_search, untrusted: true, sensitivity: low}}
    - {{server: vault, tool: read_secret, sensitivity: high}}
  cedar: |
    // A branch that has read untrusted content never reaches a sensitive tool.
    @id(\"tainted-branches-keep-off-sensitive-tools\")
    forbid (principal, action == Action::\"call_tool\", resource)
    when {{ context.tainted && resource.sensitivity == \"high\" }};
---
{MODELS}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{self, LastGood, Placement, Settings};
    use crate::source::folder::Folder;

    fn endpoints() -> Endpoints {
        let addr = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let agents = AGENTS
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let base = 20_000 + 10 * i as u16;
                (
                    n.to_string(),
                    AgentAddrs {
                        app: addr(base),
                        outbound: addr(base + 1),
                        inbound: addr(base + 2),
                        admin: addr(base + 3),
                    },
                )
            })
            .collect();
        Endpoints {
            agents,
            llm: addr(21_000),
            mcp: addr(21_001),
            alerts: addr(21_002),
        }
    }

    /// Loads `yaml` as `ringfence local` would and compiles it; returns what `ringfence
    /// check` would print and whether it passed.
    fn check(yaml: &str) -> (bool, Vec<String>, crate::compile::Compiled) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("demo.yaml"), yaml).unwrap();
        let report = crate::cli::check::check(dir.path(), &Default::default());
        let loaded = Folder::new(dir.path()).load();
        let settings = Settings {
            trust_domain: Default::default(),
            placement: Placement::Local,
        };
        let compiled = compile::compile(&loaded.manifests, &settings, &LastGood::default());
        (report.ok, report.lines, compiled)
    }

    #[test]
    fn every_act_s_manifests_pass_ringfence_check_with_a_bundle_per_agent() {
        let e = endpoints();
        for act in acts() {
            let (ok, lines, compiled) = check(&act.manifests(&e));
            assert!(ok, "{}: {lines:#?}", act.id);
            assert_eq!(compiled.bundles.len(), 4, "{}", act.id);
            assert!(
                compiled.diagnostics.iter().all(|d| !d.is_error()),
                "{}: {:?}",
                act.id,
                compiled.diagnostics
            );
        }
        let (ok, lines, _) = check(&explore_manifests(&e));
        assert!(ok, "{lines:#?}");
    }

    #[test]
    fn act_two_runs_the_shipped_incident_policies_word_for_word() {
        let m = acts()[1].manifests(&endpoints());
        assert!(m.contains(INCIDENT_POLICIES));
        assert!(m.contains(INCIDENT_BUDGET));
        assert!(m.contains("name: no-loops"));
    }

    #[test]
    fn act_one_only_the_budget_can_stop_the_loop() {
        let m = acts()[0].manifests(&endpoints());
        assert!(m.contains("maxTotalTokens: 16000"));
        assert!(m.contains("onBreach: HaltAndAlert"));
        assert!(m.contains("webhook: \"http://127.0.0.1:21002/alerts\""));
        assert!(!m.contains("no-loops"));
        assert!(!m.contains("invokeRateLimit"));
    }

    #[test]
    fn every_control_is_its_own_act_naming_its_own_rule() {
        let ids: Vec<_> = acts().iter().map(|a| a.id).collect();
        assert_eq!(
            ids,
            [
                "budget", "policy", "depth", "cycle", "rate", "stall", "taint"
            ]
        );
        let m = |i: usize| acts()[i].manifests(&endpoints());
        assert!(m(2).contains("maxDelegationDepth: 3"));
        assert!(m(3).contains("maxRevisits: 0"));
        assert!(m(4).contains("invokeRateLimit: 3/min"));
        assert!(m(5).contains("timeoutSeconds: 1"));
        assert!(m(6).contains("untrusted: true"));
        // Only the rate act limits the rate: the limiter's state outlives bundles.
        for i in [0, 2, 3, 5, 6] {
            assert!(!m(i).contains("invokeRateLimit"), "act {i}");
        }
    }

    #[test]
    fn agents_listen_where_the_endpoints_say() {
        let e = endpoints();
        let y = agents_yaml(&e);
        assert!(y.contains("ringfence.dev/local-outbound: \"127.0.0.1:20011\""));
        assert!(y.contains("url: \"http://127.0.0.1:21000\""));
        assert_eq!(y.matches("mayStartRuns: true").count(), 1);
    }
}
