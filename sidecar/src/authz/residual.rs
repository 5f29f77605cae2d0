//! Remembered outcomes of the residual (free-form) Cedar policies.
//!
//! A residual policy's outcome is a function of the action, the principal, the resource and
//! the context attributes it reads, nothing else: the entities are the bundle's (or, for an
//! unlisted resource, a store made from that same key). A guard like
//! `forbid … when { context.depth > 8 }` reads `depth` alone, so every call at the same depth
//! between the same two agents has the same outcome, whatever its run. [`ContextReads`] finds,
//! once per bundle, which attributes an action's residual policies read; [`Outcomes`] keeps
//! outcomes by that projection of the context. Policies that use `context` as a whole (not
//! `context.<attr>` or `context has <attr>`) read everything, and their outcomes are not kept:
//! the run id would make every key new.

use std::collections::HashMap;
use std::sync::Arc;

use cedar_policy::PolicySet;
use serde_json::Value;

use super::{Action, CallContext, Decision};

/// The context attributes [`super::Authorizer`] gives Cedar, in a fixed order.
const ATTRS: [&str; 7] = [
    "run", "user", "depth", "path", "revisits", "tainted", "taint",
];

/// Which context attributes some policies read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct ContextReads {
    /// A policy reads `context` as a whole, or an attribute this list does not know.
    all: bool,
    attrs: [bool; 7],
}

impl ContextReads {
    /// What `policies` read. A policy that cannot be shown as JSON reads everything.
    pub fn of(policies: &PolicySet) -> Self {
        let mut reads = Self::default();
        for policy in policies.policies() {
            match policy.to_json() {
                Ok(json) => reads.visit(&json),
                Err(_) => reads.all = true,
            }
        }
        reads
    }

    fn visit(&mut self, v: &Value) {
        match v {
            Value::Object(map) => {
                for (key, inner) in map {
                    if (key == "." || key == "has") && self.attribute_of_context(inner) {
                        continue;
                    }
                    if key == "Var" && inner.as_str() == Some("context") {
                        self.all = true;
                    }
                    self.visit(inner);
                }
            }
            Value::Array(items) => items.iter().for_each(|i| self.visit(i)),
            _ => {}
        }
    }

    /// `{"left": {"Var": "context"}, "attr": …}`: records the attribute.
    fn attribute_of_context(&mut self, access: &Value) -> bool {
        let on_context = access
            .get("left")
            .and_then(|l| l.get("Var"))
            .and_then(Value::as_str)
            == Some("context");
        let Some(attr) = access.get("attr").and_then(Value::as_str) else {
            return false;
        };
        if !on_context {
            return false;
        }
        match ATTRS.iter().position(|a| *a == attr) {
            Some(i) => self.attrs[i] = true,
            None => self.all = true,
        }
        true
    }

    /// The part of `ctx` the policies read, or `None` when they read it all.
    pub fn project(&self, ctx: &CallContext) -> Option<Projection> {
        if self.all {
            return None;
        }
        let [run, user, depth, path, revisits, tainted, taint] = self.attrs;
        Some(Projection {
            run: run.then(|| ctx.run.clone()),
            user: user.then(|| ctx.user.clone()),
            depth: depth.then_some(ctx.depth),
            path: path.then(|| ctx.path.clone()),
            revisits: revisits.then_some(ctx.revisits),
            tainted: tainted.then_some(!ctx.taint.is_empty()),
            taint: taint.then(|| ctx.taint.clone()),
        })
    }
}

/// The context attributes residual policies read, as one request had them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Projection {
    run: Option<String>,
    user: Option<String>,
    depth: Option<u32>,
    path: Option<Vec<String>>,
    revisits: Option<u32>,
    tainted: Option<bool>,
    taint: Option<Vec<String>>,
}

/// What the residual policies came to for one request.
#[derive(Debug, Clone)]
pub(super) enum Outcome {
    /// Cedar's decision over them and the policies that determined it.
    Decided {
        allowed: bool,
        reasons: Vec<Arc<str>>,
    },
    /// A request Cedar could not take, or a policy that failed to evaluate: the deny to give.
    Refused(Decision),
}

/// Who asks what of which resource, under which projection of the context.
pub(super) type Key = (Action, Box<str>, String, Projection);

/// Outcomes kept per bundle, bounded: emptied when full.
#[derive(Default)]
pub(super) struct Outcomes {
    kept: HashMap<Key, Outcome>,
}

impl Outcomes {
    pub const MAX: usize = 4096;

    pub fn get(&self, key: &Key) -> Option<Outcome> {
        self.kept.get(key).cloned()
    }

    pub fn insert(&mut self, key: Key, outcome: Outcome) {
        if self.kept.len() >= Self::MAX {
            self.kept.clear();
        }
        self.kept.insert(key, outcome);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.kept.len()
    }
}

#[cfg(test)]
mod tests {
    use cedar_policy::{Policy, PolicyId};

    use super::*;

    fn reads(texts: &[&str]) -> ContextReads {
        let mut set = PolicySet::new();
        for (i, t) in texts.iter().enumerate() {
            set.add(Policy::parse(Some(PolicyId::new(format!("p{i}"))), *t).unwrap())
                .unwrap();
        }
        ContextReads::of(&set)
    }

    fn ctx(run: &str, depth: u32) -> CallContext {
        CallContext {
            run: run.into(),
            user: "user:ada".into(),
            depth,
            path: vec!["a".into(), "b".into()],
            revisits: 0,
            taint: Vec::new(),
        }
    }

    #[test]
    fn a_depth_guard_reads_only_the_depth() {
        let r = reads(&[r#"forbid (principal, action, resource) when { context.depth > 8 };"#]);
        let (a, b) = (r.project(&ctx("run-1", 2)), r.project(&ctx("run-2", 2)));
        assert!(a.is_some());
        assert_eq!(a, b, "another run at the same depth: the same outcome");
        assert_ne!(r.project(&ctx("run-1", 2)), r.project(&ctx("run-1", 9)));
    }

    #[test]
    fn has_and_contains_count_as_reads() {
        let r = reads(&[
            r#"forbid (principal, action, resource) when { context has user && context.path.contains(principal) };"#,
            r#"forbid (principal, action, resource) when { context.tainted };"#,
        ]);
        let mut other = ctx("run-1", 2);
        other.user = "user:bob".into();
        assert_ne!(r.project(&ctx("run-1", 2)), r.project(&other), "user");
        let mut longer = ctx("run-1", 2);
        longer.path.push("c".into());
        assert_ne!(r.project(&ctx("run-1", 2)), r.project(&longer), "path");
        let mut tainted = ctx("run-1", 2);
        tainted.taint.push("tool:web".into());
        assert_ne!(r.project(&ctx("run-1", 2)), r.project(&tainted), "tainted");
        assert_eq!(r.project(&ctx("run-1", 2)), r.project(&ctx("run-2", 5)));
    }

    #[test]
    fn context_used_whole_reads_everything_and_is_not_kept() {
        let r =
            reads(&[r#"forbid (principal, action, resource) when { context == {"depth": 1} };"#]);
        assert_eq!(r.project(&ctx("run-1", 2)), None);
        let unknown = reads(&[r#"forbid (principal, action, resource) when { context.nope };"#]);
        assert_eq!(unknown.project(&ctx("run-1", 2)), None);
    }

    #[test]
    fn policies_without_context_share_one_projection() {
        let r = reads(&[r#"permit (principal, action, resource) when { principal == resource };"#]);
        assert_eq!(r.project(&ctx("run-1", 2)), r.project(&ctx("run-9", 7)));
    }

    #[test]
    fn outcomes_are_bounded() {
        let mut o = Outcomes::default();
        let p = reads(&[]).project(&ctx("r", 1)).unwrap();
        for i in 0..=Outcomes::MAX {
            o.insert(
                (
                    Action::Invoke,
                    "a".into(),
                    format!("Agent::\"{i}\""),
                    p.clone(),
                ),
                Outcome::Decided {
                    allowed: true,
                    reasons: Vec::new(),
                },
            );
        }
        assert_eq!(o.len(), 1, "emptied when full, then the newest kept");
    }
}
