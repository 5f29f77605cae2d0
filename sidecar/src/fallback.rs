//! Agent fallback: when a call to an agent fails in a way a retry could cure and its attempts
//! are spent, the call goes to the agent its Agent names in `spec.fallback` — only where this
//! agent's policy permits invoking the fallback too.
//!
//! The fallback takes the failed agent's place at this hop: same run, same depth, same path, so
//! policy, depth and cycle checks are made for the fallback as for any callee. The call was
//! already counted against the rate limit; falling back does not count it again.

use ringfence_crds::bundle::AgentEntry;
use ringfence_crds::retry::{RetryOn, RetryPolicy};

use crate::authz::{Action, CallContext, CallRequest, Resource};
use crate::bundle::Snapshot;
use crate::context::RunContext;
use crate::deny::{Denial, Kind};
use crate::limits;
use crate::retry::{Failure, retries};

/// Header on an answer whose call could not fall back, saying why.
pub const FALLBACK_HEADER: &str = "ringfence-fallback";

/// Whether a call that ended with `failure` falls back: on a failure the policy retries, or on
/// a connect failure whatever the policy (nothing reached the primary, so nothing ran twice).
pub fn eligible(policy: Option<&RetryPolicy>, failure: Failure, idempotent: bool) -> bool {
    failure.class == RetryOn::ConnectFailure
        || policy.is_some_and(|p| retries(p, failure, idempotent))
}

/// The agent a failed call from this agent to `primary` goes to instead, as `Ok` when policy
/// and the run's limits permit that edge; `None` when `primary` names no fallback.
pub fn decide<'s>(
    snap: &'s Snapshot,
    ctx: &RunContext,
    taint: &[String],
    primary: &AgentEntry,
) -> Option<Result<&'s AgentEntry, Denial>> {
    let to = primary.fallback.as_deref()?;
    let content = &snap.bundle.content;
    let me = content.agent.name.as_str();
    Some(decide_edge(snap, ctx, taint, me, to).map_err(|d| {
        let why = d.rule.clone().unwrap_or_else(|| d.kind.name().to_owned());
        Denial {
            message: format!(
                "{} has failed and its fallback {to} may not take the call: {}",
                primary.name, d.message
            ),
            ..d
        }
        .rule(why)
    }))
}

fn decide_edge<'s>(
    snap: &'s Snapshot,
    ctx: &RunContext,
    taint: &[String],
    me: &str,
    to: &str,
) -> Result<&'s AgentEntry, Denial> {
    let entry = snap.agent_named(to).ok_or_else(|| {
        Denial::new(
            Kind::BadRequest,
            format!("no agent named {to:?} in this namespace"),
        )
        .edge(me, to)
        .run(&ctx.run)
    })?;
    let depth = u32::try_from(ctx.path.len()).unwrap_or(u32::MAX);
    let call = CallContext::of(ctx, taint.to_vec(), depth, ctx.revisits_of(to));
    let d = snap.authorizer.decide(&CallRequest {
        principal: me,
        action: Action::Invoke,
        resource: Resource::Agent(to),
        context: &call,
    });
    if !d.allowed {
        return Err(Denial::policy(
            &d,
            &format!("{me} may not invoke {to}"),
            me,
            to,
            &ctx.run,
        ));
    }
    limits::check_hop(&snap.bundle.content.limits, &ctx.path, to)
        .map_err(|b| Denial::breach(&b, me, to, &ctx.run))?;
    if entry.inbound.is_none() {
        return Err(Denial::new(
            Kind::Upstream,
            format!("the bundle knows no inbound address for {to}"),
        )
        .edge(me, to)
        .run(&ctx.run));
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use ringfence_crds::AgentKey;
    use ringfence_crds::bundle::Bundle;

    use super::*;
    use crate::bundle::{Admission, admit};
    use crate::testing::bundle_content;

    const DELEGATES: (&str, &str) = (
        "default/orchestrator-delegates/allow[0]",
        r#"permit (principal == Agent::"orchestrator", action == Action::"invoke", resource)
           when { [Agent::"research", Agent::"writer"].contains(resource) };"#,
    );

    /// The orchestrator's snapshot, research falling back to `fallback`.
    fn snapshot(fallback: &str, max_depth: Option<u32>) -> Snapshot {
        let me = AgentKey::new("default", "orchestrator").unwrap();
        let mut content = bundle_content(&me, &[DELEGATES]);
        for p in &mut content.peers {
            p.inbound = Some("127.0.0.1:1".into());
            if p.name == "research" {
                p.fallback = Some(fallback.into());
            }
        }
        if let Some(d) = max_depth {
            content.limits.max_delegation_depth = d;
        }
        let line = serde_json::to_vec(&Bundle::new(1, content)).unwrap();
        match admit(&line, &me, None) {
            Admission::Enforce(s) => *s,
            other => panic!("{other:?}"),
        }
    }

    fn run() -> RunContext {
        RunContext::start("orchestrator", "user:tomas", None, None).unwrap()
    }

    fn failure(class: RetryOn) -> Failure {
        Failure {
            class,
            retry_after: None,
        }
    }

    #[test]
    fn research_falls_back_to_writer_when_the_orchestrator_may_invoke_writer() {
        let snap = snapshot("writer", None);
        let research = snap.agent_named("research").unwrap();
        let to = decide(&snap, &run(), &[], research).unwrap().unwrap();
        assert_eq!(to.name, "writer");
    }

    #[test]
    fn research_may_not_fall_back_to_critic_the_orchestrator_may_not_invoke() {
        let snap = snapshot("critic", None);
        let research = snap.agent_named("research").unwrap();
        let d = decide(&snap, &run(), &[], research).unwrap().unwrap_err();
        assert_eq!(d.kind, Kind::Policy);
        assert!(d.message.contains("research has failed"), "{}", d.message);
        assert!(d.rule.unwrap().contains("default deny"));
        assert_eq!(d.edge.as_deref(), Some("orchestrator → critic"));
    }

    #[test]
    fn the_fallback_is_held_to_the_depth_of_the_hop_it_replaces() {
        let snap = snapshot("writer", Some(0));
        let research = snap.agent_named("research").unwrap();
        let d = decide(&snap, &run(), &[], research).unwrap().unwrap_err();
        assert_eq!(d.kind, Kind::Depth);
    }

    #[test]
    fn an_agent_without_a_fallback_has_none() {
        let snap = snapshot("writer", None);
        let writer = snap.agent_named("writer").unwrap();
        assert!(decide(&snap, &run(), &[], writer).is_none());
    }

    #[test]
    fn a_connect_failure_falls_back_even_without_a_retry_policy_or_for_send_message() {
        assert!(eligible(None, failure(RetryOn::ConnectFailure), false));
        assert!(!eligible(None, failure(RetryOn::Unavailable), true));
        let p = RetryPolicy::default();
        assert!(eligible(Some(&p), failure(RetryOn::Unavailable), true));
        assert!(!eligible(Some(&p), failure(RetryOn::Unavailable), false));
        assert!(!eligible(Some(&p), failure(RetryOn::GatewayError), true));
    }
}
