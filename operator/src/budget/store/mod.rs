//! The budget service's durable store: one API over SQLite (the default, one replica) and
//! PostgreSQL (several replicas on one database).
//!
//! Every change is one transaction that first takes the run's lock — `BEGIN IMMEDIATE` in SQLite
//! (the whole database), `SELECT … FOR UPDATE` on the run's row in PostgreSQL — then reads the
//! run, decides with the pure functions of [`account`], and writes. A call that returned `Ok` has
//! committed: SQLite runs in WAL mode with `synchronous = FULL`, so a `kill -9` (or a power cut)
//! right after loses nothing that was acknowledged.
//!
//! Queries go through sqlx's runtime API over its `Any` driver, so both backends share one code
//! path; the few places where they differ (locking, the halt sequence) are in `sqlite.rs` and
//! `postgres.rs`. The schema is versioned with sqlx's migration table (`_sqlx_migrations`), from
//! the SQL files under `migrations/<backend>/`, embedded in the binary.

use std::borrow::Cow;
use std::path::Path;

use ringfence_crds::budget::OnBreach;
use sqlx::AnyPool;
use sqlx::any::AnyRow;
use sqlx::migrate::{Migrate, MigrateError, Migration, MigrationType};
use sqlx::{Any, Row, Transaction};

pub mod account;
mod ledger;
mod postgres;
mod quota;
mod spend;
mod sqlite;

pub use quota::LEASE_HOLD_MS;
pub use spend::HALT_PAGE;

/// Errors of the budget store. Each says what to check.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot open the budget store {target}: {source}; check that the SQLite file's directory \
         exists and is writable, or that PostgreSQL is up and the URL's user may connect"
    )]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "budget store location {0:?} is neither a file path, a sqlite: URL nor a postgres:// URL"
    )]
    UnsupportedUrl(String),
    #[error(
        "migrating the budget store schema failed: {0}; check that the database user may create \
         tables and that nobody edited an applied migration"
    )]
    Migrate(#[source] MigrateError),
    #[error(
        "the budget store's schema is at version {found}, newer than this binary knows ({known}); \
         run a ringfence at least as new as the one that migrated it"
    )]
    NewerSchema { found: i64, known: i64 },
    #[error(
        "budget store: {op} failed: {source}; check that the database is reachable and not full"
    )]
    Query {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error(
        "{field} = {value} does not fit the store (at most {max}); check the sidecar that sent it",
        max = i64::MAX
    )]
    TooLarge { field: &'static str, value: u64 },
    #[error("{what}; check the sidecar that sent it")]
    Invalid { what: String },
    #[error("reported spend for run {run_id} overflows 64 bits; check the sidecar that sent it")]
    Overflow { run_id: String },
    #[error("the budget store holds an invalid {what}; check for manual edits of the database")]
    Corrupt { what: String },
}

/// Adds what was being done to a database error.
trait Op<T> {
    fn op(self, op: &'static str) -> Result<T, StoreError>;
}

impl<T> Op<T> for Result<T, sqlx::Error> {
    fn op(self, op: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Query { op, source })
    }
}

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The budget store. Cheap to clone: clones share one connection pool.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Opens (creating and migrating as needed) the store at `target`: a `postgres://` or
    /// `postgresql://` URL, a `sqlite:` URL, or a plain path to a SQLite file.
    pub async fn open(target: &str) -> Result<Store, StoreError> {
        if target.starts_with("postgres://") || target.starts_with("postgresql://") {
            Store::open_postgres(target).await
        } else if let Some(rest) = target.strip_prefix("sqlite:") {
            let path = rest.strip_prefix("//").unwrap_or(rest);
            Store::open_sqlite(Path::new(path)).await
        } else if target.contains("://") {
            Err(StoreError::UnsupportedUrl(target.to_owned()))
        } else {
            Store::open_sqlite(Path::new(target)).await
        }
    }

    /// Opens the SQLite file at `path`, creating it if missing.
    pub async fn open_sqlite(path: &Path) -> Result<Store, StoreError> {
        let pool = sqlite::connect(path).await?;
        Store::migrated(pool, Backend::Sqlite).await
    }

    /// Opens the PostgreSQL database at `url`. To keep several stores in one database, give each
    /// its own schema with `?options=-c%20search_path%3D<schema>`.
    pub async fn open_postgres(url: &str) -> Result<Store, StoreError> {
        let pool = postgres::connect(url).await?;
        Store::migrated(pool, Backend::Postgres).await
    }

    async fn migrated(pool: AnyPool, backend: Backend) -> Result<Store, StoreError> {
        let store = Store { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes every connection; later calls fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// The versions of the migrations this binary carries, oldest first.
    pub fn known_schema_versions(&self) -> Vec<i64> {
        self.migrations().iter().map(|m| m.version).collect()
    }

    /// The versions applied to the database, oldest first.
    pub async fn applied_schema_versions(&self) -> Result<Vec<i64>, StoreError> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .op("connecting to read the schema version")?;
        let applied = conn
            .list_applied_migrations()
            .await
            .map_err(StoreError::Migrate)?;
        Ok(applied.into_iter().map(|m| m.version).collect())
    }

    fn migrations(&self) -> Vec<Migration> {
        let files: &[(i64, &'static str, &'static str)] = match self.backend {
            Backend::Sqlite => sqlite::MIGRATIONS,
            Backend::Postgres => postgres::MIGRATIONS,
        };
        files
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    Cow::Borrowed(*sql),
                    false,
                )
            })
            .collect()
    }

    /// Applies the migrations the database lacks, under sqlx's migration lock (a PostgreSQL
    /// advisory lock), so replicas starting together migrate once. Re-running is a no-op.
    async fn migrate(&self) -> Result<(), StoreError> {
        let migrations = self.migrations();
        let known = migrations.last().map_or(0, |m| m.version);
        let mut conn = self.pool.acquire().await.op("connecting to migrate")?;
        conn.lock().await.map_err(StoreError::Migrate)?;
        let result = async {
            conn.ensure_migrations_table()
                .await
                .map_err(StoreError::Migrate)?;
            if let Some(version) = conn.dirty_version().await.map_err(StoreError::Migrate)? {
                return Err(StoreError::Migrate(MigrateError::Dirty(version)));
            }
            let applied = conn
                .list_applied_migrations()
                .await
                .map_err(StoreError::Migrate)?;
            if let Some(newer) = applied.iter().map(|a| a.version).find(|v| *v > known) {
                return Err(StoreError::NewerSchema {
                    found: newer,
                    known,
                });
            }
            for migration in &migrations {
                match applied.iter().find(|a| a.version == migration.version) {
                    Some(done) if done.checksum != migration.checksum => {
                        return Err(StoreError::Migrate(MigrateError::VersionMismatch(
                            migration.version,
                        )));
                    }
                    Some(_) => {}
                    None => {
                        conn.apply(migration).await.map_err(StoreError::Migrate)?;
                    }
                }
            }
            Ok(())
        }
        .await;
        let unlocked = conn.unlock().await.map_err(StoreError::Migrate);
        result.and(unlocked)
    }

    /// A transaction that holds the write lock from its first statement in SQLite; in
    /// PostgreSQL, rows are locked as the statements reach them ([`Store::lock_run`]).
    async fn begin_write(&self) -> Result<Transaction<'static, Any>, StoreError> {
        match self.backend {
            Backend::Sqlite => self.pool.begin_with(sqlite::BEGIN_WRITE).await,
            Backend::Postgres => self.pool.begin().await,
        }
        .op("starting a transaction")
    }

    /// A transaction whose reads all see one snapshot.
    async fn begin_read(&self) -> Result<Transaction<'static, Any>, StoreError> {
        let mut tx = self.pool.begin().await.op("starting a read transaction")?;
        if let Some(set) = match self.backend {
            Backend::Sqlite => None,
            Backend::Postgres => Some(postgres::SNAPSHOT_READS),
        } {
            sqlx::query(set)
                .execute(&mut *tx)
                .await
                .op("starting a read transaction")?;
        }
        Ok(tx)
    }

    /// Reads a run's row inside a write transaction, locking it until commit.
    async fn lock_run(
        &self,
        tx: &mut Transaction<'static, Any>,
        run_id: &str,
    ) -> Result<Option<RunRow>, StoreError> {
        let sql = match self.backend {
            Backend::Sqlite => format!("{SELECT_RUN} WHERE run_id = $1"),
            Backend::Postgres => format!("{SELECT_RUN} WHERE run_id = $1 FOR UPDATE"),
        };
        let row = sqlx::query(&sql)
            .bind(run_id)
            .fetch_optional(&mut **tx)
            .await
            .op("reading a run")?;
        row.as_ref().map(RunRow::from_row).transpose()
    }

    /// Makes halt sequence numbers commit in order (see `postgres::SERIALIZE_HALTS`).
    async fn serialize_halts(&self, tx: &mut Transaction<'static, Any>) -> Result<(), StoreError> {
        if self.backend == Backend::Postgres {
            sqlx::query(postgres::SERIALIZE_HALTS)
                .execute(&mut **tx)
                .await
                .op("locking the halt stream")?;
        }
        Ok(())
    }
}

/// The columns [`RunRow::from_row`] reads, in any query over `runs`.
const SELECT_RUN: &str = "SELECT run_id, root_agent, user_name, max_tokens, max_micros, \
     deadline_ms, on_breach, budgets, status, opened_at_ms, halted_at_ms, halt_reason, \
     completed_at_ms, tokens_in, tokens_out, micros, calls FROM runs";

/// A row of `runs`, decoded.
#[derive(Debug, Clone)]
struct RunRow {
    record: crate::budget::RunRecord,
    spent: crate::budget::Spend,
}

impl RunRow {
    fn from_row(row: &AnyRow) -> Result<RunRow, StoreError> {
        use crate::budget::{RunLimits, RunRecord, RunStatus, Spend};
        let run_id: String = get(row, "run_id")?;
        let status: String = get(row, "status")?;
        let on_breach: String = get(row, "on_breach")?;
        let budgets: String = get(row, "budgets")?;
        let record = RunRecord {
            root_agent: get(row, "root_agent")?,
            user: get(row, "user_name")?,
            limits: RunLimits {
                max_tokens: opt_u64(row, "max_tokens")?,
                max_cost_micros: opt_u64(row, "max_micros")?,
                deadline_ms: opt_u64(row, "deadline_ms")?,
                on_breach: parse_on_breach(&on_breach).ok_or_else(|| StoreError::Corrupt {
                    what: format!("onBreach {on_breach:?} of run {run_id}"),
                })?,
                budgets: serde_json::from_str(&budgets).map_err(|e| StoreError::Corrupt {
                    what: format!("budget list of run {run_id} ({e})"),
                })?,
            },
            status: RunStatus::parse(&status).ok_or_else(|| StoreError::Corrupt {
                what: format!("status {status:?} of run {run_id}"),
            })?,
            opened_at_ms: get_u64(row, "opened_at_ms")?,
            halted_at_ms: opt_u64(row, "halted_at_ms")?,
            halt_reason: get(row, "halt_reason")?,
            completed_at_ms: opt_u64(row, "completed_at_ms")?,
            run_id,
        };
        let spent = Spend {
            tokens_in: get_u64(row, "tokens_in")?,
            tokens_out: get_u64(row, "tokens_out")?,
            micros: get_u64(row, "micros")?,
            calls: get_u64(row, "calls")?,
        };
        Ok(RunRow { record, spent })
    }
}

pub(super) fn on_breach_str(on_breach: OnBreach) -> &'static str {
    match on_breach {
        OnBreach::HaltAndAlert => "HaltAndAlert",
        OnBreach::Halt => "Halt",
        OnBreach::AlertOnly => "AlertOnly",
    }
}

fn parse_on_breach(s: &str) -> Option<OnBreach> {
    match s {
        "HaltAndAlert" => Some(OnBreach::HaltAndAlert),
        "Halt" => Some(OnBreach::Halt),
        "AlertOnly" => Some(OnBreach::AlertOnly),
        _ => None,
    }
}

/// A counter as the database holds it (BIGINT is signed).
fn db(field: &'static str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::TooLarge { field, value })
}

fn db_opt(field: &'static str, value: Option<u64>) -> Result<Option<i64>, StoreError> {
    value.map(|v| db(field, v)).transpose()
}

fn get<'r, T>(row: &'r AnyRow, column: &'static str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, Any> + sqlx::Type<Any>,
{
    row.try_get(column).map_err(|e| StoreError::Corrupt {
        what: format!("column {column} ({e})"),
    })
}

fn to_u64(column: &'static str, value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        what: format!("negative {column} ({value})"),
    })
}

fn get_u64(row: &AnyRow, column: &'static str) -> Result<u64, StoreError> {
    to_u64(column, get::<i64>(row, column)?)
}

fn opt_u64(row: &AnyRow, column: &'static str) -> Result<Option<u64>, StoreError> {
    get::<Option<i64>>(row, column)?
        .map(|v| to_u64(column, v))
        .transpose()
}
