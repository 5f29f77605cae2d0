//! Decisions over a hand-written slice: the article's orchestrator, research, writer and critic.

use ringfence_crds::bundle::{PolicyEntry, PolicySlice, ToolAttrs};
use ringfence_crds::policy::Sensitivity;
use serde_json::json;

use super::*;

use crate::testing::SCHEMA;

const ORCHESTRATOR_DELEGATES: (&str, &str) = (
    "default/article/orchestrator-delegates",
    r#"permit (principal == Agent::"orchestrator", action == Action::"invoke", resource)
       when { [Agent::"research", Agent::"writer", Agent::"critic"].contains(resource) };"#,
);
const NO_CALLS_BACK: (&str, &str) = (
    "default/article/no-calls-back",
    r#"forbid (principal, action == Action::"invoke", resource == Agent::"orchestrator")
       when { [Agent::"research", Agent::"writer"].contains(principal) };"#,
);
const RESEARCH_SEARCHES: (&str, &str) = (
    "default/article/research-searches",
    r#"permit (principal == Agent::"research", action == Action::"call_tool", resource == Tool::"search/web_search");"#,
);

fn agent(name: &str, team: &str) -> serde_json::Value {
    json!({
        "uid": { "type": "Agent", "id": name },
        "attrs": { "namespace": "default", "team": team, "environment": "prod", "trust": "Trusted" },
        "parents": []
    })
}

fn entities() -> serde_json::Value {
    json!([
        agent("orchestrator", "core"),
        agent("research", "content"),
        agent("writer", "content"),
        agent("critic", "content"),
        {
            "uid": { "type": "Tool", "id": "search/web_search" },
            "attrs": { "server": "search", "name": "web_search", "untrusted": true, "sensitivity": "low" },
            "parents": []
        },
        {
            "uid": { "type": "Model", "id": "openai/gpt-4o-mini" },
            "attrs": { "provider": "openai", "name": "gpt-4o-mini" },
            "parents": []
        }
    ])
}

fn slice(policies: &[(&str, &str)]) -> PolicySlice {
    PolicySlice {
        schema: SCHEMA.to_owned(),
        policies: policies
            .iter()
            .enumerate()
            .map(|(i, (rule, text))| PolicyEntry {
                id: format!("p{i}"),
                rule: (*rule).to_owned(),
                text: (*text).to_owned(),
            })
            .collect(),
        entities: entities(),
    }
}

fn article() -> Authorizer {
    Authorizer::build(
        &slice(&[ORCHESTRATOR_DELEGATES, NO_CALLS_BACK, RESEARCH_SEARCHES]),
        &[],
    )
    .unwrap()
}

fn ctx() -> CallContext {
    CallContext {
        run: "01J0RUN".to_owned(),
        user: "user:tomas".to_owned(),
        depth: 1,
        path: vec!["orchestrator".to_owned()],
        revisits: 0,
        taint: Vec::new(),
    }
}

fn invoke(authz: &Authorizer, from: &str, to: &str) -> Decision {
    authz.decide(&CallRequest {
        principal: from,
        action: Action::Invoke,
        resource: Resource::Agent(to),
        context: &ctx(),
    })
}

fn call_tool(
    authz: &Authorizer,
    from: &str,
    server: &str,
    tool: &str,
    context: &CallContext,
) -> Decision {
    authz.decide(&CallRequest {
        principal: from,
        action: Action::CallTool,
        resource: Resource::Tool { server, tool },
        context,
    })
}

#[test]
fn orchestrator_may_invoke_research_writer_and_critic() {
    let authz = article();
    for callee in ["research", "writer", "critic"] {
        let d = invoke(&authz, "orchestrator", callee);
        assert!(d.allowed, "orchestrator -> {callee}: {d}");
        assert_eq!(d.basis, Basis::Permit);
        assert_eq!(d.rules, vec![Arc::from(ORCHESTRATOR_DELEGATES.0)]);
    }
}

#[test]
fn research_may_not_invoke_orchestrator() {
    let authz = article();
    for caller in ["research", "writer"] {
        let d = invoke(&authz, caller, "orchestrator");
        assert!(!d.allowed);
        assert_eq!(d.basis, Basis::Forbid);
        assert_eq!(d.rules, vec![Arc::from(NO_CALLS_BACK.0)]);
        assert!(d.to_string().contains(NO_CALLS_BACK.0), "{d}");
    }
}

#[test]
fn an_edge_nobody_allowed_is_denied_by_default() {
    let authz = article();
    let d = invoke(&authz, "critic", "writer");
    assert!(!d.allowed);
    assert_eq!(d.basis, Basis::DefaultDeny);
    assert!(d.rules.is_empty());
    assert!(d.to_string().contains("default deny"), "{d}");
}

#[test]
fn only_research_may_call_web_search() {
    let authz = article();
    let d = call_tool(&authz, "research", "search", "web_search", &ctx());
    assert!(d.allowed, "{d}");
    assert_eq!(d.rules, vec![Arc::from(RESEARCH_SEARCHES.0)]);
    for caller in ["orchestrator", "writer", "critic"] {
        let d = call_tool(&authz, caller, "search", "web_search", &ctx());
        assert_eq!(d.basis, Basis::DefaultDeny, "{caller}: {d}");
    }
}

#[test]
fn forbid_beats_permit() {
    let everyone = (
        "default/open/everyone-invokes",
        r#"permit (principal, action == Action::"invoke", resource);"#,
    );
    let authz = Authorizer::build(&slice(&[everyone, NO_CALLS_BACK]), &[]).unwrap();
    assert!(invoke(&authz, "critic", "orchestrator").allowed);
    let d = invoke(&authz, "research", "orchestrator");
    assert!(!d.allowed);
    assert_eq!(d.basis, Basis::Forbid);
    assert_eq!(d.rules, vec![Arc::from(NO_CALLS_BACK.0)]);
}

#[test]
fn an_evaluation_error_is_a_deny_naming_the_rule() {
    // Overflows for any depth >= 1: Cedar raises an evaluation error and skips the forbid,
    // which on its own would let the permit through.
    let overflowing = (
        "default/broken/overflowing-forbid",
        r#"forbid (principal, action == Action::"invoke", resource)
           when { context.depth + 9223372036854775807 > 0 };"#,
    );
    let authz = Authorizer::build(&slice(&[ORCHESTRATOR_DELEGATES, overflowing]), &[]).unwrap();

    // Cedar alone would skip the failing forbid and allow through the permit.
    let d = invoke(&authz, "orchestrator", "research");
    assert!(!d.allowed, "{d}");
    assert_eq!(d.basis, Basis::EvaluationError);
    assert_eq!(d.rules, vec![Arc::from(overflowing.0)]);
    assert!(
        d.errors.iter().any(|e| e.contains("overflow")),
        "{:?}",
        d.errors
    );

    // At depth 0 the same policy evaluates without error, matches, and forbids as written.
    let root = CallContext { depth: 0, ..ctx() };
    let d = authz.decide(&CallRequest {
        principal: "orchestrator",
        action: Action::Invoke,
        resource: Resource::Agent("research"),
        context: &root,
    });
    assert_eq!(d.basis, Basis::Forbid, "{d}");
}

#[test]
fn an_attribute_of_an_unknown_agent_is_an_evaluation_error_not_an_allow() {
    let team_rule = (
        "default/teams/same-team",
        r#"permit (principal, action == Action::"invoke", resource) when { principal.team == resource.team };"#,
    );
    let authz = Authorizer::build(&slice(&[team_rule]), &[]).unwrap();
    assert!(invoke(&authz, "research", "writer").allowed);
    let d = invoke(&authz, "stranger", "writer");
    assert_eq!(d.basis, Basis::EvaluationError, "{d}");
    assert_eq!(d.rules, vec![Arc::from(team_rule.0)]);
}

const TAINT_GUARD: (&str, &str) = (
    "default/taint/no-sensitive-tools-when-tainted",
    r#"forbid (principal, action == Action::"call_tool", resource)
       when { context.tainted && resource.sensitivity == "high" };"#,
);
const RESEARCH_USES_FILES: (&str, &str) = (
    "default/files/research-uses-files",
    r#"permit (principal == Agent::"research", action == Action::"call_tool", resource)
       when { resource.server == "files" };"#,
);

fn files_attrs() -> Vec<ToolAttrs> {
    vec![
        ToolAttrs {
            server: "files".to_owned(),
            tool: None,
            untrusted: false,
            sensitivity: Sensitivity::High,
        },
        ToolAttrs {
            server: "files".to_owned(),
            tool: Some("list".to_owned()),
            untrusted: false,
            sensitivity: Sensitivity::Low,
        },
    ]
}

#[test]
fn a_tainted_context_is_refused_a_high_sensitivity_tool() {
    let authz =
        Authorizer::build(&slice(&[RESEARCH_USES_FILES, TAINT_GUARD]), &files_attrs()).unwrap();
    let clean = ctx();
    let tainted = CallContext {
        taint: vec!["tool:search/web_search".to_owned()],
        ..ctx()
    };

    // `files/delete` is listed nowhere: it takes the server's defaults (high).
    let d = call_tool(&authz, "research", "files", "delete", &clean);
    assert!(d.allowed, "{d}");
    let d = call_tool(&authz, "research", "files", "delete", &tainted);
    assert!(!d.allowed);
    assert_eq!(d.basis, Basis::Forbid);
    assert_eq!(d.rules, vec![Arc::from(TAINT_GUARD.0)]);

    // `files/list` has its own low sensitivity, overriding the server's.
    let d = call_tool(&authz, "research", "files", "list", &tainted);
    assert!(d.allowed, "{d}");
}

#[test]
fn an_unlisted_tool_without_attributes_is_trusted_and_low() {
    let low_only = (
        "default/tools/low-only",
        r#"permit (principal, action == Action::"call_tool", resource)
           when { resource.sensitivity == "low" && !resource.untrusted && resource.name == "anything" };"#,
    );
    let authz = Authorizer::build(&slice(&[low_only]), &[]).unwrap();
    let d = call_tool(&authz, "writer", "misc", "anything", &ctx());
    assert!(d.allowed, "{d}");
}

#[test]
fn an_unlisted_model_is_decidable() {
    let openai = (
        "default/models/openai",
        r#"permit (principal, action == Action::"call_model", resource) when { resource.provider == "openai" };"#,
    );
    let authz = Authorizer::build(&slice(&[openai]), &[]).unwrap();
    for model in ["gpt-4o-mini", "o3"] {
        let d = authz.decide(&CallRequest {
            principal: "writer",
            action: Action::CallModel,
            resource: Resource::Model {
                provider: "openai",
                model,
            },
            context: &ctx(),
        });
        assert!(d.allowed, "{model}: {d}");
    }
}

#[test]
fn start_run_names_the_agent_as_principal_and_resource() {
    let starts = (
        "default/runs/orchestrator-starts",
        r#"permit (principal == Agent::"orchestrator", action == Action::"start_run", resource)
           when { resource == principal };"#,
    );
    let authz = Authorizer::build(&slice(&[starts]), &[]).unwrap();
    let run = |agent| {
        authz.decide(&CallRequest {
            principal: agent,
            action: Action::StartRun,
            resource: Resource::Agent(agent),
            context: &CallContext::default(),
        })
    };
    assert!(run("orchestrator").allowed);
    assert_eq!(run("research").basis, Basis::DefaultDeny);
}

#[test]
fn a_policy_the_schema_does_not_allow_is_rejected_with_its_rule() {
    let wrong = (
        "default/broken/no-such-attribute",
        r#"permit (principal, action == Action::"invoke", resource) when { principal.owner == "me" };"#,
    );
    let err = Authorizer::build(&slice(&[ORCHESTRATOR_DELEGATES, wrong]), &[]).unwrap_err();
    assert!(matches!(err, AuthzError::Validation(_)), "{err}");
    assert!(err.to_string().contains(wrong.0), "{err}");
}

#[test]
fn a_policy_that_does_not_parse_is_rejected_with_its_rule() {
    let garbage = (
        "default/broken/garbage",
        "permit (principal, action, resource) when {",
    );
    let err = Authorizer::build(&slice(&[garbage]), &[]).unwrap_err();
    assert!(matches!(err, AuthzError::Policy { .. }), "{err}");
    assert!(err.to_string().contains(garbage.0), "{err}");
}

#[test]
fn entities_that_do_not_fit_the_schema_are_rejected() {
    let mut s = slice(&[ORCHESTRATOR_DELEGATES]);
    s.entities =
        json!([{ "uid": { "type": "Agent", "id": "x" }, "attrs": { "team": 3 }, "parents": [] }]);
    let err = Authorizer::build(&s, &[]).unwrap_err();
    assert!(matches!(err, AuthzError::Entities(_)), "{err}");
}
