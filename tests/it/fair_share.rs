//! Fair share under hostile load: one authenticated user cannot take a shared resource away from the
//! others. Each attack is scaled down through configuration (a small pool, short timeouts) and shows the
//! other users unaffected.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

/// One user fires 24 pushes of ~1 MB at once. Before, each took a pooled connection and then waited for the
/// user's advisory lock while holding it, so the pool was gone and another user's pulls got 503
/// `database_saturated` after the acquire timeout. Now a user's pushes queue in the process before they
/// take a connection, and a user holds at most `DB_MAX_PER_USER` connections: the victim is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_burst_of_pushes_leaves_the_pool_to_others() {
    let server = TestServer::start_with(|c| {
        c.db_pool_size = 4;
        c.db_max_per_user = 2;
        c.db_acquire_timeout = Duration::from_secs(2);
    })
    .await;
    let attacker = unique_user("flood");
    let victim = unique_user("victim");
    let seeded = server
        .push(
            &victim,
            "todo",
            Some("phone"),
            &changeset(vec![insert("tasks", "v1", json!({}))]),
        )
        .await;
    assert_eq!(seeded.status, 200, "{}", seeded.text);

    let big = |n: usize| -> Value {
        let changes: Vec<Value> = (0..2_000)
            .map(|i| {
                insert(
                    "tasks",
                    &format!("b{n}-{i}"),
                    json!({"text": "x".repeat(450)}),
                )
            })
            .collect();
        changeset(changes)
    };
    let flood = futures_util::future::join_all((0..24).map(|n| {
        let server = &server;
        let attacker = attacker.clone();
        let body = big(n);
        async move {
            server
                .push(&attacker, "todo", Some("bot"), &body)
                .await
                .status
        }
    }));
    let victim_pulls = async {
        wait_until(
            "the flood is at the database",
            Duration::from_secs(10),
            || async { server.shared.store.users_at_the_database() > 0 },
        )
        .await;
        let mut statuses = Vec::new();
        for _ in 0..8 {
            let reply = server
                .pull(&victim, "todo", Some("laptop"), "tasks", EPOCH, None)
                .await;
            statuses.push((
                reply.status,
                reply.text.chars().take(200).collect::<String>(),
            ));
            // Spread over the flood, not all at its start.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        statuses
    };
    let (flood, victim) = tokio::join!(flood, victim_pulls);
    for (status, text) in &victim {
        assert_eq!(*status, 200, "the victim's pull during the flood: {text}");
    }
    // The attacker's own pushes are served one after another (or told to retry: 503 at the database,
    // 429 beyond its share of large bodies in flight), never half-written.
    let done = flood.iter().filter(|s| **s == 200).count();
    assert!(
        flood.iter().all(|s| [200, 429, 503].contains(s)),
        "{flood:?}"
    );
    assert_eq!(count_rows(&attacker).await as usize, done * 2_000);
    assert_eq!(
        server.shared.store.users_at_the_database(),
        0,
        "every share was given back"
    );
    server.stop().await;
}

/// One user opens 14 pushes that declare 1 MB and then send one byte (and would keep trickling). Before,
/// each held one of the server's request slots while its body was awaited, so with 12 slots every other
/// user got 503 `overloaded`. Now one user holds at most `MAX_REQUESTS_PER_USER` slots; its other requests
/// are answered 429 + `Retry-After` at once, before their body is read, and the others are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_users_slow_bodies_hold_only_its_own_share_of_request_slots() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start_with(|c| {
        c.max_concurrent_requests = 12;
        c.max_requests_per_user = 4;
        c.body_read_timeout = Duration::from_secs(30);
    })
    .await;
    let attacker = unique_user("slow-bodies");
    let auth = format!("Bearer {}", token(&attacker));
    let mut sockets = Vec::new();
    for _ in 0..14 {
        let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let head = format!(
            "POST /sync/todo HTTP/1.1\r\nHost: t\r\nAuthorization: {auth}\r\n\
             Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{{"
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        sockets.push(socket);
    }
    // The requests beyond the user's share are answered at once.
    let mut refused = 0;
    for socket in &mut sockets {
        let mut answer = vec![0u8; 4096];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(1500), socket.read(&mut answer)).await
        {
            let text = String::from_utf8_lossy(&answer[..n]);
            assert!(text.starts_with("HTTP/1.1 429"), "{text}");
            assert!(text.contains("\"error\":\"too_many_requests\""), "{text}");
            assert!(
                text.to_ascii_lowercase().contains("retry-after: 1"),
                "{text}"
            );
            refused += 1;
        }
    }
    assert_eq!(refused, 10, "14 requests, a share of 4");
    // Everybody else is served while the four slow bodies are still open.
    let victim = unique_user("served");
    let reply = server
        .pull(&victim, "todo", Some("phone"), "tasks", LOG_START, None)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    drop(sockets);
    server.stop().await;
}

/// WebSockets and SSE streams of one user share one cap (`WS_MAX_PER_USER`): streams used to have none,
/// so one user could hold thousands. Over the cap a stream gets 429 and a socket an error then 1008;
/// another user still connects, and a slot comes back when a connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_and_streams_of_one_user_share_one_cap() {
    let server = TestServer::start_with(|c| c.ws_max_per_user = 3).await;
    let user = unique_user("many-conns");
    let auth = format!("Bearer {}", token(&user));
    let _socket = server.authed_socket("/ws", &user, Some("a")).await;
    let stream_url = server.url("/sync/todo/stream");
    let first = SseClient::open(&stream_url, &[("authorization", &auth)]).await;
    let second = SseClient::open(&stream_url, &[("authorization", &auth)]).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(second.status, 200, "{}", second.text());

    let refused = server
        .request(
            "GET",
            "/sync/todo/stream",
            &[("authorization", &auth)],
            None,
        )
        .await;
    refused.assert_error(429, "too_many_connections");
    let mut socket = server.socket("/ws").await;
    send_json(&mut socket, &json!({"type": "auth", "token": token(&user)})).await;
    assert!(matches!(
        next_frame(&mut socket, Duration::from_secs(10)).await,
        Received::Json(_)
    ));
    assert!(matches!(
        next_frame(&mut socket, Duration::from_secs(10)).await,
        Received::Closed { code: 1008, .. }
    ));

    // Other users are not affected.
    let other = unique_user("other-conns");
    let _theirs = server.authed_socket("/ws", &other, None).await;
    let theirs = SseClient::open(
        &stream_url,
        &[("authorization", &format!("Bearer {}", token(&other)))],
    )
    .await;
    assert_eq!(theirs.status, 200, "{}", theirs.text());
    server.stop().await;
}

/// Sockets that never authenticate have a small global cap of their own (they cost a socket and a task
/// for up to the auth deadline before anyone knows whose they are); past it an upgrade gets 503 +
/// `Retry-After`, and a slot comes back as soon as a socket authenticates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_sockets_have_their_own_small_cap() {
    let server = TestServer::start_with(|c| c.ws_max_unauthenticated = 2).await;
    let mut first = server.socket("/ws").await;
    let _second = server.socket("/ws").await;
    let upgrade = || {
        raw_request(
            server.addr,
            "GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="
                .to_owned(),
            Vec::new(),
        )
    };
    let refused = upgrade().await;
    refused.assert_error(503, "too_many_unauthenticated_sockets");
    assert_eq!(refused.header("retry-after"), Some("1"));
    // Authenticating gives the slot back.
    let user = unique_user("authenticates");
    send_json(&mut first, &json!({"type": "auth", "token": token(&user)})).await;
    assert_eq!(
        next_frame(&mut first, Duration::from_secs(10)).await,
        Received::Json(json!({"type": "auth-ok"}))
    );
    let _third = server
        .authed_socket("/ws", &unique_user("third"), None)
        .await;
    server.stop().await;
}

/// An upgraded WebSocket keeps its connection's place under `MAX_CONNECTIONS` (before, the upgrade gave
/// the slot back, so 3 × 7,000 sockets took the process to 17,581 open files with a cap of 10,000 and
/// `/health` reported one connection): with a cap of 3 and three open sockets, a fourth connection waits
/// in the backlog until one closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_sockets_keep_counting_against_the_connection_cap() {
    let server = TestServer::start_with(|c| c.max_connections = 3).await;
    let mut sockets = Vec::new();
    for i in 0..3 {
        sockets.push(
            server
                .authed_socket("/ws", &unique_user(&format!("conn-{i}")), None)
                .await,
        );
    }
    assert_eq!(server.shared.open_connections(), 3);
    let url = server.url("/health");
    let waiting = tokio::spawn(async move { request("GET", &url, &[], None).await });
    // Not served for a while: nothing to wait for, only time that must pass without an answer.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a fourth connection is not served while three sockets are open"
    );
    drop(sockets.pop());
    let health = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("served once a socket closed")
        .unwrap();
    assert_eq!(health.status, 200, "{}", health.text);
    server.stop().await;
}

/// A push naming more tables than a hint may carry (scaled down from 100,000) reaches another device's
/// socket as one `sync-available` for the app — listing the app's tables as the database knows them, not a
/// per-socket copy of the push's list — and a stream still delivers every change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_naming_many_tables_is_one_app_changed_hint() {
    let server = TestServer::start().await;
    let user = unique_user("many-tables");
    let mut socket = server.authed_socket("/ws", &user, Some("phone")).await;
    let auth = format!("Bearer {}", token(&user));
    let mut stream = SseClient::open(
        &server.url("/sync/todo/stream"),
        &[("authorization", &auth)],
    )
    .await;
    let count = mana_sync::realtime::MAX_HINT_TABLES + 44;
    let changes: Vec<Value> = (0..count)
        .map(|i| insert(&format!("t{i}"), "r", json!({"n": i})))
        .collect();
    let reply = server
        .push(&user, "todo", Some("laptop"), &changeset(changes))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    match next_frame(&mut socket, Duration::from_secs(10)).await {
        Received::Json(message) => {
            assert_eq!(message["type"], json!("sync-available"));
            assert_eq!(message["appId"], json!("todo"));
            assert_eq!(message["tables"].as_array().map(Vec::len), Some(count));
        }
        other => panic!("{other:?}"),
    }
    let mut delivered = 0;
    while delivered < count {
        let event = stream
            .next_change(Duration::from_secs(10))
            .await
            .expect("the stream delivers every change");
        delivered += event.data["changes"].as_array().map_or(0, Vec::len);
    }
    assert_eq!(delivered, count);
    server.stop().await;
}

/// PostgreSQL stops answering (every process of the cluster SIGSTOPped) while the server has connections
/// open to it: requests already at the database used to hang for as long as it did. Now a request gets
/// 503 + `Retry-After` once `DB_STATEMENT_TIMEOUT_MS` (+1 s) passed, its connection is closed rather than
/// reused, and the server recovers when the database answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_database_gives_503_after_the_deadline_and_the_server_recovers() {
    use mana_sync::devdb::{EmbeddedOptions, EmbeddedPostgres};
    let dir = std::path::PathBuf::from(format!("/tmp/msfrz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = EmbeddedOptions {
        durable: false,
        ..EmbeddedOptions::from_process_env(&dir)
    };
    let embedded = EmbeddedPostgres::start(options)
        .await
        .expect("private cluster starts");
    let url = embedded.connection_string();
    let server = TestServer::start_with(move |config| {
        config.database_url = Some(url);
        config.db_statement_timeout = Some(Duration::from_secs(1));
        config.db_acquire_timeout = Duration::from_secs(1);
    })
    .await;
    let user = unique_user("frozen");
    let first = changeset(vec![insert("tasks", "t1", json!({}))]);
    let reply = server.push(&user, "todo", Some("dev"), &first).await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    // Every process of the cluster: the postmaster (first line of postmaster.pid) and its children.
    let postmaster: u32 = std::fs::read_to_string(dir.join("pgdata/postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut pids = vec![postmaster];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let after_name = stat.rsplit(')').next().unwrap_or("");
        let ppid = after_name
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(postmaster) {
            pids.push(entry.file_name().to_string_lossy().parse().unwrap());
        }
    }
    let signal = |name: &str| {
        for pid in &pids {
            let _ = std::process::Command::new("kill")
                .args([name, &pid.to_string()])
                .status();
        }
    };
    signal("-STOP");
    let second = changeset(vec![insert("tasks", "t2", json!({}))]);
    let answered = tokio::time::timeout(
        Duration::from_secs(30),
        server.push(&user, "todo", Some("dev"), &second),
    )
    .await;
    let snapshot = tokio::time::timeout(
        Duration::from_secs(30),
        server.pull(&user, "todo", Some("other"), "tasks", EPOCH, None),
    )
    .await;
    signal("-CONT");
    let reply = answered.expect("answered while the database was frozen");
    reply.assert_error(503, "database_unavailable");
    assert_eq!(reply.header("retry-after"), Some("1"));
    let reply = snapshot.expect("answered while the database was frozen");
    assert_eq!(reply.status, 503, "{}", reply.text);

    // Recovery: the database answers again, and so does the server.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let reply = loop {
        let reply = server.push(&user, "todo", Some("dev"), &second).await;
        if reply.status == 200 || std::time::Instant::now() > deadline {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(reply.status, 200, "{}", reply.text);
    let (changes, _) = server
        .pull_all(&user, "todo", Some("other"), "tasks", EPOCH, None)
        .await;
    assert_eq!(changes.len(), 2, "{changes:?}");
    server.stop().await;
    embedded.stop().await.expect("cluster stops");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A field stamped in the year 9999 used to win against every later edit forever. Now a time further
/// ahead than `MAX_FUTURE_SKEW_SECS` (1 s here) past its arrival is ordered at that bound — its string is
/// kept and emitted — so an edit made after the bound wins, and /metrics counts the far-future change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_far_in_the_future_cannot_pin_a_field_forever() {
    let server = TestServer::start_with(|c| c.max_future_skew = Duration::from_secs(1)).await;
    let user = unique_user("year-9999");
    let edit = |value: &str, at: &str| {
        json!({"table": "tasks", "id": "t1", "op": "update",
               "fields": {"title": {"value": value, "at": at}}})
    };
    let reply = server
        .push(
            &user,
            "todo",
            Some("a"),
            &changeset(vec![edit("pinned", "9999-12-31T23:59:59.999Z")]),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let (changes, _) = server
        .pull_all(&user, "todo", Some("b"), "tasks", EPOCH, None)
        .await;
    assert_eq!(
        changes[0]["fields"]["title"]["at"],
        json!("9999-12-31T23:59:59.999Z"),
        "the original string is kept"
    );
    // Past the 1 s bound: a time stamped now is later than where the far-future one is ordered.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let now = mana_sync::protocol::time::format_millis(mana_sync::clock::now_micros());
    let reply = server
        .push(
            &user,
            "todo",
            Some("b"),
            &changeset(vec![edit("edited", &now)]),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.body["conflicts"], json!([]), "the later edit wins");
    let (changes, _) = server
        .pull_all(&user, "todo", Some("c"), "tasks", EPOCH, None)
        .await;
    assert_eq!(changes[0]["data"]["title"], json!("edited"));
    let metrics = server.request("GET", "/metrics", &[], None).await.text;
    assert!(
        metrics.contains("mana_sync_changes_beyond_future_skew_total 1"),
        "{metrics}"
    );
    server.stop().await;
}

/// Pages are bounded by bytes as well as rows: a user's 12 records of ~300 KB each, pulled with the row
/// limit at 1,000 and `PAGE_MAX_BYTES` at 1 MB, come back a few per page (at least one), with `hasMore`
/// and the cursor working as for a full page: every record exactly once. A push's response page too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_bounded_by_bytes_as_well_as_rows() {
    let server = TestServer::start_with(|c| c.page_max_bytes = 1024 * 1024).await;
    let user = unique_user("big-rows");
    // Hard to compress (PostgreSQL stores large values compressed; the budget counts stored bytes).
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut noise = |n: usize| -> String {
        (0..n)
            .map(|_| char::from(b'!' + rng.below(90) as u8))
            .collect()
    };
    for i in 0..12 {
        let big = insert(
            "tasks",
            &format!("big-{i}"),
            json!({"blob": noise(300_000)}),
        );
        let reply = server
            .push(&user, "todo", Some("writer"), &changeset(vec![big]))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text);
    }
    let mut cursor = LOG_START.to_owned();
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let reply = server
            .pull(&user, "todo", Some("reader"), "tasks", &cursor, Some(1000))
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        let changes = reply.changes();
        assert!(
            !changes.is_empty() || seen.len() == 12,
            "a page holds at least one row"
        );
        assert!(
            changes.len() <= 6,
            "{} rows of ~300 KB in one page",
            changes.len()
        );
        assert!(
            reply.text.len() < 3 * 1024 * 1024,
            "{} bytes",
            reply.text.len()
        );
        seen.extend(changes.iter().map(|c| c["id"].as_str().unwrap().to_owned()));
        pages += 1;
        cursor = reply.body["syncedUntil"].as_str().unwrap().to_owned();
        if reply.body["hasMore"] != json!(true) {
            break;
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(
        (seen.len(), sorted.len()),
        (12, 12),
        "each record exactly once: {seen:?}"
    );
    assert!(pages >= 3, "{pages} pages");
    // Snapshot pages too (a device bootstrapping from the epoch), each record exactly once.
    let mut cursor = EPOCH.to_owned();
    let mut snapshot = Vec::new();
    let mut pages = 0;
    loop {
        let reply = server
            .pull(
                &user,
                "todo",
                Some("new-device"),
                "tasks",
                &cursor,
                Some(1000),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        let changes = reply.changes();
        assert!(
            (1..=6).contains(&changes.len()) || (changes.is_empty() && snapshot.len() == 12),
            "{} records of ~300 KB in one snapshot page",
            changes.len()
        );
        assert!(
            reply.text.len() < 3 * 1024 * 1024,
            "{} bytes",
            reply.text.len()
        );
        snapshot.extend(changes.iter().map(|c| c["id"].as_str().unwrap().to_owned()));
        pages += 1;
        cursor = reply.body["syncedUntil"].as_str().unwrap().to_owned();
        if reply.body["hasMore"] != json!(true) {
            break;
        }
    }
    let mut sorted = snapshot.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!((snapshot.len(), sorted.len()), (12, 12), "{snapshot:?}");
    assert!(pages >= 3, "{pages} snapshot pages");
    assert!(
        cursor.as_str() > "2000",
        "the snapshot ends with a log cursor: {cursor}"
    );
    // A push's response page is bounded the same way.
    let reply = server
        .push(
            &user,
            "todo",
            Some("reader"),
            &json!({"since": LOG_START, "changes": [insert("tasks", "small", json!({}))]}),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.body["hasMore"], json!(true));
    let returned = reply.body["serverChanges"].as_array().unwrap().len();
    assert!((1..=6).contains(&returned), "{returned}");
    server.stop().await;
}

/// Large bodies in flight are bounded (issue 11 §4): a push holds many times its body in memory until it
/// is answered, so one user may have at most its share of large bodies in flight (429 beyond), and all
/// users together at most `MAX_INFLIGHT_BODY_BYTES` (503 beyond). Small pushes are never counted: another
/// user's everyday push goes through while the budget is full, and a slot comes back when a body ends.
/// Refused bodies are drained first, so a client that writes its whole body before reading gets the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_in_flight_are_bounded_per_user_and_in_all() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start_with(|c| {
        c.max_body_bytes = 200_000;
        c.max_inflight_body_bytes = 400_000; // a user's share: 200,000
        c.body_read_timeout = Duration::from_secs(30);
    })
    .await;
    let head = |user: &str, length: usize| {
        format!(
            "POST /sync/todo HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\nX-Client-Id: d",
            token(user)
        )
    };
    // A valid push body of exactly `length` bytes (padding in a string field).
    let body = |length: usize| {
        let frame = |pad: usize| {
            format!(
                r#"{{"since":"{LOG_START}","changes":[{{"table":"tasks","id":"big","op":"insert","data":{{"pad":"{}"}}}}]}}"#,
                "x".repeat(pad)
            )
        };
        let overhead = frame(0).len();
        frame(length - overhead).into_bytes()
    };
    // Slow pushes: the head and one byte, then nothing for now.
    let slow = |user: String, length: usize| {
        let addr = server.addr;
        let head = head(&user, length);
        async move {
            let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
            socket
                .write_all(format!("{head}\r\n\r\n{{").as_bytes())
                .await
                .unwrap();
            socket
        }
    };
    let attacker = unique_user("big-bodies");
    let _held_a = slow(attacker.clone(), 150_000).await;
    wait_until(
        "the first large body is counted",
        Duration::from_secs(10),
        || async { server.shared.body_budget.used() > 0 },
    )
    .await;
    let counted_a = server.shared.body_budget.used();

    // The attacker's second large body is over its share.
    let second = raw_request(server.addr, head(&attacker, 150_000), body(150_000)).await;
    second.assert_error(429, "too_many_requests");
    assert_eq!(second.header("retry-after"), Some("1"));

    // Another user's large body fits the server's budget; a third one does not.
    let _held_b = slow(unique_user("big-b"), 150_000).await;
    wait_until(
        "the second user's large body is counted",
        Duration::from_secs(10),
        || async { server.shared.body_budget.used() > counted_a },
    )
    .await;
    let third_user = unique_user("big-c");
    let third = raw_request(server.addr, head(&third_user, 150_000), body(150_000)).await;
    third.assert_error(503, "overloaded");
    assert_eq!(third.header("retry-after"), Some("1"));
    assert_eq!(
        count_rows(&third_user).await,
        0,
        "nothing of it was written"
    );

    // Everyday pushes are not counted: served while the budget is full.
    let victim = unique_user("small-push");
    let small = server
        .push(
            &victim,
            "todo",
            Some("phone"),
            &changeset(vec![insert("tasks", "t", json!({"title": "still served"}))]),
        )
        .await;
    assert_eq!(small.status, 200, "{}", small.text);
    let metrics = server.request("GET", "/metrics", &[], None).await.text;
    assert!(
        metrics.contains("mana_sync_inflight_body_bytes 300000"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mana_sync_body_budget_refusals_total{scope=\"user\"} 1")
            && metrics.contains("mana_sync_body_budget_refusals_total{scope=\"server\"} 1"),
        "{metrics}"
    );

    // The slow bodies end (their clients go away): the budget comes back, and a large push is served.
    drop(_held_a);
    drop(_held_b);
    wait_until(
        "the reservations of abandoned bodies are given back",
        Duration::from_secs(5),
        || async {
            let metrics = server.request("GET", "/metrics", &[], None).await.text;
            metrics.contains("mana_sync_inflight_body_bytes 0")
        },
    )
    .await;
    let served = raw_request(server.addr, head(&third_user, 150_000), body(150_000)).await;
    assert_eq!(served.status, 200, "{}", served.text);
    assert_eq!(count_rows(&third_user).await, 1);
    server.stop().await;
}
