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
pub(crate) const DELETED_AT: &str = "deletedAt";

/// One field's winning version.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FieldVersion {
    pub(crate) value: Value,
    /// The original timestamp string, returned byte-for-byte.
    pub(crate) at: String,
    /// `at` as microseconds since the Unix epoch; what the order compares.
    pub(crate) at_micros: i64,
    /// The server assigned `at` (the change carried no time for this field): loses to a client's time at
    /// the same instant.
    pub(crate) assigned: bool,
    pub(crate) client_id: String,
}

impl FieldVersion {
    /// Whether `self` wins over `other`: the strict total order described in the module docs
    /// (`at_micros`, then a client's time before an assigned one, then `client_id`, then canonical value
    /// text, then the `at` string).
    ///
    /// For any two versions exactly one of `a.beats(b)`, `b.beats(a)`, "identical" holds.
    #[cfg(test)]
    pub(crate) fn beats(&self, other: &FieldVersion) -> bool {
        self.order(other) == Ordering::Greater
    }

    /// The total order behind `FieldVersion::beats`.
    pub(crate) fn order(&self, other: &FieldVersion) -> Ordering {
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
pub(crate) fn canonical_text(value: &Value) -> String {
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
pub(crate) struct FieldMap(Vec<(String, FieldVersion)>);

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

    pub(crate) fn get(&self, name: &str) -> Option<&FieldVersion> {
        self.position(name).ok().map(|i| &self.0[i].1)
    }

    /// Sets a field, returning the version it replaced. Cheap when `name` sorts after every field held.
    #[cfg(test)]
    pub(crate) fn insert(&mut self, name: String, version: FieldVersion) -> Option<FieldVersion> {
        match self.position(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, version)),
            Err(i) => {
                self.0.insert(i, (name, version));
                None
            }
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&String, &FieldVersion)> {
        self.0.iter().map(|(name, version)| (name, version))
    }

    #[cfg(test)]
    pub(crate) fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(name, _)| name)
    }

    #[cfg(test)]
    pub(crate) fn values(&self) -> impl Iterator<Item = &FieldVersion> {
        self.0.iter().map(|(_, version)| version)
    }

    #[cfg(test)]
    pub(crate) fn into_values(self) -> impl Iterator<Item = FieldVersion> {
        self.0.into_iter().map(|(_, version)| version)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
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
pub(crate) struct RecordState {
    pub(crate) fields: FieldMap,
}

impl RecordState {
    /// Whether the winning `deletedAt` is a non-null string.
    pub(crate) fn is_deleted(&self) -> bool {
        self.deleted_at().is_some()
    }

    /// The winning `deletedAt` value, if it is a string.
    pub(crate) fn deleted_at(&self) -> Option<&str> {
        self.fields.get(DELETED_AT)?.value.as_str()
    }

    /// Current values of all fields, including `deletedAt` when present (also when null).
    pub(crate) fn data(&self) -> Map<String, Value> {
        self.fields
            .iter()
            .map(|(name, version)| (name.clone(), version.value.clone()))
            .collect()
    }

    /// Field name → the original `at` string of its winning version.
    #[cfg(test)]
    pub(crate) fn field_times(&self) -> Map<String, Value> {
        self.fields
            .iter()
            .map(|(name, version)| (name.clone(), Value::String(version.at.clone())))
            .collect()
    }

    /// Join: per field keep the version that wins. Commutative, associative, idempotent.
    #[cfg(test)]
    pub(crate) fn merge(&mut self, other: &RecordState) {
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
    pub(crate) fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("a record state serialises")
    }

    /// Reads the storage form written by [`RecordState::to_json`]. `None` if it is not an object of
    /// entries that each have `v` (any value, null included), `at` (string), `t` (integer) and `c`
    /// (string), and optionally `a` (boolean). Extra keys in an entry are ignored. `t` is trusted as
    /// stored, not re-derived from `at`.
    pub(crate) fn from_json(json: &Value) -> Option<RecordState> {
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
pub(crate) enum ChangeKind {
    Insert,
    Update,
    Delete,
}

/// A change as the server received it, already validated: `values` are the field values (for inserts:
/// the whole data object), `times` maps field -> original `at` string where the client gave one,
/// `deleted_at` for deletes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct IncomingChange<'a> {
    pub(crate) kind: ChangeKind,
    pub(crate) values: &'a Map<String, Value>,
    pub(crate) times: &'a Map<String, Value>,
    pub(crate) deleted_at: Option<&'a str>,
    pub(crate) client_id: &'a str,
    /// When the server received the change, in microseconds since the epoch: the stamp of its log row.
    /// Times the server assigns are this, rounded down to the second.
    pub(crate) received_at: i64,
    /// The latest instant a time of this change is ordered at (its arrival plus the allowed future skew):
    /// a later `at` keeps its string but is ordered as if it were this, so a field stamped in the year
    /// 9999 can still be changed the next day.
    pub(crate) latest_at: i64,
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
pub(crate) fn versions_of(change: &IncomingChange) -> RecordState {
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
pub(crate) struct FieldConflict {
    pub(crate) field: String,
    pub(crate) client_value: Value,
    pub(crate) client_at: String,
    pub(crate) server_value: Value,
    pub(crate) server_at: String,
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
pub(crate) fn apply(
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
mod tests;
