//! The store: the only module that speaks SQL.
//!
//! Every query runs inside a transaction that first declares the caller's user id
//! (`set_config('app.current_user_id', …, true)`), so row-level security admits only that user's rows even
//! if a query forgot its `user_id` filter. The same statement takes the user's advisory lock: the exclusive
//! form for a push, the shared form for a read. Together with the stamping trigger in `schema.sql` that is
//! what makes the cursor guarantee hold (see ARCHITECTURE.md, "The cursor").

mod pool;
pub mod records;
mod timestamp;

use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::protocol::time::{self, Micros};
use crate::protocol::{Changeset, NewChange, PullQuery, StoredChange, SyncResponse, WireChange};

pub use pool::{Pool, PoolStatus, PooledConnection};
use records::ReadMode;
use timestamp::PgTimestamp;

/// The schema, applied at start-up.
pub const SCHEMA_SQL: &str = include_str!("../../schema.sql");

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// PostgreSQL cannot be reached or the connection broke: retry later.
    Unavailable(String),
    /// Every pooled connection stayed busy for the whole acquire timeout: retry later.
    Saturated,
    /// The database aborted the transaction to resolve contention (deadlock, serialization): retry.
    Contention(String),
    /// Anything else: a bug or a broken database, never the client's fault.
    Internal(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Unavailable(why) => write!(f, "database unavailable: {why}"),
            StoreError::Saturated => f.write_str("database connection pool saturated"),
            StoreError::Contention(why) => write!(f, "transaction aborted by contention: {why}"),
            StoreError::Internal(why) => write!(f, "database error: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> StoreError {
        let text = error.to_string();
        if error.is_closed() {
            return StoreError::Unavailable(text);
        }
        if let Some(code) = error.code() {
            return match code.code() {
                c if c.starts_with("08") => StoreError::Unavailable(text),
                "57P01" | "57P02" | "57P03" | "53300" | "53400" => StoreError::Unavailable(text),
                "40001" | "40P01" | "55P03" => StoreError::Contention(text),
                _ => StoreError::Internal(text),
            };
        }
        // No SQLSTATE: the socket failed (unavailable) or we sent or read something wrong (a bug).
        let io_failure =
            std::error::Error::source(&error).is_some_and(|source| source.is::<std::io::Error>());
        if io_failure || text.starts_with("error connecting") || text.contains("timeout") {
            StoreError::Unavailable(text)
        } else {
            StoreError::Internal(text)
        }
    }
}

/// Store tuning that comes from configuration.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub pool_size: usize,
    pub acquire_timeout: Duration,
    /// Log rows older than this may be pruned; clients behind it get a snapshot. `None`: keep everything.
    pub retention: Option<Duration>,
}

pub struct Store {
    pool: Pool,
    retention: Option<Duration>,
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

const LOCK_SHARED: &str =
    "SELECT set_config('app.current_user_id', $1, true), pg_advisory_xact_lock_shared(1398361667, hashtext($1))";
const LOCK_EXCLUSIVE: &str =
    "SELECT set_config('app.current_user_id', $1, true), pg_advisory_xact_lock(1398361667, hashtext($1))";
/// The same for a push that writes: it also queues the cross-instance hint (delivered by PostgreSQL only
/// if the transaction commits) and tells the schema's trigger that this writer notified by itself.
const LOCK_EXCLUSIVE_NOTIFY: &str = concat!(
    "SELECT set_config('app.current_user_id', $1, true), set_config('mana_sync.notified', 'on', true), ",
    "pg_advisory_xact_lock(1398361667, hashtext($1)), pg_notify('mana_sync_changes', $2)"
);

/// The start of every log read: the columns `stored_change` reads, in its order, for one user's app.
macro_rules! select_changes {
    () => {
        "SELECT id::text, table_name, record_id, op, data, field_meta, created_at, schema_version, actor, \
         origin, space_id FROM sync_changes WHERE user_id = $1 AND app_id = $2 AND "
    };
}

/// $1 user, $2 app, $3 table, $4 since, $5 device ('' = none), $6 limit.
const PULL_PAGE: &str = concat!(
    select_changes!(),
    "table_name = $3 AND created_at > $4 ",
    "AND ($5 = '' OR client_id <> $5) ORDER BY created_at, id LIMIT $6"
);
/// The rest of a group of rows sharing one timestamp at a page boundary ($4 = that time, $6 = last id).
const PULL_TIES: &str = concat!(
    select_changes!(),
    "table_name = $3 AND created_at = $4 ",
    "AND ($5 = '' OR client_id <> $5) AND id > $6::text::uuid ORDER BY id"
);
/// The push response covers every table of the app. $1 user, $2 app, $3 since, $4 device, $5 limit.
const APP_PAGE: &str = concat!(
    select_changes!(),
    "created_at > $3 ",
    "AND ($4 = '' OR client_id <> $4) ORDER BY created_at, id LIMIT $5"
);
const APP_TIES: &str = concat!(
    select_changes!(),
    "created_at = $3 ",
    "AND ($4 = '' OR client_id <> $4) AND id > $5::text::uuid ORDER BY id"
);
/// One multi-row insert for the whole batch; WITH ORDINALITY keeps the batch order, so stamps follow it.
const INSERT_BATCH: &str = concat!(
    "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data, field_meta, client_id, ",
    "schema_version, actor, origin, space_id) ",
    "SELECT $1, t, r, $2, o, d, f, $3, v, a, g, s FROM unnest($4::text[], $5::text[], $6::text[], $7::jsonb[], ",
    "$8::jsonb[], $9::int4[], $10::jsonb[], $11::text[], $12::text[]) WITH ORDINALITY AS u(t, r, o, d, f, v, a, g, s, n) ",
    "ORDER BY n RETURNING id::text, table_name, record_id, created_at"
);
/// A stream's page: like APP_PAGE, limited to some tables. $6 = the tables.
const APP_TABLES_PAGE: &str = concat!(
    select_changes!(),
    "created_at > $3 ",
    "AND ($4 = '' OR client_id <> $4) AND table_name = ANY($6) ORDER BY created_at, id LIMIT $5"
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
/// After a push merged its own rows (and any pending ones), everything up to the clock is folded.
const MARK_ALL_FOLDED: &str =
    "UPDATE sync_user_clock SET folded_at = last_at WHERE user_id = $1 RETURNING last_at";
const CLOCK: &str = "SELECT last_at FROM sync_user_clock WHERE user_id = $1";
/// Makes the user's clock at least `$2` (bounded to an hour ahead of the database's clock), so that every
/// later write is stamped after a cursor handed out or accepted now. Runs only for users without a clock
/// yet and for cursors from elsewhere (e.g. today's server) that are ahead of it.
const CLOCK_ADVANCE: &str = concat!(
    "INSERT INTO sync_user_clock AS clock (user_id, last_at) ",
    "VALUES ($1, greatest(clock_timestamp(), least($2, clock_timestamp() + interval '1 hour'), ",
    "(SELECT max(created_at) FROM sync_changes WHERE user_id = $1))) ",
    "ON CONFLICT (user_id) DO UPDATE SET last_at = greatest(clock.last_at, excluded.last_at) RETURNING last_at"
);

impl Store {
    pub fn new(config: tokio_postgres::Config, options: &StoreOptions) -> Store {
        Store {
            pool: Pool::new(config, options.pool_size, options.acquire_timeout),
            retention: options.retention,
        }
    }

    /// A connection of its own, outside the pool (the notification listener keeps one open for good).
    pub async fn connect_dedicated(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
        ),
        StoreError,
    > {
        Ok(self.pool.config().connect(tokio_postgres::NoTls).await?)
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

    /// Stores a whole batch in one transaction: merges it into the record state (per field, the later
    /// `at` wins), logs what won, and returns the app's changes since `changeset.since` that this device
    /// has not authored (a snapshot when `since` asks for one), paged like a pull, plus the conflicts.
    pub async fn push(
        &self,
        user: &str,
        app: &str,
        device: Option<&str>,
        changeset: &Changeset,
        limit: usize,
        notification: Option<&str>,
    ) -> Result<SyncResponse, StoreError> {
        let device = device.unwrap_or("");
        let mut connection = self.pool.get().await?;
        let lock = match notification {
            Some(_) => connection.prepare(LOCK_EXCLUSIVE_NOTIFY).await?,
            None => connection.prepare(LOCK_EXCLUSIVE).await?,
        };
        let insert = connection.prepare(INSERT_BATCH).await?;
        let mode = records::read_mode(changeset.since, self.horizon());
        let page_statement = connection.prepare(Tables::All.page_sql()).await?;
        let tx = connection.client.transaction().await?;
        match notification {
            Some(payload) => tx.execute(&lock, &[&user, &payload]).await?,
            None => tx.execute(&lock, &[&user]).await?,
        };
        let keys: Vec<(String, String, String)> = changeset
            .changes
            .iter()
            .map(|c| (app.to_owned(), c.table.clone(), c.record_id.clone()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        // Usually nothing is pending, so the fold check, the response page and the batch's record states
        // go out together (pipelined on the connection); a snapshot needs the fold done first.
        let (page, mut batch) = match mode {
            ReadMode::Log(_) => {
                let (start, page, batch) = tokio::try_join!(
                    records::fold_start(&tx, user),
                    read_page(
                        &tx,
                        &page_statement,
                        user,
                        app,
                        Tables::All,
                        device,
                        mode,
                        limit
                    ),
                    records::Batch::load(&tx, user, keys.clone()),
                )?;
                match start {
                    Some(from) if records::fold_from(&tx, user, from).await? => {
                        (page, records::Batch::load(&tx, user, keys).await?)
                    }
                    _ => (page, batch),
                }
            }
            ReadMode::Snapshot(_) => {
                records::fold_pending(&tx, user).await?;
                let page = read_page(
                    &tx,
                    &page_statement,
                    user,
                    app,
                    Tables::All,
                    device,
                    mode,
                    limit,
                )
                .await?;
                (page, records::Batch::load(&tx, user, keys).await?)
            }
        };

        // Merge the batch into the record state; only what wins goes to the log.
        let mut log_rows = Vec::new();
        let mut conflicts = Vec::new();
        let mut lost: std::collections::BTreeSet<(String, String)> = Default::default();
        for change in &changeset.changes {
            let (winners, losers) = batch.apply(app, change, device, changeset.received_at);
            let state = batch
                .state(app, &change.table, &change.record_id)
                .expect("applied above");
            log_rows.extend(records::winning_row(change, &winners, state));
            for conflict in losers {
                conflicts.push(records::conflict_json(
                    &change.table,
                    &change.record_id,
                    &conflict,
                ));
                lost.insert((change.table.clone(), change.record_id.clone()));
            }
        }
        if !log_rows.is_empty() {
            let columns = BatchColumns::from(log_rows.as_slice());
            let params: [&(dyn ToSql + Sync); 12] = [
                &app,
                &user,
                &device,
                &columns.tables,
                &columns.record_ids,
                &columns.ops,
                &columns.data,
                &columns.field_meta,
                &columns.schema_versions,
                &columns.actors,
                &columns.origins,
                &columns.space_ids,
            ];
            for row in tx.query(&insert, &params).await? {
                let at: PgTimestamp = row.try_get(3)?;
                batch.stamped(app, row.try_get(1)?, row.try_get(2)?, row.try_get(0)?, at.0);
            }
        }
        // Never hand the pushing device a value older than the one the server now holds: a page entry for a
        // record this batch touched (read before the merge) and every record where a pushed field lost are
        // answered with the record's whole merged state instead. That also lets a device converge whose
        // cursor is already past the change that beat it.
        let touched: std::collections::BTreeSet<(String, String)> = changeset
            .changes
            .iter()
            .map(|c| (c.table.clone(), c.record_id.clone()))
            .collect();
        let mut refreshed = lost;
        let mut server_changes: Vec<WireChange> = Vec::with_capacity(page.changes.len());
        for change in page.changes {
            let key = (change.table.clone(), change.id.clone());
            if touched.contains(&key) {
                refreshed.insert(key);
            } else {
                server_changes.push(change);
            }
        }
        for (table, id) in &refreshed {
            server_changes.extend(batch.current_entry(app, table, id));
        }
        let mark_folded =
            async { Ok::<_, StoreError>(tx.query_opt(MARK_ALL_FOLDED, &[&user]).await?) };
        let (_, folded_through) = tokio::try_join!(batch.save(&tx, user), mark_folded)?;
        // Everything up to the user's clock is in this response, authored by this device, or was folded.
        let synced_until = match (page.next, folded_through) {
            (Some(next), _) => next,
            (None, Some(row)) if row.get::<_, PgTimestamp>(0).0 >= changeset.since => {
                row.get::<_, PgTimestamp>(0).0
            }
            (None, _) => vouched_cursor(&tx, user, changeset.since).await?,
        };
        tx.commit().await?;
        Ok(SyncResponse {
            server_changes,
            conflicts,
            synced_until: time::format_cursor(synced_until),
            has_more: page.next.is_some(),
        })
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
        let mut connection = self.pool.get().await?;
        // A snapshot reads the record state, which must first absorb rows other programs wrote: that
        // writes, so it takes the exclusive lock. Snapshots are rare (a new device, or one behind the
        // retention horizon); log reads take the shared lock.
        let lock = match mode {
            ReadMode::Log(_) => connection.prepare(LOCK_SHARED).await?,
            ReadMode::Snapshot(_) => connection.prepare(LOCK_EXCLUSIVE).await?,
        };
        let page_statement = connection.prepare(tables.page_sql()).await?;
        let tx = connection.client.transaction().await?;
        // The lock is its own statement: in READ COMMITTED the page query's snapshot is taken when it
        // starts, i.e. only after every in-flight write of this user has committed.
        tx.execute(&lock, &[&user]).await?;
        if let ReadMode::Snapshot(_) = mode {
            records::fold_pending(&tx, user).await?;
        }
        let page = read_page(&tx, &page_statement, user, app, tables, device, mode, limit).await?;
        let synced_until = match page.next {
            Some(next) => next,
            None => vouched_cursor(&tx, user, since).await?,
        };
        tx.commit().await?;
        Ok(SyncResponse {
            server_changes: page.changes,
            conflicts: Vec::new(),
            synced_until: time::format_cursor(synced_until),
            has_more: page.next.is_some(),
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
            crate::http::now_micros() - retention.as_micros() as Micros - PRUNE_MARGIN_MICROS,
        );
        let mut pruned = 0;
        loop {
            let mut connection = self.pool.get().await?;
            let tx = connection.client.transaction().await?;
            tx.execute(LOCK_EXCLUSIVE, &[&user]).await?;
            records::fold_pending(&tx, user).await?;
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
        let (leader, connection) = self.connect_dedicated().await?;
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
            .map(|retention| crate::http::now_micros() - retention.as_micros() as Micros)
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

/// Turns the `limit + 1` rows of a page query into a page. When more rows exist than fit, the page ends at
/// the last row that fits, and if rows sharing that row's timestamp were cut off they are fetched too: the
/// cursor is a timestamp, so a page must never end in the middle of a group of equal timestamps (only rows
/// written by older servers share one; this server stamps every row of a user distinctly).
async fn complete_page<F, Fut>(
    rows: Vec<Row>,
    limit: usize,
    ties: F,
) -> Result<(Vec<StoredChange>, bool), StoreError>
where
    F: FnOnce(Micros, String) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Row>, tokio_postgres::Error>>,
{
    let has_more = rows.len() > limit;
    let mut changes: Vec<StoredChange> = rows
        .iter()
        .take(limit)
        .map(stored_change)
        .collect::<Result<_, _>>()?;
    if has_more {
        let next = stored_change(&rows[limit])?;
        if let Some(last) = changes.last() {
            if last.created_at == next.created_at {
                let rest = ties(last.created_at, last.event_id.clone()).await?;
                for row in &rest {
                    changes.push(stored_change(row)?);
                }
            }
        }
    }
    Ok((changes, has_more))
}

/// The newest cursor the server can vouch for: under the user's lock, every change of this user stamped at
/// or before the user's clock is visible now, and every later one will be stamped after it.
async fn vouched_cursor(
    tx: &tokio_postgres::Transaction<'_>,
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
    read().map_err(|e| StoreError::Internal(format!("unexpected row shape in sync_changes: {e}")))
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

#[allow(clippy::too_many_arguments)]
async fn read_page(
    tx: &tokio_postgres::Transaction<'_>,
    page_statement: &tokio_postgres::Statement,
    user: &str,
    app: &str,
    tables: Tables<'_>,
    device: &str,
    mode: ReadMode,
    limit: usize,
) -> Result<Page, StoreError> {
    match mode {
        ReadMode::Snapshot(from) => {
            let list: Option<Vec<String>> = match tables {
                Tables::All => None,
                Tables::One(table) => Some(vec![table.to_owned()]),
                Tables::Some(list) => Some(list.to_vec()),
            };
            let (entries, has_more) =
                records::snapshot_page(tx, user, app, list.as_deref(), from, limit).await?;
            let next = if has_more {
                entries.last().map(|(at, _)| records::snapshot_cursor(*at))
            } else {
                None
            };
            Ok(Page {
                changes: entries.into_iter().map(|(_, change)| change).collect(),
                next,
            })
        }
        ReadMode::Log(since) => {
            let limit_plus_one = page_limit(limit);
            let since = PgTimestamp(since);
            let rows = match tables {
                Tables::All => {
                    tx.query(
                        page_statement,
                        &[&user, &app, &since, &device, &limit_plus_one],
                    )
                    .await?
                }
                Tables::One(table) => {
                    tx.query(
                        page_statement,
                        &[&user, &app, &table, &since, &device, &limit_plus_one],
                    )
                    .await?
                }
                Tables::Some(list) => {
                    tx.query(
                        page_statement,
                        &[&user, &app, &since, &device, &limit_plus_one, &list],
                    )
                    .await?
                }
            };
            let (rows, has_more) = complete_page(rows, limit, |at, last_id| async move {
                let at = PgTimestamp(at);
                match tables {
                    Tables::All => {
                        tx.query(APP_TIES, &[&user, &app, &at, &device, &last_id])
                            .await
                    }
                    Tables::One(table) => {
                        tx.query(PULL_TIES, &[&user, &app, &table, &at, &device, &last_id])
                            .await
                    }
                    Tables::Some(list) => {
                        tx.query(
                            APP_TABLES_TIES,
                            &[&user, &app, &at, &device, &last_id, &list],
                        )
                        .await
                    }
                }
            })
            .await?;
            let next = if has_more {
                rows.last().map(|row| row.created_at)
            } else {
                None
            };
            Ok(Page {
                changes: rows.iter().map(StoredChange::to_wire).collect(),
                next,
            })
        }
    }
}

/// The batch as one array per column, the shape `unnest` turns back into rows.
struct BatchColumns {
    tables: Vec<String>,
    record_ids: Vec<String>,
    ops: Vec<&'static str>,
    data: Vec<serde_json::Value>,
    field_meta: Vec<serde_json::Value>,
    schema_versions: Vec<i32>,
    actors: Vec<Option<serde_json::Value>>,
    origins: Vec<Option<String>>,
    space_ids: Vec<Option<String>>,
}

impl From<&[NewChange]> for BatchColumns {
    fn from(changes: &[NewChange]) -> BatchColumns {
        BatchColumns {
            tables: changes.iter().map(|c| c.table.clone()).collect(),
            record_ids: changes.iter().map(|c| c.record_id.clone()).collect(),
            ops: changes.iter().map(|c| c.op.as_str()).collect(),
            data: changes
                .iter()
                .map(|c| serde_json::Value::Object(c.data.clone()))
                .collect(),
            field_meta: changes
                .iter()
                .map(|c| serde_json::Value::Object(c.field_meta.clone()))
                .collect(),
            schema_versions: changes.iter().map(|c| c.schema_version).collect(),
            actors: changes.iter().map(|c| c.actor.clone()).collect(),
            origins: changes.iter().map(|c| c.origin.clone()).collect(),
            space_ids: changes.iter().map(|c| c.space_id.clone()).collect(),
        }
    }
}

/// FNV-1a, to recognise a schema version already applied (not a security boundary).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
