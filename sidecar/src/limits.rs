//! The limits a sidecar enforces on its own: depth, cycles, the invoke rate and the run's
//! deadline.
//!
//! Everything here is pure over plain data and never reads a clock: callers pass `now`. The
//! numbers come from the bundle's [`Limits`] (the strictest of every RunBudget selecting the
//! agent); the state that changes — the rate limiter's — lives in a [`RateLimiter`] kept apart
//! from them, so a policy update never resets it.
//!
//! Depth counts hops from the run's root: the root agent is depth 0 and an agent called by an
//! agent at depth `d` is at depth `d + 1`. A path is root first and, when a limit is checked for
//! a call, does not yet hold the callee, so the callee's depth is `path.len()`.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ringfence_crds::budget::InvokeRate;
use ringfence_crds::bundle::Limits;

/// A limit a call would break. Each names its rule (the RunBudget field a person sets) and the
/// HTTP status the caller gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Breach {
    #[error(
        "delegation depth {depth} is over this run's limit of {max} (maxDelegationDepth): agents are delegating deeper than the RunBudget allows; shorten the chain or raise maxDelegationDepth"
    )]
    Depth { depth: u32, max: u32 },
    #[error(
        "calling {agent} would re-enter it: {}; the run has already entered {agent} {revisits} time(s) and the RunBudget allows {max} revisit(s) (cycles.maxRevisits)",
        CycleDisplay { path, agent }
    )]
    Cycle {
        /// The agent that would be entered again.
        agent: String,
        /// The run's path before the call, root first.
        path: Vec<String>,
        /// How many times `agent` is already on the path.
        revisits: u32,
        max: u32,
    },
    #[error(
        "{agent} is over its invokeRateLimit of {limit}: retry after {} s",
        retry_after_secs(*retry_after)
    )]
    RateLimited {
        agent: String,
        limit: InvokeRate,
        retry_after: Duration,
    },
    #[error(
        "the run's deadline passed {} ms ago (maxWallClockSeconds): the run has been going longer than its RunBudget allows; start a new run",
        now_ms.saturating_sub(*run_deadline_ms)
    )]
    DeadlineExceeded { run_deadline_ms: u64, now_ms: u64 },
}

impl Breach {
    /// The RunBudget field that set the limit, as named in denials, metrics and the ledger.
    pub fn rule(&self) -> &'static str {
        match self {
            Breach::Depth { .. } => "maxDelegationDepth",
            Breach::Cycle { .. } => "cycles",
            Breach::RateLimited { .. } => "invokeRateLimit",
            Breach::DeadlineExceeded { .. } => "maxWallClockSeconds",
        }
    }

    /// The HTTP status of the denial: 508 Loop Detected for depth and cycles, 429 for the rate
    /// limit, 504 for a run past its deadline.
    pub fn status(&self) -> u16 {
        match self {
            Breach::Depth { .. } | Breach::Cycle { .. } => 508,
            Breach::RateLimited { .. } => 429,
            Breach::DeadlineExceeded { .. } => 504,
        }
    }

    /// The `Retry-After` value in whole seconds (rounded up), for a rate-limit breach.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Breach::RateLimited { retry_after, .. } => Some(retry_after_secs(*retry_after)),
            _ => None,
        }
    }
}

/// Rounds up, so a caller that waits the advertised seconds is admitted.
fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Shows the cycle from the callee's first appearance on the path: `research → orchestrator →
/// research`.
struct CycleDisplay<'a> {
    path: &'a [String],
    agent: &'a str,
}

impl fmt::Display for CycleDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let start = self
            .path
            .iter()
            .position(|a| a == self.agent)
            .unwrap_or(self.path.len());
        if start > 0 {
            f.write_str("… → ")?;
        }
        for hop in self.path.iter().skip(start) {
            write!(f, "{hop} → ")?;
        }
        f.write_str(self.agent)
    }
}

/// What a permitted hop looks like to the callee.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HopLimits {
    /// The callee's depth: the number of agents before it on the path.
    pub depth: u32,
    /// How many times the callee is already on the path.
    pub revisits: u32,
}

/// Checks a call to `callee` from the end of `path` (root first, callee not yet on it) against
/// the depth and cycle limits.
///
/// A cycle is reported before depth when both are broken: a loop is the cause, the depth only
/// its symptom.
pub fn check_hop(limits: &Limits, path: &[String], callee: &str) -> Result<HopLimits, Breach> {
    let depth = u32::try_from(path.len()).unwrap_or(u32::MAX);
    let revisits = path.iter().filter(|a| *a == callee).count();
    let revisits = u32::try_from(revisits).unwrap_or(u32::MAX);
    if revisits > limits.max_revisits {
        return Err(Breach::Cycle {
            agent: callee.to_owned(),
            path: path.to_vec(),
            revisits,
            max: limits.max_revisits,
        });
    }
    if depth > limits.max_delegation_depth {
        return Err(Breach::Depth {
            depth,
            max: limits.max_delegation_depth,
        });
    }
    Ok(HopLimits { depth, revisits })
}

/// Refuses a call once the run's deadline (unix milliseconds) is reached. A run without a
/// deadline never expires.
pub fn check_deadline(deadline_ms: Option<u64>, now_ms: u64) -> Result<(), Breach> {
    match deadline_ms {
        Some(deadline) if now_ms >= deadline => Err(Breach::DeadlineExceeded {
            run_deadline_ms: deadline,
            now_ms,
        }),
        _ => Ok(()),
    }
}

/// The deadline of a run that starts at `now_ms`, from `maxWallClockSeconds`.
pub fn run_deadline(limits: &Limits, now_ms: u64) -> Option<u64> {
    limits
        .max_wall_clock_seconds
        .map(|secs| now_ms.saturating_add(secs.saturating_mul(1000)))
}

/// How long a call to a child may take: `timeoutSeconds`, cut short by the run's deadline.
/// `None` means no limit.
pub fn call_timeout(limits: &Limits, deadline_ms: Option<u64>, now_ms: u64) -> Option<Duration> {
    let stall = limits.timeout_seconds.map(Duration::from_secs);
    let remaining = deadline_ms.map(|d| Duration::from_millis(d.saturating_sub(now_ms)));
    match (stall, remaining) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The invoke-rate limiter of one agent: GCRA (the generic cell rate algorithm) over a single
/// atomic.
///
/// For a rate of N per period, calls are spaced by an emission interval `T = period / N`, with
/// a burst of N from idle. The only state is the theoretical arrival time (TAT) of the next
/// call, in nanoseconds since the limiter's base instant; a call at `t` is admitted when
/// `max(TAT, t) - t <= (N - 1) T` and moves TAT on by `T`.
///
/// The rate is an argument of every check, not part of the state: a bundle update that keeps
/// the rate keeps the limiter exactly where it was, and one that changes it applies the new
/// spacing to the same history: time already booked stays booked. One limiter serves one sidecar (one agent), so its memory is
/// one word.
#[derive(Debug)]
pub struct RateLimiter {
    base: Instant,
    tat_nanos: AtomicU64,
}

impl RateLimiter {
    /// A limiter with a full burst. `base` is any instant no later than the first check; times
    /// are measured from it (instants before it count as it).
    pub fn new(base: Instant) -> Self {
        Self {
            base,
            tat_nanos: AtomicU64::new(0),
        }
    }

    /// Admits one call at `now`, or says how long to wait before one will be admitted. A rate
    /// with a count of 0 admits nothing.
    pub fn check(&self, rate: InvokeRate, now: Instant) -> Result<(), Duration> {
        if rate.count == 0 {
            return Err(rate.per);
        }
        let per = u64::try_from(rate.per.as_nanos()).unwrap_or(u64::MAX);
        let interval = per / u64::from(rate.count);
        let tolerance = interval.saturating_mul(u64::from(rate.count - 1));
        let t =
            u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX);
        let mut current = self.tat_nanos.load(Ordering::Acquire);
        loop {
            let tat = current.max(t);
            let wait = tat - t;
            if wait > tolerance {
                return Err(Duration::from_nanos(wait - tolerance));
            }
            match self.tat_nanos.compare_exchange_weak(
                current,
                tat.saturating_add(interval),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => current = actual,
            }
        }
    }

    /// Applies the agent's `invokeRateLimit`, if it has one, to a call at `now`.
    pub fn admit(&self, limits: &Limits, agent: &str, now: Instant) -> Result<(), Breach> {
        let Some(limit) = limits.invoke_rate_limit else {
            return Ok(());
        };
        self.check(limit, now)
            .map_err(|retry_after| Breach::RateLimited {
                agent: agent.to_owned(),
                limit,
                retry_after,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    fn path(agents: &[&str]) -> Vec<String> {
        agents.iter().map(|a| (*a).to_owned()).collect()
    }

    fn limits(max_depth: u32, max_revisits: u32) -> Limits {
        Limits {
            max_delegation_depth: max_depth,
            max_revisits,
            ..Limits::default()
        }
    }

    fn rate(s: &str) -> InvokeRate {
        s.parse().unwrap()
    }

    #[test]
    fn depth_5_under_a_limit_of_5_is_allowed() {
        let hop = check_hop(&limits(5, 0), &path(&["a", "b", "c", "d", "e"]), "f").unwrap();
        assert_eq!(
            hop,
            HopLimits {
                depth: 5,
                revisits: 0
            }
        );
    }

    #[test]
    fn depth_6_under_a_limit_of_5_is_refused() {
        let breach =
            check_hop(&limits(5, 0), &path(&["a", "b", "c", "d", "e", "f"]), "g").unwrap_err();
        assert_eq!(breach, Breach::Depth { depth: 6, max: 5 });
        assert_eq!(breach.rule(), "maxDelegationDepth");
        assert_eq!(breach.status(), 508);
        assert!(breach.to_string().contains("maxDelegationDepth"));
    }

    #[test]
    fn the_root_calling_its_first_child_is_depth_1() {
        let hop = check_hop(&limits(1, 0), &path(&["orchestrator"]), "research").unwrap();
        assert_eq!(hop.depth, 1);
        assert!(check_hop(&limits(0, 0), &path(&["orchestrator"]), "research").is_err());
    }

    #[test]
    fn a_to_b_to_a_re_entry_is_refused_by_default() {
        let breach = check_hop(
            &Limits::default(),
            &path(&["research", "orchestrator"]),
            "research",
        )
        .unwrap_err();
        assert_eq!(
            breach,
            Breach::Cycle {
                agent: "research".into(),
                path: path(&["research", "orchestrator"]),
                revisits: 1,
                max: 0,
            }
        );
        assert_eq!(breach.rule(), "cycles");
        assert_eq!(breach.status(), 508);
        let message = breach.to_string();
        assert!(
            message.contains("research → orchestrator → research"),
            "{message}"
        );
    }

    #[test]
    fn a_cycle_deeper_in_the_path_is_shown_from_where_it_starts() {
        let breach = check_hop(
            &Limits::default(),
            &path(&["frontdesk", "orchestrator", "research"]),
            "orchestrator",
        )
        .unwrap_err();
        assert!(
            breach
                .to_string()
                .contains("… → orchestrator → research → orchestrator"),
            "{breach}"
        );
    }

    #[test]
    fn one_revisit_is_allowed_when_the_budget_allows_one() {
        let limits = limits(10, 1);
        let hop = check_hop(
            &limits,
            &path(&["orchestrator", "research"]),
            "orchestrator",
        )
        .unwrap();
        assert_eq!(
            hop,
            HopLimits {
                depth: 2,
                revisits: 1
            }
        );
        let second = check_hop(
            &limits,
            &path(&["orchestrator", "research", "orchestrator", "research"]),
            "orchestrator",
        );
        assert!(matches!(
            second,
            Err(Breach::Cycle {
                revisits: 2,
                max: 1,
                ..
            })
        ));
    }

    #[test]
    fn a_cycle_is_reported_before_the_depth_it_causes() {
        let breach = check_hop(&limits(1, 0), &path(&["a", "b"]), "a").unwrap_err();
        assert_eq!(breach.rule(), "cycles");
    }

    #[test]
    fn a_run_past_its_deadline_is_refused() {
        assert_eq!(check_deadline(None, u64::MAX), Ok(()));
        assert_eq!(check_deadline(Some(1_000), 999), Ok(()));
        let breach = check_deadline(Some(1_000), 1_250).unwrap_err();
        assert_eq!(
            breach,
            Breach::DeadlineExceeded {
                run_deadline_ms: 1_000,
                now_ms: 1_250
            }
        );
        assert_eq!(
            (breach.rule(), breach.status()),
            ("maxWallClockSeconds", 504)
        );
        assert!(breach.to_string().contains("250 ms ago"));
        assert!(check_deadline(Some(1_000), 1_000).is_err());
    }

    #[test]
    fn a_run_deadline_comes_from_max_wall_clock_seconds() {
        let mut l = Limits::default();
        assert_eq!(run_deadline(&l, 5_000), None);
        l.max_wall_clock_seconds = Some(60);
        assert_eq!(run_deadline(&l, 5_000), Some(65_000));
        l.max_wall_clock_seconds = Some(u64::MAX);
        assert_eq!(run_deadline(&l, 5_000), Some(u64::MAX));
    }

    #[test]
    fn a_child_call_times_out_at_the_sooner_of_its_timeout_and_the_run_deadline() {
        let mut l = Limits::default();
        assert_eq!(call_timeout(&l, None, 0), None);
        assert_eq!(
            call_timeout(&l, Some(3_000), 1_000),
            Some(Duration::from_secs(2))
        );
        l.timeout_seconds = Some(30);
        assert_eq!(call_timeout(&l, None, 0), Some(Duration::from_secs(30)));
        assert_eq!(
            call_timeout(&l, Some(3_000), 1_000),
            Some(Duration::from_secs(2))
        );
        assert_eq!(call_timeout(&l, Some(3_000), 9_000), Some(Duration::ZERO));
    }

    #[test]
    fn the_rate_limit_trips_with_a_retry_after() {
        let base = Instant::now();
        let limiter = RateLimiter::new(base);
        let five_a_minute = rate("5/min");
        for _ in 0..5 {
            assert_eq!(limiter.check(five_a_minute, base), Ok(()));
        }
        // The burst is spent; the next slot opens one emission interval (12 s) later.
        assert_eq!(
            limiter.check(five_a_minute, base),
            Err(Duration::from_secs(12))
        );
        let l = Limits {
            invoke_rate_limit: Some(five_a_minute),
            ..Limits::default()
        };
        let breach = limiter.admit(&l, "research", base).unwrap_err();
        assert_eq!((breach.rule(), breach.status()), ("invokeRateLimit", 429));
        assert_eq!(breach.retry_after_secs(), Some(12));
        assert!(breach.to_string().contains("5/min"), "{breach}");
    }

    #[test]
    fn retry_after_is_honest() {
        let base = Instant::now();
        let limiter = RateLimiter::new(base);
        let r = rate("3/s");
        let mut now = base;
        for _ in 0..3 {
            limiter.check(r, now).unwrap();
        }
        for _ in 0..20 {
            let wait = limiter.check(r, now).unwrap_err();
            // A moment too early is still refused; after the full wait the call passes.
            assert!(
                limiter
                    .check(r, now + wait - Duration::from_nanos(1))
                    .is_err()
            );
            now += wait;
            assert_eq!(
                limiter.check(r, now),
                Ok(()),
                "refused after waiting {wait:?}"
            );
        }
    }

    #[test]
    fn a_policy_update_does_not_reset_the_rate_limit() {
        let base = Instant::now();
        let limiter = RateLimiter::new(base);
        for _ in 0..5 {
            limiter.check(rate("5/min"), base).unwrap();
        }
        // The bundle is replaced; its rate is an equal, newly parsed value.
        let updated = rate("5/minute");
        assert!(limiter.check(updated, base).is_err());
        // A looser rate applies to the same history: the minute booked by five calls at 5/min
        // stays booked, but at 60/min the next slot opens after 1 s instead of 12 s.
        let looser = rate("60/min");
        assert_eq!(limiter.check(looser, base), Err(Duration::from_secs(1)));
        assert_eq!(limiter.check(looser, base + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn an_idle_limiter_refills_to_a_full_burst_and_no_more() {
        let base = Instant::now();
        let limiter = RateLimiter::new(base);
        let r = rate("4/s");
        for _ in 0..4 {
            limiter.check(r, base).unwrap();
        }
        let later = base + Duration::from_secs(3600);
        for _ in 0..4 {
            limiter.check(r, later).unwrap();
        }
        assert!(limiter.check(r, later).is_err());
    }

    #[test]
    fn an_agent_without_a_rate_limit_is_never_refused() {
        let base = Instant::now();
        let limiter = RateLimiter::new(base);
        for _ in 0..1_000 {
            assert!(limiter.admit(&Limits::default(), "research", base).is_ok());
        }
    }

    #[test]
    fn concurrent_callers_cannot_exceed_the_burst() {
        let base = Instant::now();
        let limiter = Arc::new(RateLimiter::new(base));
        let admitted = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (limiter, admitted) = (limiter.clone(), admitted.clone());
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        if limiter.check(rate("100/min"), base).is_ok() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(admitted.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn a_rate_of_zero_admits_nothing() {
        let base = Instant::now();
        let limiter = RateLimiter::new(base);
        let zero = InvokeRate {
            count: 0,
            per: Duration::from_secs(60),
        };
        assert_eq!(limiter.check(zero, base), Err(Duration::from_secs(60)));
    }
}
