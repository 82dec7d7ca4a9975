//! Data-driven checks of the push body and pull query parsers.

use serde_json::{json, Value};

use super::*;

const NOW: time::Micros = 1_795_255_500_000_000;

fn parse(body: Value) -> Result<Changeset, ProtocolError> {
    parse_changeset(bytes::Bytes::from(body.to_string()))
}

/// Asserts that `body` is rejected with `code` and a message containing `needle`.
fn check_rejected(body: Value, code: &str, needle: &str) {
    let error = parse(body.clone()).expect_err(&body.to_string());
    assert_eq!(error.code, code, "{body} -> {error}");
    assert!(
        error.message.contains(needle),
        "{body} -> {error:?} should mention {needle:?}"
    );
}

#[test]
fn accepts_every_op_and_keeps_what_clients_send() {
    let changeset = parse(json!({
        "clientId": "dev-1", "since": "2026-11-21T10:05:00.000Z", "appId": "todo", "schemaVersion": 1,
        "changes": [
            {"table": "tasks", "id": "a", "op": "insert", "data": {"title": "x", "spaceId": "s1"},
             "actor": {"kind": "user", "n": [1, 2.5]}, "origin": "user"},
            {"table": "tasks", "id": "a", "op": "update",
             "fields": {"title": {"value": "y", "at": "2026-11-21T10:06:00.000Z"}, "gone": {"at": "2026-11-21T10:06:00Z"}},
             "spaceId": "s2"},
            {"table": "tasks", "id": "a", "op": "update", "fields": {"title": {"value": 1, "updatedAt": "2026-11-21T10:07:00.000Z"}}},
            {"table": "tasks", "id": "a", "op": "delete", "deletedAt": "2026-11-21T10:08:00.000Z",
             "fields": {"spaceId": {"value": "s3", "at": "2026-11-21T10:08:00.000Z"}}},
            {"table": "tasks", "id": "b", "op": "delete"}
        ]
    }))
    .unwrap();
    assert_eq!(changeset.client_id.as_deref(), Some("dev-1"));
    assert_eq!(changeset.since, NOW);
    let changes = changeset.changes.slice(0..5).unwrap();
    let [insert, update, legacy, delete, bare_delete] = changes.as_ref() else {
        panic!()
    };

    assert_eq!(insert.op, Op::Insert);
    assert_eq!(
        Value::Object(insert.data.clone()),
        json!({"title": "x", "spaceId": "s1"})
    );
    assert_eq!(insert.space_id.as_deref(), Some("s1"));
    assert_eq!(insert.actor, Some(json!({"kind": "user", "n": [1, 2.5]})));
    assert_eq!(insert.origin.as_deref(), Some("user"));
    assert_eq!(insert.schema_version, 1);

    assert_eq!(
        Value::Object(update.data.clone()),
        json!({"title": "y", "gone": null})
    );
    assert_eq!(
        Value::Object(update.field_meta.clone()),
        json!({"title": "2026-11-21T10:06:00.000Z", "gone": "2026-11-21T10:06:00Z"})
    );
    assert_eq!(
        update.space_id.as_deref(),
        Some("s2"),
        "top-level spaceId wins"
    );
    assert_eq!(
        Value::Object(legacy.field_meta.clone()),
        json!({"title": "2026-11-21T10:07:00.000Z"})
    );

    assert_eq!(
        delete.space_id.as_deref(),
        Some("s3"),
        "spaceId from fields"
    );
    assert_eq!(
        delete.data.get("deletedAt"),
        Some(&json!("2026-11-21T10:08:00.000Z"))
    );
    assert_eq!(
        bare_delete.data.get("deletedAt"),
        None,
        "no time of its own: the server assigns one when it stores the delete"
    );
}

#[test]
fn missing_since_is_the_epoch_and_missing_changes_is_empty() {
    let changeset = parse(json!({})).unwrap();
    assert_eq!(changeset.since, time::EPOCH);
    assert!(changeset.changes.is_empty());
    assert_eq!(
        parse(json!({"since": null, "changes": null}))
            .unwrap()
            .since,
        time::EPOCH
    );
}

/// Bad changes (each sent as change 2 of three) and a part of the `invalid_change` message each gets.
fn bad_changes() -> Vec<(Value, &'static str)> {
    vec![
        (
            json!({"table": "t", "id": "1", "op": "upsert"}),
            "change 2: op \"upsert\"",
        ),
        (
            json!({"id": "1", "op": "insert", "data": {}}),
            "change 2: table is missing",
        ),
        (
            json!({"table": "t", "op": "insert", "data": {}}),
            "id is missing",
        ),
        (
            json!({"table": "t", "id": "", "op": "insert", "data": {}}),
            "id must not be empty",
        ),
        (
            json!({"table": "t", "id": 5, "op": "insert", "data": {}}),
            "id must be a string",
        ),
        (
            json!({"table": "t;drop", "id": "1", "op": "insert", "data": {}}),
            "table must be",
        ),
        (
            json!({"table": "t", "id": "1", "op": "insert"}),
            "insert needs data",
        ),
        (
            json!({"table": "t", "id": "1", "op": "update"}),
            "update needs fields",
        ),
        (
            json!({"table": "t", "id": "1", "op": "update", "fields": {"a": null}}),
            "fields.a must be an object",
        ),
        (
            json!({"table": "t", "id": "1", "op": "update", "fields": {"a": {"value": 1, "at": "yesterday"}}}),
            "fields.a.at",
        ),
        (
            json!({"table": "t", "id": "1", "op": "update", "fields": {"a": {"value": 1, "at": 5}}}),
            "fields.a.at",
        ),
        (
            json!({"table": "t", "id": "1", "op": "delete", "deletedAt": "soon"}),
            "deletedAt",
        ),
        (
            json!({"table": "t", "id": "1", "op": "insert", "data": []}),
            "data must be an object",
        ),
        (
            json!({"table": "t", "id": "1", "op": "insert", "data": {"a": "x\u{0}y"}}),
            "U+0000",
        ),
        (json!("nope"), "change 2: must be a JSON object"),
    ]
}

/// Bad bodies, the error code and a part of the message each gets.
fn bad_bodies() -> Vec<(Value, &'static str, &'static str)> {
    vec![
        (
            json!({"schemaVersion": 2}),
            "unsupported_schema_version",
            "schemaVersion 2",
        ),
        (
            json!({"schemaVersion": "1"}),
            "invalid_body",
            "schemaVersion must be an integer",
        ),
        (
            json!({"since": "last tuesday"}),
            "invalid_since",
            "last tuesday",
        ),
        (
            json!({"changes": {}}),
            "invalid_body",
            "changes must be an array",
        ),
        (json!([1]), "invalid_body", "JSON object"),
    ]
}

#[test]
fn rejects_bad_input_with_the_index_and_the_field() {
    let ok = json!({"table": "t", "id": "1", "op": "insert", "data": {}});
    let with = |bad: Value| json!({"changes": [ok.clone(), ok.clone(), bad]});
    for (bad, needle) in bad_changes() {
        check_rejected(with(bad), "invalid_change", needle);
    }
    check_rejected(
        with(json!({"table": "t", "id": "1", "op": "insert", "data": {}, "schemaVersion": 7})),
        "unsupported_schema_version",
        "7 is newer than this server supports (1)",
    );
    for (body, code, needle) in bad_bodies() {
        check_rejected(body, code, needle);
    }
    let error = parse_changeset(bytes::Bytes::from_static(b"{\"changes\": [")).unwrap_err();
    assert_eq!(error.code, "invalid_json");
    let deep = "[".repeat(10_000);
    assert_eq!(
        parse_changeset(bytes::Bytes::from(deep)).unwrap_err().code,
        "invalid_json"
    );
    assert_eq!(
        parse_changeset(bytes::Bytes::from_static(b"\xff\xfe"))
            .unwrap_err()
            .code,
        "invalid_json"
    );
}

#[test]
fn identifiers() {
    for ok in ["a", "todo", "A-Z_0.9", &"x".repeat(64)] {
        assert!(is_identifier(ok), "{ok}");
    }
    for bad in [
        "",
        "a b",
        "ä",
        "a/b",
        "a%20",
        &"x".repeat(65),
        "a\0",
        ".",
        "..",
        "...",
    ] {
        assert!(!is_identifier(bad), "{bad:?}");
    }
}

#[test]
fn pull_query() {
    let q = |s: &str| parse_pull_query(Some(s), 1000, 5000);
    assert_eq!(
        q("collection=tasks&since=2026-11-21T10%3A05%3A00.000Z").unwrap(),
        PullQuery {
            collection: "tasks".into(),
            since: NOW,
            limit: 1000
        }
    );
    assert_eq!(
        q("collection=tasks&since=2026-11-21T12:05:00.000+02:00&limit=10")
            .unwrap()
            .since,
        NOW
    );
    assert_eq!(
        q("collection=tasks&since=2026-11-21T12:05:00.000%2B02:00")
            .unwrap()
            .since,
        NOW
    );
    assert_eq!(
        q("collection=t&since=1970-01-01T00:00:00.000Z&limit=99999")
            .unwrap()
            .limit,
        5000
    );
    for (query, code) in [
        ("since=1970-01-01T00:00:00Z", "missing_parameter"),
        ("collection=t", "missing_parameter"),
        ("collection=t&since=", "missing_parameter"),
        ("collection=t&since=yesterday", "invalid_since"),
        (
            "collection=t&since=1970-01-01T00:00:00Z&limit=0",
            "invalid_limit",
        ),
        (
            "collection=t&since=1970-01-01T00:00:00Z&limit=-5",
            "invalid_limit",
        ),
        (
            "collection=a%2Fb&since=1970-01-01T00:00:00Z",
            "invalid_collection",
        ),
        ("collection=t&since=%zz", "invalid_query"),
        ("collection=t&since=%ff", "invalid_query"),
    ] {
        assert_eq!(q(query).unwrap_err().code, code, "{query}");
    }
}

#[test]
fn emitted_changes_omit_absent_keys_and_always_date_deletes() {
    let row = |op: &str, data: Value, meta: Value| StoredChange {
        event_id: "e".into(),
        table: "tasks".into(),
        record_id: "r".into(),
        op: Op::from_stored(op),
        data: Some(data),
        field_meta: Some(meta),
        created_at: NOW,
        schema_version: 0,
        actor: Some(Value::Null),
        origin: None,
        space_id: None,
    };
    let wire = |r: StoredChange| serde_json::to_value(r.to_wire()).unwrap();
    // An insert dated by the record itself stays an insert.
    assert_eq!(
        wire(row(
            "insert",
            json!({"a": 1, "createdAt": "2026-01-01T00:00:00Z"}),
            json!({})
        )),
        json!({"eventId": "e", "table": "tasks", "id": "r", "op": "insert",
               "data": {"a": 1, "createdAt": "2026-01-01T00:00:00Z"}, "schemaVersion": 1})
    );
    // One without any time is emitted in the snapshot shape, dated by the second its row was stamped
    // (NOW + 0.25 s here), and `id` is data, not a field.
    let mut bare_insert = row("insert", json!({"id": "r", "a": 1}), json!({}));
    bare_insert.created_at = NOW + 250_000;
    assert_eq!(
        wire(bare_insert),
        json!({"eventId": "e", "table": "tasks", "id": "r", "op": "update",
               "data": {"id": "r", "a": 1},
               "fields": {"a": {"value": 1, "at": "2026-11-21T10:05:00.000Z"}}, "schemaVersion": 1})
    );
    // A direct writer's update without timestamps, and one with object-shaped metadata.
    assert_eq!(
        wire(row(
            "update",
            json!({"a": 1, "b": null, "id": "r"}),
            json!({"b": {"at": "2026-01-01T00:00:00Z"}})
        ))["fields"],
        json!({"a": {"value": 1, "at": "2026-11-21T10:05:00.000Z"},
               "b": {"value": null, "at": "2026-01-01T00:00:00Z"}})
    );
    // An update that carries updatedAt dates its other fields by it, as the merge did.
    assert_eq!(
        wire(row(
            "update",
            json!({"a": 1, "updatedAt": "2026-01-02T00:00:00Z"}),
            json!({})
        ))["fields"]["a"]["at"],
        json!("2026-01-02T00:00:00Z")
    );
    let delete = wire(row(
        "delete",
        json!({"title": "x", "deletedAt": "2026-02-02T00:00:00.000Z"}),
        json!({"title": "2026-02-02T00:00:00.000Z"}),
    ));
    assert_eq!(delete["deletedAt"], json!("2026-02-02T00:00:00.000Z"));
    assert_eq!(
        delete["fields"],
        json!({"title": {"value": "x", "at": "2026-02-02T00:00:00.000Z"}})
    );
    // A legacy delete with nothing at all still carries a deletedAt.
    let mut bare = row("delete", json!(null), json!(null));
    bare.data = None;
    let bare = wire(bare);
    assert_eq!(bare["deletedAt"], json!("2026-11-21T10:05:00.000Z"));
    assert!(bare.get("fields").is_none() && bare.get("data").is_none());
}

#[test]
fn numbers_postgresql_cannot_store_are_refused_naming_the_change() {
    use crate::protocol::changeset::storable_number;
    for ok in [
        "0",
        "-0",
        "1",
        "-1.5",
        "1e1000",
        "1E-1000",
        "1e+5",
        "0.000e1000",
        "0e-1000",
        "123456789012345678901234567890",
    ] {
        assert!(storable_number(ok), "{ok}");
    }
    let digits = |n: usize| "9".repeat(n);
    assert!(storable_number(&digits(131_072)));
    assert!(!storable_number(&digits(131_073)));
    assert!(storable_number(&format!("0.{}", digits(16_383))));
    assert!(!storable_number(&format!("0.{}", digits(16_384))));
    assert!(storable_number(&format!("{}e1000", digits(130_072))));
    assert!(!storable_number(&format!("{}e1000", digits(130_073))));
    for bad in [
        "1e1001",
        "1e-1001",
        "1e131072",
        "1e-16384",
        "1e99999999999999999999",
    ] {
        assert!(!storable_number(bad), "{bad}");
    }
    let body: Value = serde_json::from_str(
        r#"{"changes":[{"table":"t","id":"a","op":"insert","data":{}},
                       {"table":"t","id":"b","op":"insert","data":{"x":[1,{"y":1e131072}]}}]}"#,
    )
    .unwrap();
    check_rejected(body, "invalid_number", "change 1: data holds the number 1e");
}

#[test]
fn a_delete_never_keeps_a_deleted_at_that_is_not_a_time() {
    // Found by the push_body fuzz target: the field's value is no time, its `at` is.
    let changeset = parse(json!({"changes": [{"table": "t", "id": "r", "op": "delete",
        "fields": {"deletedAt": {"value": "202`6-11-21T10:08:00.000Z", "at": "2026-11-21T10:08:00.000Z"}}}]}))
    .unwrap();
    let changes = changeset.changes.slice(0..1).unwrap();
    let delete = &changes[0];
    assert_eq!(delete.data.get("deletedAt"), None, "the server assigns one");
    assert_eq!(delete.field_meta.get("deletedAt"), None);
}
