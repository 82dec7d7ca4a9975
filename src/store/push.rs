//! A push in two round trips (ARCHITECTURE.md, "A push").
//!
//! 1. **Lock and load** — one flush: `BEGIN`; declare the user, mark the transaction as stamping its own
//!    rows and take the user's exclusive lock; then, in one statement, read the clock (and the database's
//!    time) and load the states of the records the batch touches; and, unless memory predicts that nothing
//!    is new, the response page.
//! 2. **Merge** in Rust (`records::Batch`, the pure `merge`), and stamp the winning rows after the clock
//!    that step 1 read under the lock.
//! 3. **Write and commit** — one flush: one statement inserts the log rows, upserts the record states,
//!    advances the clock and queues the cross-instance hint (carrying the new clock); `COMMIT`.
//!
//! Rare cases cost extra round trips inside the same transaction: log rows other programs wrote that are not
//! folded yet, a snapshot `since`, a page that memory wrongly predicted empty, a cursor ahead of the clock.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::chunks::{chunk_ranges, keys_of, parse_chunk, split_page, Chunks, LogRow};
use super::group::{self, Hint};
use super::records::{self, Batch, ReadMode};
use super::timestamp::PgTimestamp;
use super::user_tx::{Lock, UserTx};
use super::write::{WriteColumns, NOTIFY, WRITE};
use super::{read_page, Cause, Page, PooledConnection, Store, StoreError, Tables, CLOCK_ADVANCE};
use crate::protocol::time::{self, Micros};
use crate::protocol::{Changeset, SyncResponse, WireChange};

/// The user's clock and fold state (no row for a user never seen) and the database's time.
const PUSH_STATE: &str = concat!(
    "SELECT c.last_at, c.folded_at, clock_timestamp() FROM (SELECT 1) AS one ",
    "LEFT JOIN sync_user_clock c ON c.user_id = $1"
);
/// `PUSH_STATE` and the states of the batch's records (`records::LOAD`'s columns from column 3 on) in
/// one statement: one row per loaded record, or one row with NULL record columns when there is none. It
/// must follow the lock (`user_tx::Lock::Push`) as a statement of its own, so that its snapshot is taken under the lock.
const CLOCK_AND_RECORDS: &str = concat!(
    "SELECT c.last_at, c.folded_at, clock_timestamp(), s.* FROM (SELECT 1) AS one ",
    "LEFT JOIN sync_user_clock c ON c.user_id = $1 LEFT JOIN (",
    records::load_records!(),
    ") AS s ON true"
);
/// Where `records::LOAD`'s columns begin in `CLOCK_AND_RECORDS`.
const RECORDS_FROM: usize = 3;
/// The user's clock as step 1 read it under the exclusive lock.
struct ClockState {
    /// `None` for a user the clock has never seen.
    last_at: Option<Micros>,
    folded_at: Option<PgTimestamp>,
    db_now: Micros,
}

impl ClockState {
    /// The stamp of a push's first change: after the clock, and no earlier than the database's time.
    fn first_stamp(&self) -> Micros {
        self.db_now
            .max(self.last_at.map_or(Micros::MIN, |last| last + 1))
    }

    fn read(row: &tokio_postgres::Row) -> Result<ClockState, tokio_postgres::Error> {
        Ok(ClockState {
            last_at: row.try_get::<_, Option<PgTimestamp>>(0)?.map(|t| t.0),
            folded_at: row.try_get(1)?,
            db_now: row.try_get::<_, PgTimestamp>(2)?.0,
        })
    }
}

impl Store {
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
        hint: Option<Hint>,
    ) -> Result<SyncResponse, StoreError> {
        let device = device.unwrap_or("");
        let mode = records::read_mode(changeset.since, self.horizon());
        // Memory only predicts whether the page is worth sending along in step 1; whether it may be
        // skipped is decided by the clock read under the lock.
        let page_in_step_one = match mode {
            ReadMode::Log(since) => !self.known.nothing_after(user, since),
            ReadMode::Snapshot(_) => false,
        };
        let ticket = self.known.ticket(user);
        // The user's pushes queue here, holding nothing shared, instead of at the advisory lock with a
        // pooled connection each.
        let _share = self.user_share(user, true).await?;
        // A small push whose `since` memory knows to be current joins other users' pushes in one
        // transaction; one the group cannot answer exactly as alone comes back and runs alone.
        let count = changeset.changes.len();
        let _pushing = self.groups.pushing();
        if !page_in_step_one && matches!(mode, ReadMode::Log(_)) && self.groups.admits(count) {
            let changes = parse_chunk(changeset, &(0..count))?.into_owned();
            let since = changeset.since;
            match self
                .push_in_group(user, app, device, changes, since, hint.clone())
                .await
            {
                group::Outcome::Done(response, clock, beyond_skew) => {
                    self.known.learn(user, ticket, clock);
                    self.beyond_skew
                        .fetch_add(beyond_skew, std::sync::atomic::Ordering::Relaxed);
                    return Ok(response);
                }
                group::Outcome::Unknown(error) => return Err(error),
                group::Outcome::Bounced => {}
            }
        }
        let mut connection = self.pool.get().await?;
        let push = PushTx {
            user,
            app,
            device,
            limit,
            future_skew: self.future_skew,
            page_max_bytes: self.page_max_bytes,
        };
        let pushed = self
            .within_deadline(push.run(
                &mut connection,
                changeset,
                mode,
                page_in_step_one,
                hint.as_ref(),
            ))
            .await;
        match pushed {
            Ok((response, clock, beyond_skew)) => {
                self.known.learn(user, ticket, clock);
                self.beyond_skew
                    .fetch_add(beyond_skew, std::sync::atomic::Ordering::Relaxed);
                Ok(response)
            }
            Err(error) => {
                super::rollback(&mut connection).await;
                Err(error)
            }
        }
    }
}

/// What a push is about, fixed for its whole transaction.
#[derive(Clone, Copy)]
struct PushTx<'a> {
    user: &'a str,
    app: &'a str,
    device: &'a str,
    limit: usize,
    future_skew: Micros,
    page_max_bytes: usize,
}

/// What step 1 read under the lock.
struct Loaded {
    clock: ClockState,
    /// The states of the first chunk's records.
    batch: Batch,
    /// The response page's rows, when memory predicted a page.
    page_rows: Option<Vec<Row>>,
}

/// What the last flush writes and answers: the last chunk's log rows, and where the clock stands.
struct Finish<'r> {
    log_rows: Vec<LogRow<'r>>,
    /// The clock after every chunk's rows (the clock as read when nothing won).
    clock_after: Option<Micros>,
    /// Whether the clock moved, i.e. other devices have something to hear about.
    wrote_any: bool,
    /// Whether the cursor `since` is ahead of the clock after the writes (a cursor from elsewhere).
    advance: bool,
}

impl PushTx<'_> {
    /// The numbered steps of the module's doc. Returns the response, the user's clock at commit and how
    /// many changes had times beyond the skew.
    async fn run(
        self,
        connection: &mut PooledConnection,
        changeset: &Changeset,
        mode: ReadMode,
        page_in_step_one: bool,
        hint: Option<&Hint>,
    ) -> Result<(SyncResponse, Micros, u64), StoreError> {
        // The batch is merged and written in chunks of `CHUNK` changes, all in this one transaction, so
        // what a push holds while it works grows with the chunk, not with the batch (issue 11 §4). Almost
        // every push is one chunk: two round trips in all.
        let chunks = chunk_ranges(changeset.changes.len());
        let first = parse_chunk(changeset, &chunks[0])?;
        let keys = keys_of(self.app, &first);

        // 1. Lock and load (and the rare extra reads: rows to fold, a page memory did not predict).
        let since = changeset.since;
        let (mut tx, mut loaded) = self
            .lock_and_load(connection, &keys, since, page_in_step_one)
            .await?;
        self.fold_if_pending(&mut tx, &mut loaded, keys).await?;
        let page = self.page(&mut tx, mode, since, &mut loaded).await?;

        // 2. Merge. Change `i` is stamped `first_stamp + i`, after the clock: the time the server assigns
        // to it derives from that stamp, and its log row (if anything won) carries it.
        let Loaded {
            clock, mut batch, ..
        } = loaded;
        let first_stamp = clock.first_stamp();
        let mut work = Chunks::new(changeset, first, !page.changes.is_empty());
        let (earlier, last) = chunks.split_at(chunks.len() - 1);
        let last = &last[0];
        let written = self
            .write_chunks(&mut tx, &mut work, earlier, &mut batch, first_stamp)
            .await?;
        let changes = work
            .open(
                tx.client(),
                last,
                &mut batch,
                (self.user, self.app, self.future_skew),
            )
            .await?;
        let log_rows = work.merge(
            &mut batch,
            (self.app, self.device),
            &changes,
            first_stamp + last.start as Micros,
        );
        let finish = Finish::of(log_rows, written.or(clock.last_at), clock.last_at, since);

        // 3. Write and commit.
        let refresh = match earlier.is_empty() {
            true => Refresh::FromBatch,
            false => Refresh::ReadBack,
        };
        let (server_changes, clock_now) = self
            .write_and_commit(
                tx,
                finish,
                &mut work,
                batch,
                page.changes,
                (since, hint, refresh),
            )
            .await?;
        let synced_until = page.next.unwrap_or(clock_now).max(time::EPOCH + 1);
        let response = SyncResponse {
            server_changes,
            conflicts: work.conflicts,
            synced_until,
            has_more: page.next.is_some(),
        };
        Ok((response, clock_now, work.beyond_skew))
    }

    /// Step 1, one flush: `BEGIN`, the user and the exclusive lock; the clock and the first chunk's record
    /// states in one statement; and the response page when `page_in_step_one`.
    async fn lock_and_load<'c>(
        self,
        connection: &'c mut PooledConnection,
        keys: &[(String, String, String)],
        since: Micros,
        page_in_step_one: bool,
    ) -> Result<(UserTx<'c>, Loaded), StoreError> {
        let clock_and_records = connection.prepare(CLOCK_AND_RECORDS).await?;
        let page_statement = connection.prepare(Tables::All.page_sql()).await?;
        let apps: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let tables: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
        let ids: Vec<&str> = keys.iter().map(|k| k.2.as_str()).collect();
        let (user, app, device) = (self.user, self.app, self.device);
        let (limit, budget) = (self.limit, self.page_max_bytes);
        let page_params = super::page_params(user, app, Tables::All, device, since, limit, budget);
        let page_params = page_params.refs();
        let load_params: [&(dyn ToSql + Sync); 4] = [&user, &apps, &tables, &ids];
        let (tx, (loaded, page_rows)) =
            UserTx::begin(connection, user, Lock::Push, async |client| {
                tokio::try_join!(
                    biased;
                    client.query(&clock_and_records, &load_params),
                    async {
                        match page_in_step_one {
                            true => client.query(&page_statement, &page_params).await.map(Some),
                            false => Ok(None),
                        }
                    },
                )
            })
            .await?;
        let first = loaded
            .first()
            .ok_or_else(|| StoreError::Internal(Cause::new("the clock read returned no row")))?;
        let loaded = Loaded {
            clock: ClockState::read(first)?,
            batch: Batch::from_columns(&loaded, RECORDS_FROM, self.future_skew)?,
            page_rows,
        };
        Ok((tx, loaded))
    }

    /// Rows other programs wrote are folded first: they change the states just loaded, and the clock.
    async fn fold_if_pending(
        self,
        tx: &mut UserTx<'_>,
        loaded: &mut Loaded,
        keys: Vec<(String, String, String)>,
    ) -> Result<(), StoreError> {
        let Some(from) = records::pending_from(loaded.clock.last_at, loaded.clock.folded_at) else {
            return Ok(());
        };
        let (user, skew) = (self.user, self.future_skew);
        if records::fold_from(tx.client(), user, from, skew).await? {
            loaded.batch = Batch::load(tx.client(), user, keys, skew).await?;
        }
        let state = tx.prepare(PUSH_STATE).await?;
        loaded.clock = ClockState::read(&tx.client().query_one(&state, &[&user]).await?)?;
        Ok(())
    }

    /// The response page: read in step 1 when memory expected changes; read now when the clock, read
    /// under the lock, says something is newer than `since` after all (or for a snapshot); else empty.
    async fn page(
        self,
        tx: &mut UserTx<'_>,
        mode: ReadMode,
        since: Micros,
        loaded: &mut Loaded,
    ) -> Result<Page, StoreError> {
        let anything_new = loaded.clock.last_at.is_some_and(|last| last > since);
        let (user, app, device, limit) = (self.user, self.app, self.device, self.limit);
        match (mode, loaded.page_rows.take()) {
            (ReadMode::Log(_), Some(rows)) => {
                super::log_page(tx.client(), user, app, Tables::All, device, rows, limit).await
            }
            (ReadMode::Log(_), None) if !anything_new => Ok(Page::empty()),
            (mode, _) => {
                let statement = tx.prepare(Tables::All.page_sql()).await?;
                let (all, bound) = (Tables::All, (limit, self.page_max_bytes));
                read_page(tx.client(), &statement, user, app, all, device, mode, bound).await
            }
        }
    }

    /// Every chunk but the last: load, merge, write; one round trip each. Returns the stamp of the last
    /// log row written, if any.
    async fn write_chunks(
        self,
        tx: &mut UserTx<'_>,
        work: &mut Chunks<'_>,
        chunks: &[Range<usize>],
        batch: &mut Batch,
        first_stamp: Micros,
    ) -> Result<Option<Micros>, StoreError> {
        let write = tx.prepare(WRITE).await?;
        let mut written = None;
        for range in chunks {
            let lookup = (self.user, self.app, self.future_skew);
            let changes = work.open(tx.client(), range, batch, lookup).await?;
            let stamp = first_stamp + range.start as Micros;
            let log_rows = work.merge(batch, (self.app, self.device), &changes, stamp);
            if let Some((_, stamp)) = log_rows.last() {
                written = Some(*stamp);
                let columns = WriteColumns::of(&log_rows, batch, *stamp);
                let params = columns.params(&self.user, &self.app, &self.device, &None);
                tx.client().query(&write, &params).await?;
            }
        }
        Ok(written)
    }

    /// Step 3, one flush: the last chunk's write (with the hint), the clock's advance when the cursor is
    /// ahead of it, the merged states of records to answer with (read back when earlier chunks replaced
    /// the batch), `COMMIT`. Returns the page's entries with those states, and the clock at commit.
    async fn write_and_commit(
        self,
        tx: UserTx<'_>,
        finish: Finish<'_>,
        work: &mut Chunks<'_>,
        batch: Batch,
        page: Vec<WireChange>,
        (since, hint, refresh): (Micros, Option<&Hint>, Refresh),
    ) -> Result<(Vec<WireChange>, Micros), StoreError> {
        let mut tx = tx;
        let write = tx.prepare(WRITE).await?;
        let notify = tx.prepare(NOTIFY).await?;
        let load = tx.prepare(records::LOAD).await?;
        let advance_statement = tx.prepare(CLOCK_ADVANCE).await?;
        // Page entries for records this batch touched, and records where a pushed field lost, are answered
        // with their merged state.
        let touched = work.touched.take();
        let (mut server_changes, refreshed) =
            split_page(touched, page, std::mem::take(&mut work.lost));
        let refresh_keys = refresh.keys(self.app, &refreshed);
        let wrote_last = !finish.log_rows.is_empty();
        let columns = WriteColumns::of(
            &finish.log_rows,
            &batch,
            finish.clock_after.unwrap_or(Micros::MIN),
        );
        let (hint_in_write, hint_alone) = finish.hints(hint);
        let params = columns.params(&self.user, &self.app, &self.device, &hint_in_write);
        let since_param = PgTimestamp(since);
        let apps: Vec<&str> = refresh_keys.iter().map(|k| k.0.as_str()).collect();
        let tables: Vec<&str> = refresh_keys.iter().map(|k| k.1.as_str()).collect();
        let ids: Vec<&str> = refresh_keys.iter().map(|k| k.2.as_str()).collect();
        let load_params: [&(dyn ToSql + Sync); 4] = [&self.user, &apps, &tables, &ids];
        let user = self.user;
        let (events, _, advanced, reread) = tx
            .commit_after(async |client| {
                tokio::try_join!(
                    biased;
                    async {
                        match wrote_last {
                            false => Ok(Vec::new()),
                            true => client.query(&write, &params).await,
                        }
                    },
                    async {
                        match &hint_alone {
                            Some(payload) => client.execute(&notify, &[payload]).await.map(drop),
                            None => Ok(()),
                        }
                    },
                    async {
                        match finish.advance {
                            true => client
                                .query_one(&advance_statement, &[&user, &since_param])
                                .await
                                .map(|row| Some(row.get::<_, PgTimestamp>(0).0)),
                            false => Ok(None),
                        }
                    },
                    async {
                        match refresh_keys.is_empty() {
                            true => Ok(None),
                            false => client.query(&load, &load_params).await.map(Some),
                        }
                    },
                )
            })
            .await?;
        drop(columns);
        let current = match reread {
            Some(rows) => Batch::from_rows(&rows, self.future_skew)?,
            None => with_event_ids(batch, &events)?,
        };
        for (table, id) in &refreshed {
            server_changes.extend(current.current_entry(self.app, table, id));
        }
        let clock_now = advanced.or(finish.clock_after).unwrap_or(since).max(since);
        Ok((server_changes, clock_now))
    }
}

/// Where the merged states of records to answer with come from: the batch, when the push was one chunk
/// (it holds every record the push touched); else read back inside the transaction.
#[derive(Clone, Copy)]
enum Refresh {
    FromBatch,
    ReadBack,
}

impl Refresh {
    /// The record keys to read back before `COMMIT` (none when the batch has them).
    fn keys(
        self,
        app: &str,
        refreshed: &BTreeSet<(String, String)>,
    ) -> Vec<(String, String, String)> {
        match self {
            Refresh::FromBatch => Vec::new(),
            Refresh::ReadBack => refreshed
                .iter()
                .map(|(table, id)| (app.to_owned(), table.clone(), id.clone()))
                .collect(),
        }
    }
}

/// The batch with the event ids of the log rows just written (`WRITE` returns id and stamp per row).
fn with_event_ids(mut batch: Batch, written: &[Row]) -> Result<Batch, StoreError> {
    let events: HashMap<Micros, String> = written
        .iter()
        .map(|row| Ok((row.try_get::<_, PgTimestamp>(1)?.0, row.try_get(0)?)))
        .collect::<Result<_, tokio_postgres::Error>>()?;
    batch.set_event_ids(&events);
    Ok(batch)
}

impl<'r> Finish<'r> {
    /// The hint to other instances (only when the clock moved): it rides with the last chunk's write, or
    /// goes on its own when only earlier chunks wrote. Returns (in the write, alone).
    fn hints(&self, hint: Option<&Hint>) -> (Option<String>, Option<String>) {
        let payload = match (hint, self.clock_after) {
            (Some(hint), Some(stamp)) if self.wrote_any => Some(hint(stamp)),
            _ => None,
        };
        match self.log_rows.is_empty() {
            false => (payload, None),
            true => (None, payload),
        }
    }

    /// `clock_before`: the clock step 1 read; `written`: the clock after the earlier chunks.
    fn of(
        log_rows: Vec<LogRow<'r>>,
        written: Option<Micros>,
        clock_before: Option<Micros>,
        since: Micros,
    ) -> Finish<'r> {
        let clock_after = log_rows.last().map(|(_, stamp)| *stamp).or(written);
        Finish {
            log_rows,
            clock_after,
            wrote_any: clock_after != clock_before,
            // A cursor this response hands out must be behind every later write: a `since` from
            // elsewhere that is ahead of the clock moves the clock.
            advance: clock_after.is_none_or(|c| c < since),
        }
    }
}
