//! Step 3's statement for one user's push: the log rows, the record states, the clock and the hint in one
//! statement, and its parameters as one array per column.

use std::borrow::Cow;

use serde_json::{Map, Value};
use tokio_postgres::types::{Json, ToSql};

use super::records::{self, Batch};
use super::timestamp::PgTimestamp;
use crate::protocol::time::Micros;
use crate::protocol::NewChange;

/// Step 3: the log rows (stamped by us), the record states (each pointing at its newest log row, each
/// taking a new snapshot position from `sync_records_seq`: one `nextval` per changed record), the clock
/// and the hint to other instances, in one statement. $1 user, $2 app, $3 device, $4–$13 log columns,
/// $14–$23 record columns, $24 the new clock, $25 the hint (NULL: none). The hint is a CTE the result
/// joins (an unreferenced one would not run); PostgreSQL delivers it at commit.
pub(super) const WRITE: &str = concat!(
    "WITH logged AS (",
    "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data, field_meta, client_id, ",
    "schema_version, actor, origin, space_id, created_at) ",
    "SELECT $2, t, r, $1, o, d, f, $3, v, a, g, s, c FROM unnest($4::text[], $5::text[], $6::text[], ",
    "$7::jsonb[], $8::jsonb[], $9::int4[], $10::jsonb[], $11::text[], $12::text[], $13::timestamptz[]) ",
    "AS u(t, r, o, d, f, v, a, g, s, c) RETURNING id, created_at), ",
    "recorded AS (",
    "INSERT INTO sync_records AS rec (user_id, app_id, table_name, record_id, state, deleted, updated_at, ",
    "event_id, actor, origin, space_id, schema_version, seq) ",
    "SELECT $1, $2, x.t, x.r, x.s, x.d, x.u, coalesce(l.id, x.e::uuid), x.a, x.o, x.sp, x.v, ",
    "nextval('sync_records_seq') ",
    "FROM unnest($14::text[], $15::text[], $16::jsonb[], $17::bool[], $18::timestamptz[], $19::text[], ",
    "$20::jsonb[], $21::text[], $22::text[], $23::int4[]) AS x(t, r, s, d, u, e, a, o, sp, v) ",
    "LEFT JOIN logged l ON l.created_at = x.u ",
    super::records::record_conflict!(),
    "), ",
    "clocked AS (",
    "INSERT INTO sync_user_clock AS clock (user_id, last_at, folded_at) VALUES ($1, $24, $24) ",
    super::records::clock_conflict!(),
    "), ",
    "hinted AS (SELECT pg_notify('mana_sync_changes', $25::text) WHERE $25::text IS NOT NULL) ",
    "SELECT id::text, created_at FROM logged, (SELECT count(*) FROM hinted) AS h"
);
pub(super) const NOTIFY: &str = "SELECT pg_notify('mana_sync_changes', $1)";

/// The columns of one write statement: log rows (borrowed from the merge) and changed records (borrowed
/// from the batch), and the clock to advance to.
pub(super) struct WriteColumns<'r, 'b> {
    log: LogColumns<'r>,
    stamps: Vec<PgTimestamp>,
    records: records::RecordColumns<'b>,
    clock: PgTimestamp,
}

impl<'r, 'b> WriteColumns<'r, 'b> {
    pub(super) fn of(
        rows: &'r [(Cow<'_, NewChange>, Micros)],
        batch: &'b Batch,
        clock: Micros,
    ) -> WriteColumns<'r, 'b> {
        WriteColumns {
            log: LogColumns::of(rows),
            stamps: rows.iter().map(|(_, at)| PgTimestamp(*at)).collect(),
            records: batch.changed_columns(),
            clock: PgTimestamp(clock),
        }
    }

    /// `WRITE`'s parameters, in order.
    pub(super) fn params<'a>(
        &'a self,
        user: &'a &str,
        app: &'a &str,
        device: &'a &str,
        hint: &'a Option<String>,
    ) -> [&'a (dyn ToSql + Sync); 25] {
        let (log, records) = (&self.log, &self.records);
        [
            user,
            app,
            device,
            &log.tables,
            &log.record_ids,
            &log.ops,
            &log.data,
            &log.field_meta,
            &log.schema_versions,
            &log.actors,
            &log.origins,
            &log.space_ids,
            &self.stamps,
            &records.tables,
            &records.ids,
            &records.states,
            &records.deleted,
            &records.updated,
            &records.events,
            &records.actors,
            &records.origins,
            &records.spaces,
            &records.versions,
            &self.clock,
            hint,
        ]
    }
}

/// The log rows as one array per column, the shape `unnest` turns back into rows; borrowed from the rows,
/// whose JSON is serialised straight into the statement's parameters.
struct LogColumns<'r> {
    tables: Vec<&'r str>,
    record_ids: Vec<&'r str>,
    ops: Vec<&'static str>,
    data: Vec<Json<&'r Map<String, Value>>>,
    field_meta: Vec<Json<&'r Map<String, Value>>>,
    schema_versions: Vec<i32>,
    actors: Vec<Option<&'r Value>>,
    origins: Vec<Option<&'r str>>,
    space_ids: Vec<Option<&'r str>>,
}

impl<'r> LogColumns<'r> {
    fn of(rows: &'r [(Cow<'_, NewChange>, Micros)]) -> LogColumns<'r> {
        let changes = || rows.iter().map(|(change, _)| change.as_ref());
        LogColumns {
            tables: changes().map(|c| c.table.as_str()).collect(),
            record_ids: changes().map(|c| c.record_id.as_str()).collect(),
            ops: changes().map(|c| c.op.as_str()).collect(),
            data: changes().map(|c| Json(&c.data)).collect(),
            field_meta: changes().map(|c| Json(&c.field_meta)).collect(),
            schema_versions: changes().map(|c| c.schema_version).collect(),
            actors: changes().map(|c| c.actor.as_ref()).collect(),
            origins: changes().map(|c| c.origin.as_deref()).collect(),
            space_ids: changes().map(|c| c.space_id.as_deref()).collect(),
        }
    }
}
