//! The compiler against the incident example and against broken policies.

use std::path::PathBuf;

use ringfence_crds::policy::AgentPolicySpec;
use ringfence_crds::{AgentKey, AgentPolicy, TrustDomain};

use super::*;
use crate::source::folder::Folder;

fn incident() -> Manifests {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/incident");
    let loaded = Folder::new(dir).load();
    assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
    loaded.manifests
}

fn settings() -> Settings {
    Settings {
        trust_domain: TrustDomain::default(),
        placement: Placement::Local,
    }
}

fn key(name: &str) -> AgentKey {
    AgentKey::new("default", name).unwrap()
}

fn rules(c: &Compiled, agent: &str) -> Vec<String> {
    c.bundles[&key(agent)]
        .policy
        .policies
        .iter()
        .map(|p| p.id.clone())
        .collect()
}

#[test]
fn the_incident_example_compiles_without_errors() {
    let c = compile(&incident(), &settings(), &LastGood::default());
    assert!(c.errors().next().is_none(), "{:?}", c.diagnostics);
    assert_eq!(c.bundles.len(), 4);
    let research = &c.bundles[&key("research")];
    assert_eq!(
        research.agent.spiffe_id.to_string(),
        "spiffe://cluster.local/ns/default/agent/research"
    );
    assert_eq!(research.agent.inbound.as_deref(), Some("127.0.0.1:15602"));
    assert_eq!(research.peers.len(), 3);
    assert_eq!(research.tool_servers[0].name, "search");
}

#[test]
fn each_sidecar_gets_only_the_policies_that_touch_its_agent() {
    let c = compile(&incident(), &settings(), &LastGood::default());
    let critic = rules(&c, "critic");
    assert!(
        critic.iter().any(|id| id.ends_with("orchestrator->critic")),
        "{critic:?}"
    );
    assert!(
        !critic
            .iter()
            .any(|id| id.contains("research->orchestrator")),
        "{critic:?}"
    );
    assert!(
        !critic.iter().any(|id| id.ends_with("orchestrator->writer")),
        "{critic:?}"
    );

    let research = rules(&c, "research");
    assert!(
        research
            .iter()
            .any(|id| id == "default/no-loops/deny[0]:research->orchestrator")
    );
    assert!(
        research
            .iter()
            .any(|id| id.ends_with("research->search/web_search"))
    );
    assert!(
        !research
            .iter()
            .any(|id| id.contains("writer->orchestrator"))
    );

    let orchestrator = rules(&c, "orchestrator");
    assert!(
        orchestrator
            .iter()
            .any(|id| id == "default/orchestrator/mayStartRuns")
    );
    assert!(
        orchestrator
            .iter()
            .any(|id| id.contains("writer->orchestrator"))
    );
    // Unscoped Cedar policies can apply to anyone and go everywhere.
    for agent in ["orchestrator", "research", "writer", "critic"] {
        assert!(
            rules(&c, agent)
                .iter()
                .any(|id| id.ends_with("tainted-branches-keep-off-sensitive-tools"))
        );
    }
}

#[test]
fn run_limits_come_from_the_budget_that_selects_the_agent() {
    let c = compile(&incident(), &settings(), &LastGood::default());
    let l = &c.bundles[&key("writer")].limits;
    assert_eq!(l.max_delegation_depth, 5);
    assert_eq!(l.max_revisits, 0);
    assert_eq!(l.max_total_tokens, Some(500_000));
    assert_eq!(l.max_wall_clock_seconds, Some(600));
    assert_eq!(l.timeout_seconds, Some(45));
    assert_eq!(
        l.invoke_rate_limit.map(|r| r.to_string()).as_deref(),
        Some("60/min")
    );
    assert_eq!(l.budgets, vec!["default/research-workflow".to_owned()]);
}

#[test]
fn the_strictest_budget_wins_and_the_agent_override_beats_both() {
    let mut m = incident();
    let mut strict = m.budgets[0].clone();
    strict.metadata.name = Some("strict".into());
    strict.spec.max_delegation_depth = Some(2);
    strict.spec.max_total_tokens = None;
    strict.spec.per_agent.as_mut().unwrap().invoke_rate_limit = Some("2/s".parse().unwrap());
    m.budgets.push(strict);
    m.agents[0].spec.invoke_rate_limit = Some("5/min".parse().unwrap());
    let c = compile(&m, &settings(), &LastGood::default());
    let w = &c.bundles[&key("writer")].limits;
    assert_eq!(w.max_delegation_depth, 2);
    assert_eq!(w.max_total_tokens, Some(500_000));
    assert_eq!(w.invoke_rate_limit.unwrap().to_string(), "60/min");
    let o = &c.bundles[&key("orchestrator")].limits;
    assert_eq!(o.invoke_rate_limit.unwrap().to_string(), "5/min");
}

#[test]
fn compiling_twice_gives_the_same_hash() {
    let a = compile(&incident(), &settings(), &LastGood::default());
    let b = compile(&incident(), &settings(), &LastGood::default());
    for (k, content) in &a.bundles {
        assert_eq!(content.digest(), b.bundles[k].digest());
    }
}

fn with_cedar(m: &mut Manifests, text: &str) {
    let p = m
        .policies
        .iter_mut()
        .find(|p| p.metadata.name.as_deref() == Some("web-search"))
        .unwrap();
    p.spec.cedar = Some(text.to_owned());
}

#[test]
fn an_invalid_policy_is_reported_with_its_location_and_the_last_good_one_stays() {
    let good = compile(&incident(), &settings(), &LastGood::default());
    let mut m = incident();
    // Line 3 misspells an attribute: Cedar's strict validation refuses it.
    with_cedar(
        &mut m,
        "@id(\"x\")\nforbid (principal, action == Action::\"call_tool\", resource)\nwhen { context.tainted && resource.sensitivty == \"high\" };\n",
    );
    let bad = compile(&m, &settings(), &good.last_good);
    let err = bad.errors().next().expect("an error");
    assert_eq!(err.resource.name, "web-search");
    assert_eq!(err.field, "spec.cedar");
    let loc = err.location.expect("a location");
    assert_eq!(loc.line, 3, "{err}");
    assert!(err.to_string().contains("sensitivty"), "{err}");
    assert!(
        err.origin.as_deref().unwrap().contains("policies.yaml"),
        "{err}"
    );
    for (k, content) in &good.bundles {
        assert_eq!(
            content.digest(),
            bad.bundles[k].digest(),
            "bundle of {k} changed"
        );
    }
}

#[test]
fn a_cedar_syntax_error_points_at_its_line() {
    let mut m = incident();
    with_cedar(
        &mut m,
        "permit (\n  principal,\n  action == Action::\"invoke\"\n  resource\n);",
    );
    let c = compile(&m, &settings(), &LastGood::default());
    let err = c.errors().next().expect("an error");
    assert_eq!(err.field, "spec.cedar");
    assert!(err.location.is_some_and(|l| l.line >= 3), "{err}");
    assert!(err.message.starts_with("Cedar does not parse"), "{err}");
}

#[test]
fn a_never_valid_policy_is_left_out_and_others_still_compile() {
    let mut m = incident();
    m.policies.push(AgentPolicy::new(
        "broken",
        AgentPolicySpec {
            cedar: Some("permit(principal, action, resource) when { 1 };".into()),
            ..Default::default()
        },
    ));
    m.policies.last_mut().unwrap().metadata.namespace = Some("default".into());
    let c = compile(&m, &settings(), &LastGood::default());
    assert!(c.errors().any(|d| d.resource.name == "broken"));
    assert_eq!(c.bundles.len(), 4);
    assert!(!c.accepted.keys().any(|r| r.name == "broken"));
}

#[test]
fn malformed_structured_rules_say_what_to_write() {
    let mut m = incident();
    let spec = &mut m.policies[0].spec;
    spec.allow[0].tools = vec!["web_search".into()];
    spec.allow[0].agents.push("other-ns/writer".into());
    let c = compile(&m, &settings(), &LastGood::default());
    let msgs: Vec<String> = c.errors().map(ToString::to_string).collect();
    assert!(
        msgs.iter().any(|m| m.contains("must be <server>/<tool>")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter().any(|m| m.contains("another namespace")),
        "{msgs:?}"
    );
}

#[test]
fn templates_are_refused() {
    let mut m = incident();
    with_cedar(
        &mut m,
        "permit (principal == ?principal, action, resource);",
    );
    let c = compile(&m, &settings(), &LastGood::default());
    assert!(
        c.errors().any(|d| d.message.contains("template")),
        "{:?}",
        c.diagnostics
    );
}

#[test]
fn bad_local_addresses_are_reported_and_the_agent_left_out() {
    let mut m = incident();
    m.agents[1]
        .metadata
        .annotations
        .as_mut()
        .unwrap()
        .insert("ringfence.dev/local-inbound".into(), "localhost".into());
    let c = compile(&m, &settings(), &LastGood::default());
    assert!(
        c.errors()
            .any(|d| d.resource.name == "research" && d.message.contains("not an address"))
    );
    assert_eq!(c.bundles.len(), 3);
}

#[test]
fn cluster_placement_addresses_agents_by_service() {
    let s = Settings {
        trust_domain: TrustDomain::new("prod.example").unwrap(),
        placement: Placement::Cluster {
            inbound_port: 15006,
            cluster_domain: "cluster.local".into(),
        },
    };
    let c = compile(&incident(), &s, &LastGood::default());
    let r = &c.bundles[&key("research")].agent;
    assert_eq!(
        r.inbound.as_deref(),
        Some("research.default.svc.cluster.local:15006")
    );
    assert_eq!(
        r.spiffe_id.to_string(),
        "spiffe://prod.example/ns/default/agent/research"
    );
}

#[test]
fn the_retry_policy_with_the_fewest_attempts_is_in_force() {
    use ringfence_crds::retry::RetryPolicy;
    let mut m = incident();
    m.budgets[0].spec.retry = Some(RetryPolicy {
        max_attempts: 4,
        ..RetryPolicy::default()
    });
    let mut careful = m.budgets[0].clone();
    careful.metadata.name = Some("careful".into());
    careful.spec.retry = Some(RetryPolicy {
        max_attempts: 2,
        budget_percent: 5,
        ..RetryPolicy::default()
    });
    m.budgets.push(careful);
    let c = compile(&m, &settings(), &LastGood::default());
    let retry = c.bundles[&key("writer")].limits.retry.clone().unwrap();
    assert_eq!((retry.max_attempts, retry.budget_percent), (2, 5));
}

#[test]
fn quotas_resolve_to_what_each_agent_is_counted_under() {
    use ringfence_crds::quota::{Quota, QuotaScope, QuotaWindow};
    let mut m = incident();
    let quota = |per, window| Quota {
        per,
        window,
        sliding: false,
        max_total_tokens: Some(1_000_000),
        max_cost_usd: Some("10".parse().unwrap()),
    };
    m.budgets[0].spec.quotas = vec![
        quota(QuotaScope::Team, QuotaWindow::Day),
        quota(QuotaScope::Agent, QuotaWindow::Hour),
        quota(QuotaScope::Workflow, QuotaWindow::Month),
    ];
    let c = compile(&m, &settings(), &LastGood::default());
    assert!(c.errors().next().is_none(), "{:?}", c.diagnostics);
    let q = &c.bundles[&key("writer")].limits.quotas;
    let keys: Vec<(&str, &str)> = q.iter().map(|t| (t.id.as_str(), t.key.as_str())).collect();
    assert_eq!(
        keys,
        [
            ("default/research-workflow#0", "team:research-platform"),
            ("default/research-workflow#1", "agent:writer"),
            ("default/research-workflow#2", "workflow:research-workflow"),
        ]
    );
    assert_eq!(q[0].max_cost_micros, Some(10_000_000));
    assert_eq!(q[0].window, QuotaWindow::Day);
}

#[test]
fn a_team_quota_warns_about_an_agent_without_a_team() {
    use ringfence_crds::quota::{Quota, QuotaScope, QuotaWindow};
    let mut m = incident();
    m.budgets[0].spec.quotas = vec![Quota {
        per: QuotaScope::Team,
        window: QuotaWindow::Day,
        sliding: true,
        max_total_tokens: Some(10),
        max_cost_usd: None,
    }];
    let writer = m
        .agents
        .iter_mut()
        .find(|a| a.metadata.name.as_deref() == Some("writer"))
        .unwrap();
    writer.spec.team = None;
    let c = compile(&m, &settings(), &LastGood::default());
    assert!(c.bundles[&key("writer")].limits.quotas.is_empty());
    assert!(
        c.diagnostics.iter().any(
            |d| d.field == "spec.quotas[0].per" && d.message.contains("\"writer\" has no team")
        ),
        "{:?}",
        c.diagnostics
    );
}

#[test]
fn fallbacks_must_name_what_exists_and_speak_the_same_api() {
    use ringfence_crds::agent::{ModelApi, ModelProvider, ModelRoute};
    let provider = |name: &str, api, fallbacks: Vec<ModelRoute>| ModelProvider {
        name: name.into(),
        url: "http://127.0.0.1:1".into(),
        api,
        api_key_env: None,
        timeout_seconds: None,
        fallbacks,
    };
    let route = |p: &str| ModelRoute {
        provider: p.into(),
        model: None,
    };
    for (models, problem) in [
        (
            vec![provider("openai", ModelApi::OpenAI, vec![route("azure")])],
            "no provider named \"azure\"",
        ),
        (
            vec![
                provider("openai", ModelApi::OpenAI, vec![route("claude")]),
                provider("claude", ModelApi::Anthropic, vec![]),
            ],
            "must speak the same API",
        ),
        (
            vec![provider("openai", ModelApi::OpenAI, vec![route("openai")])],
            "must name another model",
        ),
    ] {
        let mut m = incident();
        m.agents[0].spec.models = models;
        let c = compile(&m, &settings(), &LastGood::default());
        assert!(
            c.errors().any(|d| d.message.contains(problem)),
            "{problem}: {:?}",
            c.diagnostics
        );
    }

    let mut m = incident();
    m.agents[0].spec.models = vec![
        provider("openai", ModelApi::OpenAI, vec![route("backup")]),
        provider("backup", ModelApi::OpenAI, vec![]),
    ];
    m.agents[1].spec.fallback = Some("writer".into());
    let c = compile(&m, &settings(), &LastGood::default());
    assert!(c.errors().next().is_none(), "{:?}", c.diagnostics);
    let name = m.agents[1].metadata.name.clone().unwrap();
    let peer = c.bundles[&key("orchestrator")]
        .peers
        .iter()
        .find(|p| p.name == name)
        .unwrap();
    assert_eq!(peer.fallback.as_deref(), Some("writer"));

    m.agents[1].spec.fallback = Some("nobody".into());
    let c = compile(&m, &settings(), &LastGood::default());
    assert!(
        c.diagnostics
            .iter()
            .any(|d| d.field == "spec.fallback" && d.message.contains("\"nobody\"")),
        "{:?}",
        c.diagnostics
    );
}
