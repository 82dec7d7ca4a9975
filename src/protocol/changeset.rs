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
use std::ops::Range;

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::time::{self, Micros};
use super::{is_identifier, ErrorCode, ProtocolError, SUPPORTED_SCHEMA_VERSION};

/// Longest record id, client id or origin accepted, in bytes.
pub const MAX_ID_BYTES: usize = 512;

/// Changes parsed at once: a batch of more is kept as spans of its body and parsed chunk by chunk.
pub const CHUNK: usize = 2_000;

/// A validated push.
#[derive(Debug, Clone, PartialEq)]
pub struct Changeset {
    pub client_id: Option<String>,
    /// The cursor the client pulled up to; the epoch when it sent none.
    pub since: Micros,
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
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
        }
    }

    pub fn parse(text: &str) -> Option<Op> {
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
    // The top level with its values left as slices of the body: no tree of the whole push.
    let root: BTreeMap<String, &RawValue> = match serde_json::from_slice(&body) {
        Ok(root) => root,
        Err(e) => {
            // Any object reads as that map, so an object that did not is not JSON. Anything else is
            // refused either way; only the message differs. (Skipping a value does not check the UTF-8
            // of its strings, hence the object test first.)
            let object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
            let json = !object && serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok();
            return Err(match json {
                true => {
                    ProtocolError::new(ErrorCode::InvalidBody, "request body must be a JSON object")
                }
                false => ProtocolError::new(
                    ErrorCode::InvalidJson,
                    format!("request body is not valid JSON: {e}"),
                ),
            });
        }
    };
    let value = |key: &str| -> Result<Option<Value>, ProtocolError> {
        root.get(key)
            .map(|raw| serde_json::from_str(raw.get()))
            .transpose()
            .map_err(|e| {
                ProtocolError::new(
                    ErrorCode::InvalidJson,
                    format!("{key} is not valid JSON: {e}"),
                )
            })
    };

    let client_id = match value("clientId")? {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(check_plain_text(&s, "clientId")?.to_owned()),
        Some(_) => {
            return Err(ProtocolError::new(
                ErrorCode::InvalidBody,
                "clientId must be a string",
            ))
        }
    };

    let since = match value("since")? {
        None | Some(Value::Null) => time::EPOCH,
        Some(Value::String(s)) if s.is_empty() => time::EPOCH,
        Some(Value::String(s)) => time::parse_rfc3339(&s).map_err(|e| {
            ProtocolError::new(
                ErrorCode::InvalidSince,
                format!("since {s:?} is not a valid cursor: {e}"),
            )
        })?,
        Some(_) => {
            return Err(ProtocolError::new(
                ErrorCode::InvalidSince,
                "since must be a timestamp string",
            ))
        }
    };

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

    let table = match change.get("table") {
        Some(Value::String(t)) if is_identifier(t) => t.clone(),
        Some(Value::String(_)) => {
            return Err("table must be 1-64 characters of A-Z a-z 0-9 _ . -".into())
        }
        None | Some(Value::Null) => return Err("table is missing".into()),
        Some(_) => return Err("table must be a string".into()),
    };
    let record_id = match change.get("id") {
        Some(Value::String(id)) if id.is_empty() => return Err("id must not be empty".into()),
        Some(Value::String(id)) if id.len() > MAX_ID_BYTES => {
            return Err(format!("id is longer than {MAX_ID_BYTES} bytes").into())
        }
        Some(Value::String(id)) => check_plain_text(id, "id")?.to_owned(),
        None | Some(Value::Null) => return Err("id is missing".into()),
        Some(_) => return Err("id must be a string".into()),
    };
    let op = match change.get("op") {
        Some(Value::String(op)) => Op::parse(op)
            .ok_or_else(|| format!("op {op:?} is not one of insert, update, delete"))?,
        None | Some(Value::Null) => return Err("op is missing".into()),
        Some(_) => return Err("op must be a string".into()),
    };

    let data = match change.remove("data") {
        None | Some(Value::Null) => None,
        Some(Value::Object(data)) => Some(data),
        Some(_) => return Err("data must be an object".into()),
    };
    let fields = match change.remove("fields") {
        None | Some(Value::Null) => None,
        Some(Value::Object(fields)) => Some(parse_fields(fields)?),
        Some(_) => return Err("fields must be an object".into()),
    };
    let deleted_at = match change.get("deletedAt") {
        None | Some(Value::Null) => None,
        Some(Value::String(at)) => {
            time::parse_rfc3339(at)
                .map_err(|e| format!("deletedAt {at:?} is not a timestamp: {e}"))?;
            Some(at.clone())
        }
        Some(_) => return Err("deletedAt must be a timestamp string".into()),
    };

    let space_id = match change.get("spaceId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("spaceId must be a string".into()),
    }
    .or_else(|| {
        data.as_ref()
            .and_then(|d| d.get("spaceId"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    })
    .or_else(|| {
        let fields = fields.as_ref()?;
        let entry = fields.iter().find(|entry| entry.name == "spaceId")?;
        entry.value.as_str().map(str::to_owned)
    });
    let actor = match change.remove("actor") {
        None | Some(Value::Null) => None,
        Some(actor) => Some(actor),
    };
    let origin = match change.get("origin") {
        None | Some(Value::Null) => None,
        Some(Value::String(o)) if o.len() <= MAX_ID_BYTES => Some(o.clone()),
        Some(Value::String(_)) => {
            return Err(format!("origin is longer than {MAX_ID_BYTES} bytes").into())
        }
        Some(_) => return Err("origin must be a string".into()),
    };
    let schema_version =
        schema_version(change.get("schemaVersion"), "schemaVersion")?.unwrap_or(batch_version);

    // PostgreSQL's JSONB and TEXT cannot hold U+0000; reject it here rather than fail inside the transaction.
    let nul_in = [
        ("data", data.as_ref().is_some_and(map_has_nul)),
        ("actor", actor.as_ref().is_some_and(value_has_nul)),
        (
            "fields",
            fields
                .iter()
                .flatten()
                .any(|f| f.name.contains('\0') || value_has_nul(&f.value)),
        ),
        (
            "spaceId",
            space_id.as_deref().is_some_and(|t| t.contains('\0')),
        ),
        (
            "origin",
            origin.as_deref().is_some_and(|t| t.contains('\0')),
        ),
    ];
    if let Some((name, _)) = nul_in.iter().find(|(_, found)| *found) {
        return Err(format!("{name} contains the character U+0000, which cannot be stored").into());
    }
    // Nor can it hold every number JSON can write: reject those here too, naming the change.
    let unstorable = [
        ("data", data.as_ref().and_then(map_unstorable_number)),
        ("actor", actor.as_ref().and_then(unstorable_number)),
        (
            "fields",
            fields
                .iter()
                .flatten()
                .find_map(|f| unstorable_number(&f.value)),
        ),
    ];
    if let Some((name, Some(number))) = unstorable.iter().find(|(_, found)| found.is_some()) {
        let shown: String = number.chars().take(40).collect();
        let more = if number.len() > 40 { "…" } else { "" };
        return Err(ChangeError(
            ErrorCode::InvalidNumber,
            format!("{name} holds the number {shown}{more}, which PostgreSQL cannot store"),
        ));
    }

    let (data, field_meta) = match op {
        Op::Insert => match (data, fields) {
            (Some(data), fields) => (data, fields.map(field_times).unwrap_or_default()),
            (None, Some(fields)) => split_fields(fields),
            (None, None) => return Err("an insert needs data".into()),
        },
        Op::Update => match (fields, data) {
            (Some(fields), _) if !fields.is_empty() => split_fields(fields),
            (_, Some(data)) if !data.is_empty() => (data, Map::new()),
            _ => return Err("an update needs fields".into()),
        },
        Op::Delete => {
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
    };

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
        let at = match entry
            .get("at")
            .filter(|v| !v.is_null())
            .or_else(|| entry.get("updatedAt"))
        {
            None | Some(Value::Null) => None,
            Some(Value::String(at)) => {
                time::parse_rfc3339(at)
                    .map_err(|e| format!("fields.{name}.at {at:?} is not a timestamp: {e}"))?;
                Some(at.clone())
            }
            Some(_) => return Err(format!("fields.{name}.at must be a timestamp string")),
        };
        parsed.push(FieldEntry { name, value, at });
    }
    Ok(parsed)
}

/// Splits field entries into the stored `data` (values) and `field_meta` (timestamps) documents.
fn split_fields(fields: Vec<FieldEntry>) -> (Map<String, Value>, Map<String, Value>) {
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

fn value_has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(value_has_nul),
        Value::Object(map) => map_has_nul(map),
        _ => false,
    }
}

/// The first number in `value` that PostgreSQL's `numeric` (the number type of `jsonb`) refuses.
fn unstorable_number(value: &Value) -> Option<&str> {
    match value {
        Value::Number(number) => {
            let text = number.as_str();
            (!storable_number(text)).then_some(text)
        }
        Value::Array(items) => items.iter().find_map(unstorable_number),
        Value::Object(map) => map_unstorable_number(map),
        _ => None,
    }
}

fn map_unstorable_number(map: &Map<String, Value>) -> Option<&str> {
    map.values().find_map(unstorable_number)
}

/// PostgreSQL's `numeric` input (`set_var_from_str`): an exponent of at most ±1000, at most 131,072
/// digits before the decimal point and 16,383 after it, once the exponent is applied.
pub fn storable_number(text: &str) -> bool {
    const MAX_EXPONENT: i64 = 1000;
    const MAX_BEFORE_POINT: i64 = 131_072;
    const MAX_AFTER_POINT: i64 = 16_383;
    let unsigned = text.strip_prefix('-').unwrap_or(text);
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], &unsigned[at + 1..]),
        None => (unsigned, "0"),
    };
    let exponent: i64 = match exponent.strip_prefix('+').unwrap_or(exponent).parse() {
        Ok(exponent) if (-MAX_EXPONENT..=MAX_EXPONENT).contains(&exponent) => exponent,
        _ => return false,
    };
    let (integer, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let integer = integer.trim_start_matches('0');
    // Leading zeros of the fraction do not count before the point; trailing ones do count after it.
    let before = if integer.is_empty() {
        let significant = fraction.trim_start_matches('0');
        if significant.is_empty() {
            0 // zero
        } else {
            exponent - (fraction.len() - significant.len()) as i64
        }
    } else {
        integer.len() as i64 + exponent
    };
    let after = fraction.len() as i64 - exponent;
    before <= MAX_BEFORE_POINT && after <= MAX_AFTER_POINT
}

fn map_has_nul(map: &Map<String, Value>) -> bool {
    map.iter()
        .any(|(k, v)| k.contains('\0') || value_has_nul(v))
}
