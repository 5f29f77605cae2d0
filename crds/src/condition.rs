//! Status conditions shared by every kind: `Ready`, `Accepted`, `ResolvedRefs`.
//!
//! Conditions follow the Kubernetes conventions: one entry per type, `lastTransitionTime` moves
//! only when the status flips, and `observedGeneration` says which spec the condition is about.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub const READY: &str = "Ready";
pub const ACCEPTED: &str = "Accepted";
pub const RESOLVED_REFS: &str = "ResolvedRefs";

/// What a controller wants a condition to say; [`upsert`] turns it into a [`Condition`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub type_: &'static str,
    pub ok: bool,
    pub reason: String,
    pub message: String,
}

impl Wanted {
    pub fn ok(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_,
            ok: true,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }

    pub fn failed(type_: &'static str, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_,
            ok: false,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

/// Sets `wanted` in `conditions`. Returns whether anything changed, so callers write status only
/// on transitions.
pub fn upsert(
    conditions: &mut Vec<Condition>,
    wanted: &Wanted,
    generation: Option<i64>,
    now: Timestamp,
) -> bool {
    let status = if wanted.ok { "True" } else { "False" };
    match conditions.iter_mut().find(|c| c.type_ == wanted.type_) {
        Some(c)
            if c.status == status
                && c.reason == wanted.reason
                && c.message == wanted.message
                && c.observed_generation == generation =>
        {
            false
        }
        Some(c) => {
            if c.status != status {
                c.last_transition_time = Time(now);
            }
            c.status = status.to_owned();
            c.reason.clone_from(&wanted.reason);
            c.message.clone_from(&wanted.message);
            c.observed_generation = generation;
            true
        }
        None => {
            conditions.push(Condition {
                type_: wanted.type_.to_owned(),
                status: status.to_owned(),
                reason: wanted.reason.clone(),
                message: wanted.message.clone(),
                observed_generation: generation,
                last_transition_time: Time(now),
            });
            true
        }
    }
}

/// Whether the condition of `type_` is present and `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_when_status_flips() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let t2 = Timestamp::from_second(3_000).unwrap();
        let mut cs = Vec::new();
        assert!(upsert(
            &mut cs,
            &Wanted::ok(READY, "Issued", "ok"),
            Some(1),
            t0
        ));
        assert!(!upsert(
            &mut cs,
            &Wanted::ok(READY, "Issued", "ok"),
            Some(1),
            t1
        ));
        assert!(upsert(
            &mut cs,
            &Wanted::ok(READY, "Issued", "renewed"),
            Some(2),
            t1
        ));
        assert_eq!(cs[0].last_transition_time, Time(t0));
        assert!(upsert(
            &mut cs,
            &Wanted::failed(READY, "Expired", "x"),
            Some(2),
            t2
        ));
        assert_eq!(cs[0].last_transition_time, Time(t2));
        assert!(!is_true(&cs, READY));
        assert_eq!(cs.len(), 1);
    }
}
