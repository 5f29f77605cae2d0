//! The retry budget (Finagle's and Linkerd's): over the last `budgetWindowSeconds`, retries may
//! add at most `budgetPercent` of the calls made, plus `minRetriesPerSecond` for every second of
//! the window so a quiet agent can still retry. A hard-down callee then sees at most
//! `calls · (1 + percent) + floor · window` requests per window, however many attempts each call
//! may make.
//!
//! One ring of per-second counters per callee, in one sidecar. The lock is held for a few
//! additions and never across an await; time is an argument, so tests drive it exactly.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use ringfence_crds::retry::RetryPolicy;

/// The longest window counted, in seconds (the ring's largest size).
const MAX_WINDOW: u64 = 600;

/// Calls and retries of one second.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    second: u64,
    calls: u64,
    retries: u64,
}

/// The last `window` seconds of one callee's calls and retries.
#[derive(Debug)]
struct Ring {
    slots: Vec<Slot>,
}

impl Ring {
    fn new(window: u64) -> Self {
        Self {
            slots: vec![Slot::default(); usize::try_from(window).unwrap_or(1)],
        }
    }

    fn window(&self) -> u64 {
        self.slots.len() as u64
    }

    /// The slot of `second`, cleared when it last held an older second.
    fn slot(&mut self, second: u64) -> &mut Slot {
        let len = self.window();
        let i = usize::try_from(second % len).unwrap_or(0);
        let slot = &mut self.slots[i];
        if slot.second != second {
            *slot = Slot {
                second,
                ..Slot::default()
            };
        }
        slot
    }

    /// Calls and retries of the window ending at `second`.
    fn totals(&self, second: u64) -> (u64, u64) {
        let oldest = second.saturating_sub(self.window() - 1);
        self.slots
            .iter()
            .filter(|s| s.second >= oldest && s.second <= second)
            .fold((0, 0), |(c, r), s| (c + s.calls, r + s.retries))
    }
}

/// The retry budgets of one sidecar, one per callee. Survives bundle updates: a new policy with
/// the same window keeps the counts; a new window starts counting afresh.
#[derive(Debug)]
pub struct RetryBudgets {
    base: Instant,
    rings: Mutex<HashMap<String, Ring>>,
}

impl RetryBudgets {
    /// Budgets measuring time from `base`, any instant no later than the first call.
    pub fn new(base: Instant) -> Self {
        Self {
            base,
            rings: Mutex::new(HashMap::new()),
        }
    }

    fn with_ring<T>(
        &self,
        callee: &str,
        policy: &RetryPolicy,
        now: Instant,
        f: impl FnOnce(&mut Ring, u64) -> T,
    ) -> T {
        let window = policy.budget_window_seconds.clamp(1, MAX_WINDOW);
        let second = now.saturating_duration_since(self.base).as_secs();
        let mut rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
        // Only callees the bundle names reach here, so the map stays as small as the bundle.
        let ring = match rings.get_mut(callee) {
            Some(r) => r,
            None => rings
                .entry(callee.to_owned())
                .or_insert_with(|| Ring::new(window)),
        };
        if ring.window() != window {
            *ring = Ring::new(window);
        }
        f(ring, second)
    }

    /// Counts one call (its first attempt) to `callee` at `now`.
    pub fn deposit(&self, callee: &str, policy: &RetryPolicy, now: Instant) {
        self.with_ring(callee, policy, now, |ring, second| {
            ring.slot(second).calls += 1;
        });
    }

    /// Takes one retry to `callee` at `now` from the budget, or says there is none left.
    pub fn withdraw(&self, callee: &str, policy: &RetryPolicy, now: Instant) -> bool {
        self.with_ring(callee, policy, now, |ring, second| {
            let (calls, retries) = ring.totals(second);
            let allowed = calls.saturating_mul(u64::from(policy.budget_percent)) / 100
                + u64::from(policy.min_retries_per_second).saturating_mul(ring.window());
            if retries >= allowed {
                return false;
            }
            ring.slot(second).retries += 1;
            true
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn policy(percent: u32, floor: u32, window: u64) -> RetryPolicy {
        RetryPolicy {
            budget_percent: percent,
            min_retries_per_second: floor,
            budget_window_seconds: window,
            ..RetryPolicy::default()
        }
    }

    fn drain(b: &RetryBudgets, callee: &str, p: &RetryPolicy, now: Instant) -> u64 {
        let mut n = 0;
        while b.withdraw(callee, p, now) {
            n += 1;
        }
        n
    }

    #[test]
    fn retries_are_at_most_the_percentage_of_calls_plus_the_floor() {
        let t0 = Instant::now();
        let b = RetryBudgets::new(t0);
        let p = policy(20, 1, 10);
        for _ in 0..500 {
            b.deposit("research", &p, t0);
        }
        // 20% of 500, plus 1/s over a 10 s window.
        assert_eq!(drain(&b, "research", &p, t0), 100 + 10);
    }

    #[test]
    fn a_quiet_agent_still_gets_the_floor_and_no_more() {
        let t0 = Instant::now();
        let b = RetryBudgets::new(t0);
        let p = policy(20, 2, 5);
        b.deposit("research", &p, t0);
        assert_eq!(drain(&b, "research", &p, t0), 10);
    }

    #[test]
    fn the_budget_refills_as_the_window_slides_past_old_retries() {
        let t0 = Instant::now();
        let b = RetryBudgets::new(t0);
        let p = policy(0, 1, 3);
        assert_eq!(drain(&b, "research", &p, t0), 3);
        assert!(!b.withdraw("research", &p, t0 + Duration::from_secs(2)));
        // At 3 s the retries of second 0 have left the window.
        assert_eq!(drain(&b, "research", &p, t0 + Duration::from_secs(3)), 3);
    }

    #[test]
    fn old_calls_stop_paying_for_retries() {
        let t0 = Instant::now();
        let b = RetryBudgets::new(t0);
        let p = policy(50, 0, 2);
        for _ in 0..10 {
            b.deposit("research", &p, t0);
        }
        assert_eq!(drain(&b, "research", &p, t0 + Duration::from_secs(1)), 5);
        assert_eq!(drain(&b, "research", &p, t0 + Duration::from_secs(10)), 0);
    }

    #[test]
    fn each_callee_has_its_own_budget() {
        let t0 = Instant::now();
        let b = RetryBudgets::new(t0);
        let p = policy(0, 1, 1);
        assert!(b.withdraw("research", &p, t0));
        assert!(!b.withdraw("research", &p, t0));
        assert!(b.withdraw("writer", &p, t0));
    }

    #[test]
    fn a_new_window_starts_counting_afresh() {
        let t0 = Instant::now();
        let b = RetryBudgets::new(t0);
        assert_eq!(drain(&b, "research", &policy(0, 1, 2), t0), 2);
        assert_eq!(drain(&b, "research", &policy(0, 1, 4), t0), 4);
    }
}
