//! Conflict resolution: field-level last-write-wins (product spec §6).
//!
//! # Model
//!
//! A record is an *LWW-map*: a map from field name to the one [`FieldVersion`] that currently wins for
//! that field. A version is a value together with the time it was written (`at`, kept as the client's
//! original string and compared as an instant in microseconds) and the id of the client that wrote it.
//!
//! Versions of one field are ordered by a strict total order, compared key by key:
//!
//! 1. `at_micros`, the instant (so `…05:00Z`, `…05:00.000Z` and `…07:00+02:00` are the same time);
//! 2. whether a client sent the time: at equal instants a time a client sent beats one the server
//!    assigned (SPEC §6; see "Times" below);
//! 3. `client_id`, byte-wise;
//! 4. the canonical JSON text of the value (object keys sorted, numbers exactly as written, because
//!    serde_json's `arbitrary_precision` keeps `1`, `1.0` and `1e0` apart), byte-wise;
//! 5. the original `at` string, byte-wise. The spec only names the instant, the writer and the value;
//!    the last key is needed because two versions can agree on the others and still differ in how the
//!    instant was spelled, and without it the surviving spelling would depend on arrival order.
//!
//! Two versions that agree on all five keys are the same version. The greater version wins.
//!
//! Deletion is not a special state but an ordinary field: a delete is the field `deletedAt` whose value
//! is the deletion time string and whose `at` is that same time (a *tombstone*). A record is deleted iff
//! its winning `deletedAt` value is a non-null string, so a later update that sets `deletedAt` to null
//! un-deletes it, and an edit made before the deletion cannot resurrect it. Other fields keep merging
//! while a record is deleted.
//!
//! # Why it converges
//!
//! Merging two states keeps, per field, the maximum of the two versions under a total order. Per field
//! that is the join of a (totally ordered, hence) join-semilattice; a map of such joins taken pointwise,
//! with an absent field as the bottom element, is again a join-semilattice. A join is commutative,
//! associative and idempotent, so every replica that has seen the same set of changes, in any order and
//! with any repetitions, holds the same state. [`apply`] is exactly `merge(state, versions_of(change))`
//! plus bookkeeping, and [`versions_of`] is a pure function of the change, so the same holds for applying
//! changes one by one. Nothing depends on the order of arrival: every time used for ordering is carried
//! by the change itself (including the server's `received_at` for changes that carry no time at all).
//!
//! # Times
//!
//! A field's `at` is `times[field]` if the client gave one that parses as RFC 3339. Otherwise the field
//! gets the change's *fallback time*: for a delete its `deletedAt`; then the change's own
//! `updatedAt`, then its `createdAt` (this is the rule the web client uses for inserts, which carry no
//! field timestamps); then the time the server received the change, *assigned*: rounded down to the whole
//! second and written as `toISOString()` does (`…T12:36:59.000Z`), and marked as assigned so that a
//! client's time at the same instant beats it. Clients send times truncated to the second
//! (`…T12:36:59Z`): a device that edits a record it has just pulled must not lose that edit to a
//! sub-second time the server invented. For the server's own pushes, folded rows and direct writers alike
//! the receive time is the log row's stamp, so an assigned time can always be derived again from the row
//! (`protocol::time::assigned`). The fallback's string is stored
//! alongside its instant, so a stored `at` string parses to its stored instant — except that an instant
//! later than the change's `latest_at` (its arrival plus the allowed future skew) is ordered at
//! `latest_at` while its string is kept: a clock set to the year 9999 must not pin a field forever.
//! `latest_at` travels with the change like `received_at`, so the order stays a function of the change.

use std::borrow::Cow;
use std::cmp::Ordering;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::protocol::time;

/// The field that holds a record's tombstone.
pub const DELETED_AT: &str = "deletedAt";

/// One field's winning version.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldVersion {
    pub value: Value,
    /// The original timestamp string, returned byte-for-byte.
    pub at: String,
    /// `at` as microseconds since the Unix epoch; what the order compares.
    pub at_micros: i64,
    /// The server assigned `at` (the change carried no time for this field): loses to a client's time at
    /// the same instant.
    pub assigned: bool,
    pub client_id: String,
}

impl FieldVersion {
    /// Whether `self` wins over `other`: the strict total order described in the module docs
    /// (`at_micros`, then a client's time before an assigned one, then `client_id`, then canonical value
    /// text, then the `at` string).
    ///
    /// For any two versions exactly one of `a.beats(b)`, `b.beats(a)`, "identical" holds.
    pub fn beats(&self, other: &FieldVersion) -> bool {
        self.order(other) == Ordering::Greater
    }

    /// The total order behind [`FieldVersion::beats`].
    pub fn order(&self, other: &FieldVersion) -> Ordering {
        self.at_micros
            .cmp(&other.at_micros)
            .then_with(|| other.assigned.cmp(&self.assigned))
            .then_with(|| self.client_id.as_bytes().cmp(other.client_id.as_bytes()))
            .then_with(|| {
                if self.value == other.value {
                    Ordering::Equal
                } else {
                    canonical_text(&self.value)
                        .as_bytes()
                        .cmp(canonical_text(&other.value).as_bytes())
                }
            })
            .then_with(|| self.at.as_bytes().cmp(other.at.as_bytes()))
    }
}

/// The canonical JSON text of a value: compact, object keys sorted byte-wise, scalars as serde_json
/// writes them (with `arbitrary_precision`, numbers exactly as received).
///
/// Identical to `serde_json::to_string` while serde_json's `Map` is the sorted `BTreeMap`, but does not
/// rely on it: should some other crate in the build switch on serde_json's `preserve_order`, the text
/// (and therefore the merge) would otherwise start depending on key insertion order.
pub fn canonical_text(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// A record's fields: name → winning version, sorted by name (byte-wise, as `BTreeMap<String, _>` would).
///
/// A sorted vector rather than a `BTreeMap`: most records have a handful of fields, and a B-tree node has
/// room for eleven (1.3 KB for a one-field record; a push of 165,000 such records held 221 MB of them).
/// Merging two maps is one linear pass, so a record with many fields never costs quadratic time.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FieldMap(Vec<(String, FieldVersion)>);

impl FieldMap {
    /// From pairs in any order; names must be distinct.
    fn from_pairs(mut pairs: Vec<(String, FieldVersion)>) -> FieldMap {
        if !pairs.is_sorted_by(|a, b| a.0 < b.0) {
            pairs.sort_by(|a, b| a.0.cmp(&b.0));
            pairs.dedup_by(|later, earlier| later.0 == earlier.0);
        }
        FieldMap(pairs)
    }

    fn position(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    pub fn get(&self, name: &str) -> Option<&FieldVersion> {
        self.position(name).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut FieldVersion> {
        self.position(name).ok().map(|i| &mut self.0[i].1)
    }

    /// Sets a field, returning the version it replaced. Cheap when `name` sorts after every field held.
    pub fn insert(&mut self, name: String, version: FieldVersion) -> Option<FieldVersion> {
        match self.position(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, version)),
            Err(i) => {
                self.0.insert(i, (name, version));
                None
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &FieldVersion)> {
        self.0.iter().map(|(name, version)| (name, version))
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(name, _)| name)
    }

    pub fn values(&self) -> impl Iterator<Item = &FieldVersion> {
        self.0.iter().map(|(_, version)| version)
    }

    pub fn into_values(self) -> impl Iterator<Item = FieldVersion> {
        self.0.into_iter().map(|(_, version)| version)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::ops::Index<&str> for FieldMap {
    type Output = FieldVersion;

    fn index(&self, name: &str) -> &FieldVersion {
        self.get(name)
            .unwrap_or_else(|| panic!("no field {name:?} in the record"))
    }
}

impl<'a> IntoIterator for &'a FieldMap {
    type Item = (&'a String, &'a FieldVersion);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, FieldVersion)>,
        fn(&'a (String, FieldVersion)) -> (&'a String, &'a FieldVersion),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(name, version)| (name, version))
    }
}

impl IntoIterator for FieldMap {
    type Item = (String, FieldVersion);
    type IntoIter = std::vec::IntoIter<(String, FieldVersion)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// Walks two name-sorted sequences together: each name once, with its entry from either side or both.
fn zip_sorted<A, B>(
    ours: impl IntoIterator<Item = (String, A)>,
    theirs: impl IntoIterator<Item = (String, B)>,
    mut each: impl FnMut(String, Option<A>, Option<B>),
) {
    let mut ours = ours.into_iter().peekable();
    let mut theirs = theirs.into_iter().peekable();
    loop {
        let order = match (ours.peek(), theirs.peek()) {
            (Some((a, _)), Some((b, _))) => a.as_str().cmp(b.as_str()),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => return,
        };
        match order {
            Ordering::Less => {
                let (name, a) = ours.next().expect("peeked");
                each(name, Some(a), None);
            }
            Ordering::Greater => {
                let (name, b) = theirs.next().expect("peeked");
                each(name, None, Some(b));
            }
            Ordering::Equal => {
                let (name, a) = ours.next().expect("peeked");
                let (_, b) = theirs.next().expect("peeked");
                each(name, Some(a), Some(b));
            }
        }
    }
}

/// A record as a map from field name to its winning version.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RecordState {
    pub fields: FieldMap,
}

impl RecordState {
    /// Whether the winning `deletedAt` is a non-null string.
    pub fn is_deleted(&self) -> bool {
        self.deleted_at().is_some()
    }

    /// The winning `deletedAt` value, if it is a string.
    pub fn deleted_at(&self) -> Option<&str> {
        self.fields.get(DELETED_AT)?.value.as_str()
    }

    /// Current values of all fields, including `deletedAt` when present (also when null).
    pub fn data(&self) -> Map<String, Value> {
        self.fields
            .iter()
            .map(|(name, version)| (name.clone(), version.value.clone()))
            .collect()
    }

    /// Field name → the original `at` string of its winning version.
    pub fn field_times(&self) -> Map<String, Value> {
        self.fields
            .iter()
            .map(|(name, version)| (name.clone(), Value::String(version.at.clone())))
            .collect()
    }

    /// Join: per field keep the version that wins. Commutative, associative, idempotent.
    pub fn merge(&mut self, other: &RecordState) {
        let ours = std::mem::take(&mut self.fields.0);
        let mut joined = Vec::with_capacity(ours.len().max(other.fields.len()));
        let theirs = other.fields.0.iter().map(|(name, v)| (name.clone(), v));
        zip_sorted(ours, theirs, |name, ours, theirs| {
            let version = match (ours, theirs) {
                (Some(ours), Some(theirs)) if theirs.beats(&ours) => theirs.clone(),
                (Some(ours), _) => ours,
                (None, Some(theirs)) => theirs.clone(),
                (None, None) => unreachable!("zip_sorted yields a side"),
            };
            joined.push((name, version));
        });
        self.fields.0 = joined;
    }

    /// Storage form: `{"field": {"v": value, "at": "original", "t": micros, "c": "client"}}`, plus
    /// `"a": true` for a time the server assigned (absent otherwise, as in states older versions wrote).
    /// The `Serialize` impl writes the same form without building a tree (a push of many records).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("a record state serialises")
    }

    /// Reads the storage form written by [`RecordState::to_json`]. `None` if it is not an object of
    /// entries that each have `v` (any value, null included), `at` (string), `t` (integer) and `c`
    /// (string), and optionally `a` (boolean). Extra keys in an entry are ignored. `t` is trusted as
    /// stored, not re-derived from `at`.
    pub fn from_json(json: &Value) -> Option<RecordState> {
        let mut fields = Vec::new();
        for (name, entry) in json.as_object()? {
            let entry = entry.as_object()?;
            let version = FieldVersion {
                value: entry.get("v")?.clone(),
                at: entry.get("at")?.as_str()?.to_owned(),
                at_micros: entry.get("t")?.as_i64()?,
                assigned: match entry.get("a") {
                    None => false,
                    Some(flag) => flag.as_bool()?,
                },
                client_id: entry.get("c")?.as_str()?.to_owned(),
            };
            fields.push((name.clone(), version));
        }
        Some(RecordState {
            fields: FieldMap::from_pairs(fields),
        })
    }
}

/// The storage form (see [`RecordState::to_json`]).
impl Serialize for RecordState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.fields.len()))?;
        for (name, version) in &self.fields {
            map.serialize_entry(name, &StoredVersion(version))?;
        }
        map.end()
    }
}

struct StoredVersion<'a>(&'a FieldVersion);

impl Serialize for StoredVersion<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let version = self.0;
        let mut map = serializer.serialize_map(Some(4 + usize::from(version.assigned)))?;
        map.serialize_entry("v", &version.value)?;
        map.serialize_entry("at", &version.at)?;
        map.serialize_entry("t", &version.at_micros)?;
        map.serialize_entry("c", &version.client_id)?;
        if version.assigned {
            map.serialize_entry("a", &true)?;
        }
        map.end()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Insert,
    Update,
    Delete,
}

/// A change as the server received it, already validated: `values` are the field values (for inserts:
/// the whole data object), `times` maps field -> original `at` string where the client gave one,
/// `deleted_at` for deletes.
#[derive(Debug, Clone, Copy)]
pub struct IncomingChange<'a> {
    pub kind: ChangeKind,
    pub values: &'a Map<String, Value>,
    pub times: &'a Map<String, Value>,
    pub deleted_at: Option<&'a str>,
    pub client_id: &'a str,
    /// When the server received the change, in microseconds since the epoch: the stamp of its log row.
    /// Times the server assigns are this, rounded down to the second.
    pub received_at: i64,
    /// The latest instant a time of this change is ordered at (its arrival plus the allowed future skew):
    /// a later `at` keeps its string but is ordered as if it were this, so a field stamped in the year
    /// 9999 can still be changed the next day.
    pub latest_at: i64,
}

/// A string that parses as RFC 3339, with its instant.
fn parsed(value: Option<&Value>) -> Option<(i64, &str)> {
    let text = value?.as_str()?;
    time::parse_rfc3339(text).ok().map(|micros| (micros, text))
}

/// A time as the merge orders it: the instant, its string, and whether the server assigned it.
struct Time<'a> {
    micros: i64,
    text: Cow<'a, str>,
    assigned: bool,
}

/// The time given to fields of `change` that have no parseable `at` of their own: a delete's
/// `deletedAt`, else `values.updatedAt`, else `values.createdAt`, else the time the server assigns
/// (its receipt, rounded down to the second).
fn fallback_time<'a>(change: &IncomingChange<'a>) -> Time<'a> {
    let deleted_at = match change.kind {
        ChangeKind::Delete => change.deleted_at,
        ChangeKind::Insert | ChangeKind::Update => None,
    };
    match time::change_time(deleted_at, change.values) {
        Some((micros, text)) => Time {
            micros,
            text: Cow::Borrowed(text),
            assigned: false,
        },
        None => {
            let (micros, text) = time::assigned(change.received_at);
            Time {
                micros,
                text: Cow::Owned(text),
                assigned: true,
            }
        }
    }
}

/// The change as a (partial) record state.
///
/// Every field in `values` gets a version by `change.client_id`, timed by its parseable `times` entry,
/// else by the change's fallback time (see the module docs; for inserts this is the
/// updatedAt / createdAt / assigned rule, and inserts that do carry `times` have them honoured).
/// A delete additionally becomes the tombstone `deletedAt = deleted_at` at `deleted_at`, replacing any
/// `deletedAt` in `values`; a delete without `deleted_at` uses `values.deletedAt` if it is a string, else
/// its tombstone is the fallback time (assigned, when the change carries no time at all).
pub fn versions_of(change: &IncomingChange) -> RecordState {
    let fallback = fallback_time(change);
    let version = |value: Value, given: Option<(i64, &str)>| match given {
        Some((micros, text)) => FieldVersion {
            value,
            at: text.to_owned(),
            at_micros: micros.min(change.latest_at),
            assigned: false,
            client_id: change.client_id.to_owned(),
        },
        None => FieldVersion {
            value,
            at: fallback.text.clone().into_owned(),
            at_micros: fallback.micros.min(change.latest_at),
            assigned: fallback.assigned,
            client_id: change.client_id.to_owned(),
        },
    };
    let is_delete = change.kind == ChangeKind::Delete;
    let mut fields = Vec::with_capacity(change.values.len() + usize::from(is_delete));
    for (name, value) in change.values {
        // A delete's tombstone replaces any deletedAt among its values.
        if is_delete && name == DELETED_AT {
            continue;
        }
        fields.push((
            name.clone(),
            version(value.clone(), parsed(change.times.get(name))),
        ));
    }
    if is_delete {
        let deleted_at = change
            .deleted_at
            .or_else(|| change.values.get(DELETED_AT).and_then(Value::as_str));
        // The tombstone's time is deletedAt itself when it parses, which is what the fallback starts with.
        let tombstone = match deleted_at {
            Some(text) => version(
                Value::String(text.to_owned()),
                time::parse_rfc3339(text).ok().map(|micros| (micros, text)),
            ),
            None => version(Value::String(fallback.text.clone().into_owned()), None),
        };
        fields.push((DELETED_AT.to_owned(), tombstone));
    }
    RecordState {
        fields: FieldMap::from_pairs(fields),
    }
}

/// A pushed field that lost to the stored version.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldConflict {
    pub field: String,
    pub client_value: Value,
    pub client_at: String,
    pub server_value: Value,
    pub server_at: String,
}

/// Applies a change to the stored state.
///
/// Returns the fields that won (to be written to the log) and the conflicts (fields whose incoming
/// version lost to the stored one), both in field-name order. A field whose incoming version equals the
/// stored one exactly is neither (idempotent replay). A loss is reported whatever decided it: a newer
/// stored `at`, or a tie on the instant broken by client id or value text, and also when the stored
/// winner happens to hold the same value, so that the client always learns the server's `at`.
///
/// The resulting state is exactly `state.merge(&versions_of(change))`.
pub fn apply(
    state: &mut RecordState,
    change: &IncomingChange,
) -> (Vec<String>, Vec<FieldConflict>) {
    let incoming = versions_of(change);
    let mut winners = Vec::new();
    let mut conflicts = Vec::new();
    let ours = std::mem::take(&mut state.fields.0);
    let mut joined = Vec::with_capacity(ours.len().max(incoming.fields.len()));
    zip_sorted(ours, incoming.fields, |name, ours, theirs| {
        let kept = match (ours, theirs) {
            (None, Some(theirs)) => {
                winners.push(name.clone());
                theirs
            }
            (Some(ours), Some(theirs)) => match theirs.order(&ours) {
                Ordering::Greater => {
                    winners.push(name.clone());
                    theirs
                }
                Ordering::Equal => ours,
                Ordering::Less => {
                    conflicts.push(FieldConflict {
                        field: name.clone(),
                        client_value: theirs.value,
                        client_at: theirs.at,
                        server_value: ours.value.clone(),
                        server_at: ours.at.clone(),
                    });
                    ours
                }
            },
            (Some(ours), None) => ours,
            (None, None) => unreachable!("zip_sorted yields a side"),
        };
        joined.push((name, kept));
    });
    state.fields.0 = joined;
    (winners, conflicts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const RECEIVED: &str = "2026-11-21T11:00:00.000Z";
    const UPDATED_AT: &str = "updatedAt";

    fn obj(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            other => panic!("not an object: {other}"),
        }
    }

    fn micros(text: &str) -> i64 {
        time::parse_rfc3339(text).unwrap()
    }

    fn version(value: Value, at: &str, client: &str) -> FieldVersion {
        FieldVersion {
            value,
            at: at.to_owned(),
            at_micros: micros(at),
            assigned: false,
            client_id: client.to_owned(),
        }
    }

    /// An owned change, so tests can build them without juggling borrows.
    #[derive(Debug, Clone)]
    struct Change {
        kind: ChangeKind,
        values: Map<String, Value>,
        times: Map<String, Value>,
        deleted_at: Option<String>,
        client_id: String,
        received_at: i64,
        latest_at: i64,
    }

    impl Change {
        fn new(kind: ChangeKind, client: &str, values: Value, times: Value) -> Change {
            Change {
                kind,
                values: obj(values),
                times: obj(times),
                deleted_at: None,
                client_id: client.to_owned(),
                received_at: micros(RECEIVED),
                latest_at: i64::MAX,
            }
        }

        fn update(client: &str, values: Value, times: Value) -> Change {
            Change::new(ChangeKind::Update, client, values, times)
        }

        fn insert(client: &str, values: Value) -> Change {
            Change::new(ChangeKind::Insert, client, values, json!({}))
        }

        fn delete(client: &str, deleted_at: &str) -> Change {
            let mut change = Change::new(ChangeKind::Delete, client, json!({}), json!({}));
            change.deleted_at = Some(deleted_at.to_owned());
            change
        }

        fn latest(mut self, text: &str) -> Change {
            self.latest_at = micros(text);
            self
        }

        fn received(mut self, text: &str) -> Change {
            self.received_at = micros(text);
            self
        }

        fn view(&self) -> IncomingChange<'_> {
            IncomingChange {
                kind: self.kind,
                values: &self.values,
                times: &self.times,
                deleted_at: self.deleted_at.as_deref(),
                client_id: &self.client_id,
                received_at: self.received_at,
                latest_at: self.latest_at,
            }
        }
    }

    fn apply_change(state: &mut RecordState, change: &Change) -> (Vec<String>, Vec<FieldConflict>) {
        apply(state, &change.view())
    }

    fn state_of(changes: &[Change]) -> RecordState {
        let mut state = RecordState::default();
        for change in changes {
            apply_change(&mut state, change);
        }
        state
    }

    // ----- unit tests, one per rule -----------------------------------------------------------------

    #[test]
    fn later_at_wins_in_either_order() {
        let old = Change::update(
            "b",
            json!({"title": "old"}),
            json!({"title": "2026-11-21T10:05:00Z"}),
        );
        let new = Change::update(
            "a",
            json!({"title": "new"}),
            json!({"title": "2026-11-21T10:05:00.001Z"}),
        );
        for order in [[&old, &new], [&new, &old]] {
            let state = state_of(&[order[0].clone(), order[1].clone()]);
            assert_eq!(state.data()["title"], json!("new"));
            assert_eq!(
                state.field_times()["title"],
                json!("2026-11-21T10:05:00.001Z")
            );
        }
    }

    #[test]
    fn offsets_are_honoured() {
        // 11:00+02:00 is 09:00Z, earlier than 10:00Z although its string sorts later.
        let a = Change::update(
            "z",
            json!({"title": "a"}),
            json!({"title": "2026-11-21T11:00:00+02:00"}),
        );
        let b = Change::update(
            "a",
            json!({"title": "b"}),
            json!({"title": "2026-11-21T10:00:00Z"}),
        );
        assert_eq!(
            state_of(&[a.clone(), b.clone()]).data()["title"],
            json!("b")
        );
        assert_eq!(state_of(&[b, a]).data()["title"], json!("b"));
    }

    #[test]
    fn different_fields_merge() {
        let a = Change::update(
            "a",
            json!({"title": "t"}),
            json!({"title": "2026-11-21T10:00:00Z"}),
        );
        let b = Change::update(
            "b",
            json!({"done": true}),
            json!({"done": "2026-11-21T09:00:00Z"}),
        );
        let state = state_of(&[a, b]);
        assert_eq!(state.data(), obj(json!({"title": "t", "done": true})));
        assert_eq!(
            state.field_times(),
            obj(json!({"title": "2026-11-21T10:00:00Z", "done": "2026-11-21T09:00:00Z"}))
        );
    }

    #[test]
    fn equal_instants_written_differently_are_resolved_by_client_id() {
        let short = version(json!("from b"), "2026-11-21T10:05:00Z", "b");
        let long = version(json!("from a"), "2026-11-21T10:05:00.000Z", "a");
        let offset = version(json!("from c"), "2026-11-21T12:05:00+02:00", "c");
        assert_eq!(short.at_micros, long.at_micros);
        assert_eq!(short.at_micros, offset.at_micros);
        assert!(short.beats(&long) && !long.beats(&short));
        assert!(offset.beats(&short) && !short.beats(&offset));
    }

    #[test]
    fn tie_on_instant_and_client_is_resolved_by_value_text() {
        let a = version(json!("apple"), "2026-11-21T10:05:00Z", "c");
        let b = version(json!("banana"), "2026-11-21T10:05:00.000Z", "c");
        assert!(b.beats(&a) && !a.beats(&b));
        // Canonical text: numbers as written, objects with sorted keys.
        let one = version(json!(1), "2026-11-21T10:05:00Z", "c");
        let one_point_oh: Value = serde_json::from_str("1.0").unwrap();
        let one_point_oh = version(one_point_oh, "2026-11-21T10:05:00Z", "c");
        assert!(one_point_oh.beats(&one)); // "1.0" > "1"
        let obj_ab = version(json!({"b": 1, "a": 2}), "2026-11-21T10:05:00Z", "c");
        assert_eq!(canonical_text(&obj_ab.value), r#"{"a":2,"b":1}"#);
        assert_eq!(canonical_text(&obj_ab.value), obj_ab.value.to_string());
    }

    #[test]
    fn identical_but_for_the_spelling_of_at_is_still_ordered() {
        let short = version(json!("x"), "2026-11-21T10:05:00Z", "c");
        let long = version(json!("x"), "2026-11-21T10:05:00.000Z", "c");
        assert!(short.beats(&long) ^ long.beats(&short));
        assert!(!short.beats(&short.clone()));
        let mut ab = RecordState::default();
        ab.fields.insert("f".into(), short.clone());
        let mut ba = RecordState::default();
        ba.fields.insert("f".into(), long.clone());
        let (a, b) = (ab.clone(), ba.clone());
        ab.merge(&b);
        ba.merge(&a);
        assert_eq!(ab, ba);
    }

    #[test]
    fn a_time_far_in_the_future_is_ordered_at_the_bound_and_keeps_its_string() {
        let mut state = RecordState::default();
        let future = Change::update(
            "a",
            json!({"title": "from 9999"}),
            json!({"title": "9999-12-31T23:59:59.999Z"}),
        )
        .latest("2026-11-22T10:00:00.000Z");
        apply_change(&mut state, &future);
        let stored = &state.fields["title"];
        assert_eq!(stored.at, "9999-12-31T23:59:59.999Z", "the string is kept");
        assert_eq!(stored.at_micros, micros("2026-11-22T10:00:00.000Z"));
        // A day later an edit wins again; without the bound nothing could ever beat the year 9999.
        let later = Change::update(
            "b",
            json!({"title": "edited"}),
            json!({"title": "2026-11-23T10:00:00.000Z"}),
        );
        let (winners, conflicts) = apply_change(&mut state, &later);
        assert_eq!(winners, vec!["title".to_owned()]);
        assert!(conflicts.is_empty());
        // Deletes and fallback times are bounded the same way.
        let mut state = RecordState::default();
        let mut delete = Change::delete("a", "9999-01-01T00:00:00.000Z");
        delete.latest_at = micros("2026-11-22T10:00:00.000Z");
        apply_change(&mut state, &delete);
        assert_eq!(
            state.fields[DELETED_AT].at_micros,
            micros("2026-11-22T10:00:00.000Z")
        );
        let insert = Change::insert(
            "a",
            json!({"x": 1, "updatedAt": "9999-01-01T00:00:00.000Z"}),
        )
        .latest("2026-11-22T10:00:00.000Z");
        let mut state = RecordState::default();
        apply_change(&mut state, &insert);
        assert_eq!(
            state.fields["x"].at_micros,
            micros("2026-11-22T10:00:00.000Z")
        );
    }

    #[test]
    fn insert_time_is_updated_at_then_created_at_then_received_at() {
        let both = Change::insert(
            "c",
            json!({"title": "t", "updatedAt": "2026-11-21T10:02:00.000Z", "createdAt": "2026-11-21T10:01:00Z"}),
        );
        let state = versions_of(&both.view());
        for field in ["title", "updatedAt", "createdAt"] {
            assert_eq!(
                state.fields[field].at, "2026-11-21T10:02:00.000Z",
                "{field}"
            );
            assert_eq!(
                state.fields[field].at_micros,
                micros("2026-11-21T10:02:00Z")
            );
            assert_eq!(state.fields[field].client_id, "c");
        }

        let created = Change::insert(
            "c",
            json!({"title": "t", "createdAt": "2026-11-21T10:01:00Z"}),
        );
        assert_eq!(
            versions_of(&created.view()).fields["title"].at,
            "2026-11-21T10:01:00Z"
        );

        // An unparseable updatedAt is skipped, not used.
        let bad_updated = Change::insert(
            "c",
            json!({"title": "t", "updatedAt": "yesterday", "createdAt": "2026-11-21T10:01:00Z"}),
        );
        assert_eq!(
            versions_of(&bad_updated.view()).fields["title"].at,
            "2026-11-21T10:01:00Z"
        );

        // No time at all: the server assigns its receipt, rounded down to the second.
        let bare = Change::insert("c", json!({"title": "t"})).received("2026-11-21T10:09:00.923Z");
        let state = versions_of(&bare.view());
        assert_eq!(state.fields["title"].at, "2026-11-21T10:09:00.000Z");
        assert_eq!(
            state.fields["title"].at_micros,
            micros("2026-11-21T10:09:00Z")
        );
        assert!(state.fields["title"].assigned);
        assert!(!versions_of(&created.view()).fields["title"].assigned);
        assert!(!state.is_deleted());
    }

    #[test]
    fn insert_loses_field_by_field_to_newer_updates() {
        let update = Change::update(
            "b",
            json!({"title": "edited"}),
            json!({"title": "2026-11-21T10:03:00Z"}),
        );
        let insert = Change::insert(
            "a",
            json!({"title": "first", "done": false, "updatedAt": "2026-11-21T10:02:00Z"}),
        );
        let mut state = state_of(&[update]);
        let (won, conflicts) = apply_change(&mut state, &insert);
        assert_eq!(won, vec!["done".to_owned(), "updatedAt".to_owned()]);
        assert_eq!(conflicts.len(), 1);
        assert_eq!(
            state.data(),
            obj(json!({"title": "edited", "done": false, "updatedAt": "2026-11-21T10:02:00Z"}))
        );
    }

    #[test]
    fn delete_is_a_tombstone_field() {
        let insert = Change::insert(
            "a",
            json!({"title": "t", "updatedAt": "2026-11-21T10:00:00Z"}),
        );
        let delete = Change::delete("b", "2026-11-21T10:05:00.000Z");
        let mut state = state_of(&[insert]);
        assert!(!state.is_deleted());
        let (won, conflicts) = apply_change(&mut state, &delete);
        assert_eq!(won, vec![DELETED_AT.to_owned()]);
        assert!(conflicts.is_empty());
        assert!(state.is_deleted());
        assert_eq!(state.deleted_at(), Some("2026-11-21T10:05:00.000Z"));
        let tombstone = &state.fields[DELETED_AT];
        assert_eq!(tombstone.at, "2026-11-21T10:05:00.000Z");
        assert_eq!(tombstone.value, json!("2026-11-21T10:05:00.000Z"));
        assert_eq!(tombstone.client_id, "b");
        assert_eq!(state.data()["title"], json!("t"));

        // An edit older than the delete does not resurrect the record; a newer edit merges but leaves it deleted.
        let older = Change::update(
            "c",
            json!({"title": "older"}),
            json!({"title": "2026-11-21T10:04:00Z"}),
        );
        let newer = Change::update(
            "c",
            json!({"title": "newer"}),
            json!({"title": "2026-11-21T10:06:00Z"}),
        );
        apply_change(&mut state, &older);
        apply_change(&mut state, &newer);
        assert!(state.is_deleted());
        assert_eq!(state.data()["title"], json!("newer"));

        // A delete's other fields take deletedAt as their time.
        let mut with_fields = Change::delete("b", "2026-11-21T10:07:00Z");
        with_fields.values = obj(json!({"title": "gone"}));
        let versions = versions_of(&with_fields.view());
        assert_eq!(versions.fields["title"].at, "2026-11-21T10:07:00Z");
    }

    #[test]
    fn later_null_deleted_at_undeletes_and_earlier_does_not() {
        let delete = Change::delete("a", "2026-11-21T10:05:00Z");
        let undelete_later = Change::update(
            "b",
            json!({"deletedAt": null}),
            json!({"deletedAt": "2026-11-21T10:06:00Z"}),
        );
        let undelete_earlier = Change::update(
            "b",
            json!({"deletedAt": null}),
            json!({"deletedAt": "2026-11-21T10:04:00Z"}),
        );

        let state = state_of(&[delete.clone(), undelete_later.clone()]);
        assert!(!state.is_deleted());
        assert_eq!(state.deleted_at(), None);
        assert_eq!(state.data()[DELETED_AT], Value::Null);
        assert_eq!(state_of(&[undelete_later, delete.clone()]), state);

        let state = state_of(&[delete.clone(), undelete_earlier.clone()]);
        assert!(state.is_deleted());
        assert_eq!(state_of(&[undelete_earlier, delete]), state);
    }

    #[test]
    fn unparseable_at_falls_back_to_the_change_time() {
        let garbage = Change::update(
            "a",
            json!({"title": "t", "done": true, "rank": 3, "updatedAt": "2026-11-21T10:02:00Z"}),
            json!({"title": "not a time", "done": 12, "updatedAt": "2026-11-21T10:03:00Z"}),
        );
        let state = versions_of(&garbage.view());
        // title: bad string, done: not a string, rank: missing — all take values.updatedAt.
        for field in ["title", "done", "rank"] {
            assert_eq!(state.fields[field].at, "2026-11-21T10:02:00Z", "{field}");
        }
        assert_eq!(state.fields["updatedAt"].at, "2026-11-21T10:03:00Z");

        let bare = Change::update("a", json!({"title": "t"}), json!({"title": "soon"}))
            .received("2026-11-21T10:09:00.5Z");
        let state = versions_of(&bare.view());
        assert_eq!(state.fields["title"].at, "2026-11-21T10:09:00.000Z");
        assert_eq!(
            state.fields["title"].at_micros,
            micros("2026-11-21T10:09:00Z")
        );

        // An unparseable deletedAt still deletes; it is timed by the fallback.
        let delete = Change::delete("a", "at some point").received("2026-11-21T10:09:00Z");
        let state = versions_of(&delete.view());
        assert_eq!(state.deleted_at(), Some("at some point"));
        assert_eq!(state.fields[DELETED_AT].at, "2026-11-21T10:09:00.000Z");
        assert!(state.fields[DELETED_AT].assigned);

        // A delete without deletedAt at all is stamped with the receipt time.
        let mut unstamped = Change::delete("a", "x").received("2026-11-21T10:09:00.999Z");
        unstamped.deleted_at = None;
        let state = versions_of(&unstamped.view());
        assert_eq!(state.deleted_at(), Some("2026-11-21T10:09:00.000Z"));
        assert!(state.fields[DELETED_AT].assigned);
    }

    #[test]
    fn a_client_time_beats_an_assigned_time_at_the_same_instant() {
        // Device A inserts without a time; the server assigns 12:36:59 (received at .870). Device B pulls
        // it and edits within the same second; its clock gives whole seconds.
        let insert = Change::insert("zz-device-a", json!({"title": "E2E Test Task"}))
            .received("2026-11-29T12:36:59.870Z");
        let edit = Change::update(
            "aa-device-b",
            json!({"title": "Updated by Client B"}),
            json!({"title": "2026-11-29T12:36:59Z"}),
        );
        for order in [[&insert, &edit], [&edit, &insert]] {
            let state = state_of(&[order[0].clone(), order[1].clone()]);
            assert_eq!(state.data()["title"], json!("Updated by Client B"));
            assert_eq!(state.fields["title"].at, "2026-11-29T12:36:59Z");
        }
        // An edit a second earlier still loses: the assigned time is a real time, not a wildcard.
        let earlier = Change::update(
            "aa-device-b",
            json!({"title": "earlier"}),
            json!({"title": "2026-11-29T12:36:58.999Z"}),
        );
        assert_eq!(
            state_of(&[insert.clone(), earlier]).data()["title"],
            json!("E2E Test Task")
        );
        // Two assigned times in one second: the ordinary tie-break (client id) decides, in any order.
        let other = Change::insert("mm-device-c", json!({"title": "other"}))
            .received("2026-11-29T12:36:59.010Z");
        let ab = state_of(&[insert.clone(), other.clone()]);
        assert_eq!(ab, state_of(&[other, insert]));
        assert_eq!(ab.data()["title"], json!("E2E Test Task"));
    }

    #[test]
    fn conflicts_report_original_strings() {
        let server = Change::update(
            "s",
            json!({"title": "server", "done": true}),
            json!({"title": "2026-11-21T12:05:00+02:00", "done": "2026-11-21T10:00:00Z"}),
        );
        let client = Change::update(
            "c",
            json!({"title": "client", "done": false}),
            json!({"title": "2026-11-21T10:04:59.999000Z", "done": "2026-11-21T10:00:00.001Z"}),
        );
        let mut state = state_of(&[server]);
        let (won, conflicts) = apply_change(&mut state, &client);
        assert_eq!(won, vec!["done".to_owned()]);
        assert_eq!(
            conflicts,
            vec![FieldConflict {
                field: "title".into(),
                client_value: json!("client"),
                client_at: "2026-11-21T10:04:59.999000Z".into(),
                server_value: json!("server"),
                server_at: "2026-11-21T12:05:00+02:00".into(),
            }]
        );
        assert_eq!(
            state.field_times()["title"],
            json!("2026-11-21T12:05:00+02:00")
        );

        // A loss on a tie (same instant, smaller client id) is a conflict too.
        let tie = Change::update(
            "a",
            json!({"title": "tie"}),
            json!({"title": "2026-11-21T10:05:00Z"}),
        );
        let (won, conflicts) = apply_change(&mut state, &tie);
        assert!(won.is_empty());
        assert_eq!(conflicts[0].client_at, "2026-11-21T10:05:00Z");
        assert_eq!(conflicts[0].server_at, "2026-11-21T12:05:00+02:00");
    }

    #[test]
    fn idempotent_replay_reports_nothing() {
        let changes = [
            Change::insert(
                "a",
                json!({"title": "t", "createdAt": "2026-11-21T10:00:00Z"}),
            ),
            Change::update(
                "b",
                json!({"title": "u"}),
                json!({"title": "2026-11-21T10:01:00Z"}),
            ),
            Change::delete("c", "2026-11-21T10:02:00Z"),
        ];
        let mut state = state_of(&changes);
        let before = state.clone();
        // The insert's title lost to the update, so replaying the insert would (rightly) report that
        // conflict again; the other two changes won everywhere and must replay silently.
        for change in &changes[1..] {
            let (won, conflicts) = apply_change(&mut state, change);
            assert!(won.is_empty() && conflicts.is_empty(), "{change:?}");
        }
        assert_eq!(state, before);
    }

    #[test]
    fn storage_form() {
        let state = state_of(&[Change::update(
            "c",
            serde_json::from_str(
                r#"{"n": 1.50, "big": 123456789012345678901234567890, "x": null}"#,
            )
            .unwrap(),
            json!({"n": "2026-11-21T10:00:00.000Z"}),
        )]);
        let stored = state.to_json();
        assert_eq!(
            stored["n"],
            json!({"v": serde_json::from_str::<Value>("1.50").unwrap(), "at": "2026-11-21T10:00:00.000Z", "t": micros("2026-11-21T10:00:00Z"), "c": "c"})
        );
        let text = stored.to_string();
        assert!(text.contains("123456789012345678901234567890"));
        let back = RecordState::from_json(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(back, state);

        // An assigned time is marked; states written before the mark existed read as client times.
        let assigned = state_of(&[Change::insert("c", json!({"x": 1}))]);
        assert_eq!(assigned.to_json()["x"]["a"], json!(true));
        let mut unmarked = assigned.to_json();
        unmarked["x"].as_object_mut().unwrap().remove("a");
        assert!(!RecordState::from_json(&unmarked).unwrap().fields["x"].assigned);
        assert_eq!(RecordState::from_json(&assigned.to_json()), Some(assigned));

        assert_eq!(
            RecordState::from_json(&json!({})),
            Some(RecordState::default())
        );
        for bad in [
            json!([]),
            json!({"f": 1}),
            json!({"f": {"at": "2026-11-21T10:00:00Z", "t": 0, "c": "c"}}),
            json!({"f": {"v": 1, "at": 5, "t": 0, "c": "c"}}),
            json!({"f": {"v": 1, "at": "x", "t": "0", "c": "c"}}),
            json!({"f": {"v": 1, "at": "x", "t": 0.5, "c": "c"}}),
            json!({"f": {"v": 1, "at": "x", "t": 0}}),
            json!({"f": {"v": 1, "at": "x", "t": 0, "c": "c", "a": "yes"}}),
        ] {
            assert_eq!(RecordState::from_json(&bad), None, "{bad}");
        }
    }

    // ----- property tests -----------------------------------------------------------------------------

    /// Deterministic xorshift64 generator, so failures reproduce without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len())]
        }

        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }

        fn shuffle<T>(&mut self, items: &mut [T]) {
            for i in (1..items.len()).rev() {
                items.swap(i, self.below(i + 1));
            }
        }
    }

    const RECORDS: usize = 3;
    const FIELDS: [&str; 4] = ["title", "done", "updatedAt", "deletedAt"];
    const CLIENTS: [&str; 3] = ["alice", "bob", "carol"];
    /// Few instants, several spellings of each, and strings that do not parse, to force ties.
    const TIMES: [&str; 9] = [
        "2026-11-21T10:05:00Z",
        "2026-11-21T10:05:00.000Z",
        "2026-11-21T12:05:00+02:00",
        "2026-11-21T10:05:00.001Z",
        "2026-11-21T10:04:59.999Z",
        "2026-11-21T09:04:59.999-01:00",
        "2026-11-21T10:06:00Z",
        "not a time",
        "2026-11-21T10:05",
    ];
    /// Receipts whose assigned second equals client times above, to force client-against-assigned ties.
    const RECEIVED_TIMES: [&str; 4] = [
        "2026-11-21T10:05:00.000Z",
        "2026-11-21T10:05:00.731Z",
        "2026-11-21T10:06:00.999Z",
        "2026-11-21T10:07:00.000Z",
    ];

    fn random_value(rng: &mut Rng, field: &str) -> Value {
        if field == DELETED_AT || field == UPDATED_AT {
            return match rng.below(3) {
                0 => Value::Null,
                _ => json!(rng.pick(&TIMES)),
            };
        }
        let texts = [
            "null",
            "true",
            "false",
            "1",
            "1.0",
            "1e0",
            "\"x\"",
            "\"y\"",
            r#"{"a":1,"b":[2]}"#,
            r#"{"b":[2],"a":1}"#,
            "[]",
        ];
        serde_json::from_str(rng.pick(&texts)).unwrap()
    }

    fn random_change(rng: &mut Rng) -> (usize, Change) {
        let record = rng.below(RECORDS);
        let kind = rng.pick(&[
            ChangeKind::Insert,
            ChangeKind::Update,
            ChangeKind::Update,
            ChangeKind::Delete,
        ]);
        let mut values = Map::new();
        let mut times = Map::new();
        for field in FIELDS {
            let wanted = match kind {
                ChangeKind::Insert => rng.chance(70),
                ChangeKind::Update => rng.chance(40),
                ChangeKind::Delete => rng.chance(15),
            };
            if wanted {
                values.insert(field.to_owned(), random_value(rng, field));
                if kind != ChangeKind::Insert && rng.chance(80) {
                    times.insert(field.to_owned(), json!(rng.pick(&TIMES)));
                }
            }
        }
        let received = rng.pick(&RECEIVED_TIMES);
        let mut change = Change::new(
            kind,
            rng.pick(&CLIENTS),
            Value::Object(values),
            Value::Object(times),
        )
        .received(received);
        if kind == ChangeKind::Delete && rng.chance(90) {
            change.deleted_at = Some(rng.pick(&TIMES).to_string());
        }
        (record, change)
    }

    fn random_changes(rng: &mut Rng, max: usize) -> Vec<(usize, Change)> {
        let count = rng.below(max + 1);
        (0..count).map(|_| random_change(rng)).collect()
    }

    fn apply_all(changes: &[(usize, Change)]) -> Vec<RecordState> {
        let mut states = vec![RecordState::default(); RECORDS];
        for (record, change) in changes {
            apply_change(&mut states[*record], change);
        }
        states
    }

    fn random_state(rng: &mut Rng) -> RecordState {
        let mut state = RecordState::default();
        for _ in 0..rng.below(5) {
            state.merge(&versions_of(&random_change(rng).1.view()));
        }
        state
    }

    fn merged(a: &RecordState, b: &RecordState) -> RecordState {
        let mut out = a.clone();
        out.merge(b);
        out
    }

    const PERMUTATION_CASES: usize = 500;
    const PERMUTATIONS_PER_CASE: usize = 20;
    const MERGE_CASES: usize = 5_000;

    #[test]
    fn property_every_order_of_the_same_changes_converges() {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        for case in 0..PERMUTATION_CASES {
            let mut changes = random_changes(&mut rng, 12);
            let expected = apply_all(&changes);
            for _ in 0..PERMUTATIONS_PER_CASE {
                rng.shuffle(&mut changes);
                // Replays are harmless too: repeat a random prefix at the end.
                let mut replayed = changes.clone();
                let repeat = rng.below(changes.len() + 1);
                replayed.extend_from_slice(&changes[..repeat]);
                assert_eq!(apply_all(&replayed), expected, "case {case}: {changes:#?}");
            }
        }
    }

    #[test]
    fn property_merge_is_a_join() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for case in 0..MERGE_CASES {
            let (a, b, c) = (
                random_state(&mut rng),
                random_state(&mut rng),
                random_state(&mut rng),
            );
            assert_eq!(merged(&a, &b), merged(&b, &a), "commutative, case {case}");
            assert_eq!(
                merged(&merged(&a, &b), &c),
                merged(&a, &merged(&b, &c)),
                "associative, case {case}"
            );
            assert_eq!(merged(&a, &a), a, "idempotent, case {case}");
            // The join is an upper bound that contains nothing new.
            let ab = merged(&a, &b);
            assert_eq!(merged(&ab, &a), ab);
            for (name, version) in &ab.fields {
                assert!(a.fields.get(name) == Some(version) || b.fields.get(name) == Some(version));
            }
        }
    }

    #[test]
    fn property_beats_is_a_strict_total_order() {
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        let mut pool: Vec<FieldVersion> = Vec::new();
        while pool.len() < 60 {
            pool.extend(
                versions_of(&random_change(&mut rng).1.view())
                    .fields
                    .into_values(),
            );
        }
        for a in &pool {
            assert!(!a.beats(a));
            for b in &pool {
                let identical = a == b;
                assert_eq!(
                    u8::from(a.beats(b)) + u8::from(b.beats(a)) + u8::from(identical),
                    1,
                    "{a:?} {b:?}"
                );
                for c in &pool {
                    if a.beats(b) && b.beats(c) {
                        assert!(a.beats(c), "transitive");
                    }
                }
            }
        }
    }

    #[test]
    fn property_apply_equals_merging_versions_and_reports_consistently() {
        let mut rng = Rng(0xBF58_476D_1CE4_E5B9);
        for case in 0..MERGE_CASES {
            let changes = random_changes(&mut rng, 8);
            let mut applied = RecordState::default();
            let mut joined = RecordState::default();
            for (_, change) in &changes {
                let before = applied.clone();
                let incoming = versions_of(&change.view());
                let (won, conflicts) = apply_change(&mut applied, change);
                joined.merge(&incoming);
                assert_eq!(applied, joined, "case {case}");

                for (name, theirs) in &incoming.fields {
                    let is_winner = won.contains(name);
                    let conflict = conflicts.iter().find(|c| &c.field == name);
                    match before.fields.get(name) {
                        None => assert!(is_winner),
                        Some(ours) if theirs.beats(ours) => assert!(is_winner),
                        Some(ours) if ours == theirs => assert!(!is_winner && conflict.is_none()),
                        Some(ours) => {
                            assert!(!is_winner);
                            let conflict = conflict.expect("a loss is a conflict");
                            assert_eq!(
                                conflict,
                                &FieldConflict {
                                    field: name.clone(),
                                    client_value: theirs.value.clone(),
                                    client_at: theirs.at.clone(),
                                    server_value: ours.value.clone(),
                                    server_at: ours.at.clone(),
                                }
                            );
                        }
                    }
                    assert_eq!(
                        applied.fields.get(name).is_some_and(|v| v == theirs),
                        is_winner || before.fields.get(name) == Some(theirs)
                    );
                }
                assert!(won.len() + conflicts.len() <= incoming.fields.len());

                // Replaying the same change at once changes nothing and wins nothing; what lost still loses.
                let after = applied.clone();
                let again = apply_change(&mut applied, change);
                assert_eq!(again, (vec![], conflicts), "case {case}");
                assert_eq!(applied, after);
            }
        }
    }

    #[test]
    fn property_field_map_merges_like_a_b_tree() {
        use std::collections::BTreeMap;
        let mut rng = Rng(0x5851_F42D_4C95_7F2D);
        for case in 0..MERGE_CASES {
            let (a, b) = (random_state(&mut rng), random_state(&mut rng));
            let mut reference: BTreeMap<String, FieldVersion> = a
                .fields
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect();
            for (name, theirs) in &b.fields {
                let entry = reference
                    .entry(name.clone())
                    .or_insert_with(|| theirs.clone());
                if theirs.beats(entry) {
                    *entry = theirs.clone();
                }
            }
            let joined = merged(&a, &b);
            assert!(joined.fields.keys().is_sorted(), "case {case}");
            let as_tree: BTreeMap<String, FieldVersion> = joined.fields.into_iter().collect();
            assert_eq!(as_tree, reference, "case {case}");
        }
    }

    #[test]
    fn records_with_many_fields_merge_in_one_pass() {
        // Interleaved names: a per-field insert into a sorted vector would be quadratic here.
        let many = |parity: usize, client: &str| {
            let values: Map<String, Value> = (0..100_000)
                .filter(|i| i % 2 == parity)
                .map(|i| (format!("f{i:06}"), json!(i)))
                .collect();
            Change::new(ChangeKind::Update, client, Value::Object(values), json!({}))
        };
        let mut state = state_of(&[many(0, "a")]);
        let (won, conflicts) = apply_change(&mut state, &many(1, "b"));
        assert_eq!((won.len(), conflicts.len()), (50_000, 0));
        assert_eq!(state.fields.len(), 100_000);
        assert!(state.fields.keys().is_sorted());
        let mut joined = state_of(&[many(1, "c")]);
        joined.merge(&state);
        assert_eq!(joined.fields.len(), 100_000);
    }

    #[test]
    fn property_storage_round_trip() {
        let mut rng = Rng(0x94D0_49BB_1331_11EB);
        for case in 0..MERGE_CASES {
            let state = random_state(&mut rng);
            let stored = state.to_json();
            assert_eq!(
                RecordState::from_json(&stored).as_ref(),
                Some(&state),
                "case {case}"
            );
            let text = serde_json::to_string(&stored).unwrap();
            let reread: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(RecordState::from_json(&reread), Some(state), "case {case}");
        }
    }

    #[test]
    fn property_stored_at_always_parses_to_stored_instant_when_valid() {
        let mut rng = Rng(0x1234_5678_9ABC_DEF1);
        for _ in 0..MERGE_CASES {
            for version in random_state(&mut rng).fields.values() {
                // Every `at` is either a client time that parsed or a fallback time that did.
                assert_eq!(
                    time::parse_rfc3339(&version.at),
                    Ok(version.at_micros),
                    "{version:?}"
                );
            }
        }
    }
}
