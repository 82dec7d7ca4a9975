//! What the server emits: stored rows turned into the `Change` and `SyncResponse` JSON clients expect.
//!
//! Optional keys are omitted, never `null` (the web client drops entries that carry `null` where it expects
//! a string or an object); updates carry `fields` with a `value` key in every entry; deletes always carry
//! a `deletedAt` string.

use serde::Serialize;
use serde_json::{Map, Value};

use super::time::{self, Micros};
use super::Op;

/// The field that holds a record's tombstone.
const DELETED_AT: &str = "deletedAt";
/// The record's key: in `data`, never listed in `fields` (CLIENTS.md: the web client would keep a stray
/// `__fieldMeta.id`).
const ID: &str = "id";

/// A row of `sync_changes` as the store reads it, in any of the formats that have been written to it
/// (this server, today's server, direct writers).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredChange {
    pub event_id: String,
    pub table: String,
    pub record_id: String,
    pub op: Op,
    pub data: Option<Value>,
    pub field_meta: Option<Value>,
    pub created_at: Micros,
    pub schema_version: i32,
    pub actor: Option<Value>,
    pub origin: Option<String>,
    pub space_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WireChange {
    pub(crate) event_id: String,
    pub(crate) table: String,
    pub id: String,
    pub(crate) op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) data: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) fields: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) deleted_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) space_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) actor: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) origin: Option<String>,
    pub(crate) schema_version: i32,
}

/// A field of a pushed change that lost the merge to a value the server holds with a later time.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Conflict {
    pub(crate) table: String,
    pub(crate) id: String,
    pub(crate) field: String,
    pub(crate) client_value: Value,
    pub(crate) client_timestamp: String,
    pub(crate) server_value: Value,
    pub(crate) server_timestamp: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncResponse {
    pub server_changes: Vec<WireChange>,
    pub(crate) conflicts: Vec<Conflict>,
    /// The cursor to continue from, written in the fixed-width cursor form only when serialised.
    #[serde(serialize_with = "serialize_cursor")]
    pub synced_until: Micros,
    pub has_more: bool,
}

fn serialize_cursor<S: serde::Serializer>(
    cursor: &Micros,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&time::format_cursor(*cursor))
}

impl StoredChange {
    pub fn to_wire(&self) -> WireChange {
        self.clone().into_wire()
    }

    /// The emitted change, moving the row's values instead of copying them (a page of a thousand rows).
    ///
    /// Every emitted field has its `at`: its own from `field_meta`, else the row's change time (deletedAt,
    /// updatedAt, createdAt), else the time the server assigned, derived from the row's stamp exactly as
    /// the merge derived it (SPEC §6). An insert that carried no time at all is emitted in the snapshot
    /// shape, an `update` with `data` and `fields`: the web client dates a received insert with its own
    /// clock, and would then drop every edit made before it caught up. `fields` never lists `id`.
    pub(crate) fn into_wire(mut self) -> WireChange {
        let data = match self.data.take() {
            Some(Value::Object(map)) => map,
            _ => Map::new(),
        };
        let (op, data, fields, deleted_at) = match self.op {
            // (An empty record has no field to date: it stays an insert, so that it comes to exist.)
            Op::Insert if data.is_empty() || time::change_time(None, &data).is_some() => {
                ("insert", Some(Value::Object(data)), None, None)
            }
            Op::Insert => {
                let fallback = self.fallback_at(&data, None);
                let fields = self.fields(data.clone(), &fallback);
                ("update", Some(Value::Object(data)), Some(fields), None)
            }
            Op::Delete => {
                let deleted_at = data
                    .get(DELETED_AT)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or_else(|| self.field_time(DELETED_AT))
                    .unwrap_or_else(|| time::assigned(self.created_at).1);
                let fallback = self.fallback_at(&data, Some(&deleted_at));
                let others = data.into_iter().filter(|(name, _)| name != DELETED_AT);
                let fields = self.fields(others, &fallback);
                (
                    "delete",
                    None,
                    Some(fields).filter(|f| !f.is_empty()),
                    Some(deleted_at),
                )
            }
            Op::Update => {
                let fallback = self.fallback_at(&data, None);
                ("update", None, Some(self.fields(data, &fallback)), None)
            }
        };
        WireChange {
            event_id: self.event_id,
            table: self.table,
            id: self.record_id,
            op,
            data,
            fields,
            deleted_at,
            space_id: self.space_id,
            actor: self.actor.filter(|a| !a.is_null()),
            origin: self.origin,
            // Rows written before schema versions existed carry 0; clients only know 1 and up.
            schema_version: self.schema_version.max(1),
        }
    }

    /// The `at` of fields without one in `field_meta`: the change's time, else the assigned time.
    fn fallback_at(&self, data: &Map<String, Value>, deleted_at: Option<&str>) -> String {
        match time::change_time(deleted_at, data) {
            Some((_, text)) => text.to_owned(),
            None => time::assigned(self.created_at).1,
        }
    }

    /// `fields` entries for `values` (all but `id`), each with its `at` (see [`StoredChange::into_wire`]).
    fn fields(
        &self,
        values: impl IntoIterator<Item = (String, Value)>,
        fallback: &str,
    ) -> Map<String, Value> {
        values
            .into_iter()
            .filter(|(name, _)| name != ID)
            .map(|(name, value)| {
                let at = self
                    .field_time(&name)
                    .unwrap_or_else(|| fallback.to_owned());
                let mut entry = Map::new();
                entry.insert("value".into(), value);
                entry.insert("at".into(), Value::String(at));
                (name, Value::Object(entry))
            })
            .collect()
    }

    /// The timestamp of one field in `field_meta`: a plain string (this server, today's server) or an
    /// object with `at` / `updatedAt` (tolerated from direct writers).
    fn field_time(&self, name: &str) -> Option<String> {
        match self.field_meta.as_ref()?.get(name)? {
            Value::String(at) => Some(at.clone()),
            Value::Object(meta) => meta
                .get("at")
                .or_else(|| meta.get("updatedAt"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => None,
        }
    }
}
