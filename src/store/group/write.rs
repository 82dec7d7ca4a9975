//! Step 3 of a push group: one statement writing every push's log rows, record states, clock and hint,
//! and its parameters as one array per column.

use tokio_postgres::types::{Json, ToSql};

use super::Member;
use crate::protocol::time::Micros;
use crate::protocol::NewChange;
use crate::store::records;
use crate::store::timestamp::PgTimestamp;

/// Step 3 for the whole group: `push::WRITE` with a user per row, a clock per user and a hint per user.
pub(super) const WRITE_GROUP: &str = concat!(
    "WITH logged AS (",
    "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data, field_meta, client_id, ",
    "schema_version, actor, origin, space_id, created_at) ",
    "SELECT p, t, r, w, o, d, f, c, v, a, g, s, at FROM unnest($1::text[], $2::text[], $3::text[], ",
    "$4::text[], $5::text[], $6::text[], $7::jsonb[], $8::jsonb[], $9::int4[], $10::jsonb[], $11::text[], ",
    "$12::text[], $13::timestamptz[]) AS u(w, p, c, t, r, o, d, f, v, a, g, s, at) ",
    "RETURNING id, user_id, created_at), ",
    "recorded AS (",
    "INSERT INTO sync_records AS rec (user_id, app_id, table_name, record_id, state, deleted, updated_at, ",
    "event_id, actor, origin, space_id, schema_version, seq) ",
    "SELECT x.w, x.p, x.t, x.r, x.s, x.d, x.u, coalesce(l.id, x.e::uuid), x.a, x.o, x.sp, x.v, ",
    "nextval('sync_records_seq') ",
    "FROM unnest($14::text[], $15::text[], $16::text[], $17::text[], $18::jsonb[], $19::bool[], ",
    "$20::timestamptz[], $21::text[], $22::jsonb[], $23::text[], $24::text[], $25::int4[]) ",
    "AS x(w, p, t, r, s, d, u, e, a, o, sp, v) ",
    "LEFT JOIN logged l ON l.user_id = x.w AND l.created_at = x.u ",
    records::record_conflict!(),
    "), ",
    "clocked AS (",
    "INSERT INTO sync_user_clock AS clock (user_id, last_at, folded_at) ",
    "SELECT w, at, at FROM unnest($26::text[], $27::timestamptz[]) AS k(w, at) ",
    records::clock_conflict!(),
    "), ",
    "hinted AS (SELECT pg_notify('mana_sync_changes', h) FROM unnest($28::text[]) AS h) ",
    "SELECT (SELECT count(*) FROM logged), (SELECT count(*) FROM hinted)"
);

/// One push waiting for (or in) a group.
/// The group's log rows, column by column.
#[derive(Default)]
pub(super) struct GroupLog<'m> {
    users: Vec<&'m str>,
    apps: Vec<&'m str>,
    devices: Vec<&'m str>,
    tables: Vec<&'m str>,
    ids: Vec<&'m str>,
    ops: Vec<&'static str>,
    data: Vec<Json<&'m serde_json::Map<String, serde_json::Value>>>,
    field_meta: Vec<Json<&'m serde_json::Map<String, serde_json::Value>>>,
    versions: Vec<i32>,
    actors: Vec<Option<&'m serde_json::Value>>,
    origins: Vec<Option<&'m str>>,
    spaces: Vec<Option<&'m str>>,
    stamps: Vec<PgTimestamp>,
}

impl<'m> GroupLog<'m> {
    pub(super) fn push(&mut self, member: &'m Member, change: &'m NewChange, stamp: Micros) {
        // (`change` is the log row: the pushed change, or what of it won.)
        self.users.push(&member.user);
        self.apps.push(&member.app);
        self.devices.push(&member.device);
        self.tables.push(&change.table);
        self.ids.push(&change.record_id);
        self.ops.push(change.op.as_str());
        self.data.push(Json(&change.data));
        self.field_meta.push(Json(&change.field_meta));
        self.versions.push(change.schema_version);
        self.actors.push(change.actor.as_ref());
        self.origins.push(change.origin.as_deref());
        self.spaces.push(change.space_id.as_deref());
        self.stamps.push(PgTimestamp(stamp));
    }
}

/// The group's record states, column by column (`records::RecordColumns` of every push, one after the
/// other, with each row's user and app).
#[derive(Default)]
pub(super) struct GroupRecords<'b> {
    users: Vec<&'b str>,
    apps: Vec<&'b str>,
    columns: records::RecordColumns<'b>,
}

impl<'b> GroupRecords<'b> {
    pub(super) fn extend(&mut self, member: &'b Member, columns: records::RecordColumns<'b>) {
        let rows = columns.tables.len();
        self.users
            .extend(std::iter::repeat_n(member.user.as_str(), rows));
        self.apps
            .extend(std::iter::repeat_n(member.app.as_str(), rows));
        let all = &mut self.columns;
        all.tables.extend(columns.tables);
        all.ids.extend(columns.ids);
        all.states.extend(columns.states);
        all.deleted.extend(columns.deleted);
        all.updated.extend(columns.updated);
        all.events.extend(columns.events);
        all.actors.extend(columns.actors);
        all.origins.extend(columns.origins);
        all.spaces.extend(columns.spaces);
        all.versions.extend(columns.versions);
    }
}

/// The clock each writing push advances its user's to, and its hint.
#[derive(Default)]
pub(super) struct GroupClocks<'m> {
    pub(super) users: Vec<&'m str>,
    pub(super) stamps: Vec<PgTimestamp>,
    pub(super) hints: Vec<String>,
}

/// `WRITE_GROUP`'s parameters, in order.
pub(super) fn write_params<'a>(
    log: &'a GroupLog<'a>,
    records: &'a GroupRecords<'a>,
    clocks: &'a GroupClocks<'a>,
) -> [&'a (dyn ToSql + Sync); 28] {
    let r = &records.columns;
    [
        &log.users,
        &log.apps,
        &log.devices,
        &log.tables,
        &log.ids,
        &log.ops,
        &log.data,
        &log.field_meta,
        &log.versions,
        &log.actors,
        &log.origins,
        &log.spaces,
        &log.stamps,
        &records.users,
        &records.apps,
        &r.tables,
        &r.ids,
        &r.states,
        &r.deleted,
        &r.updated,
        &r.events,
        &r.actors,
        &r.origins,
        &r.spaces,
        &r.versions,
        &clocks.users,
        &clocks.stamps,
        &clocks.hints,
    ]
}
