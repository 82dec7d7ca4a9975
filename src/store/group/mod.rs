//! Small pushes of different users that arrive together share one transaction (group commit).
//!
//! Under load most pushes carry one change, and what a one-change push costs PostgreSQL is almost all fixed
//! per-statement and per-transaction work; a statement that writes many rows costs little more than one
//! that writes a row. So a push that qualifies (`Groups::admits`) joins a queue; whoever of the queued
//! pushes gets one of the few group turns takes the queue (at most one push per user, up to `max` pushes)
//! and runs them as one transaction of five statements, whatever their number:
//!
//! 1. `BEGIN`; declare the group's users (`mana_sync.users`, which the row-level security policies admit
//!    besides `app.current_user_id`), mark the transaction as stamping its own rows and try every user's
//!    exclusive lock without waiting; then one statement (its snapshot taken under the locks) reads every
//!    user's clock and the states of every record the group touches.
//! 2. Each push is merged in Rust exactly as alone (`merge_member`), its changes stamped after its user's
//!    clock read under the lock.
//! 3. One statement writes every push's log rows and record states, advances every clock and queues every
//!    hint; `COMMIT`.
//!
//! A push the group cannot answer exactly as `Store::push` would alone — its user's lock is busy, its user
//! has rows to fold, the clock
//! says something is newer than its `since` (a page to send), a field lost (conflicts answered with merged
//! state), or its cursor is ahead of the clock — is *bounced*: the group writes nothing of it, and after the
//! commit it runs alone. It only read under the lock, so that is harmless. A group that fails as a whole
//! (one push's value refused by PostgreSQL, contention) bounces every push; each then gets its own answer
//! alone. Memory-predicted pages make bounces rare: only pushes whose `since` memory knows to be current
//! qualify.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{oneshot, Semaphore};
use tokio_postgres::types::ToSql;

mod write;

use super::records::{self, Batch};
use super::timestamp::PgTimestamp;
use super::{Cause, Store, StoreError};
use crate::protocol::time::{self, Micros};
use crate::protocol::{NewChange, SyncResponse};
use write::{write_params, GroupClocks, GroupLog, GroupRecords, WRITE_GROUP};

/// Pushes with at most this many changes may join a group; larger ones gain little and would hold the
/// group's other pushes up.
pub(crate) const MAX_CHANGES: usize = 20;

/// The hint for other instances, given the new clock (owned: the group's turn may run on another task).
pub type Hint = Arc<dyn Fn(Micros) -> String + Send + Sync>;

/// Declares the group's users, marks the transaction as stamping its own rows and tries every user's
/// exclusive lock without waiting (so nothing but a lock wait can deadlock, and a user whose lock is
/// busy — another instance's long push, a direct writer — holds up no one else: that push is bounced and
/// waits alone). $1 the users as a text array literal, $2 the users; answers whether each lock was taken.
const LOCK_GROUP: &str = concat!(
    "SELECT set_config('app.current_user_id', '', true), set_config('mana_sync.users', $1, true), ",
    "set_config('mana_sync.stamped', 'on', true), ",
    "(SELECT array_agg(pg_try_advisory_xact_lock(",
    super::user_tx::user_lock_class!(),
    ", hashtext(u)) ORDER BY o) ",
    "FROM unnest($2::text[]) WITH ORDINALITY AS x(u, o))"
);
/// Every user's clock and the database's time (one row per user, in $1's order), then the states of every
/// record the group touches (rows with a NULL clock column, `records::LOAD`'s columns from column 4 on, the
/// user in column 3). $1 users; $2–$5 the records' users, apps, tables and ids.
const CLOCKS_AND_RECORDS: &str = concat!(
    "SELECT u.o, c.last_at, c.folded_at, clock_timestamp(), u.u, NULL, NULL, NULL, NULL::jsonb, ",
    "NULL::timestamptz, NULL, NULL::jsonb, NULL, NULL, NULL::int4 ",
    "FROM unnest($1::text[]) WITH ORDINALITY AS u(u, o) LEFT JOIN sync_user_clock c ON c.user_id = u.u ",
    "UNION ALL ",
    "SELECT NULL, NULL, NULL, NULL, s.user_id, s.app_id, s.table_name, s.record_id, s.state, s.updated_at, ",
    "s.event_id::text, s.actor, s.origin, s.space_id, s.schema_version ",
    "FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) AS k(w, a, t, r) JOIN sync_records s ",
    "ON s.user_id = k.w AND s.app_id = k.a AND s.table_name = k.t AND s.record_id = k.r"
);
/// Where `records::LOAD`'s columns begin in `CLOCKS_AND_RECORDS`.
const RECORDS_FROM: usize = 5;
pub(crate) struct Member {
    id: u64,
    pub(crate) user: String,
    pub(crate) app: String,
    pub(crate) device: String,
    pub(crate) changes: Vec<NewChange>,
    pub(crate) since: Micros,
    pub(crate) hint: Option<Hint>,
    reply: Option<oneshot::Sender<Outcome>>,
}

/// What became of a push in a group.
pub(crate) enum Outcome {
    /// Written and committed: the response, the user's clock at commit, changes beyond the skew bound.
    Done(SyncResponse, Micros, u64),
    /// Not written; run it alone.
    Bounced,
    /// The group's transaction may or may not have committed (its connection broke at the end, or the push
    /// that ran it was cancelled): answered as a failed push, which the client retries.
    Unknown(StoreError),
}

/// The queue and the group turns.
pub(crate) struct Groups {
    queue: Mutex<VecDeque<Member>>,
    turns: Semaphore,
    max: usize,
    /// Pushes at the database now (alone or grouped), and how many there must be before small pushes
    /// group: below that a push runs alone, as grouping then only makes it wait for its co-members.
    busy: AtomicUsize,
    after: usize,
    next_id: AtomicU64,
    stats: GroupStats,
}

/// Counters for /metrics (since start).
#[derive(Debug, Default)]
pub struct GroupStats {
    /// Group transactions committed.
    pub committed: AtomicU64,
    /// Group transactions that failed as a whole (every push bounced or answered as unknown).
    pub failed: AtomicU64,
    /// Pushes answered by a group.
    pub written: AtomicU64,
    /// Pushes a group handed back to run alone.
    pub bounced: AtomicU64,
}

impl Groups {
    /// `turns` groups may be at the database at once, each of at most `max` pushes, once `after` pushes
    /// are at the database; `turns == 0` or `max < 2`: no groups (every push runs alone).
    pub(crate) fn new(turns: usize, max: usize, after: usize) -> Groups {
        Groups {
            queue: Mutex::new(VecDeque::new()),
            turns: Semaphore::new(turns),
            max: if turns == 0 { 0 } else { max },
            busy: AtomicUsize::new(0),
            after,
            next_id: AtomicU64::new(0),
            stats: GroupStats::default(),
        }
    }

    pub(crate) fn stats(&self) -> &GroupStats {
        &self.stats
    }

    /// Counts a push at the database until the guard is dropped.
    pub(crate) fn pushing(&self) -> Pushing<'_> {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Pushing { groups: self }
    }

    /// Whether a push of `changes` changes may join a group (the caller's `pushing` guard counted).
    pub(crate) fn admits(&self, changes: usize) -> bool {
        self.max >= 2
            && (1..=MAX_CHANGES).contains(&changes)
            && self.busy.load(Ordering::Relaxed) >= self.after
    }

    /// Up to `max` queued pushes of distinct users, oldest first; the others stay queued.
    fn take(&self) -> Vec<Member> {
        let mut queue = self.queue.lock();
        let mut users = BTreeSet::new();
        let mut taken = Vec::new();
        let mut kept = VecDeque::new();
        while let Some(member) = queue.pop_front() {
            if taken.len() < self.max && users.insert(member.user.clone()) {
                taken.push(member);
            } else {
                kept.push_back(member);
            }
        }
        *queue = kept;
        taken
    }
}

impl Store {
    /// Runs `member` in a group: queues it, then either waits for another push's turn to answer it or takes
    /// a turn and runs a group itself (its own push included if still queued). `Bounced`: run it alone.
    pub(super) async fn push_in_group(
        &self,
        user: &str,
        app: &str,
        device: &str,
        changes: Vec<NewChange>,
        since: Micros,
        hint: Option<Hint>,
    ) -> Outcome {
        let (reply, mut answer) = oneshot::channel();
        let id = self.groups.next_id.fetch_add(1, Ordering::Relaxed);
        // A push cancelled while queued leaves the queue (one already taken into a group runs on).
        let _queued = Queued {
            groups: &self.groups,
            id,
        };
        self.groups.queue.lock().push_back(Member {
            id,
            user: user.to_owned(),
            app: app.to_owned(),
            device: device.to_owned(),
            changes,
            since,
            hint,
            reply: Some(reply),
        });
        loop {
            tokio::select! {
                biased;
                outcome = &mut answer => {
                    return outcome.unwrap_or_else(|_| {
                        Outcome::Unknown(StoreError::Unavailable(Cause::new(
                            "the push that ran this push's group was cancelled",
                        )))
                    })
                }
                turn = self.groups.turns.acquire() => {
                    let Ok(_turn) = turn else { return Outcome::Bounced };
                    let members = self.groups.take();
                    if !members.is_empty() {
                        self.run_group(members).await;
                    }
                }
            }
        }
    }

    /// Runs one group and answers each of its pushes.
    async fn run_group(&self, mut members: Vec<Member>) {
        let outcomes = match self.pool.get().await {
            Ok(mut connection) => {
                connection.in_transaction = true;
                let future_skew = self.future_skew;
                let ran = self
                    .within_deadline(group_tx(&mut connection, &members, future_skew))
                    .await;
                match ran {
                    Ok(outcomes) => {
                        connection.in_transaction = false;
                        Ok(outcomes)
                    }
                    Err(error) => {
                        super::rollback(&mut connection).await;
                        Err(error)
                    }
                }
            }
            Err(error) => Err(error),
        };
        // A statement PostgreSQL refused aborted the transaction (the pipelined COMMIT then rolls back):
        // nothing was written. A broken connection or a timeout leaves the commit unknown.
        let unknown = match &outcomes {
            Err(error @ (StoreError::Unavailable(cause) | StoreError::Internal(cause)))
                if cause.code().is_none() =>
            {
                Some(error.clone())
            }
            _ => None,
        };
        let stats = &self.groups.stats;
        let counter = match outcomes {
            Ok(_) => &stats.committed,
            Err(_) => &stats.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut outcomes = outcomes.unwrap_or_default().into_iter();
        for member in &mut members {
            let outcome = match (&unknown, outcomes.next()) {
                (Some(error), _) => Outcome::Unknown(error.clone()),
                (None, Some(outcome)) => outcome,
                (None, None) => Outcome::Bounced,
            };
            let counter = match outcome {
                Outcome::Done(..) => &stats.written,
                _ => &stats.bounced,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if let Some(reply) = member.reply.take() {
                let _ = reply.send(outcome);
            }
        }
    }
}

/// A push counted as at the database (`Groups::pushing`).
pub(crate) struct Pushing<'g> {
    groups: &'g Groups,
}

impl Drop for Pushing<'_> {
    fn drop(&mut self) {
        self.groups.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Removes a push from the queue when its request is dropped while it waits.
struct Queued<'g> {
    groups: &'g Groups,
    id: u64,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.groups
            .queue
            .lock()
            .retain(|member| member.id != self.id);
    }
}

/// The user's clock as the group read it under the lock.
struct Clock {
    last_at: Option<Micros>,
    folded_at: Option<PgTimestamp>,
    db_now: Micros,
}

/// One push merged: its log rows and their stamps, and what to answer.
struct Merged<'m> {
    batch: Batch,
    rows: Vec<(Cow<'m, NewChange>, Micros)>,
    clock: Micros,
    beyond_skew: u64,
}

/// The group's transaction; one outcome per member, in order. An error: nothing was written.
async fn group_tx(
    connection: &mut super::PooledConnection,
    members: &[Member],
    future_skew: Micros,
) -> Result<Vec<Outcome>, StoreError> {
    // Step 1: lock and load, one flush.
    let users: Vec<&str> = members.iter().map(|m| m.user.as_str()).collect();
    let keys = RecordKeys::of(members);
    let lock = connection.prepare(LOCK_GROUP).await?;
    let load = connection.prepare(CLOCKS_AND_RECORDS).await?;
    let write = connection.prepare(WRITE_GROUP).await?;
    let client = connection.client();
    let users_literal = array_literal(&users);
    let lock_params: [&(dyn ToSql + Sync); 2] = [&users_literal, &users];
    let load_params: [&(dyn ToSql + Sync); 5] =
        [&users, &keys.users, &keys.apps, &keys.tables, &keys.ids];
    let (_, locked, rows) = tokio::try_join!(
        biased;
        client.batch_execute("BEGIN"),
        client.query_one(&lock, &lock_params),
        client.query(&load, &load_params),
    )?;
    let locked: Vec<bool> = locked.try_get(3)?;
    let (clocks, mut record_rows) = split_loaded(&rows, &users)?;

    // Step 2: merge each push alone.
    let mut merged: Vec<Option<Merged>> = Vec::with_capacity(members.len());
    for ((member, clock), locked) in members.iter().zip(clocks).zip(locked) {
        let clock =
            clock.ok_or_else(|| StoreError::Internal(Cause::new("no clock for a member")))?;
        if !locked {
            merged.push(None);
            continue;
        }
        let loaded = record_rows.remove(member.user.as_str()).unwrap_or_default();
        let batch = Batch::from_columns(loaded, RECORDS_FROM, future_skew)?;
        merged.push(merge_member(member, &clock, batch));
    }

    // Step 3: write and commit, one flush.
    write_and_commit(client, &write, members, &merged).await?;
    Ok(outcomes(members, merged))
}

/// The distinct records the group's pushes touch, one array per column for `CLOCKS_AND_RECORDS`.
struct RecordKeys<'m> {
    users: Vec<&'m str>,
    apps: Vec<&'m str>,
    tables: Vec<&'m str>,
    ids: Vec<&'m str>,
}

impl<'m> RecordKeys<'m> {
    fn of(members: &'m [Member]) -> RecordKeys<'m> {
        let mut keys: Vec<[&str; 4]> = members
            .iter()
            .flat_map(|m| {
                m.changes
                    .iter()
                    .map(|c| [m.user.as_str(), m.app.as_str(), &c.table, &c.record_id])
            })
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let column = |i: usize| keys.iter().map(|k| k[i]).collect::<Vec<&str>>();
        RecordKeys {
            users: column(0),
            apps: column(1),
            tables: column(2),
            ids: column(3),
        }
    }
}

/// `CLOCKS_AND_RECORDS`'s rows: each member's clock (by position), and each user's record rows.
#[allow(clippy::type_complexity)]
fn split_loaded<'r>(
    rows: &'r [tokio_postgres::Row],
    users: &[&'r str],
) -> Result<
    (
        Vec<Option<Clock>>,
        HashMap<&'r str, Vec<&'r tokio_postgres::Row>>,
    ),
    StoreError,
> {
    let mut clocks: Vec<Option<Clock>> = users.iter().map(|_| None).collect();
    let mut record_rows: HashMap<&str, Vec<&tokio_postgres::Row>> = HashMap::new();
    for row in rows {
        match row.try_get::<_, Option<i64>>(0)? {
            Some(position) => {
                let slot = clocks
                    .get_mut(position as usize - 1)
                    .ok_or_else(|| StoreError::Internal(Cause::new("a clock for no member")))?;
                *slot = Some(Clock {
                    last_at: row.try_get::<_, Option<PgTimestamp>>(1)?.map(|t| t.0),
                    folded_at: row.try_get(2)?,
                    db_now: row.try_get::<_, PgTimestamp>(3)?.0,
                });
            }
            None => {
                let user: &str = row.try_get(4)?;
                let member = users.iter().find(|u| **u == user).copied();
                let user = member
                    .ok_or_else(|| StoreError::Internal(Cause::new("a record for no member")))?;
                record_rows.entry(user).or_default().push(row);
            }
        }
    }
    Ok((clocks, record_rows))
}

/// Step 3: every merged push's log rows, record states, clock and hint in one statement, and `COMMIT`,
/// in one flush (just `COMMIT` when nothing won anywhere).
async fn write_and_commit(
    client: &tokio_postgres::Client,
    write: &tokio_postgres::Statement,
    members: &[Member],
    merged: &[Option<Merged<'_>>],
) -> Result<(), StoreError> {
    let mut log = GroupLog::default();
    let mut records = GroupRecords::default();
    let mut clocks = GroupClocks::default();
    for (member, merged) in members.iter().zip(merged) {
        let Some(merged) = merged else { continue };
        if merged.rows.is_empty() {
            continue;
        }
        for (change, stamp) in &merged.rows {
            log.push(member, change, *stamp);
        }
        records.extend(member, merged.batch.changed_columns());
        clocks.users.push(&member.user);
        clocks.stamps.push(PgTimestamp(merged.clock));
        if let Some(hint) = &member.hint {
            clocks.hints.push(hint(merged.clock));
        }
    }
    if clocks.users.is_empty() {
        client.batch_execute("COMMIT").await?;
        return Ok(());
    }
    let params = write_params(&log, &records, &clocks);
    tokio::try_join!(
        biased;
        client.query_one(write, &params),
        client.batch_execute("COMMIT"),
    )?;
    Ok(())
}

/// Each member's answer: written (no page: memory knew `since` current, and the clock agreed), or bounced.
fn outcomes(members: &[Member], merged: Vec<Option<Merged<'_>>>) -> Vec<Outcome> {
    members
        .iter()
        .zip(merged)
        .map(|(member, merged)| match merged {
            None => Outcome::Bounced,
            Some(merged) => {
                let synced_until = merged.clock.max(member.since).max(time::EPOCH + 1);
                let response = SyncResponse {
                    server_changes: Vec::new(),
                    conflicts: Vec::new(),
                    synced_until,
                    has_more: false,
                };
                Outcome::Done(response, merged.clock.max(member.since), merged.beyond_skew)
            }
        })
        .collect()
}

/// Merges one push as `Store::push` would alone; `None` when it must run alone (see the module's doc).
fn merge_member<'m>(member: &'m Member, clock: &Clock, mut batch: Batch) -> Option<Merged<'m>> {
    if records::pending_from(clock.last_at, clock.folded_at).is_some()
        || clock.last_at.is_some_and(|last| last > member.since)
    {
        return None;
    }
    let first_stamp = clock
        .db_now
        .max(clock.last_at.map_or(Micros::MIN, |last| last + 1));
    let mut rows = Vec::new();
    for (change, stamp) in member.changes.iter().zip(first_stamp..) {
        let (winners, losers) = batch.apply(&member.app, change, &member.device, stamp);
        if !losers.is_empty() {
            return None;
        }
        let state = batch.state(&member.app, &change.table, &change.record_id)?;
        if let Some(row) = records::winning_row(change, &winners, state) {
            batch.stamped(&member.app, &change.table, &change.record_id, None, stamp);
            rows.push((row, stamp));
        }
    }
    let clock_after = rows.last().map(|(_, stamp)| *stamp).or(clock.last_at);
    // A cursor ahead of the clock moves the clock (alone: `CLOCK_ADVANCE`).
    let clock_after = clock_after.filter(|c| *c >= member.since)?;
    let beyond_skew = batch.beyond_skew();
    Some(Merged {
        batch,
        rows,
        clock: clock_after,
        beyond_skew,
    })
}

/// `'{"a","b"}'`: PostgreSQL's text form of a text array, which the policies cast back exactly.
fn array_literal(items: &[&str]) -> String {
    let mut out = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in item.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_literal_quotes_every_item() {
        assert_eq!(array_literal(&[]), "{}");
        assert_eq!(array_literal(&["a", "b c"]), r#"{"a","b c"}"#);
        assert_eq!(array_literal(&[r#"x"y\z"#, "{,}"]), r#"{"x\"y\\z","{,}"}"#);
    }

    #[test]
    fn small_pushes_group_only_once_enough_pushes_are_at_the_database() {
        let groups = Groups::new(2, 16, 3);
        let (a, b) = (groups.pushing(), groups.pushing());
        assert!(!groups.admits(1));
        let c = groups.pushing();
        assert!(groups.admits(1) && groups.admits(MAX_CHANGES));
        assert!(!groups.admits(MAX_CHANGES + 1) && !groups.admits(0));
        drop((a, b, c));
        assert!(!groups.admits(1));
        assert!(!Groups::new(0, 16, 0).admits(1), "no turns: no groups");
    }

    #[test]
    fn a_group_takes_one_push_per_user_and_at_most_max() {
        let groups = Groups::new(1, 2, 0);
        for user in ["a", "a", "b", "c"] {
            groups.queue.lock().push_back(Member {
                id: 0,
                user: user.into(),
                app: "todo".into(),
                device: "d".into(),
                changes: Vec::new(),
                since: 0,
                hint: None,
                reply: None,
            });
        }
        let users = |members: Vec<Member>| members.into_iter().map(|m| m.user).collect::<Vec<_>>();
        assert_eq!(users(groups.take()), ["a", "b"]);
        assert_eq!(users(groups.take()), ["a", "c"]);
        assert!(groups.take().is_empty());
    }
}
