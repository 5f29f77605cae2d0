//! SQLite: one file, one budget service replica. Durability comes from WAL with
//! `synchronous = FULL` (every commit is fsynced before it returns); concurrency from
//! `BEGIN IMMEDIATE`, which takes the database's write lock before the transaction reads, so two
//! leases can never both read the same headroom.

use std::path::Path;
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::Executor;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};

use super::StoreError;

pub(super) const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("migrations/sqlite/0001_init.sql")),
    (
        2,
        "attribution",
        include_str!("migrations/sqlite/0002_attribution.sql"),
    ),
    (3, "calls", include_str!("migrations/sqlite/0003_calls.sql")),
    (
        4,
        "quotas",
        include_str!("migrations/sqlite/0004_quotas.sql"),
    ),
];

pub(super) const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";

/// How long a writer waits for another connection's (or process's) write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Set on every connection: these pragmas are per connection, except `journal_mode`, which
/// sticks to the file.
const PRAGMAS: &[&str] = &[
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
];

pub(super) async fn connect(path: &Path) -> Result<AnyPool, StoreError> {
    let target = path.display().to_string();
    let Some(name) = path.to_str() else {
        return Err(StoreError::UnsupportedUrl(target));
    };
    // The driver reads a URL and percent-decodes the file name.
    let escaped = name
        .replace('%', "%25")
        .replace('?', "%3F")
        .replace('#', "%23");
    let url = format!("sqlite://{escaped}?mode=rwc");
    sqlx::any::install_default_drivers();
    let options: AnyConnectOptions = url.parse().map_err(|source| StoreError::Connect {
        target: target.clone(),
        source,
    })?;
    AnyPoolOptions::new()
        .max_connections(4)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                conn.execute(
                    format!("PRAGMA busy_timeout = {}", BUSY_TIMEOUT.as_millis()).as_str(),
                )
                .await?;
                for pragma in PRAGMAS {
                    conn.execute(*pragma).await?;
                }
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(|source| StoreError::Connect { target, source })
}
