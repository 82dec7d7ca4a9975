//! HTTP errors (SPEC §1, §12): every failure is JSON `{"error","message"}` with the right status, CORS
//! headers reach browsers on every answer, /health tells the truth about the database, and a database that
//! is down or saturated is a 503 with `Retry-After` from which the server recovers by itself.

use std::time::{Duration, Instant};

use mana_sync::devdb::{EmbeddedOptions, EmbeddedPostgres};
use serde_json::{json, Value};

use crate::support::{
    self, changeset, insert, request, token, unique_user, wait_until, Reply, TestServer, EPOCH,
    USER_LOCK_CLASS,
};

const ORIGIN: &str = "https://app.example";

fn bearer(user: &str) -> String {
    format!("Bearer {}", token(user))
}

async fn get_authed(server: &TestServer, user: &str, path: &str) -> Reply {
    let auth = bearer(user);
    server
        .request("GET", path, &[("authorization", &auth)], None)
        .await
}

async fn push_raw(
    server: &TestServer,
    user: &str,
    content_type: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    let auth = bearer(user);
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", content_type),
    ];
    headers.extend_from_slice(extra);
    server
        .request("POST", "/sync/todo", &headers, Some(body.to_vec()))
        .await
}

fn one_insert() -> Value {
    changeset(vec![insert("tasks", "t1", json!({"title": "x"}))])
}

fn assert_retry_after(reply: &Reply) {
    let value = reply.header("retry-after").unwrap_or_else(|| {
        panic!("no Retry-After on {} {}", reply.status, reply.text);
    });
    assert!(
        value.parse::<u32>().is_ok_and(|s| s >= 1),
        "Retry-After {value:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_are_json_404() {
    let server = TestServer::start().await;
    for path in [
        "/",
        "/nope",
        "/sync",
        "/sync/todo/pull/extra",
        "/sync/todo/",
        "/api/v1/sync",
    ] {
        let reply = server.request("GET", path, &[], None).await;
        reply.assert_error(404, "not_found");
    }
    let reply = server
        .request("POST", "/nope", &[], Some(b"{}".to_vec()))
        .await;
    reply.assert_error(404, "not_found");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_are_405_with_allow() {
    let server = TestServer::start().await;
    let user = unique_user("http-405");
    // Even with a valid token: the method is wrong before anything else is.
    let reply = get_authed(&server, &user, "/sync/todo").await;
    reply.assert_error(405, "method_not_allowed");
    assert_eq!(reply.header("allow"), Some("POST, OPTIONS"));

    let reply = server.request("PUT", "/health", &[], None).await;
    reply.assert_error(405, "method_not_allowed");
    assert_eq!(reply.header("allow"), Some("GET, OPTIONS"));

    let reply = server
        .request("POST", "/sync/todo/pull", &[], Some(b"{}".to_vec()))
        .await;
    reply.assert_error(405, "method_not_allowed");
    assert_eq!(reply.header("allow"), Some("GET, OPTIONS"));

    let reply = server.request("DELETE", "/sync/todo", &[], None).await;
    reply.assert_error(405, "method_not_allowed");
    assert_eq!(reply.header("allow"), Some("POST, OPTIONS"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_app_ids_are_400() {
    let server = TestServer::start().await;
    let user = unique_user("http-appid");
    let auth = bearer(&user);
    let long = format!("/sync/{}", "a".repeat(65));
    for path in ["/sync/bad*id", "/sync/to%20do", long.as_str()] {
        let reply = server
            .request(
                "POST",
                path,
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                Some(one_insert().to_string().into_bytes()),
            )
            .await;
        reply.assert_error(400, "invalid_app_id");
    }
    let reply = get_authed(
        &server,
        &user,
        &format!("/sync/bad*id/pull?collection=tasks&since={EPOCH}"),
    )
    .await;
    reply.assert_error(400, "invalid_app_id");
    assert_eq!(support::count_rows(&user).await, 0);

    // 64 characters is still fine.
    let ok = format!("/sync/{}", "a".repeat(64));
    let reply = server
        .request(
            "POST",
            &ok,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            Some(one_insert().to_string().into_bytes()),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn realtime_endpoints_refuse_what_they_cannot_serve() {
    let server = TestServer::start().await;
    let user = unique_user("http-later");
    // Streams authenticate like every HTTP request.
    for path in [
        "/sync/todo/stream?collections=tasks",
        "/sync/stream?apps=todo",
    ] {
        server
            .request("GET", path, &[], None)
            .await
            .assert_error(401, "missing_token");
    }
    // WebSocket endpoints without an upgrade.
    for path in ["/ws", "/ws/todo"] {
        get_authed(&server, &user, path)
            .await
            .assert_error(426, "upgrade_required");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_and_headers() {
    let server = TestServer::start_with(|config| config.cors_origins = vec![ORIGIN.into()]).await;

    // Preflight: no auth, 204, the origin echoed (credentials forbid "*").
    let reply = server
        .request(
            "OPTIONS",
            "/sync/todo",
            &[
                ("origin", ORIGIN),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization, content-type, x-client-id",
                ),
            ],
            None,
        )
        .await;
    assert_eq!(reply.status, 204, "{}", reply.text);
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(
        reply.header("access-control-allow-credentials"),
        Some("true")
    );
    let methods = reply
        .header("access-control-allow-methods")
        .expect("allow-methods");
    for method in ["GET", "POST", "OPTIONS"] {
        assert!(methods.contains(method), "{methods}");
    }
    let allowed = reply
        .header("access-control-allow-headers")
        .expect("allow-headers")
        .to_ascii_lowercase();
    for name in ["authorization", "content-type", "x-client-id"] {
        assert!(allowed.contains(name), "{allowed}");
    }
    assert!(reply
        .header("vary")
        .is_some_and(|v| v.to_ascii_lowercase().contains("origin")));

    // Preflight of the pull endpoint too.
    let reply = server
        .request(
            "OPTIONS",
            "/sync/todo/pull",
            &[("origin", ORIGIN), ("access-control-request-method", "GET")],
            None,
        )
        .await;
    assert_eq!(reply.status, 204, "{}", reply.text);
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));

    // A disallowed origin gets no CORS grant, on preflight or on a real request.
    for (method, path) in [("OPTIONS", "/sync/todo"), ("GET", "/health")] {
        let reply = server
            .request(
                method,
                path,
                &[
                    ("origin", "https://evil.example"),
                    ("access-control-request-method", "POST"),
                ],
                None,
            )
            .await;
        assert!(reply.status < 500, "{}", reply.text);
        assert_eq!(reply.header("access-control-allow-origin"), None);
        assert_eq!(reply.header("access-control-allow-credentials"), None);
    }

    // An error answer to an allowed origin still carries CORS, so the browser can read the JSON.
    let reply = server
        .request(
            "GET",
            &format!("/sync/todo/pull?collection=tasks&since={EPOCH}"),
            &[("origin", ORIGIN)],
            None,
        )
        .await;
    reply.assert_error(401, "missing_token");
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(
        reply.header("access-control-allow-credentials"),
        Some("true")
    );

    // And so does a success.
    let user = unique_user("http-cors");
    let auth = bearer(&user);
    let reply = server
        .request(
            "GET",
            &format!("/sync/todo/pull?collection=tasks&since={EPOCH}"),
            &[("origin", ORIGIN), ("authorization", &auth)],
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.header("access-control-allow-origin"), Some(ORIGIN));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_ok() {
    let server = TestServer::start().await;
    let reply = server.request("GET", "/health", &[], None).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert!(reply.text.contains(r#""status":"ok""#), "{}", reply.text);
    assert_eq!(reply.body["status"], json!("ok"));
    assert_eq!(reply.body["service"], json!("mana-sync"));
    assert!(
        reply.body["timestamp"]
            .as_str()
            .is_some_and(|t| t.starts_with("20") && t.ends_with('Z')),
        "{}",
        reply.text
    );
    assert!(reply.body["connections"].is_u64(), "{}", reply.text);
    assert!(
        reply.body["httpConnections"].as_u64().unwrap() >= 1,
        "this request's own connection is open: {}",
        reply.text
    );
    assert_eq!(reply.body["database"], json!("ok"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_users() {
    let server = TestServer::start().await;
    let reply = server.request("GET", "/health", &[], None).await;
    reply.assert_status(200);
    assert_eq!(reply.body["users"], json!(0), "{}", reply.text);
    // Users with real-time connections: two sockets of one user and one of another are two users.
    let (alice, bob) = (unique_user("health-a"), unique_user("health-b"));
    let _sockets = [
        server.authed_socket("/ws", &alice, Some("laptop")).await,
        server.authed_socket("/ws", &alice, Some("phone")).await,
        server.authed_socket("/ws", &bob, None).await,
    ];
    let reply = server.request("GET", "/health", &[], None).await;
    reply.assert_status(200);
    assert_eq!(reply.body["users"], json!(2), "{}", reply.text);
    assert_eq!(reply.body["connections"], json!(3), "{}", reply.text);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_parameter_errors() {
    let server = TestServer::start().await;
    let user = unique_user("http-pull");
    let cases = [
        ("/sync/todo/pull?collection=tasks", "missing_parameter"),
        (
            "/sync/todo/pull?collection=tasks&since=",
            "missing_parameter",
        ),
        (
            "/sync/todo/pull?since=1970-01-01T00:00:00.000Z",
            "missing_parameter",
        ),
        ("/sync/todo/pull", "missing_parameter"),
        (
            "/sync/todo/pull?collection=tasks&since=garbage",
            "invalid_since",
        ),
        (
            "/sync/todo/pull?collection=tasks&since=2026-13-45T99:00:00Z",
            "invalid_since",
        ),
        (
            "/sync/todo/pull?collection=ta*sks&since=1970-01-01T00:00:00.000Z",
            "invalid_collection",
        ),
        (
            "/sync/todo/pull?collection=tasks&since=1970-01-01T00:00:00.000Z&limit=abc",
            "invalid_limit",
        ),
        (
            "/sync/todo/pull?collection=tasks&since=1970-01-01T00:00:00.000Z&limit=-5",
            "invalid_limit",
        ),
    ];
    for (path, code) in cases {
        let reply = get_authed(&server, &user, path).await;
        assert_eq!(reply.status, 400, "{path}: {}", reply.text);
        reply.assert_error(400, code);
    }
    let long = format!(
        "/sync/todo/pull?collection={}&since={}",
        "c".repeat(65),
        support::percent_encode(EPOCH)
    );
    get_authed(&server, &user, &long)
        .await
        .assert_error(400, "invalid_collection");
    // The same query, well-formed, is fine.
    let reply = get_authed(
        &server,
        &user,
        "/sync/todo/pull?collection=tasks&since=1970-01-01T00:00:00.000Z&limit=10",
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_body_errors_write_nothing() {
    let server = TestServer::start().await;
    let user = unique_user("http-push");
    let body = one_insert().to_string().into_bytes();

    let reply = push_raw(&server, &user, "text/plain", &[], &body).await;
    reply.assert_error(415, "unsupported_media_type");
    let reply = push_raw(
        &server,
        &user,
        "application/x-www-form-urlencoded",
        &[],
        &body,
    )
    .await;
    reply.assert_error(415, "unsupported_media_type");

    for bad in [
        &b"{\"changes\": ["[..],
        b"not json at all",
        b"",
        b"{\"since\":\"1970-01-01T00:00:00.000Z\",\"changes\":[{\"table\":\"tasks\",}]}",
    ] {
        let reply = push_raw(&server, &user, "application/json", &[], bad).await;
        reply.assert_error(400, "invalid_json");
    }
    let long_id = "d".repeat(513);
    let reply = push_raw(
        &server,
        &user,
        "application/json",
        &[("x-client-id", &long_id)],
        &body,
    )
    .await;
    reply.assert_error(400, "invalid_client_id");
    assert_eq!(support::count_rows(&user).await, 0, "nothing was written");

    // Pull checks X-Client-Id as well; 512 bytes is the longest accepted.
    let auth = bearer(&user);
    let path = format!("/sync/todo/pull?collection=tasks&since={EPOCH}");
    let reply = server
        .request(
            "GET",
            &path,
            &[("authorization", &auth), ("x-client-id", &long_id)],
            None,
        )
        .await;
    reply.assert_error(400, "invalid_client_id");
    let ok_id = "d".repeat(512);
    let reply = server
        .request(
            "GET",
            &path,
            &[("authorization", &auth), ("x-client-id", &ok_id)],
            None,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    // The same body with the right content type (with parameters) goes through.
    let reply = push_raw(
        &server,
        &user,
        "application/json; charset=utf-8",
        &[],
        &body,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(support::count_rows(&user).await, 1);
    server.stop().await;
}

/// Retries `push` until it answers 200 (safety net: 60 s); the pool may still hold connections to the
/// server that went away, and each of those fails once.
async fn push_until_ok(server: &TestServer, user: &str, body: &Value) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reply = server.push(user, "todo", Some("dev-a"), body).await;
        if reply.status == 200 || Instant::now() > deadline {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_is_503_and_the_server_recovers() {
    let dir = std::path::PathBuf::from(format!("/tmp/msdown-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let options = EmbeddedOptions {
        durable: false,
        ..EmbeddedOptions::from_process_env(&dir)
    };
    let embedded = EmbeddedPostgres::start(options.clone())
        .await
        .expect("private cluster starts");
    let url = embedded.connection_string();
    let server = TestServer::start_with(move |config| {
        config.database_url = Some(url);
        config.db_acquire_timeout = Duration::from_secs(1);
    })
    .await;
    let user = unique_user("http-down");
    let first = changeset(vec![insert("tasks", "t1", json!({"title": "before"}))]);
    let reply = server.push(&user, "todo", Some("dev-a"), &first).await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    embedded.stop().await.expect("cluster stops");

    let second = changeset(vec![insert("tasks", "t2", json!({"title": "during"}))]);
    for _ in 0..2 {
        let reply = server.push(&user, "todo", Some("dev-a"), &second).await;
        reply.assert_error(503, "database_unavailable");
        assert_retry_after(&reply);
    }
    let reply = server
        .pull(&user, "todo", Some("dev-b"), "tasks", EPOCH, None)
        .await;
    reply.assert_error(503, "database_unavailable");
    assert_retry_after(&reply);
    let reply = server.request("GET", "/health", &[], None).await;
    assert_eq!(reply.status, 503, "{}", reply.text);
    assert!(
        reply.text.contains(r#""status":"degraded""#),
        "{}",
        reply.text
    );
    assert_eq!(reply.body["service"], json!("mana-sync"));
    assert_ne!(reply.body["database"], json!("ok"));

    // The database comes back on the same directory: the server recovers without a restart.
    let embedded = EmbeddedPostgres::start(options)
        .await
        .expect("private cluster restarts");
    let reply = push_until_ok(&server, &user, &second).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let reply = server.request("GET", "/health", &[], None).await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert!(reply.text.contains(r#""status":"ok""#), "{}", reply.text);
    // Both pushes that answered 200 are there, the failed ones left nothing behind.
    let (changes, _) = server
        .pull_all(&user, "todo", Some("dev-b"), "tasks", EPOCH, None)
        .await;
    let mut ids: Vec<&str> = changes.iter().filter_map(|c| c["id"].as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids, ["t1", "t2"]);

    server.stop().await;
    embedded.stop().await.expect("cluster stops");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server with a pool of one connection, which a request waits for at most `acquire_timeout`.
async fn one_connection_server(acquire_timeout: Duration) -> TestServer {
    TestServer::start_with(|config| {
        config.db_pool_size = 1;
        config.db_acquire_timeout = acquire_timeout;
    })
    .await
}

/// Holds `user`'s advisory lock exactly as a push does, from outside the server, until the returned client
/// ends its transaction.
async fn hold_user_lock(user: &str) -> tokio_postgres::Client {
    let holder = support::superuser().await;
    holder.batch_execute("BEGIN").await.unwrap();
    holder
        .execute(
            &format!(
                "SELECT set_config('app.current_user_id', $1, true), \
                 pg_advisory_xact_lock({USER_LOCK_CLASS}, hashtext($1))"
            ),
            &[&user],
        )
        .await
        .unwrap();
    holder
}

/// A push cancelled inside its transaction (here while it waits for its user's lock) gives its connection
/// back closed, not to the pool: PostgreSQL ends the session, which ends the lock wait and rolls back what
/// the push began, and the next request gets a fresh connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_cancelled_inside_its_transaction_closes_its_connection() {
    let server = one_connection_server(Duration::from_secs(30)).await;
    let writer = unique_user("pool-abort-w");
    let holder = hold_user_lock(&writer).await;
    let push = {
        let (shared, user) = (server.shared.clone(), writer.clone());
        tokio::spawn(async move {
            let body = bytes::Bytes::from(one_insert().to_string());
            let changeset = mana_sync::protocol::parse_changeset(body).expect("a valid push");
            let pushed = shared
                .store
                .push(&user, "todo", Some("dev-a"), &changeset, 100, None);
            pushed.await.map(drop)
        })
    };
    let observer = support::superuser().await;
    wait_until(
        "the push waits on the lock",
        Duration::from_secs(30),
        || async { support::lock_waiters(&observer, &writer).await > 0 },
    )
    .await;
    assert_eq!(server.shared.store.pool_status().in_use, 1);

    push.abort();
    assert!(push.await.unwrap_err().is_cancelled());
    // Closed: PostgreSQL drops the session's lock wait while the lock is still held.
    wait_until(
        "the cancelled push's session ended",
        Duration::from_secs(30),
        || async { support::lock_waiters(&observer, &writer).await == 0 },
    )
    .await;
    let pool = server.shared.store.pool_status();
    assert_eq!(
        (pool.in_use, pool.idle),
        (0, 0),
        "not back in the pool: {pool:?}"
    );

    holder.batch_execute("ROLLBACK").await.unwrap();
    let reply = server
        .push(&writer, "todo", Some("dev-a"), &one_insert())
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        support::count_rows(&writer).await,
        1,
        "only the second push wrote"
    );
    server.stop().await;
}

/// Makes a push of `writer` take the pool's only connection and wait on the user's lock, which the returned
/// client holds (until it commits); answers that client and the push's task.
async fn take_the_only_connection(
    server: &TestServer,
    writer: &str,
) -> (tokio_postgres::Client, tokio::task::JoinHandle<Reply>) {
    let holder = hold_user_lock(writer).await;
    // A push of that user takes the pool's only connection and waits on the lock.
    let url = server.url("/sync/todo");
    let auth = bearer(writer);
    let body = one_insert().to_string().into_bytes();
    let blocked = tokio::spawn(async move {
        request(
            "POST",
            &url,
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
                ("x-client-id", "dev-a"),
            ],
            Some(body),
        )
        .await
    });
    let observer = support::superuser().await;
    wait_until(
        "the push waits on the lock",
        Duration::from_secs(30),
        || async {
            assert!(
                !blocked.is_finished(),
                "the push finished while the lock was held"
            );
            support::lock_waiters(&observer, writer).await > 0
        },
    )
    .await;
    assert_eq!(server.shared.store.pool_status().in_use, 1);
    (holder, blocked)
}

/// A request that gives up while it waits for a connection stops counting as waiting (a gauge that counted
/// before an `.await` stayed high when its request was cancelled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cancelled_while_waiting_for_a_connection_stops_counting() {
    let server = one_connection_server(Duration::from_secs(60)).await;
    let writer = unique_user("pool-cancel-w");
    let (holder, blocked) = take_the_only_connection(&server, &writer).await;
    let shared = server.shared.clone();
    let waiter = tokio::spawn(async move { shared.store.ping().await });
    wait_until(
        "the ping waits for a connection",
        Duration::from_secs(30),
        || async { server.shared.store.pool_status().waiting == 1 },
    )
    .await;
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    assert_eq!(server.shared.store.pool_status().waiting, 0);

    holder.batch_execute("COMMIT").await.unwrap();
    let reply = blocked.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    server
        .shared
        .store
        .ping()
        .await
        .expect("the pool serves again");
    let pool = server.shared.store.pool_status();
    assert_eq!((pool.in_use, pool.waiting), (0, 0), "{pool:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_pool_is_503_and_nothing_queues_forever() {
    let server = one_connection_server(Duration::from_millis(200)).await;
    let writer = unique_user("http-sat-w");
    let other = unique_user("http-sat-r");
    let (holder, blocked) = take_the_only_connection(&server, &writer).await;

    // Another user's request finds no free connection within the acquire timeout.
    let reply = server
        .pull(&other, "todo", None, "tasks", EPOCH, None)
        .await;
    reply.assert_error(503, "database_saturated");
    assert_retry_after(&reply);
    let reply = server
        .push(&other, "todo", Some("dev-x"), &one_insert())
        .await;
    reply.assert_error(503, "database_saturated");
    assert_retry_after(&reply);
    assert_eq!(support::count_rows(&other).await, 0);

    // Release: the waiting push completes normally.
    holder.batch_execute("COMMIT").await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(60), blocked)
        .await
        .expect("the blocked push finishes once the lock is free")
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(support::count_rows(&writer).await, 1);
    // And the pool serves again.
    let reply = server
        .pull(&other, "todo", None, "tasks", EPOCH, None)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    server.stop().await;
}

/// What a browser's `fetch` does with a big upload: it writes the whole body before it reads anything.
/// The server must let it finish (draining what it will not keep) so the 413 can be read, not answer
/// and close under it (a broken pipe, which the client reports as a network error and retries forever).
/// Twenty 12 MB pushes in a row, declared and chunked; nothing is written; the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_body_written_before_reading_gets_a_readable_413() {
    use std::io::{Read, Write};
    let server = TestServer::start().await;
    let user = unique_user("big-upload");
    let auth = bearer(&user);
    let body = vec![b' '; 12 * 1024 * 1024];
    let addr = server.addr;
    for attempt in 0..20 {
        let chunked = attempt % 2 == 1;
        let auth = auth.clone();
        let body = body.clone();
        let answer = tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let framing = if chunked {
                "Transfer-Encoding: chunked".to_owned()
            } else {
                format!("Content-Length: {}", body.len())
            };
            let head = format!(
                "POST /sync/todo HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\
                 Content-Type: application/json\r\n{framing}\r\n\r\n"
            );
            let mut written = stream.write_all(head.as_bytes());
            if chunked {
                for chunk in body.chunks(64 * 1024) {
                    written = written
                        .and_then(|()| write!(stream, "{:x}\r\n", chunk.len()))
                        .and_then(|()| stream.write_all(chunk))
                        .and_then(|()| stream.write_all(b"\r\n"));
                }
                written = written.and_then(|()| stream.write_all(b"0\r\n\r\n"));
            } else {
                written = written.and_then(|()| stream.write_all(&body));
            }
            written.map_err(|e| format!("writing the body failed: {e}"))?;
            let mut answer = Vec::new();
            stream
                .read_to_end(&mut answer)
                .map_err(|e| format!("reading the answer failed: {e}"))?;
            Ok::<_, String>(String::from_utf8_lossy(&answer).into_owned())
        })
        .await
        .unwrap();
        let answer =
            answer.unwrap_or_else(|e| panic!("attempt {attempt} (chunked: {chunked}): {e}"));
        assert!(
            answer.starts_with("HTTP/1.1 413"),
            "attempt {attempt}: {answer}"
        );
        assert!(
            answer.contains("\"error\":\"payload_too_large\""),
            "{answer}"
        );
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    assert_eq!(support::count_rows(&user).await, 0);
    let reply = server
        .push(
            &user,
            "todo",
            Some("dev-a"),
            &changeset(vec![insert("tasks", "t1", json!({}))]),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    server.stop().await;
}
