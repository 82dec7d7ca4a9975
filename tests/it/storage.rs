//! Storage (SPEC §10): row-level security, and the schema migration on fresh, current and old databases.

use mana_sync::store::{Migration, Store, StoreOptions, SCHEMA_SQL};
use serde_json::json;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_can_never_read_or_write_another_users_rows_even_without_a_user_filter() {
    let server = TestServer::start().await;
    let alice = unique_user("alice");
    let bob = unique_user("bob");
    for (user, n) in [(&alice, 3), (&bob, 5)] {
        let changes = (0..n)
            .map(|i| insert("t", &format!("{user}-{i}"), json!({"secret": user})))
            .collect();
        server
            .push(user, "app", Some("same-device"), &changeset(changes))
            .await
            .assert_status(200);
    }
    // Over HTTP: same app, same collection, same device id: only one's own rows.
    let reply = server
        .pull(&alice, "app", Some("other"), "t", LOG_START, None)
        .await;
    assert_eq!(reply.changes().len(), 3);
    assert!(!reply.text.contains(&bob));

    // Directly, as the role the server uses, with queries that forget the user filter.
    let mut db = app_role().await;
    let tx = db.transaction().await.unwrap();
    tx.execute(
        "SELECT set_config('app.current_user_id', $1, true)",
        &[&alice],
    )
    .await
    .unwrap();
    let row = tx
        .query_one(
            "SELECT count(*), count(DISTINCT user_id) FROM sync_changes",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (3, 1),
        "only alice's rows are visible"
    );
    let updated = tx
        .execute("UPDATE sync_changes SET origin = origin", &[])
        .await
        .unwrap();
    assert_eq!(updated, 3, "an unfiltered UPDATE touches only alice's rows");
    let error = tx
        .execute(
            "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, client_id) \
             VALUES ('app', 't', 'forged', $1, 'insert', 'x')",
            &[&bob],
        )
        .await
        .expect_err("writing a row of another user is refused");
    assert_eq!(error.code().map(|c| c.code()), Some("42501"), "{error}");
    drop(tx);

    // Without a declared user nothing is visible at all.
    let count: i64 = db
        .query_one("SELECT count(*) FROM sync_changes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0);
    assert_eq!(count_rows(&bob).await, 5, "bob's rows are untouched");
    server.stop().await;
}

/// The table as today's (Go) server created it: no field_meta (field_timestamps instead), no
/// schema_version, actor, origin or space_id, no row-level security, no clock.
const OLD_SCHEMA: &str = "
CREATE TABLE sync_changes (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    app_id TEXT NOT NULL, table_name TEXT NOT NULL, record_id TEXT NOT NULL, user_id TEXT NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('insert', 'update', 'delete')),
    data JSONB, field_timestamps JSONB DEFAULT '{}', client_id TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now());
CREATE INDEX idx_sync_changes_user_app ON sync_changes (user_id, app_id, created_at);
INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data, field_timestamps, client_id, created_at) VALUES
  ('todo', 'tasks', 't1', 'legacy-user', 'insert', '{\"title\": \"old\"}', '{}', 'old-phone', '2025-01-01T00:00:00Z'),
  ('todo', 'tasks', 't1', 'legacy-user', 'update', '{\"title\": \"older\"}', '{\"title\": \"2025-01-02T00:00:00.000Z\"}', 'old-phone', '2025-01-02T00:00:00Z'),
  ('todo', 'tasks', 't2', 'legacy-user', 'delete', '{}', '{}', 'old-phone', '2025-01-03T00:00:00Z'),
  ('todo', 'tasks', 'x', 'someone-else', 'insert', '{}', '{}', 'old-phone', '2025-01-03T00:00:00Z');
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_a_database_that_todays_server_created_and_filled() {
    let database = cluster().fresh_database();
    connect(&database)
        .await
        .batch_execute(OLD_SCHEMA)
        .await
        .unwrap();

    let server =
        TestServer::start_with(|config| config.database_url = Some(database.clone())).await;
    let reply = server
        .pull(
            "legacy-user",
            "todo",
            Some("new-phone"),
            "tasks",
            LOG_START,
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let changes = reply.changes();
    assert_eq!(changes.len(), 3, "{}", reply.text);
    assert_eq!(changes[0]["data"], json!({"title": "old"}));
    assert_eq!(
        changes[1]["fields"],
        json!({"title": {"value": "older", "at": "2025-01-02T00:00:00.000Z"}})
    );
    assert_eq!(changes[2]["op"], json!("delete"));
    assert!(
        changes[2]["deletedAt"].is_string(),
        "a legacy delete still carries deletedAt"
    );
    assert!(changes.iter().all(|c| c["schemaVersion"] == json!(1)));

    // New writes land after the old rows, and the old user's cursor keeps working.
    let cursor = reply.body["syncedUntil"].as_str().unwrap().to_owned();
    let pushed = server
        .push(
            "legacy-user",
            "todo",
            Some("old-phone"),
            &changeset(vec![insert("tasks", "t3", json!({}))]),
        )
        .await;
    assert_eq!(pushed.status, 200, "{}", pushed.text);
    let (rest, _) = server
        .pull_all(
            "legacy-user",
            "todo",
            Some("new-phone"),
            "tasks",
            &cursor,
            None,
        )
        .await;
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0]["id"], json!("t3"));

    // Row-level security now binds the old table too.
    let db = connect(&database).await;
    let visible: i64 = db
        .query_one("SELECT count(*) FROM sync_changes", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(visible, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_is_idempotent_and_safe_from_two_instances_at_once() {
    let database = cluster().fresh_database();
    let options = StoreOptions {
        pool_size: 2,
        acquire_timeout: std::time::Duration::from_secs(10),
        retention: None,
        known_users: 0,
        max_per_user: 2,
        statement_timeout: None,
        max_future_skew: std::time::Duration::from_secs(86_400),
        page_max_bytes: 4 << 20,
        push_groups: (0, 0, 0),
    };
    let stores: Vec<Store> = (0..3)
        .map(|_| Store::new(database.parse().unwrap(), &options))
        .collect();
    let (a, b, c) = tokio::join!(
        stores[0].migrate(),
        stores[1].migrate(),
        stores[2].migrate()
    );
    let mut outcomes = vec![a.unwrap(), b.unwrap(), c.unwrap()];
    outcomes.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(
        outcomes,
        vec![
            Migration::AlreadyCurrent,
            Migration::AlreadyCurrent,
            Migration::Applied
        ]
    );

    // The script itself is idempotent too: run it again by hand, twice, on the migrated database.
    let db = connect(&database).await;
    for _ in 0..2 {
        db.batch_execute(&format!("BEGIN; {SCHEMA_SQL}; COMMIT;"))
            .await
            .unwrap();
    }
    assert_eq!(
        stores[0].migrate().await.unwrap(),
        Migration::AlreadyCurrent
    );
    let triggers: i64 = db
        .query_one("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'sync_changes'::regclass AND NOT tgisinternal", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(triggers, 2);
    let forced: bool = db
        .query_one("SELECT relforcerowsecurity AND relrowsecurity FROM pg_class WHERE relname = 'sync_changes'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(forced, "row-level security is enabled and forced");
}
