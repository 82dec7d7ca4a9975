//! The merged record state (SPEC §6): maintained in `sync_records` beside the log, read for snapshots.
//!
//! The merge itself is the pure `crate::merge`; this module moves record states between PostgreSQL and
//! that merge, always inside a transaction that holds the user's exclusive lock:
//!
//! * `fold_pending` brings the state up to date with log rows it has not seen: rows other programs wrote
//!   straight into `sync_changes`, and every row of a database today's server filled (that is how the
//!   state is built from an existing log — lazily, per user, on first use).
//! * `Batch` applies a push: per field, the later `at` wins; the log row of a change records only the
//!   fields that won (a change whose every field lost adds nothing), losers become `conflicts`.
//!
//! Snapshots page through records in the order of their position `seq`: a number from the sequence
//! `sync_records_seq` that every write of a record row takes anew (`WRITE` in `push.rs`, `UPSERT` here for
//! folding). Positions are unique, so a page boundary never splits a group of equal keys, and a page that
//! ends at position `p` continues with the records after `p`: each record once. The user's writers are
//! serialised by the exclusive lock and every snapshot page is read under it, so a record written after a
//! page was read gets a position past everything that page held: it comes once more, with its new state
//! (that is its change being delivered, as the log would), and a record that changes before its page is
//! reached moves ahead and comes once, with its current state. None is skipped.
//!
//! Snapshot cursors live in a range no log cursor can take (1970-01-02 to 2000-01-01, one µs per
//! position), so a client that follows `hasMore` keeps getting snapshot pages until the snapshot is
//! complete, and only then a log cursor (see `read_mode` and `snapshot_cursor`).

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::{json, Map, Value};
use tokio_postgres::types::Json;
use tokio_postgres::{GenericClient, Row};

use super::timestamp::PgTimestamp;
use super::{Cause, StoreError};
use crate::merge::{self, ChangeKind, IncomingChange, RecordState};
use crate::protocol::time::{self, Micros};
use crate::protocol::{Conflict, NewChange, Op, WireChange};

mod fold;
mod snapshot;

pub(crate) use fold::{fold_from, fold_pending, pending_from};
pub(crate) use snapshot::{read_mode, snapshot_cursor, snapshot_page, ReadMode};
#[cfg(test)]
use snapshot::{SEQ_MAX, SEQ_START, SNAPSHOT_CEIL, SNAPSHOT_FLOOR};

/// The record's key in `data`, never listed in `fields` (CLIENTS.md).
const ID: &str = "id";
/// One row of `sync_records` as loaded for merging.
#[derive(Debug, Clone, Default)]
struct Record {
    state: RecordState,
    changed: bool,
    updated_at: Micros,
    event_id: Option<String>,
    actor: Option<Value>,
    origin: Option<String>,
    space_id: Option<String>,
    schema_version: i32,
}

type Key = (String, String, String); // app, table, record id

/// States of the records a batch touches, loaded in one round trip.
pub(crate) struct Batch {
    records: HashMap<Key, Record>,
    /// How far past its arrival a change's times are believed (`MAX_FUTURE_SKEW_SECS`).
    future_skew: Micros,
    /// Changes with a time beyond that bound (ordered at the bound).
    beyond_skew: u64,
}

/// `LOAD`'s text, for statements that embed it ($1 the user; $2, $3, $4 the apps, tables and ids).
macro_rules! load_records {
    () => {
        concat!(
            "SELECT s.app_id, s.table_name, s.record_id, s.state, s.updated_at, s.event_id::text AS event_id, ",
            "s.actor, s.origin, s.space_id, s.schema_version FROM unnest($2::text[], $3::text[], $4::text[]) ",
            "AS k(a, t, r) JOIN sync_records s ",
            "ON s.user_id = $1 AND s.app_id = k.a AND s.table_name = k.t AND s.record_id = k.r"
        )
    };
}
pub(super) use load_records;
/// States of the batch's records, looked up by primary key (a join from the key arrays, so the planner
/// probes the primary key instead of filtering another index; with statistics it does, see
/// BENCHMARKS.md on young tables).
pub(super) const LOAD: &str = load_records!();
/// What writing a record over its existing row does (the table aliased `rec`); every record write uses it.
macro_rules! record_conflict {
    () => {
        concat!(
            "ON CONFLICT (user_id, app_id, table_name, record_id) DO UPDATE SET state = excluded.state, ",
            "deleted = excluded.deleted, updated_at = excluded.updated_at, event_id = excluded.event_id, ",
            "actor = excluded.actor, origin = excluded.origin, ",
            "space_id = coalesce(excluded.space_id, rec.space_id), ",
            "schema_version = excluded.schema_version, seq = excluded.seq"
        )
    };
}
pub(super) use record_conflict;
/// What advancing a user's clock over its existing row does (the table aliased `clock`): never backwards.
macro_rules! clock_conflict {
    () => {
        concat!(
            "ON CONFLICT (user_id) DO UPDATE SET last_at = greatest(clock.last_at, excluded.last_at), ",
            "folded_at = greatest(coalesce(clock.folded_at, '-infinity'), excluded.folded_at)"
        )
    };
}
pub(super) use clock_conflict;
/// Writes folded records; each takes a new position (`seq`), which moves it past every snapshot page
/// already read.
const UPSERT: &str = concat!(
    "INSERT INTO sync_records AS rec (user_id, app_id, table_name, record_id, state, deleted, updated_at, event_id, ",
    "actor, origin, space_id, schema_version, seq) ",
    "SELECT $1, p, t, r, s, d, u, e::uuid, a, o, sp, v, nextval('sync_records_seq') FROM unnest($2::text[], $3::text[], $4::text[], ",
    "$5::jsonb[], $6::bool[], $7::timestamptz[], $8::text[], $9::jsonb[], $10::text[], $11::text[], $12::int4[]) ",
    "AS x(p, t, r, s, d, u, e, a, o, sp, v) ",
    record_conflict!()
);
impl Batch {
    pub(crate) async fn load(
        tx: &impl GenericClient,
        user: &str,
        keys: Vec<Key>,
        future_skew: Micros,
    ) -> Result<Batch, StoreError> {
        if keys.is_empty() {
            return Batch::from_rows(&[], future_skew);
        }
        let apps: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
        let tables: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
        let ids: Vec<&str> = keys.iter().map(|k| k.2.as_str()).collect();
        Batch::from_rows(
            &tx.query(LOAD, &[&user, &apps, &tables, &ids]).await?,
            future_skew,
        )
    }

    /// Changes of this batch with a time beyond the future-skew bound.
    pub(crate) fn beyond_skew(&self) -> u64 {
        self.beyond_skew
    }

    /// The states `LOAD` returned.
    pub(crate) fn from_rows(rows: &[Row], future_skew: Micros) -> Result<Batch, StoreError> {
        Batch::from_columns(rows, 0, future_skew)
    }

    /// The states in `LOAD`'s columns from column `first` on, in rows where that column is not NULL (a
    /// statement that outer-joins the records to something else).
    pub(crate) fn from_columns<'r>(
        rows: impl IntoIterator<Item = &'r Row>,
        first: usize,
        future_skew: Micros,
    ) -> Result<Batch, StoreError> {
        let mut records: HashMap<Key, Record> = HashMap::new();
        for row in rows {
            let Some(app) = row.try_get::<_, Option<String>>(first)? else {
                continue;
            };
            let state: Value = row.try_get(first + 3)?;
            let state = RecordState::from_json(&state).ok_or_else(|| {
                StoreError::Internal(Cause::new("unreadable state in sync_records"))
            })?;
            let record = Record {
                state,
                changed: false,
                updated_at: row.try_get::<_, PgTimestamp>(first + 4)?.0,
                event_id: row.try_get(first + 5)?,
                actor: row.try_get(first + 6)?,
                origin: row.try_get(first + 7)?,
                space_id: row.try_get(first + 8)?,
                schema_version: row.try_get(first + 9)?,
            };
            let key = (app, row.try_get(first + 1)?, row.try_get(first + 2)?);
            records.insert(key, record);
        }
        Ok(Batch {
            records,
            future_skew,
            beyond_skew: 0,
        })
    }

    /// Merges one change into its record. Returns the fields that won and the conflicts.
    ///
    /// `stamp` is the stamp of the change's log row (or the one it would get, should anything win): the
    /// times the server assigns to this change derive from it (`time::assigned`), so that emitting the row
    /// later can derive them again.
    pub(crate) fn apply(
        &mut self,
        app: &str,
        change: &NewChange,
        client_id: &str,
        stamp: Micros,
    ) -> (Vec<String>, Vec<merge::FieldConflict>) {
        let key = (
            app.to_owned(),
            change.table.clone(),
            change.record_id.clone(),
        );
        let record = self.records.entry(key).or_default();
        let deleted_at = match change.op {
            Op::Delete => change.data.get(merge::DELETED_AT).and_then(Value::as_str),
            _ => None,
        };
        let latest_at = stamp.saturating_add(self.future_skew);
        if has_time_after(change, latest_at) {
            self.beyond_skew += 1;
        }
        let incoming = IncomingChange {
            kind: kind_of(change.op),
            values: &change.data,
            times: &change.field_meta,
            deleted_at,
            client_id,
            received_at: stamp,
            latest_at,
        };
        let (winners, conflicts) = merge::apply(&mut record.state, &incoming);
        if !winners.is_empty() || (change.op == Op::Insert && change.data.is_empty()) {
            record.changed = true;
            record.actor = change.actor.clone();
            record.origin = change.origin.clone();
            record.space_id = change.space_id.clone().or(record.space_id.take());
            record.schema_version = change.schema_version;
        }
        (winners, conflicts)
    }

    /// The current state of a record (after `apply`), for answering conflicts.
    pub(crate) fn state(&self, app: &str, table: &str, id: &str) -> Option<&RecordState> {
        self.records
            .get(&(app.to_owned(), table.to_owned(), id.to_owned()))
            .map(|r| &r.state)
    }

    /// The record's whole current state as a snapshot entry: what a device gets instead of older values.
    pub(crate) fn current_entry(&self, app: &str, table: &str, id: &str) -> Option<WireChange> {
        let record = self
            .records
            .get(&(app.to_owned(), table.to_owned(), id.to_owned()))?;
        Some(entry(
            table,
            id,
            &record.state,
            record.event_id.clone(),
            record.actor.clone(),
            record.origin.clone(),
            record.space_id.clone(),
            record.schema_version,
        ))
    }

    /// Notes which log row (id, if known yet, and stamp) last changed a record.
    pub(crate) fn stamped(
        &mut self,
        app: &str,
        table: &str,
        id: &str,
        event_id: Option<String>,
        at: Micros,
    ) {
        if let Some(record) =
            self.records
                .get_mut(&(app.to_owned(), table.to_owned(), id.to_owned()))
        {
            if at >= record.updated_at {
                record.updated_at = at;
                record.event_id = event_id;
            }
        }
    }

    /// Every changed record, as the columns the push's write statement takes. Borrowed: the states are
    /// serialised straight into the statement's parameters, never copied into a JSON tree first.
    pub(crate) fn changed_columns(&self) -> RecordColumns<'_> {
        let mut columns = RecordColumns::default();
        for ((_, table, id), record) in self.records.iter().filter(|(_, r)| r.changed) {
            columns.tables.push(table);
            columns.ids.push(id);
            columns.states.push(Json(&record.state));
            columns.deleted.push(record.state.is_deleted());
            columns.updated.push(PgTimestamp(record.updated_at));
            columns.events.push(record.event_id.as_deref());
            columns.actors.push(record.actor.as_ref());
            columns.origins.push(record.origin.as_deref());
            columns.spaces.push(record.space_id.as_deref());
            columns.versions.push(record.schema_version.max(1));
        }
        columns
    }

    /// Gives every record last changed at one of `events`' stamps that row's id.
    pub(crate) fn set_event_ids(&mut self, events: &HashMap<Micros, String>) {
        for record in self.records.values_mut().filter(|r| r.changed) {
            if let Some(id) = events.get(&record.updated_at) {
                record.event_id = Some(id.clone());
            }
        }
    }

    /// Writes every changed record back in one round trip.
    pub(crate) async fn save(self, tx: &impl GenericClient, user: &str) -> Result<(), StoreError> {
        let changed: Vec<(Key, Record)> = self
            .records
            .into_iter()
            .filter(|(_, r)| r.changed)
            .collect();
        if changed.is_empty() {
            return Ok(());
        }
        let apps: Vec<&str> = changed.iter().map(|(k, _)| k.0.as_str()).collect();
        let tables: Vec<&str> = changed.iter().map(|(k, _)| k.1.as_str()).collect();
        let ids: Vec<&str> = changed.iter().map(|(k, _)| k.2.as_str()).collect();
        let states: Vec<Value> = changed.iter().map(|(_, r)| r.state.to_json()).collect();
        let deleted: Vec<bool> = changed.iter().map(|(_, r)| r.state.is_deleted()).collect();
        let updated: Vec<PgTimestamp> = changed
            .iter()
            .map(|(_, r)| PgTimestamp(r.updated_at))
            .collect();
        let events: Vec<Option<&str>> =
            changed.iter().map(|(_, r)| r.event_id.as_deref()).collect();
        let actors: Vec<Option<&Value>> = changed.iter().map(|(_, r)| r.actor.as_ref()).collect();
        let origins: Vec<Option<&str>> = changed.iter().map(|(_, r)| r.origin.as_deref()).collect();
        let spaces: Vec<Option<&str>> =
            changed.iter().map(|(_, r)| r.space_id.as_deref()).collect();
        let versions: Vec<i32> = changed
            .iter()
            .map(|(_, r)| r.schema_version.max(1))
            .collect();
        tx.execute(
            UPSERT,
            &[
                &user, &apps, &tables, &ids, &states, &deleted, &updated, &events, &actors,
                &origins, &spaces, &versions,
            ],
        )
        .await?;
        Ok(())
    }
}

/// Whether any time a change carries (field times, `updatedAt`, `createdAt`, `deletedAt`) is after `latest`.
fn has_time_after(change: &NewChange, latest: Micros) -> bool {
    let named = [merge::DELETED_AT, "updatedAt", "createdAt"]
        .into_iter()
        .filter_map(|name| change.data.get(name));
    change
        .field_meta
        .values()
        .chain(named)
        .filter_map(Value::as_str)
        .any(|text| time::parse_rfc3339(text).is_ok_and(|at| at > latest))
}

fn kind_of(op: Op) -> ChangeKind {
    match op {
        Op::Insert => ChangeKind::Insert,
        Op::Update => ChangeKind::Update,
        Op::Delete => ChangeKind::Delete,
    }
}

/// The log row a change leaves after merging: only the fields that won. `None` when nothing won; the
/// change itself (borrowed, not copied) when it is an insert that won everywhere, the common case.
pub(crate) fn winning_row<'c>(
    change: &'c NewChange,
    winners: &[String],
    state: &RecordState,
) -> Option<Cow<'c, NewChange>> {
    // An insert of an empty record has no field to win with, but the record must still come to exist.
    if change.op == Op::Insert && change.data.is_empty() {
        return Some(Cow::Borrowed(change));
    }
    if winners.is_empty() {
        return None;
    }
    let all_won = winners.len() == state_fields_of(change).len();
    if change.op == Op::Insert && all_won {
        return Some(Cow::Borrowed(change));
    }
    let mut data = Map::new();
    let mut field_meta = Map::new();
    for field in winners {
        if let Some(version) = state.fields.get(field) {
            data.insert(field.clone(), version.value.clone());
            field_meta.insert(field.clone(), Value::String(version.at.clone()));
        }
    }
    // A delete stays a delete only if its tombstone won; otherwise what won is an update.
    let op = if change.op == Op::Delete && winners.iter().any(|f| f == merge::DELETED_AT) {
        Op::Delete
    } else {
        Op::Update
    };
    Some(Cow::Owned(NewChange {
        table: change.table.clone(),
        record_id: change.record_id.clone(),
        op,
        data,
        field_meta,
        space_id: change.space_id.clone(),
        actor: change.actor.clone(),
        origin: change.origin.clone(),
        schema_version: change.schema_version,
    }))
}

/// The fields a change carries, as the merge sees them (inserts: every key of data; deletes: plus the
/// tombstone).
fn state_fields_of(change: &NewChange) -> Vec<&String> {
    change.data.keys().collect()
}

/// The changed records of a batch, one array per column of `sync_records`, borrowed from the batch.
#[derive(Default)]
pub(crate) struct RecordColumns<'b> {
    pub(crate) tables: Vec<&'b str>,
    pub(crate) ids: Vec<&'b str>,
    pub(crate) states: Vec<Json<&'b RecordState>>,
    pub(crate) deleted: Vec<bool>,
    pub(crate) updated: Vec<PgTimestamp>,
    pub(crate) events: Vec<Option<&'b str>>,
    pub(crate) actors: Vec<Option<&'b Value>>,
    pub(crate) origins: Vec<Option<&'b str>>,
    pub(crate) spaces: Vec<Option<&'b str>>,
    pub(crate) versions: Vec<i32>,
}

/// A conflict as the push response reports it.
pub(crate) fn conflict(table: &str, id: &str, conflict: merge::FieldConflict) -> Conflict {
    Conflict {
        table: table.to_owned(),
        id: id.to_owned(),
        field: conflict.field,
        client_value: conflict.client_value,
        client_timestamp: conflict.client_at,
        server_value: conflict.server_value,
        server_timestamp: conflict.server_at,
    }
}

/// A snapshot entry: an `update` with both `data` (the whole record) and `fields` (every field with the
/// `at` that won), or for a deleted record a `delete` with its `deletedAt`. Its `eventId`, `actor` and
/// `origin` are those of the newest change folded into the record.
#[allow(clippy::too_many_arguments)]
fn entry(
    table: &str,
    id: &str,
    state: &RecordState,
    event_id: Option<String>,
    actor: Option<Value>,
    origin: Option<String>,
    space_id: Option<String>,
    schema_version: i32,
) -> WireChange {
    let deleted_at = state.deleted_at().map(str::to_owned);
    let (op, data, fields) = match deleted_at {
        Some(_) => ("delete", None, None),
        None => {
            // `id` is the record's key, not a field: listed here the web client would keep a stray
            // `__fieldMeta.id`.
            let fields: Map<String, Value> = state
                .fields
                .iter()
                .filter(|(name, _)| name.as_str() != ID)
                .map(|(name, version)| {
                    (
                        name.clone(),
                        json!({"value": version.value, "at": version.at}),
                    )
                })
                .collect();
            ("update", Some(Value::Object(state.data())), Some(fields))
        }
    };
    WireChange {
        event_id: event_id.unwrap_or_default(),
        table: table.to_owned(),
        id: id.to_owned(),
        op,
        data,
        fields,
        deleted_at,
        space_id,
        actor: actor.filter(|a| !a.is_null()),
        origin,
        schema_version: schema_version.max(1),
    }
}

#[cfg(test)]
mod tests;
