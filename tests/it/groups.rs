//! Small pushes of different users share one transaction (`src/store/group.rs`). Groups must be invisible
//! to clients: the same pushes get the same answers and leave the same state as when every push runs
//! alone, and a user whose lock is busy holds up no other user.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::support::*;

fn at(n: u64) -> String {
    format!("2026-11-21T10:{:02}:{:02}.000Z", n / 60 % 60, n % 60)
}

/// One push of a script: the device and its changes.
type Push = (&'static str, Vec<Value>);

/// User `u`'s pushes, the same for every seed run: mostly device A; every fourth from device B (whose
/// cursor is behind, so A's next push finds something new and is answered with a page); field times drawn
/// at random so that some fields lose (conflicts) and some deletes are beaten by later edits.
fn script(seed: u64, u: usize, pushes: usize) -> Vec<Push> {
    let mut rng = Rng((seed ^ (u as u64 * 0x9E37_79B9)) | 1);
    let mut created = [false; 4];
    (0..pushes)
        .map(|p| {
            let device = if p % 4 == 3 { "B" } else { "A" };
            let changes = (0..1 + rng.below(3))
                .map(|_| {
                    let r = rng.below(4) as usize;
                    let id = format!("r{r}");
                    let time = at(rng.below(600));
                    if !created[r] {
                        created[r] = true;
                        json!({"table": "tasks", "id": id, "op": "insert",
                               "data": {"title": format!("t{p}"), "done": false, "updatedAt": time}})
                    } else if rng.below(8) == 0 {
                        json!({"table": "tasks", "id": id, "op": "delete", "deletedAt": time})
                    } else {
                        let field = ["title", "done", "notes"][rng.below(3) as usize];
                        json!({"table": "tasks", "id": id, "op": "update",
                               "fields": {field: {"value": format!("{field}{p}"), "at": time}}})
                    }
                })
                .collect();
            (device, changes)
        })
        .collect()
}

/// What a client sees of one answer, without what depends on when it ran (cursors, log row ids).
fn seen(reply: &Reply) -> Value {
    let mut changes: Vec<Value> = reply.body["serverChanges"]
        .as_array()
        .unwrap_or_else(|| panic!("{} {}", reply.status, reply.text))
        .iter()
        .map(|c| {
            let mut c = c.as_object().unwrap().clone();
            c.remove("eventId");
            Value::Object(c)
        })
        .collect();
    changes.sort_by_key(|c| c.to_string());
    json!({"status": reply.status, "conflicts": reply.body["conflicts"], "changes": changes,
           "hasMore": reply.body["hasMore"]})
}

/// Runs every user's script (users concurrently, each user's pushes in order, each device carrying its
/// own cursor) and returns every answer as seen, and each user's records as a snapshot pull shows them.
async fn run(server: &TestServer, users: &[String], seed: u64, pushes: usize) -> Vec<Value> {
    let server = Arc::new(server);
    let runs = users.iter().enumerate().map(|(u, user)| {
        let server = server.clone();
        async move {
            let mut cursors: BTreeMap<&str, String> = BTreeMap::new();
            let mut answers = Vec::new();
            for (device, changes) in script(seed, u, pushes) {
                let since = cursors
                    .entry(device)
                    .or_insert_with(|| LOG_START.to_owned());
                let body = json!({"since": since, "changes": changes});
                let reply = server.push(user, "todo", Some(device), &body).await;
                assert_eq!(reply.status, 200, "{}", reply.text);
                *since = reply.body["syncedUntil"].as_str().unwrap().to_owned();
                answers.push(seen(&reply));
            }
            let (snapshot, _) = server
                .pull_all(user, "todo", Some("C"), "tasks", EPOCH, None)
                .await;
            let mut records: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
            for change in snapshot {
                let record = records
                    .entry(change["id"].as_str().unwrap().to_owned())
                    .or_default();
                for key in ["data", "fields", "deletedAt", "op"] {
                    if let Some(value) = change.get(key) {
                        record.insert(key.into(), value.clone());
                    }
                }
            }
            json!({"answers": answers, "records": records})
        }
    });
    futures_util::future::join_all(runs).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_in_groups_answer_and_store_exactly_as_pushes_alone() {
    const USERS: usize = 16;
    const PUSHES: usize = 12;
    let seed = 0x5EED_0001;
    let grouped_db = cluster().fresh_database();
    let alone_db = cluster().fresh_database();
    let grouped = TestServer::start_with(|c| {
        c.database_url = Some(grouped_db.clone());
        c.push_groups = 1;
        c.push_group_max = 8;
        c.push_group_after = 0;
    })
    .await;
    let alone = TestServer::start_with(|c| {
        c.database_url = Some(alone_db.clone());
        c.push_groups = 0;
    })
    .await;
    let users: Vec<String> = (0..USERS).map(|u| format!("group-user-{u}")).collect();

    let (in_groups, by_itself) = tokio::join!(
        run(&grouped, &users, seed, PUSHES),
        run(&alone, &users, seed, PUSHES)
    );
    for (u, (a, b)) in in_groups.iter().zip(&by_itself).enumerate() {
        assert_eq!(a, b, "user {u}: grouped (left) and alone (right) differ");
    }

    let stats = grouped.shared.store.push_groups();
    let (committed, written, bounced) = (
        stats.committed.load(Ordering::Relaxed),
        stats.written.load(Ordering::Relaxed),
        stats.bounced.load(Ordering::Relaxed),
    );
    // The comparison means something only if groups answered pushes and sent some back.
    assert!(
        committed >= 1 && written >= USERS as u64,
        "committed {committed}, written {written}"
    );
    assert!(bounced >= 1, "no push was handed back (conflicts, pages)");
    assert!(
        written < committed * 8 + 1,
        "a group held more than PUSH_GROUP_MAX pushes"
    );
    let alone_stats = alone.shared.store.push_groups();
    assert_eq!(alone_stats.written.load(Ordering::Relaxed), 0);
    grouped.stop().await;
    alone.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_whose_lock_is_busy_holds_up_no_one_else_in_the_group() {
    let server = TestServer::start_with(|c| {
        c.push_groups = 1;
        c.push_group_max = 16;
        c.push_group_after = 0;
    })
    .await;
    let users: Vec<String> = (0..9).map(|_| unique_user("busy")).collect();
    let busy = users[0].clone();
    // Only pushes whose `since` memory knows to be current may group, and memory knows nothing until the
    // listener is up (on a loaded machine that can take longer than the first pushes).
    wait_for_listener(&server).await;
    // A first push each: the server then knows each user's clock, so the next push may join a group.
    let mut cursors = Vec::new();
    for user in &users {
        let reply = server
            .push(
                user,
                "todo",
                Some("A"),
                &changeset(vec![insert("tasks", "first", json!({"n": 0}))]),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        cursors.push(reply.body["syncedUntil"].as_str().unwrap().to_owned());
    }

    let known = server.shared.store.known();
    for (user, cursor) in users.iter().zip(&cursors) {
        let since = mana_sync::protocol::time::parse_rfc3339(cursor).unwrap();
        assert!(
            known.nothing_after(user, since),
            "memory knows {user}'s cursor is current"
        );
    }

    // Another program holds the busy user's lock (as another instance's long push would).
    let mut holder = superuser().await;
    let held = holder.transaction().await.unwrap();
    held.execute(
        &format!("SELECT pg_advisory_xact_lock({USER_LOCK_CLASS}, hashtext($1))"),
        &[&busy],
    )
    .await
    .unwrap();

    let server = Arc::new(server);
    let pushes: Vec<_> = users
        .iter()
        .zip(&cursors)
        .map(|(user, since)| {
            let (server, user, since) = (server.clone(), user.clone(), since.clone());
            tokio::spawn(async move {
                let body = json!({"since": since, "changes": [insert("tasks", "second", json!({"n": 1}))]});
                server.push(&user, "todo", Some("A"), &body).await
            })
        })
        .collect();
    let mut pushes = pushes.into_iter();
    let busy_push = pushes.next().unwrap();
    for push in pushes {
        let reply = push.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    // Everyone else is through while the busy user's lock is still held: no group waited for it.
    assert!(!busy_push.is_finished());
    // The busy push may have reached the queue after the others' group was taken; its own group then tries
    // the lock, finds it busy and hands the push back to wait alone.
    let stats = server.shared.store.push_groups();
    wait_until(
        "the busy push is handed back",
        Duration::from_secs(30),
        || async { stats.bounced.load(Ordering::Relaxed) >= 1 },
    )
    .await;
    assert_eq!(stats.failed.load(Ordering::Relaxed), 0);
    assert!(!busy_push.is_finished(), "it waits alone for the lock");

    held.rollback().await.unwrap();
    let reply = busy_push.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(count_rows(&busy).await, 2);
    Arc::try_unwrap(server).ok().unwrap().stop().await;
}
