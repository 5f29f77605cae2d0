//! Exponential backoff with jitter, for every retry against the control plane.
//!
//! The delay after the n-th consecutive failure is drawn uniformly from the upper half of
//! `min(max, initial * 2^(n-1))`, so a thousand sidecars that lost the control plane together do
//! not come back in lockstep, yet none waits less than half its step.

use std::time::Duration;

/// Retry timing. `Default` suits production; tests shorten it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The step after the first failure.
    pub initial: Duration,
    /// The largest step.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay after `failures` consecutive failures (1 for the first), for a jitter drawn in
    /// `[0, 1)`. Pure, so the schedule can be tested exactly.
    pub fn delay_with(&self, failures: u32, jitter: f64) -> Duration {
        let exponent = failures.saturating_sub(1).min(31);
        let step = self.initial.saturating_mul(1u32 << exponent).min(self.max);
        let half = step / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// The delay after `failures` consecutive failures, with fresh jitter.
    pub fn delay(&self, failures: u32) -> Duration {
        self.delay_with(failures, jitter())
    }
}

/// A uniform draw in `[0, 1)` from the system's random source; the midpoint if it fails, which
/// costs only the spread, never the retry.
pub fn jitter() -> f64 {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut bytes = [0u8; 4];
    match SystemRandom::new().fill(&mut bytes) {
        Ok(()) => f64::from(u32::from_le_bytes(bytes)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.5,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_step_doubles_until_the_cap() {
        let b = Backoff {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(10),
        };
        let full: Vec<u64> = (1..=6).map(|n| b.delay_with(n, 1.0).as_secs()).collect();
        assert_eq!(full, vec![1, 2, 4, 8, 10, 10]);
        assert_eq!(b.delay_with(1_000, 1.0), Duration::from_secs(10));
    }

    #[test]
    fn jitter_keeps_at_least_half_the_step() {
        let b = Backoff::default();
        for n in 1..20 {
            let floor = b.delay_with(n, 0.0);
            let ceil = b.delay_with(n, 1.0);
            assert_eq!(floor * 2, ceil);
            let drawn = b.delay(n);
            assert!(
                drawn >= floor && drawn <= ceil,
                "{drawn:?} outside {floor:?}..{ceil:?}"
            );
        }
    }
}
