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
use std::sync::{Arc, Mutex, PoisonError};

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
///
/// Per action (indexed by [`Action::index`]), the structured edges are a lookup by principal
/// ([`index`]) and only the remaining policies go to Cedar — none at all for most slices the
/// compiler cuts. Cedar evaluates every policy of a set on every request, and a policy scoped
/// to another action can never match, so it is left out of that action's set.
pub struct Authorizer {
    index: [index::ActionIndex; 4],
    listed: index::Listed,
    /// Whether residual policies may read a per-request store of the few entities they can
    /// reach rather than a copy of the bundle's, for a resource the bundle does not list.
    sliceable: bool,
    /// The stores made for unlisted resources, by (action, principal, resource): a store is a
    /// function of those alone, so a tool called again is decided without building it again.
    stores: Mutex<StoreCache>,
    /// Per action, the context attributes its residual policies read.
    reads: [residual::ContextReads; 4],
    /// Residual outcomes by (action, principal, resource, the context they read).
    outcomes: Mutex<residual::Outcomes>,
    /// Every policy per action, for the Cedar-only reference decision.
    #[cfg(any(test, feature = "testing"))]
    reference: [PolicySet; 4],
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

/// The actions a policy can apply to (indexed by [`Action::index`]). A scope naming anything
/// but our four actions (an action group some day) applies everywhere, which is never wrong,
/// only slower.
fn actions_of(policy: &Policy, actions: &[EntityUid; 4]) -> [bool; 4] {
    match policy.action_constraint() {
        ActionConstraint::Any => [true; 4],
        ActionConstraint::Eq(uid) if actions.contains(&uid) => {
            actions.each_ref().map(|a| *a == uid)
        }
        ActionConstraint::In(uids) if uids.iter().all(|u| actions.contains(u)) => {
            actions.each_ref().map(|a| uids.contains(a))
        }
        ActionConstraint::Eq(_) | ActionConstraint::In(_) => [true; 4],
    }
}

/// Splits a validated set into one set per action, for the Cedar-only reference decision.
#[cfg(any(test, feature = "testing"))]
fn partition_by_action(
    all: &PolicySet,
    actions: &[EntityUid; 4],
) -> Result<[PolicySet; 4], AuthzError> {
    let mut sets: [PolicySet; 4] = Default::default();
    for policy in all.policies() {
        for (set, applies) in sets.iter_mut().zip(actions_of(policy, actions)) {
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

/// Stores made for unlisted resources. Bounded: when full it is emptied and fills again with
/// what is called now, so an agent naming ever new tools costs memory for the bound at most.
#[derive(Default)]
struct StoreCache {
    stores: HashMap<(Action, EntityUid, EntityUid), Arc<Entities>>,
}

impl StoreCache {
    /// Small stores (a few entities each) kept at most.
    const SMALL_STORES: usize = 1024;
    /// Copies of the whole bundle's store kept at most (when the bundle cannot be sliced).
    const WHOLE_STORES: usize = 8;

    fn get(&self, key: &(Action, EntityUid, EntityUid)) -> Option<Arc<Entities>> {
        self.stores.get(key).cloned()
    }

    fn insert(&mut self, key: (Action, EntityUid, EntityUid), store: Arc<Entities>, bound: usize) {
        if self.stores.len() >= bound {
            self.stores.clear();
        }
        self.stores.insert(key, store);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.stores.len()
    }
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

        let mut authorizer = Self {
            index: Default::default(),
            listed: HashMap::new(),
            sliceable: index::sliceable(&slice.entities),
            stores: Mutex::default(),
            reads: Default::default(),
            outcomes: Mutex::default(),
            #[cfg(any(test, feature = "testing"))]
            reference: partition_by_action(&policies, &actions)?,
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

        let (listed, safety) = index::listed_groups(&authorizer.entities);
        authorizer.listed = listed;
        authorizer.index = index::build(
            &policies,
            &authorizer.actions,
            safety,
            &authorizer.entities,
            |p| authorizer.rule_of(p.id()),
        )?;
        authorizer.reads = authorizer
            .index
            .each_ref()
            .map(|slot| residual::ContextReads::of(&slot.residual));
        Ok(authorizer)
    }

    /// How many policies are enforced.
    pub fn policy_count(&self) -> usize {
        self.rules.len()
    }

    /// Decides one call. Never fails: anything that goes wrong is a deny that says why.
    ///
    /// The structured edges are looked up; Cedar runs only when the action has policies the
    /// index does not hold, and then only those. The outcome is Cedar's over the whole slice.
    pub fn decide(&self, req: &CallRequest<'_>) -> Decision {
        let slot = &self.index[req.action.index()];
        let (kind, entity_id) = match req.resource {
            Resource::Agent(_) => (index::Kind::Agent, None),
            Resource::Tool { server, tool } => (index::Kind::Tool, Some((server, tool))),
            Resource::Model { provider, model } => (index::Kind::Model, Some((provider, model))),
        };
        // For a tool or model: its listing, if any, and the group attribute policies see.
        let mut listed = true;
        let mut group = None;
        if let Some((g, name)) = entity_id {
            match self
                .listed
                .get(&(kind, format!("{g}/{name}").into_boxed_str()))
            {
                None => {
                    listed = false;
                    group = Some(g);
                }
                Some(value) => group = value.as_deref(),
            }
        }
        let subject = index::Subject {
            kind,
            resource: req.resource,
            group,
        };
        let matched = slot.matches(req.principal, &subject);
        if slot.residual.is_empty() {
            return Self::combine(matched.forbids, matched.permits);
        }

        // Residual policies: their outcome for this principal, resource and the part of the
        // context they read, if an earlier call already had it.
        let key = self.reads[req.action.index()]
            .project(req.context)
            .map(|p| {
                (
                    req.action,
                    req.principal.into(),
                    req.resource.to_string(),
                    p,
                )
            });
        let kept = key.as_ref().and_then(|k| {
            self.outcomes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(k)
        });
        let outcome = match kept {
            Some(outcome) => outcome,
            None => {
                let outcome = self.residual_outcome(req, listed, &slot.residual);
                if let Some(k) = key {
                    self.outcomes
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(k, outcome.clone());
                }
                outcome
            }
        };
        match outcome {
            residual::Outcome::Refused(d) => d,
            residual::Outcome::Decided { allowed, reasons } => {
                let (mut forbids, mut permits) = (matched.forbids, matched.permits);
                if allowed {
                    permits.extend(reasons);
                } else {
                    forbids.extend(reasons);
                }
                Self::combine(forbids, permits)
            }
        }
    }

    /// What Cedar makes of the residual policies of the request's action.
    fn residual_outcome(
        &self,
        req: &CallRequest<'_>,
        listed: bool,
        policies: &PolicySet,
    ) -> residual::Outcome {
        let refused = residual::Outcome::Refused;
        let principal = self.agent_uid(req.principal);
        let (resource, created) = match self.resource_uid(req.resource, listed) {
            Ok((uid, false)) => (uid, None),
            Ok((uid, true)) => match self.store_for(req, &principal, &uid) {
                Ok(store) => (uid, Some(store)),
                Err(e) => {
                    return refused(Decision::deny(Basis::InvalidRequest, Vec::new(), vec![e]));
                }
            },
            Err(e) => return refused(Decision::deny(Basis::InvalidRequest, Vec::new(), vec![e])),
        };
        let entities = created.as_deref().unwrap_or(&self.entities);
        let response = match self.cedar_response(req, principal, resource, policies, entities) {
            Ok(r) => r,
            Err(d) => return refused(d),
        };
        let diagnostics = response.diagnostics();
        if let Some(d) = self.evaluation_errors(diagnostics) {
            return refused(d);
        }
        residual::Outcome::Decided {
            allowed: response.decision() == cedar_policy::Decision::Allow,
            reasons: diagnostics.reason().map(|id| self.rule_of(id)).collect(),
        }
    }

    /// Cedar's rule: any forbid denies, else any permit allows, else the default deny.
    fn combine(forbids: Vec<Arc<str>>, permits: Vec<Arc<str>>) -> Decision {
        if !forbids.is_empty() {
            Decision::deny(Basis::Forbid, forbids, Vec::new())
        } else if !permits.is_empty() {
            Decision {
                allowed: true,
                basis: Basis::Permit,
                rules: permits,
                errors: Vec::new(),
            }
        } else {
            Decision::deny(Basis::DefaultDeny, Vec::new(), Vec::new())
        }
    }

    /// The decision of plain Cedar over every policy of the action, as before the edge index
    /// existed: the reference the fast path is tested and benchmarked against.
    #[cfg(any(test, feature = "testing"))]
    pub fn decide_with_cedar_only(&self, req: &CallRequest<'_>) -> Decision {
        let principal = self.agent_uid(req.principal);
        let listed = match req.resource {
            Resource::Agent(_) => true,
            Resource::Tool { .. } | Resource::Model { .. } => false,
        };
        let with_resource = |uid: &EntityUid| {
            self.entities
                .clone()
                .add_entities([self.resource_entity(req.resource, uid.clone())?], None)
                .map_err(|e| format!("cannot add {} to the entities: {e}", req.resource))
        };
        let (resource, created) = match self.resource_uid(req.resource, listed) {
            Ok((uid, false)) => (uid, None),
            Ok((uid, true)) => match with_resource(&uid) {
                Ok(store) => (uid, Some(store)),
                Err(e) => return Decision::deny(Basis::InvalidRequest, Vec::new(), vec![e]),
            },
            Err(e) => return Decision::deny(Basis::InvalidRequest, Vec::new(), vec![e]),
        };
        let entities = created.as_ref().unwrap_or(&self.entities);
        let policies = &self.reference[req.action.index()];
        let response = match self.cedar_response(req, principal, resource, policies, entities) {
            Ok(r) => r,
            Err(d) => return d,
        };
        let diagnostics = response.diagnostics();
        if let Some(d) = self.evaluation_errors(diagnostics) {
            return d;
        }
        let rules: Vec<Arc<str>> = diagnostics.reason().map(|id| self.rule_of(id)).collect();
        match response.decision() {
            cedar_policy::Decision::Allow => Self::combine(Vec::new(), rules),
            cedar_policy::Decision::Deny => Self::combine(rules, Vec::new()),
        }
    }

    fn cedar_response(
        &self,
        req: &CallRequest<'_>,
        principal: EntityUid,
        resource: EntityUid,
        policies: &PolicySet,
        entities: &Entities,
    ) -> Result<cedar_policy::Response, Decision> {
        let context = self
            .context(req.context)
            .map_err(|e| Decision::deny(Basis::InvalidRequest, Vec::new(), vec![e]))?;
        let action = self.actions[req.action.index()].clone();
        let request = Request::new(principal, action, resource, context, None)
            .map_err(|e| Decision::deny(Basis::InvalidRequest, Vec::new(), vec![e.to_string()]))?;
        Ok(self.cedar.is_authorized(&request, policies, entities))
    }

    /// Cedar skips a policy that fails to evaluate; we deny, naming it.
    fn evaluation_errors(&self, diagnostics: &cedar_policy::Diagnostics) -> Option<Decision> {
        let mut failed = Vec::new();
        let mut errors = Vec::new();
        for error in diagnostics.errors() {
            let cedar_policy::AuthorizationError::PolicyEvaluationError(e) = error;
            failed.push(self.rule_of(e.policy_id()));
            errors.push(error.to_string());
        }
        (!failed.is_empty()).then(|| Decision::deny(Basis::EvaluationError, failed, errors))
    }

    /// The store a residual policy reads when the resource is not listed: without copying the
    /// bundle's, just the entities a policy can reach plus the resource, when the bundle allows
    /// it ([`index::sliceable`]); otherwise a copy of the whole store with the resource added.
    fn slice_with(
        &self,
        req: &CallRequest<'_>,
        principal: &EntityUid,
        resource: Entity,
    ) -> Result<Entities, String> {
        let cannot =
            |e: &dyn fmt::Display| format!("cannot add {} to the entities: {e}", req.resource);
        if !self.sliceable {
            return self
                .entities
                .clone()
                .add_entities([resource], None)
                .map_err(|e| cannot(&e));
        }
        let slot = &self.index[req.action.index()];
        let action = &self.actions[req.action.index()];
        let mut entities: Vec<Entity> = Vec::with_capacity(slot.literals.len() + 3);
        for uid in [principal, action] {
            if let Some(e) = self.entities.get(uid)
                && !slot.literals.iter().any(|l| l.uid() == *uid)
            {
                entities.push(e.clone());
            }
        }
        entities.extend(slot.literals.iter().cloned());
        entities.push(resource);
        Entities::from_entities(entities, None).map_err(|e| cannot(&e))
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

    /// The resource's uid, and whether it is a tool or model the bundle's entities do not list
    /// (then a decision needs a store that holds it).
    fn resource_uid(
        &self,
        resource: Resource<'_>,
        listed: bool,
    ) -> Result<(EntityUid, bool), String> {
        let (ty, group, name) = match resource {
            Resource::Agent(name) => return Ok((self.agent_uid(name), false)),
            Resource::Tool { server, tool } => (&self.tool_type, server, tool),
            Resource::Model { provider, model } => (&self.model_type, provider, model),
        };
        let uid =
            EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(format!("{group}/{name}")));
        let missing = !listed && self.entities.get(&uid).is_none();
        Ok((uid, missing))
    }

    /// The entity the sidecar gives a tool or model the bundle does not list.
    fn resource_entity(&self, resource: Resource<'_>, uid: EntityUid) -> Result<Entity, String> {
        match resource {
            Resource::Agent(name) => Err(format!("agent {name} is not a tool or a model")),
            Resource::Tool { server, tool } => self
                .tool_entity(uid, server, tool)
                .map_err(|e| e.to_string()),
            Resource::Model { provider, model } => {
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
                Entity::new(uid, attrs, HashSet::new()).map_err(|e| e.to_string())
            }
        }
    }

    /// The store residual policies read for a resource the bundle does not list: made once per
    /// (action, principal, resource) and kept, within [`StoreCache`]'s bound.
    fn store_for(
        &self,
        req: &CallRequest<'_>,
        principal: &EntityUid,
        resource: &EntityUid,
    ) -> Result<Arc<Entities>, String> {
        let key = (req.action, principal.clone(), resource.clone());
        if let Some(store) = self
            .stores
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
        {
            return Ok(store);
        }
        let entity = self.resource_entity(req.resource, resource.clone())?;
        let store = Arc::new(self.slice_with(req, principal, entity)?);
        let bound = if self.sliceable {
            StoreCache::SMALL_STORES
        } else {
            StoreCache::WHOLE_STORES
        };
        self.stores
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key, store.clone(), bound);
        Ok(store)
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

#[cfg(any(test, feature = "testing"))]
pub mod fixtures;
mod index;
mod residual;

#[cfg(test)]
mod fast_path_tests;
#[cfg(test)]
mod tests;
