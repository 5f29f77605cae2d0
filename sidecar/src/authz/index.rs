//! The structured edges of a slice as a direct lookup, so that most decisions need no Cedar.
//!
//! The compiler turns every AgentPolicy `allow`/`deny` edge into a Cedar policy of one of these
//! shapes (see `operator/src/compile/policies.rs`):
//!
//! ```text
//! permit|forbid (principal [== Agent::"a"], action == Action::"x", resource == T::"id");
//! permit|forbid (principal [== Agent::"a"], action == Action::"x", resource is T);
//! permit|forbid (principal [== Agent::"a"], action == Action::"x", resource is Tool)
//!     when { resource.server == "s" };                 // and Model / resource.provider
//! ```
//!
//! Such a policy needs no entity attribute but `server`/`provider`, cannot fail to evaluate,
//! and matches by string comparison: [`ActionIndex`] files it under its principal. Every other
//! policy — free-form Cedar, or an edge whose shape is not recognised here — stays a Cedar
//! policy, evaluated as before. Recognition works on the parsed policy, never on its text, so a
//! hand-written policy of the same shape takes the fast path too; anything in doubt goes to
//! Cedar, which is never wrong, only slower. A property test holds the two paths equal.

use std::collections::HashMap;
use std::sync::Arc;

use cedar_policy::{
    ActionConstraint, Effect, Entities, Entity, EntityUid, EvalResult, Policy, PolicySet,
    PrincipalConstraint, ResourceConstraint,
};
use serde_json::Value;

use super::{Action, AuthzError, Resource};

/// The entity types a request can name as its resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Kind {
    Agent,
    Tool,
    Model,
}

impl Kind {
    fn of_type(name: &str) -> Option<Kind> {
        match name {
            "Agent" => Some(Kind::Agent),
            "Tool" => Some(Kind::Tool),
            "Model" => Some(Kind::Model),
            _ => None,
        }
    }

    /// The attribute a group edge compares: tools of a server, models of a provider.
    fn group_attr(self) -> Option<&'static str> {
        match self {
            Kind::Agent => None,
            Kind::Tool => Some("server"),
            Kind::Model => Some("provider"),
        }
    }
}

/// What a structured edge matches on the resource side.
#[derive(Debug)]
enum Target {
    /// `resource` unconstrained.
    All,
    /// `resource is <kind>`.
    Kind(Kind),
    /// `resource == <kind>::"<id>"`.
    Exact(Kind, Box<str>),
    /// `resource is <kind> when { resource.<group attr> == "<value>" }`.
    Group(Kind, Box<str>),
}

#[derive(Debug)]
struct Edge {
    forbid: bool,
    target: Target,
    rule: Arc<str>,
}

/// The resource of one request, as the index compares it.
pub(super) struct Subject<'a> {
    pub kind: Kind,
    pub resource: Resource<'a>,
    /// The value of the group attribute (`server`/`provider`): the listed entity's, or for a
    /// resource the entities do not list, the one the sidecar gives it. `None` when the listed
    /// attribute is not a string (then `==` on it is false).
    pub group: Option<&'a str>,
}

impl Subject<'_> {
    fn id_is(&self, id: &str) -> bool {
        match self.resource {
            Resource::Agent(name) => id == name,
            Resource::Tool { server, tool: name }
            | Resource::Model {
                provider: server,
                model: name,
            } => {
                // `<group>/<name>` compared without building the string.
                id.len() == server.len() + 1 + name.len()
                    && id.starts_with(server)
                    && id.as_bytes()[server.len()] == b'/'
                    && id.ends_with(name)
            }
        }
    }
}

impl Edge {
    fn matches(&self, subject: &Subject<'_>) -> bool {
        match &self.target {
            Target::All => true,
            Target::Kind(k) => *k == subject.kind,
            Target::Exact(k, id) => *k == subject.kind && subject.id_is(id),
            Target::Group(k, value) => *k == subject.kind && subject.group == Some(&**value),
        }
    }
}

/// The policies of one action: structured edges by principal, the rest for Cedar.
#[derive(Default)]
pub(super) struct ActionIndex {
    by_principal: HashMap<Box<str>, Vec<Edge>>,
    any_principal: Vec<Edge>,
    /// Policies the index cannot express.
    pub residual: PolicySet,
    /// Entities of the store that residual policies name literally: with the principal and
    /// the resource, all a residual policy can read (see [`Slicing`]).
    pub literals: Vec<Entity>,
}

/// The structured edges that matched one request.
#[derive(Debug, Default)]
pub(super) struct Matches {
    pub permits: Vec<Arc<str>>,
    pub forbids: Vec<Arc<str>>,
}

impl ActionIndex {
    pub fn matches(&self, principal: &str, subject: &Subject<'_>) -> Matches {
        let mut out = Matches::default();
        let own = self.by_principal.get(principal).map(Vec::as_slice);
        for edge in own.unwrap_or_default().iter().chain(&self.any_principal) {
            if edge.matches(subject) {
                let list = if edge.forbid {
                    &mut out.forbids
                } else {
                    &mut out.permits
                };
                list.push(edge.rule.clone());
            }
        }
        out
    }

    #[cfg(test)]
    pub fn edge_count(&self) -> usize {
        self.any_principal.len() + self.by_principal.values().map(Vec::len).sum::<usize>()
    }
}

/// Which group edges the index may take: a group edge reads one attribute of the resource, and
/// when a listed entity of that kind lacks it (Cedar would raise an error) the edge stays Cedar.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct GroupSafety {
    pub tool: bool,
    pub model: bool,
}

/// The group attribute (`server`, `provider`) of each listed tool and model, by kind and id.
pub(super) type Listed = HashMap<(Kind, Box<str>), Option<Box<str>>>;

/// The group attribute of every listed tool and model (`None`: present but not a string), and
/// whether group edges may be indexed.
pub(super) fn listed_groups(entities: &Entities) -> (Listed, GroupSafety) {
    let mut listed = HashMap::new();
    let mut safety = GroupSafety {
        tool: true,
        model: true,
    };
    for entity in entities.iter() {
        let uid = entity.uid();
        let Some(kind) = Kind::of_type(&uid.type_name().to_string()) else {
            continue;
        };
        let Some(attr) = kind.group_attr() else {
            continue;
        };
        let value = match entity.attr(attr) {
            Some(Ok(EvalResult::String(s))) => Some(Box::<str>::from(s)),
            Some(Ok(_)) => None,
            None | Some(Err(_)) => {
                match kind {
                    Kind::Tool => safety.tool = false,
                    Kind::Model => safety.model = false,
                    Kind::Agent => {}
                }
                None
            }
        };
        listed.insert((kind, Box::<str>::from(uid.id().unescaped())), value);
    }
    (listed, safety)
}

/// Files every policy of `policies` under its action, as an edge when it has a recognised
/// shape, otherwise as a residual Cedar policy. `rule_of` names a policy's rule.
pub(super) fn build(
    policies: &PolicySet,
    actions: &[EntityUid; 4],
    safety: GroupSafety,
    entities: &Entities,
    rule_of: impl Fn(&Policy) -> Arc<str>,
) -> Result<[ActionIndex; 4], AuthzError> {
    let mut index: [ActionIndex; 4] = Default::default();
    for policy in policies.policies() {
        if let Some((action, edge)) = as_edge(policy, actions, safety, &rule_of) {
            let slot = &mut index[action.index()];
            match edge {
                (None, edge) => slot.any_principal.push(edge),
                (Some(principal), edge) => {
                    slot.by_principal.entry(principal).or_default().push(edge)
                }
            }
            continue;
        }
        let applies = super::actions_of(policy, actions);
        for (slot, applies) in index.iter_mut().zip(applies) {
            if applies {
                slot.residual
                    .add(policy.clone())
                    .map_err(|e| AuthzError::PolicySet {
                        id: policy.id().to_string(),
                        rule: rule_of(policy).to_string(),
                        message: e.to_string(),
                    })?;
            }
        }
    }
    for slot in &mut index {
        let mut uids = Vec::new();
        for policy in slot.residual.policies() {
            if let Ok(json) = policy.to_json() {
                literal_uids(&json, &mut uids);
            }
        }
        for uid in uids {
            if let Some(entity) = entities.get(&uid)
                && !slot.literals.iter().any(|e| e.uid() == uid)
            {
                slot.literals.push(entity.clone());
            }
        }
    }
    Ok(index)
}

type Filed = (Action, (Option<Box<str>>, Edge));

/// The edge a policy is, if it has one of the shapes of the module doc.
fn as_edge(
    policy: &Policy,
    actions: &[EntityUid; 4],
    safety: GroupSafety,
    rule_of: &impl Fn(&Policy) -> Arc<str>,
) -> Option<Filed> {
    let forbid = match policy.effect() {
        Effect::Permit => false,
        Effect::Forbid => true,
    };
    let principal = match policy.principal_constraint() {
        PrincipalConstraint::Any => None,
        PrincipalConstraint::Eq(uid) if uid.type_name().to_string() == "Agent" => {
            Some(Box::<str>::from(uid.id().unescaped()))
        }
        _ => return None,
    };
    let action = match policy.action_constraint() {
        ActionConstraint::Eq(uid) => {
            let i = actions.iter().position(|a| *a == uid)?;
            Action::ALL[i]
        }
        _ => return None,
    };
    let json = policy.to_json().ok()?;
    let conditions = json.get("conditions")?.as_array()?;
    let target = match (policy.resource_constraint(), conditions.as_slice()) {
        (ResourceConstraint::Any, []) => Target::All,
        (ResourceConstraint::Is(ty), []) => Target::Kind(Kind::of_type(&ty.to_string())?),
        (ResourceConstraint::Eq(uid), []) => Target::Exact(
            Kind::of_type(&uid.type_name().to_string())?,
            uid.id().unescaped().into(),
        ),
        (ResourceConstraint::Is(ty), [clause]) => {
            let kind = Kind::of_type(&ty.to_string())?;
            let safe = match kind {
                Kind::Agent => false,
                Kind::Tool => safety.tool,
                Kind::Model => safety.model,
            };
            if !safe {
                return None;
            }
            let value = group_condition(clause, kind.group_attr()?)?;
            Target::Group(kind, value.into())
        }
        _ => return None,
    };
    let edge = Edge {
        forbid,
        target,
        rule: rule_of(policy),
    };
    Some((action, (principal, edge)))
}

/// `when { resource.<attr> == "<value>" }` in Cedar's JSON policy format → `value`.
fn group_condition<'a>(clause: &'a Value, attr: &str) -> Option<&'a str> {
    if clause.get("kind")?.as_str()? != "when" {
        return None;
    }
    let eq = clause.get("body")?.as_object()?;
    if eq.len() != 1 {
        return None;
    }
    let eq = eq.get("==")?;
    let left = eq.get("left")?.get(".")?;
    if left.get("left")?.get("Var")?.as_str()? != "resource" || left.get("attr")?.as_str()? != attr
    {
        return None;
    }
    eq.get("right")?.get("Value")?.as_str()
}

/// Every entity uid a policy's JSON names: `{"type": …, "id": …}` objects, whether in a scope
/// or as an `__entity` literal. Taking too many is harmless (only listed ones are kept).
fn literal_uids(json: &Value, out: &mut Vec<EntityUid>) {
    match json {
        Value::Object(map) => {
            if let (Some(Value::String(ty)), Some(Value::String(_))) =
                (map.get("type"), map.get("id"))
                && let Ok(uid) = EntityUid::from_json(json.clone())
                && !ty.is_empty()
            {
                out.push(uid);
            }
            for v in map.values() {
                literal_uids(v, out);
            }
        }
        Value::Array(items) => {
            for v in items {
                literal_uids(v, out);
            }
        }
        _ => {}
    }
}

/// Whether residual policies may be evaluated on a small per-request store instead of the
/// bundle's: true when no entity has parents or an attribute holding anything but a string, a
/// number or a boolean. Then a policy can read only the principal, the resource, the action
/// and entities it names literally (Cedar cannot take an element out of `context.path`), and a
/// store of just those decides exactly like the whole one.
pub(super) fn sliceable(entities_json: &Value) -> bool {
    let Some(list) = entities_json.as_array() else {
        return false;
    };
    list.iter().all(|e| {
        let parents_empty = match e.get("parents") {
            None => true,
            Some(Value::Array(p)) => p.is_empty(),
            Some(_) => false,
        };
        let attrs_scalar = match e.get("attrs") {
            None => true,
            Some(Value::Object(attrs)) => attrs
                .values()
                .all(|v| matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_))),
            Some(_) => false,
        };
        let no_tags = e.get("tags").is_none_or(|t| match t {
            Value::Object(tags) => tags.is_empty(),
            _ => false,
        });
        parents_empty && attrs_scalar && no_tags
    })
}
