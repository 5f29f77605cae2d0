//! Manifests → one policy bundle per agent. Pure: no I/O, no clock.
//!
//! For every namespace the compiler validates each AgentPolicy against the one Cedar schema
//! ([`schema`]), keeps the last accepted version of a policy whose new version is invalid, turns
//! RunBudgets into per-agent limits, and cuts, for each agent, the slice of policies that can
//! apply to it as caller (principal) or callee (resource).

pub mod diagnostic;
pub mod entities;
pub mod limits;
pub mod policies;
pub mod schema;

use std::collections::{BTreeMap, BTreeSet};

use cedar_policy::{EntityUid, PrincipalConstraint, ResourceConstraint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use ringfence_crds::agent::local;
use ringfence_crds::bundle::{
    AgentEntry, BundleContent, PolicyEntry, PolicySlice, ToolAttrs, ToolServerEntry,
};
use ringfence_crds::spiffe::validate_dns_label;
use ringfence_crds::{Agent, AgentKey, SpiffeId, TrustDomain};

pub use diagnostic::{Diagnostic, Location, ResourceRef, Severity};
use policies::CompiledPolicy;

use crate::source::Manifests;

/// Where sidecars listen, which decides the addresses written into bundles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// One machine: addresses come from the `ringfence.dev/local-*` annotations.
    Local,
    /// Kubernetes: each agent's Service, `<name>.<namespace>.svc.<domain>:<port>`.
    Cluster {
        inbound_port: u16,
        cluster_domain: String,
    },
}

/// What the compiler needs besides manifests.
#[derive(Debug, Clone)]
pub struct Settings {
    pub trust_domain: TrustDomain,
    pub placement: Placement,
}

/// The last accepted version of each AgentPolicy, carried from one compilation to the next so
/// that an invalid edit never removes what was in force.
#[derive(Debug, Clone, Default)]
pub struct LastGood {
    policies: BTreeMap<ResourceRef, Accepted>,
}

#[derive(Debug, Clone)]
struct Accepted {
    policies: Vec<CompiledPolicy>,
    tools: Vec<ToolAttrs>,
}

/// The result of one compilation.
#[derive(Debug, Default)]
pub struct Compiled {
    pub bundles: BTreeMap<AgentKey, BundleContent>,
    pub diagnostics: Vec<Diagnostic>,
    pub last_good: LastGood,
    /// How many Cedar policies each accepted AgentPolicy compiled to.
    pub accepted: BTreeMap<ResourceRef, usize>,
}

impl Compiled {
    pub fn errors(&self) -> impl Iterator<Item = &Diagnostic> {
        self.diagnostics.iter().filter(|d| d.is_error())
    }
}

pub(crate) fn resource_ref(kind: &'static str, meta: &ObjectMeta) -> ResourceRef {
    ResourceRef {
        kind,
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
    }
}

/// Compiles `manifests` into bundles.
pub fn compile(manifests: &Manifests, settings: &Settings, previous: &LastGood) -> Compiled {
    let mut out = Compiled::default();
    let mut namespaces: BTreeMap<String, Namespace<'_>> = BTreeMap::new();

    for a in &manifests.agents {
        let r = resource_ref("Agent", &a.metadata);
        if let Some(problem) = check_agent(&r, a, &settings.placement) {
            out.diagnostics.push(problem);
            continue;
        }
        namespaces
            .entry(r.namespace.clone())
            .or_default()
            .agents
            .push(a);
    }
    for p in &manifests.policies {
        let r = resource_ref("AgentPolicy", &p.metadata);
        namespaces
            .entry(r.namespace.clone())
            .or_default()
            .policies
            .push(p);
    }
    for b in &manifests.budgets {
        let r = resource_ref("RunBudget", &b.metadata);
        namespaces
            .entry(r.namespace.clone())
            .or_default()
            .budgets
            .push(b);
    }

    for (ns, mut n) in namespaces {
        n.agents
            .sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        n.budgets
            .sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        compile_namespace(&ns, &n, settings, previous, &mut out);
    }

    for d in &mut out.diagnostics {
        d.origin = manifests.origins.get(&d.resource).cloned();
    }
    out
}

#[derive(Default)]
struct Namespace<'a> {
    agents: Vec<&'a Agent>,
    policies: Vec<&'a ringfence_crds::AgentPolicy>,
    budgets: Vec<&'a ringfence_crds::RunBudget>,
}

fn check_agent(r: &ResourceRef, a: &Agent, placement: &Placement) -> Option<Diagnostic> {
    if let Err(e) = validate_dns_label("namespace", &r.namespace) {
        return Some(Diagnostic::error(r, "metadata.namespace", e.to_string()));
    }
    if let Err(e) = validate_dns_label("agent name", &r.name) {
        return Some(Diagnostic::error(r, "metadata.name", e.to_string()));
    }
    if *placement == Placement::Local {
        let annotations = a.metadata.annotations.clone().unwrap_or_default();
        for key in [local::APP, local::OUTBOUND, local::INBOUND, local::ADMIN] {
            if let Some(v) = annotations.get(key)
                && v.parse::<std::net::SocketAddr>().is_err()
            {
                return Some(Diagnostic::error(
                    r,
                    format!("metadata.annotations[{key}]"),
                    format!("{v:?} is not an address: write <ip>:<port>, e.g. 127.0.0.1:9001"),
                ));
            }
        }
    }
    for (i, m) in a.spec.models.iter().enumerate() {
        if m.name.is_empty() || m.name.contains('/') {
            return Some(Diagnostic::error(
                r,
                format!("spec.models[{i}].name"),
                "a model provider needs a name without '/'",
            ));
        }
        if !(m.url.starts_with("http://") || m.url.starts_with("https://")) {
            return Some(Diagnostic::error(
                r,
                format!("spec.models[{i}].url"),
                format!("{:?} must be an http:// or https:// URL", m.url),
            ));
        }
    }
    for (i, m) in a.spec.models.iter().enumerate() {
        for (j, route) in m.fallbacks.iter().enumerate() {
            let field = format!("spec.models[{i}].fallbacks[{j}].provider");
            let Some(to) = a.spec.models.iter().find(|p| p.name == route.provider) else {
                return Some(Diagnostic::error(
                    r,
                    field,
                    format!(
                        "no provider named {:?} in spec.models: a fallback route names another provider of this agent",
                        route.provider
                    ),
                ));
            };
            if to.api != m.api {
                return Some(Diagnostic::error(
                    r,
                    field,
                    format!(
                        "provider {:?} speaks {:?} but {:?} speaks {:?}: a fallback must speak the same API",
                        to.name, to.api, m.name, m.api
                    ),
                ));
            }
            if to.name == m.name && route.model.is_none() {
                return Some(Diagnostic::error(
                    r,
                    field,
                    "a fallback to the same provider must name another model",
                ));
            }
        }
    }
    if a.spec.fallback.as_deref() == Some(r.name.as_str()) {
        return Some(Diagnostic::error(
            r,
            "spec.fallback",
            "an agent cannot be its own fallback",
        ));
    }
    for (i, t) in a.spec.tools.iter().enumerate() {
        if t.name.is_empty() || t.name.contains('/') {
            return Some(Diagnostic::error(
                r,
                format!("spec.tools[{i}].name"),
                "a tool server needs a name without '/'",
            ));
        }
        if !(t.url.starts_with("http://") || t.url.starts_with("https://")) {
            return Some(Diagnostic::error(
                r,
                format!("spec.tools[{i}].url"),
                format!("{:?} must be an http:// or https:// URL", t.url),
            ));
        }
    }
    None
}

fn compile_namespace(
    ns: &str,
    n: &Namespace<'_>,
    settings: &Settings,
    previous: &LastGood,
    out: &mut Compiled,
) {
    let known: BTreeSet<String> = n
        .agents
        .iter()
        .filter_map(|a| a.metadata.name.clone())
        .collect();

    // Policies: the new version when valid, else the last accepted one.
    let mut in_force: Vec<CompiledPolicy> = Vec::new();
    let mut tools: Vec<ToolAttrs> = Vec::new();
    for p in &n.policies {
        let r = resource_ref("AgentPolicy", &p.metadata);
        let outcome = policies::compile(&r, &p.spec, &known);
        out.diagnostics.extend(outcome.diagnostics);
        let accepted = match outcome.policies {
            Some(ps) => Accepted {
                policies: ps,
                tools: p
                    .spec
                    .tools
                    .iter()
                    .map(|t| ToolAttrs {
                        server: t.server.clone(),
                        tool: t.tool.clone(),
                        untrusted: t.untrusted,
                        sensitivity: t.sensitivity,
                    })
                    .collect(),
            },
            None => match previous.policies.get(&r) {
                Some(last) => {
                    out.diagnostics.push(Diagnostic::warning(&r, "spec", "keeping the last accepted version of this policy in force until the errors above are fixed"));
                    last.clone()
                }
                None => continue,
            },
        };
        out.accepted.insert(r.clone(), accepted.policies.len());
        in_force.extend(accepted.policies.iter().cloned());
        tools.extend(accepted.tools.iter().cloned());
        out.last_good.policies.insert(r, accepted);
    }
    // Agents that may start runs.
    for a in &n.agents {
        if a.spec.may_start_runs {
            let name = a.metadata.name.as_deref().unwrap_or_default();
            let rule = format!("{ns}/{name}/mayStartRuns");
            let text = format!(
                "@rule(\"{rule}\") permit (principal == Agent::\"{name}\", action == Action::\"start_run\", resource == Agent::\"{name}\");"
            );
            match cedar_policy::Policy::parse(Some(cedar_policy::PolicyId::new(&rule)), &text) {
                Ok(policy) => in_force.push(CompiledPolicy {
                    id: rule.clone(),
                    rule,
                    text,
                    policy,
                }),
                Err(e) => out.diagnostics.push(Diagnostic::error(
                    &resource_ref("Agent", &a.metadata),
                    "spec.mayStartRuns",
                    format!("internal: {e}"),
                )),
            }
        }
    }
    in_force.sort_by(|a, b| a.id.cmp(&b.id));
    tools.sort_by(|a, b| (&a.server, &a.tool).cmp(&(&b.server, &b.tool)));
    tools.dedup_by(|a, b| a.server == b.server && a.tool == b.tool);

    for a in &n.agents {
        if let Some(f) = &a.spec.fallback
            && !known.contains(f)
        {
            out.diagnostics.push(Diagnostic::unresolved(
                &resource_ref("Agent", &a.metadata),
                "spec.fallback",
                format!(
                    "no Agent named {f:?} in namespace {ns}; calls fall back to it once it exists"
                ),
            ));
        }
    }
    let selections = limits::selections(&n.budgets, &n.agents, &mut out.diagnostics);
    quota_warnings(&n.budgets, &n.agents, &selections, &mut out.diagnostics);
    let entities = entities::to_json(ns, &n.agents, &tools);
    let entries: Vec<AgentEntry> = n
        .agents
        .iter()
        .map(|a| agent_entry(ns, a, settings))
        .collect();

    for (a, entry) in n.agents.iter().zip(&entries) {
        let uid = agent_uid(&entry.name);
        let slice: Vec<PolicyEntry> = in_force
            .iter()
            .filter(|p| applies_to(&p.policy, &uid))
            .map(|p| PolicyEntry {
                id: p.id.clone(),
                rule: p.rule.clone(),
                text: p.text.clone(),
            })
            .collect();
        let budgets: Vec<&ringfence_crds::RunBudget> = n
            .budgets
            .iter()
            .copied()
            .filter(|b| {
                let r = limits::budget_ref(b);
                selections
                    .get(&r.name)
                    .is_some_and(|names| names.contains(&entry.name))
            })
            .collect();
        let content = BundleContent {
            trust_domain: settings.trust_domain.to_string(),
            agent: entry.clone(),
            peers: entries
                .iter()
                .filter(|e| e.name != entry.name)
                .cloned()
                .collect(),
            tool_servers: a
                .spec
                .tools
                .iter()
                .map(|t| ToolServerEntry {
                    name: t.name.clone(),
                    url: t.url.clone(),
                })
                .collect(),
            tools: tools.clone(),
            model_providers: a.spec.models.clone(),
            policy: PolicySlice {
                schema: schema::SCHEMA.to_owned(),
                policies: slice,
                entities: entities.clone(),
            },
            limits: limits::for_agent(a, &budgets),
        };
        let key = AgentKey {
            namespace: ns.to_owned(),
            name: entry.name.clone(),
        };
        out.bundles.insert(key, content);
    }
}

/// A per-team or per-environment quota does not count an agent that has no team or
/// environment: say so rather than let its spending go uncounted silently.
fn quota_warnings(
    budgets: &[&ringfence_crds::RunBudget],
    agents: &[&Agent],
    selections: &BTreeMap<String, Vec<String>>,
    out: &mut Vec<Diagnostic>,
) {
    for b in budgets {
        let r = limits::budget_ref(b);
        let Some(chosen) = selections.get(&r.name) else {
            continue;
        };
        for (i, q) in b.spec.quotas.iter().enumerate() {
            if q.max_total_tokens.is_none() && q.max_cost_usd.is_none() {
                out.push(Diagnostic::warning(
                    &r,
                    format!("spec.quotas[{i}]"),
                    "this quota sets neither maxTotalTokens nor maxCostUsd, so it limits nothing",
                ));
            }
            for a in agents {
                let name = a.metadata.name.as_deref().unwrap_or_default();
                if chosen.iter().any(|c| c == name)
                    && limits::quota_key(a, &r.name, q.per).is_none()
                {
                    out.push(Diagnostic::warning(
                        &r,
                        format!("spec.quotas[{i}].per"),
                        format!(
                            "Agent {name:?} has no {}, so this quota does not count its spending; set spec.{} on the Agent",
                            q.per.as_str(),
                            q.per.as_str()
                        ),
                    ));
                }
            }
        }
    }
}

fn agent_uid(name: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(
        "Agent"
            .parse()
            .unwrap_or_else(|_| unreachable!("schema type Agent")),
        cedar_policy::EntityId::new(name),
    )
}

fn agent_entry(ns: &str, a: &Agent, settings: &Settings) -> AgentEntry {
    let name = a.metadata.name.clone().unwrap_or_default();
    let annotations = a.metadata.annotations.clone().unwrap_or_default();
    let (inbound, app) = match &settings.placement {
        Placement::Local => (
            annotations.get(local::INBOUND).cloned(),
            annotations.get(local::APP).cloned(),
        ),
        Placement::Cluster {
            inbound_port,
            cluster_domain,
        } => (
            Some(format!("{name}.{ns}.svc.{cluster_domain}:{inbound_port}")),
            Some(format!("127.0.0.1:{}", a.spec.app_port)),
        ),
    };
    AgentEntry {
        spiffe_id: SpiffeId::new(
            settings.trust_domain.clone(),
            AgentKey {
                namespace: ns.to_owned(),
                name: name.clone(),
            },
        ),
        name,
        namespace: ns.to_owned(),
        team: a.spec.team.clone(),
        environment: a.spec.environment.clone(),
        trust: a.spec.trust,
        may_start_runs: a.spec.may_start_runs,
        inbound,
        app,
        fallback: a.spec.fallback.clone(),
    }
}

/// Whether a policy can match a request in which `agent` is the principal or the resource.
/// Agents have no parents, so `in` reads like `==`.
pub fn applies_to(policy: &cedar_policy::Policy, agent: &EntityUid) -> bool {
    let principal = match policy.principal_constraint() {
        PrincipalConstraint::Any => true,
        PrincipalConstraint::Eq(u) | PrincipalConstraint::In(u) => &u == agent,
        PrincipalConstraint::Is(t) => &t == agent.type_name(),
        PrincipalConstraint::IsIn(t, u) => &t == agent.type_name() && &u == agent,
    };
    let resource = match policy.resource_constraint() {
        ResourceConstraint::Any => true,
        ResourceConstraint::Eq(u) | ResourceConstraint::In(u) => &u == agent,
        ResourceConstraint::Is(t) => &t == agent.type_name(),
        ResourceConstraint::IsIn(t, u) => &t == agent.type_name() && &u == agent,
    };
    principal || resource
}

#[cfg(test)]
mod tests;
