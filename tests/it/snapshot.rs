//! Snapshot paging (SPEC §4, §6): within one paging sequence every record comes exactly once, whatever the
//! page size and however many records share one stamp; a record that changes after its page was delivered
//! comes once more with its new state; none is ever skipped.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use crate::support::*;

/// Snapshot cursors lie between 1970-01-02 and 2000-01-01; log cursors after.
fn is_snapshot_cursor(cursor: &str) -> bool {
    ("1970-01-02".."2000").contains(&cursor)
}

/// The pages of one paging sequence from `since`, following `hasMore`.
struct Paged {
    pages: Vec<Vec<Value>>,
    /// The cursor the last page handed out.
    cursor: String,
}

impl Paged {
    fn entries(&self) -> impl Iterator<Item = &Value> {
        self.pages.iter().flatten()
    }

    /// How often each record id came.
    fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for entry in self.entries() {
            *counts
                .entry(entry["id"].as_str().unwrap().to_owned())
                .or_insert(0) += 1;
        }
        counts
    }

    fn sizes(&self) -> Vec<usize> {
        self.pages.iter().map(Vec::len).collect()
    }
}

/// Pulls `collection` page by page, checking each page's `hasMore` and cursor; `between` runs after each
/// page that has more (with the pages so far) and may write.
async fn page_through<F, Fut>(
    server: &TestServer,
    user: &str,
    collection: &str,
    since: &str,
    limit: usize,
    mut between: F,
) -> Paged
where
    F: FnMut(&[Vec<Value>]) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut cursor = since.to_owned();
    let mut pages: Vec<Vec<Value>> = Vec::new();
    loop {
        assert!(pages.len() < 20_000, "paging did not finish");
        let reply = server
            .pull(
                user,
                "app",
                Some("reader"),
                collection,
                &cursor,
                Some(limit),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        let page = reply.changes().clone();
        let next = reply.body["syncedUntil"].as_str().unwrap().to_owned();
        let has_more = reply.body["hasMore"] == json!(true);
        if has_more {
            assert_eq!(page.len(), limit.min(5_000), "a page with more is full");
            assert!(is_snapshot_cursor(&next), "{next}");
            assert!(
                cursor.as_str() < next.as_str(),
                "cursors advance: {cursor} then {next}"
            );
        } else {
            assert!(
                next.as_str() > "2000",
                "the last page hands over a log cursor: {next}"
            );
        }
        cursor = next;
        pages.push(page);
        if !has_more {
            return Paged { pages, cursor };
        }
        between(&pages).await;
    }
}

fn nothing_between(_: &[Vec<Value>]) -> std::future::Ready<()> {
    std::future::ready(())
}

fn record(id: &str, value: u64) -> Value {
    insert(
        "notes",
        id,
        json!({"v": value, "updatedAt": "2026-01-01T00:00:00.000Z"}),
    )
}

async fn push_ok(server: &TestServer, user: &str, changes: Vec<Value>) {
    let reply = server
        .push(user, "app", Some("writer"), &changeset(changes))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
}

/// Everything after the snapshot's last cursor, and that nothing unchanged comes again from it.
async fn assert_log_is_quiet(server: &TestServer, user: &str, cursor: &str) {
    let reply = server
        .pull(user, "app", Some("reader"), "notes", cursor, None)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.changes().len(), 0, "{}", reply.text);
    assert_eq!(reply.body["hasMore"], json!(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_of_2500_records_pages_exactly_once_at_every_page_size() {
    let server = TestServer::start().await;
    let user = unique_user("snap-batch");
    let ids: BTreeSet<String> = (0..2_500).map(|i| format!("r{i:04}")).collect();
    push_ok(&server, &user, ids.iter().map(|id| record(id, 0)).collect()).await;

    for limit in [7, 1_000, 5_000, 20_000] {
        let paged = page_through(&server, &user, "notes", EPOCH, limit, nothing_between).await;
        let counts = paged.counts();
        let repeated: usize = counts.values().map(|n| n - 1).sum();
        eprintln!(
            "limit {limit}: pages {:?}, {repeated} repeated",
            if paged.pages.len() > 5 {
                vec![paged.pages.len()]
            } else {
                paged.sizes()
            }
        );
        assert_eq!(repeated, 0, "limit {limit}: no record twice");
        assert_eq!(
            counts.keys().cloned().collect::<BTreeSet<_>>(),
            ids,
            "limit {limit}: every record"
        );
        let expected_pages = 2_500_usize.div_ceil(limit.min(5_000));
        assert_eq!(paged.pages.len(), expected_pages, "limit {limit}");
        assert_log_is_quiet(&server, &user, &paged.cursor).await;
    }

    // Page size 1, on fewer records (one request per record).
    let small = unique_user("snap-one");
    let ids: BTreeSet<String> = (0..60).map(|i| format!("s{i:02}")).collect();
    push_ok(
        &server,
        &small,
        ids.iter().map(|id| record(id, 0)).collect(),
    )
    .await;
    let paged = page_through(&server, &small, "notes", EPOCH, 1, nothing_between).await;
    assert_eq!(paged.pages.len(), 60);
    assert!(
        paged.counts().values().all(|&n| n == 1),
        "{:?}",
        paged.counts()
    );
    assert_eq!(paged.counts().into_keys().collect::<BTreeSet<_>>(), ids);
    assert_log_is_quiet(&server, &small, &paged.cursor).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_folded_from_one_go_batch_share_a_stamp_and_still_page_exactly_once() {
    // A database today's (Go) server filled: a whole batch was stamped with one `created_at`.
    let database = go_database(
        "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data, client_id, created_at)
        SELECT 'app', 'notes', 'g' || lpad(n::text, 3, '0'), 'go-user', 'insert',
               jsonb_build_object('v', n), 'go-phone', '2025-06-01T12:00:00Z'
        FROM generate_series(0, 99) AS n;",
    )
    .await;
    let server = TestServer::start_with(|c| c.database_url = Some(database.clone())).await;
    let ids: BTreeSet<String> = (0..100).map(|n| format!("g{n:03}")).collect();
    for limit in [1, 7, 1_000] {
        let paged = page_through(&server, "go-user", "notes", EPOCH, limit, nothing_between).await;
        let counts = paged.counts();
        assert!(
            counts.values().all(|&n| n == 1),
            "limit {limit}: {counts:?}"
        );
        assert_eq!(
            counts.into_keys().collect::<BTreeSet<_>>(),
            ids,
            "limit {limit}"
        );
        assert_eq!(
            paged.pages.len(),
            100_usize.div_ceil(limit),
            "limit {limit}"
        );
        for entry in paged.entries() {
            let n: u64 = entry["id"].as_str().unwrap()[1..].parse().unwrap();
            assert_eq!(entry["data"]["v"], json!(n));
        }
        assert_log_is_quiet(&server, "go-user", &paged.cursor).await;
    }
    server.stop().await;
}

/// What the writes between pages did, and the state they leave.
#[derive(Default)]
struct Writes {
    current: BTreeMap<String, u64>,
    updated_after_delivery: BTreeSet<String>,
    updated_before_delivery: BTreeSet<String>,
    inserted: BTreeSet<String>,
    round: u64,
}

impl Writes {
    /// The next round of writes: two records already delivered and two not yet delivered change (each
    /// record at most once), and one new record appears.
    fn plan(&mut self, delivered: &BTreeSet<String>) -> Vec<Value> {
        self.round += 1;
        let value = self.round * 100;
        let at = format!("2026-02-0{}T00:00:00.000Z", self.round);
        let untouched = |id: &&String| {
            !self.updated_after_delivery.contains(*id)
                && !self.updated_before_delivery.contains(*id)
                && !self.inserted.contains(*id)
        };
        let after: Vec<String> = delivered
            .iter()
            .filter(untouched)
            .take(2)
            .cloned()
            .collect();
        let before: Vec<String> = self
            .current
            .keys()
            .filter(|id| !delivered.contains(*id))
            .filter(untouched)
            .take(2)
            .cloned()
            .collect();
        let new_id = format!("new{}", self.round);
        let mut changes = Vec::new();
        for id in after.iter().chain(&before) {
            changes.push(update("notes", id, "v", json!(value), &at));
            self.current.insert(id.clone(), value);
        }
        changes.push(record(&new_id, value));
        self.current.insert(new_id.clone(), value);
        self.updated_after_delivery.extend(after);
        self.updated_before_delivery.extend(before);
        self.inserted.insert(new_id);
        changes
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_between_pages_are_delivered_once_more_never_skipped() {
    let server = TestServer::start().await;
    let user = unique_user("snap-writes");
    let ids: Vec<String> = (0..50).map(|i| format!("r{i:02}")).collect();
    push_ok(&server, &user, ids.iter().map(|id| record(id, 0)).collect()).await;

    // The state the server should end with, and what was written when.
    let writes = std::sync::Mutex::new(Writes {
        current: ids.iter().map(|id| (id.clone(), 0)).collect(),
        ..Writes::default()
    });
    let paged = page_through(&server, &user, "notes", EPOCH, 7, |pages| {
        let delivered: BTreeSet<String> = pages
            .iter()
            .flatten()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        let page_count = pages.len();
        let (writes, server, user) = (&writes, &server, &user);
        async move {
            // After pages 2 and 4: two delivered records, two not delivered yet, one new record.
            if page_count == 2 || page_count == 4 {
                let changes = writes.lock().unwrap().plan(&delivered);
                push_ok(server, user, changes).await;
            }
        }
    })
    .await;
    let Writes {
        current,
        updated_after_delivery,
        updated_before_delivery,
        inserted,
        round,
    } = writes.into_inner().unwrap();
    assert_eq!(round, 2, "writes happened twice during the snapshot");

    let mut occurrences: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut applied: BTreeMap<String, u64> = BTreeMap::new();
    for entry in paged.entries() {
        assert_eq!(entry["op"], json!("update"), "{entry}");
        let id = entry["id"].as_str().unwrap().to_owned();
        let value = entry["data"]["v"].as_u64().unwrap();
        occurrences.entry(id.clone()).or_default().push(value);
        applied.insert(id, value);
    }
    for id in &ids {
        let seen = &occurrences[id];
        if updated_after_delivery.contains(id) {
            assert_eq!(
                seen.len(),
                2,
                "{id}: once, then once more after its change: {seen:?}"
            );
            assert_eq!(seen[0], 0, "{id}");
            assert_eq!(seen[1], current[id], "{id}");
        } else if updated_before_delivery.contains(id) {
            assert_eq!(seen, &vec![current[id]], "{id}: once, with its new value");
        } else {
            assert_eq!(seen, &vec![0], "{id}: untouched, exactly once");
        }
    }
    for id in &inserted {
        assert_eq!(
            occurrences[id],
            vec![current[id]],
            "{id}: new, in the snapshot"
        );
    }
    assert_eq!(
        applied, current,
        "applying the pages in order gives the server's state"
    );
    assert_log_is_quiet(&server, &user, &paged.cursor).await;

    // The server agrees: a fresh snapshot holds exactly that state.
    let (fresh, _) = server
        .pull_all(&user, "app", Some("other"), "notes", EPOCH, Some(5_000))
        .await;
    let fresh: BTreeMap<String, u64> = fresh
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap().to_owned(),
                e["data"]["v"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(fresh, current);

    // And the device continues with the log, without a gap.
    push_ok(
        &server,
        &user,
        vec![update(
            "notes",
            "r00",
            "v",
            json!(999),
            "2026-03-01T00:00:00.000Z",
        )],
    )
    .await;
    let reply = server
        .pull(&user, "app", Some("reader"), "notes", &paged.cursor, None)
        .await;
    assert_eq!(reply.changes().len(), 1, "{}", reply.text);
    assert_eq!(reply.changes()[0]["fields"]["v"]["value"], json!(999));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_an_older_version_wrote_get_positions_and_old_cursors_start_again() {
    let database = cluster().fresh_database();
    let server = TestServer::start_with(|c| c.database_url = Some(database.clone())).await;
    let user = "upgraded-user";
    let ids: BTreeSet<String> = (0..40).map(|i| format!("r{i:02}")).collect();
    push_ok(&server, user, ids.iter().map(|id| record(id, 0)).collect()).await;
    server.stop().await;

    // Make the database look like an older version left it: no positions, the updated_at index, and a
    // schema checksum that is not this one (so the schema runs again at the next start).
    let owner = connect(&database).await;
    owner
        .batch_execute(
            "ALTER TABLE sync_records DROP COLUMN seq;
             CREATE INDEX idx_sync_records_user_app_updated_table
                 ON sync_records (user_id, app_id, updated_at, table_name);
             DELETE FROM sync_schema_migrations;",
        )
        .await
        .unwrap();

    let server = TestServer::start_with(|c| c.database_url = Some(database.clone())).await;
    owner
        .batch_execute("BEGIN; SELECT set_config('app.current_user_id', 'upgraded-user', true);")
        .await
        .unwrap();
    let rows = owner
        .query(
            "SELECT seq FROM sync_records ORDER BY user_id, app_id, updated_at, table_name, record_id",
            &[],
        )
        .await
        .unwrap();
    let indexes: Vec<String> = owner
        .query(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'sync_records' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    owner.batch_execute("COMMIT").await.unwrap();
    let positions: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(positions.len(), 40);
    assert!(positions[0] >= 500_000_000_000_000, "{positions:?}");
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "distinct, in the order older versions paged: {positions:?}"
    );
    assert!(
        indexes.contains(&"idx_sync_records_user_app_seq_table".to_owned())
            && !indexes.contains(&"idx_sync_records_user_app_updated_table".to_owned()),
        "{indexes:?}"
    );

    // A cursor an older version handed out mid-snapshot starts the snapshot again: duplicates at most,
    // never a gap.
    let paged = page_through(
        &server,
        user,
        "notes",
        "1985-03-01T10:00:00.123456Z",
        7,
        nothing_between,
    )
    .await;
    assert!(
        paged.counts().values().all(|&n| n == 1),
        "{:?}",
        paged.counts()
    );
    assert_eq!(paged.counts().into_keys().collect::<BTreeSet<_>>(), ids);

    // New writes continue the sequence after the backfilled positions.
    push_ok(
        &server,
        user,
        vec![update(
            "notes",
            "r00",
            "v",
            json!(1),
            "2026-02-01T00:00:00.000Z",
        )],
    )
    .await;
    let paged = page_through(&server, user, "notes", EPOCH, 7, nothing_between).await;
    let last = paged.entries().last().unwrap();
    assert_eq!(
        last["id"],
        json!("r00"),
        "the changed record moved to the end"
    );
    assert_eq!(last["data"]["v"], json!(1));
    server.stop().await;
}
