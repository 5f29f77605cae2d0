//! The edge index and plain Cedar decide alike: on random slices mixing compiler-shaped edges
//! with free-form Cedar (errors, literal entities, unlisted tools and models, listed entities
//! whose group attribute disagrees with their id), every request gets the same decision from
//! [`Authorizer::decide`] as from [`Authorizer::decide_with_cedar_only`].

use proptest::prelude::*;
use ringfence_crds::bundle::{PolicyEntry, PolicySlice, ToolAttrs};
use ringfence_crds::policy::Sensitivity;
use serde_json::json;

use super::fixtures::{Mesh, agent_name, mesh_slice};
use super::*;
use crate::testing::SCHEMA;

const AGENTS: [&str; 4] = ["a", "b", "c", "d"];
/// Principals include one the entities do not list.
const PRINCIPALS: [&str; 5] = ["a", "b", "c", "d", "stranger"];
const SERVERS: [&str; 2] = ["s", "t"];
const TOOLS: [&str; 2] = ["x", "y"];
const PROVIDERS: [&str; 2] = ["openai", "anthropic"];
const MODELS: [&str; 2] = ["m1", "m2"];

/// Free-form policies the index must leave to Cedar (or, for the last ones, may take).
const FREE_FORM: [&str; 12] = [
    r#"forbid (principal, action == Action::"call_tool", resource) when { context.tainted && resource.sensitivity == "high" };"#,
    r#"forbid (principal, action == Action::"call_tool", resource == Tool::"s/x") unless { principal == Agent::"a" };"#,
    r#"permit (principal, action == Action::"invoke", resource) when { principal.team == resource.team };"#,
    r#"forbid (principal, action == Action::"invoke", resource) when { context.depth > 3 };"#,
    r#"permit (principal == Agent::"b", action == Action::"call_tool", resource) when { resource.server == "s" };"#,
    r#"permit (principal, action == Action::"call_model", resource) when { resource.provider == "openai" };"#,
    r#"permit (principal, action == Action::"call_tool", resource) when { Agent::"a".team == "core" && resource.name == "x" };"#,
    r#"forbid (principal, action, resource) when { context.path.contains(Agent::"c") };"#,
    r#"permit (principal in Agent::"a", action == Action::"start_run", resource);"#,
    r#"forbid (principal, action == Action::"invoke", resource) when { context.depth + 9223372036854775807 > 0 };"#,
    r#"permit (principal == Agent::"d", action == Action::"call_model", resource is Model) when { resource.provider == "anthropic" };"#,
    r#"permit (principal, action in [Action::"invoke", Action::"start_run"], resource);"#,
];

/// One structured edge, written as the compiler writes it.
#[derive(Debug, Clone)]
struct EdgeSpec {
    forbid: bool,
    /// `None`: any caller (`from: ["*"]`).
    caller: Option<usize>,
    action: usize,
    /// 0: `resource`; 1: `resource is T`; 2: `resource == T::"id"`; 3: group (tools/models).
    target: usize,
    pick: usize,
    rule: usize,
}

impl EdgeSpec {
    fn text(&self) -> String {
        let effect = if self.forbid { "forbid" } else { "permit" };
        let principal = match self.caller {
            None => "principal".to_owned(),
            Some(i) => format!("principal == Agent::\"{}\"", AGENTS[i % 4]),
        };
        let action = Action::ALL[self.action % 4];
        let (ty, id, group) = match action {
            Action::Invoke | Action::StartRun => ("Agent", AGENTS[self.pick % 4].to_owned(), None),
            Action::CallTool => (
                "Tool",
                format!("{}/{}", SERVERS[self.pick % 2], TOOLS[(self.pick / 2) % 2]),
                Some(("server", SERVERS[self.pick % 2])),
            ),
            Action::CallModel => (
                "Model",
                format!(
                    "{}/{}",
                    PROVIDERS[self.pick % 2],
                    MODELS[(self.pick / 2) % 2]
                ),
                Some(("provider", PROVIDERS[self.pick % 2])),
            ),
        };
        let (scope, when) = match (self.target % 4, group) {
            (0, _) => ("resource".to_owned(), String::new()),
            (1, _) | (_, None) => (format!("resource is {ty}"), String::new()),
            (2, _) => (format!("resource == {ty}::\"{id}\""), String::new()),
            (_, Some((attr, value))) => (
                format!("resource is {ty}"),
                format!(" when {{ resource.{attr} == \"{value}\" }}"),
            ),
        };
        format!(
            "@rule(\"r{}\") {effect} ({principal}, action == Action::\"{}\", {scope}){when};",
            self.rule % 3,
            action.as_str()
        )
    }
}

fn edge() -> impl Strategy<Value = EdgeSpec> {
    (
        any::<bool>(),
        prop::option::weighted(0.8, 0..4usize),
        0..4usize,
        0..4usize,
        0..4usize,
        0..3usize,
    )
        .prop_map(|(forbid, caller, action, target, pick, rule)| EdgeSpec {
            forbid,
            caller,
            action,
            target,
            pick,
            rule,
        })
}

#[derive(Debug, Clone)]
struct SliceSpec {
    edges: Vec<EdgeSpec>,
    free_form: Vec<usize>,
    teams: [bool; 4],
    /// Tools listed in the entities, and whether their `server` attribute lies.
    listed_tools: Vec<(usize, bool)>,
    listed_models: Vec<(usize, bool)>,
    tool_attrs: Vec<(usize, bool, bool)>,
}

fn slice_spec() -> impl Strategy<Value = SliceSpec> {
    (
        prop::collection::vec(edge(), 0..14),
        prop::collection::vec(0..FREE_FORM.len(), 0..4),
        any::<[bool; 4]>(),
        prop::collection::vec((0..4usize, prop::bool::weighted(0.2)), 0..3),
        prop::collection::vec((0..4usize, prop::bool::weighted(0.3)), 0..3),
        prop::collection::vec((0..5usize, any::<bool>(), any::<bool>()), 0..3),
    )
        .prop_map(
            |(edges, free_form, teams, listed_tools, listed_models, tool_attrs)| SliceSpec {
                edges,
                free_form,
                teams,
                listed_tools,
                listed_models,
                tool_attrs,
            },
        )
}

fn build(spec: &SliceSpec) -> Authorizer {
    let mut policies: Vec<PolicyEntry> = spec
        .edges
        .iter()
        .enumerate()
        .map(|(i, e)| PolicyEntry {
            id: format!("edge{i}"),
            rule: format!("ns/edges/r{}", e.rule % 3),
            text: e.text(),
        })
        .collect();
    let mut seen = Vec::new();
    for &f in &spec.free_form {
        if !seen.contains(&f) {
            seen.push(f);
            policies.push(PolicyEntry {
                id: format!("free{f}"),
                rule: format!("ns/guards/free{f}"),
                text: FREE_FORM[f].to_owned(),
            });
        }
    }
    let mut entities: Vec<serde_json::Value> = AGENTS
        .iter()
        .zip(spec.teams)
        .map(|(a, core)| {
            json!({
                "uid": { "type": "Agent", "id": a },
                "attrs": { "namespace": "ns", "team": if core { "core" } else { "content" },
                           "environment": "prod", "trust": "Trusted" },
                "parents": []
            })
        })
        .collect();
    let mut listed = Vec::new();
    for &(t, lies) in &spec.listed_tools {
        let (server, tool) = (SERVERS[t % 2], TOOLS[(t / 2) % 2]);
        if listed.contains(&(0, t)) {
            continue;
        }
        listed.push((0, t));
        entities.push(json!({
            "uid": { "type": "Tool", "id": format!("{server}/{tool}") },
            "attrs": { "server": if lies { "elsewhere" } else { server }, "name": tool,
                       "untrusted": false, "sensitivity": "high" },
            "parents": []
        }));
    }
    for &(m, lies) in &spec.listed_models {
        let (provider, model) = (PROVIDERS[m % 2], MODELS[(m / 2) % 2]);
        if listed.contains(&(1, m)) {
            continue;
        }
        listed.push((1, m));
        entities.push(json!({
            "uid": { "type": "Model", "id": format!("{provider}/{model}") },
            "attrs": { "provider": if lies { PROVIDERS[(m + 1) % 2] } else { provider }, "name": model },
            "parents": []
        }));
    }
    let mut tool_attrs: Vec<ToolAttrs> = Vec::new();
    for &(t, server_level, high) in &spec.tool_attrs {
        let attrs = ToolAttrs {
            server: SERVERS[t % 2].to_owned(),
            tool: (!server_level && t < 4).then(|| TOOLS[(t / 2) % 2].to_owned()),
            untrusted: high,
            sensitivity: if high {
                Sensitivity::High
            } else {
                Sensitivity::Low
            },
        };
        if !tool_attrs
            .iter()
            .any(|a| a.server == attrs.server && a.tool == attrs.tool)
        {
            tool_attrs.push(attrs);
        }
    }
    let slice = PolicySlice {
        schema: SCHEMA.to_owned(),
        policies,
        entities: serde_json::Value::Array(entities),
    };
    match Authorizer::build(&slice, &tool_attrs) {
        Ok(a) => a,
        Err(e) => panic!("generated slice does not build: {e}\n{slice:#?}"),
    }
}

#[derive(Debug, Clone)]
struct RequestSpec {
    principal: usize,
    action: usize,
    /// 0..4 agents, 4..8 tools, 8..12 models — any action with any resource.
    resource: usize,
    depth: u32,
    path: Vec<usize>,
    tainted: bool,
}

fn request() -> impl Strategy<Value = RequestSpec> {
    (
        0..PRINCIPALS.len(),
        0..4usize,
        0..12usize,
        0..6u32,
        prop::collection::vec(0..4usize, 0..3),
        any::<bool>(),
    )
        .prop_map(
            |(principal, action, resource, depth, path, tainted)| RequestSpec {
                principal,
                action,
                resource,
                depth,
                path,
                tainted,
            },
        )
}

/// A decision with its rules and errors in a fixed order: Cedar reports them unordered.
fn normalized(mut d: Decision) -> Decision {
    d.rules.sort();
    d.errors.sort();
    d
}

fn both(authz: &Authorizer, r: &RequestSpec) -> (Decision, Decision) {
    let context = CallContext {
        run: "01JRUN".to_owned(),
        user: "user:tomas".to_owned(),
        depth: r.depth,
        path: r.path.iter().map(|&i| AGENTS[i].to_owned()).collect(),
        revisits: 0,
        taint: if r.tainted {
            vec!["tool:s/x".to_owned()]
        } else {
            Vec::new()
        },
    };
    let i = r.resource % 4;
    let resource = match r.resource / 4 {
        0 => Resource::Agent(AGENTS[i]),
        1 => Resource::Tool {
            server: SERVERS[i % 2],
            tool: TOOLS[i / 2],
        },
        _ => Resource::Model {
            provider: PROVIDERS[i % 2],
            model: MODELS[i / 2],
        },
    };
    let req = CallRequest {
        principal: PRINCIPALS[r.principal],
        action: Action::ALL[r.action],
        resource,
        context: &context,
    };
    (
        normalized(authz.decide(&req)),
        normalized(authz.decide_with_cedar_only(&req)),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn the_edge_index_decides_exactly_like_plain_cedar(
        spec in slice_spec(),
        requests in prop::collection::vec(request(), 1..24),
    ) {
        let authz = build(&spec);
        // Twice over: the second time, unlisted resources are decided on the stores the first
        // time made, under other contexts too.
        for r in requests.iter().chain(&requests) {
            let (fast, cedar) = both(&authz, r);
            prop_assert_eq!(&fast, &cedar, "request {:?}", r);
        }
    }
}

#[test]
fn compiler_shaped_edges_take_the_index_and_free_form_cedar_does_not() {
    let (slice, tools) = mesh_slice(&Mesh::THOUSAND, 17);
    let authz = Authorizer::build(&slice, &tools).unwrap();
    let edges: usize = authz.index.iter().map(|i| i.edge_count()).sum();
    let residual: usize = authz
        .index
        .iter()
        .map(|i| i.residual.num_of_policies())
        .sum();
    assert_eq!(residual, 3, "only the three guards are left to Cedar");
    assert_eq!(edges + residual, slice.policies.len());
    assert!(edges >= 5, "agent 17's slice has its edges: {edges}");
}

#[test]
fn a_thousand_agent_slice_decides_like_plain_cedar() {
    let mesh = Mesh::THOUSAND;
    let me = 17;
    let (slice, tools) = mesh_slice(&mesh, me);
    let authz = Authorizer::build(&slice, &tools).unwrap();
    let mut allowed = 0;
    for other in (0..mesh.agents).step_by(5) {
        for (depth, taint) in [(1, false), (9, true)] {
            let context = CallContext {
                run: "01JRUN".to_owned(),
                user: String::new(),
                depth,
                path: vec![agent_name(me)],
                revisits: 0,
                taint: if taint {
                    vec!["x".to_owned()]
                } else {
                    Vec::new()
                },
            };
            let (me_name, other_name) = (agent_name(me), agent_name(other));
            let server = format!("srv-{:02}", other % 22);
            let tool = format!("tool-{:02}", other % 11);
            for (principal, action, resource) in [
                (&me_name, Action::Invoke, Resource::Agent(&other_name)),
                (&other_name, Action::Invoke, Resource::Agent(&me_name)),
                (
                    &me_name,
                    Action::CallTool,
                    Resource::Tool {
                        server: &server,
                        tool: &tool,
                    },
                ),
                (
                    &me_name,
                    Action::CallModel,
                    Resource::Model {
                        provider: ["openai", "anthropic", "mistral", "other"][other % 4],
                        model: "m",
                    },
                ),
            ] {
                let req = CallRequest {
                    principal,
                    action,
                    resource,
                    context: &context,
                };
                let fast = normalized(authz.decide(&req));
                assert_eq!(
                    fast,
                    normalized(authz.decide_with_cedar_only(&req)),
                    "{req:?}"
                );
                allowed += usize::from(fast.allowed);
            }
        }
    }
    assert!(allowed > 0, "some calls of the slice are allowed");
}

#[test]
fn an_unlisted_tool_called_again_is_decided_on_the_store_made_the_first_time() {
    let (slice, tools) = mesh_slice(&Mesh::THOUSAND, 17);
    let authz = Authorizer::build(&slice, &tools).unwrap();
    let me = agent_name(17);
    let decide = |tool: &str, tainted: bool| {
        let context = CallContext {
            run: "01JRUN".to_owned(),
            user: String::new(),
            depth: 1,
            path: vec![me.clone()],
            revisits: 0,
            taint: if tainted {
                vec!["web".to_owned()]
            } else {
                Vec::new()
            },
        };
        let req = CallRequest {
            principal: &me,
            action: Action::CallTool,
            resource: Resource::Tool {
                server: "srv-01",
                tool,
            },
            context: &context,
        };
        let fast = normalized(authz.decide(&req));
        assert_eq!(
            fast,
            normalized(authz.decide_with_cedar_only(&req)),
            "{req:?}"
        );
        fast
    };
    let first = decide("not-in-the-bundle", false);
    assert_eq!(authz.stores.lock().unwrap().len(), 1);
    assert_eq!(decide("not-in-the-bundle", false), first);
    decide("not-in-the-bundle", true);
    assert_eq!(authz.stores.lock().unwrap().len(), 1, "one store per tool");
    decide("another-one", false);
    assert_eq!(authz.stores.lock().unwrap().len(), 2);
}

#[test]
fn the_store_cache_is_bounded_and_starts_over_when_full() {
    let mut cache = StoreCache::default();
    let uid = |i: usize| EntityUid::from_str(&format!("Tool::\"s/t{i}\"")).unwrap();
    let principal = EntityUid::from_str("Agent::\"a\"").unwrap();
    let store = Arc::new(Entities::empty());
    for i in 0..3 {
        cache.insert(
            (Action::CallTool, principal.clone(), uid(i)),
            store.clone(),
            3,
        );
    }
    assert_eq!(cache.len(), 3);
    cache.insert(
        (Action::CallTool, principal.clone(), uid(3)),
        store.clone(),
        3,
    );
    assert_eq!(cache.len(), 1);
    assert!(cache.get(&(Action::CallTool, principal, uid(3))).is_some());
}
