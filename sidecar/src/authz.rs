//! One Cedar decision.
//!
//! An [`Authorizer`] is built once per bundle from its [`PolicySlice`]: the schema is parsed,
//! every policy is parsed under its own id and the whole set is validated strictly against the
//! schema, and the entities are loaded with the schema. Building fails — and the bundle is
//! rejected, the previous one staying in force — when any of that does not hold.
//!
//! [`Authorizer::decide`] is pure and does no parsing: it turns a [`CallRequest`] into a Cedar
//! request, evaluates it and explains the outcome with the rule names people wrote
//! (`<namespace>/<AgentPolicy>/<rule>`). Cedar skips a policy whose evaluation fails; we do not:
//! an evaluation error in any policy is a deny that names that policy's rule, so a broken
//! `forbid` can never turn into an allow.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use cedar_policy::{
    ActionConstraint, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, Policy,
    PolicyId, PolicySet, Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use ringfence_crds::bundle::{PolicySlice, ToolAttrs};

/// Why a policy slice cannot be enforced. Each message names what to look at.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error(
        "the bundle's Cedar schema does not parse: {0}; the control plane compiled it, so check that operator and sidecar versions match"
    )]
    Schema(String),
    #[error("policy {id:?} (rule {rule}) does not parse as one Cedar policy: {message}")]
    Policy {
        id: String,
        rule: String,
        message: String,
    },
    #[error("policy {id:?} (rule {rule}) cannot join the policy set: {message}")]
    PolicySet {
        id: String,
        rule: String,
        message: String,
    },
    #[error("the policies do not validate against the bundle's schema: {0}")]
    Validation(String),
    #[error("the bundle's Cedar entities do not conform to its schema: {0}")]
    Entities(String),
    #[error("internal Cedar name {0:?} does not parse; this is a sidecar bug")]
    Name(String),
}

/// The four things an agent can be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Call another agent (A2A).
    Invoke,
    /// Call a tool on an MCP server.
    CallTool,
    /// Call an LLM.
    CallModel,
    /// Start a new run (principal and resource are the same agent).
    StartRun,
}

impl Action {
    pub const ALL: [Action; 4] = [
        Action::Invoke,
        Action::CallTool,
        Action::CallModel,
        Action::StartRun,
    ];

    /// The Cedar action id.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Invoke => "invoke",
            Action::CallTool => "call_tool",
            Action::CallModel => "call_model",
            Action::StartRun => "start_run",
        }
    }

    fn index(self) -> usize {
        match self {
            Action::Invoke => 0,
            Action::CallTool => 1,
            Action::CallModel => 2,
            Action::StartRun => 3,
        }
    }
}

/// What is being called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// An agent of the namespace, by name.
    Agent(&'a str),
    /// `Tool::"<server>/<tool>"`.
    Tool { server: &'a str, tool: &'a str },
    /// `Model::"<provider>/<model>"`.
    Model { provider: &'a str, model: &'a str },
}

impl fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Agent(name) => write!(f, "agent:{name}"),
            Resource::Tool { server, tool } => write!(f, "tool:{server}/{tool}"),
            Resource::Model { provider, model } => write!(f, "model:{provider}/{model}"),
        }
    }
}

/// The call context as Cedar sees it (`type Call` in the schema).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallContext {
    pub run: String,
    /// The human principal, e.g. `user:tomas`; empty when none.
    pub user: String,
    pub depth: u32,
    /// Agent names on the way here, root first.
    pub path: Vec<String>,
    /// How many times the callee already appears on the path.
    pub revisits: u32,
    /// Sources of untrusted content that reached this branch; `tainted` is "any".
    pub taint: Vec<String>,
}

impl CallContext {
    /// Cedar's view of a call made in `ctx`: with the branch's `taint`, at `depth`, where the
    /// callee is already `revisits` times on the path.
    pub fn of(
        ctx: &crate::context::RunContext,
        taint: Vec<String>,
        depth: u32,
        revisits: u32,
    ) -> Self {
        Self {
            run: ctx.run.clone(),
            user: ctx.user.clone(),
            depth,
            path: ctx.path.clone(),
            revisits,
            taint,
        }
    }
}

/// One question: may `principal` do `action` on `resource` in `context`?
#[derive(Debug, Clone, Copy)]
pub struct CallRequest<'a> {
    /// The calling agent's name (within the bundle's namespace).
    pub principal: &'a str,
    pub action: Action,
    pub resource: Resource<'a>,
    pub context: &'a CallContext,
}

/// What settled a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Basis {
    /// At least one permit matched and no forbid did.
    Permit,
    /// A forbid matched.
    Forbid,
    /// Nothing permits the call.
    DefaultDeny,
    /// A policy failed to evaluate; treated as a deny.
    EvaluationError,
    /// The request could not be put to Cedar at all.
    InvalidRequest,
}

/// The answer, with the rules that determined it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub basis: Basis,
    /// Rule names (`PolicyEntry.rule`) of the policies that determined the decision: the
    /// permits for an allow, the forbids for a deny, the failing policies for an error.
    pub rules: Vec<Arc<str>>,
    /// Evaluation or request errors, for logs; empty otherwise.
    pub errors: Vec<String>,
}

impl Decision {
    fn deny(basis: Basis, rules: Vec<Arc<str>>, errors: Vec<String>) -> Self {
        Self {
            allowed: false,
            basis,
            rules,
            errors,
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rules = self.rules.join(", ");
        match self.basis {
            Basis::Permit => write!(f, "allowed by {rules}"),
            Basis::Forbid => write!(f, "denied by {rules}"),
            Basis::DefaultDeny => f.write_str("denied: no policy permits this call (default deny)"),
            Basis::EvaluationError => write!(
                f,
                "denied: {rules} failed to evaluate ({}); an evaluation error is a deny",
                self.errors.join("; ")
            ),
            Basis::InvalidRequest => {
                write!(f, "denied: invalid request ({})", self.errors.join("; "))
            }
        }
    }
}

/// Attributes a tool entity gets when the entities do not list it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ToolDefaults {
    untrusted: bool,
    sensitivity: &'static str,
}

impl ToolDefaults {
    const NONE: ToolDefaults = ToolDefaults {
        untrusted: false,
        sensitivity: "low",
    };

    fn of(attrs: &ToolAttrs) -> Self {
        Self {
            untrusted: attrs.untrusted,
            sensitivity: attrs.sensitivity.as_str(),
        }
    }
}

#[derive(Debug, Default)]
struct ServerTools {
    server: Option<ToolDefaults>,
    tools: HashMap<String, ToolDefaults>,
}

/// A compiled policy slice, ready to decide.
pub struct Authorizer {
    /// The policies that can apply to each action (indexed by [`Action::index`]): Cedar
    /// evaluates every policy of a set on every request, and a policy scoped to another action
    /// can never match, so it is left out of that action's set.
    by_action: [PolicySet; 4],
    entities: Entities,
    rules: HashMap<PolicyId, Arc<str>>,
    actions: [EntityUid; 4],
    agent_type: EntityTypeName,
    tool_type: EntityTypeName,
    model_type: EntityTypeName,
    tools: HashMap<String, ServerTools>,
    cedar: cedar_policy::Authorizer,
}

impl fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authorizer")
            .field("policies", &self.rules.len())
            .finish_non_exhaustive()
    }
}

/// Splits a validated set into one set per action. A policy goes to every action its scope
/// admits; a scope naming anything but our four actions (an action group some day) goes
/// everywhere, which is never wrong, only slower.
fn partition_by_action(
    all: &PolicySet,
    actions: &[EntityUid; 4],
) -> Result<[PolicySet; 4], AuthzError> {
    let mut sets: [PolicySet; 4] = Default::default();
    for policy in all.policies() {
        let applies: [bool; 4] = match policy.action_constraint() {
            ActionConstraint::Any => [true; 4],
            ActionConstraint::Eq(uid) if actions.contains(&uid) => {
                actions.each_ref().map(|a| *a == uid)
            }
            ActionConstraint::In(uids) if uids.iter().all(|u| actions.contains(u)) => {
                actions.each_ref().map(|a| uids.contains(a))
            }
            ActionConstraint::Eq(_) | ActionConstraint::In(_) => [true; 4],
        };
        for (set, applies) in sets.iter_mut().zip(applies) {
            if applies {
                set.add(policy.clone()).map_err(|e| AuthzError::PolicySet {
                    id: policy.id().to_string(),
                    rule: policy.id().to_string(),
                    message: e.to_string(),
                })?;
            }
        }
    }
    Ok(sets)
}

fn type_name(s: &str) -> Result<EntityTypeName, AuthzError> {
    EntityTypeName::from_str(s).map_err(|_| AuthzError::Name(s.to_owned()))
}

impl Authorizer {
    /// Parses, validates (strictly) and loads a policy slice and the tool attributes of its
    /// bundle. Fails on anything the control plane should never have sent.
    pub fn build(slice: &PolicySlice, tool_attrs: &[ToolAttrs]) -> Result<Self, AuthzError> {
        let (schema, _warnings) = Schema::from_cedarschema_str(&slice.schema)
            .map_err(|e| AuthzError::Schema(e.to_string()))?;

        let mut policies = PolicySet::new();
        let mut rules = HashMap::with_capacity(slice.policies.len());
        for entry in &slice.policies {
            let id = PolicyId::new(&entry.id);
            let policy =
                Policy::parse(Some(id.clone()), &entry.text).map_err(|e| AuthzError::Policy {
                    id: entry.id.clone(),
                    rule: entry.rule.clone(),
                    message: e.to_string(),
                })?;
            policies.add(policy).map_err(|e| AuthzError::PolicySet {
                id: entry.id.clone(),
                rule: entry.rule.clone(),
                message: e.to_string(),
            })?;
            rules.insert(id, Arc::<str>::from(entry.rule.as_str()));
        }

        let action_type = type_name("Action")?;
        let actions = Action::ALL.map(|a| {
            EntityUid::from_type_name_and_id(action_type.clone(), EntityId::new(a.as_str()))
        });

        let validation = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        if !validation.validation_passed() {
            let details: Vec<String> = validation
                .validation_errors()
                .map(|e| {
                    let id = e.policy_id();
                    match rules.get(id) {
                        Some(rule) => format!("rule {rule} (policy {id}): {e}"),
                        None => format!("policy {id}: {e}"),
                    }
                })
                .collect();
            return Err(AuthzError::Validation(details.join("; ")));
        }

        let entities = Entities::from_json_value(slice.entities.clone(), Some(&schema))
            .map_err(|e| AuthzError::Entities(e.to_string()))?;

        let mut tools: HashMap<String, ServerTools> = HashMap::new();
        for attrs in tool_attrs {
            let server = tools.entry(attrs.server.clone()).or_default();
            match &attrs.tool {
                None => server.server = Some(ToolDefaults::of(attrs)),
                Some(tool) => {
                    server.tools.insert(tool.clone(), ToolDefaults::of(attrs));
                }
            }
        }

        let by_action = partition_by_action(&policies, &actions)?;
        let mut authorizer = Self {
            by_action,
            entities,
            rules,
            actions,
            agent_type: type_name("Agent")?,
            tool_type: type_name("Tool")?,
            model_type: type_name("Model")?,
            tools,
            cedar: cedar_policy::Authorizer::new(),
        };

        // Tools named in the bundle's attributes but absent from its entities are created now,
        // once, so that deciding on them takes the fast path.
        let mut missing = Vec::new();
        for (server, tools) in &authorizer.tools {
            for tool in tools.tools.keys() {
                let uid = authorizer.tool_uid(server, tool);
                if authorizer.entities.get(&uid).is_none() {
                    missing.push(authorizer.tool_entity(uid, server, tool)?);
                }
            }
        }
        if !missing.is_empty() {
            authorizer.entities = authorizer
                .entities
                .add_entities(missing, Some(&schema))
                .map_err(|e| AuthzError::Entities(e.to_string()))?;
        }
        Ok(authorizer)
    }

    /// How many policies are enforced.
    pub fn policy_count(&self) -> usize {
        self.rules.len()
    }

    /// Decides one call. Never fails: anything that goes wrong is a deny that says why.
    pub fn decide(&self, req: &CallRequest<'_>) -> Decision {
        let principal = self.agent_uid(req.principal);
        let (resource, created) = match self.resource_uid(req.resource) {
            Ok(r) => r,
            Err(e) => return Decision::deny(Basis::InvalidRequest, Vec::new(), vec![e]),
        };
        let context = match self.context(req.context) {
            Ok(c) => c,
            Err(e) => return Decision::deny(Basis::InvalidRequest, Vec::new(), vec![e]),
        };
        let action = self.actions[req.action.index()].clone();
        let request = match Request::new(principal, action, resource, context, None) {
            Ok(r) => r,
            Err(e) => {
                return Decision::deny(Basis::InvalidRequest, Vec::new(), vec![e.to_string()]);
            }
        };
        let entities = created.as_ref().unwrap_or(&self.entities);
        let policies = &self.by_action[req.action.index()];
        let response = self.cedar.is_authorized(&request, policies, entities);
        let diagnostics = response.diagnostics();

        let mut failed = Vec::new();
        let mut errors = Vec::new();
        for error in diagnostics.errors() {
            let cedar_policy::AuthorizationError::PolicyEvaluationError(e) = error;
            failed.push(self.rule_of(e.policy_id()));
            errors.push(error.to_string());
        }
        if !failed.is_empty() {
            return Decision::deny(Basis::EvaluationError, failed, errors);
        }

        let rules: Vec<Arc<str>> = diagnostics.reason().map(|id| self.rule_of(id)).collect();
        match response.decision() {
            cedar_policy::Decision::Allow => Decision {
                allowed: true,
                basis: Basis::Permit,
                rules,
                errors,
            },
            cedar_policy::Decision::Deny if rules.is_empty() => {
                Decision::deny(Basis::DefaultDeny, rules, errors)
            }
            cedar_policy::Decision::Deny => Decision::deny(Basis::Forbid, rules, errors),
        }
    }

    fn rule_of(&self, id: &PolicyId) -> Arc<str> {
        self.rules
            .get(id)
            .cloned()
            .unwrap_or_else(|| Arc::from(id.to_string()))
    }

    fn agent_uid(&self, name: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.agent_type.clone(), EntityId::new(name))
    }

    fn tool_uid(&self, server: &str, tool: &str) -> EntityUid {
        let id = format!("{server}/{tool}");
        EntityUid::from_type_name_and_id(self.tool_type.clone(), EntityId::new(id))
    }

    fn tool_entity(&self, uid: EntityUid, server: &str, tool: &str) -> Result<Entity, AuthzError> {
        let attrs = self
            .tools
            .get(server)
            .and_then(|s| s.tools.get(tool).copied().or(s.server))
            .unwrap_or(ToolDefaults::NONE);
        let map = HashMap::from([
            (
                "server".to_owned(),
                RestrictedExpression::new_string(server.to_owned()),
            ),
            (
                "name".to_owned(),
                RestrictedExpression::new_string(tool.to_owned()),
            ),
            (
                "untrusted".to_owned(),
                RestrictedExpression::new_bool(attrs.untrusted),
            ),
            (
                "sensitivity".to_owned(),
                RestrictedExpression::new_string(attrs.sensitivity.to_owned()),
            ),
        ]);
        Entity::new(uid, map, HashSet::new()).map_err(|e| AuthzError::Entities(e.to_string()))
    }

    /// The resource's uid, and an entity store extended with it when the bundle's entities do
    /// not list it (an unlisted tool or model). Cloning the store costs O(entities); only
    /// resources the control plane never named pay it.
    fn resource_uid(
        &self,
        resource: Resource<'_>,
    ) -> Result<(EntityUid, Option<Entities>), String> {
        let (uid, entity) = match resource {
            Resource::Agent(name) => return Ok((self.agent_uid(name), None)),
            Resource::Tool { server, tool } => {
                let uid = self.tool_uid(server, tool);
                if self.entities.get(&uid).is_some() {
                    return Ok((uid, None));
                }
                let entity = self
                    .tool_entity(uid.clone(), server, tool)
                    .map_err(|e| e.to_string())?;
                (uid, entity)
            }
            Resource::Model { provider, model } => {
                let id = format!("{provider}/{model}");
                let uid =
                    EntityUid::from_type_name_and_id(self.model_type.clone(), EntityId::new(id));
                if self.entities.get(&uid).is_some() {
                    return Ok((uid, None));
                }
                let attrs = HashMap::from([
                    (
                        "provider".to_owned(),
                        RestrictedExpression::new_string(provider.to_owned()),
                    ),
                    (
                        "name".to_owned(),
                        RestrictedExpression::new_string(model.to_owned()),
                    ),
                ]);
                let entity =
                    Entity::new(uid.clone(), attrs, HashSet::new()).map_err(|e| e.to_string())?;
                (uid, entity)
            }
        };
        let entities = self
            .entities
            .clone()
            .add_entities([entity], None)
            .map_err(|e| format!("cannot add {resource} to the entities: {e}"))?;
        Ok((uid, Some(entities)))
    }

    fn context(&self, ctx: &CallContext) -> Result<Context, String> {
        let path = ctx
            .path
            .iter()
            .map(|a| RestrictedExpression::new_entity_uid(self.agent_uid(a)));
        let taint = ctx
            .taint
            .iter()
            .map(|t| RestrictedExpression::new_string(t.clone()));
        Context::from_pairs([
            (
                "run".to_owned(),
                RestrictedExpression::new_string(ctx.run.clone()),
            ),
            (
                "user".to_owned(),
                RestrictedExpression::new_string(ctx.user.clone()),
            ),
            (
                "depth".to_owned(),
                RestrictedExpression::new_long(i64::from(ctx.depth)),
            ),
            ("path".to_owned(), RestrictedExpression::new_set(path)),
            (
                "revisits".to_owned(),
                RestrictedExpression::new_long(i64::from(ctx.revisits)),
            ),
            (
                "tainted".to_owned(),
                RestrictedExpression::new_bool(!ctx.taint.is_empty()),
            ),
            ("taint".to_owned(), RestrictedExpression::new_set(taint)),
        ])
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests;
