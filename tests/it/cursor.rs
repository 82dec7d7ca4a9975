//! The cursor guarantee (SPEC §5): a device that keeps pulling from the cursor it was given receives every
//! change of its user that it did not author — including changes whose transaction was in flight when the
//! cursor was handed out, changes written by other programs straight into `sync_changes`, and changes that
//! share a timestamp at a page boundary.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(30);

/// A direct writer as the real system has them: its own connection, a transaction that declares the user,
/// `id` and `created_at` left to their defaults, an `update` with per-field timestamps.
const DIRECT_INSERT: &str = "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data, field_meta, client_id, origin) \
     VALUES ($1, $2, $3, $4, 'update', $5, $6, 'mcp-server', 'agent')";

async fn begin_as(client: &tokio_postgres::Client, user: &str) {
    client.batch_execute("BEGIN").await.unwrap();
    client
        .execute(
            "SELECT set_config('app.current_user_id', $1, true)",
            &[&user],
        )
        .await
        .unwrap();
}

async fn direct_insert(client: &tokio_postgres::Client, user: &str, table: &str, id: &str) {
    client
        .execute(
            DIRECT_INSERT,
            &[
                &"app",
                &table,
                &id,
                &user,
                &json!({"title": id}),
                &json!({"title": "2026-11-21T10:05:00.000Z"}),
            ],
        )
        .await
        .unwrap();
}

fn ids(changes: &[Value]) -> BTreeSet<String> {
    changes
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_in_flight_while_another_device_pulls_is_not_skipped() {
    let server = TestServer::start().await;
    let user = unique_user("inflight");
    let writer = app_role().await;

    // The write is in flight (row inserted, not committed) when the other device pulls; it commits while
    // that pull is running.
    begin_as(&writer, &user).await;
    direct_insert(&writer, &user, "t", "held").await;
    let (first, ()) = tokio::join!(
        server.pull(&user, "app", Some("reader"), "t", LOG_START, None),
        async {
            // Into the pull: nothing observable says the pull has begun, so give it a head start.
            tokio::time::sleep(Duration::from_millis(300)).await;
            writer.batch_execute("COMMIT").await.unwrap();
        }
    );
    assert_eq!(first.status, 200, "{}", first.text);
    let cursor = first.body["syncedUntil"].as_str().unwrap();
    let (rest, _) = server
        .pull_all(&user, "app", Some("reader"), "t", cursor, None)
        .await;
    let mut seen = ids(first.changes());
    seen.extend(ids(&rest));
    assert!(
        seen.contains("held"),
        "the held write reached the reader: {seen:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_began_before_the_cursor_and_wrote_after_it_is_delivered() {
    let server = TestServer::start().await;
    let user = unique_user("early");
    let writer = app_role().await;
    server
        .push(
            &user,
            "app",
            Some("a"),
            &changeset(vec![insert("t", "before", json!({}))]),
        )
        .await
        .assert_status(200);

    // Today's server stamps rows with the transaction's start time: this row would land behind the cursor.
    begin_as(&writer, &user).await;
    // The transaction's start time must be older than the cursor the pull hands out.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let first = server
        .pull(&user, "app", Some("reader"), "t", LOG_START, None)
        .await;
    assert_eq!(ids(first.changes()), BTreeSet::from(["before".to_owned()]));
    let cursor = first.body["syncedUntil"].as_str().unwrap().to_owned();
    direct_insert(&writer, &user, "t", "slow").await;
    writer.batch_execute("COMMIT").await.unwrap();

    let (rest, _) = server
        .pull_all(&user, "app", Some("reader"), "t", &cursor, None)
        .await;
    assert_eq!(ids(&rest), BTreeSet::from(["slow".to_owned()]));

    // The same through HTTP: a push blocked behind the open transaction commits after a pull's cursor.
    begin_as(&writer, &user).await;
    direct_insert(&writer, &user, "t", "locked").await;
    let blocked = {
        let url = server.url("/sync/app");
        let auth = format!("Bearer {}", token(&user));
        let body = changeset(vec![insert("t", "pushed", json!({}))])
            .to_string()
            .into_bytes();
        tokio::spawn(async move {
            request(
                "POST",
                &url,
                &[("authorization", &auth), ("x-client-id", "pusher")],
                Some(body),
            )
            .await
        })
    };
    let observer = superuser().await;
    wait_until("the push waits on the open transaction", WAIT, || async {
        lock_waiters(&observer, &user).await > 0
    })
    .await;
    writer.batch_execute("COMMIT").await.unwrap();
    blocked.await.unwrap().assert_status(200);
    let (rest, _) = server
        .pull_all(&user, "app", Some("reader"), "t", &cursor, None)
        .await;
    assert_eq!(
        ids(&rest),
        BTreeSet::from(["slow".to_owned(), "locked".to_owned(), "pushed".to_owned()])
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_directly_into_sync_changes_are_delivered_in_the_documented_shape() {
    let server = TestServer::start().await;
    let user = unique_user("direct");
    let writer = app_role().await;
    begin_as(&writer, &user).await;
    direct_insert(&writer, &user, "notes", "with-times").await;
    writer
        .execute(
            "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data, client_id, origin) \
             VALUES ('app', 'notes', 'no-times', $1, 'update', '{\"body\": \"hi\", \"n\": 2}', 'mcp-server', 'agent')",
            &[&user],
        )
        .await
        .unwrap();
    writer.batch_execute("COMMIT").await.unwrap();

    let reply = server
        .pull(&user, "app", Some("browser"), "notes", LOG_START, None)
        .await;
    let changes = reply.changes();
    assert_eq!(changes.len(), 2, "{}", reply.text);
    assert_eq!(
        changes[0]["fields"],
        json!({"title": {"value": "with-times", "at": "2026-11-21T10:05:00.000Z"}})
    );
    assert_eq!(changes[0]["origin"], json!("agent"));
    // Without times of its own, the row is dated by the second it was stamped in (SPEC §6), as the merge
    // dated it.
    let at = changes[1]["fields"]["body"]["at"].clone();
    assert!(
        at.as_str()
            .is_some_and(|at| at.len() == 24 && at.ends_with(".000Z")),
        "{at}"
    );
    assert_eq!(
        changes[1]["fields"],
        json!({"body": {"value": "hi", "at": at}, "n": {"value": 2, "at": at}})
    );
    assert_eq!(changes[1]["op"], json!("update"));
    assert!(changes
        .iter()
        .all(|c| c.get("actor").is_none() && c.get("spaceId").is_none()));

    // A direct writer's device id suppresses echo like any other: it never gets its own rows back.
    let reply = server
        .pull(&user, "app", Some("mcp-server"), "notes", LOG_START, None)
        .await;
    assert!(reply.changes().is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_sharing_a_timestamp_at_a_page_boundary_are_all_delivered() {
    let server = TestServer::start().await;
    let user = unique_user("ties");
    // Today's server stamped every row of a transaction with the same now(); write such rows with the
    // stamping trigger switched off, as a database it filled would hold them.
    let admin = superuser().await;
    admin
        .batch_execute("BEGIN; SET LOCAL session_replication_role = replica")
        .await
        .unwrap();
    for (i, at) in (0..10)
        .map(|i| (i, "2026-01-01 00:00:00+00"))
        .chain((10..15).map(|i| (i, "2026-01-01 00:00:01+00")))
    {
        admin
            .execute(
                "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data, client_id, created_at) \
                 VALUES ('app', 't', $1, $2, 'insert', '{}', 'old-device', $3::text::timestamptz)",
                &[&format!("r{i:02}"), &user, &at],
            )
            .await
            .unwrap();
    }
    admin.batch_execute("COMMIT").await.unwrap();

    let mut cursor = LOG_START.to_owned();
    let mut seen = Vec::new();
    for _ in 0..10 {
        let reply = server
            .pull(&user, "app", Some("new"), "t", &cursor, Some(4))
            .await;
        seen.extend(
            reply
                .changes()
                .iter()
                .map(|c| c["id"].as_str().unwrap().to_owned()),
        );
        cursor = reply.body["syncedUntil"].as_str().unwrap().to_owned();
        if reply.body["hasMore"] == json!(false) {
            break;
        }
    }
    let expected: Vec<String> = (0..15).map(|i| format!("r{i:02}")).collect();
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, expected, "each exactly once: {seen:?}");

    // The app-wide page (a push's answer, a stream) and a stream's page of some tables cut the same groups:
    // they too deliver every row exactly once.
    let only_t = ["t".to_owned()];
    for tables in [None, Some(&only_t[..])] {
        let store = &server.shared.store;
        let mut since = mana_sync::protocol::time::parse_rfc3339(LOG_START).unwrap();
        let mut seen = Vec::new();
        for _ in 0..10 {
            let page = store
                .app_changes(&user, "app", tables, Some("new"), since, 4)
                .await
                .unwrap();
            seen.extend(page.server_changes.iter().map(|c| c.id.clone()));
            since = page.synced_until;
            if !page.has_more {
                break;
            }
        }
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(
            sorted, expected,
            "tables {tables:?}: each exactly once: {seen:?}"
        );
    }

    // New writes after legacy rows are stamped after them, even with the legacy rows in the future.
    server
        .push(
            &user,
            "app",
            Some("w"),
            &changeset(vec![insert("t", "new", json!({}))]),
        )
        .await;
    let (rest, _) = server
        .pull_all(&user, "app", Some("new"), "t", &cursor, None)
        .await;
    assert_eq!(ids(&rest), BTreeSet::from(["new".to_owned()]));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn randomized_concurrent_writers_and_pullers_lose_nothing() {
    // Two server instances on one database, HTTP writers on both, a direct SQL writer, and pullers that
    // keep pulling while all of that happens.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    let servers = Arc::new([TestServer::start().await, TestServer::start().await]);
    let user = unique_user("random");
    let tables = ["a", "b"];
    let writers_done = Arc::new(tokio::sync::Notify::new());
    let done_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let mut writer_tasks = Vec::new();
    for w in 0..4u64 {
        let servers = servers.clone();
        let user = user.clone();
        writer_tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed.wrapping_add(w * 7919) | 1);
            let device = format!("writer-{w}");
            let mut written = Vec::new();
            for batch in 0..25 {
                let size = 1 + rng.below(12);
                let changes: Vec<Value> = (0..size)
                    .map(|i| {
                        let id = format!("{device}-{batch}-{i}");
                        written.push(id.clone());
                        insert(tables[rng.below(2) as usize], &id, json!({"n": i}))
                    })
                    .collect();
                let server = &servers[rng.below(2) as usize];
                let reply = server
                    .push(&user, "app", Some(&device), &json!({"changes": changes}))
                    .await;
                assert_eq!(reply.status, 200, "{}", reply.text);
            }
            written
        }));
    }
    let direct = {
        let user = user.clone();
        tokio::spawn(async move {
            let mut rng = Rng(seed ^ 0xABCD | 1);
            let writer = app_role().await;
            let mut written = Vec::new();
            for batch in 0..25 {
                begin_as(&writer, &user).await;
                for i in 0..1 + rng.below(4) {
                    let id = format!("direct-{batch}-{i}");
                    direct_insert(&writer, &user, tables[rng.below(2) as usize], &id).await;
                    written.push(id);
                    tokio::time::sleep(Duration::from_millis(rng.below(5))).await;
                }
                writer.batch_execute("COMMIT").await.unwrap();
            }
            written
        })
    };

    let mut puller_tasks = Vec::new();
    for p in 0..3usize {
        let servers = servers.clone();
        let user = user.clone();
        let done_flag = done_flag.clone();
        let writers_done = writers_done.clone();
        puller_tasks.push(tokio::spawn(async move {
            let device = format!("puller-{p}");
            let mut cursors: HashMap<&str, String> =
                tables.iter().map(|t| (*t, LOG_START.to_owned())).collect();
            let mut seen = BTreeSet::new();
            let mut final_round = false;
            loop {
                let finished = done_flag.load(std::sync::atomic::Ordering::SeqCst);
                for table in tables {
                    let server = &servers[p % 2];
                    let limit = [3, 10, 1000][p];
                    let (changes, cursor) = server
                        .pull_all(
                            &user,
                            "app",
                            Some(&device),
                            table,
                            &cursors[table],
                            Some(limit),
                        )
                        .await;
                    seen.extend(ids(&changes));
                    cursors.insert(table, cursor);
                }
                if final_round {
                    return seen;
                }
                // One more full round after the writers finished, from the cursors held.
                final_round = finished;
                if !finished {
                    tokio::select! {
                        () = writers_done.notified() => {}
                        () = tokio::time::sleep(Duration::from_millis(5)) => {}
                    }
                }
            }
        }));
    }

    let mut expected = BTreeSet::new();
    for task in writer_tasks {
        expected.extend(task.await.unwrap());
    }
    expected.extend(direct.await.unwrap());
    done_flag.store(true, std::sync::atomic::Ordering::SeqCst);
    writers_done.notify_waiters();
    for (p, task) in puller_tasks.into_iter().enumerate() {
        let seen = task.await.unwrap();
        let missing: Vec<_> = expected.difference(&seen).collect();
        assert!(
            missing.is_empty(),
            "seed {seed}: puller {p} missed {} changes: {missing:?}",
            missing.len()
        );
    }
    assert_eq!(count_rows(&user).await as usize, expected.len());
    match Arc::try_unwrap(servers) {
        Ok([a, b]) => {
            a.stop().await;
            b.stop().await;
        }
        Err(_) => unreachable!("all tasks finished"),
    }
}

/// Reads answered from memory ("nothing new" without touching PostgreSQL) must never hide a change: HTTP
/// writers on instance A and a direct SQL writer, pullers on instance B that poll from the cursors they
/// hold, and B's (and A's) listening connections killed several times mid-run, which loses the hints sent
/// meanwhile. Every change reaches every puller, and B did answer from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_from_memory_hide_nothing_across_instances_and_listener_restarts() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    let writer_instance = TestServer::start().await;
    let reader_instance = Arc::new(TestServer::start().await);
    let user = unique_user("memory");
    let tables = ["a", "b"];
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));

    let http_writer = {
        let user = user.clone();
        let server = &writer_instance;
        let mut rng = Rng(seed | 1);
        async move {
            let mut written = Vec::new();
            for batch in 0..40 {
                let id = format!("http-{batch}");
                let change = insert(tables[rng.below(2) as usize], &id, json!({"n": batch}));
                let reply = server
                    .push(&user, "app", Some("writer"), &json!({"changes": [change]}))
                    .await;
                assert_eq!(reply.status, 200, "{}", reply.text);
                written.push(id);
                tokio::time::sleep(Duration::from_millis(rng.below(40))).await;
            }
            written
        }
    };
    let direct_writer = {
        let user = user.clone();
        let mut rng = Rng(seed ^ 0x5EED | 1);
        async move {
            let writer = app_role().await;
            let mut written = Vec::new();
            for batch in 0..25 {
                begin_as(&writer, &user).await;
                let id = format!("direct-{batch}");
                direct_insert(&writer, &user, tables[rng.below(2) as usize], &id).await;
                writer.batch_execute("COMMIT").await.unwrap();
                written.push(id);
                tokio::time::sleep(Duration::from_millis(rng.below(60))).await;
            }
            written
        }
    };
    // Kills every listening connection (of these and of other tests' servers); the listeners reconnect and
    // must drop what they knew.
    let chaos = {
        async move {
            let admin = superuser().await;
            let mut kills = 0;
            for _ in 0..3 {
                // Spread over the writers' run.
                tokio::time::sleep(Duration::from_millis(700)).await;
                let killed = admin
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                         WHERE application_name = $1",
                        &[&mana_sync::realtime::LISTENER_NAME],
                    )
                    .await
                    .unwrap();
                kills += killed.len();
            }
            kills
        }
    };
    let pullers = (0..3usize).map(|p| {
        let server = reader_instance.clone();
        let user = user.clone();
        let done = done.clone();
        async move {
            let device = format!("puller-{p}");
            let mut cursors: HashMap<&str, String> =
                tables.iter().map(|t| (*t, LOG_START.to_owned())).collect();
            let mut seen = BTreeSet::new();
            let mut final_round = false;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                for table in tables {
                    let (changes, cursor) = server
                        .pull_all(&user, "app", Some(&device), table, &cursors[table], Some(5))
                        .await;
                    seen.extend(ids(&changes));
                    cursors.insert(table, cursor);
                }
                if final_round {
                    return seen;
                }
                final_round = finished;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
    });
    let pullers = futures_util::future::join_all(pullers);
    let writers = async {
        let (mut written, direct, kills) = tokio::join!(http_writer, direct_writer, chaos);
        written.extend(direct);
        // The listeners are back from the last kill, so the final round is a fair test of memory.
        wait_for_listener(&writer_instance).await;
        wait_for_listener(&reader_instance).await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        (written, kills)
    };
    let ((written, kills), seen_by) = tokio::join!(writers, pullers);
    let expected: BTreeSet<String> = written.into_iter().collect();
    for (p, seen) in seen_by.iter().enumerate() {
        let missing: Vec<_> = expected.difference(seen).collect();
        assert!(
            missing.is_empty(),
            "seed {seed}: puller {p} missed {missing:?}"
        );
    }
    assert!(kills > 0, "the listeners were never restarted");
    let (from_memory, from_database) = reader_instance.shared.store.known().stats();
    println!("answered from memory {from_memory}, from the database {from_database}, {kills} listener kills");
    assert!(from_memory > 0, "no read was answered from memory");
    writer_instance.stop().await;
    match Arc::try_unwrap(reader_instance) {
        Ok(server) => server.stop().await,
        Err(_) => unreachable!("all tasks finished"),
    }
}
