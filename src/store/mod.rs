//! The store: the only module that speaks SQL.
//!
//! Every query runs inside a transaction that first declares the caller's user id
//! (`set_config('app.current_user_id', …, true)`), so row-level security admits only that user's rows even
//! if a query forgot its `user_id` filter. The same statement takes the user's advisory lock: the exclusive
//! form for a push, the shared form for a read. Together with the stamping trigger in `schema.sql` that is
//! what makes the cursor guarantee hold (see ARCHITECTURE.md, "The cursor").

mod chunks;
mod compact;
mod error;
mod fair;
mod group;
mod known;
mod listen;
mod pool;
mod push;
mod read;
pub(crate) mod records;
mod timestamp;
mod user_tx;
mod write;

use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::protocol::time::Micros;

pub use error::{Cause, StoreError};
pub use group::{GroupStats, Hint};
pub use known::KnownStamps;
pub use pool::PoolStatus;
pub(crate) use pool::{Pool, PooledConnection};
use read::{log_page, page_params, read_page, Page, Tables, CLOCK_ADVANCE};
#[cfg(feature = "test-support")]
pub use user_tx::USER_LOCK_CLASS;
use user_tx::{Lock, UserTx};

/// The schema, applied at start-up.
pub const SCHEMA_SQL: &str = include_str!("../../schema.sql");

/// Store tuning that comes from configuration.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub pool_size: usize,
    pub acquire_timeout: Duration,
    /// Log rows older than this may be pruned; clients behind it get a snapshot. `None`: keep everything.
    pub retention: Option<Duration>,
    /// Users whose newest stamp is kept in memory (0: none; every read asks the database).
    pub known_users: usize,
    /// Pool connections one user may hold at once (at most `pool_size`).
    pub max_per_user: usize,
    /// PostgreSQL's `statement_timeout` for our sessions, and (plus a second) how long a request waits
    /// for the database's answers. `None`: no limit.
    pub statement_timeout: Option<Duration>,
    /// How far past its arrival a change's times are believed; later ones are ordered at that bound.
    pub max_future_skew: Duration,
    /// A log page holds rows up to about this many bytes of stored data (at least one row).
    pub page_max_bytes: usize,
    /// Groups of small pushes at the database at once, pushes per group, and pushes at the database
    /// before small ones group (`store/group.rs`).
    pub push_groups: (usize, usize, usize),
}

pub struct Store {
    pool: Pool,
    retention: Option<Duration>,
    known: KnownStamps,
    /// Per-user shares of the pool, taken before a pooled connection.
    slots: fair::UserSlots,
    groups: group::Groups,
    acquire_timeout: Duration,
    answer_deadline: Option<Duration>,
    future_skew: Micros,
    page_max_bytes: usize,
    /// Changes with a time beyond `future_skew` (for /metrics).
    beyond_skew: std::sync::atomic::AtomicU64,
}

/// What the schema migration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migration {
    Applied,
    AlreadyCurrent,
}

/// The migration's advisory lock class: the one after the users' lock class (`user_tx`).
const MIGRATION_LOCK_CLASS: i32 = user_tx::USER_LOCK_CLASS + 1;
/// Distinct tables of one app of a user, by skipping through the index instead of scanning every row.
const APP_TABLES: &str = concat!(
    "WITH RECURSIVE t(name) AS (",
    "(SELECT table_name FROM sync_changes WHERE user_id = $1 AND app_id = $2 ORDER BY table_name LIMIT 1) ",
    "UNION ALL SELECT (SELECT table_name FROM sync_changes WHERE user_id = $1 AND app_id = $2 ",
    "AND table_name > t.name ORDER BY table_name LIMIT 1) FROM t WHERE t.name IS NOT NULL) ",
    "SELECT name FROM t WHERE name IS NOT NULL LIMIT 1000"
);
/// Distinct apps of a user, the same way.
const USER_APPS: &str = concat!(
    "WITH RECURSIVE a(name) AS (",
    "(SELECT app_id FROM sync_changes WHERE user_id = $1 ORDER BY app_id LIMIT 1) ",
    "UNION ALL SELECT (SELECT app_id FROM sync_changes WHERE user_id = $1 ",
    "AND app_id > a.name ORDER BY app_id LIMIT 1) FROM a WHERE a.name IS NOT NULL) ",
    "SELECT name FROM a WHERE name IS NOT NULL LIMIT 1000"
);
impl Store {
    pub fn new(database: crate::client_tls::DatabaseConfig, options: &StoreOptions) -> Store {
        let (mut config, tls) = (database.postgres, database.tls);
        // A peer that vanished without closing (host down, network cut) is noticed within about a minute
        // instead of the kernel's two hours.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3);
        // PostgreSQL itself ends a statement that runs too long (releasing its locks), and a session left
        // idle inside a transaction (a client of ours that vanished mid-push).
        if let Some(timeout) = options.statement_timeout {
            let millis = timeout.as_millis().max(1);
            let ours = format!(
                "-c statement_timeout={millis} -c idle_in_transaction_session_timeout={}",
                millis * 2
            );
            let options = match config.get_options() {
                Some(theirs) if !theirs.trim().is_empty() => format!("{theirs} {ours}"),
                _ => ours,
            };
            config.options(&options);
        }
        Store {
            pool: Pool::new(config, tls, options.pool_size, options.acquire_timeout),
            retention: options.retention,
            known: KnownStamps::new(options.known_users),
            slots: fair::UserSlots::new(options.max_per_user.min(options.pool_size)),
            groups: group::Groups::new(
                options.push_groups.0,
                options.push_groups.1,
                options.push_groups.2,
            ),
            acquire_timeout: options.acquire_timeout,
            answer_deadline: options
                .statement_timeout
                .map(|timeout| timeout + Duration::from_secs(1)),
            future_skew: Micros::try_from(options.max_future_skew.as_micros())
                .unwrap_or(Micros::MAX),
            beyond_skew: Default::default(),
            page_max_bytes: options.page_max_bytes.max(1),
        }
    }

    /// Bounds the database work of one request: past the deadline (a database that stopped answering),
    /// the request gets `Unavailable` (503 + Retry-After) and its connection, whose transaction state is
    /// unknown, is closed instead of reused (the work future is dropped with the connection marked).
    async fn within_deadline<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let Some(deadline) = self.answer_deadline else {
            return work.await;
        };
        match tokio::time::timeout(deadline, work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Unavailable(Cause::new(format!(
                "the database did not answer within {} ms",
                deadline.as_millis()
            )))),
        }
    }

    /// A connection of its own, outside the pool (the notification listener keeps one open for good),
    /// named `application_name` in `pg_stat_activity`.
    pub(crate) async fn connect_dedicated(
        &self,
        application_name: &str,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<tokio_postgres::Socket, crate::client_tls::PgTlsStream>,
        ),
        StoreError,
    > {
        let mut config = self.pool.config().clone();
        config.application_name(application_name);
        Ok(config.connect(self.pool.tls().clone()).await?)
    }

    /// The user's share of the pool (and, for a writer, the user's turn), waited for before a pooled
    /// connection is taken: one user cannot hold more than its share, whatever it sends.
    async fn user_share(
        &self,
        user: &str,
        write: bool,
    ) -> Result<fair::UserPermit<'_>, StoreError> {
        let deadline = tokio::time::Instant::now() + self.acquire_timeout;
        self.slots.acquire(user, write, deadline).await
    }

    /// Changes whose times were beyond `MAX_FUTURE_SKEW_SECS` (ordered at that bound), since start.
    pub(crate) fn times_beyond_skew(&self) -> u64 {
        self.beyond_skew.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Counters of the push groups (`store/group.rs`).
    pub fn push_groups(&self) -> &group::GroupStats {
        self.groups.stats()
    }

    /// Users holding or waiting for a share of the pool.
    pub fn users_at_the_database(&self) -> usize {
        self.slots.users()
    }

    /// What this instance knows of each user's clock (fed by commits and cross-instance hints).
    pub fn known(&self) -> &KnownStamps {
        &self.known
    }

    pub fn pool_status(&self) -> PoolStatus {
        self.pool.status()
    }

    pub fn close(&self) {
        self.pool.close()
    }

    /// Applies `schema.sql` unless this exact version was applied before. Serialised across instances by an
    /// advisory lock held for the migration's transaction.
    pub async fn migrate(&self) -> Result<Migration, StoreError> {
        let mut connection = self.pool.get().await?;
        let checksum = format!("{:016x}", fnv1a(SCHEMA_SQL.as_bytes()));
        let tx = connection.client_mut().transaction().await?;
        // Upgrading a large database (the backfill) may take long: no statement timeout for it.
        tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock($1, 0)",
            &[&MIGRATION_LOCK_CLASS],
        )
        .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS sync_schema_migrations (
                checksum TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM sync_schema_migrations WHERE checksum = $1",
                &[&checksum],
            )
            .await?;
        if done.is_some() {
            tx.commit().await?;
            return Ok(Migration::AlreadyCurrent);
        }
        tx.batch_execute(SCHEMA_SQL).await?;
        tx.execute(
            "INSERT INTO sync_schema_migrations (checksum) VALUES ($1)",
            &[&checksum],
        )
        .await?;
        tx.commit().await?;
        Ok(Migration::Applied)
    }

    /// True when the connected role is a superuser or has BYPASSRLS, i.e. row-level security does not bind it.
    pub(crate) async fn bypasses_row_level_security(&self) -> Result<bool, StoreError> {
        let connection = self.pool.get().await?;
        let row = connection
            .client()
            .query_one(
                "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    /// A cheap reachability check for /health.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let connection = self.pool.get().await?;
        connection.client().simple_query("SELECT 1").await?;
        Ok(())
    }

    /// The tables a user has written in one app (for the nudge a legacy socket gets after `auth-ok`).
    pub(crate) async fn app_tables(
        &self,
        user: &str,
        app: &str,
    ) -> Result<Vec<String>, StoreError> {
        self.with_user_transaction(user, APP_TABLES, &[&user, &app], |row| row.get(0))
            .await
    }

    /// The apps a user has written to (for nudging a unified socket to pull everything).
    pub(crate) async fn user_apps(&self, user: &str) -> Result<Vec<String>, StoreError> {
        self.with_user_transaction(user, USER_APPS, &[&user], |row| row.get(0))
            .await
    }

    /// Runs `body` on a connection inside a transaction bound to `user` by row-level security (without the
    /// cursor lock): the nudges' reads of which tables and apps a user has written.
    pub(crate) async fn with_user_transaction<T>(
        &self,
        user: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        map: impl Fn(&Row) -> T,
    ) -> Result<Vec<T>, StoreError> {
        let _share = self.user_share(user, false).await?;
        let mut connection = self.pool.get().await?;
        // `sql` is not prepared: its query is two round trips, so it cannot share the first flush.
        let read = async {
            let (tx, ()) =
                UserTx::begin(&mut connection, user, Lock::None, async |_| Ok(())).await?;
            let rows = tx.client().query(sql, params).await?;
            tx.commit().await?;
            Ok::<_, StoreError>(rows)
        }
        .await;
        match read {
            Ok(rows) => Ok(rows.iter().map(map).collect()),
            Err(error) => {
                rollback(&mut connection).await;
                Err(error)
            }
        }
    }
}

/// Ends a transaction begun by hand after a failure, so the connection can be reused; if even that fails
/// (or the database does not answer within a second), the connection stays marked and the pool closes it.
async fn rollback(connection: &mut PooledConnection) {
    if !connection.in_transaction {
        return;
    }
    let rolled_back = tokio::time::timeout(
        Duration::from_secs(1),
        connection.client().batch_execute("ROLLBACK"),
    )
    .await;
    if matches!(rolled_back, Ok(Ok(()))) {
        connection.in_transaction = false;
    }
}

/// FNV-1a, to recognise a schema version already applied (not a security boundary).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
