//! RunBudgets → the limits in force for each agent: the strictest value of every budget that
//! selects it, with the agent's own rate-limit override on top. Retries: the policy with the
//! fewest attempts. Quotas: every one of every budget, each resolved to what it counts.

use std::collections::BTreeMap;

use ringfence_crds::Agent;
use ringfence_crds::budget::{InvokeRate, OnBreach, RunBudget, Unavailable};
use ringfence_crds::bundle::Limits;
use ringfence_crds::quota::{QuotaScope, QuotaTerm};
use ringfence_crds::selector;

use super::diagnostic::{Diagnostic, ResourceRef};

/// Which agents (by name) each budget of a namespace selects.
pub fn selections(
    budgets: &[&RunBudget],
    agents: &[&Agent],
    diags: &mut Vec<Diagnostic>,
) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for b in budgets {
        let r = super::resource_ref("RunBudget", &b.metadata);
        let mut chosen = Vec::new();
        for (i, name) in b.spec.agents.iter().enumerate() {
            if !agents
                .iter()
                .any(|a| a.metadata.name.as_deref() == Some(name))
            {
                diags.push(Diagnostic::unresolved(&r, format!("spec.agents[{i}]"), format!(
                    "no Agent named {name:?} in namespace {}; the budget applies to it once it exists",
                    r.namespace
                )));
            }
        }
        for a in agents {
            let name = a.metadata.name.clone().unwrap_or_default();
            let by_name = b.spec.agents.contains(&name);
            let by_selector = match &b.spec.selector {
                Some(sel) => match selector::matches(
                    sel,
                    a.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
                ) {
                    Ok(m) => m,
                    Err(e) => {
                        diags.push(Diagnostic::error(&r, "spec.selector", e.to_string()));
                        chosen.clear();
                        break;
                    }
                },
                None => false,
            };
            let everyone = b.spec.agents.is_empty() && b.spec.selector.is_none();
            if everyone || by_name || by_selector {
                chosen.push(name);
            }
        }
        out.insert(r.name.clone(), chosen);
    }
    out
}

fn stricter_rate(a: InvokeRate, b: InvokeRate) -> InvokeRate {
    // a.count / a.per < b.count / b.per, without division.
    if u128::from(a.count) * b.per.as_millis() <= u128::from(b.count) * a.per.as_millis() {
        a
    } else {
        b
    }
}

fn min_opt<T: Ord + Copy>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn breach_rank(b: OnBreach) -> u8 {
    match b {
        OnBreach::AlertOnly => 0,
        OnBreach::Halt => 1,
        OnBreach::HaltAndAlert => 2,
    }
}

/// The limits for `agent` given the budgets (sorted by name) that select it.
pub fn for_agent(agent: &Agent, budgets: &[&RunBudget]) -> Limits {
    let mut l = Limits::default();
    let mut depth = None;
    let mut revisits = None;
    let mut rate: Option<InvokeRate> = None;
    for (i, b) in budgets.iter().enumerate() {
        let s = &b.spec;
        depth = min_opt(depth, s.max_delegation_depth);
        revisits = min_opt(revisits, s.cycles.as_ref().map(|c| c.max_revisits));
        l.max_total_tokens = min_opt(l.max_total_tokens, s.max_total_tokens);
        l.max_cost_usd = min_opt(l.max_cost_usd, s.max_cost_usd);
        l.max_wall_clock_seconds = min_opt(l.max_wall_clock_seconds, s.max_wall_clock_seconds);
        if let Some(pa) = &s.per_agent {
            l.timeout_seconds = min_opt(l.timeout_seconds, pa.timeout_seconds);
            if let Some(r) = pa.invoke_rate_limit {
                rate = Some(rate.map_or(r, |cur| stricter_rate(cur, r)));
            }
        }
        if i == 0 || breach_rank(s.on_breach) > breach_rank(l.on_breach) {
            l.on_breach = s.on_breach;
        }
        // Failing open is a deliberate choice: every budget selecting the agent must make it.
        l.fail_open = if i == 0 {
            s.on_budget_service_unavailable == Unavailable::FailOpen
        } else {
            l.fail_open && s.on_budget_service_unavailable == Unavailable::FailOpen
        };
        if l.alert_webhook.is_none() {
            l.alert_webhook = s.alert.as_ref().and_then(|a| a.webhook.clone());
        }
        let r = budget_ref(b);
        if let Some(retry) = &s.retry
            && l.retry
                .as_ref()
                .is_none_or(|cur| retry.max_attempts < cur.max_attempts)
        {
            l.retry = Some(retry.clone());
        }
        for (i, q) in s.quotas.iter().enumerate() {
            if let Some(key) = quota_key(agent, &r.name, q.per) {
                l.quotas.push(QuotaTerm {
                    id: format!("{}/{}#{i}", r.namespace, r.name),
                    key,
                    window: q.window,
                    sliding: q.sliding,
                    max_total_tokens: q.max_total_tokens,
                    max_cost_micros: q.max_cost_usd.map(|u| u.micros),
                    on_breach: s.on_breach,
                    alert_webhook: s.alert.as_ref().and_then(|a| a.webhook.clone()),
                });
            }
        }
        l.budgets.push(format!("{}/{}", r.namespace, r.name));
    }
    if let Some(d) = depth {
        l.max_delegation_depth = d;
    }
    if let Some(r) = revisits {
        l.max_revisits = r;
    }
    l.invoke_rate_limit = agent.spec.invoke_rate_limit.or(rate);
    l
}

/// What a quota of `budget` counts `agent`'s spending under; `None` when the agent lacks the
/// attribute the quota groups by (a per-team quota and an agent with no team).
pub fn quota_key(agent: &Agent, budget: &str, per: QuotaScope) -> Option<String> {
    let name = agent.metadata.name.as_deref().unwrap_or_default();
    match per {
        QuotaScope::Agent => Some(format!("agent:{name}")),
        QuotaScope::Team => agent.spec.team.as_ref().map(|t| format!("team:{t}")),
        QuotaScope::Environment => agent
            .spec
            .environment
            .as_ref()
            .map(|e| format!("environment:{e}")),
        QuotaScope::Workflow => Some(format!("workflow:{budget}")),
    }
}

/// Used by [`selections`] callers that need the resource of a budget.
pub fn budget_ref(b: &RunBudget) -> ResourceRef {
    super::resource_ref("RunBudget", &b.metadata)
}
