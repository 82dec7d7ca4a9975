//! The merged record state (SPEC §6): conflicts, convergence, snapshot bootstrap, compaction, and building
//! the state from a log older servers (and direct writers) wrote.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::support::*;

/// A device's local copy, built the way the web client applies what it pulls.
#[derive(Debug, Default, Clone, PartialEq)]
struct Replica {
    records: BTreeMap<(String, String), Map<String, Value>>,
}

impl Replica {
    fn apply(&mut self, change: &Value) {
        let key = (
            change["table"].as_str().unwrap().to_owned(),
            change["id"].as_str().unwrap().to_owned(),
        );
        match change["op"].as_str().unwrap() {
            "insert" => {
                self.records
                    .insert(key, change["data"].as_object().cloned().unwrap_or_default());
            }
            "update" => {
                // A snapshot entry carries the whole record in `data`; a plain update only its fields.
                let record = self.records.entry(key).or_default();
                if let Some(data) = change.get("data").and_then(Value::as_object) {
                    *record = data.clone();
                }
                for (field, entry) in change["fields"].as_object().unwrap() {
                    record.insert(field.clone(), entry["value"].clone());
                }
            }
            "delete" => {
                let record = self.records.entry(key).or_default();
                record.insert("deletedAt".into(), change["deletedAt"].clone());
            }
            other => panic!("unknown op {other}"),
        }
    }

    fn apply_all(&mut self, changes: &[Value]) {
        changes.iter().for_each(|c| self.apply(c));
    }

    /// Live records with their non-null fields (what a user would see).
    fn visible(&self) -> BTreeMap<(String, String), Map<String, Value>> {
        self.records
            .iter()
            .filter(|(_, r)| !r.get("deletedAt").is_some_and(Value::is_string))
            .map(|(k, r)| {
                (
                    k.clone(),
                    r.iter()
                        .filter(|(_, v)| !v.is_null())
                        .map(|(f, v)| (f.clone(), v.clone()))
                        .collect(),
                )
            })
            .collect()
    }
}

fn at(minute: u32, second: u32) -> String {
    format!("2026-11-21T10:{minute:02}:{second:02}.000Z")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_losing_push_is_reported_as_a_conflict_and_never_relayed() {
    let server = TestServer::start().await;
    let user = unique_user("conflict");
    let create = json!({"table": "tasks", "id": "t", "op": "insert", "data": {"title": "a", "done": false, "createdAt": at(0, 0)}});
    server
        .push(&user, "todo", Some("A"), &changeset(vec![create]))
        .await
        .assert_status(200);
    let newer = update("tasks", "t", "title", json!("from A"), &at(10, 0));
    server
        .push(&user, "todo", Some("A"), &changeset(vec![newer]))
        .await
        .assert_status(200);

    // B edited offline earlier (its clock says 10:05) and pushes late: title loses, done wins.
    let stale = json!({"table": "tasks", "id": "t", "op": "update", "fields": {
        "title": {"value": "from B", "at": at(5, 0)},
        "done": {"value": true, "at": at(5, 0)},
    }});
    let reply = server
        .push(
            &user,
            "todo",
            Some("B"),
            &json!({"since": LOG_START, "changes": [stale.clone()]}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.body["conflicts"],
        json!([{"table": "tasks", "id": "t", "field": "title", "clientValue": "from B", "clientTimestamp": at(5, 0),
                "serverValue": "from A", "serverTimestamp": at(10, 0)}])
    );
    // B converges: the winning title comes back with its `at`, even though B's cursor is past it.
    let winning = reply
        .changes()
        .iter()
        .rev()
        .find(|c| c["fields"]["title"]["value"] == json!("from A"))
        .cloned();
    assert_eq!(
        winning.expect("winning value returned")["fields"]["title"]["at"],
        json!(at(10, 0))
    );

    // Other devices never receive B's losing title, only the field that won.
    let (log, _) = server
        .pull_all(&user, "todo", Some("C"), "tasks", LOG_START, None)
        .await;
    let titles: Vec<&Value> = log
        .iter()
        .filter_map(|c| c["fields"].get("title"))
        .map(|f| &f["value"])
        .collect();
    assert_eq!(titles, vec![&json!("from A")]);
    assert_eq!(
        log.last().unwrap()["fields"],
        json!({"done": {"value": true, "at": at(5, 0)}})
    );

    // Replaying the same push (a retry after a lost response) adds nothing to the log.
    let rows = count_rows(&user).await;
    let again = server
        .push(
            &user,
            "todo",
            Some("B"),
            &json!({"since": LOG_START, "changes": [stale]}),
        )
        .await;
    again.assert_status(200);
    assert_eq!(count_rows(&user).await, rows);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_conflicting_pushes_from_two_devices_converge_on_a_third() {
    let server = TestServer::start().await;
    let user = unique_user("converge");
    let fields = ["title", "notes", "done", "color"];
    // Each device writes every field of every record with its own, interleaved timestamps; equal instants
    // spelled differently are broken by client id.
    let batch = |device: &str, offset: u32| -> Value {
        let mut changes = Vec::new();
        for record in 0..5 {
            for (i, field) in fields.iter().enumerate() {
                let second = (record * 7 + i as u32 * 3 + offset) % 20;
                let stamp = if second == 10 {
                    "2026-11-21T10:00:10Z".to_owned()
                } else {
                    at(0, second)
                };
                changes.push(update(
                    "items",
                    &format!("r{record}"),
                    field,
                    json!(format!("{device}-{second}")),
                    &stamp,
                ));
            }
        }
        json!({"since": LOG_START, "changes": changes})
    };
    let (batch_a, batch_b) = (batch("A", 0), batch("B", 5));
    let (a, b) = tokio::join!(
        server.push(&user, "app", Some("A"), &batch_a),
        server.push(&user, "app", Some("B"), &batch_b)
    );
    assert_eq!((a.status, b.status), (200, 200));

    // Expected: per field the later instant wins; at equal instants the greater client id ("B").
    let mut expected: BTreeMap<(String, String), Map<String, Value>> = BTreeMap::new();
    for record in 0..5 {
        for (i, field) in fields.iter().enumerate() {
            let a_second = (record * 7 + i as u32 * 3) % 20;
            let b_second = (record * 7 + i as u32 * 3 + 5) % 20;
            let value = if b_second >= a_second {
                format!("B-{b_second}")
            } else {
                format!("A-{a_second}")
            };
            expected
                .entry(("items".into(), format!("r{record}")))
                .or_default()
                .insert(field.to_string(), json!(value));
        }
    }

    // A third device bootstrapping from the epoch gets exactly that state.
    let (snapshot, _) = server
        .pull_all(&user, "app", Some("C"), "items", EPOCH, None)
        .await;
    let mut third = Replica::default();
    third.apply_all(&snapshot);
    assert_eq!(third.visible(), expected);
    // A device replaying the log in order ends in the same state: losing values were never logged.
    let (log, _) = server
        .pull_all(&user, "app", Some("D"), "items", LOG_START, None)
        .await;
    let mut replayed = Replica::default();
    replayed.apply_all(&log);
    assert_eq!(replayed.visible(), expected);
    // And each writer, applying its push response and then pulling from the cursor it got, converges too.
    for (device, reply) in [("A", &a), ("B", &b)] {
        let mut local = Replica::default();
        local.apply_all(
            batch(device, if device == "A" { 0 } else { 5 })["changes"]
                .as_array()
                .unwrap(),
        );
        local.apply_all(reply.changes());
        let cursor = reply.body["syncedUntil"].as_str().unwrap();
        let (rest, _) = server
            .pull_all(&user, "app", Some(device), "items", cursor, None)
            .await;
        local.apply_all(&rest);
        assert_eq!(local.visible(), expected, "device {device}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_device_after_10000_updates_gets_about_100_entries_and_the_same_state() {
    let server = TestServer::start().await;
    let user = unique_user("bootstrap");
    let create: Vec<Value> = (0..100).map(|r| json!({"table": "notes", "id": format!("n{r:03}"), "op": "insert", "data": {"body": "", "createdAt": at(0, 0)}})).collect();
    server
        .push(&user, "app", Some("writer"), &changeset(create))
        .await
        .assert_status(200);
    for round in 0..10u32 {
        let changes: Vec<Value> = (0..1000u32)
            .map(|i| {
                let n = round * 1000 + i;
                let stamp = format!(
                    "2026-11-21T11:{:02}:{:02}.{:03}Z",
                    n / 6000,
                    (n / 100) % 60,
                    n % 100 * 10
                );
                update(
                    "notes",
                    &format!("n{:03}", i % 100),
                    "body",
                    json!(format!("v{n}")),
                    &stamp,
                )
            })
            .collect();
        server
            .push(&user, "app", Some("writer"), &changeset(changes))
            .await
            .assert_status(200);
    }
    let (history, _) = server
        .pull_all(&user, "app", Some("old"), "notes", LOG_START, None)
        .await;
    assert_eq!(history.len(), 10_100);
    let mut old = Replica::default();
    old.apply_all(&history);

    let (snapshot, cursor) = server
        .pull_all(&user, "app", Some("new"), "notes", EPOCH, None)
        .await;
    assert!(
        snapshot.len() >= 100 && snapshot.len() <= 110,
        "{} entries",
        snapshot.len()
    );
    for entry in &snapshot {
        assert_eq!(entry["op"], json!("update"));
        assert!(
            entry["data"].is_object() && entry["fields"].is_object(),
            "{entry}"
        );
        assert!(entry["fields"]["body"]["at"].is_string());
    }
    let mut new = Replica::default();
    new.apply_all(&snapshot);
    assert_eq!(new.visible(), old.visible());
    assert!(
        cursor.as_str() > "2000",
        "the snapshot ends with a log cursor: {cursor}"
    );

    // After the snapshot the new device continues with the log, without a gap.
    let late = update(
        "notes",
        "n000",
        "body",
        json!("late"),
        "2026-11-21T12:00:00.000Z",
    );
    server
        .push(&user, "app", Some("writer"), &changeset(vec![late]))
        .await
        .assert_status(200);
    let (rest, _) = server
        .pull_all(&user, "app", Some("new"), "notes", &cursor, None)
        .await;
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["fields"]["body"]["value"], json!("late"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_prunes_old_rows_and_a_stale_client_still_converges() {
    let server =
        TestServer::start_with(|c| c.log_retention = Some(std::time::Duration::from_secs(86_400)))
            .await;
    let user = unique_user("compact");
    let create: Vec<Value> = (0..5).map(|r| json!({"table": "t", "id": format!("r{r}"), "op": "insert", "data": {"v": 0, "createdAt": at(0, 0)}})).collect();
    server
        .push(&user, "app", Some("writer"), &changeset(create))
        .await
        .assert_status(200);
    let (first, stale_cursor) = server
        .pull_all(&user, "app", Some("stale"), "t", LOG_START, None)
        .await;
    let mut stale = Replica::default();
    stale.apply_all(&first);

    let mut changes: Vec<Value> = (0..5)
        .map(|r| update("t", &format!("r{r}"), "v", json!(r + 1), &at(1, r)))
        .collect();
    changes.push(json!({"table": "t", "id": "r4", "op": "delete", "deletedAt": at(2, 0)}));
    server
        .push(&user, "app", Some("writer"), &changeset(changes))
        .await
        .assert_status(200);

    // Two days pass for the whole history: the rows and the stale device's cursor alike.
    let admin = superuser().await;
    admin.execute("UPDATE sync_changes SET created_at = created_at - interval '2 days' WHERE user_id = $1", &[&user]).await.unwrap();
    let stale_cursor: String = admin
        .query_one("SELECT to_char(($1::text::timestamptz - interval '2 days') AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')", &[&stale_cursor])
        .await
        .unwrap()
        .get(0);
    let before = count_rows(&user).await;
    assert_eq!(before, 11);
    let pruned = server
        .shared
        .store
        .compact(4)
        .await
        .unwrap()
        .expect("this instance compacted");
    assert!(pruned >= 11, "{pruned}");
    assert_eq!(
        count_rows(&user).await,
        0,
        "every row behind the horizon is gone"
    );

    // The stale device is behind the horizon: it gets the snapshot, never a silent gap.
    let (catch_up, _) = server
        .pull_all(&user, "app", Some("stale"), "t", &stale_cursor, None)
        .await;
    stale.apply_all(&catch_up);
    let (fresh, _) = server
        .pull_all(&user, "app", Some("fresh"), "t", EPOCH, None)
        .await;
    let mut reference = Replica::default();
    reference.apply_all(&fresh);
    assert_eq!(stale.visible(), reference.visible());
    assert_eq!(reference.visible().len(), 4, "r4 is deleted");
    assert_eq!(
        reference.visible()[&("t".to_owned(), "r3".to_owned())]["v"],
        json!(4)
    );

    // A second pass finds nothing, and writing goes on as before.
    assert_eq!(server.shared.store.compact(4).await.unwrap(), Some(0));
    server
        .push(
            &user,
            "app",
            Some("writer"),
            &changeset(vec![update("t", "r0", "v", json!(9), &at(3, 0))]),
        )
        .await
        .assert_status(200);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_is_built_from_an_old_log_and_from_direct_writers() {
    let database = go_database(
        "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data, field_timestamps, client_id, created_at) VALUES
         ('todo', 'tasks', 't1', 'old-user', 'insert', '{\"title\": \"first\", \"done\": false}', '{}', 'phone', '2025-01-01T00:00:00Z'),
         ('todo', 'tasks', 't1', 'old-user', 'update', '{\"title\": \"second\"}', '{\"title\": \"2025-01-02T00:00:00.000Z\"}', 'phone', '2025-01-02T00:00:00Z'),
         ('todo', 'tasks', 't1', 'old-user', 'update', '{\"title\": \"stale\"}', '{\"title\": \"2024-12-31T00:00:00.000Z\"}', 'laptop', '2025-01-03T00:00:00Z'),
         ('todo', 'tasks', 't2', 'old-user', 'insert', '{\"title\": \"gone\"}', '{}', 'phone', '2025-01-01T00:00:00Z'),
         ('todo', 'tasks', 't2', 'old-user', 'delete', '{}', '{}', 'phone', '2025-01-04T00:00:00Z');",
    )
    .await;
    let server = TestServer::start_with(|c| c.database_url = Some(database.clone())).await;
    let (snapshot, _) = server
        .pull_all("old-user", "todo", Some("new-phone"), "tasks", EPOCH, None)
        .await;
    let by_id: BTreeMap<&str, &Value> = snapshot
        .iter()
        .map(|c| (c["id"].as_str().unwrap(), c))
        .collect();
    assert_eq!(by_id.len(), 2, "{snapshot:?}");
    assert_eq!(by_id["t1"]["op"], json!("update"));
    assert_eq!(
        by_id["t1"]["data"],
        json!({"title": "second", "done": false}),
        "the stale title lost"
    );
    assert_eq!(
        by_id["t1"]["fields"]["title"],
        json!({"value": "second", "at": "2025-01-02T00:00:00.000Z"})
    );
    assert_eq!(by_id["t2"]["op"], json!("delete"));
    assert_eq!(by_id["t2"]["deletedAt"], json!("2025-01-04T00:00:00.000Z"));

    // A direct writer's row is folded in before the next read of the state.
    let writer = connect(&database).await;
    writer
        .batch_execute("BEGIN; SELECT set_config('app.current_user_id', 'old-user', true);")
        .await
        .unwrap();
    writer
        .execute(
            "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data, field_meta, client_id, origin) \
             VALUES ('todo', 'tasks', 't1', 'old-user', 'update', '{\"done\": true}', '{\"done\": \"2026-01-01T00:00:00.000Z\"}', 'mcp-server', 'agent')",
            &[],
        )
        .await
        .unwrap();
    writer.batch_execute("COMMIT").await.unwrap();
    let (snapshot, _) = server
        .pull_all(
            "old-user",
            "todo",
            Some("another-phone"),
            "tasks",
            EPOCH,
            None,
        )
        .await;
    let t1 = snapshot.iter().find(|c| c["id"] == json!("t1")).unwrap();
    assert_eq!(t1["data"], json!({"title": "second", "done": true}));
    assert_eq!(
        t1["origin"],
        json!("agent"),
        "the snapshot names the newest change folded in"
    );
    server.stop().await;
}

/// A large batch is merged and written in chunks within its one transaction (issue 11 §4): records touched
/// in several chunks end in the state all their changes give, a change that loses in a later chunk is a
/// conflict answered with the record's final state, and a value refused in the last chunk leaves nothing of
/// the earlier chunks behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_a_chunk_is_one_transaction_with_one_outcome() {
    let server = TestServer::start().await;
    let user = unique_user("chunked");
    let mut changes: Vec<Value> = (0..2_500)
        .map(|i| {
            insert(
                "tasks",
                &format!("r{i}"),
                json!({"n": i, "createdAt": at(0, 0)}),
            )
        })
        .collect();
    // r0: edited in the second chunk, then an older edit in the third loses to it.
    changes[1_200] = update("tasks", "r0", "n", json!("newest"), &at(5, 0));
    changes[2_300] = update("tasks", "r0", "n", json!("stale"), &at(1, 0));
    // r1: inserted again (same values) in the third chunk: nothing new, no conflict.
    changes[2_400] = insert("tasks", "r1", json!({"n": 1, "createdAt": at(0, 0)}));
    let reply = server
        .push(
            &user,
            "todo",
            Some("laptop"),
            &json!({"since": EPOCH, "changes": changes}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let conflicts = reply.body["conflicts"].as_array().unwrap();
    assert_eq!(conflicts.len(), 1, "{conflicts:?}");
    assert_eq!(conflicts[0]["id"], json!("r0"));
    assert_eq!(conflicts[0]["serverValue"], json!("newest"));
    // The loser is answered with the record's final state, which a later chunk wrote.
    let r0: Vec<&Value> = reply
        .changes()
        .iter()
        .filter(|c| c["id"] == json!("r0"))
        .collect();
    assert_eq!(r0.len(), 1, "{r0:?}");
    assert_eq!(r0[0]["data"]["n"], json!("newest"));
    assert!(r0[0]["eventId"].as_str().is_some_and(|e| !e.is_empty()));
    // 2,500 changes: 2,497 inserts logged, the r0 edit logged, the stale edit and the repeated insert not.
    assert_eq!(count_rows(&user).await, 2_498);
    let (snapshot, _) = server
        .pull_all(&user, "todo", Some("phone"), "tasks", EPOCH, Some(5_000))
        .await;
    assert_eq!(snapshot.len(), 2_497);
    let r0 = snapshot.iter().find(|c| c["id"] == json!("r0")).unwrap();
    assert_eq!(
        r0["fields"]["n"],
        json!({"value": "newest", "at": at(5, 0)})
    );

    // All or nothing: a value PostgreSQL refuses in the last chunk undoes the chunks written before it.
    use mana_sync::protocol::{Changeset, NewChange};
    let other = unique_user("chunked-refused");
    let mut batch: Vec<NewChange> = (0..2_400)
        .map(|i| parsed_insert(&format!("x{i}"), json!({"n": i})))
        .collect();
    batch.push(parsed_insert(
        "x2400",
        serde_json::from_str(r#"{"n": 1e131072}"#).unwrap(),
    ));
    let changeset = Changeset::new(
        None,
        mana_sync::protocol::time::parse_rfc3339(LOG_START).unwrap(),
        batch,
    );
    let error = server
        .shared
        .store
        .push(&other, "todo", Some("dev"), &changeset, 100, None)
        .await
        .expect_err("PostgreSQL cannot store 1e131072");
    assert!(
        matches!(error, mana_sync::store::StoreError::Rejected(_)),
        "{error:?}"
    );
    assert_eq!(count_rows(&other).await, 0, "nothing of the earlier chunks");
    server.stop().await;
}
