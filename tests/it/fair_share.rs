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
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut statuses = Vec::new();
        for _ in 0..8 {
            let reply = server
                .pull(&victim, "todo", Some("laptop"), "tasks", EPOCH, None)
                .await;
            statuses.push((
                reply.status,
                reply.text.chars().take(200).collect::<String>(),
            ));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        statuses
    };
    let (flood, victim) = tokio::join!(flood, victim_pulls);
    for (status, text) in &victim {
        assert_eq!(*status, 200, "the victim's pull during the flood: {text}");
    }
    // The attacker's own pushes are served one after another (or told to retry), never half-written.
    let done = flood.iter().filter(|s| **s == 200).count();
    assert!(flood.iter().all(|s| *s == 200 || *s == 503), "{flood:?}");
    assert_eq!(count_rows(&attacker).await as usize, done * 2_000);
    assert_eq!(
        server.app.store.users_at_the_database(),
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
