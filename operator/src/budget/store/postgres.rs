//! PostgreSQL: several budget service replicas on one database. A change locks the run's row
//! (`SELECT … FOR UPDATE`) before it reads the run's headroom, so concurrent leases of one run
//! queue on that row while other runs go on in parallel. A batch that touches several runs
//! locks them in sorted order, so two batches never deadlock.

use std::time::Duration;

use sqlx::AnyPool;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};

use super::StoreError;

pub(super) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("migrations/postgres/0001_init.sql")),
    (
        2,
        "attribution",
        include_str!("migrations/postgres/0002_attribution.sql"),
    ),
    (
        3,
        "calls",
        include_str!("migrations/postgres/0003_calls.sql"),
    ),
    (
        4,
        "quotas",
        include_str!("migrations/postgres/0004_quotas.sql"),
    ),
];

/// A halt's sequence number is drawn when it is inserted, but transactions commit in any order:
/// a reader could see seq 6 before seq 5 commits and then never ask for 5. Holding this lock
/// from before the insert until commit makes sequence order commit order. Halts are rare; the
/// lock still lets readers in.
pub(super) const SERIALIZE_HALTS: &str = "LOCK TABLE halts IN EXCLUSIVE MODE";

/// Reads of one summary see one snapshot.
pub(super) const SNAPSHOT_READS: &str =
    "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY";

pub(super) async fn connect(url: &str) -> Result<AnyPool, StoreError> {
    // Never echo a password into logs.
    let target = redact(url);
    sqlx::any::install_default_drivers();
    let options: AnyConnectOptions = url.parse().map_err(|source| StoreError::Connect {
        target: target.clone(),
        source,
    })?;
    AnyPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|source| StoreError::Connect { target, source })
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_connection_error_never_shows_the_password() {
        assert_eq!(
            super::redact("postgres://budget:hunter2@db:5432/ringfence"),
            "postgres://budget:***@db:5432/ringfence"
        );
        assert_eq!(
            super::redact("postgres://postgres@127.0.0.1/postgres"),
            "postgres://postgres@127.0.0.1/postgres"
        );
    }
}
