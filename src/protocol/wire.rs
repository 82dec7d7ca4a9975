//! What the server emits: stored rows turned into the `Change` and `SyncResponse` JSON clients expect.
//!
//! Optional keys are omitted, never `null` (the web client drops entries that carry `null` where it expects
//! a string or an object); updates carry `fields` with a `value` key in every entry; deletes always carry
//! a `deletedAt` string.

use serde::Serialize;
use serde_json::{Map, Value};

use super::time::{self, Micros};

/// A row of `sync_changes` as the store reads it, in any of the formats that have been written to it
/// (this server, today's server, direct writers).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredChange {
    pub event_id: String,
    pub table: String,
    pub record_id: String,
    pub op: String,
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
    pub event_id: String,
    pub table: String,
    pub id: String,
    pub op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deleted_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub space_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    pub schema_version: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SyncResponse {
    pub server_changes: Vec<WireChange>,
    pub conflicts: Vec<Value>,
    pub synced_until: String,
    pub has_more: bool,
}

impl StoredChange {
    pub fn to_wire(&self) -> WireChange {
        self.clone().into_wire()
    }

    /// The emitted change, moving the row's values instead of copying them (a page of a thousand rows).
    pub fn into_wire(mut self) -> WireChange {
        let data = match self.data.take() {
            Some(Value::Object(map)) => map,
            _ => Map::new(),
        };
        let (op, data, fields, deleted_at) = match self.op.as_str() {
            "insert" => ("insert", Some(Value::Object(data)), None, None),
            "delete" => {
                let deleted_at = data
                    .get("deletedAt")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or_else(|| self.field_time("deletedAt"))
                    .unwrap_or_else(|| time::format_millis(self.created_at));
                let fields = self.fields(data.into_iter().filter(|(name, _)| name != "deletedAt"));
                (
                    "delete",
                    None,
                    Some(fields).filter(|f| !f.is_empty()),
                    Some(deleted_at),
                )
            }
            _ => ("update", None, Some(self.fields(data)), None),
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

    fn fields(&self, values: impl IntoIterator<Item = (String, Value)>) -> Map<String, Value> {
        values
            .into_iter()
            .map(|(name, value)| {
                let mut entry = Map::new();
                entry.insert("value".into(), value);
                if let Some(at) = self.field_time(&name) {
                    entry.insert("at".into(), Value::String(at));
                }
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
