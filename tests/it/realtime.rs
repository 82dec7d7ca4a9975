//! Real time (SPEC §7): WebSockets and Server-Sent Events against the real server and PostgreSQL.

use std::time::Duration;

use mana_sync::auth::devkeys;
use serde_json::{json, Value};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(10);

fn sync_available(app: &str, tables: &[&str]) -> Received {
    Received::Json(json!({"type": "sync-available", "appId": app, "tables": tables}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unified_and_legacy_sockets_hear_about_other_devices_pushes() {
    let server = TestServer::start().await;
    let user = unique_user("ws");
    let mut unified = server.authed_socket("/ws", &user, Some("phone")).await;
    let mut legacy = server
        .authed_socket("/ws/todo", &user, Some("tablet"))
        .await;
    // Right after auth-ok a legacy socket is nudged once for its app (no tables yet).
    assert_eq!(
        next_frame(&mut legacy, WAIT).await,
        sync_available("todo", &[])
    );

    let push = changeset(vec![
        insert("tasks", "t1", json!({})),
        insert("lists", "l1", json!({})),
    ]);
    server
        .push(&user, "todo", Some("laptop"), &push)
        .await
        .assert_status(200);
    assert_eq!(
        next_frame(&mut unified, WAIT).await,
        sync_available("todo", &["lists", "tasks"])
    );
    assert_eq!(
        next_frame(&mut legacy, WAIT).await,
        sync_available("todo", &["lists", "tasks"])
    );

    // Another app: the unified socket hears it (with its appId), the legacy todo socket does not.
    let push = changeset(vec![insert("events", "e1", json!({}))]);
    server
        .push(&user, "calendar", Some("laptop"), &push)
        .await
        .assert_status(200);
    assert_eq!(
        next_frame(&mut unified, WAIT).await,
        sync_available("calendar", &["events"])
    );
    send_json(&mut legacy, &json!({"type": "ping"})).await;
    assert_eq!(
        next_frame(&mut legacy, WAIT).await,
        Received::Json(json!({"type": "pong"})),
        "the calendar change never reached the legacy todo socket"
    );

    // The device that pushed is not told about its own change; others of other users hear nothing.
    let mut other_user = server
        .authed_socket("/ws", &unique_user("ws-other"), None)
        .await;
    let push = changeset(vec![insert("tasks", "t2", json!({}))]);
    server
        .push(&user, "todo", Some("phone"), &push)
        .await
        .assert_status(200);
    assert_eq!(
        next_frame(&mut legacy, WAIT).await,
        sync_available("todo", &["tasks"])
    );
    assert_eq!(
        next_frame(&mut unified, Duration::from_millis(500)).await,
        Received::Nothing
    );
    assert_eq!(
        next_frame(&mut other_user, Duration::from_millis(200)).await,
        Received::Nothing
    );

    // A legacy socket reconnecting later is nudged with the app's tables.
    let mut again = server.authed_socket("/ws/todo", &user, None).await;
    assert_eq!(
        next_frame(&mut again, WAIT).await,
        sync_available("todo", &["lists", "tasks"])
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_auth_gets_an_error_then_1008() {
    let server = TestServer::start().await;
    let cases: Vec<(Value, &str)> = vec![
        (
            json!({"type": "auth", "token": "not.a.token"}),
            "authentication failed",
        ),
        (
            json!({"type": "auth", "token": token_with(&json!({"sub": "x", "exp": 1, "aud": "mana"}))}),
            "expired",
        ),
        (json!({"type": "ping"}), "authenticate first"),
        (json!({"type": "hello"}), "authenticate first"),
    ];
    for (message, needle) in cases {
        let mut socket = server.socket("/ws").await;
        send_json(&mut socket, &message).await;
        match next_frame(&mut socket, WAIT).await {
            Received::Json(error) => {
                assert_eq!(error["type"], json!("error"), "{error}");
                assert!(
                    error["message"].as_str().unwrap().contains(needle),
                    "{error} should mention {needle}"
                );
            }
            other => panic!("expected an error message, got {other:?}"),
        }
        assert!(matches!(
            next_frame(&mut socket, WAIT).await,
            Received::Closed { code: 1008, .. }
        ));
    }
    // Garbage and binary frames before auth.
    let mut socket = server.socket("/ws").await;
    {
        use futures_util::SinkExt;
        socket
            .send(tokio_tungstenite::tungstenite::Message::binary(vec![
                1, 2, 3,
            ]))
            .await
            .unwrap();
    }
    assert!(matches!(
        next_frame(&mut socket, WAIT).await,
        Received::Json(_)
    ));
    assert!(matches!(
        next_frame(&mut socket, WAIT).await,
        Received::Closed { code: 1003, .. }
    ));
    server.stop().await;
}

fn token_with(claims: &Value) -> String {
    let keys = keys();
    devkeys::sign_raw(
        &json!({"alg": "EdDSA", "kid": keys.kid, "typ": "JWT"}).to_string(),
        &claims.to_string(),
        &keys.key,
    )
}

/// The default deadline (10 s) is checked in paused time by `realtime::ws`'s unit tests; this one closes a
/// real socket at a short configured deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_socket_is_closed_at_the_auth_deadline() {
    let server = TestServer::start_with(|c| c.ws_auth_timeout = Duration::from_millis(300)).await;
    // Measured from before the upgrade: the server's deadline starts when it accepts the socket.
    let started = std::time::Instant::now();
    let mut socket = server.socket("/ws").await;
    assert!(
        matches!(next_frame(&mut socket, WAIT).await, Received::Json(_)),
        "an error message first"
    );
    assert!(matches!(
        next_frame(&mut socket, WAIT).await,
        Received::Closed { code: 1008, .. }
    ));
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "not before the deadline"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_and_a_message_flood_close_the_socket() {
    let server = TestServer::start().await;
    let user = unique_user("ws-big");
    let mut socket = server.authed_socket("/ws", &user, None).await;
    send_json(
        &mut socket,
        &json!({"type": "ping", "pad": "x".repeat(64 * 1024)}),
    )
    .await;
    match next_frame(&mut socket, WAIT).await {
        Received::Closed { code, .. } => assert_eq!(code, 1009),
        Received::Json(error) => {
            assert_eq!(error["type"], json!("error"));
            assert!(matches!(
                next_frame(&mut socket, WAIT).await,
                Received::Closed { code: 1009, .. }
            ));
        }
        Received::Ended => {} // the library may drop the connection outright
        Received::Nothing => panic!("an oversized frame must end the socket"),
    }

    let mut socket = server.authed_socket("/ws", &user, None).await;
    for _ in 0..200 {
        send_json(&mut socket, &json!({"type": "ping"})).await;
    }
    let mut closed = None;
    for _ in 0..250 {
        match next_frame(&mut socket, WAIT).await {
            Received::Json(_) => continue,
            other => {
                closed = Some(other);
                break;
            }
        }
    }
    assert!(
        matches!(closed, Some(Received::Closed { code: 1008, .. })),
        "{closed:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_closes_at_token_expiry_unless_it_re_authenticates() {
    let server = TestServer::start_with(|c| c.ws_token_leeway = Duration::ZERO).await;
    let user = unique_user("ws-exp");
    let short = |seconds: i64| {
        token_with(
            &json!({"sub": user, "aud": "mana", "exp": mana_sync::clock::unix_now() + seconds}),
        )
    };

    // Not refreshed: closed with 4001 once the token expires.
    let mut socket = server.socket("/ws").await;
    send_json(&mut socket, &json!({"type": "auth", "token": short(2)})).await;
    assert_eq!(
        next_frame(&mut socket, WAIT).await,
        Received::Json(json!({"type": "auth-ok"}))
    );
    assert!(matches!(
        next_frame(&mut socket, WAIT).await,
        Received::Closed { code: 4001, .. }
    ));

    // Refreshed in-band: outlives the first token.
    let mut socket = server.socket("/ws").await;
    send_json(&mut socket, &json!({"type": "auth", "token": short(2)})).await;
    assert_eq!(
        next_frame(&mut socket, WAIT).await,
        Received::Json(json!({"type": "auth-ok"}))
    );
    send_json(&mut socket, &json!({"type": "auth", "token": short(600)})).await;
    assert_eq!(
        next_frame(&mut socket, WAIT).await,
        Received::Json(json!({"type": "auth-ok"}))
    );
    // Past the first token's expiry (2 s).
    tokio::time::sleep(Duration::from_secs(4)).await;
    send_json(&mut socket, &json!({"type": "ping"})).await;
    assert_eq!(
        next_frame(&mut socket, WAIT).await,
        Received::Json(json!({"type": "pong"}))
    );

    // Re-authenticating as somebody else is refused.
    send_json(
        &mut socket,
        &json!({"type": "auth", "token": token(&unique_user("intruder"))}),
    )
    .await;
    assert!(matches!(
        next_frame(&mut socket, WAIT).await,
        Received::Json(_)
    ));
    assert!(matches!(
        next_frame(&mut socket, WAIT).await,
        Received::Closed { code: 1008, .. }
    ));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_while_other_users_keep_receiving() {
    let server = TestServer::start_with(|c| c.write_timeout = Duration::from_millis(500)).await;
    let slow_user = unique_user("slow");
    let fast_user = unique_user("fast");

    // A client with a tiny receive window that authenticates and then never reads again.
    let stream = {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(server.addr).await.unwrap()
    };
    let (mut slow, _) = tokio_tungstenite::client_async(
        format!("ws://{}/ws", server.addr),
        tokio_tungstenite::MaybeTlsStream::Plain(stream),
    )
    .await
    .unwrap();
    send_json(
        &mut slow,
        &json!({"type": "auth", "token": token(&slow_user)}),
    )
    .await;
    assert_eq!(
        next_frame(&mut slow, WAIT).await,
        Received::Json(json!({"type": "auth-ok"}))
    );
    let mut fast = server.authed_socket("/ws", &fast_user, None).await;

    // Every push names many long tables, so each notification is large and the buffers fill quickly.
    let wide: Vec<Value> = (0..1000)
        .map(|i| insert(&format!("{:0>60}", i), "r", json!({})))
        .collect();
    let before = server
        .shared
        .hub
        .stats
        .slow_consumers_closed
        .load(std::sync::atomic::Ordering::Relaxed);
    let mut closed = false;
    for round in 0..300 {
        server
            .push(
                &slow_user,
                &format!("app{}", round % 80),
                None,
                &changeset(wide.clone()),
            )
            .await
            .assert_status(200);
        if server
            .shared
            .hub
            .stats
            .slow_consumers_closed
            .load(std::sync::atomic::Ordering::Relaxed)
            > before
        {
            closed = true;
            break;
        }
    }
    assert!(closed, "the slow consumer was closed");
    // The server dropped it: its registration is gone.
    wait_until(
        "only the fast user's socket remains",
        Duration::from_secs(5),
        || async { server.shared.hub.counts(None) == (1, 1) },
    )
    .await;

    server
        .push(
            &fast_user,
            "todo",
            Some("x"),
            &changeset(vec![insert("tasks", "t", json!({}))]),
        )
        .await
        .assert_status(200);
    assert_eq!(
        next_frame(&mut fast, WAIT).await,
        sync_available("todo", &["tasks"])
    );
    drop(slow);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_on_one_instance_reaches_a_socket_on_another() {
    let a = TestServer::start().await;
    let b = TestServer::start().await;
    assert_ne!(a.shared.instance_id, b.shared.instance_id);
    let user = unique_user("fanout");
    let mut on_b = b.authed_socket("/ws", &user, Some("phone")).await;
    // B's listener starts with the server: the hint reaches B only once its LISTEN is in effect.
    wait_for_listener(&b).await;
    a.push(
        &user,
        "todo",
        Some("laptop"),
        &changeset(vec![insert("tasks", "t", json!({}))]),
    )
    .await
    .assert_status(200);
    assert_eq!(
        next_frame(&mut on_b, WAIT).await,
        sync_available("todo", &["tasks"])
    );

    // The originating device is not notified on the other instance either.
    a.push(
        &user,
        "todo",
        Some("phone"),
        &changeset(vec![insert("tasks", "u", json!({}))]),
    )
    .await
    .assert_status(200);
    assert_eq!(
        next_frame(&mut on_b, Duration::from_millis(500)).await,
        Received::Nothing
    );

    // A direct writer's row reaches sockets through the schema's trigger.
    let writer = app_role().await;
    writer.batch_execute("BEGIN").await.unwrap();
    writer
        .execute(
            "SELECT set_config('app.current_user_id', $1, true)",
            &[&user],
        )
        .await
        .unwrap();
    writer
        .execute(
            "INSERT INTO sync_changes (app_id, table_name, record_id, user_id, op, data, client_id, origin) \
             VALUES ('todo', 'notes', 'n', $1, 'update', '{}', 'mcp-server', 'agent')",
            &[&user],
        )
        .await
        .unwrap();
    writer.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        next_frame(&mut on_b, WAIT).await,
        sync_available("todo", &["notes"])
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_postgresql_makes_an_instance_nudge_its_clients() {
    use mana_sync::devdb::{EmbeddedOptions, EmbeddedPostgres};
    let dir = std::path::PathBuf::from(format!("/tmp/msnudge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = || EmbeddedOptions {
        durable: false,
        ..EmbeddedOptions::from_process_env(&dir)
    };
    let cluster = EmbeddedPostgres::start(options()).await.unwrap();
    let url = cluster.connection_string();
    let server = TestServer::start_with(|c| {
        c.database_url = Some(url.clone());
        c.db_acquire_timeout = Duration::from_secs(1);
    })
    .await;
    let user = unique_user("nudge");
    server
        .push(
            &user,
            "todo",
            Some("a"),
            &changeset(vec![insert("tasks", "t", json!({}))]),
        )
        .await
        .assert_status(200);
    let mut unified = server.authed_socket("/ws", &user, None).await;
    let mut legacy = server.authed_socket("/ws/todo", &user, None).await;
    assert_eq!(
        next_frame(&mut legacy, WAIT).await,
        sync_available("todo", &["tasks"])
    );

    cluster.stop().await.unwrap();
    let cluster = EmbeddedPostgres::start(options()).await.unwrap();
    // Once its listener is back, the instance tells every connection to pull (hints may have been lost).
    assert_eq!(
        next_frame(&mut unified, Duration::from_secs(30)).await,
        sync_available("todo", &["tasks"])
    );
    assert_eq!(
        next_frame(&mut legacy, Duration::from_secs(30)).await,
        sync_available("todo", &["tasks"])
    );
    server.stop().await;
    cluster.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_sockets_with_going_away() {
    let server = TestServer::start().await;
    let mut socket = server.authed_socket("/ws", &unique_user("bye"), None).await;
    let stopping = tokio::spawn(server.stop());
    assert!(matches!(
        next_frame(&mut socket, WAIT).await,
        Received::Closed { code: 1001, .. }
    ));
    stopping.await.unwrap();
}

fn bearer(user: &str) -> String {
    format!("Bearer {}", token(user))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_stream_delivers_a_backlog_of_2500_complete_and_in_order_then_live_changes() {
    let server = TestServer::start().await;
    let user = unique_user("sse");
    let changes: Vec<Value> = (0..2500)
        .map(|i| insert("tasks", &format!("t{i:04}"), json!({"n": i})))
        .collect();
    server
        .push(&user, "todo", Some("laptop"), &changeset(changes))
        .await
        .assert_status(200);
    server
        .push(
            &user,
            "todo",
            Some("laptop"),
            &changeset(vec![insert("other", "o", json!({}))]),
        )
        .await
        .assert_status(200);

    let auth = bearer(&user);
    let mut stream = SseClient::open(
        &server.url("/sync/todo/stream?collections=tasks"),
        &[("authorization", &auth), ("x-client-id", "phone")],
    )
    .await;
    assert_eq!(stream.status, 200, "{}", stream.text());
    let mut ids = Vec::new();
    while !ids.iter().any(|id| id == "t2499") {
        let event = stream.next_change(WAIT).await.expect("backlog event");
        assert_eq!(event.event, "changes");
        assert_eq!(
            event.data["table"],
            json!("tasks"),
            "only the listed collection"
        );
        assert!(event.id.is_none(), "per-app events carry no id");
        ids.extend(
            event.data["changes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_str().unwrap().to_owned()),
        );
    }
    // From the epoch a stream starts with the snapshot: one entry per record, in the order the records were
    // last written; a page boundary may repeat a record (duplicates are allowed, gaps are not).
    let mut first_seen = Vec::new();
    for id in &ids {
        if first_seen.last() != Some(id) && !first_seen.contains(id) {
            first_seen.push(id.clone());
        }
    }
    let expected: Vec<String> = (0..2500).map(|i| format!("t{i:04}")).collect();
    assert!(
        first_seen == expected,
        "complete and in order ({} entries, {} distinct)",
        ids.len(),
        first_seen.len()
    );
    assert!(ids.len() <= 2500 + 2 * 3, "{} entries", ids.len());

    // Live: another device pushes; the stream delivers it.
    server
        .push(
            &user,
            "todo",
            Some("laptop"),
            &changeset(vec![insert("tasks", "live", json!({}))]),
        )
        .await
        .assert_status(200);
    let event = stream.next_change(WAIT).await.expect("live event");
    assert_eq!(event.data["changes"][0]["id"], json!("live"));
    assert_eq!(event.data["hasMore"], json!(false));
    assert!(event.data["syncedUntil"].as_str().unwrap().ends_with('Z'));
    // The stream's own device is not echoed.
    server
        .push(
            &user,
            "todo",
            Some("phone"),
            &changeset(vec![insert("tasks", "own", json!({}))]),
        )
        .await
        .assert_status(200);
    assert!(stream
        .next_change(Duration::from_millis(500))
        .await
        .is_none());
    // Exact line format: event line, data line, blank line, LF only.
    let raw = stream.raw.lock().unwrap().clone();
    assert!(
        raw.contains("event: changes\ndata: {\""),
        "{}",
        &raw[..200.min(raw.len())]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unified_stream_covers_many_apps_and_resumes_from_last_event_id_without_gaps() {
    let server = TestServer::start_with(|c| c.sse_heartbeat = Duration::from_millis(200)).await;
    let user = unique_user("unified");
    for (app, n) in [("todo", 30), ("calendar", 20), ("notes", 10)] {
        let changes = (0..n)
            .map(|i| insert("items", &format!("{app}-{i}"), json!({})))
            .collect();
        server
            .push(&user, app, Some("laptop"), &changeset(changes))
            .await
            .assert_status(200);
    }
    let auth = bearer(&user);
    let url = server.url("/sync/stream?apps=todo,calendar");
    let mut stream = SseClient::open(&url, &[("authorization", &auth)]).await;
    assert_eq!(stream.status, 200, "{}", stream.text());
    let mut seen = std::collections::BTreeSet::new();
    let mut last_id = None;
    while seen.len() < 50 {
        let event = stream.next_change(WAIT).await.expect("event");
        let app = event.data["appId"]
            .as_str()
            .expect("appId on unified events")
            .to_owned();
        assert!(app == "todo" || app == "calendar", "notes is not listed");
        last_id = Some(event.id.expect("unified events carry an id"));
        for change in event.data["changes"].as_array().unwrap() {
            seen.insert(change["id"].as_str().unwrap().to_owned());
        }
    }
    // Heartbeats arrive while idle.
    let heartbeat = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(event) = stream.events.recv().await {
                if event.event == "heartbeat" {
                    return event;
                }
            }
        }
    })
    .await
    .expect("a heartbeat");
    assert!(heartbeat.id.is_none());
    drop(stream);

    // Changes made while disconnected arrive after resuming from the last id, and nothing before is lost.
    server
        .push(
            &user,
            "calendar",
            Some("laptop"),
            &changeset(vec![insert("items", "while-away", json!({}))]),
        )
        .await
        .assert_status(200);
    let last_id = last_id.unwrap();
    let mut resumed = SseClient::open(
        &url,
        &[("authorization", &auth), ("last-event-id", &last_id)],
    )
    .await;
    let mut after = std::collections::BTreeSet::new();
    while !after.contains("while-away") {
        let event = resumed.next_change(WAIT).await.expect("resumed event");
        for change in event.data["changes"].as_array().unwrap() {
            after.insert(change["id"].as_str().unwrap().to_owned());
        }
    }
    // A bad Last-Event-ID is a clear 400.
    let reply = server
        .request(
            "GET",
            "/sync/stream?apps=todo",
            &[("authorization", &auth), ("last-event-id", "yesterday")],
            None,
        )
        .await;
    reply.assert_error(400, "invalid_last_event_id");
    server.stop().await;
}

/// A stream cannot re-authenticate, so it ends when its token expires (plus the leeway), with a last
/// `token-expired` event, instead of delivering changes for as long as the client keeps it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_at_token_expiry_with_an_event_that_says_why() {
    let server = TestServer::start_with(|c| c.ws_token_leeway = Duration::ZERO).await;
    let user = unique_user("sse-exp");
    for path in ["/sync/todo/stream", "/sync/stream?apps=todo"] {
        let started = std::time::Instant::now();
        let short = token_with(
            &json!({"sub": user, "aud": "mana", "exp": mana_sync::clock::unix_now() + 2}),
        );
        let url = server.url(path);
        let auth = format!("Bearer {short}");
        let mut stream = SseClient::open(&url, &[("authorization", &auth)]).await;
        assert_eq!(stream.status, 200, "{path}: {}", stream.text());
        // Still delivering before the expiry.
        let pushed = server
            .push(
                &user,
                "todo",
                Some("laptop"),
                &changeset(vec![insert("tasks", path, json!({}))]),
            )
            .await;
        assert_eq!(pushed.status, 200, "{}", pushed.text);
        // Changes (the backlog, then the push) until the last event.
        let mut changes = 0;
        let last = loop {
            let event = stream.next_change(WAIT).await.expect("an event");
            if event.event != "changes" {
                break event;
            }
            changes += 1;
        };
        assert!(
            changes >= 1,
            "{path}: the push was delivered before the expiry"
        );
        assert_eq!(last.event, "token-expired", "{path}");
        assert_eq!(last.data["error"], json!("token_expired"));
        assert!(
            started.elapsed() >= Duration::from_secs(1),
            "not before the token expired: {:?}",
            started.elapsed()
        );
        let after = tokio::time::timeout(WAIT, stream.events.recv()).await;
        assert!(
            matches!(after, Ok(None)),
            "{path}: the stream ended: {after:?}"
        );
    }
    server.stop().await;
}
