//! Push and pull (SPEC §2-4): what goes in comes out, once, in the documented shape.

use serde_json::{json, Value};

use mana_sync::clock::now_micros;
use mana_sync::protocol::time::format_cursor;

use crate::support::*;

/// No key of an emitted change may be `null` except a field's `value`.
fn assert_no_null_keys(change: &Value) {
    for (key, value) in change.as_object().unwrap() {
        assert!(!value.is_null(), "{key} is null in {change}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_update_delete_round_trip_between_two_devices() {
    let server = TestServer::start().await;
    let user = unique_user("roundtrip");
    let actor = json!({"kind": "user", "id": "u1", "nested": {"list": [1, 2.5, "x", null, true]}});
    let body = json!({
        "clientId": "body-id-ignored-when-header-present", "since": LOG_START, "schemaVersion": 1,
        "changes": [
            {"table": "tasks", "id": "t1", "op": "insert",
             "data": {"title": "buy milk", "done": false, "createdAt": "2026-11-21T10:00:00.000Z"},
             "spaceId": "space-1", "actor": actor, "origin": "user", "schemaVersion": 1},
            {"table": "tasks", "id": "t1", "op": "update",
             "fields": {"title": {"value": "buy oat milk", "at": "2026-11-21T10:05:00.000Z"}}},
            {"table": "tasks", "id": "t2", "op": "insert", "data": {"title": "plain"}},
            {"table": "tasks", "id": "t1", "op": "delete", "deletedAt": "2026-11-21T10:06:00.000Z",
             "fields": {"done": {"value": true, "at": "2026-11-21T10:06:00.000Z"}}},
        ]
    });
    let pushed = server.push(&user, "todo", Some("device-a"), &body).await;
    assert_eq!(pushed.status, 200, "{}", pushed.text);
    assert_eq!(pushed.changes().len(), 0, "nothing from others yet");
    assert_eq!(pushed.body["conflicts"], json!([]));
    assert_eq!(pushed.body["hasMore"], json!(false));
    assert!(
        pushed.text.contains("\"syncedUntil\":\""),
        "compact JSON: {}",
        pushed.text
    );

    let pulled = server
        .pull(&user, "todo", Some("device-b"), "tasks", LOG_START, None)
        .await;
    assert_eq!(pulled.status, 200, "{}", pulled.text);
    let changes = pulled.changes();
    assert_eq!(changes.len(), 4, "{}", pulled.text);
    for change in changes {
        assert_no_null_keys(change);
        assert!(change["eventId"].as_str().is_some_and(|id| !id.is_empty()));
        assert_eq!(change["schemaVersion"], json!(1));
        assert_eq!(change["table"], json!("tasks"));
    }
    let [insert, update, plain, delete] = changes.as_slice() else {
        unreachable!()
    };
    assert_eq!(insert["op"], json!("insert"));
    assert_eq!(insert["id"], json!("t1"));
    assert_eq!(
        insert["data"],
        json!({"title": "buy milk", "done": false, "createdAt": "2026-11-21T10:00:00.000Z"})
    );
    assert_eq!(insert["spaceId"], json!("space-1"));
    assert_eq!(
        insert["actor"], actor,
        "actor is opaque and comes back equal"
    );
    assert_eq!(insert["origin"], json!("user"));
    assert!(insert.get("fields").is_none() && insert.get("deletedAt").is_none());

    assert_eq!(update["op"], json!("update"));
    assert_eq!(
        update["fields"],
        json!({"title": {"value": "buy oat milk", "at": "2026-11-21T10:05:00.000Z"}})
    );
    assert!(
        update.get("data").is_none()
            && update.get("actor").is_none()
            && update.get("spaceId").is_none()
    );

    assert!(plain.get("spaceId").is_none() && plain.get("origin").is_none());

    assert_eq!(delete["op"], json!("delete"));
    assert_eq!(delete["deletedAt"], json!("2026-11-21T10:06:00.000Z"));
    assert_eq!(
        delete["fields"],
        json!({"done": {"value": true, "at": "2026-11-21T10:06:00.000Z"}})
    );

    // Distinct event ids.
    let mut ids: Vec<&str> = changes
        .iter()
        .map(|c| c["eventId"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_suppression_with_header_and_with_body_client_id() {
    let server = TestServer::start().await;
    let user = unique_user("echo");
    // Device A names itself only in the body, device B only in the header.
    let from_a = json!({"clientId": "device-a", "since": LOG_START, "changes": [insert("notes", "n1", json!({"t": "a"}))]});
    server
        .push(&user, "notes", None, &from_a)
        .await
        .assert_status(200);
    let from_b = changeset(vec![insert("notes", "n2", json!({"t": "b"}))]);
    let reply_b = server.push(&user, "notes", Some("device-b"), &from_b).await;
    reply_b.assert_status(200);
    let ids = |reply: &Reply| {
        reply
            .changes()
            .iter()
            .map(|c| c["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&reply_b),
        vec!["n1"],
        "B's push response carries A's change, not its own"
    );

    let a_view = server
        .pull(&user, "notes", Some("device-a"), "notes", LOG_START, None)
        .await;
    assert_eq!(
        ids(&a_view),
        vec!["n2"],
        "pull names the device by X-Client-Id"
    );
    let b_view = server
        .pull(&user, "notes", Some("device-b"), "notes", LOG_START, None)
        .await;
    assert_eq!(ids(&b_view), vec!["n1"]);
    let anonymous = server
        .pull(&user, "notes", None, "notes", LOG_START, None)
        .await;
    assert_eq!(
        ids(&anonymous),
        vec!["n1", "n2"],
        "without a device id nothing is suppressed"
    );

    // A push by A with a header naming A again: A's own rows never come back to it.
    let again = json!({"since": LOG_START, "changes": []});
    let reply = server.push(&user, "notes", Some("device-a"), &again).await;
    assert_eq!(ids(&reply), vec!["n2"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_come_back_byte_for_byte_and_missing_values_as_null() {
    let server = TestServer::start().await;
    let user = unique_user("bytes");
    let odd_stamps = [
        "2026-11-21T10:05:00Z",
        "2026-11-21T10:05:00.1Z",
        "2026-11-21T12:05:00.000+02:00",
        "2026-11-21T10:05:00.123456789Z",
    ];
    let mut fields = serde_json::Map::new();
    for (i, at) in odd_stamps.iter().enumerate() {
        fields.insert(format!("f{i}"), json!({"value": i, "at": at}));
    }
    fields.insert("cleared".into(), json!({"at": "2026-11-21T10:05:00.000Z"}));
    fields.insert(
        "legacy".into(),
        json!({"value": "x", "updatedAt": "2026-11-21T10:07:00.000Z"}),
    );
    let body = json!({"since": LOG_START, "changes": [
        {"table": "t", "id": "r", "op": "update", "fields": fields},
        {"table": "t", "id": "r", "op": "delete", "deletedAt": "2026-11-21T11:00:00+00:00"},
    ]});
    server
        .push(&user, "app", Some("a"), &body)
        .await
        .assert_status(200);
    let pulled = server
        .pull(&user, "app", Some("b"), "t", LOG_START, None)
        .await;
    let fields = &pulled.changes()[0]["fields"];
    for (i, at) in odd_stamps.iter().enumerate() {
        assert_eq!(fields[format!("f{i}")], json!({"value": i, "at": at}));
    }
    assert_eq!(
        fields["cleared"],
        json!({"value": null, "at": "2026-11-21T10:05:00.000Z"})
    );
    assert!(
        pulled
            .text
            .contains("\"cleared\":{\"at\":\"2026-11-21T10:05:00.000Z\",\"value\":null}"),
        "{}",
        pulled.text
    );
    assert_eq!(
        fields["legacy"],
        json!({"value": "x", "at": "2026-11-21T10:07:00.000Z"}),
        "updatedAt is emitted as at"
    );
    assert_eq!(
        pulled.changes()[1]["deletedAt"],
        json!("2026-11-21T11:00:00+00:00")
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_without_deleted_at_still_carries_one() {
    let server = TestServer::start().await;
    let user = unique_user("del");
    let body = changeset(vec![json!({"table": "t", "id": "gone", "op": "delete"})]);
    server
        .push(&user, "app", Some("a"), &body)
        .await
        .assert_status(200);
    let pulled = server
        .pull(&user, "app", Some("b"), "t", LOG_START, None)
        .await;
    let deleted_at = pulled.changes()[0]["deletedAt"]
        .as_str()
        .expect("deletedAt")
        .to_owned();
    assert_eq!(deleted_at.len(), 24, "toISOString form: {deleted_at}");
    assert!(pulled.changes()[0].get("fields").is_none());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_200_changes_of_45_kb_goes_through_and_11_mb_is_refused_whole() {
    let server = TestServer::start().await;
    let user = unique_user("big");
    let blob = "x".repeat(45 * 1024);
    let changes: Vec<Value> = (0..200)
        .map(|i| insert("docs", &format!("d{i}"), json!({"body": blob})))
        .collect();
    let body = changeset(changes);
    let size = body.to_string().len();
    assert!(size > 9_000_000 && size < 10 * 1024 * 1024, "{size}");
    let reply = server.push(&user, "docs", Some("a"), &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(count_rows(&user).await, 200);

    let other = unique_user("big");
    let changes: Vec<Value> = (0..250)
        .map(|i| insert("docs", &format!("d{i}"), json!({"body": blob})))
        .collect();
    let body = changeset(changes).to_string().into_bytes();
    assert!(body.len() > 11 * 1024 * 1024);
    let head = |framing: String| {
        format!(
            "POST /sync/docs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\n{framing}",
            token(&other)
        )
    };
    // Declared too large: refused from the headers alone.
    let reply = raw_request(
        server.addr,
        head(format!("Content-Length: {}", body.len())),
        body.clone(),
    )
    .await;
    reply.assert_error(413, "payload_too_large");
    // Chunked, no declared length: cut off once it grows past the cap.
    let mut chunked = Vec::new();
    for chunk in body.chunks(1024 * 1024) {
        chunked.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        chunked.extend_from_slice(chunk);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let reply = raw_request(
        server.addr,
        head("Transfer-Encoding: chunked".into()),
        chunked,
    )
    .await;
    reply.assert_error(413, "payload_too_large");
    assert_eq!(count_rows(&other).await, 0, "nothing written");

    // All 2,500 large-ish rows of the first user come back across pages with a small limit.
    let (pulled, _) = server
        .pull_all(&user, "docs", Some("b"), "docs", LOG_START, Some(64))
        .await;
    assert_eq!(pulled.len(), 200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_150th_change_is_invalid_writes_nothing() {
    let server = TestServer::start().await;
    let user = unique_user("atomic");
    let mut changes: Vec<Value> = (0..200)
        .map(|i| insert("t", &format!("r{i}"), json!({"n": i})))
        .collect();
    changes[149] = json!({"table": "t", "id": "r149", "op": "merge"});
    let reply = server
        .push(&user, "app", Some("a"), &changeset(changes))
        .await;
    reply.assert_error(400, "invalid_change");
    assert!(
        reply.body["message"]
            .as_str()
            .unwrap()
            .contains("change 149"),
        "{}",
        reply.text
    );
    assert_eq!(count_rows(&user).await, 0);

    // A failure inside the database also leaves nothing: an id PostgreSQL rejects late. The id has a
    // lone surrogate, which JSON allows to be escaped but UTF-8 text cannot hold, so serde rejects it
    // before the database; use a database-side failure instead: a table name at the CHECK boundary.
    let mut changes: Vec<Value> = (0..10)
        .map(|i| insert("t", &format!("r{i}"), json!({"n": i})))
        .collect();
    changes.push(json!({"table": "t", "id": "x", "op": "insert", "data": {"bad": "\u{0}"}}));
    let reply = server
        .push(&user, "app", Some("a"), &changeset(changes))
        .await;
    reply.assert_error(400, "invalid_change");
    assert_eq!(count_rows(&user).await, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_five_hundred_changes_in_one_batch_come_back_across_pages_exactly_once() {
    let server = TestServer::start().await;
    let user = unique_user("pages");
    let changes: Vec<Value> = (0..2500)
        .map(|i| insert("items", &format!("i{i:04}"), json!({"n": i})))
        .collect();
    server
        .push(&user, "app", Some("a"), &changeset(changes))
        .await
        .assert_status(200);

    let mut cursor = LOG_START.to_owned();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let reply = server
            .pull(&user, "app", Some("b"), "items", &cursor, None)
            .await;
        reply.assert_status(200);
        pages += 1;
        let next = reply.body["syncedUntil"].as_str().unwrap().to_owned();
        assert_eq!(next.len(), 27, "fixed-width cursor: {next}");
        assert!(
            next > cursor || reply.changes().is_empty(),
            "cursor moves forward"
        );
        seen.extend(
            reply
                .changes()
                .iter()
                .map(|c| c["id"].as_str().unwrap().to_owned()),
        );
        cursor = next;
        if reply.body["hasMore"] == json!(false) {
            break;
        }
        assert_eq!(reply.changes().len(), 1000, "full pages while more remain");
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..2500).map(|i| format!("i{i:04}")).collect();
    assert_eq!(seen, expected, "every change once, in push order");

    // limit is honoured and clamped.
    let reply = server
        .pull(&user, "app", Some("b"), "items", LOG_START, Some(7))
        .await;
    assert_eq!(reply.changes().len(), 7);
    let reply = server
        .pull(&user, "app", Some("b"), "items", LOG_START, Some(1_000_000))
        .await;
    assert_eq!(reply.changes().len(), 2500);
    assert_eq!(reply.body["hasMore"], json!(false));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_thousand_foreign_rows_behind_a_push_from_the_epoch_are_all_reachable() {
    let server = TestServer::start().await;
    let user = unique_user("behind");
    for chunk in 0..3 {
        let changes: Vec<Value> = (0..2000)
            .map(|i| {
                insert(
                    if i % 2 == 0 { "a" } else { "b" },
                    &format!("r{chunk}-{i}"),
                    json!({"i": i}),
                )
            })
            .collect();
        server
            .push(&user, "app", Some("writer"), &changeset(changes))
            .await
            .assert_status(200);
    }
    // A new device pushes one change from the epoch and follows hasMore with more pushes. From the epoch
    // it gets the snapshot (one entry per record, its own records included: a re-bootstrapping device
    // needs them), page by page, then a log cursor.
    let mut body = json!({"since": EPOCH, "changes": [insert("a", "mine", json!({}))]});
    let mut seen = std::collections::HashSet::new();
    let mut entries = 0;
    let mut rounds = 0;
    loop {
        let reply = server.push(&user, "app", Some("newcomer"), &body).await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        rounds += 1;
        for change in reply.changes() {
            seen.insert(change["id"].as_str().unwrap().to_owned());
            entries += 1;
        }
        if reply.body["hasMore"] == json!(false) {
            break;
        }
        body = json!({"since": reply.body["syncedUntil"], "changes": []});
    }
    seen.remove("mine");
    assert_eq!(seen.len(), 6000, "every foreign record reached");
    assert!(
        entries <= 6001 + 2 * rounds,
        "duplicates only at page boundaries: {entries} in {rounds} rounds"
    );
    assert!((6..=8).contains(&rounds), "{rounds}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synced_until_is_never_the_epoch_and_never_behind_since() {
    let server = TestServer::start().await;
    let user = unique_user("fresh");
    let reply = server.pull(&user, "app", Some("a"), "t", EPOCH, None).await;
    reply.assert_status(200);
    let cursor = reply.body["syncedUntil"].as_str().unwrap();
    assert!(cursor > "1970-01-01T00:00:00.000000Z", "{cursor}");
    assert!(
        !cursor.starts_with("1970"),
        "a brand-new user gets a real cursor: {cursor}"
    );

    let reply = server
        .push(&user, "app", Some("a"), &json!({"changes": []}))
        .await;
    assert!(!reply.body["syncedUntil"]
        .as_str()
        .unwrap()
        .starts_with("1970"));

    // A cursor the server has not handed out (e.g. from today's server, whose clock ran ahead) is echoed
    // back, never moved backwards, and later writes are stamped after it.
    let ahead = format_cursor(now_micros() + 10 * 60 * 1_000_000);
    let reply = server
        .pull(&user, "app", Some("a"), "t", &ahead, None)
        .await;
    assert!(reply.body["syncedUntil"].as_str().unwrap() >= ahead.as_str());
    server
        .push(
            &user,
            "app",
            Some("b"),
            &changeset(vec![insert("t", "late", json!({}))]),
        )
        .await;
    let (changes, _) = server
        .pull_all(&user, "app", Some("a"), "t", &ahead, None)
        .await;
    assert_eq!(
        changes.len(),
        1,
        "written after a cursor 10 minutes ahead was accepted, so stamped after it"
    );

    // Bounded: a cursor from the far future is echoed but does not drag the user's clock years ahead.
    let far = server
        .pull(
            &user,
            "app",
            Some("a"),
            "t",
            "2099-01-01T00:00:00.000Z",
            None,
        )
        .await;
    assert!(far.body["syncedUntil"].as_str().unwrap() >= "2099-01-01T00:00:00.000000Z");
    let clock: String = superuser()
        .await
        .query_one(
            "SELECT last_at::text FROM sync_user_clock WHERE user_id = $1",
            &[&user],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!clock.starts_with("2099"), "{clock}");
    server.stop().await;
}
