//! The push body: parsing and validation of a `Changeset`.
//!
//! Validation happens completely before anything touches the database, so a batch is either accepted as a
//! whole or rejected with an error that names the offending change by its 0-based index. The body is first
//! parsed into a `serde_json::Value` and then checked by hand, which gives precise messages ("change 149:
//! op must be one of insert, update, delete") instead of serde's generic ones, and tolerates the unknown keys
//! clients send.
//!
//! The output, [`Changeset`], is already in the shape the store writes: one [`NewChange`] per change with the
//! op-specific `data` and `field_meta` documents computed here, so the store only moves values into SQL.
//!
//! Memory (issue 11 §4): the body is never turned into one tree. Its top level is read with every value
//! left as a slice of the body (`RawValue`), and each change is parsed on its own. A batch of more than
//! [`CHUNK`] changes keeps, once validated, only where each change is in the body ([`Changes::Spans`]); the
//! store parses them again chunk by chunk while it merges, so a large push holds its body once plus one
//! chunk of parsed changes.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

mod storable;

use super::time::{self, Micros};
use super::{is_identifier, ErrorCode, ProtocolError, SUPPORTED_SCHEMA_VERSION};
use storable::check_storable;
#[cfg(test)]
pub(crate) use storable::storable_number;

/// Longest record id, client id or origin accepted, in bytes.
pub(crate) const MAX_ID_BYTES: usize = 512;

/// Changes parsed at once: a batch of more is kept as spans of its body and parsed chunk by chunk.
pub(crate) const CHUNK: usize = 2_000;

/// A validated push.
#[derive(Debug, Clone, PartialEq)]
pub struct Changeset {
    pub client_id: Option<String>,
    /// The cursor the client pulled up to; the epoch when it sent none.
    pub(crate) since: Micros,
    pub changes: Changes,
    /// The tables the changes name.
    pub tables: BTreeSet<String>,
}

impl Changeset {
    /// A changeset of changes already parsed (tools and tests).
    pub fn new(client_id: Option<String>, since: Micros, changes: Vec<NewChange>) -> Changeset {
        let tables = changes.iter().map(|c| c.table.clone()).collect();
        Changeset {
            client_id,
            since,
            changes: Changes::Parsed(changes),
            tables,
        }
    }
}

/// The validated changes of a push.
#[derive(Debug, Clone, PartialEq)]
pub enum Changes {
    /// Parsed: batches of at most [`CHUNK`] changes.
    Parsed(Vec<NewChange>),
    /// Larger batches: each change's byte range in the body, parsed again by [`Changes::slice`].
    Spans {
        body: Bytes,
        spans: Vec<Range<usize>>,
        batch_version: i32,
    },
}

impl Changes {
    pub fn len(&self) -> usize {
        match self {
            Changes::Parsed(changes) => changes.len(),
            Changes::Spans { spans, .. } => spans.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Changes `range` (0-based change indexes), parsed. Spans were validated when the body was parsed,
    /// so this cannot fail unless that validation had a defect; the error then names the change.
    pub fn slice(&self, range: Range<usize>) -> Result<Cow<'_, [NewChange]>, ProtocolError> {
        match self {
            Changes::Parsed(changes) => Ok(Cow::Borrowed(&changes[range])),
            Changes::Spans {
                body,
                spans,
                batch_version,
            } => spans[range.clone()]
                .iter()
                .zip(range)
                .map(|(span, index)| parse_one(&body[span.clone()], *batch_version, index))
                .collect::<Result<Vec<_>, _>>()
                .map(Cow::Owned),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    /// The op of a stored row, whoever wrote it: `insert` and `delete` as such, anything else (`update`,
    /// or what another writer put there) reads as an update, merging the row's fields.
    pub fn from_stored(text: &str) -> Op {
        match text {
            "insert" => Op::Insert,
            "delete" => Op::Delete,
            _ => Op::Update,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }

    pub(crate) fn parse(text: &str) -> Option<Op> {
        match text {
            "insert" => Some(Op::Insert),
            "update" => Some(Op::Update),
            "delete" => Some(Op::Delete),
            _ => None,
        }
    }
}

/// One change, ready to be stored as a `sync_changes` row.
///
/// Storage layout (compatible with today's server and the direct writers): `data` holds the full record for
/// inserts and the changed field values for updates and deletes; `field_meta` maps a field name to the `at`
/// string it was written with. A delete also stores its `deletedAt` as the field `deletedAt`, so it survives
/// in the row and is emitted again as the change's `deletedAt`.
#[derive(Debug, Clone, PartialEq)]
pub struct NewChange {
    pub table: String,
    pub record_id: String,
    pub op: Op,
    pub data: Map<String, Value>,
    pub field_meta: Map<String, Value>,
    pub space_id: Option<String>,
    pub actor: Option<Value>,
    pub origin: Option<String>,
    pub schema_version: i32,
}

/// Parses and validates a push body.
///
/// Times a change does not carry (a timestamp-less insert, a delete without `deletedAt`) are left out:
/// the server assigns them when it stores the change (`merge`, SPEC §6).
pub fn parse_changeset(body: Bytes) -> Result<Changeset, ProtocolError> {
    parse_changeset_keeping(body, CHUNK)
}

/// [`parse_changeset`], keeping the changes parsed only when there are at most `keep_parsed` of them (the
/// fuzz target checks that both forms hold the same changes).
pub fn parse_changeset_keeping(
    body: Bytes,
    keep_parsed: usize,
) -> Result<Changeset, ProtocolError> {
    let root = parse_root(&body)?;
    let value = |key: &str| top_level_value(&root, key);
    let client_id = parse_client_id(value("clientId")?.as_ref())?;
    let since = parse_since(value("since")?.as_ref())?;
    let batch_version =
        schema_version(value("schemaVersion")?.as_ref(), "schemaVersion")?.unwrap_or(1);
    let raw_changes: Vec<&RawValue> = match root.get("changes") {
        None => Vec::new(),
        Some(raw) if raw.get() == "null" => Vec::new(),
        Some(raw) => serde_json::from_str(raw.get())
            .map_err(|_| ProtocolError::new(ErrorCode::InvalidBody, "changes must be an array"))?,
    };

    // Every change is validated now, before anything is stored; a large batch keeps only its spans.
    let keep = raw_changes.len() <= keep_parsed;
    let (parsed, spans, tables) = validate_changes(&body, &raw_changes, batch_version, keep)?;
    let changes = match keep {
        true => Changes::Parsed(parsed),
        false => Changes::Spans {
            body,
            spans,
            batch_version,
        },
    };
    Ok(Changeset {
        client_id,
        since,
        changes,
        tables,
    })
}

/// The top level with its values left as slices of the body: no tree of the whole push.
fn parse_root(body: &[u8]) -> Result<BTreeMap<String, &RawValue>, ProtocolError> {
    serde_json::from_slice(body).map_err(|e| {
        // Any object reads as that map, so an object that did not is not JSON. Anything else is
        // refused either way; only the message differs. (Skipping a value does not check the UTF-8
        // of its strings, hence the object test first.)
        let object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        let json = !object && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok();
        match json {
            true => {
                ProtocolError::new(ErrorCode::InvalidBody, "request body must be a JSON object")
            }
            false => ProtocolError::new(
                ErrorCode::InvalidJson,
                format!("request body is not valid JSON: {e}"),
            ),
        }
    })
}

/// One top-level value of the body, parsed.
fn top_level_value(
    root: &BTreeMap<String, &RawValue>,
    key: &str,
) -> Result<Option<Value>, ProtocolError> {
    root.get(key)
        .map(|raw| serde_json::from_str(raw.get()))
        .transpose()
        .map_err(|e| {
            ProtocolError::new(
                ErrorCode::InvalidJson,
                format!("{key} is not valid JSON: {e}"),
            )
        })
}

/// `clientId`: none when absent, null or empty.
fn parse_client_id(value: Option<&Value>) -> Result<Option<String>, ProtocolError> {
    let client_id = optional_string(value, "clientId", "a string")
        .map_err(|message| ProtocolError::new(ErrorCode::InvalidBody, message))?;
    match client_id {
        None | Some("") => Ok(None),
        Some(id) => Ok(Some(check_plain_text(id, "clientId")?.to_owned())),
    }
}

/// `since`: the epoch when absent, null or empty.
fn parse_since(value: Option<&Value>) -> Result<Micros, ProtocolError> {
    let since = optional_string(value, "since", "a timestamp string")
        .map_err(|message| ProtocolError::new(ErrorCode::InvalidSince, message))?;
    match since {
        None | Some("") => Ok(time::EPOCH),
        Some(s) => time::parse_rfc3339(s).map_err(|e| {
            ProtocolError::new(
                ErrorCode::InvalidSince,
                format!("since {s:?} is not a valid cursor: {e}"),
            )
        }),
    }
}

/// The changes parsed (when `keep`) or their spans in `body` (when not), and the tables they name.
type Validated = (Vec<NewChange>, Vec<Range<usize>>, BTreeSet<String>);

fn validate_changes(
    body: &[u8],
    raw_changes: &[&RawValue],
    batch_version: i32,
    keep: bool,
) -> Result<Validated, ProtocolError> {
    let mut parsed = Vec::with_capacity(if keep { raw_changes.len() } else { 0 });
    let mut spans = Vec::with_capacity(if keep { 0 } else { raw_changes.len() });
    let mut tables = BTreeSet::new();
    let start_of_body = body.as_ptr() as usize;
    for (index, raw) in raw_changes.iter().enumerate() {
        let text = raw.get().as_bytes();
        let change = parse_one(text, batch_version, index)?;
        if !tables.contains(&change.table) {
            tables.insert(change.table.clone());
        }
        if keep {
            parsed.push(change);
        } else {
            let start = text.as_ptr() as usize - start_of_body;
            spans.push(start..start + text.len());
        }
    }
    Ok((parsed, spans, tables))
}

/// One change, from its JSON text; errors name it by `index`.
fn parse_one(text: &[u8], batch_version: i32, index: usize) -> Result<NewChange, ProtocolError> {
    let change: Value = serde_json::from_slice(text).map_err(|e| {
        ProtocolError::new(
            ErrorCode::InvalidJson,
            format!("change {index} is not valid JSON: {e}"),
        )
    })?;
    parse_change(change, batch_version).map_err(|ChangeError(code, message)| {
        ProtocolError::new(code, format!("change {index}: {message}"))
    })
}

/// Why one change was rejected: an error code (usually `invalid_change`) and a message without the index.
struct ChangeError(ErrorCode, String);

impl From<String> for ChangeError {
    fn from(message: String) -> ChangeError {
        ChangeError(ErrorCode::InvalidChange, message)
    }
}

impl From<&str> for ChangeError {
    fn from(message: &str) -> ChangeError {
        ChangeError(ErrorCode::InvalidChange, message.to_owned())
    }
}

impl From<ProtocolError> for ChangeError {
    fn from(error: ProtocolError) -> ChangeError {
        ChangeError(error.code, error.message)
    }
}

fn parse_change(change: Value, batch_version: i32) -> Result<NewChange, ChangeError> {
    let Value::Object(mut change) = change else {
        return Err("must be a JSON object".into());
    };
    let table = required_string(change.get("table"), "table")?;
    if !is_identifier(table) {
        return Err("table must be 1-64 characters of A-Z a-z 0-9 _ . -".into());
    }
    let table = table.to_owned();
    let record_id = parse_record_id(change.get("id"))?;
    let op = required_string(change.get("op"), "op")?;
    let op =
        Op::parse(op).ok_or_else(|| format!("op {op:?} is not one of insert, update, delete"))?;
    let data = optional_object(change.remove("data"), "data")?;
    let fields = optional_object(change.remove("fields"), "fields")?;
    let fields = fields.map(parse_fields).transpose()?;
    let deleted_at = optional_timestamp(change.get("deletedAt"), "deletedAt")?.map(str::to_owned);
    let space_id = optional_string(change.get("spaceId"), "spaceId", "a string")?
        .map(str::to_owned)
        .or_else(|| space_id_of(data.as_ref(), fields.as_deref()));
    let actor = change.remove("actor").filter(|actor| !actor.is_null());
    let origin = optional_string(change.get("origin"), "origin", "a string")?;
    if origin.is_some_and(|origin| origin.len() > MAX_ID_BYTES) {
        return Err(format!("origin is longer than {MAX_ID_BYTES} bytes").into());
    }
    let origin = origin.map(str::to_owned);
    let schema_version =
        schema_version(change.get("schemaVersion"), "schemaVersion")?.unwrap_or(batch_version);
    check_storable(
        data.as_ref(),
        actor.as_ref(),
        fields.as_deref(),
        space_id.as_deref(),
        origin.as_deref(),
    )?;
    let (data, field_meta) = documents(op, data, fields, deleted_at)?;
    Ok(NewChange {
        table,
        record_id,
        op,
        data,
        field_meta,
        space_id,
        actor,
        origin,
        schema_version,
    })
}

/// A string that must be there: absent and null are "missing".
fn required_string<'a>(value: Option<&'a Value>, name: &str) -> Result<&'a str, String> {
    match value {
        Some(Value::String(text)) => Ok(text),
        None | Some(Value::Null) => Err(format!("{name} is missing")),
        Some(_) => Err(format!("{name} must be a string")),
    }
}

/// A string that may be absent or null; anything else is refused as not being `kind`.
fn optional_string<'a>(
    value: Option<&'a Value>,
    name: impl fmt::Display,
    kind: &str,
) -> Result<Option<&'a str>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(format!("{name} must be {kind}")),
    }
}

/// An RFC 3339 timestamp string that may be absent or null.
fn optional_timestamp(
    value: Option<&Value>,
    name: impl fmt::Display,
) -> Result<Option<&str>, String> {
    let Some(at) = optional_string(value, &name, "a timestamp string")? else {
        return Ok(None);
    };
    time::parse_rfc3339(at).map_err(|e| format!("{name} {at:?} is not a timestamp: {e}"))?;
    Ok(Some(at))
}

/// An object that may be absent or null.
fn optional_object(value: Option<Value>, name: &str) -> Result<Option<Map<String, Value>>, String> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map)),
        Some(_) => Err(format!("{name} must be an object")),
    }
}

fn parse_record_id(value: Option<&Value>) -> Result<String, ChangeError> {
    let id = required_string(value, "id")?;
    if id.is_empty() {
        return Err("id must not be empty".into());
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!("id is longer than {MAX_ID_BYTES} bytes").into());
    }
    Ok(check_plain_text(id, "id")?.to_owned())
}

/// A change without a `spaceId` of its own takes the one its data or fields carry.
fn space_id_of(data: Option<&Map<String, Value>>, fields: Option<&[FieldEntry]>) -> Option<String> {
    data.and_then(|d| d.get("spaceId"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| {
            let entry = fields?.iter().find(|entry| entry.name == "spaceId")?;
            entry.value.as_str().map(str::to_owned)
        })
}

/// A change's stored `data` (values) and `field_meta` (the `at` of each field) documents.
type Documents = (Map<String, Value>, Map<String, Value>);

/// The stored documents of a change, by its op.
fn documents(
    op: Op,
    data: Option<Map<String, Value>>,
    fields: Option<Vec<FieldEntry>>,
    deleted_at: Option<String>,
) -> Result<Documents, ChangeError> {
    match op {
        Op::Insert => match (data, fields) {
            (Some(data), fields) => Ok((data, fields.map(field_times).unwrap_or_default())),
            (None, Some(fields)) => Ok(split_fields(fields)),
            (None, None) => Err("an insert needs data".into()),
        },
        Op::Update => match (fields, data) {
            (Some(fields), _) if !fields.is_empty() => Ok(split_fields(fields)),
            (_, Some(data)) if !data.is_empty() => Ok((data, Map::new())),
            _ => Err("an update needs fields".into()),
        },
        Op::Delete => Ok(delete_documents(fields, deleted_at)),
    }
}

fn delete_documents(fields: Option<Vec<FieldEntry>>, deleted_at: Option<String>) -> Documents {
    let (mut data, mut field_meta) = fields.map(split_fields).unwrap_or_default();
    let deleted_at = deleted_at.or_else(|| {
        // A client that marks deletion only as a field still gets a top-level deletedAt.
        let at = data.get("deletedAt").and_then(Value::as_str)?;
        time::parse_rfc3339(at).ok().map(|_| at.to_owned())
    });
    match deleted_at {
        Some(deleted_at) => {
            data.insert("deletedAt".into(), Value::String(deleted_at.clone()));
            field_meta.insert("deletedAt".into(), Value::String(deleted_at));
        }
        // Without a valid one (none, or a field value that is not a time), the server assigns
        // one when it stores the delete: a delete never carries a deletedAt that is not a time.
        None => {
            data.remove("deletedAt");
            field_meta.remove("deletedAt");
        }
    }
    (data, field_meta)
}

/// One entry of `fields`: the value (`null` when the client sent none, i.e. set the field to undefined)
/// and the original `at` string.
#[derive(Debug)]
struct FieldEntry {
    name: String,
    value: Value,
    at: Option<String>,
}

fn parse_fields(fields: Map<String, Value>) -> Result<Vec<FieldEntry>, String> {
    let mut parsed = Vec::with_capacity(fields.len());
    for (name, entry) in fields {
        let Value::Object(mut entry) = entry else {
            return Err(format!("fields.{name} must be an object with value and at"));
        };
        let value = entry.remove("value").unwrap_or(Value::Null);
        // `at` wins over the older clients' `updatedAt` when both are present.
        let at = entry
            .get("at")
            .filter(|v| !v.is_null())
            .or_else(|| entry.get("updatedAt"));
        let at = optional_timestamp(at, format_args!("fields.{name}.at"))?.map(str::to_owned);
        parsed.push(FieldEntry { name, value, at });
    }
    Ok(parsed)
}

/// Splits field entries into the stored `data` (values) and `field_meta` (timestamps) documents.
fn split_fields(fields: Vec<FieldEntry>) -> Documents {
    let mut values = Map::new();
    let mut times = Map::new();
    for FieldEntry { name, value, at } in fields {
        if let Some(at) = at {
            times.insert(name.clone(), Value::String(at));
        }
        values.insert(name, value);
    }
    (values, times)
}

fn field_times(fields: Vec<FieldEntry>) -> Map<String, Value> {
    split_fields(fields).1
}

fn schema_version(value: Option<&Value>, name: &str) -> Result<Option<i32>, ProtocolError> {
    let version = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_i64().and_then(|n| i32::try_from(n).ok()),
        Some(_) => None,
    };
    match version {
        Some(v) if v > SUPPORTED_SCHEMA_VERSION => Err(ProtocolError::new(
            ErrorCode::UnsupportedSchemaVersion,
            format!("{name} {v} is newer than this server supports ({SUPPORTED_SCHEMA_VERSION})"),
        )),
        Some(v) => Ok(Some(v)),
        None => Err(ProtocolError::new(
            ErrorCode::InvalidBody,
            format!("{name} must be an integer"),
        )),
    }
}

/// Rejects text PostgreSQL cannot store or that has no business in an identifier-like value.
fn check_plain_text<'a>(text: &'a str, name: &str) -> Result<&'a str, ProtocolError> {
    if text.len() > MAX_ID_BYTES {
        return Err(ProtocolError::new(
            ErrorCode::InvalidBody,
            format!("{name} is longer than {MAX_ID_BYTES} bytes"),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(ProtocolError::new(
            ErrorCode::InvalidBody,
            format!("{name} contains control characters"),
        ));
    }
    Ok(text)
}
