//! One AgentPolicy → Cedar policies with stable ids and the rule names people wrote.
//!
//! Structured edges compile to one Cedar policy per (caller, target) pair, with both ends in the
//! scope, so that each sidecar's slice holds only the edges that touch its agent. Cedar text is
//! parsed policy by policy; `@id("…")` annotations name rules. Everything is validated strictly
//! against the schema; any error rejects the whole AgentPolicy (its last good version stays).

use std::collections::BTreeSet;
use std::str::FromStr;

use cedar_policy::{
    EntityId, EntityTypeName, EntityUid, Policy, PolicyId, PolicySet, ValidationMode, Validator,
};
use ringfence_crds::policy::{AgentPolicySpec, EdgeRule};
use ringfence_crds::spiffe::validate_dns_label;

use super::diagnostic::{Diagnostic, ResourceRef};
use super::schema;

/// A Cedar policy ready for a bundle.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub id: String,
    pub rule: String,
    pub text: String,
    pub policy: Policy,
}

/// What compiling one AgentPolicy produced.
#[derive(Debug, Default)]
pub struct Outcome {
    /// `Some` when the policy is valid.
    pub policies: Option<Vec<CompiledPolicy>>,
    pub diagnostics: Vec<Diagnostic>,
}

/// Compiles one AgentPolicy. `known_agents` are the agent names of its namespace (references
/// to others are warnings: they may be applied later).
pub fn compile(
    resource: &ResourceRef,
    spec: &AgentPolicySpec,
    known_agents: &BTreeSet<String>,
) -> Outcome {
    let mut out = Outcome::default();
    let prefix = format!("{}/{}", resource.namespace, resource.name);
    let mut policies = Vec::new();

    for (field, rules, effect) in [
        ("allow", &spec.allow, "permit"),
        ("deny", &spec.deny, "forbid"),
    ] {
        for (i, rule) in rules.iter().enumerate() {
            let rule_name = format!("{prefix}/{field}[{i}]");
            let field = format!("spec.{field}[{i}]");
            match edge_policies(
                resource,
                &field,
                rule,
                effect,
                &rule_name,
                known_agents,
                &mut out.diagnostics,
            ) {
                Some(mut ps) => policies.append(&mut ps),
                None => continue,
            }
        }
    }

    for (i, t) in spec.tools.iter().enumerate() {
        let field = format!("spec.tools[{i}]");
        if let Err(msg) = check_name("tool server", &t.server) {
            out.diagnostics
                .push(Diagnostic::error(resource, format!("{field}.server"), msg));
        }
        if let Some(tool) = &t.tool
            && let Err(msg) = check_name("tool", tool)
        {
            out.diagnostics
                .push(Diagnostic::error(resource, format!("{field}.tool"), msg));
        }
    }

    if let Some(text) = &spec.cedar {
        cedar_text_policies(resource, text, &prefix, &mut policies, &mut out.diagnostics);
    }

    if out.diagnostics.iter().any(Diagnostic::is_error) {
        return out;
    }
    validate(
        resource,
        spec.cedar.as_deref().unwrap_or_default(),
        &policies,
        &mut out.diagnostics,
    );
    if !out.diagnostics.iter().any(Diagnostic::is_error) {
        out.policies = Some(policies);
    }
    out
}

/// Tool, server, provider and model names: printable, no `/`, no quotes.
fn check_name(what: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} name {s:?} is invalid: use letters, digits, '-', '_', '.' or ':'"
        ))
    }
}

fn uid(type_name: &str, id: &str) -> EntityUid {
    // Type names are our schema's constants; ids are arbitrary strings, escaped by Display.
    let ty = EntityTypeName::from_str(type_name)
        .unwrap_or_else(|_| unreachable!("schema type {type_name}"));
    EntityUid::from_type_name_and_id(ty, EntityId::new(id))
}

enum Target {
    Any(&'static str),
    Exact(EntityUid),
    /// Every tool of a server / model of a provider.
    Group {
        ty: &'static str,
        attr: &'static str,
        value: String,
    },
}

/// The policies of one structured rule, or `None` (with diagnostics) when it is malformed.
fn edge_policies(
    resource: &ResourceRef,
    field: &str,
    rule: &EdgeRule,
    effect: &str,
    rule_name: &str,
    known_agents: &BTreeSet<String>,
    diags: &mut Vec<Diagnostic>,
) -> Option<Vec<CompiledPolicy>> {
    let before = diags.len();
    if rule.from.is_empty() {
        diags.push(Diagnostic::error(
            resource,
            format!("{field}.from"),
            "name at least one calling agent, or \"*\" for any",
        ));
    }
    if rule.agents.is_empty() && rule.tools.is_empty() && rule.models.is_empty() {
        diags.push(Diagnostic::error(
            resource,
            field,
            "name at least one target in agents, tools or models",
        ));
    }
    let agent_ref = |list: &str,
                     i: usize,
                     s: &str,
                     diags: &mut Vec<Diagnostic>|
     -> Option<Option<String>> {
        if s == "*" {
            return Some(None);
        }
        let name = match s.split_once('/') {
            Some((ns, name)) if ns == resource.namespace => name,
            Some(_) => {
                diags.push(Diagnostic::error(resource, format!("{field}.{list}[{i}]"), format!(
                    "{s:?} names an agent in another namespace; a policy governs agents of its own namespace ({})",
                    resource.namespace
                )));
                return None;
            }
            None => s,
        };
        if let Err(e) = validate_dns_label("agent name", name) {
            diags.push(Diagnostic::error(
                resource,
                format!("{field}.{list}[{i}]"),
                e.to_string(),
            ));
            return None;
        }
        if !known_agents.contains(name) {
            diags.push(Diagnostic::unresolved(
                resource,
                format!("{field}.{list}[{i}]"),
                format!(
                    "no Agent named {name:?} in namespace {}; the rule applies once it exists",
                    resource.namespace
                ),
            ));
        }
        Some(Some(name.to_owned()))
    };

    let mut callers = Vec::new();
    for (i, s) in rule.from.iter().enumerate() {
        if let Some(a) = agent_ref("from", i, s, diags) {
            callers.push(a);
        }
    }
    let mut targets: Vec<(&'static str, Target, String)> = Vec::new();
    for (i, s) in rule.agents.iter().enumerate() {
        if let Some(a) = agent_ref("agents", i, s, diags) {
            let t = match &a {
                None => Target::Any("Agent"),
                Some(name) => Target::Exact(uid("Agent", name)),
            };
            targets.push(("invoke", t, a.unwrap_or_else(|| "*".into())));
        }
    }
    for (list, action, ty, attr, what, items) in [
        ("tools", "call_tool", "Tool", "server", "tool", &rule.tools),
        (
            "models",
            "call_model",
            "Model",
            "provider",
            "model",
            &rule.models,
        ),
    ] {
        for (i, s) in items.iter().enumerate() {
            let f = format!("{field}.{list}[{i}]");
            let Some((group, name)) = s.split_once('/') else {
                diags.push(Diagnostic::error(
                    resource,
                    f,
                    format!("{s:?} must be <{attr}>/<{what}> or <{attr}>/*"),
                ));
                continue;
            };
            if let Err(m) = check_name(attr, group) {
                diags.push(Diagnostic::error(resource, f, m));
                continue;
            }
            let t = if name == "*" {
                Target::Group {
                    ty,
                    attr,
                    value: group.to_owned(),
                }
            } else if let Err(m) = check_name(what, name) {
                diags.push(Diagnostic::error(resource, f, m));
                continue;
            } else {
                Target::Exact(uid(ty, s))
            };
            targets.push((action, t, s.clone()));
        }
    }
    if diags[before..].iter().any(Diagnostic::is_error) {
        return None;
    }

    let mut out = Vec::new();
    for caller in &callers {
        for (action, target, target_name) in &targets {
            let principal = match caller {
                None => "principal".to_owned(),
                Some(name) => format!("principal == {}", uid("Agent", name)),
            };
            let (resource_scope, when) = match target {
                Target::Any(ty) => (format!("resource is {ty}"), String::new()),
                Target::Exact(u) => (format!("resource == {u}"), String::new()),
                Target::Group { ty, attr, value } => (
                    format!("resource is {ty}"),
                    format!(" when {{ resource.{attr} == {} }}", cedar_string(value)),
                ),
            };
            let caller_name = caller.as_deref().unwrap_or("*");
            let id = format!("{rule_name}:{caller_name}->{target_name}");
            let text = format!(
                "@rule({}) {effect} ({principal}, action == Action::\"{action}\", {resource_scope}){when};",
                cedar_string(rule_name)
            );
            match Policy::parse(Some(PolicyId::new(&id)), &text) {
                Ok(policy) => out.push(CompiledPolicy {
                    id,
                    rule: rule_name.to_owned(),
                    text,
                    policy,
                }),
                Err(e) => diags.push(Diagnostic::error(
                    resource,
                    field,
                    format!("internal: generated Cedar does not parse ({e}): {text}"),
                )),
            }
        }
    }
    Some(out)
}

/// A Cedar string literal.
fn cedar_string(s: &str) -> String {
    // Cedar string escapes are Rust's `escape_debug` set.
    format!("\"{}\"", s.escape_debug())
}

/// Parses Cedar text policy by policy; templates are refused.
fn cedar_text_policies(
    resource: &ResourceRef,
    text: &str,
    prefix: &str,
    out: &mut Vec<CompiledPolicy>,
    diags: &mut Vec<Diagnostic>,
) {
    let set = match PolicySet::from_str(text) {
        Ok(set) => set,
        Err(e) => {
            diags.push(Diagnostic::from_cedar(
                resource,
                "spec.cedar",
                text,
                &e,
                "Cedar does not parse: ",
            ));
            return;
        }
    };
    if let Some(t) = set.templates().next() {
        diags.push(Diagnostic::error(
            resource,
            "spec.cedar",
            format!("policy {} is a template (it has ?principal or ?resource slots); write static policies", t.id()),
        ));
        return;
    }
    // Cedar names parsed policies policy0, policy1, … in source order.
    let mut parsed: Vec<&Policy> = set.policies().collect();
    parsed.sort_by_key(|p| {
        p.id()
            .to_string()
            .trim_start_matches("policy")
            .parse::<usize>()
            .unwrap_or(usize::MAX)
    });
    let mut seen = BTreeSet::new();
    for (i, p) in parsed.into_iter().enumerate() {
        let local = p
            .annotation("id")
            .map_or_else(|| format!("cedar[{i}]"), str::to_owned);
        if !seen.insert(local.clone()) {
            diags.push(Diagnostic::error(
                resource,
                "spec.cedar",
                format!("two policies carry @id({local:?}); ids must be unique"),
            ));
            continue;
        }
        let id = format!("{prefix}/{local}");
        out.push(CompiledPolicy {
            rule: id.clone(),
            text: p.to_cedar().unwrap_or_else(|| p.to_string()),
            policy: p.new_id(PolicyId::new(&id)),
            id,
        });
    }
}

/// Strict validation against the schema. Locations point into the `spec.cedar` text.
fn validate(
    resource: &ResourceRef,
    cedar_text: &str,
    policies: &[CompiledPolicy],
    diags: &mut Vec<Diagnostic>,
) {
    let mut set = PolicySet::new();
    for p in policies {
        if let Err(e) = set.add(p.policy.clone()) {
            diags.push(Diagnostic::error(
                resource,
                "spec",
                format!("policy {}: {e}", p.id),
            ));
        }
    }
    let result = Validator::new(schema::PARSED.clone()).validate(&set, ValidationMode::Strict);
    for e in result.validation_errors() {
        let id = e.policy_id().to_string();
        let from_text = policies.iter().any(|p| p.id == id && !p.id.contains(':'));
        let (field, source) = if from_text {
            ("spec.cedar", cedar_text)
        } else {
            ("spec", "")
        };
        // Cedar's message already names the policy.
        let mut d = Diagnostic::from_cedar(resource, field, source, e, "");
        if !from_text {
            d.location = None;
        }
        diags.push(d);
    }
}
