//! The arithmetic of a run budget, over plain data: what a lease may grant, what a report adds,
//! which limits it crossed. Both backends read the state, call these, and write the result back
//! inside one transaction, so the rules live here once and are tested without a database.

use crate::budget::{Amount, BudgetLimit, RunStatus, Spend, SpendEvent};

/// The part of a run a lease decision needs, read under the run's lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunState {
    pub status: RunStatus,
    pub halt_reason: Option<String>,
    pub max_tokens: Option<u64>,
    pub max_micros: Option<u64>,
    pub spent: Spend,
    /// Leased and not yet covered by reports nor given back.
    pub outstanding: Amount,
}

/// What a lease request comes to, before an id is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseDecision {
    Grant(Amount),
    Exhausted {
        limit: BudgetLimit,
        spent: u64,
        outstanding: u64,
        limit_value: u64,
    },
    Halted {
        reason: String,
    },
    Completed,
}

/// Grants `want`, capped per dimension by `limit - spent - outstanding`. A dimension that is
/// asked for and has nothing left refuses the whole lease: a call needs both tokens and money.
pub fn decide_lease(run: &RunState, want: Amount) -> LeaseDecision {
    match run.status {
        RunStatus::Halted => {
            return LeaseDecision::Halted {
                reason: run
                    .halt_reason
                    .clone()
                    .unwrap_or_else(|| "halted".to_owned()),
            };
        }
        RunStatus::Completed => return LeaseDecision::Completed,
        RunStatus::Running => {}
    }
    let dims = [
        (
            BudgetLimit::MaxTotalTokens,
            run.max_tokens,
            run.spent.tokens(),
            run.outstanding.tokens,
            want.tokens,
        ),
        (
            BudgetLimit::MaxCostUsd,
            run.max_micros,
            run.spent.micros,
            run.outstanding.micros,
            want.micros,
        ),
    ];
    let mut granted = [0u64; 2];
    for (slot, (limit, limit_value, spent, outstanding, want)) in granted.iter_mut().zip(dims) {
        let Some(limit_value) = limit_value else {
            *slot = want;
            continue;
        };
        let left = limit_value.saturating_sub(spent.saturating_add(outstanding));
        if want > 0 && left == 0 {
            return LeaseDecision::Exhausted {
                limit,
                spent,
                outstanding,
                limit_value,
            };
        }
        *slot = want.min(left);
    }
    LeaseDecision::Grant(Amount {
        tokens: granted[0],
        micros: granted[1],
    })
}

/// The sums overflowed u64: a report that claims more than any real run can spend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overflow;

/// Adds one event to a running total.
pub fn add_spend(total: &mut Spend, event: &SpendEvent) -> Result<(), Overflow> {
    *total = Spend {
        tokens_in: total
            .tokens_in
            .checked_add(event.tokens_in)
            .ok_or(Overflow)?,
        tokens_out: total
            .tokens_out
            .checked_add(event.tokens_out)
            .ok_or(Overflow)?,
        micros: total.micros.checked_add(event.micros).ok_or(Overflow)?,
        calls: total.calls.checked_add(event.calls).ok_or(Overflow)?,
    };
    Ok(())
}

/// Limits that `after` is past and `before` was not. Each breach is reported once, by the report
/// that crossed it; later spend on an already breached run adds no new breach.
pub fn crossed(
    max_tokens: Option<u64>,
    max_micros: Option<u64>,
    before: &Spend,
    after: &Spend,
) -> Vec<(BudgetLimit, u64, u64)> {
    let mut out = Vec::new();
    if let Some(limit) = max_tokens
        && before.tokens() <= limit
        && after.tokens() > limit
    {
        out.push((BudgetLimit::MaxTotalTokens, after.tokens(), limit));
    }
    if let Some(limit) = max_micros
        && before.micros <= limit
        && after.micros > limit
    {
        out.push((BudgetLimit::MaxCostUsd, after.micros, limit));
    }
    out
}

/// The halt reason a breach writes, for the operator reading `ringfence runs`.
pub fn breach_reason(breaches: &[(BudgetLimit, u64, u64)]) -> String {
    let parts: Vec<String> = breaches
        .iter()
        .map(|(limit, spent, value)| match limit {
            BudgetLimit::MaxTotalTokens => {
                format!("maxTotalTokens exceeded: {spent} tokens spent of {value}")
            }
            BudgetLimit::MaxCostUsd => {
                format!("maxCostUsd exceeded: {spent} micro-USD spent of {value}")
            }
        })
        .collect();
    parts.join("; ")
}

/// What a lease still holds after `spent` of it was reported: spend beyond the lease covers
/// nothing more (it counts against the run all the same).
pub fn cover(remaining: Amount, spent: Amount) -> Amount {
    Amount {
        tokens: remaining.tokens.saturating_sub(spent.tokens),
        micros: remaining.micros.saturating_sub(spent.micros),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(max_tokens: Option<u64>, max_micros: Option<u64>) -> RunState {
        RunState {
            status: RunStatus::Running,
            halt_reason: None,
            max_tokens,
            max_micros,
            spent: Spend::default(),
            outstanding: Amount::default(),
        }
    }

    fn amount(tokens: u64, micros: u64) -> Amount {
        Amount { tokens, micros }
    }

    #[test]
    fn a_lease_is_capped_by_what_is_neither_spent_nor_leased_to_others() {
        let mut run = running(Some(1_000), Some(50_000));
        run.spent.tokens_in = 300;
        run.spent.tokens_out = 100;
        run.spent.micros = 20_000;
        run.outstanding = amount(500, 25_000);
        assert_eq!(
            decide_lease(&run, amount(400, 10_000)),
            LeaseDecision::Grant(amount(100, 5_000))
        );
    }

    #[test]
    fn a_run_without_limits_grants_what_is_asked() {
        let run = running(None, None);
        assert_eq!(
            decide_lease(&run, amount(u64::MAX, 7)),
            LeaseDecision::Grant(amount(u64::MAX, 7))
        );
    }

    #[test]
    fn a_lease_that_needs_an_exhausted_dimension_is_refused_naming_the_limit() {
        let mut run = running(Some(1_000), Some(50_000));
        run.spent.micros = 40_000;
        run.outstanding = amount(0, 10_000);
        assert_eq!(
            decide_lease(&run, amount(10, 1)),
            LeaseDecision::Exhausted {
                limit: BudgetLimit::MaxCostUsd,
                spent: 40_000,
                outstanding: 10_000,
                limit_value: 50_000,
            }
        );
        // Asking for tokens only still works while tokens are left.
        assert_eq!(
            decide_lease(&run, amount(10, 0)),
            LeaseDecision::Grant(amount(10, 0))
        );
    }

    #[test]
    fn a_halted_run_refuses_every_lease_with_its_reason() {
        let mut run = running(None, None);
        run.status = RunStatus::Halted;
        run.halt_reason = Some("operator".to_owned());
        assert_eq!(
            decide_lease(&run, amount(1, 1)),
            LeaseDecision::Halted {
                reason: "operator".to_owned()
            }
        );
        run.status = RunStatus::Completed;
        assert_eq!(decide_lease(&run, amount(1, 1)), LeaseDecision::Completed);
    }

    #[test]
    fn a_breach_is_reported_by_the_report_that_crosses_the_limit_only() {
        let before = Spend {
            tokens_in: 900,
            micros: 100,
            ..Spend::default()
        };
        let after = Spend {
            tokens_in: 1_001,
            micros: 100,
            ..Spend::default()
        };
        assert_eq!(
            crossed(Some(1_000), Some(100), &before, &after),
            vec![(BudgetLimit::MaxTotalTokens, 1_001, 1_000)]
        );
        let later = Spend {
            tokens_in: 2_000,
            micros: 100,
            ..Spend::default()
        };
        assert!(crossed(Some(1_000), Some(100), &after, &later).is_empty());
        // Reaching the limit exactly is allowed: leases grant up to it.
        assert!(crossed(Some(1_000), Some(100), &Spend::default(), &before).is_empty());
    }

    #[test]
    fn spend_beyond_a_lease_covers_it_to_zero() {
        assert_eq!(
            cover(amount(10, 100), amount(4, 500)),
            amount(6, 0),
            "the lease holds what is left, never less than nothing"
        );
    }

    #[test]
    fn an_absurd_report_overflows_instead_of_wrapping() {
        let mut total = Spend {
            micros: u64::MAX,
            ..Spend::default()
        };
        let event = SpendEvent {
            event_id: "e".into(),
            run_id: "r".into(),
            agent: "a".into(),
            lease_id: None,
            tokens_in: 0,
            tokens_out: 0,
            micros: 1,
            calls: 1,
            model: None,
            estimated: false,
            at_ms: 0,
            team: None,
            environment: None,
            workflow: None,
        };
        assert_eq!(add_spend(&mut total, &event), Err(Overflow));
    }
}
