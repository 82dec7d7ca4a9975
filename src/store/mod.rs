//! The store: the only module that speaks SQL.
//!
//! Every query runs inside a transaction that first declares the caller's user id
//! (`set_config('app.current_user_id', …, true)`), so row-level security admits only that user's rows even
//! if a query forgot its `user_id` filter. The same statement takes the user's advisory lock: the exclusive
//! form for a push, the shared form for a read. Together with the stamping trigger in `schema.sql` that is
//! what makes the cursor guarantee hold (see ARCHITECTURE.md, "The cursor").

mod fair;
mod group;
mod known;
mod listen;
mod pool;
mod push;
pub mod records;
mod timestamp;

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, Row};

use crate::protocol::time::{self, Micros};
use crate::protocol::{PullQuery, StoredChange, SyncResponse, WireChange};

pub use group::{GroupStats, Hint};
pub use known::KnownStamps;
pub use listen::Listener;
pub use pool::{Pool, PoolStatus, PooledConnection};
use records::ReadMode;
use timestamp::PgTimestamp;

/// The schema, applied at start-up.
pub const SCHEMA_SQL: &str = include_str!("../../schema.sql");

#[derive(Debug, Clone)]
pub enum StoreError {
    /// PostgreSQL cannot be reached or the connection broke: retry later.
    Unavailable(Cause),
    /// Every pooled connection stayed busy for the whole acquire timeout: retry later.
    Saturated,
    /// The database aborted the transaction to resolve contention (deadlock, serialization): retry.
    Contention(Cause),
    /// The database refused a value the client sent (SQLSTATE class 22, data exception): the client's
    /// fault, nothing was written, a retry fails the same way.
    Rejected(Cause),
    /// Anything else: a bug or a broken database, never the client's fault.
    Internal(Cause),
}

/// What went wrong underneath a `StoreError`: a description, and PostgreSQL's error when there was one
/// (kept as the error's `source`, with its SQLSTATE).
#[derive(Debug, Clone)]
pub struct Cause {
    message: String,
    source: Option<Arc<tokio_postgres::Error>>,
}

impl Cause {
    pub fn new(message: impl Into<String>) -> Cause {
        Cause {
            message: message.into(),
            source: None,
        }
    }

    /// The SQLSTATE PostgreSQL reported, if any.
    pub fn code(&self) -> Option<&SqlState> {
        self.source.as_deref().and_then(tokio_postgres::Error::code)
    }

    /// True when a connection was refused for good (TLS refused, login refused), not merely unreachable.
    pub fn is_connection_refused(&self) -> bool {
        self.source.as_deref().is_some_and(pool::connection_refused)
    }

    /// PostgreSQL's own message (without our prefix), if it sent one.
    pub fn database_message(&self) -> Option<&str> {
        self.source
            .as_deref()
            .and_then(tokio_postgres::Error::as_db_error)
            .map(|e| e.message())
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        match self.code() {
            Some(code) => write!(f, " (SQLSTATE {})", code.code()),
            None => Ok(()),
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unavailable(why) => write!(f, "database unavailable: {why}"),
            StoreError::Saturated => f.write_str("database connection pool saturated"),
            StoreError::Contention(why) => write!(f, "transaction aborted by contention: {why}"),
            StoreError::Rejected(why) => write!(f, "the database refused a value: {why}"),
            StoreError::Internal(why) => write!(f, "database error: {why}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Unavailable(why)
            | StoreError::Contention(why)
            | StoreError::Rejected(why)
            | StoreError::Internal(why) => why.source.as_deref().map(|e| e as _),
            StoreError::Saturated => None,
        }
    }
}

/// SQLSTATEs that mean "the server is going away, cannot take us now, or took too long" (besides class 08,
/// connection exceptions).
const UNAVAILABLE_STATES: [SqlState; 7] = [
    SqlState::QUERY_CANCELED,
    SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
    SqlState::ADMIN_SHUTDOWN,
    SqlState::CRASH_SHUTDOWN,
    SqlState::CANNOT_CONNECT_NOW,
    SqlState::TOO_MANY_CONNECTIONS,
    SqlState::CONFIGURATION_LIMIT_EXCEEDED,
];
/// SQLSTATEs with which PostgreSQL aborts a transaction to resolve contention; a retry may succeed.
const CONTENTION_STATES: [SqlState; 3] = [
    SqlState::T_R_SERIALIZATION_FAILURE,
    SqlState::T_R_DEADLOCK_DETECTED,
    SqlState::LOCK_NOT_AVAILABLE,
];

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> StoreError {
        let classify = |error: &tokio_postgres::Error| -> fn(Cause) -> StoreError {
            if error.is_closed() {
                return StoreError::Unavailable;
            }
            match error.code() {
                Some(code)
                    if code.code().starts_with("08") || UNAVAILABLE_STATES.contains(code) =>
                {
                    StoreError::Unavailable
                }
                Some(code) if CONTENTION_STATES.contains(code) => StoreError::Contention,
                Some(code) if code.code().starts_with("22") => StoreError::Rejected,
                Some(_) => StoreError::Internal,
                // No SQLSTATE: the socket failed (unavailable) or we sent or read something wrong (a bug).
                None if std::error::Error::source(error)
                    .is_some_and(|source| source.is::<std::io::Error>()) =>
                {
                    StoreError::Unavailable
                }
                None => StoreError::Internal,
            }
        };
        let variant = classify(&error);
        // PostgreSQL's message without its DETAIL (which may quote values); the SQLSTATE is added by
        // `Display`.
        let message = match error.as_db_error() {
            Some(db) => format!("{}: {}", db.severity(), db.message()),
            None => error.to_string(),
        };
        variant(Cause {
            message,
            source: Some(Arc::new(error)),
        })
    }
}

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

/// Advisory lock class of the per-user clock lock ("SYNC"); the migration lock uses the next class.
const USER_LOCK_CLASS: i32 = 0x5359_4E43;
const MIGRATION_LOCK_CLASS: i32 = USER_LOCK_CLASS + 1;

/// Waiting for the user's lock (held by another instance or a direct writer) ends after this, with
/// SQLSTATE 55P03 (contention: 503 + Retry-After). It also bounds every other lock wait of the transaction.
macro_rules! lock_timeout {
    () => {
        "set_config('lock_timeout', '5000', true)"
    };
}
pub(crate) use lock_timeout;
const LOCK_SHARED: &str = concat!(
    "SELECT set_config('app.current_user_id', $1, true), ",
    lock_timeout!(),
    ", pg_advisory_xact_lock_shared(1398361667, hashtext($1))"
);
const LOCK_EXCLUSIVE: &str = concat!(
    "SELECT set_config('app.current_user_id', $1, true), ",
    lock_timeout!(),
    ", pg_advisory_xact_lock(1398361667, hashtext($1))"
);
/// The start of every log read: the columns `stored_change` reads, in its order, for one user's app.
macro_rules! select_changes {
    () => {
        "SELECT id::text, table_name, record_id, op, data, field_meta, created_at, schema_version, actor, \
         origin, space_id FROM sync_changes WHERE user_id = $1 AND app_id = $2 AND "
    };
}

/// A log page bounded by rows (`$limit`, the page size + 1) and by bytes (`$budget`): the rows whose
/// running stored size (`pg_column_size` of data, field_meta and actor) fits the budget, at least one, then
/// the first row that does not fit with its values left out (`fits` false: the budget cut the page here).
/// Rows past the budget are never detoasted or sent. The window runs in the order the row bound already
/// sorted by, so it adds no sort.
macro_rules! bounded_page {
    ($filter:literal, $limit:literal, $budget:literal) => {
        concat!(
            "SELECT id, table_name, record_id, op, CASE WHEN fits THEN data END, ",
            "CASE WHEN fits THEN field_meta END, created_at, schema_version, CASE WHEN fits THEN actor END, ",
            "origin, space_id, fits FROM (SELECT page.*, ",
            "(row_number() OVER w = 1 OR sum(size) OVER w <= ",
            $budget,
            ") AS fits, (row_number() OVER w = 2 OR sum(size) OVER w - size <= ",
            $budget,
            ") AS first_beyond FROM (",
            "SELECT id::text AS id, table_name, record_id, op, data, field_meta, created_at, ",
            "schema_version, actor, origin, space_id, coalesce(pg_column_size(data), 0) ",
            "+ coalesce(pg_column_size(field_meta), 0) + coalesce(pg_column_size(actor), 0) AS size ",
            "FROM sync_changes WHERE user_id = $1 AND app_id = $2 AND ",
            $filter,
            " ORDER BY created_at, id LIMIT ",
            $limit,
            ") AS page WINDOW w AS (ORDER BY created_at, id ROWS UNBOUNDED PRECEDING)) AS sized ",
            "WHERE fits OR first_beyond ORDER BY created_at, id"
        )
    };
}

/// $1 user, $2 app, $3 table, $4 since, $5 device ('' = none), $6 limit, $7 byte budget.
const PULL_PAGE: &str = bounded_page!(
    "table_name = $3 AND created_at > $4 AND ($5 = '' OR client_id <> $5)",
    "$6",
    "$7"
);
/// The rest of a group of rows sharing one timestamp at a page boundary ($4 = that time, $6 = last id).
const PULL_TIES: &str = concat!(
    select_changes!(),
    "table_name = $3 AND created_at = $4 ",
    "AND ($5 = '' OR client_id <> $5) AND id > $6::text::uuid ORDER BY id"
);
/// The push response covers every table of the app. $1 user, $2 app, $3 since, $4 device, $5 limit,
/// $6 byte budget.
const APP_PAGE: &str = bounded_page!(
    "created_at > $3 AND ($4 = '' OR client_id <> $4)",
    "$5",
    "$6"
);
const APP_TIES: &str = concat!(
    select_changes!(),
    "created_at = $3 ",
    "AND ($4 = '' OR client_id <> $4) AND id > $5::text::uuid ORDER BY id"
);
/// A stream's page: like APP_PAGE, limited to some tables. $6 = the tables, $7 byte budget.
const APP_TABLES_PAGE: &str = bounded_page!(
    "created_at > $3 AND ($4 = '' OR client_id <> $4) AND table_name = ANY($6)",
    "$5",
    "$7"
);
const APP_TABLES_TIES: &str = concat!(
    select_changes!(),
    "created_at = $3 ",
    "AND ($4 = '' OR client_id <> $4) AND table_name = ANY($6) AND id > $5::text::uuid ORDER BY id"
);
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
/// Deletes the oldest log rows of a user before a cutoff, at most $3 of them.
const PRUNE: &str = concat!(
    "DELETE FROM sync_changes WHERE id IN (SELECT id FROM sync_changes WHERE user_id = $1 AND created_at < $2 ",
    "ORDER BY created_at LIMIT $3)"
);
/// Pruning stays this far behind the horizon that reads use, so that instances whose clocks differ by less
/// never prune rows another instance still serves from the log.
const PRUNE_MARGIN_MICROS: Micros = 5 * 60 * 1_000_000;
const CLOCK: &str = "SELECT last_at FROM sync_user_clock WHERE user_id = $1";
/// Makes the user's clock at least `$2` (bounded to an hour ahead of the database's clock), so that every
/// later write is stamped after a cursor handed out or accepted now. Runs only for users without a clock
/// yet and for cursors from elsewhere (e.g. today's server) that are ahead of it.
pub(super) const CLOCK_ADVANCE: &str = concat!(
    "INSERT INTO sync_user_clock AS clock (user_id, last_at) ",
    "VALUES ($1, greatest(clock_timestamp(), least($2, clock_timestamp() + interval '1 hour'), ",
    "(SELECT max(created_at) FROM sync_changes WHERE user_id = $1))) ",
    "ON CONFLICT (user_id) DO UPDATE SET last_at = greatest(clock.last_at, excluded.last_at) RETURNING last_at"
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
    pub async fn connect_dedicated(
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
    pub fn times_beyond_skew(&self) -> u64 {
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
        let tx = connection.client.transaction().await?;
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
    pub async fn bypasses_row_level_security(&self) -> Result<bool, StoreError> {
        let connection = self.pool.get().await?;
        let row = connection
            .client
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
        connection.client.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Changes of one collection since a cursor, excluding the device's own, paged (or a snapshot).
    pub async fn pull(
        &self,
        user: &str,
        app: &str,
        device: Option<&str>,
        query: &PullQuery,
    ) -> Result<SyncResponse, StoreError> {
        let tables = Tables::One(&query.collection);
        self.read(
            user,
            app,
            tables,
            device.unwrap_or(""),
            query.since,
            query.limit,
        )
        .await
    }

    /// Changes of an app since a cursor (optionally only some tables), excluding the device's own, paged:
    /// what a stream delivers.
    pub async fn app_changes(
        &self,
        user: &str,
        app: &str,
        tables: Option<&[String]>,
        device: Option<&str>,
        since: Micros,
        limit: usize,
    ) -> Result<SyncResponse, StoreError> {
        let tables = tables.map(Tables::Some).unwrap_or(Tables::All);
        self.read(user, app, tables, device.unwrap_or(""), since, limit)
            .await
    }

    /// Every read: from memory when it knows nothing is new, else one pipelined round trip (a log page),
    /// else the general path in a transaction of its own (a snapshot, a cursor ahead of the clock).
    async fn read(
        &self,
        user: &str,
        app: &str,
        tables: Tables<'_>,
        device: &str,
        since: Micros,
        limit: usize,
    ) -> Result<SyncResponse, StoreError> {
        let mode = records::read_mode(since, self.horizon());
        if let ReadMode::Log(since) = mode {
            if self.known.answers(user, since).await {
                return Ok(SyncResponse {
                    server_changes: Vec::new(),
                    conflicts: Vec::new(),
                    synced_until: time::format_cursor(since),
                    has_more: false,
                });
            }
        }
        let ticket = self.known.ticket(user);
        let _share = self.user_share(user, false).await?;
        let mut connection = self.pool.get().await?;
        let (page, clock) = self
            .within_deadline(async {
                let quick = match mode {
                    ReadMode::Log(since) => {
                        let budget = self.page_max_bytes;
                        read_log(
                            &mut connection,
                            user,
                            app,
                            tables,
                            device,
                            since,
                            limit,
                            budget,
                        )
                        .await?
                    }
                    ReadMode::Snapshot(_) => None,
                };
                match quick {
                    Some(read) => Ok(read),
                    None => {
                        let skew = self.future_skew;
                        read_locked(
                            &mut connection,
                            user,
                            app,
                            tables,
                            device,
                            mode,
                            limit,
                            skew,
                            self.page_max_bytes,
                        )
                        .await
                    }
                }
            })
            .await?;
        self.known.learn(user, ticket, clock);
        Ok(SyncResponse {
            synced_until: time::format_cursor(page.next.unwrap_or(clock.max(since))),
            has_more: page.next.is_some(),
            server_changes: page.changes,
            conflicts: Vec::new(),
        })
    }

    /// Prunes one user's log rows older than the retention horizon (minus a safety margin for clock skew
    /// between instances), in bounded batches, after folding them into the record state. Runs under the
    /// user's exclusive lock, so it never interleaves with a read of that user. Returns rows pruned.
    pub async fn compact_user(&self, user: &str, batch: i64) -> Result<u64, StoreError> {
        let Some(retention) = self.retention else {
            return Ok(0);
        };
        let cutoff = PgTimestamp(
            crate::clock::now_micros() - retention.as_micros() as Micros - PRUNE_MARGIN_MICROS,
        );
        let mut pruned = 0;
        loop {
            let mut connection = self.pool.get().await?;
            let tx = connection.client.transaction().await?;
            tx.execute(LOCK_EXCLUSIVE, &[&user]).await?;
            records::fold_pending(&tx, user, self.future_skew).await?;
            let deleted = tx.execute(PRUNE, &[&user, &cutoff, &batch]).await?;
            tx.commit().await?;
            pruned += deleted;
            if deleted < batch as u64 {
                return Ok(pruned);
            }
        }
    }

    /// Users known to the clock table after `after`, in order (compaction walks them in slices).
    pub async fn users_after(&self, after: &str, limit: i64) -> Result<Vec<String>, StoreError> {
        let connection = self.pool.get().await?;
        let rows = connection
            .client
            .query(
                "SELECT user_id FROM sync_user_clock WHERE user_id > $1 ORDER BY user_id LIMIT $2",
                &[&after, &limit],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// Runs one compaction pass over every user if no other instance is running one (single-flight through a
    /// session advisory lock on a connection of its own, released when it closes). Returns rows pruned, or
    /// `None` when another instance holds the lock or no retention is configured.
    pub async fn compact(&self, batch: i64) -> Result<Option<u64>, StoreError> {
        if self.retention.is_none() {
            return Ok(None);
        }
        let (leader, connection) = self.connect_dedicated("mana-sync compaction").await?;
        let driver = tokio::spawn(connection);
        let result = async {
            let row = leader
                .query_one(
                    "SELECT pg_try_advisory_lock($1, 2)",
                    &[&MIGRATION_LOCK_CLASS],
                )
                .await?;
            if !row.get::<_, bool>(0) {
                return Ok(None);
            }
            let mut pruned = 0;
            let mut after = String::new();
            loop {
                let users = self.users_after(&after, 500).await?;
                for user in &users {
                    pruned += self.compact_user(user, batch).await?;
                }
                match users.last() {
                    Some(last) if users.len() == 500 => after = last.clone(),
                    _ => return Ok(Some(pruned)),
                }
            }
        }
        .await;
        drop(leader);
        let _ = driver.await;
        result
    }

    fn horizon(&self) -> Option<Micros> {
        self.retention
            .map(|retention| crate::clock::now_micros() - retention.as_micros() as Micros)
    }

    /// The tables a user has written in one app (for the nudge a legacy socket gets after `auth-ok`).
    pub async fn app_tables(&self, user: &str, app: &str) -> Result<Vec<String>, StoreError> {
        self.with_user_transaction(user, APP_TABLES, &[&user, &app], |row| row.get(0))
            .await
    }

    /// The apps a user has written to (for nudging a unified socket to pull everything).
    pub async fn user_apps(&self, user: &str) -> Result<Vec<String>, StoreError> {
        self.with_user_transaction(user, USER_APPS, &[&user], |row| row.get(0))
            .await
    }

    /// Runs `body` on a connection inside a transaction bound to `user` by row-level security (without the
    /// cursor lock). Used by tests and tools that need to look at a user's rows the way the server does.
    pub async fn with_user_transaction<T>(
        &self,
        user: &str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        map: impl Fn(&Row) -> T,
    ) -> Result<Vec<T>, StoreError> {
        let _share = self.user_share(user, false).await?;
        let mut connection = self.pool.get().await?;
        let tx = connection.client.transaction().await?;
        tx.execute(
            "SELECT set_config('app.current_user_id', $1, true)",
            &[&user],
        )
        .await?;
        let rows = tx.query(sql, params).await?;
        tx.commit().await?;
        Ok(rows.iter().map(map).collect())
    }
}

fn page_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX - 1).max(1) + 1
}

/// Ends a transaction begun by hand after a failure, so the connection can be reused; if even that fails
/// (or the database does not answer within a second), the connection stays marked and the pool closes it.
async fn rollback(connection: &mut PooledConnection) {
    let rolled_back = tokio::time::timeout(
        Duration::from_secs(1),
        connection.client.batch_execute("ROLLBACK"),
    )
    .await;
    if matches!(rolled_back, Ok(Ok(()))) {
        connection.in_transaction = false;
    }
}

/// The hot read: `BEGIN`, the shared lock, the page, the clock and `COMMIT` leave in one flush, so a log
/// read costs one round trip. The lock is a statement of its own, so the page's snapshot is still taken
/// after every in-flight write of the user committed. Returns the page and the cursor to answer with,
/// or `None` when `since` is ahead of the user's clock (a cursor from elsewhere): then the clock must be
/// advanced under the lock, which `read_locked` does.
#[allow(clippy::too_many_arguments)]
async fn read_log(
    connection: &mut PooledConnection,
    user: &str,
    app: &str,
    tables: Tables<'_>,
    device: &str,
    since: Micros,
    limit: usize,
    budget: usize,
) -> Result<Option<(Page, Micros)>, StoreError> {
    let lock = connection.prepare(LOCK_SHARED).await?;
    let page_statement = connection.prepare(tables.page_sql()).await?;
    let clock_statement = connection.prepare(CLOCK).await?;
    let params = page_params(user, app, tables, device, since, limit, budget);
    let (user_param, page_param): ([&(dyn ToSql + Sync); 1], _) = ([&user], params.refs());
    connection.in_transaction = true;
    let client = &connection.client;
    let pipelined = tokio::try_join!(
        biased;
        client.batch_execute("BEGIN"),
        client.execute(&lock, &user_param),
        client.query(&page_statement, &page_param),
        client.query_opt(&clock_statement, &user_param),
        client.batch_execute("COMMIT"),
    );
    let (_, _, rows, clock, _) = match pipelined {
        Ok(results) => results,
        Err(error) => {
            rollback(connection).await;
            return Err(error.into());
        }
    };
    connection.in_transaction = false;
    let clock = match clock {
        Some(row) => row.try_get::<_, PgTimestamp>(0)?.0,
        None => return Ok(None),
    };
    // A full page that ends inside a group of rows sharing one stamp (only older servers wrote such
    // groups) needs the rest of the group from inside the transaction: the general path does that.
    if clock < since || ends_in_tie(&rows, limit)? {
        return Ok(None);
    }
    let page = log_page(&connection.client, user, app, tables, device, rows, limit).await?;
    Ok(Some((page, clock.max(time::EPOCH + 1))))
}

/// A read in one transaction: snapshots (which fold first, under the exclusive lock) and log reads whose
/// cursor is ahead of the clock. Returns the page and the vouched cursor.
#[allow(clippy::too_many_arguments)]
async fn read_locked(
    connection: &mut PooledConnection,
    user: &str,
    app: &str,
    tables: Tables<'_>,
    device: &str,
    mode: ReadMode,
    limit: usize,
    future_skew: Micros,
    budget: usize,
) -> Result<(Page, Micros), StoreError> {
    // A snapshot reads the record state, which must first absorb rows other programs wrote: that writes,
    // so it takes the exclusive lock. Log reads take the shared lock.
    let (lock, since) = match mode {
        ReadMode::Log(since) => (connection.prepare(LOCK_SHARED).await?, since),
        ReadMode::Snapshot(_) => (connection.prepare(LOCK_EXCLUSIVE).await?, time::EPOCH),
    };
    let page_statement = connection.prepare(tables.page_sql()).await?;
    // Marked while the transaction may be open: a cancelled read closes the connection.
    connection.in_transaction = true;
    let tx = connection.client.transaction().await?;
    tx.execute(&lock, &[&user]).await?;
    if let ReadMode::Snapshot(_) = mode {
        records::fold_pending(&tx, user, future_skew).await?;
    }
    let bound = (limit, budget);
    let page = read_page(&tx, &page_statement, user, app, tables, device, mode, bound).await?;
    let clock = vouched_cursor(&tx, user, since).await?;
    tx.commit().await?;
    connection.in_transaction = false;
    Ok((page, clock))
}

/// The parameters of a log page query (`Tables::page_sql`), in its order.
struct PageParams<'a> {
    user: &'a str,
    app: &'a str,
    tables: Tables<'a>,
    device: &'a str,
    since: PgTimestamp,
    limit_plus_one: i64,
    budget: i64,
}

fn page_params<'a>(
    user: &'a str,
    app: &'a str,
    tables: Tables<'a>,
    device: &'a str,
    since: Micros,
    limit: usize,
    budget: usize,
) -> PageParams<'a> {
    PageParams {
        user,
        app,
        tables,
        device,
        since: PgTimestamp(since),
        limit_plus_one: page_limit(limit),
        budget: i64::try_from(budget).unwrap_or(i64::MAX),
    }
}

impl PageParams<'_> {
    fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        match &self.tables {
            Tables::All => vec![
                &self.user,
                &self.app,
                &self.since,
                &self.device,
                &self.limit_plus_one,
                &self.budget,
            ],
            Tables::One(table) => vec![
                &self.user,
                &self.app,
                table,
                &self.since,
                &self.device,
                &self.limit_plus_one,
                &self.budget,
            ],
            Tables::Some(list) => vec![
                &self.user,
                &self.app,
                &self.since,
                &self.device,
                &self.limit_plus_one,
                list,
                &self.budget,
            ],
        }
    }
}

/// True when the `limit + 1` rows of a page query have more than fit and the last two share a stamp.
/// How many rows of a page query's answer belong on the page, and whether more rows follow: the rows that
/// fit the byte budget, or `limit` of the `limit + 1` the row bound allows. The row after them, if any,
/// is the first one left out.
fn page_extent(rows: &[Row], limit: usize) -> Result<(usize, bool), StoreError> {
    let fitting = rows
        .iter()
        .map(|row| row.try_get::<_, bool>(11))
        .take_while(|fits| matches!(fits, Ok(true)))
        .count();
    if fitting < rows.len() {
        if let Err(e) = rows[fitting].try_get::<_, bool>(11) {
            return Err(StoreError::Internal(Cause::new(format!(
                "unexpected page shape: {e}"
            ))));
        }
        return Ok((fitting.min(limit), true));
    }
    Ok((rows.len().min(limit), rows.len() > limit))
}

/// True when the page ends inside a group of rows sharing one stamp (only older servers wrote such
/// groups): the rest of the group must be read within the transaction.
fn ends_in_tie(rows: &[Row], limit: usize) -> Result<bool, StoreError> {
    let (taken, more) = page_extent(rows, limit)?;
    if !more || taken == 0 || taken >= rows.len() {
        return Ok(false);
    }
    Ok(stored_change(&rows[taken - 1])?.created_at == stored_change(&rows[taken])?.created_at)
}

/// Turns the `limit + 1` rows of a log page query into a page. When more rows exist than fit, the page ends
/// at the last row that fits, and if rows sharing that row's timestamp were cut off they are fetched too:
/// the cursor is a timestamp, so a page must never end in the middle of a group of equal timestamps (only
/// rows written by older servers share one; this server stamps every row of a user distinctly). `client`
/// must be inside the user's transaction when `ends_in_tie`.
async fn log_page(
    client: &impl GenericClient,
    user: &str,
    app: &str,
    tables: Tables<'_>,
    device: &str,
    rows: Vec<Row>,
    limit: usize,
) -> Result<Page, StoreError> {
    let (taken, has_more) = page_extent(&rows, limit)?;
    let mut changes: Vec<StoredChange> = rows
        .iter()
        .take(taken)
        .map(stored_change)
        .collect::<Result<_, _>>()?;
    // The row after the page (the first left out) tells whether a group of equal stamps was cut.
    if let (true, Some(next), Some(last)) = (has_more, rows.get(taken), changes.last()) {
        if stored_change(next)?.created_at == last.created_at {
            let at = PgTimestamp(last.created_at);
            let last_id = last.event_id.clone();
            let (sql, params): (&str, Vec<&(dyn ToSql + Sync)>) = match &tables {
                Tables::All => (APP_TIES, vec![&user, &app, &at, &device, &last_id]),
                Tables::One(table) => (PULL_TIES, vec![&user, &app, table, &at, &device, &last_id]),
                Tables::Some(list) => (
                    APP_TABLES_TIES,
                    vec![&user, &app, &at, &device, &last_id, list],
                ),
            };
            for row in &client.query(sql, &params).await? {
                changes.push(stored_change(row)?);
            }
        }
    }
    let next = if has_more {
        changes.last().map(|row| row.created_at)
    } else {
        None
    };
    Ok(Page {
        changes: changes.into_iter().map(StoredChange::into_wire).collect(),
        next,
    })
}

/// The newest cursor the server can vouch for: under the user's lock, every change of this user stamped at
/// or before the user's clock is visible now, and every later one will be stamped after it.
async fn vouched_cursor(
    tx: &impl GenericClient,
    user: &str,
    since: Micros,
) -> Result<Micros, StoreError> {
    let clock: Option<PgTimestamp> = tx.query_opt(CLOCK, &[&user]).await?.map(|row| row.get(0));
    let clock = match clock {
        Some(clock) if clock.0 >= since => clock.0,
        _ => {
            tx.query_one(CLOCK_ADVANCE, &[&user, &PgTimestamp(since)])
                .await?
                .get::<_, PgTimestamp>(0)
                .0
        }
    };
    // Never the epoch itself: a client that stores it re-uploads everything at every start.
    Ok(clock.max(since).max(time::EPOCH + 1))
}

fn stored_change(row: &Row) -> Result<StoredChange, StoreError> {
    let read = || -> Result<StoredChange, tokio_postgres::Error> {
        Ok(StoredChange {
            event_id: row.try_get(0)?,
            table: row.try_get(1)?,
            record_id: row.try_get(2)?,
            op: row.try_get(3)?,
            data: row.try_get(4)?,
            field_meta: row.try_get(5)?,
            created_at: row.try_get::<_, PgTimestamp>(6)?.0,
            schema_version: row.try_get(7)?,
            actor: row.try_get(8)?,
            origin: row.try_get(9)?,
            space_id: row.try_get(10)?,
        })
    };
    read().map_err(|e| {
        StoreError::Internal(Cause::new(format!(
            "unexpected row shape in sync_changes: {e}"
        )))
    })
}

/// Which tables a read covers.
#[derive(Clone, Copy)]
enum Tables<'a> {
    All,
    One(&'a str),
    Some(&'a [String]),
}

impl Tables<'_> {
    fn page_sql(self) -> &'static str {
        match self {
            Tables::All => APP_PAGE,
            Tables::One(_) => PULL_PAGE,
            Tables::Some(_) => APP_TABLES_PAGE,
        }
    }
}

/// One page of changes; `next` is the cursor to continue from when more remain.
struct Page {
    changes: Vec<WireChange>,
    next: Option<Micros>,
}

impl Page {
    fn empty() -> Page {
        Page {
            changes: Vec::new(),
            next: None,
        }
    }
}

/// One page in either mode, inside the user's transaction.
#[allow(clippy::too_many_arguments)]
async fn read_page(
    tx: &impl GenericClient,
    page_statement: &tokio_postgres::Statement,
    user: &str,
    app: &str,
    tables: Tables<'_>,
    device: &str,
    mode: ReadMode,
    (limit, budget): (usize, usize),
) -> Result<Page, StoreError> {
    match mode {
        ReadMode::Snapshot(from) => {
            let list: Option<Vec<String>> = match tables {
                Tables::All => None,
                Tables::One(table) => Some(vec![table.to_owned()]),
                Tables::Some(list) => Some(list.to_vec()),
            };
            let (entries, has_more) =
                records::snapshot_page(tx, user, app, list.as_deref(), from, (limit, budget))
                    .await?;
            let next = match (has_more, entries.last()) {
                (true, Some((position, _))) => {
                    Some(records::snapshot_cursor(*position).ok_or_else(|| {
                        StoreError::Internal(Cause::new(format!(
                            "snapshot position {position} is past what a cursor can carry: \
                             renumber sync_records.seq and restart sync_records_seq"
                        )))
                    })?)
                }
                _ => None,
            };
            Ok(Page {
                changes: entries.into_iter().map(|(_, change)| change).collect(),
                next,
            })
        }
        ReadMode::Log(since) => {
            let params = page_params(user, app, tables, device, since, limit, budget);
            let rows = tx.query(page_statement, &params.refs()).await?;
            log_page(tx, user, app, tables, device, rows, limit).await
        }
    }
}

/// FNV-1a, to recognise a schema version already applied (not a security boundary).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
