//! Times the server assigns (SPEC §6): a change that carries no time is dated by its receipt rounded down
//! to the whole second, a client's time beats an assigned one at the same instant, and timestamp-less
//! inserts are emitted in the snapshot shape so that the web client orders them the way the server does.

use std::collections::BTreeMap;

use mana_sync::protocol::time;
use serde_json::{json, Map, Value};

use crate::support::*;

/// A device's copy built the way the web client applies what it pulls (CLIENTS.md, "Applying"): per field
/// last-write-wins on `at` *strings*, the server winning ties; an insert dated by
/// `data.updatedAt ?? data.createdAt ?? the receiver's clock`; an update for a record it lacks rebuilt from
/// `fields` alone; a field without `at` dropped for a record that has field metadata; a delete without
/// `deletedAt` deleting the row outright.
#[derive(Debug, Default)]
struct WebClient {
    /// (table, id) → field → (value, at).
    records: BTreeMap<(String, String), BTreeMap<String, (Value, String)>>,
}

impl WebClient {
    fn apply(&mut self, change: &Value) {
        let key = (
            change["table"].as_str().unwrap().to_owned(),
            change["id"].as_str().unwrap().to_owned(),
        );
        match change["op"].as_str().unwrap() {
            "insert" => {
                let data = change["data"].as_object().unwrap();
                let at = [data.get("updatedAt"), data.get("createdAt")]
                    .into_iter()
                    .flatten()
                    .find_map(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| time::format_millis(mana_sync::clock::now_micros()));
                for (field, value) in data {
                    self.put(&key, field, value, &at);
                }
            }
            "update" => {
                for (field, entry) in change["fields"].as_object().unwrap() {
                    let Some(at) = entry["at"].as_str() else {
                        continue;
                    };
                    self.put(&key, field, &entry["value"], at);
                }
            }
            "delete" => match change["deletedAt"].as_str() {
                Some(at) => self.put(&key, "deletedAt", &json!(at), at),
                None => {
                    self.records.remove(&key);
                }
            },
            other => panic!("unknown op {other}"),
        }
    }

    fn put(&mut self, key: &(String, String), field: &str, value: &Value, at: &str) {
        let record = self.records.entry(key.clone()).or_default();
        match record.get(field) {
            Some((_, held)) if held.as_str() > at => {}
            _ => {
                record.insert(field.to_owned(), (value.clone(), at.to_owned()));
            }
        }
    }

    fn value(&self, table: &str, id: &str, field: &str) -> Option<&Value> {
        let record = self.records.get(&(table.to_owned(), id.to_owned()))?;
        record.get(field).map(|(value, _)| value)
    }
}

/// Whether `at` is an assigned time: whole seconds in `toISOString()` form.
fn is_assigned_form(at: &Value) -> bool {
    at.as_str().is_some_and(|at| {
        at.len() == 24 && at.ends_with(".000Z") && time::parse_rfc3339(at).is_ok()
    })
}

/// The cursor's second, the way `date -u +%Y-%m-%dT%H:%M:%SZ` writes it.
fn whole_second(cursor: &str) -> String {
    format!("{}Z", &cursor[..19])
}

/// Today's server's own end-to-end script, with its request bodies, against ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_go_servers_seven_step_end_to_end_flow_passes() {
    let server = TestServer::start().await;
    let user = unique_user("e2e");
    let task = format!("e2e-task-{}", std::process::id());

    // 1. The server is up.
    let health = server.request("GET", "/health", &[], None).await;
    assert_eq!(health.status, 200, "{}", health.text);
    assert!(health.text.contains(r#""status":"ok""#), "{}", health.text);

    // 2. Client A inserts a task without any timestamp, from the epoch.
    let body = format!(
        r#"{{"clientId":"client-a","since":"1970-01-01T00:00:00.000Z","changes":[{{"table":"tasks","id":"{task}","op":"insert","data":{{"title":"E2E Test Task","completed":false}}}}]}}"#
    );
    let a_push = push_text(&server, &user, &body).await;
    assert_eq!(a_push.status, 200, "{}", a_push.text);
    let a_cursor = a_push.body["syncedUntil"].as_str().unwrap().to_owned();

    // 3. Client B pulls from the epoch and sees it.
    let b_pull = server
        .pull(&user, "todo", Some("client-b"), "tasks", EPOCH, None)
        .await;
    assert_eq!(b_pull.status, 200, "{}", b_pull.text);
    let seen = b_pull.changes().iter().find(|c| c["id"] == json!(task));
    let seen = seen.unwrap_or_else(|| panic!("B sees the task: {}", b_pull.text));
    assert_eq!(seen["data"]["title"], json!("E2E Test Task"));

    // 4. Client B updates two fields, dated now in whole seconds, from A's cursor.
    let now = whole_second(&time::format_cursor(mana_sync::clock::now_micros()));
    let body = format!(
        r#"{{"clientId":"client-b","since":"{a_cursor}","changes":[{{"table":"tasks","id":"{task}","op":"update","fields":{{"title":{{"value":"Updated by Client B","updatedAt":"{now}"}},"completed":{{"value":true,"updatedAt":"{now}"}}}}}}]}}"#
    );
    let b_push = push_text(&server, &user, &body).await;
    assert_eq!(b_push.status, 200, "{}", b_push.text);
    assert_eq!(b_push.body["conflicts"], json!([]), "{}", b_push.text);

    // 5. Client A pulls tasks from its cursor and sees B's update.
    let a_pull = server
        .pull(&user, "todo", Some("client-a"), "tasks", &a_cursor, None)
        .await;
    assert_eq!(a_pull.status, 200, "{}", a_pull.text);
    let update = a_pull.changes().iter().find(|c| c["id"] == json!(task));
    let update = update.unwrap_or_else(|| panic!("A sees B's update: {}", a_pull.text));
    assert_eq!(
        update["fields"]["title"]["value"],
        json!("Updated by Client B")
    );
    assert_eq!(update["fields"]["completed"]["value"], json!(true));
    let a_cursor = a_pull.body["syncedUntil"].as_str().unwrap().to_owned();

    // 6. Client A deletes the task without deletedAt; B gets a delete dated in whole seconds.
    let body = format!(
        r#"{{"clientId":"client-a","since":"{a_cursor}","changes":[{{"table":"tasks","id":"{task}","op":"delete"}}]}}"#
    );
    let delete = push_text(&server, &user, &body).await;
    assert_eq!(delete.status, 200, "{}", delete.text);
    let b_cursor = b_pull.body["syncedUntil"].as_str().unwrap().to_owned();
    let (b_changes, _) = server
        .pull_all(&user, "todo", Some("client-b"), "tasks", &b_cursor, None)
        .await;
    let deleted = b_changes
        .iter()
        .find(|c| c["id"] == json!(task) && c["op"] == json!("delete"))
        .unwrap_or_else(|| panic!("B sees the delete: {b_changes:?}"));
    assert!(is_assigned_form(&deleted["deletedAt"]), "{deleted}");

    // 7. A push without a token is refused.
    let anonymous = server
        .request(
            "POST",
            "/sync/todo",
            &[("content-type", "application/json")],
            Some(body.into_bytes()),
        )
        .await;
    anonymous.assert_error(401, "missing_token");
    server.stop().await;
}

async fn push_text(server: &TestServer, user: &str, body: &str) -> Reply {
    let auth = format!("Bearer {}", token(user));
    server
        .request(
            "POST",
            "/sync/todo",
            &[
                ("authorization", auth.as_str()),
                ("content-type", "application/json"),
            ],
            Some(body.as_bytes().to_vec()),
        )
        .await
}

/// Step 4 above in its hardest form: B's whole-second time falls in the very second the server assigned
/// to A's insert. The client's time wins; both devices end with B's values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_in_the_same_second_beats_an_assigned_insert_time() {
    let server = TestServer::start().await;
    let user = unique_user("same-second");
    let inserted = server
        .push(
            &user,
            "todo",
            Some("zz-device-a"),
            &json!({"since": EPOCH, "changes": [insert("tasks", "t", json!({"id": "t", "title": "E2E Test Task", "completed": false}))]}),
        )
        .await;
    assert_eq!(inserted.status, 200, "{}", inserted.text);
    let a_cursor = inserted.body["syncedUntil"].as_str().unwrap().to_owned();
    // The insert's stamp is the cursor A got; its assigned time is that second.
    let second = whole_second(&a_cursor);

    let (snapshot, _) = server
        .pull_all(&user, "todo", Some("aa-device-b"), "tasks", EPOCH, None)
        .await;
    assert_eq!(snapshot.len(), 1, "{snapshot:?}");
    let assigned = format!("{}.000Z", &a_cursor[..19]);
    assert_eq!(
        snapshot[0]["fields"],
        json!({"title": {"value": "E2E Test Task", "at": assigned},
               "completed": {"value": false, "at": assigned}}),
        "assigned times in toISOString() form; `id` is not a field"
    );

    let edit = json!({"since": a_cursor, "changes": [{"table": "tasks", "id": "t", "op": "update", "fields": {
        "title": {"value": "Updated by Client B", "updatedAt": second},
        "completed": {"value": true, "updatedAt": second}}}]});
    let pushed = server.push(&user, "todo", Some("aa-device-b"), &edit).await;
    assert_eq!(pushed.status, 200, "{}", pushed.text);
    assert_eq!(pushed.body["conflicts"], json!([]), "{}", pushed.text);

    let pulled = server
        .pull(&user, "todo", Some("zz-device-a"), "tasks", &a_cursor, None)
        .await;
    assert_eq!(
        pulled.changes()[0]["fields"]["title"],
        json!({"value": "Updated by Client B", "at": second})
    );
    let (snapshot, _) = server
        .pull_all(&user, "todo", Some("new-device"), "tasks", EPOCH, None)
        .await;
    assert_eq!(snapshot[0]["data"]["title"], json!("Updated by Client B"));
    assert_eq!(snapshot[0]["data"]["completed"], json!(true));
    server.stop().await;
}

/// A web device that was offline pulls an insert (which carried no time) and a later edit together. Dated
/// by its own clock, a plain insert would beat the edit for good; in the snapshot shape it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_was_behind_keeps_the_later_edit() {
    let server = TestServer::start().await;
    let user = unique_user("behind");
    let first = server
        .push(
            &user,
            "todo",
            Some("phone"),
            &json!({"since": EPOCH, "changes": [insert("tasks", "other", json!({"id": "other", "title": "x"}))]}),
        )
        .await;
    assert_eq!(first.status, 200, "{}", first.text);
    // The laptop bootstraps, then goes offline holding a log cursor.
    let mut laptop = WebClient::default();
    let (snapshot, laptop_cursor) = server
        .pull_all(&user, "todo", Some("laptop"), "tasks", EPOCH, None)
        .await;
    snapshot.iter().for_each(|c| laptop.apply(c));

    // The phone creates a task the way the web client does (no timestamp at all), then edits it.
    let created = server
        .push(
            &user,
            "todo",
            Some("phone"),
            &json!({"since": laptop_cursor, "changes": [{"table": "tasks", "id": "t", "op": "insert",
                "data": {"id": "t", "title": "draft", "done": false},
                "actor": {"kind": "user"}, "spaceId": "s"}]}),
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.text);
    // The edit is stamped later than the insert's assigned time.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let edited_at = time::format_millis(mana_sync::clock::now_micros());
    let edited = server
        .push(
            &user,
            "todo",
            Some("phone"),
            &json!({"since": laptop_cursor, "changes": [update("tasks", "t", "title", json!("final"), &edited_at)]}),
        )
        .await;
    assert_eq!(edited.status, 200, "{}", edited.text);
    assert_eq!(edited.body["conflicts"], json!([]));

    // Back online: both changes arrive in one pull, applied a little later by the laptop's clock.
    let (changes, _) = server
        .pull_all(&user, "todo", Some("laptop"), "tasks", &laptop_cursor, None)
        .await;
    assert_eq!(changes.len(), 2, "{changes:?}");
    let insert_entry = &changes[0];
    assert_eq!(insert_entry["op"], json!("update"), "{insert_entry}");
    assert_eq!(
        insert_entry["data"],
        json!({"id": "t", "title": "draft", "done": false})
    );
    let fields: &Map<String, Value> = insert_entry["fields"].as_object().unwrap();
    assert_eq!(
        fields.keys().collect::<Vec<_>>(),
        ["done", "title"],
        "every field but id"
    );
    assert!(
        fields.values().all(|f| is_assigned_form(&f["at"])),
        "{insert_entry}"
    );
    // Applied a little later by the laptop's clock.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    changes.iter().for_each(|c| laptop.apply(c));
    assert_eq!(laptop.value("tasks", "t", "title"), Some(&json!("final")));
    assert_eq!(laptop.value("tasks", "t", "done"), Some(&json!(false)));
    assert_eq!(laptop.value("tasks", "other", "title"), Some(&json!("x")));
    server.stop().await;
}

/// A database today's server filled: its timestamp-less rows are dated by the second of their
/// `created_at` when they are folded and when they are emitted, so a same-second edit wins there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_format_database_dates_its_rows_by_the_second() {
    let database = go_database(
        "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data, field_timestamps, client_id, created_at) VALUES
         ('todo', 'tasks', 'e2e', 'go-user', 'insert', '{\"id\": \"e2e\", \"title\": \"E2E Test Task\", \"completed\": false}', '{}', 'client-a', '2026-11-29T12:36:59.870123Z'),
         ('todo', 'tasks', 'gone', 'go-user', 'insert', '{\"title\": \"gone\"}', '{}', 'client-a', '2026-11-29T12:37:00.100000Z'),
         ('todo', 'tasks', 'gone', 'go-user', 'delete', '{}', '{}', 'client-a', '2026-11-29T12:37:05.999999Z');",
    )
    .await;
    let server = TestServer::start_with(|c| c.database_url = Some(database.clone())).await;

    // The log, as a device that follows it sees it.
    let (log, cursor) = server
        .pull_all(
            "go-user",
            "todo",
            Some("client-b"),
            "tasks",
            LOG_START,
            None,
        )
        .await;
    assert_eq!(log.len(), 3, "{log:?}");
    assert_eq!(
        log[0]["op"],
        json!("update"),
        "a timestamp-less insert: {}",
        log[0]
    );
    assert_eq!(
        log[0]["fields"],
        json!({"title": {"value": "E2E Test Task", "at": "2026-11-29T12:36:59.000Z"},
               "completed": {"value": false, "at": "2026-11-29T12:36:59.000Z"}})
    );
    assert_eq!(log[2]["deletedAt"], json!("2026-11-29T12:37:05.000Z"));

    // A same-second edit from a device with whole-second clocks wins over the folded insert.
    let edit = json!({"since": cursor, "changes": [{"table": "tasks", "id": "e2e", "op": "update", "fields": {
        "title": {"value": "Updated by Client B", "updatedAt": "2026-11-29T12:36:59Z"}}}]});
    let pushed = server
        .push("go-user", "todo", Some("client-b"), &edit)
        .await;
    assert_eq!(pushed.status, 200, "{}", pushed.text);
    assert_eq!(pushed.body["conflicts"], json!([]), "{}", pushed.text);

    // The snapshot agrees with the log.
    let (snapshot, _) = server
        .pull_all("go-user", "todo", Some("new-device"), "tasks", EPOCH, None)
        .await;
    let by_id: BTreeMap<&str, &Value> = snapshot
        .iter()
        .map(|c| (c["id"].as_str().unwrap(), c))
        .collect();
    assert_eq!(
        by_id["e2e"]["fields"],
        json!({"title": {"value": "Updated by Client B", "at": "2026-11-29T12:36:59Z"},
               "completed": {"value": false, "at": "2026-11-29T12:36:59.000Z"}})
    );
    assert_eq!(
        by_id["gone"]["deletedAt"],
        json!("2026-11-29T12:37:05.000Z")
    );
    server.stop().await;
}
