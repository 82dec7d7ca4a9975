//! The read path: pulls, stream pages and a push's response page.
//!
//! One function (`Store::read`) serves every read. It answers from memory when `known` vouches that
//! nothing is newer than the cursor; else a log read is one flush (`read_log`: `BEGIN`, the shared lock,
//! the page, the clock, `COMMIT`); else (a snapshot, a cursor ahead of the clock, a page ending inside a
//! group of rows sharing one stamp) a transaction of its own (`read_locked`). The page statement is one of
//! three, one per index order: a collection (`user_id, app_id, table_name, created_at`), the whole app and
//! some tables of it (`user_id, app_id, created_at`). A generic plan of one statement for all three would
//! filter a busy app's other tables row by row.

use tokio_postgres::types::ToSql;
use tokio_postgres::{GenericClient, Row};

use super::records::{self, ReadMode};
use super::timestamp::PgTimestamp;
use super::user_tx::{Lock, UserTx};
use super::{rollback, Cause, PooledConnection, Store, StoreError};
use crate::protocol::time::{self, Micros};
use crate::protocol::{Op, PullQuery, StoredChange, SyncResponse, WireChange};

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
/// The push response covers every table of the app. $1 user, $2 app, $3 since, $4 device, $5 limit,
/// $6 byte budget.
const APP_PAGE: &str = bounded_page!(
    "created_at > $3 AND ($4 = '' OR client_id <> $4)",
    "$5",
    "$6"
);
/// A stream's page: like APP_PAGE, limited to some tables. $6 = the tables, $7 byte budget.
const APP_TABLES_PAGE: &str = bounded_page!(
    "created_at > $3 AND ($4 = '' OR client_id <> $4) AND table_name = ANY($6)",
    "$5",
    "$7"
);
/// The rest of a group of rows sharing one stamp that a page boundary cut (only older servers wrote such
/// groups), for every kind of page: $3 that stamp, $4 device, $5 the page's last id, $6 the tables (NULL:
/// all). One statement serves the three pages: the equality on the stamp makes the app-wide index
/// (`user_id, app_id, created_at`) find the group directly, whatever the tables. The pages themselves stay
/// three statements, one per index order (ARCHITECTURE.md, "One read path").
const TIES: &str = concat!(
    select_changes!(),
    "created_at = $3 AND ($4 = '' OR client_id <> $4) AND id > $5::text::uuid ",
    "AND ($6::text[] IS NULL OR table_name = ANY($6)) ORDER BY id"
);
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
    /// Changes of one collection since a cursor, excluding the device's own, paged (or a snapshot).
    pub(crate) async fn pull(
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
                    synced_until: since,
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
            synced_until: page.next.unwrap_or(clock.max(since)),
            has_more: page.next.is_some(),
            server_changes: page.changes,
            conflicts: Vec::new(),
        })
    }
}

fn page_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX - 1).max(1) + 1
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
    let page_statement = connection.prepare(tables.page_sql()).await?;
    let clock_statement = connection.prepare(CLOCK).await?;
    let params = page_params(user, app, tables, device, since, limit, budget);
    let (user_param, page_param): ([&(dyn ToSql + Sync); 1], _) = ([&user], params.refs());
    let read = UserTx::in_one_flush(connection, user, Lock::Shared, async |client| {
        tokio::try_join!(
            biased;
            client.query(&page_statement, &page_param),
            client.query_opt(&clock_statement, &user_param),
        )
    })
    .await;
    let (rows, clock) = match read {
        Ok(read) => read,
        Err(error) => {
            rollback(connection).await;
            return Err(error);
        }
    };
    let clock = match clock {
        Some(row) => row.try_get::<_, PgTimestamp>(0)?.0,
        None => return Ok(None),
    };
    // A full page that ends inside a group of rows sharing one stamp (only older servers wrote such
    // groups) needs the rest of the group from inside the transaction: the general path does that.
    if clock < since || ends_in_tie(&rows, limit)? {
        return Ok(None);
    }
    let page = log_page(connection.client(), user, app, tables, device, rows, limit).await?;
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
        ReadMode::Log(since) => (Lock::Shared, since),
        ReadMode::Snapshot(_) => (Lock::Exclusive, time::EPOCH),
    };
    let page_statement = connection.prepare(tables.page_sql()).await?;
    let (tx, ()) = UserTx::begin(connection, user, lock, async |_| Ok(())).await?;
    let client = tx.client();
    if let ReadMode::Snapshot(_) = mode {
        records::fold_pending(client, user, future_skew).await?;
    }
    let bound = (limit, budget);
    let page = read_page(
        client,
        &page_statement,
        user,
        app,
        tables,
        device,
        mode,
        bound,
    )
    .await?;
    let clock = vouched_cursor(client, user, since).await?;
    tx.commit().await?;
    Ok((page, clock))
}

/// The parameters of a log page query (`Tables::page_sql`), in its order.
pub(super) struct PageParams<'a> {
    user: &'a str,
    app: &'a str,
    tables: Tables<'a>,
    device: &'a str,
    since: PgTimestamp,
    limit_plus_one: i64,
    budget: i64,
}

pub(super) fn page_params<'a>(
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
    pub(super) fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
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
pub(super) async fn log_page(
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
            let tables: Option<Vec<&str>> = match tables {
                Tables::All => None,
                Tables::One(table) => Some(vec![table]),
                Tables::Some(list) => Some(list.iter().map(String::as_str).collect()),
            };
            let params: [&(dyn ToSql + Sync); 6] = [&user, &app, &at, &device, &last_id, &tables];
            for row in &client.query(TIES, &params).await? {
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
            op: Op::from_stored(row.try_get(3)?),
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
pub(super) enum Tables<'a> {
    All,
    One(&'a str),
    Some(&'a [String]),
}

impl Tables<'_> {
    pub(super) fn page_sql(self) -> &'static str {
        match self {
            Tables::All => APP_PAGE,
            Tables::One(_) => PULL_PAGE,
            Tables::Some(_) => APP_TABLES_PAGE,
        }
    }
}

/// One page of changes; `next` is the cursor to continue from when more remain.
pub(super) struct Page {
    pub(super) changes: Vec<WireChange>,
    pub(super) next: Option<Micros>,
}

impl Page {
    pub(super) fn empty() -> Page {
        Page {
            changes: Vec::new(),
            next: None,
        }
    }
}

/// One page in either mode, inside the user's transaction.
#[allow(clippy::too_many_arguments)]
pub(super) async fn read_page(
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
