//! Leader election with a `coordination.k8s.io` Lease: one replica writes status, Services and
//! trust bundles; every replica serves bundles and CSRs.
//!
//! The holder renews every [`RENEW_EVERY`]; another replica takes the Lease over once it has
//! gone unrenewed for its `leaseDurationSeconds`. Updates carry the Lease's resourceVersion, so
//! two replicas racing for it cannot both win. A holder that cannot renew steps down before its
//! Lease expires, so two leaders never write at once for longer than clock skew.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// How long a Lease stays valid without renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews, and others look.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// What a replica should do with the Lease as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// It holds the Lease: renew it.
    Renew,
    /// Nobody holds it, or the holder stopped renewing: take it.
    TakeOver,
    /// Someone else holds it.
    Follow,
}

/// Decides from the Lease's spec, this replica's identity and the time.
pub fn decide(spec: &LeaseSpec, me: &str, now: Timestamp) -> Decision {
    match spec.holder_identity.as_deref() {
        Some(holder) if holder == me => Decision::Renew,
        None | Some("") => Decision::TakeOver,
        Some(_) => {
            let duration = SignedDuration::from_secs(i64::from(
                spec.lease_duration_seconds
                    .unwrap_or(LEASE_DURATION.as_secs() as i32),
            ));
            match &spec.renew_time {
                Some(MicroTime(renewed)) if *renewed + duration > now => Decision::Follow,
                _ => Decision::TakeOver,
            }
        }
    }
}

fn spec_for(
    me: &str,
    now: Timestamp,
    previous: Option<&LeaseSpec>,
    decision: Decision,
) -> LeaseSpec {
    let transitions = previous.and_then(|p| p.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(me.to_owned()),
        lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
        acquire_time: match decision {
            Decision::Renew => previous.and_then(|p| p.acquire_time.clone()),
            _ => Some(MicroTime(now)),
        }
        .or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(match (decision, previous) {
            (Decision::TakeOver, Some(_)) => transitions + 1,
            _ => transitions,
        }),
        ..Default::default()
    }
}

/// One round: whether this replica holds the Lease afterwards.
pub async fn round(api: &Api<Lease>, name: &str, me: &str) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..Default::default()
            },
            spec: Some(spec_for(me, now, None, Decision::TakeOver)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_already_exists() || s.is_conflict() => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let decision = decide(&spec, me, now);
    if decision == Decision::Follow {
        return Ok(false);
    }
    lease.spec = Some(spec_for(me, now, Some(&spec), decision));
    // `replace` sends the resourceVersion read above: a concurrent change makes this a conflict.
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => {
            if decision == Decision::TakeOver {
                tracing::info!(lease = name, holder = me, "took the leader Lease");
            }
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.is_conflict() => Ok(false),
        Err(e) => Err(e),
    }
}

/// Keeps competing for the Lease; `leading` says whether this replica holds it. Runs forever.
pub async fn run(api: Api<Lease>, name: String, me: String, leading: watch::Sender<bool>) {
    let mut last_held: Option<tokio::time::Instant> = None;
    loop {
        let held = match round(&api, &name, &me).await {
            Ok(held) => {
                last_held = held.then(tokio::time::Instant::now);
                held
            }
            Err(e) => {
                tracing::warn!(lease = %name, error = %e, "cannot reach the leader Lease");
                // Keep leading only while the Lease we last renewed is surely still ours.
                last_held.is_some_and(|t| t.elapsed() < LEASE_DURATION - RENEW_EVERY)
            }
        };
        leading.send_if_modified(|l| {
            let changed = *l != held;
            *l = held;
            changed
        });
        tokio::time::sleep(RENEW_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            lease_transitions: Some(2),
            ..Default::default()
        }
    }

    #[test]
    fn a_live_lease_is_followed_and_an_expired_one_taken_over() {
        let at = |s| Timestamp::from_second(s).unwrap();
        assert_eq!(decide(&held_by("a", 100), "b", at(110)), Decision::Follow);
        assert_eq!(decide(&held_by("a", 100), "b", at(116)), Decision::TakeOver);
        assert_eq!(decide(&held_by("b", 100), "b", at(200)), Decision::Renew);
        assert_eq!(
            decide(&LeaseSpec::default(), "b", at(1)),
            Decision::TakeOver
        );
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let now = Timestamp::from_second(500).unwrap();
        let prev = held_by("a", 100);
        assert_eq!(
            spec_for("b", now, Some(&prev), Decision::TakeOver).lease_transitions,
            Some(3)
        );
        let renewed = spec_for("a", now, Some(&prev), Decision::Renew);
        assert_eq!(renewed.lease_transitions, Some(2));
        assert_eq!(renewed.renew_time, Some(MicroTime(now)));
    }
}
