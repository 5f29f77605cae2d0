//! The article's policies, compiled from examples/incident and decided by the sidecar's own
//! authorizer — on the caller's slice (early refusal) and on the callee's (authoritative).

use std::collections::BTreeMap;
use std::path::PathBuf;

use ringfence::compile::{LastGood, Placement, Settings, compile};
use ringfence::source::folder::Folder;
use ringfence_crds::AgentKey;
use ringfence_crds::bundle::BundleContent;
use ringfence_sidecar::authz::{
    Action, Authorizer, Basis, CallContext, CallRequest, Decision, Resource,
};

fn bundles() -> BTreeMap<AgentKey, BundleContent> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/incident");
    let loaded = Folder::new(dir).load();
    assert!(loaded.problems.is_empty());
    let s = Settings {
        trust_domain: Default::default(),
        placement: Placement::Local,
    };
    let c = compile(&loaded.manifests, &s, &LastGood::default());
    assert!(c.errors().next().is_none(), "{:?}", c.diagnostics);
    c.bundles
}

fn authorizer(b: &BTreeMap<AgentKey, BundleContent>, agent: &str) -> Authorizer {
    let content = &b[&AgentKey::new("default", agent).unwrap()];
    Authorizer::build(&content.policy, &content.tools).unwrap()
}

fn ctx(path: &[&str]) -> CallContext {
    CallContext {
        run: "01JRUN".into(),
        user: "user:tomas".into(),
        depth: path.len() as u32,
        path: path.iter().map(|s| s.to_string()).collect(),
        revisits: 0,
        taint: vec![],
    }
}

/// Decides `caller → callee` (invoke) on both sidecars; they must agree.
fn invoke(b: &BTreeMap<AgentKey, BundleContent>, caller: &str, callee: &str) -> Decision {
    let c = ctx(&[caller]);
    let req = CallRequest {
        principal: caller,
        action: Action::Invoke,
        resource: Resource::Agent(callee),
        context: &c,
    };
    let at_caller = authorizer(b, caller).decide(&req);
    let at_callee = authorizer(b, callee).decide(&req);
    assert_eq!(
        at_caller.allowed, at_callee.allowed,
        "{caller} → {callee}: caller says {at_caller}, callee says {at_callee}"
    );
    assert_eq!(at_caller.basis, at_callee.basis);
    at_callee
}

fn call_tool(b: &BTreeMap<AgentKey, BundleContent>, caller: &str, tool: &str) -> Decision {
    let c = ctx(&[caller]);
    let req = CallRequest {
        principal: caller,
        action: Action::CallTool,
        resource: Resource::Tool {
            server: "search",
            tool,
        },
        context: &c,
    };
    authorizer(b, caller).decide(&req)
}

#[test]
fn orchestrator_may_invoke_research_writer_and_critic() {
    let b = bundles();
    for callee in ["research", "writer", "critic"] {
        let d = invoke(&b, "orchestrator", callee);
        assert!(d.allowed, "orchestrator → {callee}: {d}");
        assert_eq!(
            d.rules.first().map(|r| r.to_string()).as_deref(),
            Some("default/orchestrator-delegates/allow[0]")
        );
    }
}

#[test]
fn research_and_writer_may_not_invoke_orchestrator_and_the_denial_names_the_forbid_rule() {
    let b = bundles();
    for caller in ["research", "writer"] {
        let d = invoke(&b, caller, "orchestrator");
        assert!(!d.allowed);
        assert_eq!(d.basis, Basis::Forbid);
        assert_eq!(
            d.rules.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            vec!["default/no-loops/deny[0]".to_owned()]
        );
    }
}

#[test]
fn only_research_may_call_web_search() {
    let b = bundles();
    let d = call_tool(&b, "research", "web_search");
    assert!(d.allowed, "{d}");
    for caller in ["orchestrator", "writer", "critic"] {
        let d = call_tool(&b, caller, "web_search");
        assert!(!d.allowed, "{caller}: {d}");
        assert_eq!(d.basis, Basis::Forbid, "{caller}: {d}");
        assert!(
            d.rules
                .iter()
                .any(|r| r.ends_with("web-search-is-research-only")),
            "{d}"
        );
    }
}

#[test]
fn an_edge_nobody_allowed_is_denied() {
    let b = bundles();
    for (caller, callee) in [
        ("critic", "writer"),
        ("writer", "research"),
        ("critic", "orchestrator"),
    ] {
        let d = invoke(&b, caller, callee);
        assert!(!d.allowed, "{caller} → {callee}: {d}");
        assert_eq!(d.basis, Basis::DefaultDeny, "{caller} → {callee}");
    }
    let d = call_tool(&b, "research", "read_inbox");
    assert_eq!(d.basis, Basis::DefaultDeny, "{d}");
}

#[test]
fn only_the_orchestrator_may_start_a_run() {
    let b = bundles();
    for (agent, allowed) in [
        ("orchestrator", true),
        ("research", false),
        ("writer", false),
    ] {
        let c = ctx(&[]);
        let req = CallRequest {
            principal: agent,
            action: Action::StartRun,
            resource: Resource::Agent(agent),
            context: &c,
        };
        assert_eq!(
            authorizer(&b, agent).decide(&req).allowed,
            allowed,
            "{agent}"
        );
    }
}
